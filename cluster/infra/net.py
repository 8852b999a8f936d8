"""This node's address as the Ray cluster knows it (what a server bound on a wildcard advertises)."""

from __future__ import annotations

from moeyard.rpc import local_ip


def node_ip() -> str:
    """Ray's address for this node when this process is connected to Ray, else :func:`~moeyard.rpc.local_ip`."""
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except Exception:  # ray not connected
        pass
    return local_ip()
