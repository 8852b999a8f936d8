"""Paged attention on the CPU: the paged kernel against the reference, MLA absorbed against expanded,
and the engine's decode with each.

    .venv/bin/python -m bench.bench_attention [--repeats 5] [--parts kernel,mla,engine] [--threads N]

* ``kernel``: one attention call (no projections) at the bench model's shape (16 heads, 4 KV heads,
  head 64), batch 32, one new token per sequence at contexts 128, 1024 and 4096, bf16 and fp32:
  ``paged`` (tile by tile through the block tables) against ``gather`` (each sequence's whole context
  copied, masked densely: the engine's path before the paged kernels) and ``recurrence`` (the same tiles as
  matmuls with the online softmax written out: the CPU's paged path before it went through torch's flash
  kernel, and the path of devices without Triton).
* ``prefill``: the same kernels on prefill chunks (a 512- and a 2048-token prompt, four 256-token chunks
  with 768 tokens of history), bf16 and fp32.
* ``mla``: one DeepSeek-V2-Lite-shaped attention layer (D 2048, 16 heads, latent 512 + rope 64,
  nope 128, v 128; projections included), batch 32, context 1024, fp32: absorbed (attention in the
  latent space) against expanded (the reference), time and the call's peak allocation.
* ``engine``: the bench model, bf16, 32 prompts x 64 ids, 64 new greedy tokens at batch 32: decode
  tok/s ``B * 63 / (t(64 new) - t(1 new))`` with ``attention_backend`` ``paged`` and ``gather``.

The compared systems run interleaved, repeat by repeat; medians with (min-max) and ratios; the CPU
model and its ISA flags print first.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from bench.common import ensure_bench_model, machine_info, peak_cpu_bytes, workload


def _interleaved(fns: dict, repeats: int, inner: int = 3) -> dict[str, list[float]]:
    """ms per call of each of ``fns``, run in turn, repeat by repeat (each figure the min of ``inner``)."""
    for fn in fns.values():
        fn()
    out = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            best = float("inf")
            for _ in range(inner):
                t0 = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - t0)
            out[name].append(best * 1e3)
    return out


def _summary(times: list[float]) -> str:
    return f"{statistics.median(times):.3f} ({min(times):.3f}-{max(times):.3f})"


def _decode_meta(batch: int, context: int, block_size: int = 16, seed: int = 0):
    from moeyard.attention.attn_meta import AttnMeta

    per_seq = -(-context // block_size)
    g = torch.Generator().manual_seed(seed)
    order = (torch.randperm(batch * per_seq, generator=g) + 1).tolist()   # scattered blocks, as after churn
    tables = [order[i * per_seq:(i + 1) * per_seq] for i in range(batch)]
    return AttnMeta.build([1] * batch, [context] * batch, tables, block_size), batch * per_seq + 1


def part_kernel(repeats: int) -> list[dict]:
    from moeyard.attention.paged import gather_attention, paged_attention, paged_recurrence

    rows = []
    h, kv, hd, batch = 16, 4, 64, 32
    for dtype in (torch.bfloat16, torch.float32):
        for context in (128, 1024, 4096):
            meta, blocks = _decode_meta(batch, context)
            q = torch.randn(batch, h, hd).to(dtype)
            k = torch.randn(blocks * 16, kv, hd).to(dtype)
            v = torch.randn(blocks * 16, kv, hd).to(dtype)
            fns = {"paged": lambda: paged_attention(q, k, v, meta, hd ** -0.5, hd),
                   "recurrence": lambda: paged_recurrence(q, k, v, meta, hd ** -0.5, hd),
                   "gather": lambda: gather_attention(q, k, v, meta, hd ** -0.5, hd)}
            t = _interleaved(fns, repeats)
            med = {name: statistics.median(v) for name, v in t.items()}
            rows.append({"dtype": str(dtype).removeprefix("torch."), "context": context,
                         "paged_ms": t["paged"], "recurrence_ms": t["recurrence"], "gather_ms": t["gather"],
                         "gather_over_paged": med["gather"] / med["paged"],
                         "recurrence_over_paged": med["recurrence"] / med["paged"]})
            print(f"kernel {rows[-1]['dtype']:>8} ctx {context:>5}: paged {_summary(t['paged'])} ms, recurrence "
                  f"{_summary(t['recurrence'])} ms, gather {_summary(t['gather'])} ms, recurrence/paged "
                  f"{rows[-1]['recurrence_over_paged']:.2f}x, gather/paged {rows[-1]['gather_over_paged']:.2f}x",
                  flush=True)
    return rows


def part_prefill(repeats: int) -> list[dict]:
    from moeyard.attention.attn_meta import AttnMeta
    from moeyard.attention.paged import gather_attention, paged_attention

    rows = []
    h, kv, hd = 16, 4, 64
    for dtype in (torch.bfloat16, torch.float32):
        for q_len, context, batch in ((512, 512, 1), (2048, 2048, 1), (256, 1024, 4)):
            per_seq = -(-context // 16)
            tables = [list(range(1 + i * per_seq, 1 + (i + 1) * per_seq)) for i in range(batch)]
            meta = AttnMeta.build([q_len] * batch, [context] * batch, tables, 16)
            q = torch.randn(batch * q_len, h, hd).to(dtype)
            k = torch.randn((batch * per_seq + 1) * 16, kv, hd).to(dtype)
            v = torch.randn_like(k)
            fns = {"paged": lambda: paged_attention(q, k, v, meta, hd ** -0.5, hd),
                   "gather": lambda: gather_attention(q, k, v, meta, hd ** -0.5, hd)}
            t = _interleaved(fns, repeats, inner=1)
            rows.append({"dtype": str(dtype).removeprefix("torch."), "q_len": q_len, "context": context,
                         "batch": batch, "paged_ms": t["paged"], "gather_ms": t["gather"],
                         "gather_over_paged": statistics.median(t["gather"]) / statistics.median(t["paged"])})
            print(f"prefill {rows[-1]['dtype']:>8} {batch} x {q_len} of {context}: paged {_summary(t['paged'])} "
                  f"ms, gather {_summary(t['gather'])} ms, gather/paged {rows[-1]['gather_over_paged']:.2f}x",
                  flush=True)
    return rows


def part_mla(repeats: int) -> dict:
    from bench.gpu_decode import DEEPSEEK_V3, _meta, build_slice
    from moeyard.attention.layers import mla_attention
    from moeyard.attention.paged import gather_attention, paged_attention

    lite = {**DEEPSEEK_V3, "hidden_size": 2048, "num_attention_heads": 16, "num_key_value_heads": 16,
            "q_lora_rank": None, "n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1,
            "moe_intermediate_size": 128, "intermediate_size": 256, "vocab_size": 512}
    batch, context = 32, 1024
    s = build_slice(lite, torch.device("cpu"), torch.float32, batch, context)
    meta = _meta(s, batch, context, "cpu")
    x = torch.randn(batch, 2048)
    lw = s.runner.w.layers[0]
    fns = {"absorbed": lambda: mla_attention(x, lw.attn, s.spec, 0, s.cache, s.runner.rope, meta,
                                             paged_attention, True),
           "expanded": lambda: mla_attention(x, lw.attn, s.spec, 0, s.cache, s.runner.rope, meta,
                                             gather_attention, False)}
    with torch.inference_mode():
        t = _interleaved(fns, repeats, inner=1)
        peaks = {name: peak_cpu_bytes(fn) for name, fn in fns.items()}
    out = {"absorbed_ms": t["absorbed"], "expanded_ms": t["expanded"],
           "expanded_over_absorbed": statistics.median(t["expanded"]) / statistics.median(t["absorbed"]),
           "peak_mib": {k: round(v / 2**20, 1) for k, v in peaks.items()}}
    print(f"mla fp32 b{batch} ctx {context}: absorbed {_summary(t['absorbed'])} ms, expanded "
          f"{_summary(t['expanded'])} ms, expanded/absorbed {out['expanded_over_absorbed']:.2f}x; peak MiB "
          f"{out['peak_mib']}", flush=True)
    return out


def part_engine(repeats: int) -> dict:
    from moeyard.attention.engine import EngineConfig, LLMEngine
    from moeyard.attention.sequence import SamplingParams

    path = ensure_bench_model()
    prompts = workload()
    engines = {b: LLMEngine(path, EngineConfig(dtype="bfloat16", attention_backend=b, max_num_seqs=32))
               for b in ("paged", "gather")}

    def run(engine, n):
        engine.generate(prompts, SamplingParams(max_tokens=n, ignore_eos=True))

    for e in engines.values():
        run(e, 4)
    res = {b: [] for b in engines}
    for _ in range(repeats):
        for b, e in engines.items():
            t0 = time.perf_counter()
            run(e, 1)
            t1 = time.perf_counter()
            run(e, 64)
            t2 = time.perf_counter()
            res[b].append(32 * 63 / ((t2 - t1) - (t1 - t0)))
    out = {f"{b}_decode_tok_s": v for b, v in res.items()}
    out["paged_over_gather"] = statistics.median(res["paged"]) / statistics.median(res["gather"])
    print(f"engine bf16 b32 decode tok/s: paged {_summary(res['paged'])}, gather {_summary(res['gather'])}, "
          f"paged/gather {out['paged_over_gather']:.3f}x", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_attention")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--parts", default="kernel,prefill,mla,engine")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    info = machine_info()
    print(f"{info['cpu']} | {' '.join(info.get('isa', []))} | torch {info['torch']} | {args.threads} threads",
          flush=True)
    parts = {"kernel": part_kernel, "prefill": part_prefill, "mla": part_mla, "engine": part_engine}
    report = {"machine": info, "threads": args.threads}
    for name in args.parts.split(","):
        report[name] = parts[name](args.repeats)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "bench_attention.json"), "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
