"""moeyard: expert_actors."""
