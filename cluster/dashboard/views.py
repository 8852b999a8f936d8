"""Pure functions from stored data (load windows, placement, events, telemetry) to dashboard views.

Shapes: ``W`` load windows (oldest first), ``L`` MoE layers, ``E`` logical experts,
``P`` physical slots, ``N`` shards.
"""

from __future__ import annotations

import math

import torch

from moeyard.cluster.control.load_store import LoadWindows
from moeyard.cluster.dashboard.state import (
    BalancerView,
    EventView,
    HeatmapView,
    PlacementView,
    ReplicaHealth,
    ServingView,
    ShardHealth,
    ShardSeries,
)
from moeyard.cluster.infra.telemetry import Published
from moeyard.router_service.placement import Placement
from moeyard.router_service.planner import balancedness

MOVE_KINDS = ("rebalance", "scale_up", "scale_down")
EFFECT_SPAN_S = 60.0


def whole_windows(w: LoadWindows, now: float, window_s: float) -> torch.Tensor:
    """``[W]`` bool: windows that have ended by ``now`` (the newest one is usually still filling)."""
    return w.starts + window_s <= now + 1e-6


def placement_view(p: Placement) -> PlacementView:
    copies = torch.zeros(p.num_layers, p.num_experts, dtype=torch.int64)
    copies.scatter_add_(1, p.phy2log, torch.ones_like(p.phy2log))
    return PlacementView(p.epoch, p.num_shards, p.slots_per_shard, p.phy2log.tolist(), copies.tolist())


def expert_collapse(counts: torch.Tensor, fraction: float, windows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``counts [W, L, E]`` tokens per load window (oldest first) -> ``(collapsed [L, E], dead [L, E])`` bool.

    Per layer, its newest ``windows`` windows with any traffic (idle windows do not break the run): an
    expert below ``fraction`` x the layer's mean count in every one of them is flagged; ``dead`` when it
    had no token at all, else ``collapsed``. A layer with fewer such windows flags nothing (too little
    evidence). Pure tensor math.
    """
    W, L, E = counts.shape
    collapsed = torch.zeros(L, E, dtype=torch.bool)
    dead = torch.zeros(L, E, dtype=torch.bool)
    c = counts.to(torch.float64)
    active = c.sum(dim=2) > 0                                    # [W, L]
    for layer in range(L):
        idx = torch.nonzero(active[:, layer]).flatten()[-windows:]
        if idx.numel() < windows:
            continue
        x = c[idx, layer]                                        # [N, E]
        below = (x < fraction * x.mean(dim=1, keepdim=True)).all(dim=0)
        none = (x == 0).all(dim=0)
        dead[layer] = none
        collapsed[layer] = below & ~none
    return collapsed, dead


def heatmap_view(w: LoadWindows, now: float, window_s: float, span_s: float, hot_factor: float,
                 collapse_fraction: float = 0.1, collapse_windows: int = 6) -> HeatmapView | None:
    """Rates over the newest whole windows covering ``span_s``: ``expert_counts [W, L, E]`` ->
    ``rate [L, E]`` tokens/s; hot = ``rate >= hot_factor x`` the layer's mean; cold = zero tokens in
    the newest whole window while the layer had some; collapsed and dead over every whole window
    (:func:`expert_collapse`). None without a whole window."""
    whole = torch.nonzero(whole_windows(w, now, window_s)).flatten()
    if whole.numel() == 0:
        return None
    collapsed, dead = expert_collapse(w.expert_counts[whole], collapse_fraction, collapse_windows)
    k = max(1, min(whole.numel(), math.ceil(span_s / window_s - 1e-9)))
    idx = whole[-k:]
    counts = w.expert_counts[idx].to(torch.float64)          # [k, L, E]
    rate = counts.sum(dim=0) / (k * window_s)                 # [L, E]
    mean = rate.mean(dim=1, keepdim=True)
    hot = (rate >= hot_factor * mean) & (mean > 0)
    newest = counts[-1]                                        # [L, E]
    cold = (newest == 0) & (newest.sum(dim=1, keepdim=True) > 0)
    return HeatmapView(window_s, k * window_s, rate.tolist(), torch.nonzero(hot).tolist(),
                       torch.nonzero(cold).tolist(), hot_factor, torch.nonzero(collapsed).tolist(),
                       torch.nonzero(dead).tolist(), collapse_fraction, collapse_windows)


def balancer_view(events: list[dict], autoscaler: dict | None, now: float, stall_s: float) -> BalancerView:
    """Seconds since the newest completed rebalance (``events``: stored, newest first) and since the
    autoscaler's last finished turn (``autoscaler``: its published summary, ``last_turn`` unix seconds and
    ``interval_s``); stalled past ``max(stall_s, 3 x interval_s)``."""
    since_rebalance = next((max(0.0, now - float(e["time"])) for e in events
                            if e.get("kind") == "rebalance" and isinstance(e.get("time"), (int, float))), None)
    since_turn, stalled = None, False
    if autoscaler is not None and isinstance(autoscaler.get("last_turn"), (int, float)):
        since_turn = max(0.0, now - float(autoscaler["last_turn"]))
        interval = autoscaler.get("interval_s")
        limit = max(stall_s, 3 * float(interval) if isinstance(interval, (int, float)) else 0.0)
        stalled = since_turn > limit
    return BalancerView(since_rebalance, since_turn, stalled)


def shard_series(w: LoadWindows, now: float, window_s: float, slots_per_shard: int) -> ShardSeries | None:
    """Per whole window and layer: ``slot_counts [W, L, P]`` -> tokens/s per shard ``[L][W][N]`` and
    balancedness ``[L][W]`` (mean / max over shards; None for an incomplete or idle window)."""
    whole = torch.nonzero(whole_windows(w, now, window_s)).flatten()
    if whole.numel() == 0 or w.num_slots == 0 or w.num_slots % slots_per_shard:
        return None
    n = w.num_slots // slots_per_shard
    slots = w.slot_counts[whole].to(torch.float64)             # [W', L, P]
    W, L, _ = slots.shape
    per_shard = slots.view(W, L, n, slots_per_shard).sum(dim=3) / window_s  # [W', L, N]
    bal = balancedness(per_shard.reshape(W * L, n)).view(W, L)
    complete = w.slot_complete[whole].tolist()
    shown = w.slot_complete[whole].unsqueeze(0) & (per_shard.sum(dim=2) != 0).T  # [L, W']: complete, not idle
    # one tolist() per tensor, no per-(window, layer) tensor indexing: W' x L cells is 3480 at DeepSeek-V3 scale
    rate: list[list[list[float | None]]] = per_shard.transpose(0, 1).tolist()      # [L][W'][N]
    for i, ok in enumerate(complete):
        if not ok:
            for layer_rates in rate:
                layer_rates[i] = [None] * n
    bl: list[list[float | None]] = [[b if ok else None for b, ok in zip(bs, oks)]
                                    for bs, oks in zip(bal.T.tolist(), shown.tolist())]
    mins = []
    for column in zip(*bl) if L else [()] * W:
        vals = [b for b in column if b is not None]
        mins.append(min(vals) if vals else None)
    return ShardSeries(w.starts[whole].tolist(), rate, bl, mins, n)


def current_balancedness(series: ShardSeries | None, span_s: float, window_s: float) -> list[float] | None:
    """``[L]`` balancedness of the shard load summed over the newest whole windows covering ``span_s``."""
    if series is None or not series.times:
        return None
    k = max(1, min(len(series.times), math.ceil(span_s / window_s - 1e-9)))
    out = []
    for layer_rates in series.rate:
        rows = [r for r in layer_rates[-k:] if r and r[0] is not None]
        if not rows:
            out.append(1.0)
            continue
        total = torch.tensor(rows, dtype=torch.float64).sum(dim=0, keepdim=True)  # [1, N]
        out.append(float(balancedness(total)[0]))
    return out


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def event_views(events: list[dict], series: ShardSeries | None) -> list[EventView]:
    """Stored events (newest first) with the measured min balancedness of the minute before
    each move and of the windows that started after it ended."""
    fields = set(EventView.__dataclass_fields__)
    out = []
    for e in events:
        v = EventView(**{k: e.get(k) for k in fields if k in e})
        if series is not None and v.kind in MOVE_KINDS and v.time is not None:
            t0, t1 = v.time, v.time + (v.duration_s or 0.0)
            before = [b for t, b in zip(series.times, series.min_balancedness)
                      if b is not None and t0 - EFFECT_SPAN_S <= t < t0 - 0.0]
            after = [b for t, b in zip(series.times, series.min_balancedness)
                     if b is not None and t1 <= t < t1 + EFFECT_SPAN_S]
            v.measured_before, v.measured_after = _mean(before), _mean(after)
        out.append(v)
    return out


def _opt_float(d: dict, k: str) -> float | None:
    v = d.get(k)
    return float(v) if isinstance(v, (int, float)) else None


def replica_health(p: Published, now: float) -> ReplicaHealth:
    s = p.summary
    return ReplicaHealth(
        replica=p.source, running=int(s.get("running", 0)), waiting=int(s.get("waiting", 0)),
        kv_cache_usage=float(s.get("kv_cache_usage", 0.0)), num_blocks=int(s.get("num_blocks", 0)),
        placement_epoch=s.get("placement_epoch"), tokens_per_s=float(s.get("tokens_per_s", 0.0)),
        ttft_p50_s=_opt_float(s, "ttft_p50_s"), ttft_p99_s=_opt_float(s, "ttft_p99_s"),
        itl_p50_s=_opt_float(s, "itl_p50_s"), itl_p99_s=_opt_float(s, "itl_p99_s"),
        requests_finished=int(s.get("requests_finished", 0)), requests_failed=int(s.get("requests_failed", 0)),
        age_s=max(0.0, now - p.time), overflow_dropped=_int_list(s, "overflow_dropped"),
        overflow_rerouted=_int_list(s, "overflow_rerouted"))


def _int_list(s: dict, key: str) -> list[int] | None:
    v = s.get(key)
    return [int(x) for x in v] if isinstance(v, list) and all(isinstance(x, (int, float)) for x in v) else None


def _sum_lists(lists: list[list[int] | None]) -> list[int] | None:
    """Element-wise sum of the lists given (None when there are none)."""
    have = [x for x in lists if x is not None]
    if not have:
        return None
    out = [0] * max(len(x) for x in have)
    for x in have:
        for i, v in enumerate(x):
            out[i] += v
    return out


def shard_health(status: dict) -> ShardHealth:
    """One entry of ``ShardManager.status()``."""
    slots = status.get("slots") or {}
    return ShardHealth(
        shard_id=int(status.get("shard_id", -1)), healthy=bool(status.get("healthy", False)),
        address=status.get("address"), slots=sum(len(v) for v in slots.values()),
        weight_bytes=int(status.get("weight_bytes", 0)), rss_bytes=int(status.get("rss_bytes", 0)),
        tokens=int(status.get("tokens", 0)), error=status.get("error"))


def _worst(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return max(vals) if vals else None


def serving_view(replicas: list[ReplicaHealth], shards: list[ShardHealth]) -> ServingView:
    return ServingView(
        replicas=replicas, shards=shards, running=sum(r.running for r in replicas),
        waiting=sum(r.waiting for r in replicas), tokens_per_s=sum(r.tokens_per_s for r in replicas),
        ttft_p50_s=_worst([r.ttft_p50_s for r in replicas]), ttft_p99_s=_worst([r.ttft_p99_s for r in replicas]),
        itl_p50_s=_worst([r.itl_p50_s for r in replicas]), itl_p99_s=_worst([r.itl_p99_s for r in replicas]),
        overflow_dropped=_sum_lists([r.overflow_dropped for r in replicas]),
        overflow_rerouted=_sum_lists([r.overflow_rerouted for r in replicas]))
