"""One MoE layer's expert projection: our AMX grouped-linear kernel against one prepacked oneDNN call per expert.

    .venv/bin/python -m bench.bench_amx [--repeats 7] [--rows 1,8,32,128,512] [--threads N]

The bench model's shapes (8 experts, D 1024, I 2816): the gate/up projection ``[2I, D]`` and the down
projection ``[D, I]`` of every expert, with the same number of rows per expert (decode: a few; a prefill
of 2048 tokens at top-2: 512). ``amx``: ``model/amx.py``'s one call for all experts; ``onednn``: one
``PackedLinear`` call per expert (``cpu_matmul: packed``). Interleaved repeat by repeat, first place
alternating; medians with (min-max) in ms, and the medians as GFLOP/s and weight GB/s; the CPU model
first. Where the AMX kernel cannot run it says why and exits 0 (``--quick``: tiny shapes, CI).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.common import print_machine

EXPERTS, HIDDEN, INTER = 8, 1024, 2816


def _summary(xs: list[float]) -> str:
    return f"{1e3 * statistics.median(xs):.2f} ({1e3 * min(xs):.2f}-{1e3 * max(xs):.2f})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--rows", default="1,8,32,128,512", help="rows per expert, comma-separated")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--quick", action="store_true", help="tiny shapes, 1 repeat (CI)")
    args = ap.parse_args(argv)
    print_machine()
    from moeyard.model import amx
    from moeyard.model.amx import pack_weight
    from moeyard.model.cpu_matmul import PackedLinear

    why = amx.unavailable()
    if why is not None:
        print(f"the AMX kernel cannot run here: {why}")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    experts, hidden, inter = (2, 64, 96) if args.quick else (EXPERTS, HIDDEN, INTER)
    repeats = 1 if args.quick else args.repeats
    rows = [int(r) for r in args.rows.split(",")] if not args.quick else [1, 40]
    g = torch.Generator().manual_seed(0)
    print(f"threads {torch.get_num_threads()}; {experts} experts, D {hidden}, I {inter}, bf16; "
          f"{repeats} repeats, medians (min-max) in ms")
    print("| projection | rows / expert | onednn ms | amx ms | amx / onednn time | onednn GFLOP/s | amx GFLOP/s "
          "| amx weight GB/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, (n, k) in (("gate/up [2I, D]", (2 * inter, hidden)), ("down [D, I]", (hidden, inter))):
        weights = [(torch.randn(n, k, generator=g) * 0.02).to(torch.bfloat16) for _ in range(experts)]
        packed = [PackedLinear(w) for w in weights]
        tiles = [pack_weight(w) for w in weights]
        wbytes = sum(w.nbytes for w in weights)
        del weights
        for per in rows:
            x = torch.randn(per * experts, k, generator=g).to(torch.bfloat16)
            counts = [per] * experts

            def onednn(x=x, per=per):
                for e in range(experts):
                    packed[e](x[e * per:(e + 1) * per])

            def ours(x=x, counts=counts):
                amx.grouped_linear(x, counts, tiles)

            onednn()
            ours()                                     # warm-up (oneDNN compiles its kernels per shape)
            times: dict[str, list[float]] = {"onednn": [], "amx": []}
            systems = [("onednn", onednn), ("amx", ours)]
            for r in range(repeats):
                for label, fn in (systems if r % 2 == 0 else systems[::-1]):
                    t0 = time.perf_counter()
                    fn()
                    times[label].append(time.perf_counter() - t0)
            flop = 2 * per * experts * n * k
            to, ta = statistics.median(times["onednn"]), statistics.median(times["amx"])
            print(f"| {name} | {per} | {_summary(times['onednn'])} | {_summary(times['amx'])} | {ta / to:.2f}x "
                  f"| {flop / to / 1e9:.0f} | {flop / ta / 1e9:.0f} | {wbytes / ta / 1e9:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
