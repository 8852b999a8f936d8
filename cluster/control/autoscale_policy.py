"""When to rebalance: the autoscaler's decision as a pure function (no I/O, no clock).

A rebalance is never free (weights move, routers switch), so the policy acts only when

* enough tokens were seen for the load to mean something (``min_tokens``),
* the minimum per-layer balancedness (mean / max tokens per shard, predicted from the
  smoothed expert load ``[L, E]`` under the current placement) stayed below ``threshold``
  for ``sustain_s``,
* the last move is at least ``cooldown_s`` ago, and
* the planned placement raises that minimum by at least ``min_gain``.

``force`` (``moeyard rebalance``) skips the threshold, sustain and cool-down checks, not the
load and gain checks' arithmetic: a forced plan identical to the current one is reported, not applied.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeyard.cluster.settings.autoscaler import AutoscalerSettings
from moeyard.router_service.placement import Placement
from moeyard.router_service.planner import count_moves, min_balancedness, plan_placement


@dataclass
class PolicyState:
    below_since: float | None = None
    last_move: float | None = None
    scale_since: float | None = None
    scale_direction: int = 0


@dataclass(frozen=True)
class Decision:
    act: bool
    reason: str
    code: str
    """``low_load`` | ``balanced`` | ``sustain`` | ``cooldown`` | ``no_change`` | ``small_gain`` | ``act``."""
    balancedness_before: float | None = None
    balancedness_after: float | None = None
    plan: Placement | None = None
    slots_moved: int = 0


def decide(load: torch.Tensor, current: Placement, state: PolicyState, settings: AutoscalerSettings,
           now: float, force: bool = False) -> Decision:
    """Whether to move from ``current`` given smoothed ``load [L, E]``; updates ``state.below_since``.

    The caller sets ``state.last_move`` once a move is applied.
    """
    total = float(load.sum())
    if total < max(settings.min_tokens, 1):
        state.below_since = None
        return Decision(False, f"not enough load to judge ({total:.0f} tokens < {settings.min_tokens})", "low_load")
    before = min_balancedness(load, current)
    if not force:
        if before >= settings.threshold:
            state.below_since = None
            return Decision(False, f"balanced: {before:.3f} >= threshold {settings.threshold}", "balanced", before)
        if state.below_since is None:
            state.below_since = now
        waited = now - state.below_since
        if waited < settings.sustain_s:
            return Decision(False, f"{before:.3f} < threshold {settings.threshold} for {waited:.1f}s "
                                   f"(< {settings.sustain_s}s)", "sustain", before)
        if state.last_move is not None and now - state.last_move < settings.cooldown_s:
            return Decision(False, f"cool-down: last move {now - state.last_move:.1f}s ago "
                                   f"(< {settings.cooldown_s}s)", "cooldown", before)
    plan = plan_placement(load, current.num_shards, current.slots_per_shard, current=current,
                          epoch=current.epoch)
    after = min_balancedness(load, plan)
    moved = count_moves(current, plan)
    if moved == 0:
        return Decision(False, f"the plan equals the current placement (balancedness {before:.3f})", "no_change",
                        before, after)
    gain = after - before
    if gain < settings.min_gain and not (force and gain > 0):
        return Decision(False, f"gain too small: {before:.3f} -> {after:.3f} (< {settings.min_gain})",
                        "small_gain", before, after)
    why = "forced" if force else f"{before:.3f} < threshold {settings.threshold} for {now - state.below_since:.1f}s"
    return Decision(True, f"{why}; plan {before:.3f} -> {after:.3f}, {moved} slots move", "act", before,
                    after, plan, moved)


def decide_scale(load_per_shard_s: float, num_shards: int, state: PolicyState, settings: AutoscalerSettings,
                 now: float) -> tuple[int, str]:
    """``+1`` (add a shard), ``-1`` (remove the last one) or ``0``, with the reason.

    ``load_per_shard_s``: routed (token, expert) assignments per second per shard over the
    lookback. The threshold must hold for ``sustain_s`` and the last move be ``cooldown_s`` ago.
    """
    if settings.min_shards is None:
        return 0, "shard scaling off"
    want = 0
    if settings.scale_up_load and load_per_shard_s > settings.scale_up_load and num_shards < settings.max_shards:
        want = 1
    elif (settings.scale_down_load and load_per_shard_s < settings.scale_down_load
          and num_shards > settings.min_shards):
        want = -1
    if num_shards < settings.min_shards:
        want = 1
    elif num_shards > settings.max_shards:
        want = -1
    if want == 0:
        state.scale_since, state.scale_direction = None, 0
        return 0, f"{load_per_shard_s:.0f} tokens/s per shard on {num_shards} shards: within bounds"
    if state.scale_direction != want or state.scale_since is None:
        state.scale_since, state.scale_direction = now, want
    held = now - state.scale_since
    what = "up" if want > 0 else "down"
    if held < settings.sustain_s:
        return 0, f"scale {what} pending: {held:.1f}s < {settings.sustain_s}s"
    if state.last_move is not None and now - state.last_move < settings.cooldown_s:
        return 0, f"scale {what} pending: cool-down"
    bound = settings.scale_up_load if want > 0 else settings.scale_down_load
    return want, (f"{load_per_shard_s:.0f} tokens/s per shard {'>' if want > 0 else '<'} {bound:.0f} for "
                  f"{held:.1f}s: {num_shards} -> {num_shards + want} shards")
