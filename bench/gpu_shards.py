"""Stage ``d`` of the GPU check: the engine against two expert shards over gRPC, each a plain process.

The 2-layer Mixtral-8x7B slice of stage ``c`` (full width, random weights seeded by tensor name, so
every process holds the same model): two :mod:`bench.shard_process` servers on the device, holding
the experts round robin, and the attention side here over :class:`GrpcTransport`. At each batch, one
decode step in-process against over gRPC, with the step split into two ping-pong micro-batches (overlap)
and not: ms per step and the ratio to in-process; the remote step's logits against the in-process
ones (the same model on both paths); and the bytes a step sends to the shards against what one row
per (token, expert) would send (wire format 1). Also, from the dispatch plan alone, the same bytes for
DeepSeek-V3's routing (D 7168, 256 experts, top-8) over 2, 4 and 8 shards.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import median_ms
from bench.gpu_decode import MIXTRAL_8X7B, QUICK, _meta, build_slice

ROOT = Path(__file__).resolve().parents[1]


def _start_shards(config_dir: str, num_shards: int, device: torch.device, timeout_s: float = 120.0):
    procs, addresses = [], {}
    for s in range(num_shards):
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "bench.shard_process", "--config-dir", config_dir, "--shard", str(s),
             "--num-shards", str(num_shards), "--device", str(device)],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
    deadline = time.monotonic() + timeout_s
    for s, p in enumerate(procs):
        line = ""
        while not line.startswith("ADDRESS ") and time.monotonic() < deadline:
            line = p.stdout.readline()
            if not line and p.poll() is not None:
                raise RuntimeError(f"shard process {s} exited with {p.returncode} before serving")
        if not line.startswith("ADDRESS "):
            raise RuntimeError(f"shard process {s} did not start within {timeout_s:.0f} s")
        addresses[s] = line.split()[1]
    return procs, addresses


def _stop(procs) -> None:
    for p in procs:
        try:
            p.stdin.close()
            p.wait(timeout=10)
        except Exception:
            p.kill()


def _halves(s, batch: int, context: int, device: torch.device):
    """Two micro-batches of a decode step (the second half's sequences after the first's blocks)."""
    from moeyard.attention.attn_meta import AttnMeta

    out = []
    for lo, hi in ((0, batch // 2), (batch // 2, batch)):
        tables = [list(range(1 + i * s.blocks_per_seq, 1 + (i + 1) * s.blocks_per_seq)) for i in range(lo, hi)]
        meta = AttnMeta.build([1] * (hi - lo), [context + 1] * (hi - lo), tables, s.cache.block_size, device)
        ids = torch.arange(lo, hi, device=device) % s.spec.vocab_size
        out.append((ids, meta, torch.arange(hi - lo, device=device)))
    return out


def deepseek_wire_bytes(num_tokens: int = 256, shards=(2, 4, 8)) -> list[dict]:
    """Bytes per MoE layer to the shards for DeepSeek-V3 routing (top-8 of 256, D 7168, bf16), uniform
    random experts: each token once per shard against once per (token, expert)."""
    from moeyard.router_service.dispatch import plan_dispatch
    from moeyard.router_service.placement import round_robin_placement

    g = torch.Generator().manual_seed(0)
    ids = torch.stack([torch.randperm(256, generator=g)[:8] for _ in range(num_tokens)])
    hidden = torch.zeros(num_tokens, 8)    # only the row counts matter here
    out = []
    for n in shards:
        _, batches = plan_dispatch(hidden, ids, round_robin_placement(1, 256, n), 0)
        rows = sum(b.num_rows for b in batches)
        distinct = sum(b.hidden.shape[0] for b in batches)
        out.append({"shards": n, "tokens": num_tokens, "bytes_v1": rows * 7168 * 2,
                    "bytes_v2": distinct * 7168 * 2 + 4 * rows, "ratio": round((distinct * 7168 * 2 + 4 * rows)
                                                                              / (rows * 7168 * 2), 3)})
    return out


def stage_d(device: torch.device, quick: bool) -> dict:
    from moeyard.router_service.grpc_transport import GrpcTransport
    from moeyard.router_service.placement import round_robin_placement

    dtype = torch.bfloat16
    cfg = {**MIXTRAL_8X7B, **QUICK["mixtral"]} if quick else MIXTRAL_8X7B
    batches, context, repeats = ([2, 8], 32, 2) if quick else ([1, 8, 32, 64], 512, 5)
    out = {"model": "mixtral_8x7b_2l", "shards": 2, "context": context, "runs": [],
           "deepseek_v3_wire": deepseek_wire_bytes()}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(cfg))
        procs, addresses = _start_shards(tmp, 2, device)
        try:
            local = build_slice(cfg, device, dtype, max(batches), context)
            placement = round_robin_placement(local.spec.num_moe_layers, local.spec.moe.num_experts, 2)
            with GrpcTransport(addresses, timeout_s=60) as transport:
                remote = build_slice(cfg, device, dtype, max(batches), context, transport=transport,
                                     placement=placement)
                for b in batches:
                    meta = _meta(local, b, context, device)
                    ids = torch.arange(b, device=device) % local.spec.vocab_size
                    rows = torch.arange(b, device=device)
                    want = local.runner.forward(ids, meta, rows)
                    got = remote.runner.forward(ids, _meta(remote, b, context, device), rows)
                    err = float((got - want).abs().max() / want.abs().max())
                    before = transport.wire_stats()
                    remote_ms = median_ms(lambda: remote.runner.forward(ids, meta, rows), device, repeats)
                    after = transport.wire_stats()
                    steps = repeats + 1
                    in_ms = median_ms(lambda: local.runner.forward(ids, meta, rows), device, repeats)
                    run = {"batch": b, "in_process_ms": [round(v, 3) for v in in_ms],
                           "grpc_ms": [round(v, 3) for v in remote_ms],
                           "grpc_over_in_process": round(in_ms[0] / remote_ms[0], 3), "logits_rel_err": err,
                           "bytes_per_step": (after.sent_bytes - before.sent_bytes) // steps,
                           "bytes_per_step_v1": (after.per_assignment_bytes - before.per_assignment_bytes) // steps}
                    if b >= 2:
                        mbs = _halves(remote, b, context, device)
                        split_ms = median_ms(lambda: remote.runner.forward_microbatches(mbs), device, repeats)
                        run["grpc_overlap_ms"] = [round(v, 3) for v in split_ms]
                        run["grpc_overlap_over_in_process"] = round(in_ms[0] / split_ms[0], 3)
                    out["runs"].append(run)
        finally:
            _stop(procs)
    out["ok"] = bool(out["runs"]) and all(r["logits_rel_err"] < 2e-2 for r in out["runs"])
    return out
