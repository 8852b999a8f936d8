"""Transport between the router and the expert shards.

The router groups every MoE layer's work by shard and hands one
:class:`ShardBatch` per involved shard to a transport. The in-process transport
here calls :class:`~moeyard.expert_actors.slots.ExpertSlots` directly; the gRPC
transport implements the same interface over the network.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Protocol

import torch

from moeyard.expert_actors.slots import ExpertSlots


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

    ``slot_ids [S']`` ascending global slot ids, ``counts [S']`` (token, expert) rows per slot (``N`` in
    all), ``hidden [U, D]`` the distinct tokens, each once however many of its experts the shard holds,
    ``token_rows [N]`` the row of ``hidden`` of each (token, expert) row in slot order (``None``:
    ``hidden`` is those ``N`` rows), ``experts [S']`` the logical expert the router expects in each
    slot (its placement's ``phy2log``; the shard refuses a slot that holds another one).
    """

    shard: int
    slot_ids: list[int]
    counts: list[int]
    hidden: torch.Tensor
    experts: list[int]
    token_rows: torch.Tensor | None = None

    def __post_init__(self):
        if len(self.experts) != len(self.slot_ids):
            raise ValueError(f"ShardBatch.experts has {len(self.experts)} entries but slot_ids has "
                             f"{len(self.slot_ids)}")

    @property
    def num_rows(self) -> int:
        """``N``: the (token, expert) rows, one output row each."""
        return sum(self.counts)

    def rows(self) -> torch.Tensor:
        """``[N, D]``: the hidden state of each (token, expert) row, in slot order."""
        return self.hidden if self.token_rows is None else self.hidden.index_select(0, self.token_rows)


class LayerOutputs(list):
    """One layer's outputs, one ``[N_i, D]`` per batch in batch order (a list, as every transport
    answers), that are consecutive row ranges of one ``flat [N, D]`` tensor in host memory (pinned where
    the layer's tensors live on an accelerator): the combine copies ``flat`` to the device at once."""

    def __init__(self, flat: torch.Tensor, sizes: Sequence[int]):
        parts, start = [], 0
        for n in sizes:
            parts.append(flat[start:start + n])
            start += n
        super().__init__(parts)
        self.flat = flat


class ExpertTransport(Protocol):
    """The data path to the shards (what the dispatcher uses)."""

    def submit(self, moe_layer: int, batches: Sequence[ShardBatch], epoch: int) -> "Future[list[torch.Tensor]]":
        """Send every batch; the future resolves to one ``[N_i, D]`` output per batch, in order."""
        ...

    def refresh(self, shard: int) -> None:
        """Forget what is known of how to reach ``shard`` (a restarted shard listens on a new port)."""
        ...

    def close(self) -> None: ...


class ShardAdmin(Protocol):
    """The control side of a transport (what a live migration and the reconciler use)."""

    def status(self, shard: int, timeout: float | None = None) -> dict:
        """What the shard holds and its counters, in the shape of ``ExpertServer.status``."""
        ...

    def load_slots(self, shard: int, assignments: Iterable[tuple[int, int, int]], timeout: float | None = None,
                   stage: bool = False) -> int:
        """Load ``(moe_layer, slot, expert)`` copies (``stage``: next to the slot's current one)."""
        ...

    def unload_slots(self, shard: int, refs: Iterable[tuple[int, int] | tuple[int, int, int | None]],
                     timeout: float | None = None) -> int:
        """Release ``(moe_layer, slot[, expert])`` copies."""
        ...


class InProcessTransport:
    """Calls shards living in this process; completes synchronously."""

    def __init__(self, shards: Mapping[int, ExpertSlots]):
        self.shards = dict(shards)

    def submit(self, moe_layer: int, batches: Sequence[ShardBatch], epoch: int) -> "Future[list[torch.Tensor]]":
        fut: Future[list[torch.Tensor]] = Future()
        try:
            fut.set_result([self.shards[b.shard].compute(moe_layer, b.slot_ids, b.counts, b.rows(),
                                                          b.experts)
                            for b in batches])
        except Exception as e:  # surfaced to the caller through the future
            fut.set_exception(e)
        return fut

    def refresh(self, shard: int) -> None:
        """Shards in this process never move."""

    def close(self) -> None:
        pass
