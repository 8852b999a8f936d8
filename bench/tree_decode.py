"""Decode tok/s of whichever source tree is on ``PYTHONPATH``: the driver for comparing two commits
interleaved, process by process (docs/benchmarks.md).

    PYTHONPATH=TREE python bench/tree_decode.py engine BATCH   # the in-process engine, 64 new tokens
    PYTHONPATH=TREE python bench/tree_decode.py grpc BATCH     # two ExpertServers over loopback gRPC, 32 new

(run as a file, so an older TREE without this script is measured by it: ``moeyard`` and ``bench.common``
come from TREE).
The bench model, bf16, the bench workload's first BATCH prompts, greedy with EOS ignored, 2 torch threads;
decode tok/s = ``B * (N - 1) / (t(N new) - t(1 new))``, the median of 2 after a warm-up. ``grpc`` also
prints the bytes sent to the shards and what one row per (token, expert) would have sent, where the tree
counts them. Only the engine, the shard server and the transport are used, so an older tree runs too.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

import moeyard.source_tree  # noqa: F401  (the tree on PYTHONPATH, installed or not)
from bench.common import ensure_bench_model, workload


def main(argv: list[str]) -> int:
    from moeyard.attention.engine import EngineConfig, LLMEngine
    from moeyard.attention.sequence import SamplingParams

    mode, batch = argv[0], int(argv[1])
    torch.set_num_threads(2)
    path = ensure_bench_model()
    cleanup, extra, new = [], {}, 64
    if mode == "grpc":
        from moeyard.expert_actors.server import ExpertServer
        from moeyard.model.spec import load_spec
        from moeyard.router_service.grpc_transport import GrpcTransport
        from moeyard.router_service.placement import round_robin_placement

        spec = load_spec(path)
        placement = round_robin_placement(spec.num_moe_layers, spec.moe.num_experts, 2)
        servers = [ExpertServer(s, spec, path, torch.bfloat16, placement.shard_slots(s)) for s in range(2)]
        transport = GrpcTransport({s: srv.address for s, srv in enumerate(servers)}, timeout_s=60)
        extra, new = dict(transport=transport, placement=placement), 32
        cleanup = [transport.close] + [lambda srv=srv: srv.stop(0) for srv in servers]
    engine = LLMEngine(path, EngineConfig(dtype="bfloat16", max_num_seqs=32), **extra)
    prompts = workload()[:batch]

    def run(n: int) -> None:
        engine.generate(prompts, SamplingParams(max_tokens=n, ignore_eos=True))

    run(4)
    rates = []
    for _ in range(2):
        t0 = time.perf_counter()
        run(1)
        t1 = time.perf_counter()
        run(new)
        t2 = time.perf_counter()
        rates.append(batch * (new - 1) / ((t2 - t1) - (t1 - t0)))
    wire = extra.get("transport")
    stats = wire.wire_stats() if wire is not None and hasattr(wire, "wire_stats") else None
    print(statistics.median(rates), "" if stats is None else f"{stats.sent_bytes} {stats.per_assignment_bytes}")
    for fn in cleanup:
        fn()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
