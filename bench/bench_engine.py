"""In-process engine vs transformers ``generate`` on the bench model, side by side.

    .venv/bin/python -m bench.bench_engine [--repeats 3] [--batches 1,32]

Both run the same prompts (32 x 64 random ids, seed 1234), 64 new greedy tokens,
EOS ignored, bf16, with the same thread count. Throughput is generated tokens
per wall second of the whole generation (prefill included). Batch 1 runs the
first ``--batch1-prompts`` prompts one after another.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from bench.common import ensure_bench_model, timed, workload


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--batch1-prompts", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from attention.engine import EngineConfig, LLMEngine
    from attention.sequence import SamplingParams
    from transformers import AutoModelForCausalLM

    path = ensure_bench_model()
    prompts = workload()
    engine = LLMEngine(path, EngineConfig(dtype="bfloat16", max_num_seqs=64, kv_cache_bytes=1 << 30))
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    params = SamplingParams(max_tokens=args.new_tokens, ignore_eos=True)
    results = []
    for b in [int(x) for x in args.batches.split(",")]:
        if b == 1:
            groups = [[p] for p in prompts[:args.batch1_prompts]]
        else:
            groups = [prompts[i:i + b] for i in range(0, len(prompts), b)][:1]
        n_tokens = sum(len(g) for g in groups) * args.new_tokens

        def run_engine():
            for g in groups:
                engine.generate(g, params)

        def run_hf():
            for g in groups:
                with torch.no_grad():
                    hf.generate(torch.tensor(g), max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                do_sample=False, pad_token_id=0)

        t_eng, _ = timed(run_engine, args.repeats)
        t_hf, _ = timed(run_hf, args.repeats)
        row = {"batch": b, "engine_tok_s": n_tokens / t_eng, "transformers_tok_s": n_tokens / t_hf,
               "ratio": t_hf / t_eng}
        results.append(row)
        print(f"batch {b:3d}: engine {row['engine_tok_s']:8.1f} tok/s   transformers "
              f"{row['transformers_tok_s']:8.1f} tok/s   ratio {row['ratio']:.2f}x", flush=True)
    print(json.dumps({"threads": args.threads, "repeats": args.repeats, "results": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
