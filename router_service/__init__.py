"""moeyard: router_service."""
