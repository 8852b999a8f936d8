"""DS-MoE on a real model: SmolLM2-135M-Instruct split into E experts (``moeyard upcycle --mode split``),
perplexity on a held-out text at top-k in {E, E/2, E/4, 1} with its active parameters per token, next to
the dense model. ``python -m bench.bench_dsmoe [--experts 8] [--tokens 1024]``.

Calibration: the longest licence text an installed package ships (the upcycle's default); held out: this
repository's docs/architecture.md. Perplexity is teacher-forced with ``transformers`` (fp32) on the
checkpoints the upcycle writes."""

from __future__ import annotations

import argparse
import json
import math
import platform
import tempfile
import time
from pathlib import Path

import torch

from bench.common import print_machine
from moeyard.attention.tokenizer import load_tokenizer
from moeyard.cluster.cli.calibration import calibration_inputs
from moeyard.cluster.config import MOEYARD_HOME
from moeyard.model import smollm2
from moeyard.model.gguf_checkpoint import cached_checkpoint
from moeyard.model.spec import load_spec
from moeyard.model.upcycle import UpcycleOptions, upcycle

HELD_OUT = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"


def perplexity(model_dir: Path, ids: list[int], window: int = 512) -> float:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    nll, n = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, window):
            chunk = ids[start:start + window + 1]
            if len(chunk) < 2:
                break
            logits = model(torch.tensor([chunk[:-1]])).logits[0].float()
            nll += float(torch.nn.functional.cross_entropy(logits, torch.tensor(chunk[1:]), reduction="sum"))
            n += len(chunk) - 1
    return math.exp(nll / n)


def cpu() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        model = next(ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name"))
        flags = next(ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags"))
        isa = [f for f in flags if f.startswith(("avx512_bf16", "amx")) or f in ("avx2",)]
        return f"{model} ({' '.join(isa)})"
    except (OSError, StopIteration):
        return platform.processor()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=1024, help="held-out tokens")
    args = ap.parse_args(argv)
    print_machine()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    dense = cached_checkpoint(smollm2.fetch_gguf(MOEYARD_HOME / "downloads"), MOEYARD_HOME / "gguf")
    tok = load_tokenizer(dense)
    held_out = tok.encode(HELD_OUT.read_text(), add_bos=False)[:args.tokens]
    inputs = calibration_inputs(dense, None)
    rows = [{"model": "dense", "top_k": None, "active_params": load_spec(dense).total_and_active_params()[1],
             "perplexity": perplexity(dense, held_out)}]
    e = args.experts
    with tempfile.TemporaryDirectory() as tmp:
        for k in sorted({e, max(1, e // 2), max(1, e // 4), 1}, reverse=True):
            t0 = time.perf_counter()
            out = upcycle(dense, Path(tmp) / f"k{k}", UpcycleOptions(e, k, mode="split"), calib_inputs=lambda: inputs)
            active = load_spec(out).total_and_active_params()[1]
            rows.append({"model": f"split E={e}", "top_k": k, "active_params": active,
                         "perplexity": perplexity(out, held_out), "upcycle_s": round(time.perf_counter() - t0, 1)})
    print(f"CPU: {cpu()}; torch {torch.__version__}; held-out tokens: {len(held_out)} of {HELD_OUT.name}")
    print(f"{'model':<12} {'top-k':>5} {'active params':>14} {'perplexity':>11}")
    for r in rows:
        print(f"{r['model']:<12} {r['top_k'] or '-':>5} {r['active_params']:>14,} {r['perplexity']:>11.3f}")
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
