"""What the dashboard shows: typed views of one moment of the cluster.

:class:`DashboardState` is the JSON the dashboard's ``/api/state`` returns
(``dataclasses.asdict``), what the page renders and what ``moeyard top`` draws.
It is built by :mod:`moeyard.cluster.dashboard.collect` from Redis (load windows,
placement, events, published telemetry) and the shard manager (shard status);
the views here hold plain lists and numbers only, so that they serialise as they are.

Shapes use ``L`` MoE layers, ``E`` logical experts, ``P`` physical slots,
``N`` shards, ``W`` load windows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moeyard.cluster.control.placement_store import Event
from moeyard.model.economics import Economics


@dataclass
class PlacementView:
    epoch: int
    num_shards: int
    slots_per_shard: int
    phy2log: list[list[int]]
    """``[L][P]`` logical expert in each physical slot; slot ``p`` lives on shard ``p // slots_per_shard``."""
    copies: list[list[int]]
    """``[L][E]`` number of copies of each logical expert."""


@dataclass
class HeatmapView:
    window_s: float
    """Length of one load window (seconds)."""
    span_s: float
    """Seconds the rates average over (the newest whole windows)."""
    rate: list[list[float]]
    """``[L][E]`` routed tokens per second to each logical expert."""
    hot: list[list[int]]
    """``[[layer, expert], ...]``: rate at least ``hot_factor`` x its layer's mean."""
    cold: list[list[int]]
    """``[[layer, expert], ...]``: no token in the newest whole window while its layer had some."""
    hot_factor: float
    collapsed: list[list[int]] = field(default_factory=list)
    """``[[layer, expert], ...]``: below ``collapse_fraction`` x its layer's mean in each of the layer's newest
    ``collapse_windows`` windows with traffic, but not idle in all of them (:func:`~moeyard.cluster.dashboard.
    views.expert_collapse`)."""
    dead: list[list[int]] = field(default_factory=list)
    """``[[layer, expert], ...]``: no token at all in those windows."""
    collapse_fraction: float = 0.0
    collapse_windows: int = 0


@dataclass
class BalancerView:
    """Whether the autoscaler is alive and when it last moved experts."""

    seconds_since_rebalance: float | None
    """Since the newest completed rebalance among the stored events (None: none stored)."""
    seconds_since_turn: float | None
    """Since the autoscaler's loop last finished a turn (None: it has not published)."""
    stalled: bool = False
    """``seconds_since_turn`` is past the dashboard's ``autoscaler_stall_s`` (and 3 of its intervals)."""


@dataclass
class ShardSeries:
    """Per MoE layer: tokens per shard and balancedness over time (one point per load window)."""

    times: list[float]
    """``[W]`` window starts, unix seconds, oldest first."""
    rate: list[list[list[float | None]]]
    """``[L][W][N]`` tokens per second computed by each shard; ``None`` where the window's slot
    counts are incomplete (the number of slots changed inside it)."""
    balancedness: list[list[float | None]]
    """``[L][W]`` mean / max tokens per shard (1.0 = perfectly even); ``None`` as above or for an idle window."""
    min_balancedness: list[float | None]
    """``[W]`` the minimum over layers (what the autoscaler acts on)."""
    num_shards: int


@dataclass
class EventView(Event):
    """One autoscaler event (:class:`moeyard.cluster.control.placement_store.Event`: its ``balancedness_*`` are the
    planner's predictions) and its measured effect."""

    measured_before: float | None = None
    """Mean min-over-layers balancedness of the load windows in the minute before the event, if any."""
    measured_after: float | None = None
    """The same for the windows that started after the event ended."""


@dataclass
class ReplicaHealth:
    replica: str
    running: int
    waiting: int
    kv_cache_usage: float
    """Fraction of KV cache blocks in use, 0..1."""
    num_blocks: int
    placement_epoch: int | None
    tokens_per_s: float
    """Generated tokens per second over the last ``recent_s`` seconds."""
    ttft_p50_s: float | None
    ttft_p99_s: float | None
    itl_p50_s: float | None
    itl_p99_s: float | None
    requests_finished: int
    requests_failed: int
    age_s: float
    """Seconds since the replica last published."""
    overflow_dropped: list[int] | None = None
    """Per MoE layer: assignments dropped past their expert's capacity since the replica started (None:
    no capacity limit)."""
    overflow_rerouted: list[int] | None = None
    """Per MoE layer: assignments rerouted past their expert's capacity."""


@dataclass
class ShardHealth:
    shard_id: int
    healthy: bool
    address: str | None = None
    slots: int = 0
    """Expert copies held, all MoE layers."""
    weight_bytes: int = 0
    rss_bytes: int = 0
    tokens: int = 0
    """(token, expert) rows computed since the shard started."""
    error: str | None = None


@dataclass
class ServingView:
    replicas: list[ReplicaHealth]
    shards: list[ShardHealth]
    running: int
    waiting: int
    tokens_per_s: float
    ttft_p50_s: float | None
    """Worst replica's p50 / p99 (replicas keep their own samples)."""
    ttft_p99_s: float | None
    itl_p50_s: float | None
    itl_p99_s: float | None
    overflow_dropped: list[int] | None = None
    """Per MoE layer, summed over the replicas (None: no replica has a capacity limit)."""
    overflow_rerouted: list[int] | None = None


@dataclass
class DashboardState:
    time: float
    """Unix seconds when the state was built."""
    model: str
    redis_ok: bool
    redis_error: str | None
    placement: PlacementView | None
    heatmap: HeatmapView | None
    shard_series: ShardSeries | None
    events: list[EventView]
    """Newest first."""
    serving: ServingView
    economics: Economics | None
    lookback_s: float
    notes: list[str] = field(default_factory=list)
    """Why a panel is empty (e.g. "no Redis configured", "no load windows yet")."""
    balancer: BalancerView | None = None
    warnings: list[str] = field(default_factory=list)
    """Conditions an operator should act on (a stalled autoscaler), shown above the serving panel."""
