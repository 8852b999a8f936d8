"""This machine's roofline, and the bench model's decode step against it.

    .venv/bin/python -m bench.roofline [--refresh] [--batches 1,8,32,128] [--context 96] [--model DIR] [--quick]

Measures (or reads from the cache) the peak matmul FLOP/s in fp32 and bf16 and the memory bandwidth
(``moeyard.model.hardware``), then prints, per batch size, the bench model's decode step floor in each
dtype: FLOP time, weight + KV bytes time, which bounds it, and the tokens/s at the roofline
(``moeyard.model.roofline``). Other benchmarks report their measured steps as a fraction of this floor.
``--model`` takes another checkpoint folder (only its ``config.json`` is read). ``--quick`` measures at
small sizes (CI, rough figures), does not touch the cache and, without ``--model``, uses a tiny model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from bench.common import ensure_bench_model, print_machine, quick_model
from moeyard.model.hardware import local_hardware, measure_local
from moeyard.model.roofline import Hardware, decode_step, roofline
from moeyard.model.spec import ModelSpec, load_spec


def decode_floor_ms(spec: ModelSpec, hw: Hardware, batch: int, context: int, dtype: str) -> float:
    """The roofline time of one decode step, in ms."""
    return roofline(decode_step(spec, batch, context, dtype), hw, dtype).time_s * 1e3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--refresh", action="store_true", help="measure again instead of reading the cache")
    ap.add_argument("--quick", action="store_true", help="small measurement sizes, no cache (CI)")
    ap.add_argument("--batches", default="1,8,32,128")
    ap.add_argument("--model", help="checkpoint folder whose config.json to use (default: the bench model)")
    ap.add_argument("--context", type=int, default=96,
                    help="tokens of context per sequence (the bench workload's middle: 64 + 32)")
    args = ap.parse_args(argv)
    print_machine()
    print(f"threads: {torch.get_num_threads()}")
    hw = measure_local(quick=True) if args.quick else local_hardware(refresh=args.refresh)
    print(f"{hw.source}")
    for name, f in hw.peak_flops.items():
        print(f"  peak matmul {name:>9}: {f / 1e9:8.1f} GFLOP/s")
    d = hw.details
    print(f"  memory bandwidth:     {hw.memory_bandwidth / 1e9:8.1f} GB/s (read {d['read_bandwidth'] / 1e9:.1f},"
          f" copy {d['copy_bandwidth'] / 1e9:.1f})")
    path = Path(args.model) if args.model else (quick_model() if args.quick else ensure_bench_model())
    spec = load_spec(path)
    print(f"\n{path.name} decode step floor, context {args.context}:")
    print(f"{'batch':>6} {'dtype':>9} {'GFLOP':>8} {'MB read':>8} {'FLOP ms':>8} {'byte ms':>8} {'bound':>8}"
          f" {'floor tok/s':>12}")
    rows = []
    for b in [int(x) for x in args.batches.split(",")]:
        for dtype in ("bfloat16", "float32"):
            r = roofline(decode_step(spec, b, args.context, dtype), hw, dtype)
            print(f"{b:>6} {dtype:>9} {r.cost.flops / 1e9:8.2f} {r.cost.bytes / 1e6:8.1f} {r.compute_s * 1e3:8.2f}"
                  f" {r.memory_s * 1e3:8.2f} {r.bound:>8} {r.tokens_per_s:12.0f}")
            rows.append(dict(batch=b, dtype=dtype, floor_ms=r.time_s * 1e3, bound=r.bound,
                             floor_tok_s=r.tokens_per_s))
    print(json.dumps({"hardware": hw.source, "peak_flops": hw.peak_flops,
                      "memory_bandwidth": hw.memory_bandwidth, "decode": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
