"""The expert weights one shard holds: physical slots per MoE layer.

A shard owns a set of physical slots per MoE layer; each slot holds one copy of
a logical expert, or two while a live migration is staged (the new expert is
loaded next to the old one, routers switch epochs, then the old copy is
released). Per MoE layer a :class:`SlotTable` maps ``(slot, expert)`` to one
row of its weight lists (``w13[i] [2I, D]``, ``w2[i] [D, I]``), which the
grouped FFN indexes per slot. Each copy keeps its own storage: staging a copy
or releasing one never copies the layer's other experts (an earlier design
re-stacked the layer on every change, and that memory traffic slowed the decode
steps running during a migration by ~1.7x on the bench model).

Concurrency: a table is immutable. Loads and unloads (serialised among
themselves by an admin lock) build the layer's new table aside and swap it in
with one reference assignment, so a compute never waits for a load and never
sees half a change: it runs on the table it looked up. A released copy is
freed once the last compute using an older table returns.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from moeyard.model.checkpoint import CheckpointReader
from moeyard.model.ffn import grouped_swiglu
from moeyard.model.spec import ModelSpec
from moeyard.model.weight_names import expert_names

MAX_COPIES_PER_SLOT = 2
"""A slot holds one expert, or two during a staged migration."""


class SlotNotHeld(KeyError):
    """A slot does not hold the expert asked for (or nothing at all).

    ``held`` lists the experts the slot holds (empty: the slot is not loaded).
    """

    def __init__(self, moe_layer: int, slot: int, expert: int, held: Sequence[int]):
        self.moe_layer, self.slot, self.expert, self.held = moe_layer, slot, expert, list(held)
        if not self.held:
            msg = f"slot {slot} of MoE layer {moe_layer} is not loaded on this shard"
        else:
            msg = f"slot {slot} of MoE layer {moe_layer} holds expert(s) {self.held}, not {expert}"
        super().__init__(msg)

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])

    def __reduce__(self):
        return (type(self), (self.moe_layer, self.slot, self.expert, self.held))


class SlotFull(ValueError):
    """A staged load would put more than :data:`MAX_COPIES_PER_SLOT` experts into one slot."""

    def __init__(self, moe_layer: int, slot: int, held: Sequence[int], expert: int):
        self.moe_layer, self.slot, self.held, self.expert = moe_layer, slot, list(held), expert
        super().__init__(f"slot {slot} of MoE layer {moe_layer} already holds experts {self.held}; unload one "
                         f"before staging expert {expert}")

    def __reduce__(self):
        return (type(self), (self.moe_layer, self.slot, self.held, self.expert))


@dataclass(frozen=True, eq=False)
class SlotTable:
    """What one MoE layer of a shard holds, as one immutable snapshot.

    ``keys[i] = (slot, expert)`` uses row ``i`` of ``w13`` (``[2I, D]`` each)
    and ``w2`` (``[D, I]`` each); ``entries`` maps each key to its row and its
    weights (shared with the tables before and after: never copied). ``held``
    maps a slot to its experts in the order they were loaded.
    """

    moe_layer: int
    keys: tuple[tuple[int, int], ...] = ()
    w13: tuple[torch.Tensor, ...] | None = None
    w2: tuple[torch.Tensor, ...] | None = None
    entries: dict[tuple[int, int], tuple[int, torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    held: dict[int, tuple[int, ...]] = field(default_factory=dict)

    @staticmethod
    def build(moe_layer: int, weights: Mapping[tuple[int, int], tuple[torch.Tensor, torch.Tensor]],
              held: Mapping[int, Sequence[int]]) -> "SlotTable":
        """A table over ``(slot, expert) -> (w13 [2I, D], w2 [D, I])`` (the tensors are shared, not copied)."""
        keys = tuple(sorted(weights))
        if not keys:
            return SlotTable(moe_layer)
        w13 = tuple(weights[k][0] for k in keys)
        w2 = tuple(weights[k][1] for k in keys)
        entries = {k: (i, w13[i], w2[i]) for i, k in enumerate(keys)}
        return SlotTable(moe_layer, keys, w13, w2, entries,
                         {s: tuple(es) for s, es in sorted(held.items()) if es})

    def weights(self) -> dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]:
        """``(slot, expert) -> (w13, w2)`` views (to build the next table from)."""
        return {k: (w13, w2) for k, (_, w13, w2) in self.entries.items()}

    def nbytes(self) -> int:
        if self.w13 is None:
            return 0
        return sum(t.numel() * t.element_size() for t in (*self.w13, *self.w2))

    def rows(self, slot_ids: Sequence[int], experts: Sequence[int]) -> list[int]:
        """Stack rows for ``slot_ids``, slot ``slot_ids[i]`` holding logical expert ``experts[i]``.

        Raises :class:`SlotNotHeld` for a slot that does not hold the expert asked for.
        """
        if len(experts) != len(slot_ids):
            raise ValueError(f"experts has {len(experts)} entries but slot_ids has {len(slot_ids)}")
        out = []
        for s, e in zip(slot_ids, experts):
            entry = self.entries.get((s, e))
            if entry is None:
                raise SlotNotHeld(self.moe_layer, s, e, self.held.get(s, ()))
            out.append(entry[0])
        return out


class ExpertSlots:
    """Expert weights of one shard, addressed by global physical slot id (and logical expert)."""

    def __init__(self, spec: ModelSpec, dtype: torch.dtype, device: torch.device | str = "cpu"):
        if spec.moe is None:
            raise ValueError("model has no MoE layers; there are no experts to hold")
        self.spec = spec
        self.dtype = dtype
        self.device = torch.device(device)
        self._tables: dict[int, SlotTable] = {i: SlotTable(i) for i in range(spec.num_moe_layers)}
        self._admin_lock = threading.Lock()  # serialises load/unload; compute never takes it

    # -- reading ----------------------------------------------------------------------
    def table(self, moe_layer: int) -> SlotTable:
        """The current snapshot of one MoE layer (immutable; a later load swaps in a new one)."""
        return self._tables[moe_layer]

    def slots(self, moe_layer: int) -> dict[int, int]:
        """slot id -> logical expert held, for one MoE layer.

        A slot holding two copies (a staged migration) maps to the copy loaded
        last; :meth:`pairs` lists every copy.
        """
        return {s: es[-1] for s, es in self._tables[moe_layer].held.items()}

    def pairs(self, moe_layer: int) -> list[tuple[int, int]]:
        """Every ``(slot, logical expert)`` copy held in one MoE layer, sorted (a slot may appear twice)."""
        return list(self._tables[moe_layer].keys)

    def nbytes(self) -> int:
        return sum(t.nbytes() for t in list(self._tables.values()))

    # -- changing -----------------------------------------------------------------------
    def _read(self, reader: CheckpointReader, moe_layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        spec, moe = self.spec, self.spec.moe
        d, inter = spec.hidden_size, moe.intermediate_size
        names = expert_names(spec.family, spec.moe_layers[moe_layer], expert)
        g = reader.get(names.gate, (inter, d), self.dtype)
        u = reader.get(names.up, (inter, d), self.dtype)
        w2 = reader.get(names.down, (d, inter), self.dtype)
        return torch.cat([g, u], dim=0).to(self.device), w2.contiguous().to(self.device)

    def load(self, reader: CheckpointReader, moe_layer: int, assignments: Iterable[tuple[int, int]],
             stage: bool = False) -> int:
        """Load ``(slot, logical_expert)`` pairs of one MoE layer; returns bytes loaded.

        ``stage=False`` replaces whatever a slot held; ``stage=True`` adds the
        copy next to it (see :meth:`load_layers`).
        """
        return self.load_layers(reader, {moe_layer: assignments}, stage)

    def load_layers(self, reader: CheckpointReader, assignments: Mapping[int, Iterable[tuple[int, int]]],
                    stage: bool = False) -> int:
        """Load ``{moe_layer: [(slot, expert)]}``; returns bytes loaded. All-or-nothing.

        Every tensor is read and every layer's new table is built before any
        layer changes; each layer's table is then swapped in with one
        assignment. Pairs apply in order: without ``stage`` a pair replaces
        everything its slot held; with ``stage`` it adds a copy next to what the
        slot holds (reloading a copy the slot already holds replaces it) and
        :class:`SlotFull` refuses a third expert in one slot.
        """
        moe = self.spec.moe
        plan = {int(layer): [(int(s), int(e)) for s, e in pairs] for layer, pairs in assignments.items()}
        cache: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        for layer, pairs in plan.items():
            if not 0 <= layer < self.spec.num_moe_layers:
                raise ValueError(f"moe_layer {layer} out of range [0, {self.spec.num_moe_layers})")
            for _, expert in pairs:
                if not 0 <= expert < moe.num_experts:
                    raise ValueError(f"logical expert {expert} out of range [0, {moe.num_experts})")
        for layer, pairs in plan.items():  # checkpoint reads outside every lock
            for _, expert in pairs:
                if (layer, expert) not in cache:
                    cache[(layer, expert)] = self._read(reader, layer, expert)
        nbytes = 0
        with self._admin_lock:
            new: dict[int, SlotTable] = {}
            for layer, pairs in plan.items():
                cur = self._tables[layer]
                weights = cur.weights()
                held = {s: list(es) for s, es in cur.held.items()}
                for slot, expert in pairs:
                    have = held.setdefault(slot, [])
                    if not stage:
                        for e in have:
                            weights.pop((slot, e), None)
                        have.clear()
                    elif expert not in have and len(have) >= MAX_COPIES_PER_SLOT:
                        raise SlotFull(layer, slot, have, expert)
                    if expert in have:
                        have.remove(expert)
                    have.append(expert)
                    w13, w2 = cache[(layer, expert)]
                    weights[(slot, expert)] = (w13, w2)
                    nbytes += w13.numel() * w13.element_size() + w2.numel() * w2.element_size()
                new[layer] = SlotTable.build(layer, weights, held)
            for layer, table in new.items():
                self._tables[layer] = table  # the swap: computes from now on use the new table
        return nbytes

    def unload(self, moe_layer: int, slots: Iterable[int | tuple[int, int | None]]) -> int:
        """Release slots of one MoE layer; returns how many refs released a copy.

        Each entry is a slot id (release everything it holds) or ``(slot,
        expert)`` (release only that expert's copy; ``expert=None``: the whole
        slot). Copies not held are ignored.
        """
        return self.unload_layers({moe_layer: slots})

    def unload_layers(self, refs: Mapping[int, Iterable[int | tuple[int, int | None]]]) -> int:
        """:meth:`unload` over several MoE layers, each swapped in once."""
        plan: dict[int, list[tuple[int, int | None]]] = {}
        for layer, items in refs.items():
            lst = plan.setdefault(int(layer), [])
            for r in items:
                if isinstance(r, tuple):
                    lst.append((int(r[0]), None if r[1] is None else int(r[1])))
                else:
                    lst.append((int(r), None))
        n = 0
        with self._admin_lock:
            new: dict[int, SlotTable] = {}
            for layer, items in plan.items():
                cur = self._tables[layer]
                weights = cur.weights()
                held = {s: list(es) for s, es in cur.held.items()}
                changed = False
                for slot, expert in items:
                    have = held.get(slot, [])
                    gone = [e for e in have if expert is None or e == expert]
                    if not gone:
                        continue
                    for e in gone:
                        weights.pop((slot, e))
                        have.remove(e)
                    n += 1
                    changed = True
                if changed:
                    new[layer] = SlotTable.build(layer, weights, held)
            for layer, table in new.items():
                self._tables[layer] = table
        return n

    # -- computing ----------------------------------------------------------------------
    def compute(self, moe_layer: int, slot_ids: list[int], counts: list[int], x: torch.Tensor,
                experts: Sequence[int], *, table: SlotTable | None = None) -> torch.Tensor:
        """Run the grouped FFN for tokens grouped by slot.

        Args:
            slot_ids: ``[S']`` global slot ids present in this batch, ascending.
            counts: ``[S']`` rows of ``x`` per slot.
            x: ``[N, D]`` tokens sorted by slot.
            experts: ``[S']`` the logical expert expected in each slot.
            table: the snapshot to use (default: the current one).
        Returns ``[N, D]``. Raises :class:`SlotNotHeld` (a ``KeyError``, see
        :meth:`SlotTable.rows`).
        """
        table = self._tables[moe_layer] if table is None else table
        local = table.rows(slot_ids, experts)
        x = x.to(device=self.device, dtype=self.dtype)
        if x.shape[0] == 0:
            return torch.empty(0, x.shape[1], dtype=x.dtype, device=self.device)
        return grouped_swiglu(x, counts, table.w13, table.w2, local)
