"""Cluster vs in-process engine on the bench model, side by side in one run.

    .venv/bin/python -m bench.bench_cluster [--batches 1,16,64] [--new-tokens 32] [--repeats 5]

(a) the in-process engine (all experts local), (b) the cluster with 1
attention replica and 4 expert shards, overlap off, (c) the same with overlap
on (``overlap_mode: adaptive``: the replica measures whole and split steps and
keeps the faster), and (c') overlap on with every step split
(``overlap_mode: always``, ``--variants off,on,always``). Same prompts (the
bench workload, seed 1234), greedy, EOS ignored, bf16. Decode throughput uses the same subtraction as
bench_engine (``B * (N - 1) / (t(N) - t(1))``). Inter-token latency (ITL) means the same for every
system: the gap between two consecutive token deliveries of one request, the first (after the prefill)
excluded, pooled over the requests of a run; the cluster's deliveries are the streamed chunks its client
receives, the in-process engine's are the steps that give a request a token.

Each point runs ``--repeats`` times and is reported as the median (min-max) over the repeats. The
cluster variants are deployed one after the other (each is a full Serve application); while one is up,
its runs and the in-process engine's alternate run by run, first place rotating, so each cluster/
in-process ratio comes from interleaved runs. Variants are not interleaved with each other.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time

import torch

from bench.common import ensure_bench_model, print_machine, workload
from bench.cpu_accounting import CpuMeter, cpu_by_role

os.environ.setdefault("RAY_AUTH_MODE", "token")


def _engine_run(engine, prompts, n_new):
    from moeyard.attention.sequence import SamplingParams

    params = SamplingParams(max_tokens=n_new, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"b{time.monotonic_ns()}-{i}", p, params)
    gaps: list[float] = []
    last: dict[str, float] = {}   # request -> when its previous token was delivered
    t0 = time.perf_counter()
    while engine.has_unfinished():
        outs = engine.step()
        now = time.perf_counter()
        for o in outs:
            if not o.new_token_ids:
                continue
            if o.request_id in last:
                gaps.append(now - last[o.request_id])
            last[o.request_id] = now
    return time.perf_counter() - t0, gaps


async def _cluster_run(addr, token, prompts, n_new):
    from moeyard.client import AsyncMoeyardClient

    client = AsyncMoeyardClient(addr, token=token, timeout=600)
    gaps: list[float] = []

    async def one(p):
        last = None
        async for _ in client.generate(p, max_new_tokens=n_new, ignore_eos=True):
            now = time.perf_counter()
            if last is not None:
                gaps.append(now - last)
            last = now

    t0 = time.perf_counter()
    await asyncio.gather(*[one(p) for p in prompts])
    dt = time.perf_counter() - t0
    await client.close()
    return dt, gaps


def _measure(run, prompts, n_new, meter: CpuMeter):
    """One repeat of one point: a 1-token run and a full run (for the decode subtraction)."""
    t_one, _ = run(prompts, 1)
    before = meter.sample()
    t_full, gaps = run(prompts, n_new)
    spent = cpu_by_role(before, meter.sample())
    b = len(prompts)
    return {"tok_s": b * n_new / t_full, "decode_tok_s": b * (n_new - 1) / max(t_full - t_one, 1e-9),
            "itl_ms_median": 1000 * statistics.median(gaps) if gaps else None,
            # where the cores went during the full run: CPU ms per engine step, per role
            "cpu_ms_per_step": {role: round(1000 * sec / n_new, 1) for role, sec in spent.items() if sec > 0},
            "busy_cores": round(sum(spent.values()) / t_full, 2)}


def _summarise(runs: list[dict]) -> dict:
    """Repeats of one point -> medians, each with its min-max, the runs kept; CPU accounting of the median
    run (by decode throughput)."""
    out: dict = {"repeats": len(runs)}
    for k in ("tok_s", "decode_tok_s", "itl_ms_median"):
        xs = [r[k] for r in runs if r[k] is not None]
        if xs:
            out[k], out[k + "_min"], out[k + "_max"], out[k + "_runs"] = statistics.median(xs), min(xs), max(xs), xs
    mid = sorted(runs, key=lambda r: r["decode_tok_s"])[len(runs) // 2]
    out["cpu_ms_per_step"], out["busy_cores"] = mid["cpu_ms_per_step"], mid["busy_cores"]
    return out


def _spread(r: dict, k: str) -> str:
    return f"{r[k]:.1f} ({r[k + '_min']:.1f}-{r[k + '_max']:.1f})"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--variants", default="off,on,always",
                    help="cluster variants to run: off, on (adaptive overlap), always (every step split)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of every shard and replica process")
    ap.add_argument("--repeats", type=int, default=5, help="runs of every point (median and min-max reported)")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    print_machine()
    import ray
    from ray import serve

    from moeyard.attention.engine import EngineConfig, LLMEngine
    from moeyard.cluster.config import ClusterConfig, EngineSettings
    from moeyard.cluster.serving.app import APP_NAME, build_app

    path = ensure_bench_model()
    batches = [int(x) for x in args.batches.split(",")]
    prompts_all = workload(n_prompts=max(batches))
    torch.set_num_threads(os.cpu_count())
    engine = LLMEngine(path, EngineConfig(dtype="bfloat16", max_num_seqs=max(batches)))
    meter = CpuMeter()
    runs: dict[str, dict[int, list[dict]]] = {k: {b: [] for b in batches} for k in (
        "a_in_process", "b_cluster_overlap_off", "c_cluster_overlap_on", "c_cluster_overlap_always")}
    for b in batches:
        _engine_run(engine, prompts_all[:b], 2)  # warm-up
    in_process = lambda p, n: _engine_run(engine, p, n)  # noqa: E731

    ray.init(address="local", num_cpus=16, include_dashboard=False, log_to_driver=False)
    serve.start(proxy_location="Disabled")
    token_file = "/tmp/moeyard-bench-token"
    with open(token_file, "w") as f:
        f.write("bench-token")
    try:
        variants = [(k, o, m) for k, o, m, name in (("b_cluster_overlap_off", False, "adaptive", "off"),
                                                    ("c_cluster_overlap_on", True, "adaptive", "on"),
                                                    ("c_cluster_overlap_always", True, "always", "always"))
                    if name in args.variants.split(",")]
        for key, overlap, mode in variants:
            cfg = ClusterConfig(model=str(path), dtype="bfloat16", expert_shards=args.shards,
                                redundant_slots_per_shard=0, attention_replicas=1, overlap=overlap,
                                overlap_mode=mode,
                                torch_threads=args.threads, api_token_file=token_file,
                                engine=EngineSettings(max_num_seqs=max(batches)))
            serve.run(build_app(cfg), name=APP_NAME, route_prefix=None)
            addr = serve.get_app_handle(APP_NAME).address.remote().result(timeout_s=300)
            cluster = lambda p, n: asyncio.run(_cluster_run(addr, "bench-token", p, n))  # noqa: E731
            for b in batches:
                cluster(prompts_all[:b], 12)  # warm-up; lets the adaptive replica probe both modes (4 steps each)
            for r in range(args.repeats):
                for b in batches:
                    order = [("a_in_process", in_process), (key, cluster)]
                    for name, run in (order if r % 2 == 0 else order[::-1]):
                        runs[name][b].append(_measure(run, prompts_all[:b], args.new_tokens, meter))
                        print(name, b, f"repeat {r + 1}", runs[name][b][-1], flush=True)
            serve.delete(APP_NAME)
    finally:
        serve.shutdown()
        ray.shutdown()
    if not variants:  # the in-process engine alone
        for r in range(args.repeats):
            for b in batches:
                runs["a_in_process"][b].append(_measure(in_process, prompts_all[:b], args.new_tokens, meter))
    results = {k: {b: _summarise(rs) for b, rs in per_b.items() if rs} for k, per_b in runs.items()}
    print(f"\n{args.repeats} repeats per point; medians (min-max). decode tok/s, and ITL ms:")
    for b in batches:
        a = results["a_in_process"][b]
        line = f"batch {b:3d}: in-process {_spread(a, 'decode_tok_s')}, ITL {_spread(a, 'itl_ms_median')}"
        for key, _, _ in variants:
            c = results[key][b]
            line += (f" | {key} {_spread(c, 'decode_tok_s')} ({c['decode_tok_s'] / a['decode_tok_s']:.2f}x), "
                     f"ITL {_spread(c, 'itl_ms_median')}")
        print(line)
    print("\nCPU ms per step by role (full run; busy cores = CPU seconds / wall seconds):")
    for key, per_b in results.items():
        for b, r in per_b.items():
            top = ", ".join(f"{role} {ms:.1f}" for role, ms in list(r["cpu_ms_per_step"].items())[:8])
            print(f"  {key} batch {b}: busy {r['busy_cores']:.2f} cores | {top}")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
