"""In-process engine vs transformers ``generate`` on the bench model, side by side, interleaved.

    .venv/bin/python -m bench.bench_engine [--repeats 5] [--batches 1,32] [--quick]

Both run the same prompts (32 x 64 random ids, seed 1234), 64 new greedy tokens, EOS ignored, bf16, at
the same thread count. Two figures per system: end-to-end throughput (generated tokens per wall second,
prefill included) and decode throughput ``B * (N - 1) / (t(N new) - t(1 new))``, the same subtraction
for both, so prefill cost cancels. Batch 1 runs the first ``--batch1-prompts`` prompts one after
another.

Fairness: after a warm-up of each, the systems take turns run by run, who goes first rotating every
repeat, so noise on a shared machine hits them alike; medians with (min-max) over ``--repeats`` (at
least 5 for a result worth quoting). ``transformers`` gets its best CPU settings: SDPA attention, and the
faster of a static and a dynamic KV cache at each batch size (timed once after the warm-up; the choice is
printed); ``torch.compile`` is left out (compiling the generate loop of a MoE model took minutes on these
CPUs). The decode step is also shown as a fraction of this machine's roofline (``bench/roofline.py``).

``--quick`` (CI): a tiny model of the bench model's family, 4 prompts, 8 new tokens, one repeat: it keeps
the benchmark from rotting, its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from bench.common import (
    batch_groups,
    decode_roofline_tok_s,
    ensure_bench_model,
    print_machine,
    quick_model,
    workload,
)


def _summary(xs: list[float]) -> str:
    return f"{statistics.median(xs):.1f} ({min(xs):.1f}-{max(xs):.1f})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--batch1-prompts", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--quick", action="store_true", help="tiny model, 4 prompts, 8 tokens, 1 repeat (CI)")
    ap.add_argument("--also", default="", help="more systems in the same rotation, comma-separated: 'packed' or "
                                               "'plain' (our engine with that cpu_matmul), 'deterministic' "
                                               "(ours with deterministic=True)")
    args = ap.parse_args(argv)
    print_machine()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.repeats, args.new_tokens, args.batches = 1, 8, "1,4"

    from transformers import AutoModelForCausalLM

    from moeyard.attention.engine import EngineConfig, LLMEngine
    from moeyard.attention.sequence import SamplingParams

    path = quick_model() if args.quick else ensure_bench_model()
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    prompts = workload(n_prompts=4 if args.quick else 32, prompt_len=16 if args.quick else 64, vocab=vocab)
    def make_engine(matmul: str = "auto", deterministic: bool = False) -> LLMEngine:
        return LLMEngine(path, EngineConfig(dtype="bfloat16", max_num_seqs=64, kv_cache_bytes=1 << 30,
                                            enable_prefix_caching=False, cpu_matmul=matmul,
                                            deterministic=deterministic))

    also = [a for a in args.also.split(",") if a]
    unknown = set(also) - {"packed", "plain", "deterministic"}
    if unknown:
        ap.error(f"--also: unknown system(s) {sorted(unknown)}; choose from packed, plain, deterministic")
    engine = make_engine()
    extra = {f"ours_{a}": make_engine(**({"deterministic": True} if a == "deterministic" else {"matmul": a}))
             for a in also}
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    print(f"threads {args.threads}; ours: cpu_matmul {engine.matmul}, attention {engine.config.attention_backend}; "
          f"transformers: sdpa, no torch.compile; {args.repeats} repeats, first place rotating")
    results = []
    for b in [int(x) for x in args.batches.split(",")]:
        groups = batch_groups(prompts, b, args.batch1_prompts)
        n_tokens = sum(len(g) for g in groups) * args.new_tokens

        def ours_runner(eng: LLMEngine):
            def run(n_new: int) -> None:
                p = SamplingParams(max_tokens=n_new, ignore_eos=True)
                for g in groups:
                    eng.generate(g, p)
            return run

        run_ours = ours_runner(engine)

        def hf_runner(cache: str):
            def run(n_new: int) -> None:
                for g in groups:
                    with torch.no_grad():
                        hf.generate(torch.tensor(g), max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                                    pad_token_id=0, cache_implementation=cache)
            return run

        def once(fn) -> float:
            t0 = time.perf_counter()
            fn(args.new_tokens)
            return time.perf_counter() - t0

        run_ours(args.new_tokens)                                  # warm-up
        for eng in extra.values():
            ours_runner(eng)(args.new_tokens)
        caches = {c: hf_runner(c) for c in ("static", "dynamic")}
        for fn in caches.values():
            fn(args.new_tokens)                                    # warm-up (a static cache compiles nothing)
        probe = {c: once(fn) for c, fn in caches.items()}
        cache = min(probe, key=probe.get)
        systems = {"ours": run_ours, "transformers": caches[cache]}
        systems.update({name: ours_runner(eng) for name, eng in extra.items()})
        times: dict[tuple[str, int], list[float]] = {(s, n): [] for s in systems for n in (args.new_tokens, 1)}
        names = list(systems)
        for r in range(args.repeats):
            order = names[r % len(names):] + names[:r % len(names)]
            for n_new in (args.new_tokens, 1):
                for s in order:
                    t0 = time.perf_counter()
                    systems[s](n_new)
                    times[(s, n_new)].append(time.perf_counter() - t0)
        row = {"batch": b, "transformers_cache": cache, "transformers_cache_probe_s": probe}
        for s in systems:
            full, one = times[(s, args.new_tokens)], times[(s, 1)]
            row[f"{s}_tok_s_runs"] = [n_tokens / t for t in full]
            # decode per repeat from that repeat's pair of runs, so the spread is the runs' own
            row[f"{s}_decode_tok_s_runs"] = [n_tokens * (args.new_tokens - 1) / args.new_tokens / max(f - o, 1e-9)
                                             for f, o in zip(full, one)]
            row[f"{s}_tok_s"] = statistics.median(row[f"{s}_tok_s_runs"])
            row[f"{s}_decode_tok_s"] = statistics.median(row[f"{s}_decode_tok_s_runs"])
        row["ratio"] = row["ours_tok_s"] / row["transformers_tok_s"]
        row["decode_ratio"] = row["ours_decode_tok_s"] / row["transformers_decode_tok_s"]
        notes = []
        for name in extra:
            row[f"ours_over_{name}_decode"] = row["ours_decode_tok_s"] / row[f"{name}_decode_tok_s"]
            row[f"ours_over_{name}_tok_s"] = row["ours_tok_s"] / row[f"{name}_tok_s"]
            notes.append(f" | {name}: end-to-end {_summary(row[f'{name}_tok_s_runs'])}, decode "
                         f"{_summary(row[f'{name}_decode_tok_s_runs'])}; ours / {name} end-to-end "
                         f"{row[f'ours_over_{name}_tok_s']:.2f}x, decode {row[f'ours_over_{name}_decode']:.2f}x")
        ctx = len(prompts[0]) + args.new_tokens // 2
        floor = decode_roofline_tok_s(path, b, ctx) if not args.quick else None
        row["roofline_decode_tok_s"] = floor
        results.append(row)
        roof = "" if floor is None else (f" | roofline {floor:.0f} tok/s: ours {row['ours_decode_tok_s'] / floor:.0%}, "
                                         f"transformers {row['transformers_decode_tok_s'] / floor:.0%}")
        print(f"batch {b:3d}: end-to-end tok/s ours {_summary(row['ours_tok_s_runs'])}, transformers "
              f"({cache} cache) {_summary(row['transformers_tok_s_runs'])} ({row['ratio']:.2f}x) | decode tok/s "
              f"ours {_summary(row['ours_decode_tok_s_runs'])}, transformers "
              f"{_summary(row['transformers_decode_tok_s_runs'])} ({row['decode_ratio']:.2f}x){roof}{''.join(notes)}",
              flush=True)
    print(json.dumps({"threads": args.threads, "repeats": args.repeats, "quick": args.quick, "results": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
