"""The Serve application: one module per deployment, the builder, the public API server, the output sink."""
