"""A shard's RSS stays bounded however its segment sizes vary (bf16 on CPU, oneDNN's per-shape kernels).

Run in a fresh interpreter: RSS is a per-process number, and oneDNN's kernel cache is process-wide.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]

CHILD = r"""
import ctypes, os, random, sys
import torch
from expert_actors import expert_compute
from expert_actors.expert_compute import bucket_rows, grouped_swiglu

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


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs glibc and /proc")
@pytest.mark.skipif(not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()),
                    reason="bf16 matmuls do not run on oneDNN on this CPU")
def test_rss_stays_flat_over_random_batch_sizes():
    # Before row buckets every new row count compiled and cached a oneDNN matmul (~0.5 MiB
    # each, up to 1024 of them): +500 MiB here. Bucketed, the warm-up met every shape.
    growth = _growth_mib(600, "buckets")
    assert growth < 48, f"RSS grew by {growth:.0f} MiB over 600 computes after warm-up"
