"""Planner benchmark: time at DeepSeek-V3 scale and balancedness under Zipf(1.2) skew.

    .venv/bin/python bench/bench_planner.py [--layers 61 --experts 256 --shards 64 --slots-per-shard 5]

Load: per layer, 2**20 tokens drawn over the experts with Zipf(1.2) popularity in a random
expert order (seed 0). Defaults give P = 320 slots = 25% redundant. Goals: plan < 1 s,
min balancedness after >= 0.95.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np
import torch

from bench.common import print_machine
from bench.synthetic_load import zipf_load
from moeyard.router_service.placement import round_robin_placement
from moeyard.router_service.planner import count_moves, greedy_baseline, min_balancedness, plan_placement


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=61)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--shards", type=int, default=64)
    ap.add_argument("--slots-per-shard", type=int, default=5)
    ap.add_argument("--zipf", type=float, default=1.2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    print_machine()
    torch.set_num_threads(args.threads)
    L, E, N, S = args.layers, args.experts, args.shards, args.slots_per_shard
    load = zipf_load(L, E, args.zipf, tokens=1 << 20)
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        plan = plan_placement(load, N, S)
        times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    replan = plan_placement(load, N, S, current=plan)
    t_replan = time.perf_counter() - t0
    drift = load * torch.tensor(np.random.default_rng(1).uniform(0.8, 1.2, size=load.shape))
    moved = count_moves(plan, plan_placement(drift, N, S, current=plan))
    moved_fresh = count_moves(plan, plan_placement(drift, N, S))
    res = {
        "command": " ".join([sys.executable.rsplit("/", 1)[-1], "bench/bench_planner.py", *sys.argv[1:]]),
        "shape": {"layers": L, "experts": E, "shards": N, "slots_per_shard": S, "slots": N * S,
                  "redundant": N * S - E, "zipf": args.zipf},
        "plan_s_median": statistics.median(times), "plan_s_max": max(times),
        "replan_with_current_s": t_replan, "replan_same_load_moves": count_moves(plan, replan),
        "moves_after_20pct_drift_with_current": moved, "moves_after_20pct_drift_fresh": moved_fresh,
        "balancedness_before_static": min_balancedness(load, round_robin_placement(L, E, N, S)),
        "balancedness_greedy_baseline": min_balancedness(load, greedy_baseline(load, N, S)),
        "balancedness_after": min_balancedness(load, plan),
    }
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
