"""The expert weights one shard holds: physical slots per MoE layer.

A shard owns a set of physical slots per MoE layer; each slot holds one copy of
a logical expert, or two while a live migration is staged (the new expert is
loaded next to the old one, routers switch epochs, then the old copy is
released).

Storage: per MoE layer, one stacked pair ``w13 [C, 2I, D]``, ``w2 [C, D, I]`` on
the shard's device (:class:`LayerStorage`), with ``C`` = the copies held plus a
few spare rows. A :class:`SlotTable` maps each ``(slot, expert)`` copy to its row,
so the grouped FFN runs over the stack (one grouped GEMM per projection where the
device supports it, else a matmul pair per row). Staging a copy writes one free
row in place and releasing one frees its row: the other rows are never copied
(an earlier design re-stacked the layer on every change, and that memory traffic
slowed the decode steps running during a migration by ~1.7x on the bench model).
Only when the spare rows run out does the layer grow (one re-stack, by half again).

Concurrency: a table is immutable. Loads and unloads (serialised among
themselves by an admin lock) write their rows, build the layer's new table aside
and swap it in with one reference assignment, so a compute never waits for a
load and never sees half a change: it runs on the table it looked up. A row freed
by a swap is handed out again only once no compute that started on an older
table is still running (so a compute never reads a row being rewritten).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from moeyard.model import amx
from moeyard.model.batch_invariant import batch_invariant
from moeyard.model.checkpoint import CheckpointReader
from moeyard.model.cpu_matmul import MatmulMode, Weight, pack, resolve_matmul
from moeyard.model.ffn import gemm_shapes_ok, grouped_gemm_supported, grouped_swiglu, grouped_swiglu_gemm
from moeyard.model.spec import ModelSpec
from moeyard.model.weight_names import expert_names

MAX_COPIES_PER_SLOT = 2
"""A slot holds one expert, or two during a staged migration."""
SPARE_ROWS = 2
"""Free rows a layer's storage keeps beyond the copies it holds: room to stage copies without a re-stack."""

GemmMode = Literal["auto", "grouped", "loop"]


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

    ``keys`` lists every ``(slot, expert)`` copy held (sorted); ``row_of`` maps each to its row of the
    layer's stacked ``w13 [C, 2I, D]`` / ``w2 [C, D, I]`` (shared with the tables before and after:
    never copied). ``held`` maps a slot to its experts in the order they were loaded. ``generation``
    numbers the swaps of the shard's tables (see :class:`ExpertSlots`).
    """

    moe_layer: int
    generation: int = 0
    keys: tuple[tuple[int, int], ...] = ()
    row_of: dict[tuple[int, int], int] = field(default_factory=dict)
    held: dict[int, tuple[int, ...]] = field(default_factory=dict)
    w13: torch.Tensor | list[Weight | None] | None = None
    w2: torch.Tensor | list[Weight | None] | None = None
    copy_bytes: int = 0
    """Bytes of one copy (its ``w13`` and ``w2`` rows)."""

    def nbytes(self) -> int:
        """Bytes of the copies held (the storage's spare rows not counted)."""
        return len(self.keys) * self.copy_bytes

    def rows(self, slot_ids: Sequence[int], experts: Sequence[int]) -> list[int]:
        """Storage rows for ``slot_ids``, slot ``slot_ids[i]`` holding logical expert ``experts[i]``.

        Raises :class:`SlotNotHeld` for a slot that does not hold the expert asked for.
        """
        if len(experts) != len(slot_ids):
            raise ValueError(f"experts has {len(experts)} entries but slot_ids has {len(slot_ids)}")
        out = []
        for s, e in zip(slot_ids, experts):
            row = self.row_of.get((s, e))
            if row is None:
                raise SlotNotHeld(self.moe_layer, s, e, self.held.get(s, ()))
            out.append(row)
        return out


class LayerStorage:
    """One MoE layer's stacked expert weights on one shard and which rows are free.

    ``kernel`` (:func:`~moeyard.model.cpu_matmul.resolve_matmul`'s answer) ``packed`` or ``amx``: each row
    is a pair of weights in that kernel's layout (:func:`~moeyard.model.cpu_matmul.pack`, built per copy)
    in a list instead of a slice of a stacked tensor; a list grows without copying the rows held. Not
    thread-safe: :class:`ExpertSlots` calls it under its admin lock.
    """

    def __init__(self, inter: int, hidden: int, dtype: torch.dtype, device: torch.device, kernel: str = "plain"):
        self.inter, self.hidden, self.dtype, self.device = inter, hidden, dtype, device
        if kernel == "amx" and not (amx.fits(2 * inter, hidden) and amx.fits(hidden, inter)):
            kernel = "packed"  # a copy's two projections run as one kind: the AMX tiles need both to fit
        self.kernel = kernel
        self.packed = kernel != "plain"
        self.w13: torch.Tensor | list[Weight | None] | None = [] if self.packed else None
        self.w2: torch.Tensor | list[Weight | None] | None = [] if self.packed else None
        self.free: list[int] = []
        self.retired: list[tuple[int, int]] = []
        """``(generation, row)``: rows released by the swap to ``generation``, not yet reusable."""

    @property
    def copy_bytes(self) -> int:
        return 3 * self.inter * self.hidden * self.dtype.itemsize

    @property
    def capacity(self) -> int:
        return 0 if self.w13 is None else len(self.w13)

    def nbytes(self) -> int:
        """Bytes the storage holds: every row of the stack, or the packed rows written."""
        if self.packed:
            return sum(w is not None for w in self.w13) * self.copy_bytes
        return self.capacity * self.copy_bytes

    def reserve(self, need: int, spare: int) -> None:
        """Make room for ``need`` new rows (growing by half again plus ``spare`` when short: the one
        re-stack, which copies the rows held into new storage; tables made before keep the old one)."""
        if len(self.free) >= need:
            return
        old = self.capacity
        cap = max(old + need - len(self.free) + spare, old + old // 2)
        if self.packed:  # a list grows in place: tables that share it only ever read their own rows
            self.w13.extend([None] * (cap - old))
            self.w2.extend([None] * (cap - old))
            self.free.extend(range(old, cap))
            return
        w13 = torch.empty(cap, 2 * self.inter, self.hidden, dtype=self.dtype, device=self.device)
        w2 = torch.empty(cap, self.hidden, self.inter, dtype=self.dtype, device=self.device)
        if old:
            w13[:old].copy_(self.w13)
            w2[:old].copy_(self.w2)
        self.w13, self.w2 = w13, w2
        self.free.extend(range(old, cap))

    def take(self) -> int:
        return self.free.pop(0)

    def write(self, row: int, w13: torch.Tensor, w2: torch.Tensor) -> None:
        if self.packed:
            self.w13[row], self.w2[row] = pack(w13, self.kernel, gate_up=True), pack(w2, self.kernel)
            return
        self.w13[row].copy_(w13)
        self.w2[row].copy_(w2)

    def recycle(self, oldest_in_use: int | None) -> None:
        """Rows retired at a generation no running compute predates become free again."""
        keep = []
        for gen, row in self.retired:
            if oldest_in_use is None or oldest_in_use >= gen:
                self.free.append(row)
                if self.packed:  # nothing reads it any more: its memory goes back now
                    self.w13[row] = self.w2[row] = None
            else:
                keep.append((gen, row))
        self.retired = keep
        self.free.sort()


class ExpertSlots:
    """Expert weights of one shard, addressed by global physical slot id (and logical expert).

    Args:
        spec: the model.
        dtype, device: of the weights and the compute.
        spare_rows: free rows per layer beyond the copies held (staging room without a re-stack).
        gemm: ``grouped`` (one grouped GEMM per projection), ``loop`` (a matmul pair per row, with
            the CPU's row buckets), ``auto``: grouped where the device and dtype support it and the
            device is not the CPU (on CPUs torch's grouped GEMM runs the loop's kernels, measured no
            faster, and without the row buckets that keep oneDNN's kernel cache small).
        matmul: the CPU's matmul kernel (:mod:`moeyard.model.cpu_matmul`): ``amx`` keeps each copy in the
            AMX kernel's tile order (a layer's segments then run in one call per projection), ``packed``
            in oneDNN's layout (the loop then runs on those), ``plain`` the stacked tensors, ``auto`` the
            first of these that runs here.
        deterministic: batch-invariant math (:mod:`moeyard.model.batch_invariant`): a token's expert output
            does not depend on the other tokens of its segment (the per-row loop, in calls of fixed rows).
    """

    def __init__(self, spec: ModelSpec, dtype: torch.dtype, device: torch.device | str = "cpu",
                 spare_rows: int = SPARE_ROWS, gemm: GemmMode = "auto", matmul: MatmulMode = "auto",
                 deterministic: bool = False):
        if spec.moe is None:
            raise ValueError("model has no MoE layers; there are no experts to hold")
        if gemm not in ("auto", "grouped", "loop"):
            raise ValueError(f"gemm must be auto, grouped or loop, got {gemm!r}")
        self.spec = spec
        self.dtype = dtype
        self.device = torch.device(device)
        self.spare_rows = spare_rows
        self.gemm = gemm
        self.deterministic = deterministic
        self.matmul = resolve_matmul("plain" if matmul == "auto" and gemm == "grouped" else matmul, dtype,
                                     self.device)
        if self.matmul != "plain" and gemm == "grouped":
            raise ValueError(f"gemm 'grouped' needs the stacked weights; matmul {self.matmul!r} keeps each copy "
                             "apart")
        inter, d = spec.moe.intermediate_size, spec.hidden_size
        self._storage = {i: LayerStorage(inter, d, dtype, self.device, kernel=self.matmul)
                         for i in range(spec.num_moe_layers)}
        self._tables: dict[int, SlotTable] = {i: SlotTable(i) for i in range(spec.num_moe_layers)}
        self._admin_lock = threading.Lock()  # serialises load/unload; compute never takes it
        self._generation = 0
        self._running: Counter[int] = Counter()  # generation of the table -> computes running on it
        self._running_lock = threading.Lock()

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
        """Bytes of the copies held."""
        return sum(t.nbytes() for t in list(self._tables.values()))

    def reserved_bytes(self) -> int:
        """Bytes of the stacked storage, spare rows included (packed: the rows written)."""
        return sum(st.nbytes() for st in self._storage.values())

    def uses_grouped_gemm(self) -> bool:
        """Whether :meth:`compute` runs one grouped GEMM per projection (else the per-row loop)."""
        if self.gemm == "loop" or self.matmul != "plain" or self.deterministic:
            return False
        moe = self.spec.moe
        ok = gemm_shapes_ok(self.spec.hidden_size, moe.intermediate_size, self.dtype) and \
            grouped_gemm_supported(self.device, self.dtype)
        if self.gemm == "grouped":
            if not ok:
                raise ValueError(f"grouped GEMM is not supported for {self.dtype} on {self.device} with "
                                 f"D={self.spec.hidden_size}, I={moe.intermediate_size}")
            return True
        return ok and self.device.type != "cpu"

    # -- changing -----------------------------------------------------------------------
    def _read(self, reader: CheckpointReader, moe_layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        spec, moe = self.spec, self.spec.moe
        d, inter = spec.hidden_size, moe.intermediate_size
        names = expert_names(spec.family, spec.moe_layers[moe_layer], expert)
        g = reader.get(names.gate, (inter, d), self.dtype)
        u = reader.get(names.up, (inter, d), self.dtype)
        w2 = reader.get(names.down, (d, inter), self.dtype)
        return torch.cat([g, u], dim=0), w2

    def _oldest_running(self) -> int | None:
        with self._running_lock:
            return min(self._running) if self._running else None

    def _swap(self, new: Mapping[int, SlotTable]) -> None:
        for layer, table in new.items():
            self._tables[layer] = table  # the swap: computes from now on use the new table

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

        Every tensor is read and every layer's new table is planned before any
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
            # first the checks and the bookkeeping (a refusal changes nothing), then the row writes
            changes: dict[int, tuple[dict, dict, list[tuple[int, int]], list[int]]] = {}
            for layer, pairs in plan.items():
                cur = self._tables[layer]
                row_of = dict(cur.row_of)
                held = {s: list(es) for s, es in cur.held.items()}
                released: list[int] = []
                for slot, expert in pairs:
                    have = held.setdefault(slot, [])
                    if not stage:
                        for e in have:
                            released.append(row_of.pop((slot, e)))
                        have.clear()
                    elif expert not in have and len(have) >= MAX_COPIES_PER_SLOT:
                        raise SlotFull(layer, slot, have, expert)
                    if expert in have:
                        have.remove(expert)
                        released.append(row_of.pop((slot, expert)))
                    have.append(expert)
                    row_of[(slot, expert)] = -1  # a row is given below
                writes = [key for key, row in row_of.items() if row == -1]  # the copies this load adds
                changes[layer] = (row_of, held, writes, [r for r in released if r >= 0])
            self._generation += 1
            gen = self._generation
            oldest = self._oldest_running()
            new: dict[int, SlotTable] = {}
            for layer, (row_of, held, writes, released) in changes.items():
                st = self._storage[layer]
                st.recycle(oldest)
                st.reserve(len(writes), self.spare_rows)
                for key in sorted(writes):  # rows in slot order: a batch's slots then run in row order
                    row = st.take()
                    w13, w2 = cache[(layer, key[1])]
                    st.write(row, w13, w2)
                    row_of[key] = row
                    nbytes += w13.nbytes + w2.nbytes
                st.retired.extend((gen, r) for r in released)
                new[layer] = SlotTable(layer, gen, tuple(sorted(row_of)), row_of,
                                       {s: tuple(es) for s, es in sorted(held.items()) if es}, st.w13, st.w2,
                                       st.copy_bytes)
            self._swap(new)
            self._recycle(new)
        return nbytes

    def _recycle(self, layers: Iterable[int]) -> None:
        """After a swap: rows released by it that no running compute can still read become free (a packed
        copy's memory goes back at once). A compute takes its table and counts itself running under one
        lock, so one that started before the swap holds its rows until it ends."""
        oldest = self._oldest_running()
        for layer in layers:
            self._storage[layer].recycle(oldest)

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
            changes: dict[int, tuple[dict, dict, list]] = {}
            for layer, items in plan.items():
                cur = self._tables[layer]
                row_of = dict(cur.row_of)
                held = {s: list(es) for s, es in cur.held.items()}
                released: list[int] = []
                for slot, expert in items:
                    have = held.get(slot, [])
                    gone = [e for e in have if expert is None or e == expert]
                    if not gone:
                        continue
                    for e in gone:
                        released.append(row_of.pop((slot, e)))
                        have.remove(e)
                    n += 1
                if released:
                    changes[layer] = (row_of, held, released)
            if changes:
                self._generation += 1
                gen = self._generation
                new = {}
                for layer, (row_of, held, released) in changes.items():
                    st = self._storage[layer]
                    st.retired.extend((gen, r) for r in released)
                    new[layer] = SlotTable(layer, gen, tuple(sorted(row_of)), row_of,
                                           {s: tuple(es) for s, es in sorted(held.items()) if es},
                                           st.w13, st.w2, st.copy_bytes)
                self._swap(new)
                self._recycle(new)
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
        Returns ``[N, D]`` on this shard's device. Raises :class:`SlotNotHeld` (a ``KeyError``, see
        :meth:`SlotTable.rows`).
        """
        with self._running_lock:
            table = self._tables[moe_layer] if table is None else table
            self._running[table.generation] += 1
        try:
            rows = table.rows(slot_ids, experts)
            x = x.to(device=self.device, dtype=self.dtype)
            if x.shape[0] == 0:
                return torch.empty(0, x.shape[1], dtype=x.dtype, device=self.device)
            if self.uses_grouped_gemm():
                return grouped_swiglu_gemm(x, counts, table.w13, table.w2, rows)
            with batch_invariant(self.deterministic):
                return grouped_swiglu(x, counts, table.w13, table.w2, rows)
        finally:
            with self._running_lock:
                self._running[table.generation] -= 1
                if not self._running[table.generation]:
                    del self._running[table.generation]
