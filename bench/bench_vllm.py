"""vLLM-CPU as a peer: our in-process engine vs vLLM ``LLM.generate`` on the bench model.

    .venv/bin/python -m bench.bench_vllm --vllm-python .venv-vllm/bin/python [--repeats 3] [--batches 1,32]
    .venv/bin/python -m bench.bench_vllm --vllm-python .venv-vllm/bin/python --check-tokens

vLLM is not a dependency of moeyard: it lives in a venv of its own (see
docs/benchmarks.md, "vLLM-CPU peer", for how to make ``.venv-vllm``). This file
is the driver (run with our venv; it drives our engine in-process) and, with
``--worker``, the vLLM side: the driver starts ``<vllm-python> bench_vllm.py
--worker``, which imports only vllm and the standard library, loads the model
once and answers JSON requests on stdin/stdout, timing each ``LLM.generate``
call itself (vLLM's log goes to a file, ``--vllm-log``).

Throughput: the same prompts for both (32 x 64 random ids, seed 1234), 64 new
greedy tokens, EOS ignored, bf16, prompts passed as token ids, ids returned
(vLLM with ``detokenize=False``, as our ``generate`` returns ids only), the
same scheduler limits (64 sequences, 2048 batched tokens), prefix caching off
in both (so every repeat pays its prefill; ``--prefix-caching`` turns it on in
both). Our engine runs at ``--threads`` torch threads, vLLM's worker is bound
to cores ``0..threads-1`` (``VLLM_CPU_OMP_THREADS_BIND``). After a warm-up of
each, the systems take turns run by run (who goes first rotates every repeat)
so that noise on the shared machine hits them alike. Figures per system, as in
bench_engine: end-to-end tok/s (generated tokens / wall time of the generate
calls) and decode tok/s ``B * (N - 1) / (t(N new) - t(1 new))``; medians of
``--repeats``, and the fastest run; the ratio is ours / vLLM. Batch 1 runs the
first ``--batch1-prompts`` prompts one after another. ``transformers.generate``
(bf16, in the driver process, as in bench_engine) runs in the same rotation as
a third system unless ``--no-transformers``, so all three relate in one run.

Token check (``--check-tokens``): float32, a tiny model of each of the
families mixtral and qwen2_moe (``make-model`` defaults but ``--hidden 256``,
so head_dim 64: vLLM's CPU attention has no head_dim 16), a few prompts
batched together in both engines; prints equal / first differing position per
prompt and exits 1 on any mismatch. (bf16 is no use for this: random-weight
models have near-tied logits and any two bf16 implementations part after a few
tokens; the throughput run reports how long the bf16 outputs agree, for
information only.)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHECK_FAMILIES = ("mixtral", "qwen2_moe")
CHECK_MODEL_ARGS = dict(hidden=256, heads=4, kv_heads=2, dtype="float32", seed=0)
CHECK_PROMPT_LENS = (1, 7, 33, 64, 100)


# -- vLLM side (runs under the vLLM venv: stdlib + vllm only) --------------------------------------
def worker_main() -> int:
    """Serve JSON-line requests from the driver; the protocol goes over the original stdout,
    everything else (vLLM's log, its child processes) over stderr."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def reply(obj):
        proto.write(json.dumps(obj) + "\n")
        proto.flush()

    llm = sp_cls = tp_cls = None
    for line in sys.stdin:
        req = json.loads(line)
        try:
            if req["op"] == "init":
                t0 = time.perf_counter()
                import vllm
                from vllm import LLM, SamplingParams
                from vllm.inputs import TokensPrompt
                sp_cls, tp_cls = SamplingParams, TokensPrompt
                llm = LLM(**req["llm_kwargs"])
                reply({"ok": True, "vllm": vllm.__version__, "load_s": time.perf_counter() - t0})
            elif req["op"] == "generate":
                sp = sp_cls(temperature=0.0, max_tokens=req["max_tokens"], ignore_eos=True,
                            detokenize=req.get("detokenize", False))
                tokens = []
                t0 = time.perf_counter()
                for group in req["groups"]:
                    outs = llm.generate([tp_cls(prompt_token_ids=p) for p in group], sp, use_tqdm=False)
                    tokens.extend(list(o.outputs[0].token_ids) for o in outs)
                reply({"ok": True, "seconds": time.perf_counter() - t0, "tokens": tokens})
            elif req["op"] == "quit":
                reply({"ok": True})
                break
            else:
                reply({"ok": False, "error": f"unknown op {req['op']!r}"})
        except Exception:  # report to the driver, keep serving
            import traceback
            reply({"ok": False, "error": traceback.format_exc()})
    return 0


# -- driver side (runs under our venv) --------------------------------------------------------------
class VLLMWorker:
    """A vLLM ``LLM`` in a subprocess of the vLLM venv, driven over JSON lines."""

    def __init__(self, python: str, log_path: Path, threads: int, kv_cache_gib: int, ld_preload: str | None = None):
        env = dict(os.environ)
        if ld_preload:
            env["LD_PRELOAD"] = ld_preload
        for k in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"):
            env.pop(k, None)
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{threads - 1}" if threads > 1 else "0")
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
        env.setdefault("VLLM_NO_USAGE_STATS", "1")
        env.setdefault("DO_NOT_TRACK", "1")
        env["PYTHONUNBUFFERED"] = "1"
        self.log_path = log_path
        self._log = open(log_path, "ab")
        # abspath, not resolve: a venv's python is a symlink that must stay one
        self.proc = subprocess.Popen([os.path.abspath(python), str(Path(__file__).resolve()), "--worker"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, env=env,
                                     text=True, cwd=tempfile.gettempdir())

    def call(self, **req):
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"vLLM worker exited (rc {self.proc.wait()}); last log lines:\n{self.log_tail()}")
        resp = json.loads(line)
        if not resp.get("ok"):
            raise RuntimeError(f"vLLM worker failed:\n{resp.get('error')}\nlast log lines:\n{self.log_tail()}")
        return resp

    def log_tail(self, n: int = 30) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def cpu_seconds(self) -> float:
        """CPU time used so far by the worker and all its descendants (from /proc)."""
        procs, ppid = {}, {}
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                ppid[int(d.name)] = int(fields[1])
                procs[int(d.name)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        tree, frontier = {self.proc.pid}, [self.proc.pid]
        while frontier:
            parent = frontier.pop()
            for pid, pp in ppid.items():
                if pp == parent and pid not in tree:
                    tree.add(pid)
                    frontier.append(pid)
        return sum(procs.get(pid, 0.0) for pid in tree)

    def close(self):
        try:
            if self.proc.poll() is None:
                self.call(op="quit")
                self.proc.wait(timeout=60)
        except Exception:
            self.proc.kill()
            self.proc.wait()
        finally:
            self._log.close()


def llm_kwargs(model: Path, dtype: str, args) -> dict:
    return dict(model=str(model), dtype=dtype, seed=0, enforce_eager=args.enforce_eager,
                max_model_len=args.max_model_len, max_num_seqs=64, max_num_batched_tokens=2048,
                enable_prefix_caching=args.prefix_caching)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def start_worker(args, model: Path, dtype: str) -> VLLMWorker:
    w = VLLMWorker(args.vllm_python, Path(args.vllm_log), args.threads, args.kv_cache_gib, args.vllm_ld_preload)
    info = w.call(op="init", llm_kwargs=llm_kwargs(model, dtype, args))
    print(f"vLLM {info['vllm']} loaded {model} ({dtype}) in {info['load_s']:.1f} s; log: {args.vllm_log}", flush=True)
    return w


NAMES = {"ours": "ours", "vllm": "vLLM", "transformers": "transformers"}


def run_throughput(args) -> int:
    import torch

    from bench.common import batch_groups, decode_roofline_tok_s, ensure_bench_model, print_machine, workload
    from moeyard.attention.engine import EngineConfig, LLMEngine
    from moeyard.attention.sequence import SamplingParams

    print_machine()
    torch.set_num_threads(args.threads)
    path = Path(args.model) if args.model else ensure_bench_model()
    prompts = workload()
    vw = start_worker(args, path, "bfloat16")
    try:
        engine = LLMEngine(path, EngineConfig(dtype="bfloat16", max_num_seqs=64, max_num_batched_tokens=2048,
                                              kv_cache_bytes=1 << 30, enable_prefix_caching=args.prefix_caching))
        hf = None
        if args.transformers:
            from transformers import AutoModelForCausalLM
            hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
        results = []
        for b in [int(x) for x in args.batches.split(",")]:
            groups = batch_groups(prompts, b, args.batch1_prompts)
            n_tokens = sum(len(g) for g in groups) * args.new_tokens
            out = {}

            def run_ours(n_new):
                sp = SamplingParams(max_tokens=n_new, ignore_eos=True)
                t0 = time.perf_counter()
                out[("ours", n_new)] = [t for g in groups for t in engine.generate(g, sp)]
                return time.perf_counter() - t0

            def run_vllm(n_new):
                r = vw.call(op="generate", groups=groups, max_tokens=n_new)
                out[("vllm", n_new)] = r["tokens"]
                return r["seconds"]

            def run_hf(n_new):
                t0 = time.perf_counter()
                for g in groups:
                    with torch.no_grad():
                        hf.generate(torch.tensor(g), max_new_tokens=n_new, min_new_tokens=n_new,
                                    do_sample=False, pad_token_id=0)
                return time.perf_counter() - t0

            systems = {"ours": run_ours, "vllm": run_vllm}
            if hf is not None:
                systems["transformers"] = run_hf
            names = list(systems)
            times = {(s, n): [] for s in systems for n in (args.new_tokens, 1)}
            idle_cpu = []
            load_before = os.getloadavg()[0]
            for fn in systems.values():  # warm-up
                fn(args.new_tokens)
                fn(1)
            for r in range(args.repeats):
                k = r % len(names)
                order = names[k:] + names[:k]  # rotate who goes first, so drifting noise hits all alike
                for n_new in (args.new_tokens, 1):
                    for s in order:
                        c0 = vw.cpu_seconds() if s != "vllm" else None
                        times[(s, n_new)].append(systems[s](n_new))
                        if c0 is not None:
                            idle_cpu.append(vw.cpu_seconds() - c0)
            agree = [common_prefix(a, v) for a, v in zip(out[("ours", args.new_tokens)],
                                                         out[("vllm", args.new_tokens)])]

            row = {"batch": b, "prompts": sum(len(g) for g in groups), "new_tokens": args.new_tokens}
            for s in systems:
                t_full = statistics.median(times[(s, args.new_tokens)])
                t_one = statistics.median(times[(s, 1)])
                row[f"{s}_tok_s"] = n_tokens / t_full
                row[f"{s}_decode_tok_s"] = n_tokens * (args.new_tokens - 1) / args.new_tokens / (t_full - t_one)
                row[f"{s}_best_tok_s"] = n_tokens / min(times[(s, args.new_tokens)])
                row[f"{s}_seconds"] = times[(s, args.new_tokens)]
                row[f"{s}_seconds_1tok"] = times[(s, 1)]
            row["ratio"] = row["ours_tok_s"] / row["vllm_tok_s"]
            row["decode_ratio"] = row["ours_decode_tok_s"] / row["vllm_decode_tok_s"]
            row["best_ratio"] = row["ours_best_tok_s"] / row["vllm_best_tok_s"]
            if hf is not None:
                for s in ("ours", "vllm"):
                    row[f"{s}_vs_transformers"] = row[f"{s}_tok_s"] / row["transformers_tok_s"]
                    row[f"{s}_vs_transformers_decode"] = row[f"{s}_decode_tok_s"] / row["transformers_decode_tok_s"]
            row["vllm_idle_cpu_s_during_others"] = statistics.median(idle_cpu) if idle_cpu else None
            row["loadavg_1min_before_after"] = [load_before, os.getloadavg()[0]]
            row["bf16_agreeing_prefix_median"] = statistics.median(agree)
            row["bf16_identical_outputs"] = sum(a == args.new_tokens for a in agree)
            results.append(row)
            figs = ", ".join(f"{NAMES[s]} {row[f'{s}_tok_s']:.1f}" for s in names)
            dec = ", ".join(f"{NAMES[s]} {row[f'{s}_decode_tok_s']:.1f}" for s in names)
            print(f"batch {b:3d}: end-to-end tok/s {figs} (ours/vLLM {row['ratio']:.2f}x) | decode tok/s {dec} "
                  f"(ours/vLLM {row['decode_ratio']:.2f}x) | best run ours/vLLM {row['best_ratio']:.2f}x | bf16 "
                  f"outputs agree for a median {row['bf16_agreeing_prefix_median']:.0f} of {args.new_tokens} "
                  f"tokens ({row['bf16_identical_outputs']}/{len(agree)} identical) | load average "
                  f"{load_before:.1f} -> {os.getloadavg()[0]:.1f}", flush=True)
    finally:
        vw.close()
    hf_on = bool(results) and "transformers_tok_s" in results[0]
    for kind, key in (("end-to-end", "tok_s"), ("decode", "decode_tok_s")):
        print(f"\n{kind}:")
        cols = ["ours", "vllm"] + (["transformers"] if hf_on else [])
        head = " | ".join(f"{NAMES[s]} tok/s" for s in cols)
        extra = " | ours / transformers | vLLM / transformers" if hf_on else ""
        print(f"| batch | {head} | ours / vLLM{extra} |")
        print("|---:|" + "---:|" * (len(cols) + 1 + (2 if hf_on else 0)))
        for r in results:
            vals = " | ".join(f"{r[f'{s}_{key}']:.1f}" for s in cols)
            ratio = r["ratio"] if key == "tok_s" else r["decode_ratio"]
            more = ""
            if hf_on:
                suffix = "" if key == "tok_s" else "_decode"
                more = f" | {r['ours_vs_transformers' + suffix]:.2f}x | {r['vllm_vs_transformers' + suffix]:.2f}x"
            print(f"| {r['batch']} | {vals} | {ratio:.2f}x{more} |")
    if results:
        print("\ndecode step as a fraction of this machine's roofline (bench/roofline.py; context "
              f"{64 + args.new_tokens // 2} tokens, bf16):")
        for r in results:
            floor = decode_roofline_tok_s(path, r["batch"], 64 + args.new_tokens // 2)
            r["roofline_decode_tok_s"] = floor
            cols = ["ours", "vllm"] + (["transformers"] if hf_on else [])
            print(f"  batch {r['batch']:3d}: roofline {floor:.0f} tok/s; "
                  + ", ".join(f"{NAMES[s]} {r[f'{s}_decode_tok_s'] / floor:.0%}" for s in cols))
    if args.json:
        print(json.dumps({"threads": args.threads, "repeats": args.repeats, "model": str(path),
                          "enforce_eager": args.enforce_eager, "prefix_caching": args.prefix_caching,
                          "vllm_ld_preload": args.vllm_ld_preload, "results": results}))
    return 0


def run_check_tokens(args) -> int:
    import torch

    from moeyard.attention.engine import EngineConfig, LLMEngine
    from moeyard.attention.sequence import SamplingParams
    from moeyard.model.make_model import make_model
    from moeyard.model.make_model_options import MakeModelOptions

    torch.set_num_threads(args.threads)
    root = Path(args.models_dir) if args.models_dir else Path(tempfile.mkdtemp(prefix="moeyard-vllm-check-"))
    g = torch.Generator().manual_seed(1234)
    report, bad = [], 0
    for family in CHECK_FAMILIES:
        path = root / family
        if not (path / "config.json").is_file():
            make_model(MakeModelOptions(family=family, **CHECK_MODEL_ARGS), path)
        vocab = json.loads((path / "config.json").read_text())["vocab_size"]
        prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in CHECK_PROMPT_LENS]
        vw = start_worker(args, path, "float32")
        try:
            theirs = vw.call(op="generate", groups=[prompts], max_tokens=args.new_tokens)["tokens"]
        finally:
            vw.close()
        engine = LLMEngine(path, EngineConfig(dtype="float32", enable_prefix_caching=False))
        ours = engine.generate(prompts, SamplingParams(max_tokens=args.new_tokens, ignore_eos=True))
        del engine
        for i, (p, a, v) in enumerate(zip(prompts, ours, theirs)):
            same = a == v
            bad += not same
            first = None if same else common_prefix(a, v)
            report.append({"family": family, "prompt": i, "prompt_len": len(p), "equal": same,
                           "first_difference": first, "ours": a, "vllm": v})
            print(f"{family:10s} prompt {i} ({len(p):3d} ids): "
                  + ("equal" if same else f"NOT equal, first difference at generated token {first}"), flush=True)
    if args.json:
        print(json.dumps({"new_tokens": args.new_tokens, "models": str(root), "mismatches": bad, "prompts": report}))
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--vllm-python", default=".venv-vllm/bin/python",
                    help="python of the venv that has vllm-cpu installed")
    ap.add_argument("--check-tokens", action="store_true",
                    help="compare greedy ids with vLLM's in float32 on tiny mixtral and qwen2_moe models")
    ap.add_argument("--models-dir", help="--check-tokens: where the tiny models are (made if missing); "
                                         "default a new temporary folder")
    ap.add_argument("--model", help="checkpoint for the throughput run (default: the bench model)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--batch1-prompts", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--kv-cache-gib", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE")
    ap.add_argument("--max-model-len", type=int, default=512)
    ap.add_argument("--no-enforce-eager", dest="enforce_eager", action="store_false",
                    help="let vLLM torch.compile the model (default: eager)")
    ap.add_argument("--vllm-ld-preload", help="LD_PRELOAD for the vLLM worker (vLLM suggests libiomp5/tcmalloc, e.g. "
                                              ".venv-vllm/lib/libiomp5.so); default none")
    ap.add_argument("--no-transformers", dest="transformers", action="store_false",
                    help="leave transformers.generate out of the throughput run")
    ap.add_argument("--prefix-caching", action="store_true", help="prefix caching on in both engines")
    ap.add_argument("--vllm-log", default=str(Path(tempfile.gettempdir()) / "bench_vllm.log"))
    ap.add_argument("--json", action="store_true", help="also print the results as one JSON line (last line)")
    args = ap.parse_args(argv)
    if args.worker:
        return worker_main()
    if not Path(args.vllm_python).exists():
        ap.error(f"{args.vllm_python} not found: make the vLLM venv first (docs/benchmarks.md, 'vLLM-CPU peer')")
    return run_check_tokens(args) if args.check_tokens else run_throughput(args)


if __name__ == "__main__":
    raise SystemExit(main())
