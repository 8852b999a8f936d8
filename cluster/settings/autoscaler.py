"""The autoscaler's section of the cluster config (``autoscaler:``)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class AutoscalerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    interval_s: float = Field(2.0, gt=0, description="how often the load is read and a decision taken")
    lookback_s: float = Field(30.0, gt=0, description="load windows considered")
    half_life_windows: float = Field(2.0, gt=0, description="exponential smoothing over windows")
    threshold: float = Field(0.9, gt=0, le=1, description="act when min balancedness stays below this")
    sustain_s: float = Field(6.0, ge=0, description="...for at least this long")
    cooldown_s: float = Field(30.0, ge=0, description="quiet time after a move")
    min_gain: float = Field(0.05, ge=0, description="predicted min-balancedness gain a move must bring")
    min_tokens: int = Field(256, ge=0, description="tokens in the smoothed load needed to act")
    drain_timeout_s: float = Field(10.0, gt=0, description="wait for replicas to switch epochs")
    reconcile_interval_s: float = Field(5.0, gt=0, description="check that shards hold their slots")
    min_shards: int | None = Field(None, ge=1, description="scale the number of expert shards between "
                                                           "min_shards and max_shards (both set: on)")
    max_shards: int | None = Field(None, ge=1)
    scale_up_load: float = Field(0.0, ge=0, description="routed tokens per second per shard above which "
                                                        "a shard is added (0: never)")
    scale_down_load: float = Field(0.0, ge=0, description="...below which the last shard is removed (0: never)")

    @model_validator(mode="after")
    def _bounds(self) -> "AutoscalerSettings":
        if (self.min_shards is None) != (self.max_shards is None):
            raise ValueError("set both min_shards and max_shards to scale shards, or neither")
        if self.min_shards is not None and self.min_shards > self.max_shards:
            raise ValueError(f"min_shards {self.min_shards} > max_shards {self.max_shards}")
        if self.scale_up_load and self.scale_down_load and self.scale_down_load * 2 > self.scale_up_load:
            raise ValueError("scale_down_load must be at most half of scale_up_load (or a shard added at the "
                             "threshold would be removed again)")
        return self
