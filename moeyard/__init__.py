"""moeyard's public Python package: generated gRPC stubs (``moeyard.v1``) and the client."""
