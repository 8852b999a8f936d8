"""``moeyard plan``: JSON contract, human table, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moeyard.cluster.cli.main import main


def _write(tmp_path, data, name="load.json"):
    f = tmp_path / name
    f.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(f)


def _zipf(L, E, seed=0):
    rng = np.random.default_rng(seed)
    base = 1.0 / np.arange(1, E + 1) ** 1.2
    return [(rng.permutation(base) * 1000).round(3).tolist() for _ in range(L)]


def test_plan_json(tmp_path, capsys):
    load = _zipf(3, 32)
    assert main(["plan", "--load", _write(tmp_path, load), "--shards", "8", "--slots-per-shard", "5", "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    obj = json.loads(out[0])
    assert list(obj)[:7] == ["balancedness_before", "balancedness_after", "phy2log", "logcnt", "slot_to_shard",
                             "num_shards", "slots_per_shard"]
    assert obj["num_shards"] == 8 and obj["slots_per_shard"] == 5
    assert obj["slot_to_shard"] == [p // 5 for p in range(40)]
    assert np.array(obj["phy2log"]).shape == (3, 40)
    assert np.array(obj["logcnt"]).shape == (3, 32) and min(map(min, obj["logcnt"])) >= 1
    assert 0 < obj["balancedness_before"] < obj["balancedness_after"] <= 1.0
    assert obj["balancedness_after"] >= 0.9
    assert obj["balancedness_before"] == pytest.approx(min(obj["balancedness_before_per_layer"]))


def test_plan_human_table(tmp_path, capsys):
    assert main(["plan", "--load", _write(tmp_path, _zipf(2, 8)), "--shards", "2", "--slots-per-shard", "5"]) == 0
    out = capsys.readouterr().out
    assert "before" in out and "after" in out and out.strip().splitlines()[-1].startswith("  min")


@pytest.mark.parametrize("data,shards,slots,msg", [
    ([[1, 2], [3]], 2, 2, "not rectangular"),
    ([[1, "x"]], 2, 2, "not a number"),
    ([[1, True]], 2, 2, "not a number"),
    ([[1, -2]], 2, 2, "negative"),
    ([1, 2], 2, 2, "array of L arrays"),
    ([], 2, 2, "array of L arrays"),
    ("{not json", 2, 2, "not valid JSON"),
    ([[1, 2, 3, 4, 5]], 2, 2, "fewer than experts"),
    ([[1, 2]], 0, 2, ">= 1"),
])
def test_plan_errors(tmp_path, capsys, data, shards, slots, msg):
    rc = main(["plan", "--load", _write(tmp_path, data), "--shards", str(shards),
               "--slots-per-shard", str(slots), "--json"])
    assert rc == 2
    cap = capsys.readouterr()
    assert cap.out == ""
    assert cap.err.startswith("error: ") and msg in cap.err


def test_plan_missing_file(tmp_path, capsys):
    assert main(["plan", "--load", str(tmp_path / "nope.json"), "--shards", "2", "--slots-per-shard", "2"]) == 2
    assert capsys.readouterr().err.startswith("error: ")
