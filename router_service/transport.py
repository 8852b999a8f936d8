"""Transport between the router and the expert shards.

The router groups every MoE layer's work by shard and hands one
:class:`ShardBatch` per involved shard to a transport. The in-process transport
here calls :class:`~expert_actors.slots.ExpertSlots` directly; the gRPC
transport implements the same interface over the network.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
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


class StalePlacement(ShardUnavailable):
    """The shard answered NOT_FOUND for a slot/expert: it does not hold the expert the router expects there.

    Either the router's placement is stale (a migration moved the expert and
    this router has not switched epochs) or the shard lost slots (a restarted
    actor reloads only the slots it was created with). ``.message`` is the
    shard's own (naming MoE layer, slot, expected and held experts, epoch).
    A :class:`ShardUnavailable`, so callers that re-plan around a failed shard
    keep working; one that knows the placement can refresh it instead.
    """

    def __init__(self, shard: int, message: str = ""):
        RuntimeError.__init__(self, f"expert shard {shard} does not hold the expected expert (stale placement)"
                              + (f": {message}" if message else ""))
        self.shard = shard
        self.message = message


@dataclass(frozen=True)
class ShardBatch:
    """Tokens for one shard in one MoE layer, grouped by slot.

    ``slot_ids [S']`` ascending global slot ids, ``counts [S']`` rows per slot,
    ``hidden [N, D]`` rows sorted by slot, ``experts [S']`` the logical expert
    the router expects in each slot (its placement's ``phy2log``; the shard
    refuses a slot that holds another one). An empty ``experts`` is the legacy
    form: each slot's only copy answers.
    """

    shard: int
    slot_ids: list[int]
    counts: list[int]
    hidden: torch.Tensor
    experts: list[int] = field(default_factory=list)

    def __post_init__(self):
        if self.experts and len(self.experts) != len(self.slot_ids):
            raise ValueError(f"ShardBatch.experts has {len(self.experts)} entries but slot_ids has "
                             f"{len(self.slot_ids)}")


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
            fut.set_result([self.shards[b.shard].compute(moe_layer, b.slot_ids, b.counts, b.hidden,
                                                          b.experts or None)
                            for b in batches])
        except Exception as e:  # surfaced to the caller through the future
            fut.set_exception(e)
        return fut

    def close(self) -> None:
        pass
