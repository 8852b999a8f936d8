"""Transport between the router and the expert shards.

The router groups every MoE layer's work by shard and hands one
:class:`ShardBatch` per involved shard to a transport. The in-process transport
here calls :class:`~expert_actors.slots.ExpertSlots` directly; the gRPC
transport implements the same interface over the network.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Protocol

import torch

from expert_actors.slots import ExpertSlots


class ShardUnavailable(RuntimeError):
    """A shard did not answer (down, restarting, unreachable, or too slow); ``.shard`` names it.

    The caller may ``refresh`` the transport's view of that shard (a restarted
    actor listens on a new port) and retry the step.
    """

    def __init__(self, shard: int, message: str = ""):
        super().__init__(f"expert shard {shard} unavailable" + (f": {message}" if message else ""))
        self.shard = shard
        self.message = message

    def __reduce__(self):  # keep (shard, message) through pickling (Ray, multiprocessing)
        return (type(self), (self.shard, self.message))


@dataclass(frozen=True)
class ShardBatch:
    """Tokens for one shard in one MoE layer, grouped by slot.

    ``slot_ids [S']`` ascending global slot ids, ``counts [S']`` rows per slot,
    ``hidden [N, D]`` rows sorted by slot.
    """

    shard: int
    slot_ids: list[int]
    counts: list[int]
    hidden: torch.Tensor


class ExpertTransport(Protocol):
    def submit(self, moe_layer: int, batches: Sequence[ShardBatch], epoch: int) -> "Future[list[torch.Tensor]]":
        """Send every batch; the future resolves to one ``[N_i, D]`` output per batch, in order."""
        ...

    def close(self) -> None: ...


class InProcessTransport:
    """Calls shards living in this process; completes synchronously."""

    def __init__(self, shards: Mapping[int, ExpertSlots]):
        self.shards = dict(shards)

    def submit(self, moe_layer: int, batches: Sequence[ShardBatch], epoch: int) -> "Future[list[torch.Tensor]]":
        fut: Future[list[torch.Tensor]] = Future()
        try:
            fut.set_result([self.shards[b.shard].compute(moe_layer, b.slot_ids, b.counts, b.hidden)
                            for b in batches])
        except Exception as e:  # surfaced to the caller through the future
            fut.set_exception(e)
        return fut

    def close(self) -> None:
        pass
