"""Keeps one router on the published placement.

A daemon thread polls the placement's epoch in Redis (one small read every ``poll_s``).
When it changes, the new placement is read, checked against the model, and handed
to the dispatcher, which adopts it at its next step boundary; the thread then
acknowledges the epoch (``P:replica:{id}``, with a TTL, so the key doubles as a
heartbeat). The migrator waits for those acknowledgements before it releases old
copies. If Redis is unreachable the router keeps its placement and serving goes on;
the failure is logged once and counted.

:meth:`refresh` is the synchronous path a dispatcher takes when a shard says the
router's copy is gone (``NOT_FOUND``): read the newest placement right now.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from moeyard.cluster.control.placement_store import ack_epoch, forget_replica, read_epoch, read_placement
from moeyard.router_service.placement import Placement

log = logging.getLogger("moeyard.placement")


@dataclass
class FollowerStats:
    switches: int = 0
    poll_failures: int = 0
    rejected: int = 0
    last_error: str | None = None


class PlacementFollower:
    def __init__(self, dispatcher, client, prefix: str, replica_id: str, num_layers: int, num_experts: int,
                 *, poll_s: float = 0.1, switch_timeout_s: float = 30.0):
        self.dispatcher = dispatcher
        self.client = client
        self.prefix = prefix
        self.replica_id = replica_id
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.poll_s = poll_s
        self.switch_timeout_s = switch_timeout_s
        self.stats = FollowerStats()
        self._failing = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"placement-follower-{replica_id}", daemon=True)

    def start(self) -> "PlacementFollower":
        self._thread.start()
        return self

    def _usable(self, p: Placement) -> bool:
        try:
            if p.num_layers != self.num_layers:
                raise ValueError(f"{p.num_layers} MoE layers, the model has {self.num_layers}")
            p.validate(self.num_experts)
            return True
        except ValueError as e:
            self.stats.rejected += 1
            log.error("ignoring published placement epoch %d: %s", p.epoch, e)
            return False

    def refresh(self) -> Placement | None:
        """The newest published placement if it differs from the dispatcher's, else ``None``."""
        try:
            stored = read_placement(self.client, self.prefix)
        except Exception as e:
            self._note_failure(e)
            return None
        if stored is None or stored.placement.epoch == self.dispatcher.placement.epoch:
            return None
        return stored.placement if self._usable(stored.placement) else None

    def _note_failure(self, e: Exception) -> None:
        self.stats.poll_failures += 1
        self.stats.last_error = f"{type(e).__name__}: {e}"
        if not self._failing:
            self._failing = True
            log.warning("placement store unreachable (%s); keeping epoch %d until it returns",
                        self.stats.last_error, self.dispatcher.placement.epoch)

    def poll_once(self) -> None:
        epoch = read_epoch(self.client, self.prefix)
        if epoch is not None and epoch != self.dispatcher.placement.epoch:
            new = self.refresh()
            if new is not None:
                if self.dispatcher.switch(new, timeout=self.switch_timeout_s):
                    self.stats.switches += 1
                    log.info("replica %s switched to placement epoch %d", self.replica_id, new.epoch)
        ack_epoch(self.client, self.prefix, self.replica_id, self.dispatcher.placement.epoch)
        if self._failing:
            self._failing = False
            log.info("placement store reachable again")

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll_once()
            except Exception as e:  # Redis down, timeouts: serving goes on with the placement we have
                self._note_failure(e)
            self._stop.wait(self.poll_s)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            forget_replica(self.client, self.prefix, self.replica_id)
        except Exception:
            pass

