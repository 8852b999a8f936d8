"""Pure views of the dashboard: collapsed and dead experts over load windows, and the balancer's liveness."""

from __future__ import annotations

import torch

from moeyard.cluster.dashboard.views import balancer_view, expert_collapse


def test_collapse_needs_every_window_below_the_fraction():
    # 4 windows x 2 layers x 4 experts; layer 0: expert 3 never routed (dead), expert 2 at 1 of a mean of
    # 25 each window (collapsed), expert 1 starved in three windows but not the fourth (not flagged)
    counts = torch.tensor([
        [[60, 1, 1, 0], [25, 25, 25, 25]],
        [[60, 1, 1, 0], [25, 25, 25, 25]],
        [[60, 30, 1, 0], [0, 0, 0, 0]],          # layer 1 idle here: skipped, not a break in the run
        [[60, 1, 1, 0], [25, 25, 25, 25]],
    ])
    collapsed, dead = expert_collapse(counts, 0.1, 4)
    assert collapsed.nonzero().tolist() == [[0, 2]] and dead.nonzero().tolist() == [[0, 3]]
    collapsed, dead = expert_collapse(counts[[0, 1, 3]], 0.1, 3)  # the three starved windows alone
    assert collapsed.nonzero().tolist() == [[0, 1], [0, 2]] and dead.nonzero().tolist() == [[0, 3]]
    # layer 1 has 3 windows with traffic: asking for 4 flags nothing there (too little evidence)
    counts[:, 1, 3] = torch.tensor([0, 0, 0, 0])
    collapsed, dead = expert_collapse(counts, 0.1, 4)
    assert not collapsed[1].any() and not dead[1].any()
    assert bool(expert_collapse(counts, 0.1, 3)[1][1, 3])        # three are enough when three are asked for


def test_balancer_view():
    events = [{"kind": "skip", "time": 990.0}, {"kind": "rebalance", "time": 900.0},
              {"kind": "rebalance", "time": 500.0}]
    b = balancer_view(events, {"last_turn": 995.0, "interval_s": 2.0}, 1000.0, 60.0)
    assert (b.seconds_since_rebalance, b.seconds_since_turn, b.stalled) == (100.0, 5.0, False)
    b = balancer_view(events, {"last_turn": 900.0, "interval_s": 2.0}, 1000.0, 60.0)
    assert b.stalled                                            # 100 s > max(60 s, 3 intervals)
    b = balancer_view(events, {"last_turn": 900.0, "interval_s": 50.0}, 1000.0, 60.0)
    assert not b.stalled                                        # a slow loop: 3 intervals (150 s) not yet
    b = balancer_view([{"kind": "rebalance_failed", "time": 999.0}], None, 1000.0, 60.0)
    assert (b.seconds_since_rebalance, b.seconds_since_turn, b.stalled) == (None, None, False)
