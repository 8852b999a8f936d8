"""The AMX grouped-linear kernel (model/amx.py): on a CPU with AMX tiles it equals the fp32 sum rounded to
bf16 (within one bf16 rounding of torch's matmul), a row's result never depends on the other rows of the
call, and the grouped experts equal the per-expert torch path; elsewhere forcing it is refused by name."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

from moeyard.model import amx
from moeyard.model.amx import AmxLinear
from moeyard.model.cpu_matmul import PackedLinear, linear, pack, resolve_matmul
from moeyard.model.ffn import grouped_swiglu, linear_rows

BF16_ULP = 2.0 ** -7
"""One bf16 rounding, relative: |a - b| <= BF16_ULP * max(|a|, |b|) for values one rounding apart."""


def runs_here() -> bool:
    """True where the kernel runs; on a CPU without AMX (or without a compiler) asserts that forcing it is
    refused with the reason, and returns False."""
    why = amx.unavailable()
    if why is None:
        return True
    with pytest.raises(ValueError, match=f"matmul 'amx' cannot run here: {why}"):
        resolve_matmul("amx", torch.bfloat16, "cpu")
    return False


def within_one_rounding(got: torch.Tensor, want: torch.Tensor, magnitude: torch.Tensor | None = None) -> None:
    """Every element within one bf16 rounding of the other, plus the worst-case error of an fp32 sum in
    another order (``K * 2**-24 * magnitude``, ``magnitude`` the sum of the products' absolute values,
    ``K`` folded in by the caller): near a cancellation two fp32 orders differ by more than the tiny
    result's rounding."""
    got, want = got.float(), want.float()
    floor = 0.0 if magnitude is None else magnitude.float()
    bound = BF16_ULP * torch.maximum(got.abs(), want.abs()) + floor + 1e-30
    bad = (got - want).abs() > bound
    assert not bad.any(), f"{int(bad.sum())} of {got.numel()} elements off by more than one bf16 rounding"


def test_packing_refuses_shapes_the_tiles_cannot_take():
    with pytest.raises(ValueError, match="multiples of 32, got 48x64"):
        amx.pack_weight(torch.zeros(48, 64, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="2-D bfloat16 CPU weight"):
        AmxLinear(torch.zeros(32, 32))
    assert amx.fits(64, 2816) and not amx.fits(32001, 64) and not amx.fits(0, 32)


def test_pack_weight_puts_each_pair_where_the_tiles_read_it():
    n, k = 64, 96
    w = torch.arange(n * k, dtype=torch.float32).reshape(n, k).to(torch.bfloat16)
    p = amx.pack_weight(w)
    assert p.shape == (n // 32, k // 32, 2, 16, 16, 2)
    # block j, K chunk c, tile t, row r, column q, pair i  <-  w[32j + 16t + q, 32c + 2r + i]
    for j, c, t, r, q, i in [(0, 0, 0, 0, 0, 0), (1, 2, 1, 15, 15, 1), (0, 1, 1, 3, 7, 0), (1, 0, 0, 9, 2, 1)]:
        assert p[j, c, t, r, q, i] == w[32 * j + 16 * t + q, 32 * c + 2 * r + i]
    # gate_up: block j's tile 0 is gate row 16j + q, tile 1 up row 16j + q (up starts at row n / 2)
    p = amx.pack_gate_up(w)
    for j, c, t, r, q, i in [(0, 0, 0, 0, 0, 0), (1, 2, 1, 15, 15, 1), (0, 1, 1, 3, 7, 0), (1, 0, 0, 9, 2, 1)]:
        assert p[j, c, t, r, q, i] == w[t * n // 2 + 16 * j + q, 32 * c + 2 * r + i]


@pytest.mark.parametrize("n, k", [(64, 32), (96, 160), (5632 // 8, 1024 // 4), (64, 1024), (32, 2816)])
def test_grouped_linear_is_the_fp32_sum_rounded_once(n, k):
    """K 1024 and up: a block's stream in runs of 16 K chunks shared by the row chunks (their sums parked
    between runs); K 2816 with 200 rows: a segment's row chunks in two groups (A tiles over 1 MiB)."""
    if not runs_here():
        return
    g = torch.Generator().manual_seed(n + k)
    ws = [(torch.randn(n, k, generator=g) * 0.05).to(torch.bfloat16) for _ in range(3)]
    packed = [amx.pack_weight(w) for w in ws]
    for counts in ([1, 0, 2], [8, 17, 40], [33, 0, 0], [0, 0, 0], [16, 1, 64], [100, 31, 32], [200, 3, 40]):
        x = torch.randn(sum(counts), k, generator=g).to(torch.bfloat16)
        got = amx.grouped_linear(x, counts, packed)
        assert got.shape == (sum(counts), n) and got.dtype == torch.bfloat16
        start = 0
        for c, w in zip(counts, ws):
            seg = x[start:start + c]
            sum_order = k * 2.0 ** -24 * (seg.float().abs() @ w.float().abs().t())
            within_one_rounding(got[start:start + c], (seg.float() @ w.float().t()).to(torch.bfloat16), sum_order)
            within_one_rounding(got[start:start + c], F.linear(seg, w), sum_order)
            start += c


def test_a_rows_result_does_not_depend_on_the_rest_of_the_call():
    if not runs_here():
        return
    g = torch.Generator().manual_seed(7)
    n, k = 96, 2816          # several K runs and row groups in the whole call, one of each alone
    ws = [(torch.randn(n, k, generator=g) * 0.05).to(torch.bfloat16) for _ in range(2)]
    packed = [amx.pack_weight(w) for w in ws]
    x = torch.randn(200, k, generator=g).to(torch.bfloat16)
    whole = amx.grouped_linear(x, [200, 0], packed)
    for i in (0, 15, 16, 31, 32, 69, 199):
        alone = amx.grouped_linear(x[i:i + 1], [1, 0], packed)
        assert torch.equal(alone[0], whole[i]), i
        shifted = amx.grouped_linear(torch.cat([x[:3], x[i:i + 1]]), [3, 1], [packed[1], packed[0]])
        assert torch.equal(shifted[3], whole[i]), i     # another segment before it, another position


@pytest.mark.parametrize("inter, k", [(16, 64), (48, 1024), (352, 2816)])
def test_the_swiglu_epilogue_is_the_activation_of_the_fp32_sums(inter, k):
    """``swiglu``: silu(gate) * up from the fp32 sums, rounded once; bounded by one bf16 rounding plus how
    far another fp32 order moves the sums through the activation (|silu'| <= 1.1)."""
    if not runs_here():
        return
    g = torch.Generator().manual_seed(inter + k)
    ws = [(torch.randn(2 * inter, k, generator=g) * 0.05).to(torch.bfloat16) for _ in range(3)]
    packed = [amx.pack_gate_up(w) for w in ws]
    for counts in ([1, 0, 2], [33, 0, 17], [200, 3, 40]):
        x = (torch.randn(sum(counts), k, generator=g) * 2).to(torch.bfloat16)
        got = amx.grouped_linear(x, counts, packed, swiglu=True)
        assert got.shape == (sum(counts), inter) and got.dtype == torch.bfloat16
        start = 0
        for c, w in zip(counts, ws):
            seg = x[start:start + c].float()
            sums = seg @ w.float().t()
            order = k * 2.0 ** -24 * (seg.abs() @ w.float().abs().t())
            gate, up = sums[:, :inter], sums[:, inter:]
            floor = 1.1 * up.abs() * order[:, :inter] + F.silu(gate).abs() * order[:, inter:]
            within_one_rounding(got[start:start + c], (F.silu(gate) * up).to(torch.bfloat16), floor)
            start += c
    # a row's activation is its own, whatever else is in the call
    whole = amx.grouped_linear(x, counts, packed, swiglu=True)
    alone = amx.grouped_linear(x[5:6], [1, 0, 0], packed, swiglu=True)
    assert torch.equal(alone[0], whole[5])


def test_out_is_written_in_place_and_checked():
    if not runs_here():
        return
    g = torch.Generator().manual_seed(3)
    w = (torch.randn(64, 96, generator=g) * 0.1).to(torch.bfloat16)
    x = torch.randn(5, 96, generator=g).to(torch.bfloat16)
    out = torch.full((5, 32), float("nan"), dtype=torch.bfloat16)
    got = amx.grouped_linear(x, [5], [amx.pack_gate_up(w)], swiglu=True, out=out)
    assert got.data_ptr() == out.data_ptr() and torch.equal(out, amx.grouped_linear(x, [5], [amx.pack_gate_up(w)],
                                                                                     swiglu=True))
    with pytest.raises(RuntimeError, match=r"out must be a contiguous \[5, 32\] bfloat16"):
        amx.grouped_linear(x, [5], [amx.pack_gate_up(w)], swiglu=True, out=torch.empty(5, 64, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="packed for the SwiGLU activation"):
        AmxLinear(w, gate_up=True)(x)


def test_bad_calls_are_errors_that_name_the_problem():
    if not runs_here():
        return
    p = amx.pack_weight(torch.zeros(32, 64, dtype=torch.bfloat16))
    x = torch.zeros(4, 64, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="counts sum to 3, x has 4 rows"):
        amx.grouped_linear(x, [3], [p])
    with pytest.raises(RuntimeError, match="2 counts for 1 weights"):
        amx.grouped_linear(x, [2, 2], [p])
    with pytest.raises(RuntimeError, match="not a packed"):
        amx.grouped_linear(torch.zeros(4, 96, dtype=torch.bfloat16), [4], [p])
    with pytest.raises(RuntimeError, match="2-D bfloat16"):
        amx.grouped_linear(x.float(), [4], [p])


def test_amx_linear_and_the_experts_equal_the_torch_path():
    if not runs_here():
        return
    g = torch.Generator().manual_seed(11)
    w = (torch.randn(96, 64, generator=g) * 0.1).to(torch.bfloat16)
    b = torch.randn(96, generator=g).to(torch.bfloat16)
    p = pack(w, "amx")
    assert isinstance(p, AmxLinear) and p.shape == w.shape and p.nbytes == w.nbytes
    assert isinstance(pack(torch.zeros(48, 64, dtype=torch.bfloat16), "amx"), PackedLinear)  # shape: oneDNN
    x = torch.randn(2, 5, 64, generator=g).to(torch.bfloat16)
    within_one_rounding(linear(x, p), F.linear(x, w))
    within_one_rounding(linear(x, p, b), F.linear(x, w) + b)
    assert torch.equal(linear_rows(x[0], p), linear(x[0], p))

    inter, d = 64, 96
    w13 = (torch.randn(4, 2 * inter, d, generator=g) * 0.1).to(torch.bfloat16)
    w2 = (torch.randn(4, d, inter, generator=g) * 0.1).to(torch.bfloat16)
    x = torch.randn(23, d, generator=g).to(torch.bfloat16)
    counts, rows = [5, 0, 17, 1], [2, 0, 3, 1]
    want = grouped_swiglu(x, counts, w13, w2, rows)
    got = grouped_swiglu(x, counts, [AmxLinear(w) for w in w13], [AmxLinear(w) for w in w2], rows)
    torch.testing.assert_close(got.float(), want.float(), rtol=0.02, atol=0.02)
    fused = grouped_swiglu(x, counts, [pack(w, "amx", gate_up=True) for w in w13], [AmxLinear(w) for w in w2], rows)
    torch.testing.assert_close(fused.float(), want.float(), rtol=0.02, atol=0.02)


def test_a_missing_compiler_is_named_and_a_stale_build_lock_goes(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))
    why = amx.unavailable.__wrapped__()          # the uncached check, as a fresh process would run it
    if torch.cpu._is_amx_tile_supported() and torch.cpu._is_avx512_bf16_supported():
        assert why == f"no C++ compiler ({tmp_path / 'no-such-c++'}) to build the kernel with"
    else:
        assert why == "this CPU has no AMX-BF16 tiles"
    lock = tmp_path / "lock"
    assert not amx.clear_stale_lock(tmp_path)    # none there
    lock.write_text("")
    assert not amx.clear_stale_lock(tmp_path) and lock.exists()               # a build running now
    assert amx.clear_stale_lock(tmp_path, now=time.time() + amx.STALE_LOCK_S + 1) and not lock.exists()
