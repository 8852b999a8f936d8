"""What the autoscaler reads each tick: the expert load of the last ``since_s`` seconds, smoothed."""

from __future__ import annotations

import redis
import torch

from moeyard.cluster.control.autoscaler import LoadView
from moeyard.cluster.control.load_store import read_load, smooth


def read_load_view(client: redis.Redis, prefix: str, since_s: float, num_layers: int, num_experts: int,
                   window_s: float, half_life_windows: float) -> LoadView:
    """The windows of the last ``since_s`` seconds in Redis, smoothed over windows (``[L, E]`` float64),
    and the routed (token, expert) assignments per second over them; zeros when there are none.

    ``window_s`` is the configured window length, used when the windows do not say theirs.
    """
    w = read_load(client, prefix, since_s)
    if w.num_windows == 0:
        return LoadView(torch.zeros(num_layers, num_experts, dtype=torch.float64), 0.0)
    span = w.num_windows * (w.window_s or window_s)
    return LoadView(smooth(w.expert_counts.to(torch.float64), half_life_windows),
                    float(w.expert_counts.sum()) / span)
