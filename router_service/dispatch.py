"""Dispatch and combine: the router's data path for one MoE layer.

gate -> map every ``(token, expert)`` to a physical slot -> group by shard ->
transport -> combine in a fixed order. The combine sums the ``A`` expert
outputs of a token in rank order, so the result does not depend on which copy
answered or in which order the shards replied.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass

import torch

from router_service.placement import Placement
from router_service.transport import ExpertTransport, ShardBatch


@dataclass
class DispatchPlan:
    """Where each assignment went. ``order [T*A]`` sorts flat assignments by slot."""

    num_tokens: int
    top_k: int
    order: torch.Tensor
    slots: torch.Tensor
    """``[T, A]`` chosen slots."""


def plan_dispatch(hidden: torch.Tensor, ids: torch.Tensor, placement: Placement,
                  moe_layer: int) -> tuple[DispatchPlan, list[ShardBatch]]:
    """Group the assignments of one MoE layer by shard.

    Args:
        hidden: ``[T, D]`` tokens after the post-attention norm.
        ids: ``[T, A]`` logical experts chosen by the gate.
    Returns the plan (to combine later) and one batch per involved shard.
    """
    t, a = ids.shape
    slots = placement.choose_slots(moe_layer, ids)
    flat = slots.reshape(-1)
    order = torch.argsort(flat, stable=True)
    sorted_slots = flat[order]
    x = hidden[order // a]
    uniq, counts = torch.unique_consecutive(sorted_slots, return_counts=True)
    uniq_l, counts_l = uniq.tolist(), counts.tolist()
    sps = placement.slots_per_shard
    batches: list[ShardBatch] = []
    start = i = 0
    while i < len(uniq_l):
        shard = uniq_l[i] // sps
        j = i
        n = 0
        while j < len(uniq_l) and uniq_l[j] // sps == shard:
            n += counts_l[j]
            j += 1
        batches.append(ShardBatch(shard, uniq_l[i:j], counts_l[i:j], x[start:start + n]))
        start += n
        i = j
    return DispatchPlan(t, a, order, slots), batches


def combine(plan: DispatchPlan, outputs: list[torch.Tensor], weights: torch.Tensor,
            dtype: torch.dtype) -> torch.Tensor:
    """Weighted sum of expert outputs per token.

    Args:
        outputs: one ``[N_i, D]`` per shard batch, in batch order (sorted by slot).
        weights: ``[T, A]`` gate weights.
    Returns ``[T, D]`` in ``dtype``.
    """
    y_sorted = torch.cat(outputs, dim=0) if len(outputs) > 1 else outputs[0]
    y = torch.empty_like(y_sorted)
    y[plan.order] = y_sorted
    y = y.view(plan.num_tokens, plan.top_k, -1)
    w = weights.to(y.dtype).unsqueeze(-1)
    out = y[:, 0] * w[:, 0]
    for k in range(1, plan.top_k):
        out = out + y[:, k] * w[:, k]
    return out.to(dtype)


class ExpertDispatcher:
    """Runs the routed experts of every MoE layer through a transport."""

    def __init__(self, placement: Placement, transport: ExpertTransport):
        self.placement = placement
        self.transport = transport

    def submit(self, moe_layer: int, hidden: torch.Tensor, ids: torch.Tensor
               ) -> tuple[DispatchPlan, "Future[list[torch.Tensor]]"]:
        placement = self.placement  # one epoch for the whole layer
        plan, batches = plan_dispatch(hidden, ids, placement, moe_layer)
        return plan, self.transport.submit(moe_layer, batches, placement.epoch)

    def __call__(self, moe_layer: int, hidden: torch.Tensor, weights: torch.Tensor,
                 ids: torch.Tensor) -> torch.Tensor:
        """``hidden [T, D]``, ``weights/ids [T, A]`` -> ``[T, D]`` routed-expert output."""
        if hidden.shape[0] == 0:
            return torch.zeros_like(hidden)
        plan, fut = self.submit(moe_layer, hidden, ids)
        return combine(plan, fut.result(), weights, hidden.dtype)
