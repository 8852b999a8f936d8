"""The one check for a lent GPU: ``python -m bench.gpu_check [--device cuda|cpu] [--quick] [--stages a,b,c,d,e]``.

Stages (each with its own time limit, all of them together within 5 minutes):

* ``a``: tiny checkpoints of all 8 families (``make-model``): greedy tokens on the device in fp32 equal
  the CPU's fp32 tokens and ``transformers``' (fp32, CPU); the error of the device's bf16 logits against
  its fp32 logits; host syncs per MoE layer in a decode step (CUDA only: ``set_sync_debug_mode``).
* ``b``: one DeepSeek-V3-shaped shard layer (D 7168, I 2048, 32 slots) at 256 to 8192 routed tokens:
  the grouped GEMM against the per-slot loop, time and TFLOP/s against the card's bf16 peak.
* ``c``: decode of 2-layer Mixtral-8x7B- and DeepSeek-V3-shaped slices in-process at batch 1 to 256: ms
  per step against the HBM floor, KV-cache bytes per token, one attention call per kernel
  (:mod:`bench.gpu_decode`).
* ``d``: the engine against two expert shards over gRPC, each a plain process, on the device: decode
  step time against in-process with overlap off and on, bytes per step before and after sending each
  token once per shard (:mod:`bench.gpu_shards`).
* ``e``: host <-> device copy bandwidth from pinned and from pageable host memory.

``--quick`` runs the same stages at toy sizes (CI runs ``--device cpu --quick``, so the script cannot
rot). Results: one JSON object, printed last and written to ``$OUT/gpu_check.json`` when ``OUT`` is set.
Needs only torch, safetensors, tokenizers and transformers (no Ray, Redis or pydantic), and runs from a
bare copy of the tree (``moeyard.source_tree``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

import torch

import moeyard.source_tree  # noqa: F401  (the sub-packages from a bare tree: a GPU box)
from bench.common import machine_info, median_ms
from bench.gpu_decode import stage_c
from bench.gpu_shards import stage_d

FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "llama", "qwen2"]
STAGE_LIMITS_S = {"a": 100, "b": 45, "c": 75, "d": 45, "e": 20}
"""Each stage's time limit; 285 s together, inside the 5 minutes a device session plans for."""
H200_BF16_PEAK_TFLOPS = 790.0
"""Dense bf16 matmul throughput measured on an H200 (the device tool's notes)."""


class StageTimeout(Exception):
    pass


@contextmanager
def time_limit(seconds: float):
    """Raise :class:`StageTimeout` in this (main) thread after ``seconds``."""
    def fire(signum, frame):
        raise StageTimeout(f"stage ran past its {seconds:.0f} s limit")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# -- stage a: every family on the device --------------------------------------------------------------

def _hf_greedy(ckpt: Path, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    import transformers as T

    model = T.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    model.eval()
    out = []
    with torch.no_grad():
        for p in prompts:
            got = model.generate(torch.tensor([p]), max_new_tokens=new_tokens, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)
            out.append(got[0, len(p):].tolist())
    return out


def _engine(ckpt: Path, dtype: str, device: str):
    from moeyard.attention.engine import EngineConfig, LLMEngine

    return LLMEngine(ckpt, EngineConfig(dtype=dtype, device=device, block_size=4, max_num_batched_tokens=32,
                                        num_blocks=256))


def _greedy(engine, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    from moeyard.attention.sequence import SamplingParams

    return engine.generate(prompts, SamplingParams(max_tokens=new_tokens, ignore_eos=True))


def _first_logits(engine, prompt: list[int]) -> torch.Tensor:
    """``[V]`` fp32 logits of the token after ``prompt`` (one prefill step)."""
    from moeyard.attention.sequence import SamplingParams

    engine.add_request("probe", list(prompt), SamplingParams(max_tokens=1, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    return engine.last_logits[0].float().cpu()


def _syncs_per_moe_layer(engine, prompt: list[int]) -> dict:
    """Host syncs of one decode step, per MoE layer (CUDA: the sync debug mode's warnings)."""
    import warnings

    from moeyard.attention.sequence import SamplingParams

    if engine.device.type != "cuda":
        return {"measured": False, "why": "host syncs are counted on CUDA only"}
    engine.add_request("sync", list(prompt), SamplingParams(max_tokens=3, ignore_eos=True))
    engine.step()  # the prefill
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            engine.step()  # one decode step
            torch.cuda.synchronize()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    while engine.has_unfinished():
        engine.step()
    syncs = sum("synchroniz" in str(w.message).lower() for w in caught)
    moe = max(engine.spec.num_moe_layers, 1)
    return {"measured": True, "step_syncs": syncs, "moe_layers": engine.spec.num_moe_layers,
            "per_moe_layer": syncs / moe}


def stage_a(device: torch.device, quick: bool) -> dict:
    from moeyard.model.make_model import make_model
    from moeyard.model.make_model_options import MakeModelOptions

    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 on the GPU too
    torch.backends.cudnn.allow_tf32 = False
    new_tokens = 8 if quick else 16
    prompts = [[5, 17, 99, 250, 3, 42], [7, 8, 9], [300, 301, 302, 303, 304, 305, 306, 307, 308, 309, 310]]
    families = {}
    with tempfile.TemporaryDirectory() as tmp:
        for family in FAMILIES:
            t0 = time.perf_counter()
            ckpt = Path(tmp) / family
            make_model(MakeModelOptions(family=family, dtype="float32", seed=0, layers=2, hidden=64,
                                        intermediate=64, experts=8, top_k=2, heads=4, kv_heads=2, vocab=512), ckpt)
            ref = _hf_greedy(ckpt, prompts, new_tokens)
            cpu = _greedy(_engine(ckpt, "float32", "cpu"), prompts, new_tokens)
            on_device = _engine(ckpt, "float32", str(device))
            dev = _greedy(on_device, prompts, new_tokens)
            fp32_logits = _first_logits(on_device, prompts[0])
            bf16 = _engine(ckpt, "bfloat16", str(device))
            bf16_logits = _first_logits(bf16, prompts[0])
            err = (bf16_logits - fp32_logits).abs()
            families[family] = {
                "device_equals_cpu": dev == cpu, "cpu_equals_transformers": cpu == ref,
                "bf16_logits_max_abs_err": float(err.max()),
                "bf16_logits_err_over_fp32_std": float(err.max() / fp32_logits.std()),
                "bf16_argmax_equal": int(bf16_logits.argmax()) == int(fp32_logits.argmax()),
                "syncs": _syncs_per_moe_layer(on_device, prompts[2]) if on_device.router is not None else None,
                "seconds": round(time.perf_counter() - t0, 2)}
    ok = all(f["device_equals_cpu"] and f["cpu_equals_transformers"] for f in families.values())
    syncs = [f["syncs"]["per_moe_layer"] for f in families.values() if f["syncs"] and f["syncs"]["measured"]]
    return {"ok": ok, "families": families, "max_syncs_per_moe_layer": max(syncs) if syncs else None}


# -- stage b: one DeepSeek-V3-shaped shard layer ------------------------------------------------------

def stage_b(device: torch.device, quick: bool) -> dict:
    from moeyard.model.ffn import gemm_shapes_ok, grouped_gemm_supported, grouped_swiglu, grouped_swiglu_gemm

    if quick:
        hidden, inter, slots, token_counts, repeats = 256, 128, 8, [64, 256], 3
    else:
        hidden, inter, slots, token_counts, repeats = 7168, 2048, 32, [256, 1024, 4096, 8192], 10
    dtype = torch.bfloat16
    g = torch.Generator(device="cpu").manual_seed(0)
    w13 = (torch.randn(slots, 2 * inter, hidden, generator=g, dtype=torch.float32) * 0.02).to(device, dtype)
    w2 = (torch.randn(slots, hidden, inter, generator=g, dtype=torch.float32) * 0.02).to(device, dtype)
    grouped = grouped_gemm_supported(device, dtype) and gemm_shapes_ok(hidden, inter, dtype)
    peak = H200_BF16_PEAK_TFLOPS if device.type == "cuda" else None
    runs = []
    for n in token_counts:
        cuts = sorted(torch.randint(0, n + 1, (slots - 1,), generator=g).tolist())
        counts = [b - a for a, b in zip([0] + cuts, cuts + [n])]
        rows = list(range(slots))
        x = torch.randn(n, hidden, generator=g, dtype=torch.float32).to(device, dtype)
        flops = 6 * n * hidden * inter  # gate+up (2I) and down (I), 2 FLOPs per multiply-add
        loop_ms = median_ms(lambda: grouped_swiglu(x, counts, w13, w2, rows), device, repeats)
        run = {"tokens": n, "loop_ms": [round(v, 3) for v in loop_ms],
               "loop_tflops": round(flops / loop_ms[0] / 1e9, 2)}
        if grouped:
            gemm_ms = median_ms(lambda: grouped_swiglu_gemm(x, counts, w13, w2, rows), device, repeats)
            want = grouped_swiglu(x, counts, w13, w2, rows).float()
            got = grouped_swiglu_gemm(x, counts, w13, w2, rows).float()
            run.update(gemm_ms=[round(v, 3) for v in gemm_ms], gemm_tflops=round(flops / gemm_ms[0] / 1e9, 2),
                       gemm_over_loop=round(loop_ms[0] / gemm_ms[0], 2),
                       rel_err=float((got - want).abs().max() / want.abs().max()))
            if peak:
                run["gemm_fraction_of_peak"] = round(run["gemm_tflops"] / peak, 3)
        runs.append(run)
    return {"ok": all(r.get("rel_err", 0.0) < 2e-2 for r in runs), "grouped_gemm": grouped,
            "shape": {"D": hidden, "I": inter, "slots": slots, "dtype": "bfloat16"}, "peak_tflops": peak,
            "runs": runs}


# -- stage e: host <-> device copies ---------------------------------------------------------------

def stage_e(device: torch.device, quick: bool) -> dict:
    nbytes = (8 if quick else 256) << 20
    repeats = 3 if quick else 10
    out = {"bytes": nbytes}
    if device.type != "cuda":
        src = torch.empty(nbytes, dtype=torch.uint8, device="cpu")
        dst = torch.empty_like(src)
        ms = median_ms(lambda: dst.copy_(src), device, repeats)
        out.update(ok=True, pinned=None, host_to_host_gbs=round(nbytes / ms[0] / 1e6, 2),
                   why="pinned memory and device copies need CUDA")
        return out
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    for kind, pin in (("pageable", False), ("pinned", True)):
        host = torch.empty(nbytes, dtype=torch.uint8, device="cpu", pin_memory=pin)
        h2d = median_ms(lambda: dev.copy_(host, non_blocking=pin), device, repeats)
        d2h = median_ms(lambda: host.copy_(dev, non_blocking=pin), device, repeats)
        out[kind] = {"h2d_gbs": round(nbytes / h2d[0] / 1e6, 2), "d2h_gbs": round(nbytes / d2h[0] / 1e6, 2)}
    out["ok"] = out["pinned"]["h2d_gbs"] > 0 and out["pageable"]["h2d_gbs"] > 0
    return out


STAGES = {"a": stage_a, "b": stage_b, "c": stage_c, "d": stage_d, "e": stage_e}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="toy sizes (CI)")
    p.add_argument("--stages", default=",".join(STAGES), help="comma-separated, of " + ",".join(STAGES))
    args = p.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        p.error(f"unknown stage(s) {unknown}; choose from {','.join(STAGES)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: this machine has no CUDA GPU")
    device = torch.device(args.device)
    report = {"device": str(device), "quick": args.quick, "machine": machine_info(), "stages": {}}
    for name in stages:
        t0 = time.perf_counter()
        try:
            with time_limit(STAGE_LIMITS_S[name]):
                result = STAGES[name](device, args.quick)
        except StageTimeout as e:
            result = {"ok": False, "error": str(e)}
        except Exception as e:  # a stage's failure is reported, the other stages still run
            result = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
        result["seconds"] = round(time.perf_counter() - t0, 2)
        report["stages"][name] = result
        print(f"stage {name}: {'ok' if result.get('ok') else 'FAILED'} in {result['seconds']} s", flush=True)
    report["ok"] = all(r.get("ok") for r in report["stages"].values())
    text = json.dumps(report, indent=1)
    if os.environ.get("OUT"):
        out_dir = Path(os.environ["OUT"])
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "gpu_check.json").write_text(text)
    print(text)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
