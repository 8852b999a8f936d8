"""The paged-attention kernels against the reference (whole contexts gathered, masked densely).

Tolerances: fp32 within 2e-5 (the kernels only reorder the softmax's sums); bf16 within 2e-2 of the
reference's own bf16 result (both round the probabilities to bf16 before the values' product, at
different points of the recurrence)."""

from __future__ import annotations

import functools

import pytest
import torch

from moeyard.attention.attn_meta import AttnMeta
from moeyard.attention.paged import gather_attention, paged_attention, paged_recurrence, resolve_attention
from moeyard.attention.paged_triton import _pow2_split, triton_paged_attention

BS = 4
# (new tokens, tokens in the cache after the step): a decode exactly at a block boundary, a decode one
# past it, a prefill chunk of a sequence with history, an empty chunk, a whole prompt of 4 blocks and
# a first token.
BATCH = [(1, 16), (1, 17), (5, 9), (0, 7), (16, 16), (1, 1)]
TOL = {torch.float32: dict(atol=2e-5, rtol=0), torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
       torch.float16: dict(atol=4e-3, rtol=4e-3)}


def _step(batch, num_blocks=64, seed=0):
    """Shuffled (non-contiguous) block tables for ``batch``'s sequences, and their meta."""
    g = torch.Generator().manual_seed(seed)
    free = torch.randperm(num_blocks, generator=g).tolist()
    tables = [[free.pop() for _ in range(-(-c // BS))] for _, c in batch]
    return AttnMeta.build([q for q, _ in batch], [c for _, c in batch], tables, BS)


def _inputs(meta, h, kv, dq, dv, dtype, separate_v=True, num_blocks=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(meta.num_tokens, h, dq, generator=g).to(dtype)
    k = torch.randn(num_blocks * BS, kv, dq, generator=g).to(dtype)
    v = torch.randn(num_blocks * BS, kv, dv, generator=g).to(dtype) if separate_v else None
    return q, k, v


def _triton():
    import triton  # noqa: F401  (a test extra, never skipped: it runs in its interpreter, tests/conftest.py)
    return triton_paged_attention


KERNELS = {
    "paged": paged_attention,                                                    # on CPUs: the flash kernel
    "paged_one_block_tiles": functools.partial(paged_attention, tile_bytes=1),  # ... merged by log-sum-exp
    "recurrence": paged_recurrence,                                              # other devices' path
    "recurrence_one_block_tiles": functools.partial(paged_recurrence, tile_bytes=1),  # the online softmax
}
SHAPES = [  # (H, KV, dq, dv, values separate?)
    (8, 2, 16, 16, True),    # GQA
    (4, 4, 24, 24, True),    # MHA, a head size that is no power of two
    (6, 1, 32, 32, True),    # MQA
    (8, 1, 48, 32, False),   # MLA absorbed: latent 32 + rope 16, values = the latent
]


# Triton's CPU interpreter computes a bf16 ``tl.dot`` wrongly (its numpy has no bf16; a plain bf16 dot is
# off by 1e10 in triton 3.9), so the Triton kernel's half-precision path is checked in fp16 here and in
# bf16 by bench/gpu_check.py on a GPU.
KERNEL_DTYPES = [(k, d) for k in KERNELS for d in ("fp32", "bf16", "fp16")] + [
    ("triton", "fp32"), ("triton", "fp16")]
DECODE_BATCH = [(1, 16), (1, 17), (3, 9), (1, 40), (8, 33), (1, 1)]
"""A step of short queries only (decode, speculative-style 3 and 8): the CPU kernel folds heads into rows."""
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.mark.parametrize("batch", [BATCH, DECODE_BATCH], ids=["mixed", "decode"])
@pytest.mark.parametrize("shape", SHAPES, ids=["gqa", "mha_d24", "mqa", "mla"])
@pytest.mark.parametrize("kernel,dtype_name", KERNEL_DTYPES)
def test_kernel_equals_reference(kernel, dtype_name, shape, batch):
    dtype = DTYPES[dtype_name]
    h, kv, dq, dv, separate = shape
    meta = _step(batch)
    q, k, v = _inputs(meta, h, kv, dq, dv, dtype, separate)
    fn = _triton() if kernel == "triton" else KERNELS[kernel]
    ref = gather_attention(q, k, v, meta, dq ** -0.5, dv)
    got = fn(q, k, v, meta, dq ** -0.5, dv)
    assert got.shape == (meta.num_tokens, h, dv) and got.dtype == dtype
    torch.testing.assert_close(got.float(), ref.float(), **TOL[dtype])


def test_reference_is_attention():
    """The reference itself against a direct per-sequence softmax: keys up to each query's position."""
    meta = _step(BATCH)
    q, k, v = _inputs(meta, 4, 2, 8, 8, torch.float64)
    got = gather_attention(q, k, v, meta, 0.3, 8)
    tables = meta.block_tables.tolist()
    row = 0
    for i, (n, c) in enumerate(BATCH):
        slots = torch.tensor([tables[i][p // BS] * BS + p % BS for p in range(c)])
        for j in range(n):
            pos = c - n + j
            keys = k[slots[:pos + 1]].repeat_interleave(2, dim=1)      # [pos+1, H, d]
            vals = v[slots[:pos + 1]].repeat_interleave(2, dim=1)
            p = torch.softmax(torch.einsum("hd,chd->hc", q[row] * 0.3, keys), dim=-1)
            torch.testing.assert_close(got[row], torch.einsum("hc,chd->hd", p, vals))
            row += 1
    assert row == meta.num_tokens


def test_a_step_of_only_empty_chunks_returns_nothing():
    meta = AttnMeta.build([0, 0], [3, 5], [[1], [2, 3]], BS)
    q, k, v = _inputs(meta, 4, 2, 8, 8, torch.float32)
    assert paged_attention(q, k, v, meta, 1.0, 8).shape == (0, 4, 8)
    assert gather_attention(q, k, v, meta, 1.0, 8).shape == (0, 4, 8)


def test_meta_refuses_a_block_table_too_short_for_its_context():
    with pytest.raises(ValueError, match="2 blocks of 4"):
        AttnMeta.build([1], [9], [[0, 1]], 4)


def test_head_dims_split_into_powers_of_two():
    assert _pow2_split(576) == (512, 64)    # DeepSeek's latent + rope key
    assert _pow2_split(128) == (128, 0)
    assert _pow2_split(72) == (72, 0)       # a tail of 8 is too narrow for a dot: masked instead
    assert _pow2_split(24) == (24, 0)


def test_backends_resolve():
    assert resolve_attention("auto", "cpu") == (paged_attention, True)
    assert resolve_attention("gather", "cpu") == (gather_attention, False)
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        resolve_attention("flash", "cpu")
