"""Paged attention as a Triton kernel (the ``triton`` backend of :mod:`moeyard.attention.paged`).

One program per (sequence, KV head, tile of ``BLOCK_M`` query rows), where a KV head's query heads are
folded into rows (GQA without repetition; MLA's single latent "head" serves all ``H``). It walks the
sequence's keys ``BLOCK_N`` positions at a time, looking each position's block up in the block table
and reading the cache in place, with an online softmax in fp32; keys past the tile's last query are
never read. Decode (one query) and prefill chunks (many) share the kernel, and a sequence with no new
tokens (an empty chunk) costs one early exit.

The head dimension is split into a head and an optional tail (MLA's 512-wide latent + 64-wide rope key),
each padded by masks to a power of two, so a DeepSeek row pads no lane; with ``v_cache=None`` the head
is the values' columns and the values are the head part of the keys already loaded (MLA's latent is
both). fp32 inputs use IEEE products (no TF32), so the fp32
engine stays comparable with ``transformers``.

Triton is imported at first use: the package imports without it, and ``TRITON_INTERPRET=1`` runs the
same kernel on the CPU (the tests do).
"""

from __future__ import annotations

import functools

import torch

from moeyard.attention.attn_meta import AttnMeta


def _pow2_split(d: int) -> tuple[int, int]:
    """``d`` as ``head + tail``, both powers of two and the tail at least 16 (a dot's narrowest side) or
    0; else ``(d, 0)``, padded by masks."""
    head = 1 << (d.bit_length() - 1)
    tail = d - head
    return (head, tail) if tail == 0 or (tail >= 16 and tail & (tail - 1) == 0) else (d, 0)


def _next_pow2(n: int, floor: int = 16) -> int:
    return max(floor, 1 << max(0, n - 1).bit_length())


@functools.cache
def _kernel():
    """The jit-compiled kernel (:mod:`moeyard.attention.paged_triton_kernel` imports Triton)."""
    from moeyard.attention.paged_triton_kernel import paged_attn

    return paged_attn


def triton_paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor | None,
                           meta: AttnMeta, scale: float, v_dim: int) -> torch.Tensor:
    """:data:`moeyard.attention.paged.AttendFn` as a Triton kernel. ``[T, H, dv]``."""
    t, h, dq = q.shape
    kv = k_cache.shape[1]
    g = h // kv
    out = q.new_empty(t, h, v_dim)
    if t == 0:
        return out
    v_is_k = v_cache is None
    # values read from the keys: the head part is exactly the values' columns
    d1, d2 = (v_dim, dq - v_dim) if v_is_k else _pow2_split(dq)
    v = k_cache if v_is_k else v_cache
    rows = meta.max_q * g
    block_m = min(64 if dq <= 128 else 32, _next_pow2(rows))
    block_n = 64 if dq <= 128 else 32
    grid = (meta.num_seqs, kv, -(-rows // block_m))
    q = q.contiguous()
    _kernel()[grid](
        q, k_cache, v, out, meta.block_tables, meta.q_starts, meta.q_lens, meta.ctx_lens, scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), meta.block_tables.stride(0),
        G=g, PAGE=meta.block_size, BLOCK_M=block_m, BLOCK_N=block_n, D1=d1, D1P=_next_pow2(d1), D2=d2,
        D2P=_next_pow2(d2) if d2 else 0,
        DV=v_dim, DVP=_next_pow2(v_dim), V_IS_K=v_is_k, PREC="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=4 if dq <= 128 else 8)
    return out
