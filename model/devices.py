"""Compute devices: the one place a device setting (``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``) becomes a
``torch.device``."""

from __future__ import annotations

import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` (or None): CUDA where this process sees a GPU, else the CPU. ``cuda``/``cuda:N`` without a
    usable GPU is a ValueError that says so (a config asking for GPUs on a machine without them)."""
    if isinstance(device, torch.device):
        dev = device
    else:
        name = (device or "auto").strip().lower()
        if name == "auto":
            return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        try:
            dev = torch.device(name)
        except RuntimeError:
            raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!s} asked for, but this process sees no CUDA GPU "
                             "(use device: auto or cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!s} asked for, but this process sees "
                             f"{torch.cuda.device_count()} GPU(s)")
    elif dev.type != "cpu":
        raise ValueError(f"unsupported device {device!s}; use auto, cpu, cuda or cuda:N")
    return dev


def host_tensor_to(data, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A tensor of host data (a list) on ``device`` without a host sync: made on the CPU, then copied
    with ``non_blocking`` (the driver stages pageable memory before the call returns)."""
    t = torch.tensor(data, dtype=dtype, device="cpu")
    return t if torch.device(device).type == "cpu" else t.to(device, non_blocking=True)
