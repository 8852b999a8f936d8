"""Batch-invariant math: in the mode, a row's result is the same bits whatever shares its call."""

from __future__ import annotations

import pytest
import torch

from moeyard.model.batch_invariant import ROWS, batch_invariant, bmm_rows, enabled, fixed_rows
from moeyard.model.cpu_matmul import PackedLinear, packed_supported
from moeyard.model.ffn import grouped_swiglu, linear_rows
from moeyard.router_service.gate import GateConfig, router_logits

CASES = [(torch.bfloat16, "plain"), (torch.float32, "plain")] + (
    [(torch.bfloat16, "packed")] if packed_supported(torch.bfloat16) is None else [])
"""(dtype, kernel) pairs this CPU runs (packed: bf16 where oneDNN has bf16 kernels)."""


def test_the_mode_is_a_context():
    assert not enabled()
    with batch_invariant():
        assert enabled()
        with batch_invariant(False):
            assert not enabled()
        assert enabled()
    assert not enabled()


def test_fixed_rows_calls_only_full_chunks():
    seen = []

    def fn(c):
        seen.append(c.shape[0])
        return c * 2
    x = torch.arange(70.0).view(70, 1)
    assert torch.equal(fixed_rows(fn, x), x * 2) and seen == [ROWS] * 3
    seen.clear()
    assert fixed_rows(fn, x[:0]).shape == (0, 1) and seen == [ROWS]


@pytest.mark.parametrize("dtype, kind", CASES)
def test_a_linear_rows_result_does_not_depend_on_the_batch(dtype, kind):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 80, generator=g).to(dtype)
    wk = PackedLinear(w) if kind == "packed" else w
    x = torch.randn(70, 80, generator=g).to(dtype)
    with batch_invariant():
        alone = linear_rows(x[5:6], wk)
        for n in (6, 9, 17, 33, 64, 70):
            assert torch.equal(linear_rows(x[:n], wk)[5], alone[0]), n
        assert torch.equal(linear_rows(x[3:40], wk)[2], alone[0])


def test_expert_segments_and_the_router_do_not_depend_on_the_batch():
    g = torch.Generator().manual_seed(1)
    w13 = torch.randn(2, 2 * 48, 32, generator=g).bfloat16()
    w2 = torch.randn(2, 32, 48, generator=g).bfloat16()
    x = torch.randn(50, 32, generator=g).bfloat16()
    router = torch.randn(8, 32, generator=g).bfloat16()
    cfg = GateConfig(num_experts=8, top_k=2)
    with batch_invariant():
        one = grouped_swiglu(x[:1], [1], w13, w2, [1])
        many = grouped_swiglu(x, [20, 30], w13[[1, 0]], w2[[1, 0]], [0, 1])   # row 0: expert 1, among 20
        assert torch.equal(many[0], one[0])
        assert torch.equal(router_logits(x[:1], router, cfg)[0], router_logits(x, router, cfg)[0])
        a = torch.randn(4, 45, 16, generator=g).bfloat16()
        b = torch.randn(4, 16, 8, generator=g).bfloat16()
        assert torch.equal(bmm_rows(a[:, 7:8], b)[:, 0], bmm_rows(a, b)[:, 7])
        torch.testing.assert_close(bmm_rows(a, b).float(), torch.bmm(a, b).float(), atol=0.1, rtol=0.02)
    # and the mode computes the same function: against the plain calls, within bf16 rounding
    torch.testing.assert_close(many.float(), grouped_swiglu(x, [20, 30], w13[[1, 0]], w2[[1, 0]], [0, 1]).float(),
                               atol=0.5, rtol=0.05)
