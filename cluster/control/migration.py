"""Live migration from one placement to another, layer by layer, never stopping the world.

For every MoE layer whose slots change (one layer at a time):

1. **stage**: every shard loads the layer's new copies *next to* what its slots hold
   (``LoadSlots(stage=true)``), so routers on the old epoch keep being answered;
2. **publish**: the placement with this layer switched goes to Redis under a new epoch;
3. **switch**: every attention replica adopts it at its next step boundary and
   acknowledges the epoch (``P:replica:{id}``); a step in flight finishes on the
   epoch it started with;
4. **drain**: wait until every live replica acknowledged (bounded);
5. **release**: unload the old copies.

A router that missed the switch asks a shard for an expert it no longer holds and gets
``NOT_FOUND``; it then re-reads the placement and re-plans the layer, so a late replica
costs a retry, never a wrong answer. If staging fails, nothing was published and the
layer's new copies are released again: the cluster stays on the old placement.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import torch

from moeyard.router_service.placement import Placement
from moeyard.router_service.planner import plan_placement
from moeyard.router_service.transport import ShardUnavailable

log = logging.getLogger("moeyard.migration")


class ShardControl(Protocol):
    """The control-plane calls the migrator makes on expert shards."""

    def load(self, shard: int, assignments: list[tuple[int, int, int]], stage: bool) -> int:
        """Load ``(moe_layer, slot, expert)``; ``stage``: next to the slot's current copy. Returns bytes."""
        ...

    def unload(self, shard: int, refs: list[tuple[int, int, int | None]]) -> int:
        """Release ``(moe_layer, slot, expert)`` copies (``expert=None``: the whole slot)."""
        ...

    def held(self, shard: int) -> dict[int, list[tuple[int, int]]]:
        """MoE layer -> ``[(slot, expert)]`` the shard holds now."""
        ...


class GrpcShardControl:
    """:class:`ShardControl` over the shards' gRPC servers (a ``GrpcTransport`` reaches them).

    A shard that does not answer is looked up again once and the call retried: Ray restarts a killed shard
    on a new port, and the transport keeps the old address until told to :meth:`refresh` it. Every call is
    safe to repeat (loading a copy a slot holds replaces it, unloading one it lacks does nothing)."""

    def __init__(self, transport, timeout_s: float = 120.0):
        self.transport = transport
        self.timeout_s = timeout_s

    def _retrying(self, shard: int, call):
        try:
            return call()
        except ShardUnavailable:
            self.transport.refresh(shard)
            return call()

    def load(self, shard: int, assignments: list[tuple[int, int, int]], stage: bool) -> int:
        return self._retrying(shard, lambda: self.transport.load_slots(shard, assignments, timeout=self.timeout_s,
                                                                       stage=stage))

    def unload(self, shard: int, refs: list[tuple[int, int, int | None]]) -> int:
        return self._retrying(shard, lambda: self.transport.unload_slots(shard, refs, timeout=self.timeout_s))

    def held(self, shard: int) -> dict[int, list[tuple[int, int]]]:
        st = self._retrying(shard, lambda: self.transport.status(shard, timeout=10))
        return {int(layer): [(int(s), int(e)) for s, e in pairs] for layer, pairs in st["slots"].items()}


class EpochPublisher(Protocol):
    """Where placements are published and replicas acknowledge them (Redis in a cluster)."""

    def publish(self, placement: Placement) -> None: ...

    def replica_epochs(self) -> dict[str, int]: ...


@dataclass
class MigrationReport:
    epoch_before: int
    epoch_after: int
    layers_moved: list[int] = field(default_factory=list)
    slots_moved: int = 0
    bytes_loaded: int = 0
    seconds: float = 0.0
    late_replicas: list[str] = field(default_factory=list)
    """Replicas that had not acknowledged an epoch within the drain bound."""


class MigrationError(RuntimeError):
    pass


def layer_changes(old: Placement, new: Placement) -> dict[int, list[tuple[int, int, int]]]:
    """MoE layer -> ``[(slot, old expert, new expert)]`` for the slots that change.

    ``old`` and ``new`` must have the same ``[L, P]`` shape.
    """
    if old.phy2log.shape != new.phy2log.shape:
        raise MigrationError(f"placements differ in shape: {list(old.phy2log.shape)} vs "
                             f"{list(new.phy2log.shape)}")
    diff = old.phy2log != new.phy2log
    out: dict[int, list[tuple[int, int, int]]] = {}
    for layer in diff.any(dim=1).nonzero().flatten().tolist():
        slots = diff[layer].nonzero().flatten()
        out[layer] = list(zip(slots.tolist(), old.phy2log[layer, slots].tolist(),
                              new.phy2log[layer, slots].tolist()))
    return out


def with_layer(base: Placement, new: Placement, layer: int, epoch: int) -> Placement:
    """``base`` with MoE layer ``layer`` taken from ``new``, under ``epoch``."""
    p2l = base.phy2log.clone()
    p2l[layer] = new.phy2log[layer]
    return Placement(p2l, base.num_shards, epoch)


class Migrator:
    """Applies a placement to shards and replicas (see the module docstring)."""

    def __init__(self, shards: ShardControl, publisher: EpochPublisher, *, drain_timeout_s: float = 10.0,
                 poll_s: float = 0.05, clock: Callable[[], float] = time.monotonic):
        self.shards = shards
        self.publisher = publisher
        self.drain_timeout_s = drain_timeout_s
        self.poll_s = poll_s
        self.clock = clock
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="migrate")

    def _per_shard(self, fn: Callable[[int, list], int], work: dict[int, list]) -> int:
        futures = [self._pool.submit(fn, shard, items) for shard, items in work.items() if items]
        return sum(f.result() for f in futures)

    def _wait_acks(self, epoch: int) -> list[str]:
        deadline = self.clock() + self.drain_timeout_s
        while True:
            late = sorted(r for r, e in self.publisher.replica_epochs().items() if e < epoch)
            if not late or self.clock() >= deadline:
                return late
            time.sleep(self.poll_s)

    def apply(self, current: Placement, target: Placement,
              on_layer: Callable[[Placement], None] | None = None) -> tuple[Placement, MigrationReport]:
        """Move from ``current`` to ``target`` layer by layer; returns the placement now
        in force (``target``'s slots under the last published epoch) and a report.

        ``on_layer`` is called with every intermediate placement once published.
        """
        t0 = self.clock()
        changes = layer_changes(current, target)
        report = MigrationReport(current.epoch, current.epoch)
        sps = current.slots_per_shard
        placement = current
        for layer, moves in changes.items():
            staged: dict[int, list[tuple[int, int, int]]] = {}
            for slot, _, new_e in moves:
                staged.setdefault(slot // sps, []).append((layer, slot, new_e))
            try:
                report.bytes_loaded += self._per_shard(lambda s, a: self.shards.load(s, a, True), staged)
            except Exception as e:
                # nothing was published: release what may have been staged, stay on the old placement
                undo = {s: [(l, p, ex) for l, p, ex in a] for s, a in staged.items()}
                try:
                    self._per_shard(self.shards.unload, undo)
                except Exception:
                    log.warning("could not release staged copies of MoE layer %d after a failed load", layer)
                raise MigrationError(f"staging MoE layer {layer} failed: {e}") from e
            placement = with_layer(placement, target, layer, placement.epoch + 1)
            self.publisher.publish(placement)
            if on_layer is not None:
                on_layer(placement)
            late = self._wait_acks(placement.epoch)
            if late:
                log.warning("replicas %s did not acknowledge epoch %d within %.1fs; they will re-read "
                            "the placement when a shard reports their copy gone", late, placement.epoch,
                            self.drain_timeout_s)
                report.late_replicas = sorted(set(report.late_replicas) | set(late))
            released: dict[int, list[tuple[int, int, int | None]]] = {}
            for slot, old_e, _ in moves:
                released.setdefault(slot // sps, []).append((layer, slot, old_e))
            try:
                self._per_shard(self.shards.unload, released)
            except Exception as e:  # the reconciler releases them later; serving is unaffected
                log.warning("releasing old copies of MoE layer %d failed (%s); left to the reconciler", layer, e)
            report.layers_moved.append(layer)
            report.slots_moved += len(moves)
        report.epoch_after = placement.epoch
        report.seconds = self.clock() - t0
        return placement, report

    def _publish_and_drain(self, placement: Placement, report: MigrationReport) -> None:
        self.publisher.publish(placement)
        late = self._wait_acks(placement.epoch)
        if late:
            log.warning("replicas %s did not acknowledge epoch %d within %.1fs", late, placement.epoch,
                        self.drain_timeout_s)
            report.late_replicas = sorted(set(report.late_replicas) | set(late))

    def scale_up(self, current: Placement, target: Placement,
                 create_shard: Callable[[int, dict[int, list[tuple[int, int]]]], None]
                 ) -> tuple[Placement, MigrationReport]:
        """Add shard ``N`` (``target`` has ``N + 1`` shards, the same slots per shard).

        The new shard is created holding its slots of ``target``; the placement
        extended by it is published (routers start sending to it once they switch);
        then the old shards move to ``target`` layer by layer as in :meth:`apply`.
        """
        n, sps = current.num_shards, current.slots_per_shard
        if target.num_shards != n + 1 or target.slots_per_shard != sps:
            raise MigrationError(f"scale-up goes from {n} to {n + 1} shards of {sps} slots; target has "
                                 f"{target.num_shards} of {target.slots_per_shard}")
        t0 = self.clock()
        rows = target.phy2log[:, n * sps:]
        create_shard(n, {layer: [(n * sps + i, int(e)) for i, e in enumerate(rows[layer].tolist())]
                         for layer in range(current.num_layers)})
        expanded = Placement(torch.cat([current.phy2log, rows], dim=1), n + 1, current.epoch + 1)
        report = MigrationReport(current.epoch, expanded.epoch)
        self._publish_and_drain(expanded, report)
        placement, moved = self.apply(expanded, Placement(target.phy2log, n + 1, expanded.epoch))
        moved.epoch_before, moved.seconds = current.epoch, self.clock() - t0
        moved.late_replicas = sorted(set(moved.late_replicas) | set(report.late_replicas))
        return placement, moved

    def scale_down(self, current: Placement, target: Placement, remove_shard: Callable[[int], None]
                   ) -> tuple[Placement, MigrationReport]:
        """Remove the last shard (``target`` has ``N - 1`` shards, the same slots per shard).

        The other shards first move to ``target`` layer by layer while the last one
        keeps its copies (extra copies are harmless); then the placement without it
        is published, routers switch and acknowledge, and only then is it removed.
        """
        n, sps = current.num_shards, current.slots_per_shard
        if target.num_shards != n - 1 or target.slots_per_shard != sps or n < 2:
            raise MigrationError(f"scale-down goes from {n} to {n - 1} shards of {sps} slots; target has "
                                 f"{target.num_shards} of {target.slots_per_shard}")
        t0 = self.clock()
        padded = Placement(torch.cat([target.phy2log, current.phy2log[:, (n - 1) * sps:]], dim=1), n,
                           current.epoch)
        placement, report = self.apply(current, padded)
        shrunk = Placement(target.phy2log, n - 1, placement.epoch + 1)
        self._publish_and_drain(shrunk, report)
        remove_shard(n - 1)
        report.epoch_before, report.epoch_after, report.seconds = current.epoch, shrunk.epoch, self.clock() - t0
        return shrunk, report

    def close(self) -> None:
        self._pool.shutdown(wait=False)


def scale_target(load: torch.Tensor, current: Placement, num_shards: int) -> Placement:
    """A plan for ``num_shards`` shards of ``current``'s slots per shard that keeps many of
    ``current``'s slots in place (shard bins are matched to the current shards).

    ``load [L, E]``. Growing: the new shard is imagined holding the hottest experts, so
    the planner's relabelling keeps the old shards' slots. Shrinking: the plan is matched
    against the first ``num_shards`` shards.
    """
    n, sps = current.num_shards, current.slots_per_shard
    if num_shards > n:
        extra = []
        for _ in range(num_shards - n):
            hot = torch.argsort(torch.as_tensor(load, dtype=torch.float64), dim=1, descending=True)
            idx = torch.arange(sps) % hot.shape[1]
            extra.append(hot[:, idx])
        ref = Placement(torch.cat([current.phy2log, *extra], dim=1), num_shards, current.epoch)
    else:
        ref = Placement(current.phy2log[:, :num_shards * sps], num_shards, current.epoch)
    return plan_placement(load, num_shards, sps, current=ref, epoch=current.epoch)


def reconcile_plan(placement: Placement, held: dict[int, list[tuple[int, int]]], shard: int
                   ) -> tuple[list[tuple[int, int, int]], list[tuple[int, int, int | None]]]:
    """What ``shard`` must load and release to hold exactly its part of ``placement``.

    ``held``: MoE layer -> ``[(slot, expert)]`` the shard reports. Returns
    ``(to_load [(layer, slot, expert)], to_release [(layer, slot, expert)])``.
    """
    want = placement.shard_slots(shard)
    to_load, to_release = [], []
    for layer, pairs in want.items():
        have = set(map(tuple, held.get(layer, [])))
        need = set(pairs)
        to_load += [(layer, s, e) for s, e in sorted(need - have)]
        to_release += [(layer, s, e) for s, e in sorted(have - need)]
    for layer, pairs in held.items():
        if layer not in want:
            to_release += [(layer, s, e) for s, e in pairs]
    return to_load, to_release


def reconcile(shards: ShardControl, placement: Placement, shard_ids: Iterable[int]) -> dict[int, tuple[int, int]]:
    """Bring every shard to its part of ``placement`` (after a restart, a failed release...).

    Loads replace (a restarted shard's slots hold the wrong experts); returns
    shard -> ``(copies loaded, copies released)`` for the shards that changed.
    """
    out = {}
    for shard in shard_ids:
        to_load, to_release = reconcile_plan(placement, shards.held(shard), shard)
        if to_load:
            shards.load(shard, to_load, True)
        if to_release:
            shards.unload(shard, to_release)
        if to_load or to_release:
            out[shard] = (len(to_load), len(to_release))
    return out
