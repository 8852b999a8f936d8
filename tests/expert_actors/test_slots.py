"""ExpertSlots tables: (slot, expert) copies, staged loads next to a slot's copy, releases that free only the
released copy."""

from __future__ import annotations

import gc
import pickle
import threading
import weakref

import pytest
import torch

from moeyard.expert_actors.slots import (
    ExpertSlots,
    SlotFull,
    SlotNotHeld,
    SlotTable,
)
from moeyard.model.checkpoint import CheckpointReader
from moeyard.model.spec import load_spec


@pytest.fixture
def mix(hf_models):
    ckpt, _ = hf_models("mixtral")
    spec = load_spec(ckpt)
    reader = CheckpointReader(ckpt)
    slots = ExpertSlots(spec, torch.float32)
    slots.load(reader, 1, [(10, 2), (11, 5), (12, 7)])
    ref = ExpertSlots(spec, torch.float32)  # expert e in slot e, both layers
    for layer in range(spec.num_moe_layers):
        ref.load(reader, layer, [(e, e) for e in range(spec.moe.num_experts)])
    x = torch.randn(5, spec.hidden_size, generator=torch.Generator().manual_seed(1))
    per_slot = 3 * spec.hidden_size * spec.moe.intermediate_size * 4
    return dict(spec=spec, reader=reader, slots=slots, ref=ref, x=x, per_slot=per_slot)


def _want(mix, layer, expert, x=None):
    x = mix["x"] if x is None else x
    return mix["ref"].compute(layer, [expert], [x.shape[0]], x, [expert])


def test_staged_copy_answers_next_to_the_old_one(mix):
    slots, x = mix["slots"], mix["x"]
    slots.load(mix["reader"], 1, [(11, 3)], stage=True)
    assert slots.pairs(1) == [(10, 2), (11, 3), (11, 5), (12, 7)]
    assert slots.slots(1) == {10: 2, 11: 3, 12: 7}  # one per slot: the copy loaded last
    for expert in (5, 3):
        assert torch.equal(slots.compute(1, [11], [5], x, [expert]), _want(mix, 1, expert))
    # both copies of the slot in one batch, next to another slot
    got = slots.compute(1, [10, 11, 11], [1, 2, 2], x, [2, 5, 3])
    want = torch.cat([_want(mix, 1, 2, x[:1]), _want(mix, 1, 5, x[1:3]), _want(mix, 1, 3, x[3:])])
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="experts has 0 entries but slot_ids has 1"):
        slots.compute(1, [11], [5], x, [])  # every slot's expert must be named


def test_wrong_or_missing_expert_is_slot_not_held(mix):
    slots, x = mix["slots"], mix["x"]
    with pytest.raises(SlotNotHeld) as e:
        slots.compute(1, [10, 11], [2, 3], x, [2, 6])
    assert (e.value.moe_layer, e.value.slot, e.value.expert, e.value.held) == (1, 11, 6, [5])
    assert str(e.value) == "slot 11 of MoE layer 1 holds expert(s) [5], not 6"
    assert isinstance(e.value, KeyError)
    again = pickle.loads(pickle.dumps(e.value))
    assert type(again) is SlotNotHeld and str(again) == str(e.value)
    with pytest.raises(SlotNotHeld, match="slot 13 of MoE layer 1 is not loaded"):
        slots.compute(1, [13], [5], x, [5])
    with pytest.raises(ValueError, match="experts has 1 entries but slot_ids has 2"):
        slots.compute(1, [10, 11], [2, 3], x, [2])


def test_unload_one_expert_keeps_the_other(mix):
    slots, x = mix["slots"], mix["x"]
    slots.load(mix["reader"], 1, [(11, 3)], stage=True)
    assert slots.unload(1, [(11, 5)]) == 1
    assert slots.pairs(1) == [(10, 2), (11, 3), (12, 7)]
    assert torch.equal(slots.compute(1, [11], [5], x, [3]), _want(mix, 1, 3))
    with pytest.raises(SlotNotHeld, match=r"holds expert\(s\) \[3\], not 5"):
        slots.compute(1, [11], [5], x, [5])
    assert slots.unload(1, [(11, 5), (40, None), 41]) == 0  # not held: ignored
    assert slots.unload(1, [(12, None), 10]) == 2  # whole slots
    assert slots.pairs(1) == [(11, 3)]
    assert slots.nbytes() == mix["per_slot"]


def test_replacing_load_drops_every_copy_of_the_slot(mix):
    slots = mix["slots"]
    slots.load(mix["reader"], 1, [(11, 3)], stage=True)
    slots.load(mix["reader"], 1, [(11, 6)])  # stage=False: the slot holds only 6 afterwards
    assert slots.pairs(1) == [(10, 2), (11, 6), (12, 7)]
    assert slots.nbytes() == 3 * mix["per_slot"]
    # reloading a copy the slot holds replaces it (no duplicate)
    slots.load(mix["reader"], 1, [(11, 6)], stage=True)
    assert slots.pairs(1) == [(10, 2), (11, 6), (12, 7)]


def test_third_copy_and_bad_entries_change_nothing(mix):
    slots, x = mix["slots"], mix["x"]
    slots.load(mix["reader"], 1, [(11, 3)], stage=True)
    before = {layer: slots.pairs(layer) for layer in range(2)}
    tables = [slots.table(layer) for layer in range(2)]
    with pytest.raises(SlotFull, match=r"slot 11 of MoE layer 1 already holds experts \[5, 3\]"):
        slots.load_layers(mix["reader"], {0: [(0, 1)], 1: [(20, 4), (11, 6)]}, stage=True)
    with pytest.raises(ValueError, match="out of range"):
        slots.load_layers(mix["reader"], {0: [(0, 1)], 1: [(20, 8)]})
    assert {layer: slots.pairs(layer) for layer in range(2)} == before
    assert [slots.table(layer) for layer in range(2)] == tables  # not even rebuilt
    assert torch.equal(slots.compute(1, [11], [5], x, [3]), _want(mix, 1, 3))


def test_staging_and_release_never_copy_other_experts_and_free_the_released(mix):
    slots = mix["slots"]
    t = slots.table(1)
    for (slot, expert), (row, w13, w2) in t.entries.items():
        assert w13 is t.w13[row] and w2 is t.w2[row] and t.keys[row] == (slot, expert)
        assert w13.shape == (2 * mix["spec"].moe.intermediate_size, mix["spec"].hidden_size)
    assert slots.nbytes() == 3 * mix["per_slot"] == t.nbytes()
    kept = {k: (w13.data_ptr(), w2.data_ptr()) for k, (_, w13, w2) in t.entries.items()}
    released = weakref.ref(t.entries[(11, 5)][1]), weakref.ref(t.entries[(11, 5)][2])
    del t, w13, w2
    slots.load(mix["reader"], 1, [(11, 3)], stage=True)
    new = slots.table(1)
    # the copies already held keep their storage: staging copied nothing of them
    assert {k: (e[1].data_ptr(), e[2].data_ptr()) for k, e in new.entries.items() if k in kept} == kept
    assert slots.nbytes() == 4 * mix["per_slot"]
    del new
    slots.unload(1, [(11, 5)])
    gc.collect()
    assert released[0]() is None and released[1]() is None  # the released copy is gone
    assert slots.nbytes() == 3 * mix["per_slot"]
    slots.unload(1, [10, 11, 12])
    assert slots.table(1).w13 is None and slots.nbytes() == 0


def test_compute_on_a_snapshot_ignores_a_later_swap(mix):
    slots, x = mix["slots"], mix["x"]
    snap = slots.table(1)
    slots.load(mix["reader"], 1, [(11, 6)])  # replace 5 by 6
    assert torch.equal(slots.compute(1, [11], [5], x, [5], table=snap), _want(mix, 1, 5))
    assert torch.equal(slots.compute(1, [11], [5], x, [6]), _want(mix, 1, 6))


def test_load_does_not_block_compute(mix, monkeypatch):
    """While a load builds its new table (held here), computes run on the current table."""
    slots, x = mix["slots"], mix["x"]
    building, release = threading.Event(), threading.Event()
    real_build = SlotTable.build

    def slow_build(*args, **kw):
        building.set()
        assert release.wait(30)
        return real_build(*args, **kw)

    monkeypatch.setattr(SlotTable, "build", staticmethod(slow_build))
    loader = threading.Thread(target=slots.load, args=(mix["reader"], 1, [(11, 3)]), kwargs=dict(stage=True))
    loader.start()
    try:
        assert building.wait(30)
        assert torch.equal(slots.compute(1, [11], [5], x, [5]), _want(mix, 1, 5))
        with pytest.raises(SlotNotHeld):  # the staged copy is not in the current table yet
            slots.compute(1, [11], [5], x, [3])
        assert slots.pairs(1) == [(10, 2), (11, 5), (12, 7)]
    finally:
        release.set()
        loader.join(30)
    assert slots.pairs(1) == [(10, 2), (11, 3), (11, 5), (12, 7)]
    assert torch.equal(slots.compute(1, [11], [5], x, [3]), _want(mix, 1, 3))
