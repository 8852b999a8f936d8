"""The serving panels of the dashboard: replica / shard health and the model's economics.

* ``serving``: Redis status, totals, one row per replica and one per shard;
* ``economics``: total vs active parameters, the dense-equivalent estimate, memory per shard.
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

from moeyard.cluster.dashboard.fmt import (
    DASH,
    finite,
    fmt_bytes,
    fmt_params,
    fmt_rate,
    fmt_seconds,
    pct,
)
from moeyard.cluster.dashboard.fragments import empty, table, td
from moeyard.cluster.dashboard.state import (
    DashboardState,
    ReplicaHealth,
    ServingView,
    ShardHealth,
)
from moeyard.cluster.dashboard.svg import num, svg_open
from moeyard.model.economics import Economics

__all__ = ["render_economics", "render_serving"]


# --------------------------------------------------------------------------- serving


def _meta(state: DashboardState) -> str:
    """Hidden element the page reads for its header: model, Redis status, state time."""
    err = escape(state.redis_error or "")
    return (f'<div class="panel-meta" hidden data-model="{escape(state.model)}" '
            f'data-redis="{"ok" if state.redis_ok else "error"}" data-redis-error="{err}" '
            f'data-time="{state.time!r}"></div>')


def _balancer(state: DashboardState) -> str:
    """When the autoscaler last rebalanced and last finished a turn."""
    b = state.balancer
    if b is None:
        return ""
    last = "none stored" if b.seconds_since_rebalance is None else f"{fmt_seconds(b.seconds_since_rebalance)} ago"
    turn = "never" if b.seconds_since_turn is None else f"{fmt_seconds(b.seconds_since_turn)} ago"
    since = "" if b.seconds_since_rebalance is None else f"{b.seconds_since_rebalance:.3f}"
    return (f'<p class="balancer" data-stalled="{str(b.stalled).lower()}" data-since-rebalance="{since}">'
            f"last rebalance {escape(last)} · autoscaler turn {escape(turn)}</p>")


def _stat(name: str, label: str, value: str) -> str:
    """One total: label above a big value (``value`` already escaped)."""
    return (f'<div class="stat"><span class="stat-label">{label}</span>'
            f'<span class="stat-value" data-stat="{name}">{value}</span></div>')


def _totals(sv: ServingView) -> str:
    """Running / waiting / tokens/s / TTFT / ITL totals."""
    return ('<div class="totals">' + _stat("running", "running", str(sv.running))
            + _stat("waiting", "waiting", str(sv.waiting))
            + _stat("tokens_per_s", "tokens/s", fmt_rate(sv.tokens_per_s))
            + _stat("ttft", "TTFT p50 / p99", f"{fmt_seconds(sv.ttft_p50_s)} / {fmt_seconds(sv.ttft_p99_s)}")
            + _stat("itl", "ITL p50 / p99", f"{fmt_seconds(sv.itl_p50_s)} / {fmt_seconds(sv.itl_p99_s)}")
            + "</div>")


def _kv_bar(frac: float) -> str:
    """KV cache use as a small bar and a percentage."""
    used = 100.0 * min(1.0, max(0.0, finite(frac) or 0.0))
    level = "high" if used >= 90 else ("mid" if used >= 70 else "low")
    return (f'<span class="bar" data-level="{level}"><span class="bar-fill" style="width:{used:.0f}%"></span></span> '
            f'<span class="pct">{used:.0f}%</span>')


def _replica_row(r: ReplicaHealth) -> str:
    """``<tr class="replica" data-replica>`` of one replica's health."""
    cells = [
        td(escape(r.replica), "id"), td(str(r.running)), td(str(r.waiting)),
        td(_kv_bar(r.kv_cache_usage) + f' <span class="small">of {r.num_blocks} blocks</span>'),
        td(DASH if r.placement_epoch is None else str(r.placement_epoch)),
        td(fmt_rate(r.tokens_per_s)),
        td(escape(f"{fmt_seconds(r.ttft_p50_s)} / {fmt_seconds(r.ttft_p99_s)}")),
        td(escape(f"{fmt_seconds(r.itl_p50_s)} / {fmt_seconds(r.itl_p99_s)}")),
        td(f"{r.requests_finished} / {r.requests_failed}"),
        td(escape(fmt_seconds(r.age_s))),
    ]
    return f'<tr class="replica" data-replica="{escape(r.replica)}">{"".join(cells)}</tr>'


def _overflow_table(sv: ServingView) -> str:
    """Per MoE layer: (token, expert) assignments past their expert's capacity, dropped and rerouted."""
    dropped, rerouted = sv.overflow_dropped or [], sv.overflow_rerouted or []
    rows = (f'<tr class="overflow" data-layer="{layer}" data-dropped="{d}" data-rerouted="{r}">'
            f"{td(str(layer))}{td(str(d))}{td(str(r))}</tr>"
            for layer, (d, r) in enumerate(zip(dropped + [0] * (len(rerouted) - len(dropped)),
                                              rerouted + [0] * (len(dropped) - len(rerouted)))))
    return table(["MoE layer", "dropped", "rerouted"], rows, "overflow")


def _shard_row(s: ShardHealth) -> str:
    """``<tr class="shard" data-shard data-healthy>`` of one shard's health."""
    cells = [
        td(str(s.shard_id), "id"),
        td("✓ healthy" if s.healthy else "✗ down", "ok" if s.healthy else "bad"),
        td(escape(s.address or DASH)), td(str(s.slots)),
        td(escape(fmt_bytes(s.weight_bytes))), td(escape(fmt_bytes(s.rss_bytes))),
        td(f"{s.tokens:,}"), td(escape(s.error or ""), "error"),
    ]
    return (f'<tr class="shard" data-shard="{s.shard_id}" data-healthy="{1 if s.healthy else 0}">'
            f'{"".join(cells)}</tr>')


def render_serving(state: DashboardState) -> str:
    """``serving`` panel: Redis status, totals, a table per replica and a table per shard."""
    sv = state.serving
    redis = ("Redis: ok" if state.redis_ok
             else f"Redis: unavailable{': ' + state.redis_error if state.redis_error else ''}")
    parts = [_meta(state)]
    parts += [f'<p class="warning" data-warning="1">{escape(w)}</p>' for w in state.warnings]
    parts += [f'<p class="redis" data-redis="{"ok" if state.redis_ok else "error"}">{escape(redis)}</p>',
              _balancer(state), _totals(sv), "<h4>replicas</h4>"]
    if sv.replicas:
        headers = ["replica", "running", "waiting", "KV cache", "epoch", "tok/s", "TTFT p50 / p99",
                   "ITL p50 / p99", "finished / failed", "age"]
        parts.append(table(headers, (_replica_row(r) for r in sv.replicas), "replicas"))
    else:
        parts.append(empty(state, "No replica has published telemetry."))
    if sv.overflow_dropped is not None or sv.overflow_rerouted is not None:
        parts.append("<h4>expert capacity overflow</h4>" + _overflow_table(sv))
    parts.append("<h4>shards</h4>")
    if sv.shards:
        headers = ["shard", "health", "address", "slots", "weights", "RSS", "tokens", "error"]
        parts.append(table(headers, (_shard_row(s) for s in sv.shards), "shards"))
    else:
        parts.append('<p class="empty">No shard status.</p>')
    return "".join(parts)


# --------------------------------------------------------------------------- economics


def _dense_divisor(ec: Economics) -> float | None:
    """``E ** 0.44 / A ** 0.63`` (``None`` when E or A is not positive)."""
    if ec.num_experts <= 0 or ec.top_k <= 0:
        return None
    return ec.num_experts ** 0.44 / ec.top_k ** 0.63


def _active_bar(ec: Economics) -> str:
    """Two-segment bar: active parameters per token vs the rest of the total."""
    frac = ec.active_params / ec.total_params if ec.total_params > 0 else 0.0
    frac = min(1.0, max(0.0, frac))
    w = 480.0
    aw = w * frac
    return (svg_open(w, 22, "econ-bar", ' id="economics-bar-svg"')
            + f'<rect class="econ-active" x="0" y="2" width="{num(aw)}" height="18" fill="#e6550d">'
            f"<title>active {escape(fmt_params(ec.active_params))}</title></rect>"
            f'<rect class="econ-inactive" x="{num(aw)}" y="2" width="{num(w - aw)}" height="18" fill="#d9d9d9">'
            f"<title>inactive {escape(fmt_params(ec.total_params - ec.active_params))}</title></rect></svg>")


def _econ_rows(ec: Economics) -> list[tuple[str, str]]:
    """``(label, value)`` rows of the economics table (values not yet escaped)."""
    div = _dense_divisor(ec)
    formula = (f"total ÷ (E^0.44 / A^0.63) = {fmt_params(ec.total_params)} ÷ "
               f"({ec.num_experts}^0.44 / {ec.top_k}^0.63)" + (f" = {fmt_params(ec.total_params)} ÷ {div:.3f}"
                                                               if div else ""))
    per_copy = (ec.routed_expert_params / (ec.num_experts * ec.num_moe_layers)
                if ec.num_experts > 0 and ec.num_moe_layers > 0 else None)
    bpp = ec.bytes_per_param
    return [
        ("family", ec.family),
        ("layers", f"{ec.num_layers} ({ec.num_moe_layers} MoE)"),
        ("routed experts per MoE layer (E)", str(ec.num_experts)),
        ("experts per token (A, top-k)", str(ec.top_k) + (
            f" (moe_top_k; the checkpoint's is {ec.checkpoint_top_k})"
            if ec.checkpoint_top_k and ec.checkpoint_top_k != ec.top_k else "")),
        ("total parameters", fmt_params(ec.total_params)),
        ("active parameters per token", f"{fmt_params(ec.active_params)} ({pct(ec.active_params, ec.total_params)})"),
        ("routed-expert parameters", (f"{fmt_params(ec.routed_expert_params)} "
                                      f"({pct(ec.routed_expert_params, ec.total_params)} of total)")),
        ("other parameters (attention, embeddings, dense / shared MLP)",
         fmt_params(ec.total_params - ec.routed_expert_params)),
        ("one expert (one layer)", DASH if per_copy is None
         else f"{fmt_params(per_copy)} = {fmt_bytes(per_copy * bpp)}"),
        ("dense-equivalent estimate", fmt_params(ec.dense_equivalent_params)),
        ("formula (Epoch AI heuristic)", formula),
        ("bytes / param", str(bpp)),
        ("weights in total", fmt_bytes(ec.total_params * bpp)),
    ]


def _shard_memory(shards: Sequence[ShardHealth]) -> str:
    """Memory per shard: weights held and RSS."""
    if not shards:
        return '<p class="small">No shard status: memory per shard unknown.</p>'
    rows = (f'<tr class="shard-memory" data-shard="{s.shard_id}">{td(str(s.shard_id))}{td(str(s.slots))}'
            f"{td(escape(fmt_bytes(s.weight_bytes)))}{td(escape(fmt_bytes(s.rss_bytes)))}</tr>" for s in shards)
    return table(["shard", "slots", "weights", "RSS"], rows, "shard-memory")


def render_economics(state: DashboardState) -> str:
    """``economics`` panel: active vs total params (text and bar), the parameter table, memory per shard."""
    ec = state.economics
    if ec is None:
        return empty(state, "No checkpoint parameter counts.") + "<h4>memory per shard</h4>" + _shard_memory(
            state.serving.shards)
    headline = (f"active {fmt_params(ec.active_params)} of {fmt_params(ec.total_params)} per token "
                f"({pct(ec.active_params, ec.total_params)})")
    rows = (f"<tr><th>{escape(k)}</th>{td(escape(v))}</tr>" for k, v in _econ_rows(ec))
    return (f'<p class="headline" data-active="{ec.active_params}" data-total="{ec.total_params}">'
            f"{escape(headline)}</p>"
            f'<div class="svg-wrap">{_active_bar(ec)}</div>'
            f'<table class="economics"><tbody>{"".join(rows)}</tbody></table>'
            "<h4>memory per shard</h4>" + _shard_memory(state.serving.shards))
