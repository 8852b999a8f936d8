"""moeyard: expert-parallel serving for Mixture-of-Experts models.

One import name. The checkout's top-level package folders are its sub-packages (``pyproject.toml``
maps them): ``moeyard.model``, ``moeyard.expert_actors``, ``moeyard.router_service``,
``moeyard.attention`` and ``moeyard.cluster``. This folder holds what clients and servers share:
the Python client (``moeyard.client``), wire names and gRPC helpers (``moeyard.rpc``) and the
generated stubs (``moeyard.v1``).
"""
