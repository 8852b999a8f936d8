"""Live rebalance on the bench model: time to apply, bytes moved, inter-token latency during vs steady.

    .venv/bin/python -m bench.bench_rebalance [--batch 32] [--shards 2] [--repeats 3]

Expert shards are real Ray actors with their own gRPC servers; the attention engine
runs in this process with a gRPC transport and a placement follower on a real
``redis-server`` (started here on a free loopback port). A batch of requests
decodes continuously; every step's wall time is one inter-token latency (ITL). After
a steady phase the migrator moves the static placement to the plan for a Zipf(1.2)
load (25% redundant slots), layer by layer, while decoding goes on. Reported:
rebalance seconds, bytes loaded onto shards, slots moved, p50 and tail ITL in steady
state and during the move (the tail is a p99 only over at least 100 steps; over fewer it is
the maximum, and named so), the tails' ratio (goal <= 1.5x), and whether the generated tokens
equal a run that never migrated. Also the planner's balancedness before/after for
that load. Medians over ``--repeats`` (each a fresh migration back and forth).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time

os.environ.setdefault("RAY_AUTH_MODE", "token")

import torch  # noqa: E402

from bench.common import ensure_bench_model, print_machine, workload  # noqa: E402

P99_MIN_SAMPLES = 100
"""Below this many steps a 99th percentile is just the largest sample or the one before it: reported as
the maximum instead."""


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def _tail(xs: list[float]) -> tuple[str, float]:
    """``("p99", value)`` over at least :data:`P99_MIN_SAMPLES` samples, else ``("max", value)``."""
    return ("p99", _pct(xs, 99)) if len(xs) >= P99_MIN_SAMPLES else ("max", max(xs))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steady-steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the engine and of each shard")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                    help="float32 to check tokens: in bf16 a different batch grouping at the shards may "
                         "round differently and near-tied greedy picks part")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    print_machine()

    import ray

    from bench.synthetic_load import zipf_load
    from moeyard.attention.engine import EngineConfig, LLMEngine
    from moeyard.attention.sequence import SamplingParams
    from moeyard.cluster.control.autoscaler import RedisPublisher
    from moeyard.cluster.control.migration import GrpcShardControl, Migrator
    from moeyard.cluster.control.placement_follower import PlacementFollower
    from moeyard.cluster.control.placement_store import write_placement
    from moeyard.cluster.infra.redis_server import LocalRedis
    from moeyard.cluster.serving.shard_actor import create_shard_actor
    from moeyard.model.spec import load_spec
    from moeyard.router_service.grpc_transport import GrpcTransport
    from moeyard.router_service.placement import round_robin_placement
    from moeyard.router_service.planner import min_balancedness, plan_placement

    torch.set_num_threads(args.threads)
    model = ensure_bench_model()
    spec = load_spec(model)
    L, E, N = spec.num_moe_layers, spec.moe.num_experts, args.shards
    S = E // N + max(1, E // N // 4)  # 25% redundant slots (at least one per shard)
    static = round_robin_placement(L, E, N, S)
    load = zipf_load(L, E, 1.2, seed=0)
    target = plan_placement(load, N, S, current=static)

    ray.init(address="local", num_cpus=N + 2, include_dashboard=False, log_to_driver=False)
    redis_dir = tempfile.mkdtemp(prefix="bench-redis-")
    rinfo = LocalRedis.start(redis_dir)
    actors = [create_shard_actor(s, model, static.shard_slots(s), args.dtype, num_threads=args.threads,
                                 num_cpus=1) for s in range(N)]
    ray.get([a.ready.remote() for a in actors], timeout=600)
    addrs = dict(enumerate(ray.get([a.address.remote() for a in actors], timeout=60)))
    transport = GrpcTransport(addrs, timeout_s=120)
    client = rinfo.client()
    prefix = "bench"
    write_placement(client, prefix, static, "bench")
    engine = LLMEngine(model, EngineConfig(dtype=args.dtype, max_num_seqs=args.batch), transport=transport,
                       placement=static)
    disp = engine.router.dispatcher
    follower = PlacementFollower(disp, client, prefix, "bench", L, E, poll_s=0.02)
    disp.on_stale = follower.refresh
    follower.start()
    migrator = Migrator(GrpcShardControl(transport), RedisPublisher(client, prefix, "bench"), drain_timeout_s=30)
    prompts = workload(args.batch)

    def decode_run(n_new: int, migrate_to=None):
        """Run the batch to completion; optionally start a migration after the steady phase."""
        params = SamplingParams(max_tokens=n_new, ignore_eos=True)
        ids = [f"r{time.monotonic_ns()}-{i}" for i in range(len(prompts))]
        for rid, p in zip(ids, prompts):
            engine.add_request(rid, p, params)
        outs = {rid: [] for rid in ids}
        steps: list[tuple[float, float]] = []
        mig: dict = {}
        th = None
        n = 0
        while engine.has_unfinished():
            t0 = time.perf_counter()
            for o in engine.step():
                outs[o.request_id].extend(o.new_token_ids)
            t1 = time.perf_counter()
            steps.append((t0, t1))
            n += 1
            if migrate_to is not None and n == args.steady_steps and th is None:
                def run():
                    mig["t0"] = time.perf_counter()
                    mig["placement"], mig["report"] = migrator.apply(disp.placement, migrate_to)
                    mig["t1"] = time.perf_counter()
                th = threading.Thread(target=run)
                th.start()
        if th is not None:
            th.join()
        return [outs[r] for r in ids], steps[1:], mig  # the first step is the prefill

    reference, _, _ = decode_run(96)
    results = []
    from moeyard.router_service.placement import Placement

    for i in range(args.repeats):  # there and back again: every repeat moves the same slots
        dest = Placement((target if i % 2 == 0 else static).phy2log, N)
        toks, steps, mig = decode_run(96, migrate_to=dest)
        assert "report" in mig, "the migration did not finish before decoding did: raise the token count"
        during = [b - a for a, b in steps if b > mig["t0"] and a < mig["t1"]]
        steady = [b - a for a, b in steps if b <= mig["t0"] or a >= mig["t1"]]
        rep = mig["report"]
        steady_tail, during_tail = _tail(steady), _tail(during)
        results.append(dict(rebalance_s=mig["t1"] - mig["t0"], bytes_loaded=rep.bytes_loaded,
                            slots_moved=rep.slots_moved, layers=len(rep.layers_moved),
                            steps_steady=len(steady), steps_during=len(during),
                            itl_steady_p50_ms=1e3 * _pct(steady, 50), itl_during_p50_ms=1e3 * _pct(during, 50),
                            itl_steady_max_ms=1e3 * max(steady), itl_during_max_ms=1e3 * max(during),
                            itl_steady_tail=steady_tail[0], itl_steady_tail_ms=1e3 * steady_tail[1],
                            itl_during_tail=during_tail[0], itl_during_tail_ms=1e3 * during_tail[1],
                            tokens_equal=toks == reference))

    med = {k: statistics.median(r[k] for r in results) for k in results[0]
           if not isinstance(results[0][k], (bool, str))}
    med["itl_tail_ratio_during_vs_steady"] = med["itl_during_tail_ms"] / med["itl_steady_tail_ms"]
    tails = {(r["itl_steady_tail"], r["itl_during_tail"]) for r in results}
    med["itl_tail_is"] = " / ".join(f"steady {a}, during {b}" for a, b in sorted(tails))
    summary = {
        "command": "python -m bench.bench_rebalance " + " ".join(argv or []),
        "shape": {"layers": L, "experts": E, "shards": N, "slots_per_shard": S, "batch": args.batch,
                  "dtype": args.dtype},
        "planner_zipf1.2_min_balancedness_static": min_balancedness(load, static),
        "planner_zipf1.2_min_balancedness_after": min_balancedness(load, target),
        "median": med, "runs": results, "all_tokens_equal": all(r["tokens_equal"] for r in results),
    }
    follower.stop()
    transport.close()
    for a in actors:
        ray.kill(a)
    LocalRedis.stop(rinfo)
    ray.shutdown()
    if args.json:
        print(json.dumps(summary))
    else:
        print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
