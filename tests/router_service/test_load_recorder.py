"""LoadRecorder: tensor counting equals a naive count; take() resets; thread safety; resize."""

from __future__ import annotations

import threading
from collections import Counter

import pytest
import torch

from moeyard.router_service.load_recorder import LoadRecorder, LoadSnapshot
from moeyard.router_service.placement import round_robin_placement

pytestmark = pytest.mark.timeout(60)


def naive(records, num_layers, n, which):
    out = [[0] * n for _ in range(num_layers)]
    for layer, ids, slots in records:
        for v in (ids if which == "e" else slots).reshape(-1).tolist():
            out[layer][v] += 1
    return torch.tensor(out, dtype=torch.int64)


def test_counts_equal_naive_python_count():
    g = torch.Generator().manual_seed(0)
    L, E, A = 3, 8, 2
    placement = round_robin_placement(L, E, num_shards=2, slots_per_shard=5)  # P = 10, two copies of 0, 1
    rec = LoadRecorder(L, E, placement.num_slots)
    records = []
    for _ in range(20):
        layer = int(torch.randint(0, L, (1,), generator=g))
        t = int(torch.randint(0, 17, (1,), generator=g))
        ids = torch.randint(0, E, (t, A), generator=g)
        slots = placement.choose_slots(layer, ids)
        rec.record(layer, ids, slots)
        records.append((layer, ids, slots))
    snap = rec.take()
    assert isinstance(snap, LoadSnapshot)
    assert snap.expert_counts.dtype == torch.int64 and snap.expert_counts.shape == (L, E)
    assert snap.slot_counts.shape == (L, placement.num_slots)
    assert torch.equal(snap.expert_counts, naive(records, L, E, "e"))
    assert torch.equal(snap.slot_counts, naive(records, L, placement.num_slots, "s"))
    assert snap.tokens == sum(ids.shape[0] for _, ids, _ in records)
    assert int(snap.expert_counts.sum()) == snap.tokens * A
    # each expert's count is the sum over its copies' slot counts
    per_expert = torch.zeros(L, E, dtype=torch.int64).scatter_add_(1, placement.phy2log, snap.slot_counts)
    assert torch.equal(per_expert, snap.expert_counts)


def test_take_resets_and_empty_batches_count_nothing():
    rec = LoadRecorder(2, 4, 4)
    rec.record(1, torch.tensor([[0, 3], [3, 2]]), torch.tensor([[0, 3], [3, 2]]))
    rec.record(0, torch.zeros(0, 2, dtype=torch.int64), torch.zeros(0, 2, dtype=torch.int64))
    first = rec.take()
    assert first.tokens == 2
    assert first.expert_counts.tolist() == [[0, 0, 0, 0], [1, 0, 1, 2]]
    second = rec.take()
    assert second.tokens == 0 and int(second.expert_counts.sum()) == 0 and int(second.slot_counts.sum()) == 0
    # snapshots are independent copies: recording again does not touch an old snapshot
    rec.record(1, torch.tensor([[0, 1]]), torch.tensor([[0, 1]]))
    assert first.expert_counts[1].tolist() == [1, 0, 1, 2]


def test_slots_optional_and_bad_input_rejected_without_partial_update():
    rec = LoadRecorder(2, 4, 3)
    rec.record(0, torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match="out of range"):
        rec.record(0, torch.tensor([[1, 4]]), torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="out of range"):
        rec.record(0, torch.tensor([[1, 2]]), torch.tensor([[0, 3]]))
    with pytest.raises(RuntimeError):
        rec.record(0, torch.tensor([[1, -1]]), torch.tensor([[0, 1]]))
    with pytest.raises(IndexError):
        rec.record(2, torch.tensor([[1, 2]]), torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="differ in shape"):
        rec.record(0, torch.tensor([[1, 2]]), torch.tensor([[0, 1, 2]]))
    with pytest.raises(ValueError, match=r"\[T, A\]"):
        rec.record(0, torch.tensor([1, 2]))
    snap = rec.take()
    assert snap.tokens == 1
    assert snap.expert_counts.tolist() == [[0, 1, 1, 0], [0, 0, 0, 0]]
    assert int(snap.slot_counts.sum()) == 0


def test_resize_slots_drops_slot_counts_keeps_expert_counts():
    rec = LoadRecorder(1, 4, 4)
    rec.record(0, torch.tensor([[0, 1]]), torch.tensor([[0, 1]]))
    rec.resize_slots(6)
    assert rec.num_slots == 6
    rec.record(0, torch.tensor([[0, 1]]), torch.tensor([[4, 5]]))
    snap = rec.take()
    assert snap.num_slots == 6
    assert snap.expert_counts.tolist() == [[2, 2, 0, 0]]
    assert snap.slot_counts.tolist() == [[0, 0, 0, 0, 1, 1]]
    assert snap.tokens == 2
    with pytest.raises(ValueError):
        rec.resize_slots(0)


def test_concurrent_record_and_take_lose_nothing():
    L, E, P = 2, 8, 8
    rec = LoadRecorder(L, E, P)
    n_threads, n_iters, t = 4, 200, 5
    stop = threading.Event()
    taken: list[LoadSnapshot] = []

    def taker():
        while not stop.is_set():
            taken.append(rec.take())

    def worker(seed):
        g = torch.Generator().manual_seed(seed)
        for i in range(n_iters):
            ids = torch.randint(0, E, (t, 2), generator=g)
            rec.record(i % L, ids, ids)

    tk = threading.Thread(target=taker)
    tk.start()
    workers = [threading.Thread(target=worker, args=(s,)) for s in range(n_threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(30)
    stop.set()
    tk.join(30)
    taken.append(rec.take())
    total = sum(s.tokens for s in taken)
    assert total == n_threads * n_iters * t
    e = sum(s.expert_counts for s in taken)
    s = sum(s.slot_counts for s in taken)
    assert int(e.sum()) == total * 2 and torch.equal(e, s)
    expect = Counter()
    for seed in range(n_threads):
        g = torch.Generator().manual_seed(seed)
        for i in range(n_iters):
            for v in torch.randint(0, E, (t, 2), generator=g).reshape(-1).tolist():
                expect[(i % L, v)] += 1
    assert all(int(e[k]) == c for k, c in expect.items())


def test_invalid_sizes():
    with pytest.raises(ValueError):
        LoadRecorder(0, 4, 4)
