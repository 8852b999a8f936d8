"""One expert shard as a plain process (no Ray), over random weights, for the GPU check's stage ``d``.

    python -m bench.shard_process --config-dir DIR --shard S --num-shards N [--device cuda] [--dtype bfloat16]

Holds the experts ``round_robin_placement(L, E, N)`` gives shard ``S`` (weights from
:class:`bench.random_weights.RandomWeights`, the same in every process), prints ``ADDRESS host:port``
once it serves, and serves until its stdin closes (the parent's end of the pipe).
"""

from __future__ import annotations

import argparse
import sys

import torch

import moeyard.source_tree  # noqa: F401  (a bare tree on the GPU machine)
from bench.random_weights import RandomWeights


def main(argv: list[str] | None = None) -> int:
    from moeyard.expert_actors.server import ExpertServer
    from moeyard.model.spec import load_spec
    from moeyard.router_service.placement import round_robin_placement

    ap = argparse.ArgumentParser(prog="python -m bench.shard_process")
    ap.add_argument("--config-dir", required=True)
    ap.add_argument("--shard", type=int, required=True)
    ap.add_argument("--num-shards", type=int, required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    spec = load_spec(args.config_dir)
    placement = round_robin_placement(spec.num_moe_layers, spec.moe.num_experts, args.num_shards)
    server = ExpertServer(args.shard, spec, args.config_dir, args.dtype, placement.shard_slots(args.shard),
                          num_threads=args.threads, device=args.device, reader=RandomWeights(args.device))
    print(f"ADDRESS {server.address}", flush=True)
    sys.stdin.read()
    server.stop(0)
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main())
