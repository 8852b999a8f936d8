"""Dispatch and combine: the router's data path for one MoE layer.

gate -> map every ``(token, expert)`` to a physical slot -> group by shard ->
transport -> combine in a fixed order. The combine sums the ``A`` expert
outputs of a token in rank order, so the result does not depend on which copy
answered or in which order the shards replied.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from moeyard.router_service.placement import ExpertsUnavailable, Placement
from moeyard.router_service.transport import (
    ExpertTransport,
    LayerOutputs,
    ShardBatch,
    ShardUnavailable,
    StalePlacement,
)

log = logging.getLogger(__name__)


@dataclass
class DispatchPlan:
    """Where each assignment went. ``order [T*A]`` sorts flat assignments by slot."""

    num_tokens: int
    top_k: int
    order: torch.Tensor
    slots: torch.Tensor
    """``[T, A]`` chosen slots (``num_slots`` for a dropped assignment)."""
    num_sent: int | None = None
    """Assignments sent (the first ``num_sent`` of ``order``); None: all ``T * A``."""


def _choose_sent_slots(placement: Placement, moe_layer: int, ids: torch.Tensor, turn: int) -> torch.Tensor:
    """``choose_slots`` for ``ids [T, A]`` with ``-1`` (dropped) entries: those get slot ``num_slots``, which
    sorts after every real slot; the others are chosen as if the dropped ones were not there."""
    sent = ids >= 0
    slots = torch.full_like(ids, placement.num_slots)
    try:
        slots[sent] = placement.choose_slots(moe_layer, ids[sent].view(-1, 1), turn).view(-1)
    except ExpertsUnavailable as e:  # its rows index the sent assignments: name the tokens instead
        token_of = sent.nonzero()[:, 0].tolist()
        e.rows = sorted({token_of[r] for r in e.rows}) if e.rows is not None else None
        raise
    return slots


def plan_dispatch(hidden: torch.Tensor, ids: torch.Tensor, placement: Placement,
                  moe_layer: int, turn: int = 0, has_dropped: bool = False) -> tuple[DispatchPlan, list[ShardBatch]]:
    """Group the assignments of one MoE layer by shard, each token once per shard.

    Args:
        hidden: ``[T, D]`` tokens after the post-attention norm.
        ids: ``[T, A]`` logical experts chosen by the gate; with ``has_dropped``, ``-1`` marks an
            assignment the capacity limit dropped (not sent; it adds nothing to its token).
        turn: rotates which copy of a replicated expert comes first (``Placement.choose_slots``).
    Returns the plan (to combine later) and one batch per involved shard: its distinct tokens
    ``[U_s, D]`` (ascending token order) and, per (token, expert) row in slot order, the row of those.

    Everything runs on ``hidden``'s device; the per-slot row counts and the per-shard distinct-token
    counts come to the host together (the layer's one host sync: the batches' slot lists are host data).
    """
    t, a = ids.shape
    dev = hidden.device
    slots = _choose_sent_slots(placement, moe_layer, ids, turn) if has_dropped else \
        placement.choose_slots(moe_layer, ids, turn)
    flat = slots.reshape(-1)                                   # [T*A]
    order = torch.argsort(flat, stable=True)                   # (token, expert) rows in slot order
    sps, num_shards = placement.slots_per_shard, placement.num_shards
    extra = 1 if has_dropped else 0                            # dropped rows: one more "shard" after the last
    per_slot = torch.bincount(flat, minlength=placement.num_slots + extra)[:placement.num_slots]
    # which (shard, token) pairs occur: [num_shards, T]; its running count numbers them shard-major
    pair = ((slots // sps).clamp(max=num_shards) * t + torch.arange(t, device=dev).unsqueeze(1)).reshape(-1)
    seen = torch.zeros((num_shards + extra) * t, dtype=torch.int32, device=dev).index_fill_(0, pair, 1)
    per_shard = seen[:num_shards * t].view(num_shards, t).sum(1)
    host = torch.cat([per_slot, per_shard]).tolist()           # the one host sync
    per_slot_l, per_shard_l = host[:placement.num_slots], host[placement.num_slots:]
    numbered = torch.cumsum(seen, 0, dtype=torch.int32)        # 1 + index of each (shard, token) among all pairs
    distinct = torch.nonzero_static(seen[:num_shards * t].view(num_shards, t), size=sum(per_shard_l))[:, 1]
    x = hidden.index_select(0, distinct)
    global_row = numbered.index_select(0, pair.index_select(0, order))  # [N] 1 + rows of x in slot order (int32)
    uniq_l = [p for p, n in enumerate(per_slot_l) if n]
    counts_l = [per_slot_l[p] for p in uniq_l]
    # the logical expert each chosen slot holds in this placement: the shard checks it
    held = placement.phy2log_rows()[moe_layer]
    experts_l = [held[p] for p in uniq_l]
    shard_start = [0] * (num_shards + 1)
    for s_ in range(num_shards):
        shard_start[s_ + 1] = shard_start[s_] + per_shard_l[s_]
    batches: list[ShardBatch] = []
    start = i = 0
    while i < len(uniq_l):
        shard = uniq_l[i] // sps
        j = i
        n = 0
        while j < len(uniq_l) and uniq_l[j] // sps == shard:
            n += counts_l[j]
            j += 1
        u0, u1 = shard_start[shard], shard_start[shard + 1]
        batches.append(ShardBatch(shard, uniq_l[i:j], counts_l[i:j], x[u0:u1], experts_l[i:j],
                                  token_rows=global_row[start:start + n] - (u0 + 1)))
        start += n
        i = j
    return DispatchPlan(t, a, order, slots, num_sent=start if has_dropped else None), batches


def combine(plan: DispatchPlan, outputs: list[torch.Tensor], weights: torch.Tensor,
            dtype: torch.dtype) -> torch.Tensor:
    """Weighted sum of expert outputs per token.

    Args:
        outputs: one ``[N_i, D]`` per shard batch, in batch order (sorted by slot).
        weights: ``[T, A]`` gate weights.
    Returns ``[T, D]`` in ``dtype``.
    """
    device = plan.order.device
    if isinstance(outputs, LayerOutputs):  # one host buffer: one copy to the device
        y_sorted = outputs.flat.to(device, non_blocking=True)
    elif len(outputs) > 1:
        y_sorted = torch.cat([o.to(device) for o in outputs], dim=0)
    else:
        y_sorted = outputs[0].to(device)
    if plan.num_sent is None:
        y = torch.empty_like(y_sorted)
        y[plan.order] = y_sorted
    else:  # dropped assignments: zero rows (their weight is 0, and 0 * garbage could be NaN)
        y = y_sorted.new_zeros(plan.num_tokens * plan.top_k, y_sorted.shape[-1])
        y[plan.order[:plan.num_sent]] = y_sorted
    y = y.view(plan.num_tokens, plan.top_k, -1)
    w = weights.to(y.dtype).unsqueeze(-1)
    out = y[:, 0] * w[:, 0]
    for k in range(1, plan.top_k):
        out = out + y[:, k] * w[:, k]
    return out.to(dtype)


@dataclass
class PendingExperts:
    """Routed-expert work of one MoE layer in flight."""

    moe_layer: int
    hidden: torch.Tensor
    weights: torch.Tensor
    ids: torch.Tensor
    plan: DispatchPlan | None = None
    future: "Future[list[torch.Tensor]] | None" = None
    has_dropped: bool = False
    """``ids`` holds ``-1`` for assignments the capacity limit dropped."""


class ExpertDispatcher:
    """Runs the routed experts of every MoE layer through a transport.

    A shard that fails (:class:`ShardUnavailable`) is marked down for
    ``down_seconds``; the layer is re-planned on the remaining copies and sent
    again. When an expert has no reachable copy, the dispatcher waits up to
    ``restart_wait_s`` for its shard to come back (Ray restarts a dead shard
    actor, which reloads its slots from the published placement), probing every
    ``0.25``-``1`` s; only past that bound does the layer fail, with
    :class:`ExpertsUnavailable` (the engine then fails just the requests routed
    to the missing experts). A shard that no longer holds the copy asked for
    (:class:`StalePlacement`) first makes the dispatcher ask ``on_stale`` for a
    newer placement; only if there is none is the shard treated as down.

    Placements change at step boundaries: the engine wraps each step in
    :meth:`step`, and :meth:`switch` (from another thread) hands over a new
    placement that the next step starts with. ``recorder`` (a
    :class:`~moeyard.router_service.load_recorder.LoadRecorder`) counts every layer's
    tokens per expert and slot.
    """

    def __init__(self, placement: Placement, transport: ExpertTransport, max_retries: int = 3,
                 down_seconds: float = 2.0, recorder=None, on_stale: Callable[[], Placement | None] | None = None,
                 restart_wait_s: float = 0.0, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self.placement = placement
        self.transport = transport
        self.max_retries = max_retries
        self.down_seconds = down_seconds
        self.restart_wait_s = restart_wait_s
        self._clock, self._sleep = clock, sleep
        self.recorder = recorder
        self.on_stale = on_stale
        self._down: dict[int, float] = {}  # shard -> monotonic time it was marked down
        self._turn = 0  # advanced per layer call: rotates the first copy of replicated experts
        self._step_lock = threading.Lock()
        self._pending: Placement | None = None
        self._pending_lock = threading.Lock()

    def _live_placement(self) -> Placement:
        if not self._down:
            return self.placement
        now = self._clock()
        for shard, since in list(self._down.items()):
            if now - since > self.down_seconds:
                del self._down[shard]
        return self.placement.without_shards(set(self._down)) if self._down else self.placement

    def set_placement(self, placement: Placement) -> None:
        """Switch to a new placement now (the caller is between steps or inside one)."""
        if self.recorder is not None and placement.num_slots != self.placement.num_slots:
            self.recorder.resize_slots(placement.num_slots)
        self.placement = placement

    def _adopt_pending(self) -> None:
        with self._pending_lock:
            p, self._pending = self._pending, None
        if p is not None:
            self.set_placement(p)

    @contextmanager
    def step(self):
        """Wrap one engine step: a placement handed to :meth:`switch` is adopted at its start
        and none changes under it (a step finishes on the epoch it started with)."""
        with self._step_lock:
            if self._pending is not None:
                self._adopt_pending()
            yield

    def switch(self, placement: Placement, timeout: float = 30.0) -> bool:
        """Hand ``placement`` over for the next step boundary; wait until it is in force.

        If no step is running it is adopted at once. Returns False if it was not
        adopted within ``timeout`` (it stays pending and the next step adopts it).
        """
        with self._pending_lock:
            self._pending = placement
        deadline = time.monotonic() + timeout
        while True:
            if self._step_lock.acquire(timeout=0.01):
                try:
                    if self._pending is placement:
                        self._adopt_pending()
                finally:
                    self._step_lock.release()
            if self.placement is placement or (self._pending is not placement
                                               and self.placement.epoch >= placement.epoch):
                return True
            if time.monotonic() >= deadline:
                return False

    def submit(self, moe_layer: int, hidden: torch.Tensor, weights: torch.Tensor,
               ids: torch.Tensor, has_dropped: bool = False) -> PendingExperts:
        """Send one layer's routed work; returns at once. ``has_dropped``: ``ids`` marks dropped
        assignments with ``-1`` (neither sent nor counted as load)."""
        p = PendingExperts(moe_layer, hidden, weights, ids, has_dropped=has_dropped)
        if hidden.shape[0]:
            placement = self._live_placement()  # one epoch for the whole layer
            self._turn += 1
            p.plan, batches = plan_dispatch(hidden, ids, placement, moe_layer, self._turn, has_dropped)
            if batches:  # (none when the capacity limit dropped every assignment: the output is zero)
                p.future = self.transport.submit(moe_layer, batches, placement.epoch)
            if self.recorder is not None:
                self.recorder.record(moe_layer, ids, p.plan.slots, sent=(ids >= 0) if has_dropped else None)
        return p

    def finish(self, p: PendingExperts) -> torch.Tensor:
        """Wait for a submitted layer and combine: ``[T, D]``."""
        if p.future is None:
            return torch.zeros_like(p.hidden)
        attempt = 0
        waiting_since: float | None = None  # set while no copy of some expert is reachable
        while True:
            try:
                out = combine(p.plan, p.future.result(), p.weights, p.hidden.dtype)
                if waiting_since is not None:
                    log.warning("MoE layer %d: every expert reachable again after %.1f s", p.moe_layer,
                                self._clock() - waiting_since)
                return out
            except ShardUnavailable as e:
                attempt += 1
                if attempt > self.max_retries and waiting_since is None:
                    raise
                self._note_failure(e, p.moe_layer, quiet=waiting_since is not None)
                placement = self._live_placement()
                try:
                    p.plan, batches = plan_dispatch(p.hidden, p.ids, placement, p.moe_layer,
                                                    has_dropped=p.has_dropped)
                except ExpertsUnavailable:
                    now = self._clock()
                    if waiting_since is None:
                        waiting_since = now
                        log.warning("MoE layer %d: no reachable copy of some experts (shard %d down); waiting up "
                                    "to %.0f s for it to restart", p.moe_layer, e.shard, self.restart_wait_s)
                    if now - waiting_since >= self.restart_wait_s:
                        raise
                    self._sleep(min(1.0, 0.25 * 2 ** min(attempt, 2), waiting_since + self.restart_wait_s - now))
                    placement = self._probe_all()
                    p.plan, batches = plan_dispatch(p.hidden, p.ids, placement, p.moe_layer,
                                                    has_dropped=p.has_dropped)
                p.future = self.transport.submit(p.moe_layer, batches, placement.epoch)

    def _note_failure(self, e: ShardUnavailable, moe_layer: int, quiet: bool) -> None:
        """A stale placement: adopt the newer one if there is; else mark the shard down."""
        newer = self.on_stale() if isinstance(e, StalePlacement) and self.on_stale else None
        if newer is not None:
            log.info("shard %d: %s; re-planning MoE layer %d on placement epoch %d",
                     e.shard, e.message, moe_layer, newer.epoch)
            self.set_placement(newer)
            return
        if not quiet:
            log.warning("shard %d unavailable (%s); retrying MoE layer %d on other copies", e.shard, e, moe_layer)
        self._down[e.shard] = self._clock()
        self.transport.refresh(e.shard)

    def _probe_all(self) -> Placement:
        """Forget which shards are down (and their addresses: a restarted shard listens on a new
        port), so the next attempt tries every shard of the placement again."""
        for shard in list(self._down):
            self.transport.refresh(shard)
        self._down.clear()
        return self.placement

    def __call__(self, moe_layer: int, hidden: torch.Tensor, weights: torch.Tensor,
                 ids: torch.Tensor) -> torch.Tensor:
        """``hidden [T, D]``, ``weights/ids [T, A]`` -> ``[T, D]`` routed-expert output."""
        return self.finish(self.submit(moe_layer, hidden, weights, ids))
