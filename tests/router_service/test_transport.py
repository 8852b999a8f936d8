"""ShardBatch carries the expected expert per slot; the in-process transport passes it to the shard;
StalePlacement is a ShardUnavailable that survives pickling."""

from __future__ import annotations

import pickle

import pytest
import torch

from moeyard.attention.engine import build_local_experts
from moeyard.expert_actors.slots import SlotNotHeld
from moeyard.model.checkpoint import CheckpointReader
from moeyard.model.spec import load_spec
from moeyard.router_service.placement import Placement
from moeyard.router_service.transport import ShardBatch, ShardUnavailable, StalePlacement


def test_shard_batch_names_one_expert_per_slot():
    assert ShardBatch(0, [1, 2], [1, 1], torch.zeros(2, 4), [3, 4]).experts == [3, 4]
    with pytest.raises(ValueError, match="experts has 1 entries but slot_ids has 2"):
        ShardBatch(0, [1, 2], [1, 1], torch.zeros(2, 4), [3])
    with pytest.raises(ValueError, match="experts has 0 entries but slot_ids has 2"):
        ShardBatch(0, [1, 2], [1, 1], torch.zeros(2, 4), [])


def test_stale_placement_is_a_shard_unavailable_and_pickles():
    e = StalePlacement(3, "slot 5 of MoE layer 2 holds expert(s) [3], not 7 (router placement epoch 4 is stale)")
    assert isinstance(e, ShardUnavailable) and e.shard == 3
    assert "stale placement" in str(e) and "not 7" in str(e)
    again = pickle.loads(pickle.dumps(e))
    assert type(again) is StalePlacement and again.shard == 3 and again.message == e.message
    assert str(again) == str(e)


def test_in_process_transport_passes_the_expected_experts(hf_models):
    ckpt, _ = hf_models("mixtral")
    spec = load_spec(ckpt)
    pl = Placement(torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7]] * spec.num_moe_layers), num_shards=2)
    transport = build_local_experts(ckpt, spec, pl, torch.float32)
    x = torch.randn(4, spec.hidden_size, generator=torch.Generator().manual_seed(0))
    (want_old,) = transport.submit(1, [ShardBatch(1, [5], [4], x, [5])], 0).result()
    with pytest.raises(SlotNotHeld, match=r"slot 5 of MoE layer 1 holds expert\(s\) \[5\], not 2"):
        transport.submit(1, [ShardBatch(1, [5], [4], x, [2])], 0).result()
    # a staged copy next to slot 5's: each batch gets the copy it names
    transport.shards[1].load(CheckpointReader(ckpt), 1, [(5, 2)], stage=True)
    old, new = transport.submit(1, [ShardBatch(1, [5], [4], x, [5]), ShardBatch(1, [5], [4], x, [2])], 0).result()
    assert torch.equal(old, want_old) and not torch.equal(old, new)
    moved = Placement(torch.tensor([[0, 1, 2, 3, 4, 2, 6, 7]] * spec.num_moe_layers), num_shards=2)
    ref = build_local_experts(ckpt, spec, moved, torch.float32)
    assert torch.equal(new, ref.submit(1, [ShardBatch(1, [5], [4], x, [2])], 0).result()[0])
