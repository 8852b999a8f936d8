"""The bench model and workload every benchmark uses (docs/benchmarks.md)."""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

import torch

BENCH_MODEL_ARGS = dict(family="mixtral", hidden=1024, intermediate=2816, layers=4, experts=8, top_k=2,
                        heads=16, kv_heads=4, vocab=32000, seed=0, dtype="bfloat16")
DEFAULT_BENCH_DIR = Path.home() / ".moeyard" / "models" / "bench-mixtral"


QUICK_MODEL_ARGS = dict(family="mixtral", hidden=64, intermediate=96, layers=2, experts=4, top_k=2, heads=4,
                        kv_heads=2, vocab=512, seed=0, dtype="bfloat16")
"""The benchmarks' ``--quick`` model (CI): the bench model's family at toy sizes."""


def quick_model() -> Path:
    """A fresh tiny model (``QUICK_MODEL_ARGS``) in a temporary folder, for the benchmarks' ``--quick`` runs."""
    import tempfile

    from moeyard.model.make_model import make_model
    from moeyard.model.make_model_options import MakeModelOptions

    path = Path(tempfile.mkdtemp(prefix="moeyard-bench-quick-")) / "tiny"
    make_model(MakeModelOptions(**QUICK_MODEL_ARGS), path)
    return path


def ensure_bench_model(path: Path = DEFAULT_BENCH_DIR) -> Path:
    """Write the bench model once (``make-model`` with BENCH_MODEL_ARGS)."""
    from moeyard.model.make_model import make_model
    from moeyard.model.make_model_options import MakeModelOptions

    if not (path / "config.json").is_file():
        make_model(MakeModelOptions(**BENCH_MODEL_ARGS), path)
    return path


def workload(n_prompts: int = 32, prompt_len: int = 64, vocab: int = 32000, seed: int = 1234) -> list[list[int]]:
    """``n_prompts`` prompts of ``prompt_len`` random token ids (seed 1234)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n_prompts, prompt_len), generator=g).tolist()


def batch_groups(prompts: list[list[int]], batch: int, batch1_prompts: int) -> list[list[list[int]]]:
    """The prompt groups a benchmark runs at ``batch``: batch 1 runs the first ``batch1_prompts``
    prompts one after another; a larger batch runs the first ``batch`` prompts together."""
    if batch == 1:
        return [[p] for p in prompts[:batch1_prompts]]
    return [prompts[i:i + batch] for i in range(0, len(prompts), batch)][:1]


def timed(fn, repeats: int) -> tuple[float, list[float]]:
    """Median wall seconds of ``fn()`` over ``repeats`` runs (after one warm-up)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def machine_info() -> dict:
    """Python, torch, the CPU model and its vector ISA flags (and the GPU, if any): printed with every result."""
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor() or None,
            "cuda": torch.version.cuda}
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        info["cpu"] = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")),
                           info["cpu"])
        flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
        info["isa"] = sorted(f for f in flags if f.startswith(("avx512", "amx")) or f in ("avx2", "fma"))
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return info


def print_machine() -> dict:
    """Print :func:`machine_info` as one ``machine: {...}`` JSON line (every benchmark does, first) and
    return it."""
    info = machine_info()
    print("machine: " + json.dumps(info), flush=True)
    return info


def device_sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, device: torch.device, repeats: int) -> tuple[float, float, float]:
    """(median, min, max) milliseconds of ``fn()`` after a warm-up, the device synchronised around each."""
    fn()
    device_sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        device_sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), min(times), max(times)


def peak_cpu_bytes(fn) -> int:
    """Peak bytes allocated on the CPU while ``fn()`` runs, above what was allocated before it: torch's
    profiler records every allocation and free, replayed here in time order."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = []
    for e in prof.events():
        delta = e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage
        if delta:
            events.append((e.time_range.start, delta))
    cur = peak = 0
    for _, delta in sorted(events):
        cur += delta
        peak = max(peak, cur)
    return peak


def decode_roofline_tok_s(model_dir: Path, batch: int, context: int, dtype: str = "bfloat16") -> float:
    """The decode tokens/s at this machine's roofline (``moeyard.model.roofline``, the machine measured once
    and cached by ``moeyard.model.hardware.local_hardware``) for ``batch`` sequences of ``context`` tokens."""
    from moeyard.model.hardware import local_hardware
    from moeyard.model.roofline import decode_step, roofline
    from moeyard.model.spec import load_spec

    return roofline(decode_step(load_spec(model_dir), batch, context, dtype), local_hardware(), dtype).tokens_per_s
