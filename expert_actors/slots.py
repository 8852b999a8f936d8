"""The expert weights one shard holds: physical slots per MoE layer.

A shard owns a set of physical slots per MoE layer; each slot holds one copy of
a logical expert. Weights are stacked per layer (``w13 [S, 2I, D]``,
``w2 [S, D, I]``) so the grouped FFN indexes them without copying.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from cluster.checkpoint import CheckpointReader
from cluster.spec import ModelSpec
from cluster.weight_names import expert_names
from expert_actors.expert_compute import grouped_swiglu


class ExpertSlots:
    """Expert weights of one shard, addressed by global physical slot id."""

    def __init__(self, spec: ModelSpec, dtype: torch.dtype):
        if spec.moe is None:
            raise ValueError("model has no MoE layers; there are no experts to hold")
        self.spec = spec
        self.dtype = dtype
        # per MoE layer index: slot id -> (logical expert, w13 [2I, D], w2 [D, I])
        self._slots: dict[int, dict[int, tuple[int, torch.Tensor, torch.Tensor]]] = {
            i: {} for i in range(spec.num_moe_layers)}
        self._stacked: dict[int, tuple[list[int], torch.Tensor, torch.Tensor]] = {}

    def load(self, reader: CheckpointReader, moe_layer: int, assignments: Iterable[tuple[int, int]]) -> int:
        """Load ``(slot, logical_expert)`` pairs of one MoE layer; returns bytes loaded."""
        spec, moe = self.spec, self.spec.moe
        layer = spec.moe_layers[moe_layer]
        d, inter = spec.hidden_size, moe.intermediate_size
        nbytes = 0
        cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for slot, expert in assignments:
            if not 0 <= expert < moe.num_experts:
                raise ValueError(f"logical expert {expert} out of range [0, {moe.num_experts})")
            if expert not in cache:
                names = expert_names(spec.family, layer, expert)
                g = reader.get(names.gate, (inter, d), self.dtype)
                u = reader.get(names.up, (inter, d), self.dtype)
                w2 = reader.get(names.down, (d, inter), self.dtype).contiguous()
                cache[expert] = (torch.cat([g, u], dim=0).contiguous(), w2)
            w13, w2 = cache[expert]
            self._slots[moe_layer][slot] = (expert, w13, w2)
            nbytes += w13.numel() * w13.element_size() + w2.numel() * w2.element_size()
        self._stacked.pop(moe_layer, None)
        return nbytes

    def unload(self, moe_layer: int, slots: Iterable[int]) -> None:
        for s in slots:
            self._slots[moe_layer].pop(s, None)
        self._stacked.pop(moe_layer, None)

    def slots(self, moe_layer: int) -> dict[int, int]:
        """slot id -> logical expert held, for one MoE layer."""
        return {s: e for s, (e, _, _) in self._slots[moe_layer].items()}

    def nbytes(self) -> int:
        return sum(w13.numel() * w13.element_size() + w2.numel() * w2.element_size()
                   for layer in self._slots.values() for (_, w13, w2) in layer.values())

    def _stack(self, moe_layer: int) -> tuple[dict[int, int], torch.Tensor, torch.Tensor]:
        st = self._stacked.get(moe_layer)
        if st is None:
            ids = sorted(self._slots[moe_layer])
            if not ids:
                raise KeyError(f"shard holds no slots for MoE layer {moe_layer}")
            w13 = torch.stack([self._slots[moe_layer][s][1] for s in ids])
            w2 = torch.stack([self._slots[moe_layer][s][2] for s in ids])
            # keep one copy: the per-slot entries become views into the stacks
            for i, s in enumerate(ids):
                self._slots[moe_layer][s] = (self._slots[moe_layer][s][0], w13[i], w2[i])
            st = ({s: i for i, s in enumerate(ids)}, w13, w2)
            self._stacked[moe_layer] = st
        return st

    def compute(self, moe_layer: int, slot_ids: list[int], counts: list[int], x: torch.Tensor) -> torch.Tensor:
        """Run the grouped FFN for tokens grouped by slot.

        Args:
            slot_ids: ``[S']`` global slot ids present in this batch, ascending.
            counts: ``[S']`` rows of ``x`` per slot.
            x: ``[N, D]`` tokens sorted by slot.
        Returns ``[N, D]``.
        """
        index, w13, w2 = self._stack(moe_layer)
        try:
            local = [index[s] for s in slot_ids]
        except KeyError as e:
            raise KeyError(f"slot {e.args[0]} of MoE layer {moe_layer} is not loaded on this shard") from None
        if x.dtype != self.dtype:
            x = x.to(self.dtype)
        return grouped_swiglu(x, counts, w13, w2, local)
