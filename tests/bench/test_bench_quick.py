"""Each benchmark's ``--quick`` mode (tiny sizes, one repeat) runs to the end in CI, so none of them rots.

The figures of a quick run mean nothing; what is checked is that every system ran and reported. The
exceptions, said in docs/benchmarks.md: bench_vllm (vLLM lives in a venv of its own) and the cluster
benchmarks that start Ray (their paths run in the cluster tests)."""

from __future__ import annotations

import json

from bench import bench_amx, bench_engine, bench_wire, roofline


def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_bench_engine_quick(capsys):
    assert bench_engine.main(["--quick", "--threads", "1", "--also", "plain,deterministic"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("machine: {") and '"isa"' in out.splitlines()[0]
    res = _last_json(out)
    assert res["quick"] and [r["batch"] for r in res["results"]] == [1, 4]
    for r in res["results"]:
        assert r["ours_tok_s"] > 0 and r["transformers_tok_s"] > 0
        assert r["ours_plain_tok_s"] > 0 and r["ours_deterministic_tok_s"] > 0
        assert r["transformers_cache"] in ("static", "dynamic")
        assert len(r["ours_tok_s_runs"]) == len(r["transformers_tok_s_runs"]) == 1


def test_roofline_quick(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("MOEYARD_CACHE_DIR", str(tmp_path))
    assert roofline.main(["--quick", "--batches", "1,64"]) == 0
    out = capsys.readouterr().out
    res = _last_json(out)
    assert res["peak_flops"]["float32"] > 0 and res["memory_bandwidth"] > 0
    assert [(r["batch"], r["dtype"]) for r in res["decode"]] == [(1, "bfloat16"), (1, "float32"),
                                                                 (64, "bfloat16"), (64, "float32")]
    assert not list(tmp_path.iterdir())        # quick measurements are not cached


def test_bench_wire_quick(capsys):
    assert bench_wire.main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") >= 5 and "[256, 7168]" in out


def test_bench_amx_quick(capsys):
    from moeyard.model import amx

    assert bench_amx.main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("machine: {")
    why = amx.unavailable()
    if why is not None:                       # a CPU without AMX: it says why and measures nothing
        assert f"the AMX kernel cannot run here: {why}" in out
        return
    rows = [line for line in out.splitlines() if line.startswith("| gate/up") or line.startswith("| down")]
    assert len(rows) == 4 and all(line.count("|") == 9 for line in rows)


def test_bench_engine_refuses_an_unknown_system():
    import pytest

    with pytest.raises(SystemExit):
        bench_engine.main(["--quick", "--also", "fast"])
