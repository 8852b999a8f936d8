"""The router of one attention replica: gate, capacity limit, dispatch and combine per MoE layer."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from moeyard.router_service.dispatch import ExpertDispatcher, PendingExperts
from moeyard.router_service.gate import (
    GateConfig,
    expert_capacity,
    expert_scores,
    limit_capacity,
    router_logits,
    select_experts,
)


@dataclass
class GateParams:
    """Router weights of one MoE layer: ``weight [E, D]``, ``correction_bias [E]``."""

    weight: torch.Tensor
    correction_bias: torch.Tensor | None = None


@dataclass(frozen=True)
class OverflowCounts:
    """Assignments past their expert's capacity since the router started, per MoE layer."""

    dropped: tuple[int, ...]
    rerouted: tuple[int, ...]


class MoERouter:
    """Gates tokens and runs their routed experts through the dispatcher.

    With a capacity factor the limit counts over a whole engine step: the engine calls
    :meth:`begin_step` with the step's token count, and the micro-batches of the step, gated one after
    another within each layer, share each expert's ``ceil(factor * T * A / E)`` places in token order, so
    splitting a step (overlap) changes nothing. Without :meth:`begin_step` each call is its own step.
    """

    def __init__(self, gate_cfg: GateConfig, gates: list[GateParams], dispatcher: ExpertDispatcher):
        self.gate_cfg = gate_cfg
        self.gates = gates
        self.dispatcher = dispatcher
        self._step_tokens: int | None = None
        self._used: dict[int, torch.Tensor] = {}
        self._lock = threading.Lock()
        self._dropped = [0] * len(gates)
        self._rerouted = [0] * len(gates)

    def begin_step(self, num_tokens: int) -> None:
        """A new engine step of ``num_tokens`` tokens (every micro-batch together) starts."""
        self._step_tokens = num_tokens
        self._used = {}

    def overflow_counts(self) -> OverflowCounts:
        """Cumulative dropped and rerouted assignments per MoE layer."""
        with self._lock:
            return OverflowCounts(tuple(self._dropped), tuple(self._rerouted))

    def route(self, moe_layer: int, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``hidden [T, D]`` -> ``(weights [T, A], ids [T, A])``; with a capacity factor, ``-1`` ids are
        assignments dropped past their expert's capacity (weight 0)."""
        cfg, g = self.gate_cfg, self.gates[moe_layer]
        logits = router_logits(hidden, g.weight, cfg)
        weights, ids = select_experts(logits, cfg, g.correction_bias)
        if cfg.capacity_factor is None or hidden.shape[0] == 0:
            return weights, ids
        tokens = self._step_tokens if self._step_tokens is not None else hidden.shape[0]
        cap = expert_capacity(max(tokens, hidden.shape[0]), cfg.top_k, cfg.num_experts, cfg.capacity_factor)
        scores = expert_scores(logits, cfg) if cfg.overflow == "reroute" else None
        res = limit_capacity(weights, ids, cfg.num_experts, cap, self._used.get(moe_layer), cfg.overflow, scores)
        if self._step_tokens is not None:
            self._used[moe_layer] = res.load
        if res.overflowed:
            with self._lock:
                self._dropped[moe_layer] += res.dropped
                self._rerouted[moe_layer] += res.rerouted
        return res.weights, res.ids

    def submit(self, moe_layer: int, hidden: torch.Tensor) -> PendingExperts:
        """Gate and send ``hidden [T, D]`` to the shards; returns without waiting."""
        weights, ids = self.route(moe_layer, hidden)
        dropped = self.gate_cfg.capacity_factor is not None and bool((ids < 0).any())
        return self.dispatcher.submit(moe_layer, hidden, weights, ids, has_dropped=dropped)

    def finish(self, pending: PendingExperts) -> torch.Tensor:
        """Routed-expert output ``[T, D]`` of a submitted layer."""
        return self.dispatcher.finish(pending)

    def __call__(self, moe_layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """Routed-expert output ``[T, D]`` for ``hidden [T, D]``."""
        return self.finish(self.submit(moe_layer, hidden))
