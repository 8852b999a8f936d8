"""Kubernetes manifests: rendering, offline validation, overlays."""
