"""Kubernetes deployment: typed settings, the KubeRay manifests rendered from a cluster config, and
their offline validation against the KubeRay CRDs and the Kubernetes schemas."""
