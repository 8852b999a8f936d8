"""`moeyard up`'s MoE serving flags (--moe-top-k, --capacity-factor, --overflow) reach the cluster config,
and options that cannot serve the model are refused by name before anything starts."""

from __future__ import annotations

import pydantic
import pytest

from moeyard.cluster.cli.main import build_parser, main, up_config
from moeyard.cluster.config import ClusterConfig, check_moe_options
from moeyard.model.spec import load_spec


def test_flags_reach_the_config(tmp_path):
    args = build_parser().parse_args(["up", "--moe-top-k", "1", "--capacity-factor", "1.25", "--overflow",
                                      "reroute"])
    cfg = up_config(args)
    assert (cfg.moe_top_k, cfg.capacity_factor, cfg.overflow) == (1, 1.25, "reroute")
    cfg = up_config(build_parser().parse_args(["up"]))
    assert (cfg.moe_top_k, cfg.capacity_factor, cfg.overflow) == (None, None, "drop")   # off by default
    config = tmp_path / "c.yaml"
    config.write_text("capacity_factor: 2.0\noverflow: reroute\n")
    cfg = up_config(build_parser().parse_args(["up", "--config", str(config), "--capacity-factor", "0.5"]))
    assert (cfg.capacity_factor, cfg.overflow) == (0.5, "reroute")                      # the flag wins


@pytest.mark.parametrize("fields, message", [
    ({"capacity_factor": 0}, "greater than 0"),
    ({"capacity_factor": float("inf")}, "finite number"),
    ({"moe_top_k": 0}, "greater than or equal to 1"),
    ({"overflow": "spill"}, "'drop' or 'reroute'"),
    ({"capacity_factor": 1.0, "deterministic": True}, "deterministic cannot be combined with capacity_factor"),
])
def test_bad_values_are_named(fields, message):
    with pytest.raises(pydantic.ValidationError, match=message):
        ClusterConfig(**fields)


def test_options_that_do_not_fit_the_model_are_refused(hf_models, capsys, monkeypatch):
    moe, _ = hf_models("mixtral")
    dense, _ = hf_models("llama")
    with pytest.raises(ValueError, match=r"moe_top_k 9 does not fit mixtral \(8 experts\)"):
        check_moe_options(ClusterConfig(model=str(moe), moe_top_k=9), load_spec(moe))
    with pytest.raises(ValueError, match="capacity_factor applies to MoE models; llama at .* is dense"):
        check_moe_options(ClusterConfig(model=str(dense), capacity_factor=1.0), load_spec(dense))
    check_moe_options(ClusterConfig(model=str(moe), moe_top_k=8, capacity_factor=1.0), load_spec(moe))
    # `up` refuses before it starts Ray or Redis
    monkeypatch.setattr("moeyard.cluster.cli.local_cluster.load_state", lambda: None)  # no cluster up here
    assert main(["up", "--model", str(moe), "--moe-top-k", "9"]) == 2
    assert "moe_top_k 9 does not fit mixtral" in capsys.readouterr().err
