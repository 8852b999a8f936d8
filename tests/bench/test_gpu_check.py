"""``bench/gpu_check.py --device cpu --quick``: the GPU check runs end to end, so it cannot rot before a GPU
is lent (its stages at toy sizes, the same code paths)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_runs_on_the_cpu_at_toy_sizes(tmp_path):
    r = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--device", "cpu", "--quick"], cwd=ROOT,
                       env={**os.environ, "OUT": str(tmp_path)}, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["ok"] and set(report["stages"]) == {"a", "b", "c", "d", "e"}
    families = report["stages"]["a"]["families"]
    assert len(families) == 8
    for family, f in families.items():
        assert f["device_equals_cpu"] and f["cpu_equals_transformers"], family
        assert f["bf16_logits_err_over_fp32_std"] < 0.2, (family, f)
    runs = report["stages"]["b"]["runs"]
    assert [run["tokens"] for run in runs] == [64, 256]
    assert all(run["loop_ms"][0] > 0 and run["rel_err"] < 2e-2 for run in runs)
    slices = report["stages"]["c"]["slices"]
    assert set(slices) == {"mixtral_8x7b_2l", "deepseek_v3_2l"}
    for name, sl in slices.items():
        assert [r["batch"] for r in sl["runs"]] == [1, 4, 16], name
        assert all(r["step_ms"][0] > 0 and r["floor_ms"] > 0 and r["bytes"]["experts"] > 0 for r in sl["runs"])
        assert set(sl["attention_ms"]) == {"paged", "gather", "rel_err_vs_gather"}   # triton: CUDA only
        assert sl["attention_ms"]["rel_err_vs_gather"]["paged"] < 2e-2
    ds = slices["deepseek_v3_2l"]
    # MLA's cache: latent 64 + rope 16 per token (bf16), not 4 heads x (48 + 32) expanded
    assert ds["kv_bytes_per_token_per_layer"] == 160 and ds["kv_bytes_per_token_per_layer_expanded"] == 640
    # stage d: two shard processes over gRPC serve the same model as in-process (same logits), and a
    # step sends fewer bytes than one row per (token, expert) once tokens share a shard
    d = report["stages"]["d"]
    assert [r["batch"] for r in d["runs"]] == [2, 8]
    assert all(r["logits_rel_err"] < 1e-3 and r["grpc_ms"][0] > 0 for r in d["runs"])
    assert d["runs"][-1]["bytes_per_step"] < d["runs"][-1]["bytes_per_step_v1"]
    assert [w["shards"] for w in d["deepseek_v3_wire"]] == [2, 4, 8]
    assert all(w["ratio"] < 1 for w in d["deepseek_v3_wire"])
    assert report["stages"]["e"]["host_to_host_gbs"] > 0
    assert report["machine"]["torch"] == torch.__version__


def test_gpu_check_refuses_an_unknown_stage():
    r = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--device", "cpu", "--stages", "a,z"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "unknown stage(s) ['z']" in r.stderr
