"""Dispatch + combine through the in-process transport vs a dense reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from moeyard.attention.engine import build_local_experts
from moeyard.model.spec import load_spec
from moeyard.router_service.dispatch import ExpertDispatcher, plan_dispatch
from moeyard.router_service.placement import Placement, round_robin_placement


def _expert(f, family: str, layer: int, e: int):
    if family == "mixtral":
        p = f"model.layers.{layer}.block_sparse_moe.experts.{e}"
        return f.get_tensor(f"{p}.w1.weight"), f.get_tensor(f"{p}.w3.weight"), f.get_tensor(f"{p}.w2.weight")
    p = f"model.layers.{layer}.mlp.experts.{e}"
    return (f.get_tensor(f"{p}.gate_proj.weight"), f.get_tensor(f"{p}.up_proj.weight"),
            f.get_tensor(f"{p}.down_proj.weight"))


def _dense_reference(ckpt, family, layer, x, weights, ids):
    """sum_k w[t,k] * FFN_{ids[t,k]}(x[t]), token by token, from the safetensors file."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    with safe_open(ckpt / "model.safetensors", framework="pt") as f:
        experts = {e: tuple(t.double() for t in _expert(f, family, layer, e)) for e in ids.unique().tolist()}
    for t in range(x.shape[0]):
        xt = x[t].double()
        for k in range(ids.shape[1]):
            g, u, d = experts[int(ids[t, k])]
            out[t] += float(weights[t, k]) * (d @ (F.silu(g @ xt) * (u @ xt)))
    return out


def _routing(t: int, e: int, a: int, d: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, d, generator=g)
    ids = torch.stack([torch.randperm(e, generator=g)[:a] for _ in range(t)])
    ids[:6] = torch.tensor([1, 6])  # hot experts: the first tokens all pick experts 1 and 6
    w = torch.rand(t, a, generator=g) + 0.1
    return x, w / w.sum(1, keepdim=True), ids


class _Recording:
    def __init__(self, inner):
        self.inner = inner
        self.batches = []

    def submit(self, moe_layer, batches, epoch):
        self.batches.append((moe_layer, list(batches), epoch))
        return self.inner.submit(moe_layer, batches, epoch)

    def refresh(self, shard):
        pass

    def close(self):
        self.inner.close()


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "deepseek_v3"])
def test_dispatch_combine_equals_dense_reference_for_any_placement(family, hf_models):
    ckpt, _ = hf_models(family)
    spec = load_spec(ckpt)
    n_layers, n_exp = spec.num_moe_layers, spec.moe.num_experts
    # 1 shard; 3 shards x 4 slots (experts 0..3 twice); a shuffled placement with 3 copies of expert 6
    perm = torch.tensor([6, 3, 0, 6, 5, 7, 1, 2, 6, 4])
    placements = [round_robin_placement(n_layers, n_exp, 1),
                  round_robin_placement(n_layers, n_exp, 3, 4, epoch=3),
                  Placement(perm.unsqueeze(0).repeat(n_layers, 1), num_shards=2, epoch=1)]
    x, w, ids = _routing(23, n_exp, spec.moe.top_k, spec.hidden_size, seed=len(family))
    moe_layer = n_layers - 1
    ref = _dense_reference(ckpt, family, spec.moe_layers[moe_layer], x, w, ids)
    results = []
    for pl in placements:
        transport = _Recording(build_local_experts(ckpt, spec, pl, torch.float32))
        out = ExpertDispatcher(pl, transport)(moe_layer, x, w, ids)
        assert out.shape == x.shape and out.dtype == torch.float32
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
        # the work really went where the placement says
        ((layer, batches, epoch),) = transport.batches
        assert layer == moe_layer and epoch == pl.epoch
        assert [b.shard for b in batches] == sorted({b.shard for b in batches})
        for b in batches:
            assert b.slot_ids == sorted(b.slot_ids)
            assert all(pl.shard_of(s) == b.shard for s in b.slot_ids)
            assert sum(b.counts) == b.num_rows == b.rows().shape[0] == b.token_rows.shape[0]
            # each token once per shard: distinct rows, ascending token order
            assert b.hidden.shape[0] == len({tuple(r) for r in b.hidden.tolist()}) <= b.num_rows
        assert sum(b.num_rows for b in batches) == ids.numel()
        results.append((pl, batches, out))
    for _, _, out in results[1:]:
        torch.testing.assert_close(out, results[0][2], atol=1e-6, rtol=1e-6)
    # 3-shard placement: all shards involved, both copies of a hot expert used
    _, batches3, _ = results[1]
    assert {b.shard for b in batches3} == {0, 1, 2}
    used = {s for b in batches3 for s in b.slot_ids}
    assert {1, 9} <= used  # expert 1 lives in slots 1 and 9 (shards 0 and 2): both copies served


def test_plan_groups_rows_by_slot_and_shard():
    pl = Placement(torch.tensor([[0, 1, 2, 3, 0, 1]]), num_shards=3)  # 2 slots per shard
    hidden = torch.arange(4, dtype=torch.float32).unsqueeze(1).repeat(1, 3)  # row t = t
    ids = torch.tensor([[0, 3], [1, 0], [0, 2], [3, 1]])
    plan, batches = plan_dispatch(hidden, ids, pl, 0)
    slots = pl.choose_slots(0, ids)
    assert torch.equal(plan.slots, slots)
    # rebuild (slot, token) pairs from the batches and compare with the choice
    got = []
    for b in batches:
        rows = b.rows()[:, 0].long().tolist()
        i = 0
        for s, n in zip(b.slot_ids, b.counts):
            got.extend((s, r) for r in rows[i:i + n])
            i += n
    want = sorted((int(slots[t, k]), t) for t in range(4) for k in range(2))
    assert sorted(got) == want
    assert [b.shard for b in batches] == sorted({pl.shard_of(s) for s, _ in want})
    # each token once per shard: its distinct tokens, ascending, and a row index per (token, expert)
    for b in batches:
        tokens = b.hidden[:, 0].long().tolist()
        assert tokens == sorted(set(tokens))
        assert set(tokens) == {t for s, t in want if pl.shard_of(s) == b.shard}
    assert sum(b.hidden.shape[0] for b in batches) == len({(pl.shard_of(s), t) for s, t in want})


def test_a_token_with_two_experts_on_one_shard_travels_there_once():
    pl = Placement(torch.tensor([[0, 1, 2, 3]]), num_shards=2)   # shard 0: experts 0, 1; shard 1: 2, 3
    hidden = torch.arange(4, dtype=torch.float32).unsqueeze(1).repeat(1, 3)
    ids = torch.tensor([[0, 3], [1, 0], [0, 2], [3, 1]])            # token 1: both experts on shard 0
    _, (b0, b1) = plan_dispatch(hidden, ids, pl, 0)
    assert b0.hidden[:, 0].tolist() == [0, 1, 2, 3] and b0.num_rows == 5   # token 1 once, for 2 rows
    assert b1.hidden[:, 0].tolist() == [0, 2, 3] and b1.num_rows == 3
    assert b0.rows()[:, 0].tolist() == [0, 1, 2, 1, 3]    # slot 0: tokens 0, 1, 2; slot 1: tokens 1, 3


@pytest.mark.parametrize("seed", range(5))
def test_plan_rows_equal_the_per_assignment_rows_for_any_placement(seed):
    """Whatever the placement, the rows a shard rebuilds are exactly the (token, expert) rows in slot
    order that the per-assignment format sent."""
    g = torch.Generator().manual_seed(seed)
    e, t, a = 8, 37, 4
    phy = torch.cat([torch.randperm(e, generator=g), torch.randint(0, e, (4,), generator=g)]).unsqueeze(0)
    pl = Placement(phy, num_shards=[1, 2, 3, 4, 6][seed])
    hidden = torch.randn(t, 5, generator=g)
    ids = torch.stack([torch.randperm(e, generator=g)[:a] for _ in range(t)])
    plan, batches = plan_dispatch(hidden, ids, pl, 0, turn=seed)
    per_assignment = hidden[plan.order // a]
    start = 0
    for b in batches:
        torch.testing.assert_close(b.rows(), per_assignment[start:start + b.num_rows], atol=0, rtol=0)
        start += b.num_rows
    assert start == t * a


def test_dispatch_of_no_tokens_is_zero(hf_models):
    ckpt, _ = hf_models("mixtral")
    spec = load_spec(ckpt)
    pl = round_robin_placement(spec.num_moe_layers, 8, 2)

    class Never:
        def submit(self, *a):
            raise AssertionError("nothing to send")

    out = ExpertDispatcher(pl, Never())(0, torch.zeros(0, spec.hidden_size),
                                        torch.zeros(0, 2), torch.zeros(0, 2, dtype=torch.int64))
    assert out.shape == (0, spec.hidden_size)


def test_transport_errors_surface(hf_models):
    ckpt, _ = hf_models("mixtral")
    spec = load_spec(ckpt)
    pl = round_robin_placement(spec.num_moe_layers, 8, 2)
    transport = build_local_experts(ckpt, spec, pl, torch.float32)
    del transport.shards[1]  # a shard went away
    x = torch.randn(2, spec.hidden_size)
    ids = torch.tensor([[0, 7], [1, 6]])  # experts 6, 7 live on shard 1
    with pytest.raises(KeyError):
        ExpertDispatcher(pl, transport)(0, x, torch.full((2, 2), 0.5), ids)


def test_plan_names_the_expert_expected_in_every_slot():
    phy2log = torch.tensor([[0, 1, 2, 3, 0, 1], [3, 2, 1, 0, 2, 3]])
    pl = Placement(phy2log, num_shards=3, epoch=5)
    hidden = torch.randn(9, 4)
    ids = torch.tensor([[0, 3], [1, 0], [0, 2], [3, 1], [2, 1], [0, 1], [3, 2], [1, 2], [0, 3]])
    for moe_layer in range(2):
        _, batches = plan_dispatch(hidden, ids, pl, moe_layer)
        assert batches
        for b in batches:
            assert len(b.experts) == len(b.slot_ids)
            assert b.experts == [int(phy2log[moe_layer, s]) for s in b.slot_ids]
            assert all(isinstance(e, int) for e in b.experts)
        # every copy of every expert routed to is named as that expert
        assert sorted({e for b in batches for e in b.experts}) == sorted(set(ids.flatten().tolist()))
