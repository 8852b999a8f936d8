"""The dashboard's Prometheus collector: every process's published metrics plus derived gauges.

Series (``moeyard:`` names, vLLM style):

* from attention replicas (label ``replica``): requests running / waiting, KV cache use,
  TTFT / ITL / end-to-end histograms, prompt and generation tokens, request outcomes,
  placement epoch, load flush failures and dropped tokens, expert tokens per
  (layer, shard) (and per (layer, expert) when ``per_expert_metrics``);
* from the autoscaler (label ``autoscaler``): rebalances by kind and outcome, their
  durations, slots moved, bytes migrated;
* derived here: ``moeyard:balancedness{layer}`` and ``moeyard:min_balancedness`` (mean / max
  tokens per shard over the newest whole windows, ``heatmap_span_s``); ``moeyard:collapsed_experts{layer}``
  and ``moeyard:dead_experts{layer}`` (experts starved over ``collapse_windows`` windows; per expert as
  ``moeyard:expert_collapsed{layer,expert,state}`` only with ``per_expert_metrics``: cardinality);
  ``moeyard:seconds_since_rebalance`` (the newest completed one among the stored events) and
  ``moeyard:autoscaler_seconds_since_turn`` (a stalled balancer stops resetting it); shard up / weight
  bytes / RSS / slots per shard, ``moeyard:redis_up``.
"""

from __future__ import annotations

import logging

from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from moeyard.cluster.dashboard import views
from moeyard.cluster.dashboard.collect import DashboardSource
from moeyard.cluster.infra.telemetry import merge_families

log = logging.getLogger(__name__)


class ClusterCollector(Collector):
    def __init__(self, source: DashboardSource):
        self.source = source

    def describe(self):  # no fixed description: the families come from Redis
        return []

    def collect(self):
        yield from self._shards()
        src = self.source
        up = GaugeMetricFamily("moeyard:redis_up", "1 if the dashboard read Redis on this scrape")
        if src.client is None:
            up.add_metric([], 0)
            yield up
            return
        try:
            s = src.settings  # enough windows for the heatmap span and for the collapse test
            snap = src.read_redis(max(s.heatmap_span_s, s.collapse_windows * src.window_s) + 2 * src.window_s)
        except Exception as e:
            log.warning("metrics: Redis unreachable (%s)", type(e).__name__)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from merge_families(snap.telemetry)
        yield from self._balancedness(snap)
        yield from self._collapse(snap)
        yield from self._balancer(snap)

    def _balancedness(self, snap) -> list[Metric]:
        src = self.source
        if snap.placement is None or snap.windows is None or not snap.windows.num_windows:
            return []
        window_s = snap.windows.window_s or src.window_s
        series = views.shard_series(snap.windows, src.clock(), window_s, snap.placement.slots_per_shard)
        bal = views.current_balancedness(series, src.settings.heatmap_span_s, window_s)
        if bal is None:
            return []
        per_layer = GaugeMetricFamily("moeyard:balancedness",
                                      "Mean / max tokens per shard over the newest whole load windows (1 = even)",
                                      labels=["layer"])
        for layer, b in enumerate(bal):
            per_layer.add_metric([str(layer)], b)
        worst = GaugeMetricFamily("moeyard:min_balancedness", "The minimum of moeyard:balancedness over layers")
        worst.add_metric([], min(bal))
        return [per_layer, worst]

    def _collapse(self, snap) -> list[Metric]:
        src, s = self.source, self.source.settings
        w = snap.windows
        if w is None or not w.num_windows:
            return []
        whole = views.whole_windows(w, src.clock(), w.window_s or src.window_s)
        collapsed, dead = views.expert_collapse(w.expert_counts[whole], s.collapse_fraction, s.collapse_windows)
        fams = [GaugeMetricFamily("moeyard:collapsed_experts", "Experts below collapse_fraction x their layer's "
                                  "mean in each of the layer's last collapse_windows load windows with traffic "
                                  "(dead ones included)", labels=["layer"]),
                GaugeMetricFamily("moeyard:dead_experts", "Experts with no token in any of those windows",
                                  labels=["layer"])]
        for layer in range(collapsed.shape[0]):
            fams[0].add_metric([str(layer)], int(collapsed[layer].sum() + dead[layer].sum()))
            fams[1].add_metric([str(layer)], int(dead[layer].sum()))
        if s.per_expert_metrics:
            each = GaugeMetricFamily("moeyard:expert_collapsed", "1 for each collapsed or dead expert",
                                     labels=["layer", "expert", "state"])
            for state, mask in (("collapsed", collapsed), ("dead", dead)):
                for layer, e in mask.nonzero().tolist():
                    each.add_metric([str(layer), str(e), state], 1)
            fams.append(each)
        return fams

    def _balancer(self, snap) -> list[Metric]:
        autoscaler = next((p.summary for p in snap.telemetry if p.component == "autoscaler"), None)
        b = views.balancer_view(snap.events, autoscaler, self.source.clock(), self.source.settings.autoscaler_stall_s)
        fams = []
        if b.seconds_since_rebalance is not None:
            f = GaugeMetricFamily("moeyard:seconds_since_rebalance",
                                  "Seconds since the newest completed rebalance the autoscaler recorded")
            f.add_metric([], b.seconds_since_rebalance)
            fams.append(f)
        if b.seconds_since_turn is not None:
            f = GaugeMetricFamily("moeyard:autoscaler_seconds_since_turn",
                                  "Seconds since the autoscaler's loop last finished a turn (stalled: it grows)")
            f.add_metric([], b.seconds_since_turn)
            fams.append(f)
        return fams

    def _shards(self) -> list[Metric]:
        shards = [s for s in self.source.shards() if s.shard_id >= 0]
        if not shards:
            return []
        fams = {
            "up": GaugeMetricFamily("moeyard:shard_up", "1 if the expert shard answered its status call",
                                    labels=["shard"]),
            "weight": GaugeMetricFamily("moeyard:shard_weight_bytes", "Expert weight bytes a shard holds",
                                        labels=["shard"]),
            "rss": GaugeMetricFamily("moeyard:shard_rss_bytes", "Resident memory of a shard's process",
                                     labels=["shard"]),
            "slots": GaugeMetricFamily("moeyard:shard_slots", "Expert copies a shard holds (all MoE layers)",
                                       labels=["shard"]),
        }
        for s in shards:
            lbl = [str(s.shard_id)]
            fams["up"].add_metric(lbl, 1 if s.healthy else 0)
            if s.healthy:
                fams["weight"].add_metric(lbl, s.weight_bytes)
                fams["rss"].add_metric(lbl, s.rss_bytes)
                fams["slots"].add_metric(lbl, s.slots)
        return list(fams.values())
