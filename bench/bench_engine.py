"""In-process engine vs transformers ``generate`` on the bench model, side by side.

    .venv/bin/python -m bench.bench_engine [--repeats 3] [--batches 1,32]

Both run the same prompts (32 x 64 random ids, seed 1234), 64 new greedy tokens,
EOS ignored, bf16, with the same thread count. Two figures per system:
end-to-end throughput (generated tokens per wall second, prefill included) and
decode throughput: ``B * (N - 1) / (t(N new tokens) - t(1 new token))``, the
same subtraction for both systems, so prefill cost cancels. Batch 1 runs the
first ``--batch1-prompts`` prompts one after another. Medians of ``--repeats``.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from bench.common import batch_groups, ensure_bench_model, print_machine, timed, workload


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--batch1-prompts", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args(argv)
    print_machine()
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    from moeyard.attention.engine import EngineConfig, LLMEngine
    from moeyard.attention.sequence import SamplingParams

    path = ensure_bench_model()
    prompts = workload()
    engine = LLMEngine(path, EngineConfig(dtype="bfloat16", max_num_seqs=64, kv_cache_bytes=1 << 30))
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    results = []
    for b in [int(x) for x in args.batches.split(",")]:
        groups = batch_groups(prompts, b, args.batch1_prompts)
        n_tokens = sum(len(g) for g in groups) * args.new_tokens

        def run_engine(n_new):
            p = SamplingParams(max_tokens=n_new, ignore_eos=True)
            for g in groups:
                engine.generate(g, p)

        def run_hf(n_new):
            for g in groups:
                with torch.no_grad():
                    hf.generate(torch.tensor(g), max_new_tokens=n_new, min_new_tokens=n_new,
                                do_sample=False, pad_token_id=0)

        row = {"batch": b}
        for name, fn in (("engine", run_engine), ("transformers", run_hf)):
            t_full, _ = timed(lambda: fn(args.new_tokens), args.repeats)
            t_one, _ = timed(lambda: fn(1), args.repeats)
            row[f"{name}_tok_s"] = n_tokens / t_full
            row[f"{name}_decode_tok_s"] = n_tokens * (args.new_tokens - 1) / args.new_tokens / (t_full - t_one)
        row["ratio"] = row["engine_tok_s"] / row["transformers_tok_s"]
        row["decode_ratio"] = row["engine_decode_tok_s"] / row["transformers_decode_tok_s"]
        results.append(row)
        print(f"batch {b:3d}: end-to-end engine {row['engine_tok_s']:7.1f} tok/s, transformers "
              f"{row['transformers_tok_s']:7.1f} tok/s ({row['ratio']:.2f}x) | decode engine "
              f"{row['engine_decode_tok_s']:7.1f} tok/s, transformers {row['transformers_decode_tok_s']:7.1f} "
              f"tok/s ({row['decode_ratio']:.2f}x)", flush=True)
    print(json.dumps({"threads": args.threads, "repeats": args.repeats, "results": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
