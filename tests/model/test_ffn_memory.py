"""A shard's RSS stays bounded however its segment sizes vary (bf16 on CPU, oneDNN's per-shape kernels).

Run in a fresh interpreter: RSS is a per-process number, and oneDNN's kernel cache is process-wide.
"""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moeyard.model import ffn as expert_compute
from moeyard.model.ffn import bucket_rows, grouped_swiglu

REPO = Path(__file__).resolve().parents[2]

CHILD = r"""
import ctypes, os, random, sys
import torch
from moeyard.model import ffn as expert_compute
from moeyard.model.ffn import bucket_rows, grouped_swiglu

if sys.argv[2] == "exact":  # the behaviour before row buckets, to show what the bound guards against
    expert_compute.uses_row_buckets = lambda x: False
torch.set_num_threads(1)
libc = ctypes.CDLL("libc.so.6")


def rss_mib():
    libc.malloc_trim(0)  # count what is in use, not free memory glibc keeps
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


D, I, HI = 64, 128, 1024
g = torch.Generator().manual_seed(0)
w13 = [torch.randn(2 * I, D, generator=g).bfloat16() for _ in range(4)]
w2 = [torch.randn(D, I, generator=g).bfloat16() for _ in range(4)]
x = torch.randn(HI, D, generator=g).bfloat16()
for m in sorted({bucket_rows(n) for n in range(1, HI + 1)}):  # warm-up: every size a shard meets
    grouped_swiglu(x[:m], [m], w13, w2, [0])
before = rss_mib()
rng = random.Random(0)
for _ in range(int(sys.argv[1])):  # random batch sizes, split over 4 slots at random
    n = rng.randint(1, HI)
    cuts = sorted(rng.randint(0, n) for _ in range(3))
    grouped_swiglu(x[:n], [b - a for a, b in zip([0] + cuts, cuts + [n])], w13, w2, [0, 1, 2, 3])
print(rss_mib() - before)
"""


def _growth_mib(calls: int, mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", CHILD, str(calls), mode], cwd=REPO, capture_output=True,
                         text=True, timeout=120, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def _matmul_row_counts(calls: int, bucketed: bool) -> set[int]:
    """The row counts of every bf16 matmul that :func:`grouped_swiglu` runs over ``calls`` random
    batches (what oneDNN compiles and caches a kernel for, one per distinct count)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Rows(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.rows: set[int] = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default) and args[-2].dtype == torch.bfloat16:
                self.rows.add(int(args[-2].shape[0]))
            return func(*args, **(kwargs or {}))

    D, I, HI = 16, 32, 1024
    g = torch.Generator().manual_seed(0)
    w13 = [torch.randn(2 * I, D, generator=g).bfloat16() for _ in range(4)]
    w2 = [torch.randn(D, I, generator=g).bfloat16() for _ in range(4)]
    x = torch.randn(HI, D, generator=g).bfloat16()
    rng = random.Random(0)
    saved = expert_compute.uses_row_buckets
    if not bucketed:
        expert_compute.uses_row_buckets = lambda x: False
    try:
        with Rows() as mode:
            for _ in range(calls):  # random batch sizes, split over 4 slots at random
                n = rng.randint(1, HI)
                cuts = sorted(rng.randint(0, n) for _ in range(3))
                grouped_swiglu(x[:n], [b - a for a, b in zip([0] + cuts, cuts + [n])], w13, w2, [0, 1, 2, 3])
    finally:
        expert_compute.uses_row_buckets = saved
    return mode.rows


def test_matmuls_meet_a_fixed_set_of_row_counts_whatever_the_traffic():
    """The mechanism behind the RSS bound, on any CPU (whether or not its bf16 matmuls run on oneDNN):
    600 random batches reach the matmuls at no row count outside the bucket set, and at far fewer
    distinct counts than they would unbucketed (each a compiled, cached kernel where oneDNN runs bf16)."""
    allowed = {bucket_rows(n) for n in range(1, 1025)}
    bucketed = _matmul_row_counts(600, bucketed=True)
    exact = _matmul_row_counts(600, bucketed=False)
    assert bucketed <= allowed, sorted(bucketed - allowed)
    assert len(allowed) <= 72 and len(bucketed) <= len(allowed)
    assert len(exact) > 4 * len(allowed), f"unbucketed traffic met only {len(exact)} row counts"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs glibc and /proc")
def test_rss_stays_flat_over_random_batch_sizes():
    # Before row buckets every new row count compiled and cached a oneDNN matmul (~0.5 MiB
    # each, up to 1024 of them): +500 MiB here on CPUs whose bf16 matmuls run on oneDNN (AVX-512
    # BF16, AMX). Bucketed, the warm-up met every shape. Elsewhere (AVX2: torch's own bf16 kernels)
    # RSS must stay flat too; the test above checks the shapes on every CPU.
    growth = _growth_mib(600, "buckets")
    assert growth < 48, f"RSS grew by {growth:.0f} MiB over 600 computes after warm-up"
