"""Grouped SwiGLU against per-token reference loops."""

from __future__ import annotations

import math

import pytest
import torch

from moeyard.model.ffn import (
    bucket_rows,
    gemm_shapes_ok,
    grouped_gemm_supported,
    grouped_swiglu,
    grouped_swiglu_gemm,
    swiglu,
    uses_row_buckets,
)


def _silu(v: float) -> float:
    return v / (1.0 + math.exp(-v))


def _ffn_ref_token(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """One token through one SwiGLU expert, in float64, straight from the definition."""
    x, gate, up, down = (t.double() for t in (x, gate, up, down))
    g = gate @ x
    u = up @ x
    act = torch.tensor([_silu(float(a)) for a in g], dtype=torch.float64) * u
    return down @ act


def _grouped_ref(x, counts, w13, w2, slot_index=None):
    inter = w2.shape[-1]
    slot_index = list(range(w13.shape[0])) if slot_index is None else slot_index
    out = torch.zeros(x.shape, dtype=torch.float64)
    row = 0
    for seg, n in enumerate(counts):
        w = slot_index[seg]
        for _ in range(n):
            out[row] = _ffn_ref_token(x[row], w13[w, :inter], w13[w, inter:], w2[w])
            row += 1
    assert row == x.shape[0]
    return out


def _weights(s: int, d: int, inter: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w13 = torch.randn(s, 2 * inter, d, generator=g) / math.sqrt(d)
    w2 = torch.randn(s, d, inter, generator=g) / math.sqrt(inter)
    return w13, w2


D, I = 16, 24


def test_grouped_swiglu_fp32_matches_per_token_loop():
    w13, w2 = _weights(4, D, I)
    counts = [3, 0, 5, 2]  # slot 1 received nothing
    x = torch.randn(sum(counts), D, generator=torch.Generator().manual_seed(1))
    out = grouped_swiglu(x, counts, w13, w2)
    assert out.shape == x.shape and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), _grouped_ref(x, counts, w13, w2), atol=1e-5, rtol=1e-5)
    # counts may also come as a tensor
    torch.testing.assert_close(grouped_swiglu(x, torch.tensor(counts), w13, w2), out, atol=0, rtol=0)


def test_grouped_swiglu_bf16_within_tolerance():
    w13, w2 = _weights(3, D, I, seed=2)
    counts = [4, 1, 6]
    x = torch.randn(sum(counts), D, generator=torch.Generator().manual_seed(3))
    xb, w13b, w2b = x.bfloat16(), w13.bfloat16(), w2.bfloat16()
    out = grouped_swiglu(xb, counts, w13b, w2b)
    assert out.dtype == torch.bfloat16
    ref = _grouped_ref(xb.float(), counts, w13b.float(), w2b.float())
    # bf16 has an 8-bit mantissa: ~0.4% relative per rounding, a few roundings deep
    torch.testing.assert_close(out.double(), ref, atol=3e-2, rtol=3e-2)
    assert (out.double() - ref).abs().max() < 0.05 * ref.abs().max()


def test_grouped_swiglu_slot_index_selects_weights():
    w13, w2 = _weights(6, D, I, seed=4)
    slot_index = [5, 0, 2]
    counts = [2, 3, 0]
    x = torch.randn(5, D, generator=torch.Generator().manual_seed(5))
    out = grouped_swiglu(x, counts, w13, w2, slot_index)
    torch.testing.assert_close(out.double(), _grouped_ref(x, counts, w13, w2, slot_index), atol=1e-5, rtol=1e-5)


def test_grouped_swiglu_all_empty_and_bad_arguments():
    w13, w2 = _weights(2, D, I)
    out = grouped_swiglu(torch.zeros(0, D), [0, 0], w13, w2)
    assert out.shape == (0, D)
    with pytest.raises(ValueError, match="segments"):
        grouped_swiglu(torch.zeros(3, D), [1, 2], w13, w2, slot_index=[0])
    with pytest.raises(ValueError, match="sum"):
        grouped_swiglu(torch.zeros(3, D), [1, 1], w13, w2)


def test_bucket_rows_bounds_the_matmul_shapes():
    assert [bucket_rows(n) for n in range(1, 17)] == list(range(1, 17))  # decode-sized segments run exact
    for n in range(1, 5000):
        m = bucket_rows(n)
        assert n <= m <= n * 1.125 and bucket_rows(m) == m
    assert len({bucket_rows(n) for n in range(1, 2049)}) == 72  # whatever the traffic, at most 72 shapes


def _exact_segments(x, counts, w13, w2, slot_index):
    """Each segment at its own row count, as grouped_swiglu ran before row buckets."""
    out, start, inter = torch.empty_like(x), 0, w2.shape[-1]
    for seg, n in enumerate(counts):
        h = x[start:start + n] @ w13[slot_index[seg]].t()
        out[start:start + n] = (torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]) @ w2[slot_index[seg]].t()
        start += n
    return out


def test_grouped_swiglu_bf16_row_buckets_change_no_output():
    w13, w2 = _weights(4, D, I, seed=8)
    w13b, w2b = w13.bfloat16(), w2.bfloat16()
    # 17 -> 18 rows (reads 1 row of the next segment), 40 exact, 23 -> 24 past the end (zero-padded)
    counts, slot_index = [17, 1, 0, 40, 23], [0, 1, 2, 3, 0]
    x = torch.randn(sum(counts), D, generator=torch.Generator().manual_seed(9)).bfloat16()
    x[17] = float("nan")  # a non-finite row in the next segment must not leak into the one before it
    assert uses_row_buckets(x) and not uses_row_buckets(x.float())
    out = grouped_swiglu(x, counts, w13b, w2b, slot_index)
    assert out.shape == x.shape and out.dtype == torch.bfloat16
    assert torch.isfinite(out[:17]).all() and torch.isnan(out[17]).all()
    want = _exact_segments(x, counts, w13b, w2b, slot_index)
    torch.testing.assert_close(out[:17], want[:17], atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(out[18:], want[18:], atol=1e-2, rtol=1e-2)


def test_dense_swiglu_matches_reference():
    w13, w2 = _weights(1, D, I, seed=6)
    x = torch.randn(4, D, generator=torch.Generator().manual_seed(7))
    out = swiglu(x, w13[0, :I], w13[0, I:], w2[0])
    ref = torch.stack([_ffn_ref_token(x[t], w13[0, :I], w13[0, I:], w2[0]) for t in range(4)])
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


# -- one grouped GEMM per projection against the loop ---------------------------------------------

BF16_GEMM_RTOL = 2e-2
"""bf16: the grouped GEMM and the loop may accumulate in another order; outputs agree within this
fraction of the output's largest magnitude."""


@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-5), (torch.bfloat16, BF16_GEMM_RTOL)])
@pytest.mark.parametrize("rows, counts", [
    ([0, 1, 2, 3], [3, 1, 4, 2]),          # in row order
    ([4, 0, 2, 5], [3, 0, 5, 2]),          # out of order, a segment with no tokens, rows 1 and 3 unused
    ([5, 1, 5], [2, 3, 1]),                # a row twice (the same slot named twice)
    ([2], [7]),                            # one segment
])
def test_grouped_gemm_equals_the_loop(dtype, rtol, rows, counts):
    if not grouped_gemm_supported(torch.device("cpu"), dtype):
        pytest.fail(f"torch {torch.__version__} has no grouped_mm for {dtype} on the CPU")
    g = torch.Generator().manual_seed(11)
    C, D, I = 6, 32, 48
    w13 = torch.randn(C, 2 * I, D, generator=g).to(dtype)
    w2 = torch.randn(C, D, I, generator=g).to(dtype)
    x = torch.randn(sum(counts), D, generator=g).to(dtype)
    got = grouped_swiglu_gemm(x, counts, w13, w2, rows)
    want = grouped_swiglu(x, counts, w13, w2, rows)
    assert got.dtype == dtype and got.shape == want.shape
    scale = want.float().abs().max()
    assert float((got.float() - want.float()).abs().max()) <= rtol * float(scale), f"{dtype} {rows} {counts}"


def test_grouped_gemm_of_no_tokens_is_empty():
    w13, w2 = torch.randn(3, 64, 16), torch.randn(3, 16, 32)
    assert grouped_swiglu_gemm(torch.zeros(0, 16), [0, 0], w13, w2, [2, 0]).shape == (0, 16)


def test_grouped_gemm_needs_strides_of_16_bytes():
    assert gemm_shapes_ok(64, 128, torch.bfloat16) and gemm_shapes_ok(4, 8, torch.float32)
    assert not gemm_shapes_ok(60, 128, torch.bfloat16) and not gemm_shapes_ok(6, 8, torch.float32)
