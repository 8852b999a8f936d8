"""The ``moeyard`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import uuid
from pathlib import Path

from moeyard.cluster.infra.ray_auth import ray_env


def _csv_ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _add_make_model(sub) -> None:
    from moeyard.model import make_model

    p = sub.add_parser("make-model", help="write a small random checkpoint (hub layout + tokenizer)")
    make_model.add_arguments(p)
    p.set_defaults(func=make_model.run)


def _add_upcycle(sub) -> None:
    p = sub.add_parser("upcycle", help="turn a dense Llama/Qwen2 checkpoint (folder or .gguf) into an MoE")
    p.add_argument("--dense", type=Path, required=True, help="dense checkpoint folder or .gguf file")
    p.add_argument("--out", type=Path, required=True, help="folder to write (must not exist)")
    p.add_argument("--experts", type=int, required=True, help="experts per MoE layer")
    p.add_argument("--top-k", type=int, required=True, help="experts per token")
    p.add_argument("--mode", default="copy", help="copy: every expert is the dense FFN (exactly the dense function)")
    p.add_argument("--router", default="random", help="random, or kmeans (fitted on the calibration text)")
    p.add_argument("--calib", type=Path, help="calibration text file (default: a licence text installed here)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                   help="weights of the output (default: the dense checkpoint's)")
    p.set_defaults(func=cmd_upcycle)


def cmd_upcycle(args) -> int:
    from moeyard.cluster.cli.calibration import calibration_inputs
    from moeyard.cluster.config import MOEYARD_HOME
    from moeyard.model.gguf_checkpoint import GGUFError, cached_checkpoint
    from moeyard.model.upcycle import UpcycleError, UpcycleOptions, upcycle

    opts = UpcycleOptions(args.experts, args.top_k, args.mode, args.router, args.seed, args.dtype)
    try:
        opts.check()
        dense = args.dense
        if dense.suffix == ".gguf" and dense.is_file():
            dense = cached_checkpoint(dense, MOEYARD_HOME / "gguf")
        out = upcycle(dense, args.out, opts, calib_inputs=lambda: calibration_inputs(dense, args.calib),
                      progress=sys.stderr.isatty())
    except (UpcycleError, GGUFError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({opts.experts} experts, top-{opts.top_k}, {opts.mode}, router {opts.router})")
    return 0


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text in-process (--model) or through a cluster (--addr; "
                                        "neither: the cluster `moeyard up` started, else the demo model)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--model", type=Path, help="checkpoint directory or dense Llama-family .gguf file "
                                                  "(runs the in-process engine)")
    where.add_argument("--addr", help="HOST:PORT of a running cluster's API")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text (needs the checkpoint's tokenizer)")
    prompt.add_argument("--token-ids", type=_csv_ints, help="prompt as comma-separated token ids")
    p.add_argument("--chat", action="store_true",
                   help="send --prompt as one user message through the checkpoint's chat template")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--stop-token-ids", type=_csv_ints, default=[])
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                   help="compute dtype (default: the checkpoint's torch_dtype)")
    p.add_argument("--token", help="API token for --addr (else MOEYARD_API_TOKEN, else ~/.moeyard/token)")
    p.add_argument("--tls-ca", metavar="FILE", default=os.environ.get("MOEYARD_TLS_CA"),
                   help="PEM CA to verify a TLS API with (else MOEYARD_TLS_CA; unset: plaintext)")
    p.add_argument("--timeout", type=float, default=None, help="deadline of the --addr call in seconds")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.set_defaults(func=cmd_generate)


def cmd_generate(args) -> int:
    from moeyard.attention.engine import EngineConfig, LLMEngine
    from moeyard.attention.sequence import RequestError, SamplingParams
    from moeyard.attention.tokenizer import require_tokenizer

    if args.chat and args.prompt is None:
        print("error: --chat needs --prompt (the user message)", file=sys.stderr)
        return 2
    if args.addr is None and args.model is None:
        from moeyard.cluster.cli.local_cluster import load_state

        state = load_state()  # the cluster `moeyard up` started, if any
        if state is not None:
            args.addr = state.api
            args.tls_ca = args.tls_ca or state.tls_ca_file
    if args.addr:
        return _generate_remote(args)
    from moeyard.cluster.config import DEMO_MODEL_DIR, MOEYARD_HOME

    model = args.model or DEMO_MODEL_DIR
    if Path(model).suffix == ".gguf" and Path(model).is_file():
        from moeyard.model.gguf_checkpoint import GGUFError, cached_checkpoint

        print(f"reading {model} (converted once, cached under {MOEYARD_HOME / 'gguf'})", file=sys.stderr)
        try:
            model = cached_checkpoint(model, MOEYARD_HOME / "gguf")
        except GGUFError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    if not (Path(model) / "config.json").is_file():
        print(f"error: {model} is not a checkpoint directory (no config.json); "
              "make one with `moeyard make-model`", file=sys.stderr)
        return 2
    params = SamplingParams(max_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, stop_token_ids=tuple(args.stop_token_ids),
                            stop=tuple(args.stop), ignore_eos=args.ignore_eos)
    engine = LLMEngine(model, EngineConfig(dtype=args.dtype, max_num_seqs=1))
    try:
        if args.prompt is not None and args.chat:
            from moeyard.attention.tokenizer import ChatMessage

            tok = require_tokenizer(engine.tokenizer)
            ids = tok.encode(tok.apply_chat_template([ChatMessage("user", args.prompt)]), add_bos=False)
        elif args.prompt is not None:
            ids = require_tokenizer(engine.tokenizer).encode(args.prompt)
        else:
            ids = args.token_ids
        rid = uuid.uuid4().hex[:16]
        engine.add_request(rid, ids, params)
    except RequestError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out_ids: list[int] = []
    reason = None
    while engine.has_unfinished():
        for o in engine.step():
            out_ids.extend(o.new_token_ids)
            if o.finished:
                reason = o.finish_reason
    text = engine.tokenizer.decode(out_ids) if engine.tokenizer else None
    if text is not None and args.stop:
        cut = min((text.find(s) for s in args.stop if s in text), default=-1)
        if cut >= 0:
            text = text[:cut]
    if args.json:
        print(json.dumps({"request_id": rid, "token_ids": out_ids, "text": text, "finish_reason": reason,
                          "usage": {"prompt_tokens": len(ids), "completion_tokens": len(out_ids)}}))
    else:
        print(text if text is not None else " ".join(map(str, out_ids)))
    return 0


def _add_cluster(sub) -> None:
    p = sub.add_parser("up", help="start a local cluster (Ray, expert shards, attention replicas, API)")
    p.add_argument("--config", type=Path, help="cluster config file (YAML or JSON)")
    p.add_argument("--model", help="checkpoint directory (default: SmolLM2-135M-Instruct upcycled into an MoE, "
                                    "fetched once; offline, a random demo model)")
    p.add_argument("--expert-shards", type=int)
    p.add_argument("--attention-replicas", type=int)
    p.add_argument("--api-port", type=int)
    p.add_argument("--api-host", help="bind address of the API (default 127.0.0.1)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"])
    p.add_argument("--overlap", dest="overlap", action="store_true", default=None,
                   help="overlap attention of one micro-batch with the other's expert round trip")
    p.add_argument("--no-overlap", dest="overlap", action="store_false",
                   help="one batch per step (the default)")
    p.add_argument("--deterministic", dest="deterministic", action="store_true", default=None,
                   help="batch-invariant math: a request's tokens do not depend on what else shares its batch, "
                        "which replica serves it, the placement or a shard restart (costs throughput)")
    p.add_argument("--moe-top-k", type=int, metavar="K",
                   help="experts per token the router chooses, instead of the checkpoint's top_k")
    p.add_argument("--capacity-factor", type=float, metavar="F",
                   help="expert capacity: at most ceil(F * tokens * top_k / experts) assignments per expert and "
                        "step (Switch Transformer); default: no limit")
    p.add_argument("--overflow", choices=["drop", "reroute"],
                   help="past an expert's capacity: drop the assignment (default) or reroute it to the token's "
                        "next-best expert with room")
    p.add_argument("--no-auth", dest="require_auth", action="store_false", default=None,
                   help="serve the API without a token (never do this off loopback)")
    p.add_argument("--address", help="join this Ray cluster instead of starting a head")
    p.add_argument("--redis", metavar="URL",
                   help="Redis for load statistics and the placement (redis:// or rediss://); default: start "
                        "a redis-server of our own on a free loopback port")
    p.add_argument("--redis-password-file", metavar="FILE",
                   help="file holding the Redis password (or set MOEYARD_REDIS_PASSWORD)")
    p.add_argument("--no-autoscaler", dest="autoscale", action="store_false", default=None,
                   help="keep the placement static (load statistics are still recorded)")
    p.add_argument("--detach", action="store_true", help="return once healthy; the cluster keeps running")
    p.set_defaults(func=cmd_up)
    p = sub.add_parser("rebalance", help="plan a placement from the recorded load and apply it live, now")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=lambda args: __import__("moeyard.cluster.cli.local_cluster", fromlist=["rebalance"]).rebalance(
        args.json))
    p = sub.add_parser("down", help="stop the cluster started by `moeyard up`")
    p.set_defaults(func=lambda args: __import__("moeyard.cluster.cli.local_cluster", fromlist=["down"]).down())
    p = sub.add_parser("status", help="shards, slots, replicas and health of the running cluster")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=lambda args: __import__("moeyard.cluster.cli.local_cluster",
                                                fromlist=["status"]).status(args.json))
    p = sub.add_parser("top", help="live expert load, balancedness, placement and serving health (from the dashboard)")
    p.add_argument("--url", help="dashboard URL, http://host:port/ (default: the one `moeyard up` started)")
    p.add_argument("--token", help="API token (else MOEYARD_API_TOKEN, else ~/.moeyard/token)")
    p.add_argument("--lookback", type=float, default=300, metavar="SECONDS",
                   help="seconds of load windows and events to show (default 300)")
    p.add_argument("--interval", type=float, default=2, metavar="SECONDS", help="refresh period (default 2)")
    p.add_argument("--once", action="store_true", help="print one frame and exit")
    p.set_defaults(func=cmd_top)


def cmd_up(args) -> int:
    from moeyard.cluster.cli.local_cluster import up

    return up(up_config(args), args.address, args.detach)


def up_config(args):
    """The :class:`~moeyard.cluster.config.ClusterConfig` of ``moeyard up``'s arguments: the config file with
    the flags given on top."""
    from moeyard.cluster.config import load_config

    cfg = load_config(args.config, model=args.model, expert_shards=args.expert_shards,
                      attention_replicas=args.attention_replicas, api_port=args.api_port, api_host=args.api_host,
                      dtype=args.dtype, overlap=args.overlap, require_auth=args.require_auth,
                      deterministic=args.deterministic, moe_top_k=args.moe_top_k,
                      capacity_factor=args.capacity_factor, overflow=args.overflow)
    redis = {k: v for k, v in (("url", args.redis), ("password_file", args.redis_password_file)) if v}
    if redis:
        cfg = cfg.model_copy(update={"redis": type(cfg.redis).model_validate({**cfg.redis.model_dump(), **redis})})
    if args.autoscale is False:
        cfg = cfg.model_copy(update={"autoscaler": cfg.autoscaler.model_copy(update={"enabled": False})})
    return cfg


def cmd_top(args) -> int:
    from moeyard.client import resolve_token
    from moeyard.cluster.cli.top import run_top

    if args.lookback <= 0 or args.interval <= 0:
        raise ValueError("--lookback and --interval must be positive")
    url = args.url
    if not url:
        from moeyard.cluster.cli.local_cluster import load_state

        state = load_state()
        url = getattr(state, "dashboard", None) if state is not None else None
    if not url:
        print("error: no dashboard URL: pass --url or start a cluster with `moeyard up`", file=sys.stderr)
        return 1
    return run_top(url, resolve_token(args.token), args.lookback, args.interval, args.once)


def _generate_remote(args) -> int:
    """``generate --addr``: stream through the cluster's inference API."""
    from moeyard.client import Chat, GenerateResult, MoeyardClient, MoeyardError

    prompt = args.prompt if args.prompt is not None else args.token_ids
    if args.chat:
        prompt = Chat.user(args.prompt)
    result = GenerateResult()
    try:
        ca = Path(args.tls_ca).read_bytes() if args.tls_ca else None
        with MoeyardClient(args.addr, token=args.token, timeout=args.timeout, tls_root_certs=ca) as client:
            for chunk in client.generate(prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                         top_p=args.top_p, top_k=args.top_k, seed=args.seed, stop=args.stop,
                                         stop_token_ids=args.stop_token_ids, ignore_eos=args.ignore_eos):
                result.add(chunk)
                if not args.json and chunk.text:
                    print(chunk.text, end="", flush=True)
    except MoeyardError as e:
        if not args.json and result.text:
            print(flush=True)
        print(f"error: {e.code.name}: {e.message}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result.to_dict()))
    elif result.text:
        print()
    else:  # a model without a tokenizer streams ids only
        print(" ".join(map(str, result.token_ids)))
    return 0


def _add_render_k8s(sub) -> None:
    p = sub.add_parser("render-k8s", help="render the KubeRay RayService (and Redis, PodMonitor) for a config file")
    p.add_argument("--config", type=Path, required=True, help="cluster config with a `kubernetes:` section")
    p.add_argument("--out", type=Path, help="directory to write the manifests to (default: print them)")
    p.add_argument("--check", action="store_true",
                   help="write nothing; exit 1 if the files in --out differ from what would be rendered")
    p.set_defaults(func=cmd_render_k8s)


def cmd_render_k8s(args) -> int:
    from moeyard.cluster.config import load_config
    from moeyard.cluster.k8s.render import render

    cfg = load_config(args.config)
    try:  # the header names the config as the repository sees it, however it was typed
        source = args.config.resolve().relative_to(Path.cwd()).as_posix()
    except ValueError:
        source = args.config.as_posix()
    files = render(cfg, source)
    if args.out is None:
        if args.check:
            raise ValueError("--check needs --out")
        for name, text in files.items():
            print(f"# ---- {name}\n{text}", end="")
        return 0
    if args.check:
        drift = [n for n, t in files.items() if not (args.out / n).is_file() or (args.out / n).read_text() != t]
        extra = sorted(p.name for p in args.out.glob("*.yaml") if p.name not in files) if args.out.is_dir() else []
        for n in drift:
            print(f"drift: {args.out / n} differs from `moeyard render-k8s --config {args.config}`", file=sys.stderr)
        for n in extra:
            print(f"drift: {args.out / n} is not rendered from {args.config}", file=sys.stderr)
        return 1 if drift or extra else 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (args.out / name).write_text(text)
    print(f"wrote {', '.join(sorted(files))} to {args.out}")
    return 0


def _add_plan(sub) -> None:
    p = sub.add_parser("plan", help="plan an expert placement for a load matrix (no cluster needed)")
    p.add_argument("--load", type=Path, required=True,
                   help="JSON file: an array of L arrays of E numbers (tokens per layer and expert)")
    p.add_argument("--shards", type=int, required=True, help="number of expert shards N")
    p.add_argument("--slots-per-shard", type=int, required=True, help="slots per shard S (N * S >= E)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_plan)


def _read_load_file(path: Path) -> list[list[float]]:
    """A JSON array of L arrays of E non-negative numbers, or ValueError."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as e:
        raise ValueError(f"cannot read load file {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise ValueError(f"load file {path} is not valid JSON: {e}") from None
    if not isinstance(data, list) or not data or not all(isinstance(r, list) for r in data):
        raise ValueError(f"load file {path} must hold a non-empty JSON array of L arrays of E numbers")
    width = len(data[0])
    if width == 0:
        raise ValueError(f"load file {path}: layer 0 has no experts")
    for i, row in enumerate(data):
        if len(row) != width:
            raise ValueError(f"load file {path} is not rectangular: layer {i} has {len(row)} experts, "
                             f"layer 0 has {width}")
        for j, x in enumerate(row):
            if isinstance(x, bool) or not isinstance(x, (int, float)):
                raise ValueError(f"load file {path}: load[{i}][{j}] = {x!r} is not a number")
            if x != x or x in (float("inf"), float("-inf")):
                raise ValueError(f"load file {path}: load[{i}][{j}] is not finite")
            if x < 0:
                raise ValueError(f"load file {path}: load[{i}][{j}] = {x} is negative")
    return data


def cmd_plan(args) -> int:
    from moeyard.router_service.placement import round_robin_placement
    from moeyard.router_service.planner import balancedness, placement_shard_load, plan_placement

    try:
        if args.shards < 1 or args.slots_per_shard < 1:
            raise ValueError(f"--shards and --slots-per-shard must be >= 1, got {args.shards} and "
                             f"{args.slots_per_shard}")
        load = _read_load_file(args.load)
        L, E = len(load), len(load[0])
        if args.shards * args.slots_per_shard < E:
            raise ValueError(f"{args.shards} shards x {args.slots_per_shard} slots = "
                             f"{args.shards * args.slots_per_shard} slots, fewer than experts ({E})")
        before = round_robin_placement(L, E, args.shards, args.slots_per_shard)
        after = plan_placement(load, args.shards, args.slots_per_shard)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    bal_before = balancedness(placement_shard_load(load, before)).tolist()
    bal_after = balancedness(placement_shard_load(load, after)).tolist()
    if args.json:
        print(json.dumps({
            "balancedness_before": min(bal_before),
            "balancedness_after": min(bal_after),
            "phy2log": after.phy2log.tolist(),
            "logcnt": after.logcnt.tolist(),
            "slot_to_shard": [p // after.slots_per_shard for p in range(after.num_slots)],
            "num_shards": after.num_shards,
            "slots_per_shard": after.slots_per_shard,
            "balancedness_before_per_layer": bal_before,
            "balancedness_after_per_layer": bal_after,
        }))
        return 0
    print(f"{L} layers x {E} experts onto {args.shards} shards x {args.slots_per_shard} slots "
          f"({after.num_slots - E} redundant)")
    print(f"{'layer':>5}  {'before':>8}  {'after':>8}  {'max copies':>10}")
    for layer in range(L):
        print(f"{layer:>5}  {bal_before[layer]:>8.4f}  {bal_after[layer]:>8.4f}  "
              f"{int(after.logcnt[layer].max()):>10}")
    print(f"{'min':>5}  {min(bal_before):>8.4f}  {min(bal_after):>8.4f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moeyard", description="Expert-parallel MoE serving")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_make_model(sub)
    _add_generate(sub)
    _add_upcycle(sub)
    _add_cluster(sub)
    _add_plan(sub)
    _add_render_k8s(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    ray_env()  # before any command imports ray: it reads the auth mode at import time
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
