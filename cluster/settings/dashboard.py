"""Typed settings of the dashboard and of the metrics it exports."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class DashboardSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    host: str = Field("127.0.0.1", description="bind address; loopback unless told otherwise")
    port: int = Field(0, ge=0, le=65535, description="0 = any free port (`moeyard up` prints it)")
    token_file: str | None = Field(
        None, description="file holding the dashboard token; default: the API token file (same token)")
    lookback_s: float = Field(300.0, gt=0, le=86400, description="default history the page shows")
    max_lookback_s: float = Field(3600.0, gt=0, le=86400, description="the most a query may ask for")
    heatmap_span_s: float = Field(30.0, gt=0,
                                  description="the heatmap averages the newest whole windows over this span")
    hot_factor: float = Field(2.0, gt=1, description="an expert is hot at this multiple of its layer's mean rate")
    collapse_fraction: float = Field(
        0.1, gt=0, lt=1, description="an expert is collapsed when its tokens stay below this fraction of its "
                                     "layer's mean in each of collapse_windows windows (dead: none at all)")
    collapse_windows: int = Field(6, ge=1, description="consecutive load windows (with traffic in the layer) an "
                                                      "expert must stay below collapse_fraction to be flagged")
    autoscaler_stall_s: float = Field(
        60.0, gt=0, description="warn when the autoscaler's loop has not finished a turn for this long (and for "
                                "3 of its intervals)")
    per_expert_metrics: bool = Field(
        False, description="export expert tokens per (layer, expert) on /metrics too (L x E series per replica)")
    telemetry_interval_s: float = Field(1.0, gt=0, description="how often replicas and the autoscaler publish")
    shard_status_ttl_s: float = Field(2.0, ge=0, description="cache of shard status calls")
