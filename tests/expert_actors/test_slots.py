"""ExpertSlots tables: (slot, expert) copies, staged loads next to a slot's copy, releases that free only the
released copy."""

from __future__ import annotations

import pickle
import threading

import pytest
import torch

from moeyard.expert_actors.slots import (
    SPARE_ROWS,
    ExpertSlots,
    LayerStorage,
    SlotFull,
    SlotNotHeld,
)
from moeyard.model.checkpoint import CheckpointReader
from moeyard.model.spec import load_spec
from moeyard.model.weight_names import expert_names


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


def test_staging_writes_one_spare_row_in_place_and_a_release_frees_its_row(mix):
    slots, reader, per_slot = mix["slots"], mix["reader"], mix["per_slot"]
    t = slots.table(1)
    assert t.keys == ((10, 2), (11, 5), (12, 7)) and sorted(t.row_of.values()) == [0, 1, 2]
    assert t.w13.shape[0] == 3 + SPARE_ROWS and slots.reserved_bytes() == (3 + SPARE_ROWS) * per_slot
    for (slot, expert), row in t.row_of.items():  # each row holds its expert's weights, gate then up
        names = expert_names("mixtral", mix["spec"].moe_layers[1], expert)
        assert torch.equal(t.w13[row], torch.cat([reader.get(names.gate), reader.get(names.up)]))
        assert torch.equal(t.w2[row], reader.get(names.down))
    assert slots.nbytes() == 3 * per_slot == t.nbytes()
    kept = {k: (t.w13[r].data_ptr(), t.w2[r].data_ptr(), t.w13[r].clone()) for k, r in t.row_of.items()}
    slots.load(reader, 1, [(11, 3)], stage=True)
    new = slots.table(1)
    # written into a spare row of the same storage: the copies already held were neither moved nor touched
    assert new.w13.data_ptr() == t.w13.data_ptr() and new.row_of[(11, 3)] == 3
    for k, (p13, p2, w13) in kept.items():
        r = new.row_of[k]
        assert (new.w13[r].data_ptr(), new.w2[r].data_ptr()) == (p13, p2) and torch.equal(new.w13[r], w13)
    assert slots.nbytes() == 4 * per_slot and slots.reserved_bytes() == (3 + SPARE_ROWS) * per_slot
    freed = new.row_of[(11, 5)]
    slots.unload(1, [(11, 5)])
    assert slots.nbytes() == 3 * per_slot
    slots.load(reader, 1, [(20, 4)], stage=True)  # no compute is running: the released row is reused
    assert slots.table(1).row_of[(20, 4)] == freed and slots.table(1).w13.data_ptr() == t.w13.data_ptr()
    assert torch.equal(slots.compute(1, [20], [5], mix["x"], [4]), _want(mix, 1, 4))
    slots.unload(1, [10, 11, 12, 20])
    assert slots.table(1).keys == () and slots.nbytes() == 0


def test_a_full_storage_grows_once_and_keeps_every_copy_exact(mix):
    slots, reader, x = mix["slots"], mix["reader"], mix["x"]
    old = slots.table(1)
    slots.load(reader, 1, [(20, 0), (21, 1), (22, 3), (23, 4)], stage=True)  # 4 new copies, 2 spare rows
    new = slots.table(1)
    assert new.w13.data_ptr() != old.w13.data_ptr() and new.w13.shape[0] >= 7  # one re-stack
    for slot, expert in [(10, 2), (11, 5), (12, 7), (20, 0), (21, 1), (22, 3), (23, 4)]:
        assert torch.equal(slots.compute(1, [slot], [5], x, [expert]), _want(mix, 1, expert))
    # a compute on the table from before the growth still reads the old storage
    assert torch.equal(slots.compute(1, [11], [5], x, [5], table=old), _want(mix, 1, 5))


def test_a_released_row_is_not_reused_while_a_compute_on_an_older_table_runs(mix, monkeypatch):
    slots, reader, x = mix["slots"], mix["reader"], mix["x"]
    inside, go = threading.Event(), threading.Event()
    import moeyard.expert_actors.slots as slots_module

    real = slots_module.grouped_swiglu

    def slow(*args, **kw):  # the compute has its table and rows; it reads the weights after the changes
        inside.set()
        assert go.wait(30)
        return real(*args, **kw)

    monkeypatch.setattr(slots_module, "grouped_swiglu", slow)
    got = []
    worker = threading.Thread(target=lambda: got.append(slots.compute(1, [11], [5], x, [5])))
    worker.start()
    try:
        assert inside.wait(30)
        row5 = slots.table(1).row_of[(11, 5)]
        slots.unload(1, [(11, 5)])
        slots.load(reader, 1, [(11, 6)], stage=True)  # must not overwrite expert 5's row: it is being read
        assert slots.table(1).row_of[(11, 6)] != row5
    finally:
        go.set()
        worker.join(30)
    monkeypatch.setattr(slots_module, "grouped_swiglu", real)
    assert torch.equal(got[0], _want(mix, 1, 5))
    slots.load(reader, 1, [(30, 1)], stage=True)  # that compute is done: the row is free again
    assert slots.table(1).row_of[(30, 1)] == row5


def test_compute_on_a_snapshot_ignores_a_later_swap(mix):
    slots, x = mix["slots"], mix["x"]
    snap = slots.table(1)
    slots.load(mix["reader"], 1, [(11, 6)])  # replace 5 by 6
    assert torch.equal(slots.compute(1, [11], [5], x, [5], table=snap), _want(mix, 1, 5))
    assert torch.equal(slots.compute(1, [11], [5], x, [6]), _want(mix, 1, 6))


def test_load_does_not_block_compute(mix, monkeypatch):
    """While a load writes its rows (held here), computes run on the current table."""
    slots, x = mix["slots"], mix["x"]
    building, release = threading.Event(), threading.Event()
    real_write = LayerStorage.write

    def slow_write(*args, **kw):
        building.set()
        assert release.wait(30)
        return real_write(*args, **kw)

    monkeypatch.setattr(LayerStorage, "write", slow_write)
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
