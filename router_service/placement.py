"""Placement of logical experts onto physical slots and shards.

Vocabulary (see docs/architecture.md): ``phy2log [L, P]`` is the logical expert
held by each physical slot; slots are numbered shard by shard, so slot ``p``
lives on shard ``p // slots_per_shard``. ``log2phy [L, E, R]`` lists the slots
holding each expert (``-1`` padded) and ``logcnt [L, E]`` counts them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


class ExpertsUnavailable(RuntimeError):
    """Some routed experts have no reachable copy right now.

    ``rows`` are the token rows (of the layer's batch) routed to them, so the
    engine can fail only the requests those tokens belong to; ``microbatch``
    is set by the model runner.
    """

    def __init__(self, message: str, rows: list[int] | None = None):
        super().__init__(message)
        self.rows = rows
        self.microbatch: int | None = None


@dataclass(frozen=True)
class Placement:
    phy2log: torch.Tensor
    """``[L, P]`` int64."""
    num_shards: int
    epoch: int = 0
    excluded_shards: frozenset[int] = frozenset()
    """Shards currently unreachable: their slots are left out of ``log2phy``."""
    log2phy: torch.Tensor = field(init=False, repr=False)
    logcnt: torch.Tensor = field(init=False, repr=False)
    _cache: dict = field(init=False, repr=False, compare=False)
    """Derived views made once: ``"rows"`` (phy2log as host lists) and, per device, ``(log2phy, logcnt)``."""

    def __post_init__(self):
        p2l = self.phy2log
        if p2l.dim() != 2:
            raise ValueError(f"phy2log must be [L, P], got shape {list(p2l.shape)}")
        num_layers, num_slots = p2l.shape
        if self.num_shards < 1 or num_slots % self.num_shards:
            raise ValueError(f"{num_slots} slots cannot be split evenly over {self.num_shards} shards")
        p2l = p2l.to(device="cpu", dtype=torch.int64).contiguous()  # control data: the host copy is the truth
        object.__setattr__(self, "phy2log", p2l)
        num_experts = int(p2l.max()) + 1 if p2l.numel() else 0
        cpu = dict(device="cpu")
        live = torch.ones(num_slots, dtype=torch.bool, **cpu)
        sps = num_slots // self.num_shards
        for s in self.excluded_shards:
            live[s * sps:(s + 1) * sps] = False
        # dead slots count towards a phantom expert E, so the arithmetic below stays dense
        keyed = torch.where(live, p2l, torch.full_like(p2l, num_experts))
        counts = torch.zeros(num_layers, num_experts + 1, dtype=torch.int64, **cpu)
        counts.scatter_add_(1, keyed, torch.ones_like(keyed))
        logcnt = counts[:, :num_experts].contiguous()
        max_r = max(int(logcnt.max()) if logcnt.numel() else 1, 1)
        log2phy = torch.full((num_layers, num_experts + 1, max(max_r, int(counts.max()))), -1, dtype=torch.int64,
                             **cpu)
        # stable order: copies listed by ascending slot id
        order = torch.argsort(keyed, dim=1, stable=True)
        sorted_log = torch.gather(keyed, 1, order)
        first = torch.cumsum(counts, dim=1) - counts
        rank = torch.arange(num_slots, **cpu).expand(num_layers, -1) - torch.gather(first, 1, sorted_log)
        layer_idx = torch.arange(num_layers, **cpu).unsqueeze(1).expand(-1, num_slots)
        log2phy[layer_idx, sorted_log, rank] = order
        log2phy = log2phy[:, :num_experts, :max_r].contiguous()
        object.__setattr__(self, "logcnt", logcnt)
        object.__setattr__(self, "log2phy", log2phy)
        object.__setattr__(self, "_cache", {torch.device("cpu"): (log2phy, logcnt)})

    def __reduce__(self):  # rebuilt where it lands: the derived tables and device copies stay behind
        return (type(self), (self.phy2log, self.num_shards, self.epoch, self.excluded_shards))

    def phy2log_rows(self) -> list[list[int]]:
        """``phy2log`` as host lists (``[L][P]``), made once per placement."""
        rows = self._cache.get("rows")
        if rows is None:
            rows = self._cache["rows"] = self.phy2log.tolist()
        return rows

    def lookups(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log2phy [L, E, R], logcnt [L, E])`` on ``device`` (copied there once per placement)."""
        got = self._cache.get(device)
        if got is None:
            got = self._cache[device] = (self.log2phy.to(device), self.logcnt.to(device))
        return got

    @property
    def num_layers(self) -> int:
        return self.phy2log.shape[0]

    @property
    def num_slots(self) -> int:
        return self.phy2log.shape[1]

    @property
    def slots_per_shard(self) -> int:
        return self.num_slots // self.num_shards

    @property
    def num_experts(self) -> int:
        return self.logcnt.shape[1]

    def shard_of(self, slot: int) -> int:
        return slot // self.slots_per_shard

    def shard_slots(self, shard: int) -> dict[int, list[tuple[int, int]]]:
        """MoE layer -> ``[(slot, logical expert)]`` held by ``shard``."""
        lo, hi = shard * self.slots_per_shard, (shard + 1) * self.slots_per_shard
        return {l: [(p, int(self.phy2log[l, p])) for p in range(lo, hi)] for l in range(self.num_layers)}

    def validate(self, num_experts: int) -> None:
        if self.num_experts != num_experts or bool((self.logcnt < 1).any()):
            missing = (self.logcnt < 1).nonzero().tolist() if self.num_experts == num_experts else "some"
            raise ValueError(f"placement must hold every one of {num_experts} experts at least once; "
                             f"missing (layer, expert): {missing}")

    def without_shards(self, shards: set[int] | frozenset[int]) -> "Placement":
        """The same placement with ``shards`` left out of ``log2phy`` (they are unreachable)."""
        return Placement(self.phy2log, self.num_shards, self.epoch, frozenset(shards))

    def choose_slots(self, moe_layer: int, ids: torch.Tensor, turn: int = 0) -> torch.Tensor:
        """Pick a physical slot for every ``(token, k)`` assignment.

        ``ids [T, A]`` logical experts -> ``[T, A]`` slots. The ``j``-th assignment
        of an expert in the batch (in token order) goes to its copy ``(j + turn) %
        copies``: every expert's tokens split evenly over its copies in every batch
        (within one), whichever rows they sit in (choosing by row index instead
        sent a request that keeps its row to the same copy step after step), and a
        caller that advances ``turn`` per call also spreads experts that get one
        token per batch. Deterministic for given ``ids`` and ``turn``. Raises
        :class:`ExpertsUnavailable` if an expert has no live copy. Runs on ``ids``' device without a
        host sync (but for that check, made only while some shard is down).
        """
        log2phy, logcnt = self.lookups(ids.device)
        cnt = logcnt[moe_layer][ids]
        if self.excluded_shards and bool((cnt == 0).any()):
            lost = sorted(set(ids[cnt == 0].tolist()))
            rows = (cnt == 0).any(dim=1).nonzero().flatten().tolist()
            raise ExpertsUnavailable(f"experts {lost} of MoE layer {moe_layer} have no reachable copy "
                                     f"(shards {sorted(self.excluded_shards)} are down)", rows)
        return log2phy[moe_layer][ids, (rank_within_expert(ids) + turn) % cnt]


def rank_within_expert(ids: torch.Tensor) -> torch.Tensor:
    """``ids [T, A]`` -> ``[T, A]``: how many assignments of the same expert come before each one
    (in row-major order). No host sync: every size is known before the kernels run."""
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    sorted_ids = flat[order]
    first = torch.searchsorted(sorted_ids, sorted_ids)  # where each expert's run starts
    rank = torch.empty_like(flat)
    rank[order] = torch.arange(flat.numel(), dtype=flat.dtype, device=flat.device) - first
    return rank.view_as(ids)


def round_robin_placement(num_layers: int, num_experts: int, num_shards: int,
                          slots_per_shard: int | None = None, epoch: int = 0) -> Placement:
    """Static placement: slot ``p`` holds expert ``p % E``.

    Experts fill the shards in order; redundant slots (when ``num_shards *
    slots_per_shard > E``) hold copies of experts ``0, 1, ...``, which then sit
    on later shards than their first copy.
    """
    if slots_per_shard is None:
        slots_per_shard = -(-num_experts // num_shards)
    total = slots_per_shard * num_shards
    if total < num_experts:
        raise ValueError(f"{num_shards} shards x {slots_per_shard} slots = {total} slots "
                         f"cannot hold {num_experts} experts")
    row = torch.arange(total, dtype=torch.int64, device="cpu") % num_experts
    return Placement(row.unsqueeze(0).repeat(num_layers, 1), num_shards, epoch)
