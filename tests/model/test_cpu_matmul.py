"""CPU matmul kernels: every path this CPU supports equals torch's own matmul; paths it cannot run are
refused by name."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moeyard.model.cpu_matmul import (
    PackedLinear,
    amx_supported,
    isa_class,
    linear,
    pack,
    packed_supported,
    resolve_matmul,
)
from moeyard.model.ffn import grouped_swiglu, linear_rows

PACKED_DTYPES = [d for d in (torch.bfloat16,) if packed_supported(d) is None]
"""bf16 where oneDNN runs it packed on this CPU (AVX-512 and up; not on AVX2-only machines)."""


def packed_or_refused() -> bool:
    """True where this CPU runs packed bf16; on one that cannot (AVX2-only), asserts what it can show, that
    forcing it is refused by name, and returns False."""
    if PACKED_DTYPES:
        return True
    with pytest.raises(ValueError, match="oneDNN has no bfloat16 kernels on this CPU"):
        resolve_matmul("packed", torch.bfloat16, "cpu")
    return False


def test_isa_class_and_what_auto_means_here():
    cls = isa_class()
    assert cls in ("amx", "avx512_bf16", "avx512", "avx2", "baseline")
    assert resolve_matmul("auto", torch.float32, "cpu") == "plain"           # MKL: parity with transformers
    want = "packed" if torch.bfloat16 in PACKED_DTYPES else "plain"
    if amx_supported(torch.bfloat16) is None:                                # AMX tiles, and the kernel built
        want = "amx"
    assert resolve_matmul("auto", torch.bfloat16, "cpu") == want
    if cls != "amx":
        assert amx_supported(torch.bfloat16) == "this CPU has no AMX-BF16 tiles"
    if cls in ("amx", "avx512_bf16", "avx512"):
        assert torch.bfloat16 in PACKED_DTYPES                               # oneDNN bf16 from AVX-512 up
    assert resolve_matmul("plain", torch.bfloat16, "cpu") == "plain"
    assert resolve_matmul("auto", torch.bfloat16, "meta") == "plain"


def test_refusals_name_the_reason():
    with pytest.raises(ValueError, match="matmul must be one of auto, amx, packed, plain"):
        resolve_matmul("fast", torch.bfloat16, "cpu")
    with pytest.raises(ValueError, match="float32 runs on MKL"):
        resolve_matmul("packed", torch.float32, "cpu")
    with pytest.raises(ValueError, match="no packed kernel for float16"):
        resolve_matmul("packed", torch.float16, "cpu")
    with pytest.raises(ValueError, match="a CPU kernel; the weights are on meta"):
        resolve_matmul("packed", torch.bfloat16, "meta")
    with pytest.raises(ValueError, match="'amx' cannot run here: the AMX kernel is bfloat16 only, not float32"):
        resolve_matmul("amx", torch.float32, "cpu")
    if torch.bfloat16 not in PACKED_DTYPES:   # e.g. an AVX2-only CPU: forcing it is a clear error
        with pytest.raises(ValueError, match="oneDNN has no bfloat16 kernels on this CPU"):
            resolve_matmul("packed", torch.bfloat16, "cpu")
    with pytest.raises(ValueError, match="2-D CPU weight"):
        PackedLinear(torch.zeros(2, 3, 4, dtype=torch.bfloat16))


@pytest.mark.parametrize("n, k", [(96, 64), (64, 160), (200, 72)])
def test_packed_equals_torch_at_every_row_count(n, k):
    if not packed_or_refused():
        return
    dtype = torch.bfloat16
    g = torch.Generator().manual_seed(n * k)
    w = torch.randn(n, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype)
    p = pack(w, "packed")
    assert isinstance(p, PackedLinear) and p.shape == w.shape and p.dtype == dtype and p.nbytes == w.nbytes
    for m in list(range(1, 20)) + [31, 64, 97]:
        x = torch.randn(m, k, generator=g).to(dtype)
        assert torch.equal(linear(x, p), F.linear(x, w)), m
        assert torch.equal(linear(x, p, b), F.linear(x, w, b)), m
        assert torch.equal(linear_rows(x, p), linear_rows(x, w)), m      # the row buckets too
    xt = torch.randn(k, 5, generator=g).to(dtype).t()   # a non-contiguous input runs as its contiguous copy
    assert torch.equal(linear(xt, p), F.linear(xt.contiguous(), w))


def test_grouped_experts_on_packed_copies_equal_the_stack():
    if not packed_or_refused():
        return
    dtype = torch.bfloat16
    g = torch.Generator().manual_seed(3)
    inter, d = 48, 32
    w13 = torch.randn(4, 2 * inter, d, generator=g).to(dtype)
    w2 = torch.randn(4, d, inter, generator=g).to(dtype)
    x = torch.randn(23, d, generator=g).to(dtype)
    counts, rows = [5, 0, 17, 1], [2, 0, 3, 1]
    want = grouped_swiglu(x, counts, w13, w2, rows)
    got = grouped_swiglu(x, counts, [PackedLinear(w) for w in w13], [PackedLinear(w) for w in w2], rows)
    assert torch.equal(got, want)


def test_plain_leaves_weights_alone():
    w = torch.randn(4, 4)
    assert pack(w, "plain") is w and pack(None, "packed") is None
