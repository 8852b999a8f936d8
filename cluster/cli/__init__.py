"""The ``moeyard`` command."""
