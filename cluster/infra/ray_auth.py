"""Ray 2.60's token authentication, on for every process we start or connect from."""

from __future__ import annotations

import os


def ray_env() -> None:
    """Turn token authentication on in this process's environment (a driver given an explicit address does
    not turn it on by itself; Ray reads the mode when it is imported, so call this before ``import ray``)."""
    os.environ.setdefault("RAY_AUTH_MODE", "token")
