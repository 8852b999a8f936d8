"""moeyard: attention."""
