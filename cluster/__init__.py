"""moeyard: cluster."""
