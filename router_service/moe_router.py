"""The router of one attention replica: gate, dispatch and combine per MoE layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeyard.router_service.dispatch import ExpertDispatcher, PendingExperts
from moeyard.router_service.gate import GateConfig, gate


@dataclass
class GateParams:
    """Router weights of one MoE layer: ``weight [E, D]``, ``correction_bias [E]``."""

    weight: torch.Tensor
    correction_bias: torch.Tensor | None = None


class MoERouter:
    """Gates tokens and runs their routed experts through the dispatcher."""

    def __init__(self, gate_cfg: GateConfig, gates: list[GateParams], dispatcher: ExpertDispatcher):
        self.gate_cfg = gate_cfg
        self.gates = gates
        self.dispatcher = dispatcher

    def route(self, moe_layer: int, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``hidden [T, D]`` -> ``(weights [T, A], ids [T, A])``."""
        g = self.gates[moe_layer]
        return gate(hidden, g.weight, self.gate_cfg, g.correction_bias)

    def submit(self, moe_layer: int, hidden: torch.Tensor) -> PendingExperts:
        """Gate and send ``hidden [T, D]`` to the shards; returns without waiting."""
        weights, ids = self.route(moe_layer, hidden)
        return self.dispatcher.submit(moe_layer, hidden, weights, ids)

    def finish(self, pending: PendingExperts) -> torch.Tensor:
        """Routed-expert output ``[T, D]`` of a submitted layer."""
        return self.dispatcher.finish(pending)

    def __call__(self, moe_layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """Routed-expert output ``[T, D]`` for ``hidden [T, D]``."""
        return self.finish(self.submit(moe_layer, hidden))
