"""A guard against tensors made without an explicit device (see tests/attention/test_device_guard.py)."""

from __future__ import annotations

from contextlib import contextmanager

import torch


@contextmanager
def default_device_meta():
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(None)
