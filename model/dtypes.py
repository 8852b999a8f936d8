"""Compute dtypes: the one place a dtype name from a config, a flag or a checkpoint becomes a torch dtype."""

from __future__ import annotations

import torch

COMPUTE_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16",
            # fp16 checkpoints run in bf16: same width, and CPUs have no fast fp16 matmul
            "float16": "bfloat16", "fp16": "bfloat16", "half": "bfloat16"}


def resolve_dtype(dtype: torch.dtype | str | None, default: str | None = None) -> torch.dtype:
    """``dtype`` (a torch dtype or a name such as ``"bf16"``), else ``default`` (e.g. the checkpoint's
    ``torch_dtype``), else float32; ValueError naming the dtype for anything but float32/bfloat16."""
    if isinstance(dtype, torch.dtype):
        if dtype == torch.float16:
            return torch.bfloat16
        if dtype not in COMPUTE_DTYPES.values():
            raise ValueError(f"unsupported dtype {dtype}; use float32 or bfloat16")
        return dtype
    name = dtype or default or "float32"
    name = _ALIASES.get(name, name)
    if name not in COMPUTE_DTYPES:
        raise ValueError(f"unsupported dtype {name!r}; use float32 or bfloat16")
    return COMPUTE_DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """``"float32"`` or ``"bfloat16"`` for a compute dtype."""
    return {v: k for k, v in COMPUTE_DTYPES.items()}[dtype]
