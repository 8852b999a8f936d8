"""Cluster vs in-process engine on the bench model, side by side in one run.

    .venv/bin/python -m bench.bench_cluster [--batches 1,16,64] [--new-tokens 32]

(a) the in-process engine (all experts local), (b) the cluster with 1
attention replica and 4 expert shards, overlap off, (c) the same with overlap
on (``overlap_mode: adaptive``: the replica measures whole and split steps and
keeps the faster), and (c') overlap on with every step split
(``overlap_mode: always``, ``--variants off,on,always``). Same prompts (the
bench workload, seed 1234), greedy, EOS ignored, bf16. Decode throughput uses the same subtraction as bench_engine
(``B * (N - 1) / (t(N) - t(1))``); inter-token latency is the median gap
between streamed chunks of a request (cluster) or between steps (in-process).
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
    gaps, last = [], None
    t0 = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
        now = time.perf_counter()
        if last is not None:
            gaps.append(now - last)
        last = now
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--variants", default="off,on,always",
                    help="cluster variants to run: off, on (adaptive overlap), always (every step split)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of every shard and replica process")
    args = ap.parse_args(argv)
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
    results = {"a_in_process": {}, "b_cluster_overlap_off": {}, "c_cluster_overlap_on": {},
               "c_cluster_overlap_always": {}}
    for b in batches:
        _engine_run(engine, prompts_all[:b], 2)  # warm-up
        results["a_in_process"][b] = _measure(lambda p, n, engine=engine: _engine_run(engine, p, n), prompts_all[:b],
                                               args.new_tokens,
                                               meter)
        print("in-process", b, results["a_in_process"][b], flush=True)
    del engine

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
            for b in batches:
                run = lambda p, n: asyncio.run(_cluster_run(addr, "bench-token", p, n))  # noqa: E731
                run(prompts_all[:b], 12)  # warm-up; lets the adaptive replica probe both modes (4 steps each)
                results[key][b] = _measure(run, prompts_all[:b], args.new_tokens, meter)
                print(key, b, results[key][b], flush=True)
            serve.delete(APP_NAME)
    finally:
        serve.shutdown()
        ray.shutdown()
    for b in batches:
        a = results["a_in_process"][b]
        line = f"batch {b:3d}: decode tok/s in-process {a['decode_tok_s']:7.1f}"
        for key, _, _ in variants:
            c = results[key][b]
            line += f" | {key} {c['decode_tok_s']:7.1f} ({c['decode_tok_s'] / a['decode_tok_s']:.2f}x)"
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
