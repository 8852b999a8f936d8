"""Rotary position embeddings (default, linear, llama3, yarn), pure functions.

Two channel layouts: "half" (pairs are ``(i, i + d/2)``, Llama/Qwen/Mixtral)
and "interleaved" (pairs are adjacent channels, DeepSeek). Any layout works as
long as queries and keys use the same one, which is why DeepSeek-V3's
de-interleave-then-rotate form equals the interleaved rotation here.
"""

from __future__ import annotations

import math

import torch

from moeyard.model.spec import RopeSpec


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def inv_freq_and_scale(rope: RopeSpec, dim: int, max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies ``[dim/2]`` and the cos/sin scale for a rotary dim."""
    base = rope.theta
    inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))
    kind = rope.rope_type
    if kind == "default":
        return inv, 1.0
    if kind == "linear":
        return inv / rope.factor, 1.0
    if kind == "llama3":
        old = rope.original_max_position_embeddings or max_position_embeddings
        low_wl = old / rope.low_freq_factor
        high_wl = old / rope.high_freq_factor
        wl = 2 * math.pi / inv
        out = torch.where(wl > low_wl, inv / rope.factor, inv)
        smooth = (old / wl - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * out / rope.factor + smooth * out
        medium = ~(wl < high_wl) & ~(wl > low_wl)
        return torch.where(medium, smoothed, out), 1.0
    if kind == "yarn":
        factor = rope.factor
        old = rope.original_max_position_embeddings or max_position_embeddings
        if rope.attention_factor is not None:
            scale = float(rope.attention_factor)
        elif rope.mscale and rope.mscale_all_dim:
            scale = yarn_mscale(factor, rope.mscale) / yarn_mscale(factor, rope.mscale_all_dim)
        else:
            scale = yarn_mscale(factor)

        def corr_dim(rot: float) -> float:
            return (dim * math.log(old / (rot * 2 * math.pi))) / (2 * math.log(base))

        low, high = corr_dim(rope.beta_fast), corr_dim(rope.beta_slow)
        if rope.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
        extrap = 1 - ramp
        pos_freqs = base ** (torch.arange(0, dim, 2, device="cpu").float() / dim)
        inv = (1.0 / (factor * pos_freqs)) * (1 - extrap) + (1.0 / pos_freqs) * extrap
        return inv, scale
    raise ValueError(f"unsupported rope_type {kind!r}")


class RotaryEmbedding:
    """Precomputed cos/sin tables; ``apply`` rotates ``[T, H, dim]`` at ``positions [T]``."""

    def __init__(self, rope: RopeSpec, dim: int, max_positions: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        inv, scale = inv_freq_and_scale(rope, dim, max_positions)  # on the CPU: the same tables everywhere
        t = torch.arange(max_positions, dtype=torch.int64, device="cpu").float()
        freqs = torch.outer(t, inv)  # [max_pos, dim/2]
        self.interleaved = rope.interleaved
        self.cos = (freqs.cos() * scale).to(device)
        self.sin = (freqs.sin() * scale).to(device)
        self.dtype = dtype
        self.dim = dim

    def apply(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``x [T, H, dim]``, ``positions [T]`` -> rotated ``x`` (same dtype)."""
        cos = self.cos[positions].unsqueeze(1)  # [T, 1, dim/2]
        sin = self.sin[positions].unsqueeze(1)
        if self.interleaved:
            xf = x.float().reshape(*x.shape[:-1], -1, 2)
            x1, x2 = xf[..., 0], xf[..., 1]
            out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
            return out.to(x.dtype)
        half = x.shape[-1] // 2
        cos = cos.to(x.dtype)
        sin = sin.to(x.dtype)
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
