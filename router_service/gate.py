"""The MoE gate: router logits -> top-k expert choice -> optional capacity limit.

Pure functions on tensors, no module state. Shapes: ``T`` tokens, ``D`` hidden
size, ``E`` routed experts, ``A`` experts chosen per token (top-k).

The routing reproduces transformers 5.23 for each supported family, bit for
bit on the same device when given the same inputs:

* mixtral: softmax over fp32 logits, top-k, always renormalised
  (``norm_topk_prob=True`` in :class:`moeyard.model.spec.MoESpec`).
* qwen2_moe / qwen3_moe / olmoe: softmax (fp32), top-k, renormalised iff
  ``norm_topk_prob``.
* deepseek_v2: fp32 logits, softmax, ``greedy`` or ``group_limited_greedy``
  (groups scored by their max, losers masked with ``0.0``), times
  ``routed_scaling_factor``. transformers 5.23 never renormalises here, whatever
  ``norm_topk_prob`` says; :meth:`GateConfig.from_spec` with
  ``family="deepseek_v2"`` mirrors that.
* deepseek_v3 (``noaux_tc``): fp32 logits, sigmoid scores; the correction bias
  is added only to choose; groups are scored by the sum of their top-2 biased
  scores, ``topk_group`` groups kept (others masked with ``-inf``), top-k among
  them; weights are the unbiased scores at the chosen ids, renormalised iff
  ``norm_topk_prob`` (denominator ``+ 1e-20``), times ``routed_scaling_factor``.

Order of the ``A`` ids of a token: the order ``torch.topk`` returns in
transformers. For ``greedy`` that is descending score (``sorted=True``, as the
Mixtral/Qwen/OLMoE routers). The DeepSeek routers call
``torch.topk(..., sorted=False)``, whose order is unspecified by PyTorch
(device dependent); we make the same call on a bitwise-identical tensor, so the
ids come out in the same order as transformers on the same device.
``GateConfig.topk_sorted`` controls this (``None``: automatic).

Weights are always returned as float32. (transformers returns Mixtral and
DeepSeek weights in fp32, but casts Qwen2-MoE / Qwen3-MoE / OLMoE weights back
to the logits' dtype, e.g. bf16; cast if you need that rounding.)
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from moeyard.model import batch_invariant

if TYPE_CHECKING:  # pragma: no cover
    from moeyard.model.spec import MoESpec

__all__ = [
    "GateConfig",
    "router_logits",
    "select_experts",
    "apply_capacity",
    "gate",
    "expert_capacity",
    "capacity_keep_mask",
    "count_dropped",
    "limit_capacity",
    "CapacityResult",
    "expert_scores",
    "OVERFLOW_POLICIES",
]

_SCORINGS = ("softmax", "sigmoid")
_TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
_NORM_EPS_NOAUX = 1e-20  # DeepseekV3TopkRouter's denominator epsilon


@dataclass(frozen=True)
class GateConfig:
    """Routing parameters of one MoE model (the same for all its MoE layers).

    Validated on construction; invalid values raise :class:`ValueError`.
    """

    num_experts: int
    top_k: int
    scoring: Literal["softmax", "sigmoid"] = "softmax"
    norm_topk_prob: bool = False
    topk_method: Literal["greedy", "group_limited_greedy", "noaux_tc"] = "greedy"
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    router_logits_fp32: bool = False
    capacity_factor: float | None = None
    """Serving-time Switch-style capacity limit; ``None`` (default) = no limit."""
    overflow: Literal["drop", "reroute"] = "drop"
    """What the router does with an assignment past its expert's capacity (:func:`limit_capacity`)."""
    topk_sorted: bool | None = None
    """``sorted`` argument of the final ``torch.topk``. ``None``: ``True`` for
    ``greedy``, ``False`` for the group-limited methods (as transformers 5.23).
    DeepSeek-V2 ``greedy`` uses ``False`` in transformers; ``from_spec(...,
    family="deepseek_v2")`` sets it."""

    def __post_init__(self) -> None:
        if self.scoring not in _SCORINGS:
            raise ValueError(f"scoring must be one of {_SCORINGS}, got {self.scoring!r}")
        if self.topk_method not in _TOPK_METHODS:
            raise ValueError(f"topk_method must be one of {_TOPK_METHODS}, got {self.topk_method!r}")
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        if self.capacity_factor is not None and not (
                math.isfinite(self.capacity_factor) and self.capacity_factor > 0):
            raise ValueError(
                f"capacity_factor must be a finite number > 0 (or None to disable), "
                f"got {self.capacity_factor}")
        if self.overflow not in ("drop", "reroute"):
            raise ValueError(f"overflow must be 'drop' or 'reroute', got {self.overflow!r}")
        if not math.isfinite(self.routed_scaling_factor):
            raise ValueError(f"routed_scaling_factor must be finite, got {self.routed_scaling_factor}")
        if self.topk_method != "greedy":
            if self.n_group < 1 or self.num_experts % self.n_group:
                raise ValueError(
                    f"topk_method={self.topk_method!r} needs num_experts ({self.num_experts}) "
                    f"divisible by n_group ({self.n_group})")
            if not 1 <= self.topk_group <= self.n_group:
                raise ValueError(
                    f"topk_group must be in [1, n_group={self.n_group}], got {self.topk_group}")
            per_group = self.num_experts // self.n_group
            if self.top_k > self.topk_group * per_group:
                raise ValueError(
                    f"top_k ({self.top_k}) exceeds the experts reachable with group-limited routing: "
                    f"topk_group ({self.topk_group}) * experts per group ({per_group}) = "
                    f"{self.topk_group * per_group}")
            if self.topk_method == "noaux_tc" and per_group < 2:
                raise ValueError(
                    f"topk_method='noaux_tc' scores each group by its top-2 experts and needs >= 2 "
                    f"experts per group, got {per_group} (num_experts={self.num_experts}, "
                    f"n_group={self.n_group})")

    @property
    def experts_per_group(self) -> int:
        return self.num_experts // self.n_group

    @property
    def resolved_topk_sorted(self) -> bool:
        if self.topk_sorted is not None:
            return self.topk_sorted
        return self.topk_method == "greedy"

    @classmethod
    def from_spec(cls, moe: "MoESpec", top_k_override: int | None = None,
                  capacity_factor: float | None = None, *, family: str | None = None,
                  overflow: Literal["drop", "reroute"] = "drop") -> "GateConfig":
        """Gate parameters of ``moe``.

        Args:
            moe: the model's :class:`moeyard.model.spec.MoESpec`.
            top_k_override: serve with this many experts per token instead of
                the checkpoint's ``top_k`` (must be in ``[1, num_experts]``, and
                reachable under group-limited routing).
            capacity_factor: optional Switch-style capacity factor (> 0).
            overflow: ``drop`` or ``reroute`` past an expert's capacity (:func:`limit_capacity`).
            family: optional ``model_type``; ``"deepseek_v2"`` applies the
                transformers 5.23 DeepSeek-V2 router quirks (fp32 logits,
                ``sorted=False`` top-k, ``norm_topk_prob`` ignored).
        Raises:
            ValueError: with a message naming the bad value.
        """
        top_k = moe.top_k
        if top_k_override is not None:
            if isinstance(top_k_override, bool) or int(top_k_override) != top_k_override:
                raise ValueError(f"top_k_override must be an integer, got {top_k_override!r}")
            if not 1 <= top_k_override <= moe.num_experts:
                raise ValueError(
                    f"top_k_override ({top_k_override}) must be in [1, num_experts={moe.num_experts}]")
            top_k = int(top_k_override)
        if capacity_factor is not None and not (math.isfinite(capacity_factor) and capacity_factor > 0):
            raise ValueError(
                f"capacity_factor must be a finite number > 0 (or None to disable), got {capacity_factor}")
        kw: dict = {}
        norm = moe.norm_topk_prob
        logits_fp32 = moe.router_logits_fp32
        if family == "deepseek_v2":
            logits_fp32 = True
            kw["topk_sorted"] = False
            if norm:
                warnings.warn("deepseek_v2: transformers 5.23 ignores norm_topk_prob=True in "
                              "DeepseekV2TopkRouter; the gate does the same", stacklevel=2)
                norm = False
        try:
            return cls(
                num_experts=moe.num_experts,
                top_k=top_k,
                scoring=moe.scoring,
                norm_topk_prob=norm,
                topk_method=moe.topk_method,
                n_group=moe.n_group,
                topk_group=moe.topk_group,
                routed_scaling_factor=moe.routed_scaling_factor,
                router_logits_fp32=logits_fp32,
                capacity_factor=capacity_factor,
                overflow=overflow,
                **kw,
            )
        except ValueError as e:
            if top_k_override is not None and "top_k" in str(e):
                raise ValueError(f"top_k_override ({top_k_override}) is invalid: {e}") from e
            raise


def router_logits(hidden: Tensor, weight: Tensor, cfg: GateConfig) -> Tensor:
    """Router logits.

    Args:
        hidden: ``[T, D]`` (any leading dims are flattened into ``T``).
        weight: ``[E, D]`` router (gate) weight.
    Returns:
        ``[T, E]``: computed in fp32 when ``cfg.router_logits_fp32`` (DeepSeek),
        else in ``hidden``'s dtype, as transformers does for each family.
    """
    if weight.dim() != 2 or weight.shape[0] != cfg.num_experts:
        raise ValueError(f"router weight must be [E={cfg.num_experts}, D], got {list(weight.shape)}")
    d = weight.shape[1]
    if hidden.shape[-1] != d:
        raise ValueError(f"hidden size mismatch: hidden [..., {hidden.shape[-1]}] vs weight [E, {d}]")
    hidden = hidden.reshape(-1, d)
    if cfg.router_logits_fp32:
        hidden, weight = hidden.to(torch.float32), weight.to(torch.float32)
    else:
        weight = weight.to(hidden.dtype)
    if batch_invariant.enabled():
        return batch_invariant.fixed_rows(lambda c: F.linear(c, weight), hidden)
    return F.linear(hidden, weight)


def select_experts(logits: Tensor, cfg: GateConfig,
                   correction_bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Choose ``A = cfg.top_k`` experts per token.

    Args:
        logits: ``[T, E]`` router logits (any float dtype; scored in fp32).
        correction_bias: ``[E]`` DeepSeek-V3 ``e_score_correction_bias``; only
            for ``topk_method="noaux_tc"`` (``None`` there = zero bias).
    Returns:
        ``(weights [T, A] float32, ids [T, A] int64)`` in transformers' order.
    """
    if logits.dim() != 2 or logits.shape[1] != cfg.num_experts:
        raise ValueError(f"logits must be [T, E={cfg.num_experts}], got {list(logits.shape)}")
    if correction_bias is not None and cfg.topk_method != "noaux_tc":
        raise ValueError(f"correction_bias is only used by topk_method='noaux_tc', "
                         f"not {cfg.topk_method!r}")
    t, e = logits.shape
    k = cfg.top_k
    sorted_ = cfg.resolved_topk_sorted

    scores = expert_scores(logits, cfg)  # [T, E]

    if cfg.topk_method == "greedy":
        weights, ids = torch.topk(scores, k, dim=-1, sorted=sorted_)
    elif cfg.topk_method == "group_limited_greedy":
        g, per = cfg.n_group, cfg.experts_per_group
        group_scores = scores.view(t, g, per).max(dim=-1).values  # [T, G]
        group_idx = torch.topk(group_scores, k=cfg.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(t, g, per).reshape(t, e)
        masked = scores.masked_fill(~score_mask.bool(), 0.0)
        weights, ids = torch.topk(masked, k, dim=-1, sorted=sorted_)
    else:  # noaux_tc
        g, per = cfg.n_group, cfg.experts_per_group
        if correction_bias is not None:
            if correction_bias.shape != (e,):
                raise ValueError(f"correction_bias must be [E={e}], got {list(correction_bias.shape)}")
            choice = scores + correction_bias
        else:
            choice = scores
        group_scores = choice.view(t, g, per).topk(2, dim=-1)[0].sum(dim=-1)  # [T, G]
        group_idx = torch.topk(group_scores, k=cfg.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(t, g, per).reshape(t, e)
        choice = choice.masked_fill(~score_mask.bool(), float("-inf"))
        ids = torch.topk(choice, k, dim=-1, sorted=sorted_)[1]
        weights = scores.gather(1, ids)

    if cfg.norm_topk_prob:
        denom = weights.sum(dim=-1, keepdim=True)
        if cfg.topk_method == "noaux_tc":
            denom = denom + _NORM_EPS_NOAUX
        weights = weights / denom
    if cfg.routed_scaling_factor != 1.0:
        weights = weights * cfg.routed_scaling_factor
    return weights.to(torch.float32), ids.to(torch.int64)


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """``C = ceil(capacity_factor * T * A / E)`` assignments per expert.

    The product is rounded to 9 decimals before ``ceil`` so that e.g.
    ``1.1 * 10 * 2 / 2`` gives 11, not 12 (float artefact).
    """
    if not (math.isfinite(capacity_factor) and capacity_factor > 0):
        raise ValueError(f"capacity_factor must be a finite number > 0, got {capacity_factor}")
    return int(math.ceil(round(capacity_factor * num_tokens * top_k / num_experts, 9)))


def capacity_keep_mask(ids: Tensor, num_experts: int, capacity: int, used: Tensor | None = None) -> Tensor:
    """``[T, A]`` bool: which assignments fit in ``capacity`` per expert.

    Assignments are served in token order, then slot order within a token
    (row-major over ``ids [T, A]``); the first ``capacity`` of each expert are
    kept, less ``used [E]`` already taken by earlier calls of the same step.
    Vectorised: a stable sort by expert gives each assignment its rank within
    its expert.
    """
    flat = ids.reshape(-1)
    n = flat.numel()
    if n == 0:
        return torch.ones_like(ids, dtype=torch.bool)
    sorted_ids, order = torch.sort(flat, stable=True)
    counts = torch.bincount(sorted_ids, minlength=num_experts)
    starts = torch.cumsum(counts, 0) - counts  # first sorted position of each expert
    rank_sorted = torch.arange(n, device=flat.device) - starts[sorted_ids]
    rank = torch.empty_like(rank_sorted)
    rank[order] = rank_sorted
    if used is not None:
        rank = rank + used.to(rank.device)[flat]
    return (rank < capacity).view(ids.shape)


OverflowPolicy = Literal["drop", "reroute"]
OVERFLOW_POLICIES: tuple[str, ...] = ("drop", "reroute")


@dataclass(frozen=True)
class CapacityResult:
    """One call's assignments after the capacity limit (:func:`limit_capacity`)."""

    weights: Tensor
    """``[T, A]`` float32: 0 where the assignment was dropped."""
    ids: Tensor
    """``[T, A]`` int64: ``-1`` where dropped (the token keeps its residual there), the new expert where
    rerouted."""
    dropped: int
    """Assignments that found no room (not sent anywhere)."""
    rerouted: int
    """Assignments moved to another expert with room."""
    load: Tensor
    """``[E]`` int64: assignments each expert holds after this call (``used`` included)."""

    @property
    def overflowed(self) -> int:
        """Assignments over their expert's capacity (dropped or rerouted)."""
        return self.dropped + self.rerouted


def limit_capacity(weights: Tensor, ids: Tensor, num_experts: int, capacity: int, used: Tensor | None = None,
                   policy: OverflowPolicy = "drop", scores: Tensor | None = None) -> CapacityResult:
    """At most ``capacity`` assignments per expert over one step, ``used [E]`` of them taken by earlier
    calls (micro-batches) of the step.

    Args:
        weights, ids: ``[T, A]`` from :func:`select_experts`.
        policy: what happens to an assignment past its expert's capacity (assignments are served in
            token order, then slot order): ``drop`` (id ``-1``, weight 0: the token keeps its residual
            for it), or ``reroute``: it moves to the token's best-scoring expert (``scores [T, E]``, the
            gate's probabilities) that still has room and that the token does not use, its weight
            scaled by ``scores[new] / scores[old]`` (the normalisation of the slot it replaces); dropped
            only when no such expert has room. Every expert's count stays within ``capacity``.
    Host work: ``reroute`` walks the assignments from the first overflow on, on the host
    (``O(T A + overflow x E)`` Python steps; ``drop`` is vectorised).
    """
    if policy not in OVERFLOW_POLICIES:
        raise ValueError(f"overflow policy must be one of {', '.join(OVERFLOW_POLICIES)}, got {policy!r}")
    t, a = ids.shape
    if policy == "reroute" and (scores is None or scores.shape != (t, num_experts)):
        raise ValueError(f"reroute needs the gate's scores [T={t}, E={num_experts}]")
    used = torch.zeros(num_experts, dtype=torch.int64) if used is None else used.to("cpu", torch.int64)
    keep = capacity_keep_mask(ids, num_experts, capacity, used)
    load = used + torch.bincount(ids[keep].reshape(-1).cpu(), minlength=num_experts)
    over = ~keep
    n_over = int(over.sum())
    if n_over == 0:
        return CapacityResult(weights, ids, 0, 0, load)
    if policy == "drop":
        return CapacityResult(torch.where(keep, weights, torch.zeros_like(weights)),
                              torch.where(keep, ids, torch.full_like(ids, -1)), n_over, 0, load)
    # From the first overflow on, one assignment at a time in token order: an expert with room keeps it,
    # else it moves to the token's best-scoring expert with room that the token does not use. The walk
    # depends only on the assignments before it, so a step gated in micro-batches in token order (``used``
    # carried) decides exactly as the whole step would.
    first = int(over.reshape(-1).nonzero()[0])
    ids_flat = ids.reshape(-1).cpu()
    load_l = (used + torch.bincount(ids_flat[:first], minlength=num_experts)).tolist()
    sc = scores.float().cpu()
    ranked = torch.argsort(sc, dim=1, descending=True, stable=True).tolist()
    sc_l, ids_l, w_l = sc.tolist(), ids.cpu().tolist(), weights.float().cpu().tolist()
    new_ids, new_w = [list(r) for r in ids_l], [list(r) for r in w_l]
    uses: dict[int, set[int]] = {}
    dropped = rerouted = 0
    for pos in range(first, t * a):
        tok, k = divmod(pos, a)
        e = ids_l[tok][k]
        if load_l[e] < capacity:
            load_l[e] += 1
            continue
        mine = uses.setdefault(tok, set(ids_l[tok]))
        for cand in ranked[tok]:
            if load_l[cand] < capacity and cand not in mine:
                load_l[cand] += 1
                mine.add(cand)
                old = sc_l[tok][e]
                new_ids[tok][k] = cand
                new_w[tok][k] = w_l[tok][k] * sc_l[tok][cand] / old if old > 0 else w_l[tok][k]
                rerouted += 1
                break
        else:
            new_ids[tok][k], new_w[tok][k] = -1, 0.0
            dropped += 1
    return CapacityResult(torch.tensor(new_w, dtype=weights.dtype, device=weights.device),
                          torch.tensor(new_ids, dtype=ids.dtype, device=ids.device), dropped, rerouted,
                          torch.tensor(load_l, dtype=torch.int64))



def expert_scores(logits: Tensor, cfg: GateConfig) -> Tensor:
    """``[T, E]`` float32 probabilities the gate ranks experts by (softmax or sigmoid of ``logits``)."""
    if cfg.scoring == "softmax":
        return torch.softmax(logits, dim=-1, dtype=torch.float32)
    return logits.to(torch.float32).sigmoid()


def apply_capacity(weights: Tensor, ids: Tensor, num_experts: int,
                   capacity_factor: float) -> tuple[Tensor, Tensor]:
    """Switch-Transformer capacity limit.

    Args:
        weights: ``[T, A]`` gate weights.
        ids: ``[T, A]`` chosen experts.
    Returns:
        ``(weights [T, A], ids [T, A])``: assignments beyond
        ``C = ceil(capacity_factor * T * A / E)`` for their expert (served in
        token order, then slot order) get weight 0; their id is kept and the
        token's other weights are not renormalised (the token keeps its
        residual path). Count drops with :func:`count_dropped`.
    """
    t, a = ids.shape
    cap = expert_capacity(t, a, num_experts, capacity_factor)
    keep = capacity_keep_mask(ids, num_experts, cap)
    return torch.where(keep, weights, torch.zeros_like(weights)), ids


def count_dropped(ids: Tensor, num_experts: int, capacity_factor: float | None) -> int:
    """Number of ``(token, expert)`` assignments :func:`apply_capacity` drops."""
    if capacity_factor is None:
        return 0
    t, a = ids.shape
    cap = expert_capacity(t, a, num_experts, capacity_factor)
    return int((~capacity_keep_mask(ids, num_experts, cap)).sum())


def gate(hidden: Tensor, weight: Tensor, cfg: GateConfig,
         correction_bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``hidden [T, D]``, ``weight [E, D]`` -> ``(weights [T, A] float32, ids [T, A] int64)``.

    :func:`router_logits` -> :func:`select_experts` -> :func:`apply_capacity`
    when ``cfg.capacity_factor`` is set.
    """
    logits = router_logits(hidden, weight, cfg)
    weights, ids = select_experts(logits, cfg, correction_bias)
    if cfg.capacity_factor is not None:
        weights, ids = apply_capacity(weights, ids, cfg.num_experts, cfg.capacity_factor)
    return weights, ids
