"""Where one decode step's time goes in the cluster's data path.

    .venv/bin/python -m bench.bench_breakdown [--batch 16] [--steps 10] [--shards 4]

Runs the bench model's engine in this process (1 torch thread, as a replica)
against ``--shards`` expert shard actors over gRPC (overlap off), and times
each stage of the MoE data path by wrapping the stage functions (no changes to
the serving code): gate, dispatch planning, serialisation, the wait for the
shards (network + remote compute), deserialisation, combine, attention. Server
side expert compute comes from the shards' own counters (Status).
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import time

import torch

from bench.common import print_machine

os.environ.setdefault("RAY_AUTH_MODE", "token")

TIMES: dict[str, float] = collections.defaultdict(float)


def _timed(name, fn):
    @functools.wraps(fn)
    def wrapper(*a, **kw):
        t0 = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            TIMES[name] += time.perf_counter() - t0
    return wrapper


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--shards", type=int, default=4)
    args = ap.parse_args(argv)
    print_machine()
    import ray

    import moeyard.attention.model_runner as mr
    import moeyard.router_service.dispatch as dispatch
    import moeyard.router_service.grpc_transport as gt
    import moeyard.router_service.moe_router as moe_router
    from bench.common import ensure_bench_model, workload
    from moeyard.attention.engine import EngineConfig, LLMEngine
    from moeyard.attention.sequence import SamplingParams
    from moeyard.cluster.serving.shard_actor import create_shard_actor
    from moeyard.model.spec import load_spec
    from moeyard.router_service.placement import round_robin_placement

    torch.set_num_threads(1)
    path = ensure_bench_model()
    spec = load_spec(path)
    placement = round_robin_placement(spec.num_moe_layers, spec.moe.num_experts, args.shards)
    ray.init(address="local", num_cpus=16, include_dashboard=False, log_to_driver=False)
    try:
        actors = [create_shard_actor(s, str(path), placement.shard_slots(s), "bfloat16", num_cpus=1)
                  for s in range(args.shards)]
        addrs = ray.get([a.address.remote() for a in actors], timeout=300)
        transport = gt.GrpcTransport(dict(enumerate(addrs)))
        engine = LLMEngine(path, EngineConfig(dtype="bfloat16", max_num_seqs=args.batch), transport=transport,
                           placement=placement)
        moe_router.gate = _timed("gate", moe_router.gate)
        dispatch.plan_dispatch = _timed("dispatch plan", dispatch.plan_dispatch)
        dispatch.combine = _timed("combine", dispatch.combine)
        gt.encode_compute_request = _timed("serialise", gt.encode_compute_request)
        gt.decode_compute_response = _timed("deserialise (grpc thread)", gt.decode_compute_response)
        finish = dispatch.ExpertDispatcher.finish
        dispatch.ExpertDispatcher.finish = _timed("wait + combine", finish)
        mr.ModelRunner._attention = _timed("attention (norm + attn)", mr.ModelRunner._attention)
        for i, p in enumerate(workload(n_prompts=args.batch)):
            engine.add_request(str(i), p, SamplingParams(max_tokens=args.steps + 4, ignore_eos=True))
        while any(s.in_prefill for s in engine.scheduler.running) or engine.scheduler.waiting or \
                not engine.scheduler.running:
            engine.step()
        engine.step()
        TIMES.clear()
        before = sum(transport.status(s)["compute_seconds"] for s in range(args.shards))
        t0 = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        total = time.perf_counter() - t0
        after = sum(transport.status(s)["compute_seconds"] for s in range(args.shards))
        per_step = {k: 1000 * v / args.steps for k, v in TIMES.items()}
        per_step["wait for shards (network + remote compute)"] = per_step.pop("wait + combine") - per_step["combine"]
        per_step["expert compute on shards (sum over shards)"] = 1000 * (after - before) / args.steps
        per_step["step total"] = 1000 * total / args.steps
        print(f"decode step at batch {args.batch}, {args.shards} shards, {spec.num_moe_layers} MoE layers "
              f"(ms per step; divide by {spec.num_moe_layers} for per layer):")
        for k, v in per_step.items():
            print(f"  {k:48s} {v:8.2f}")
        print(json.dumps({"batch": args.batch, "shards": args.shards, "ms_per_step": per_step}))
        transport.close()
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
