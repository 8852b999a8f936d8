"""A shard that stops answering costs a retry on another copy, not a failed step."""

from __future__ import annotations

from concurrent.futures import Future

import pytest
import torch

from attention.engine import build_local_experts
from cluster.checkpoint import CheckpointReader
from cluster.spec import load_spec
from router_service.dispatch import ExpertDispatcher
from router_service.placement import ExpertsUnavailable, Placement
from router_service.transport import ShardUnavailable


class FlakyTransport:
    """Wraps the in-process transport; batches for ``dead`` shards fail."""

    def __init__(self, inner, dead: set[int]):
        self.inner, self.dead, self.refreshed = inner, dead, []

    def submit(self, moe_layer, batches, epoch):
        hit = [b.shard for b in batches if b.shard in self.dead]
        if hit:
            f = Future()
            f.set_exception(ShardUnavailable(hit[0], "connection refused"))
            return f
        return self.inner.submit(moe_layer, batches, epoch)

    def refresh(self, shard):
        self.refreshed.append(shard)


def _setup(hf_models, phy2log, shards):
    ckpt, _ = hf_models("mixtral")
    spec = load_spec(ckpt)
    placement = Placement(torch.tensor(phy2log), shards)
    inner = build_local_experts(ckpt, spec, placement, torch.float32, CheckpointReader(ckpt))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, spec.hidden_size, generator=g)
    ids = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(40)])
    w = torch.rand(40, 2, generator=g)
    return placement, inner, x, ids, w


def test_retries_on_another_copy(hf_models):
    # shard 1 holds only copies of experts that shard 0 or 2 also hold
    phy2log = [[0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7]] * 2
    placement, inner, x, ids, w = _setup(hf_models, phy2log, 3)
    expected = ExpertDispatcher(placement, inner)(0, x, w, ids)
    flaky = FlakyTransport(inner, dead={1})
    got = ExpertDispatcher(placement, flaky)(0, x, w, ids)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert flaky.refreshed == [1]


def test_no_copy_left_fails_that_layer(hf_models):
    phy2log = [[0, 1, 2, 3, 4, 5, 6, 7]] * 2
    placement, inner, x, ids, w = _setup(hf_models, phy2log, 2)
    with pytest.raises(ExpertsUnavailable, match="no reachable copy"):
        ExpertDispatcher(placement, FlakyTransport(inner, dead={1}))(0, x, w, ids)
