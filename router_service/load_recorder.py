"""Expert load counters of one attention replica.

The router calls :meth:`LoadRecorder.record` once per MoE layer with the gate's
choice ``ids [T, A]`` (logical experts) and the dispatcher's ``slots [T, A]``
(physical slots, ``DispatchPlan.slots``). The counts accumulate in
``expert_counts [L, E]`` and ``slot_counts [L, P]`` (int64) with tensor ops
only; a reporter thread (``cluster/load_store.LoadFlusher``) calls
:meth:`LoadRecorder.take` to get and reset them. Whoever switches to a
placement with another slot count calls :meth:`LoadRecorder.resize_slots`
before the first layer runs on it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch


@dataclass
class LoadSnapshot:
    """Counts recorded between two :meth:`LoadRecorder.take` calls (CPU tensors)."""

    expert_counts: torch.Tensor
    """``[L, E]`` int64: assignments per logical expert."""
    slot_counts: torch.Tensor
    """``[L, P]`` int64: assignments per physical slot (``P`` of the placement in force)."""
    tokens: int
    """Token rows recorded, summed over MoE layers (a token that went through all ``L``
    MoE layers counts ``L`` times); ``expert_counts.sum() == tokens * A``."""

    @property
    def num_slots(self) -> int:
        return self.slot_counts.shape[1]


class LoadRecorder:
    """Thread-safe per-layer expert and slot counters.

    Args:
        num_layers: ``L`` MoE layers.
        num_experts: ``E`` logical experts per layer.
        num_slots: ``P`` physical slots of the current placement.
        device: where the counters live; on an accelerator the counting does
            not synchronise with the host (``index_add_``), only :meth:`take` does.
    """

    def __init__(self, num_layers: int, num_experts: int, num_slots: int,
                 device: torch.device | str = "cpu"):
        if num_layers < 1 or num_experts < 1 or num_slots < 1:
            raise ValueError(f"need L, E, P >= 1, got L={num_layers} E={num_experts} P={num_slots}")
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.device = torch.device(device)
        self._lock = threading.Lock()
        self._num_slots = num_slots
        self._expert = self._zeros(num_experts)
        self._slot = self._zeros(num_slots)
        self._tokens = 0

    @property
    def num_slots(self) -> int:
        return self._num_slots

    def _zeros(self, n: int) -> torch.Tensor:
        return torch.zeros(self.num_layers, n, dtype=torch.int64, device=self.device)

    def _counts(self, flat: torch.Tensor, n: int, what: str) -> torch.Tensor:
        """``[N]`` indices -> ``[n]`` int64 counts; raises on an index outside ``[0, n)``."""
        flat = flat.to(device=self.device, dtype=torch.int64)
        if self.device.type == "cpu":
            counts = torch.bincount(flat, minlength=n)  # raises on negative ids
            if counts.numel() > n:
                raise ValueError(f"{what} id {int(flat.max())} out of range [0, {n})")
            return counts
        counts = torch.zeros(n, dtype=torch.int64, device=self.device)
        return counts.index_add_(0, flat, torch.ones_like(flat))

    def record(self, moe_layer: int, ids: torch.Tensor, slots: torch.Tensor | None = None,
               sent: torch.Tensor | None = None) -> None:
        """Count the assignments of one MoE layer.

        Args:
            moe_layer: index in ``[0, L)``.
            ids: ``[T, A]`` logical experts chosen by the gate.
            slots: ``[T, A]`` physical slots they were sent to (``None``: experts only).
            sent: ``[T, A]`` bool: only these assignments count (the capacity limit dropped the others);
                ``None``: all. ``T`` tokens count either way.
        """
        if not 0 <= moe_layer < self.num_layers:
            raise IndexError(f"MoE layer {moe_layer} out of range [0, {self.num_layers})")
        if ids.dim() != 2:
            raise ValueError(f"ids must be [T, A], got shape {list(ids.shape)}")
        if slots is not None and slots.shape != ids.shape:
            raise ValueError(f"slots {list(slots.shape)} and ids {list(ids.shape)} differ in shape")
        if ids.shape[0] == 0:
            return
        tokens = ids.shape[0]
        if sent is not None:
            ids = ids[sent]
            slots = None if slots is None else slots[sent]
        e = self._counts(ids.reshape(-1), self.num_experts, "expert")
        with self._lock:  # P is read under the lock: resize_slots may run on another thread
            s = None if slots is None else self._counts(slots.reshape(-1), self._num_slots, "slot")
            self._expert[moe_layer] += e
            if s is not None:
                self._slot[moe_layer] += s
            self._tokens += tokens

    def take(self) -> LoadSnapshot:
        """Counts since the last ``take`` (then reset to zero)."""
        fresh_e = self._zeros(self.num_experts)
        with self._lock:
            fresh_s = self._zeros(self._num_slots)
            expert, slot, tokens = self._expert, self._slot, self._tokens
            self._expert, self._slot, self._tokens = fresh_e, fresh_s, 0
        return LoadSnapshot(expert.cpu(), slot.cpu(), tokens)

    def resize_slots(self, num_slots: int) -> None:
        """Switch to a placement with ``num_slots`` slots.

        Slot counts not yet taken are dropped (they belong to the old slot
        numbering); expert counts are kept.
        """
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        fresh = self._zeros(num_slots)
        with self._lock:
            self._num_slots = num_slots
            self._slot = fresh
