"""MoE serving options through a real cluster (Ray, 2 expert shards, 1 attention replica, Redis, fp32), one
cluster per option set:

* ``moe_top_k: 1`` (the checkpoint routes top-2) with ``capacity_factor: 0.5, overflow: drop``;
* ``capacity_factor: 0.5, overflow: reroute``;
* ``moe_top_k: 2``, the checkpoint's own: the same tokens as the in-process engine with no option at all.

The tokens equal the in-process engine with the same options, ``ModelInfo`` reports them (and the active
parameters that follow from the served top-k), and the overflow the replica counts (``/metrics``, the
dashboard's state and serving panel) equals the in-process engine's: for ``drop``, also a reference
computed from the gate alone on the same steps; for ``reroute``, the in-process steps (the same decisions,
as the tokens and counts show) never send an expert more than its capacity."""

from __future__ import annotations

import json
import time
import urllib.request

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from moeyard.attention.engine import EngineConfig, LLMEngine
from moeyard.attention.sequence import SamplingParams
from moeyard.client import MoeyardClient
from moeyard.cluster.config import ClusterConfig, EngineSettings
from moeyard.cluster.serving.app import APP_NAME, build_app
from moeyard.cluster.settings.autoscaler import AutoscalerSettings
from moeyard.cluster.settings.dashboard import DashboardSettings
from moeyard.cluster.settings.redis import RedisSettings
from moeyard.model.spec import load_spec
from moeyard.router_service.gate import count_dropped, expert_capacity, router_logits, select_experts
from tests.attention.test_capacity_engine import _StepLog

pytestmark = pytest.mark.timeout(600)
TOKEN = "moe-options-token-0123456789"
PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16], [11, 12, 13, 40, 41, 42, 43], [7, 7, 7, 8, 9]]
NEW_TOKENS = 6
OPTION_SETS = {"drop": dict(moe_top_k=1, capacity_factor=0.5, overflow="drop"),
               "reroute": dict(moe_top_k=None, capacity_factor=0.5, overflow="reroute"),
               "checkpoint-top-k": dict(moe_top_k=2, capacity_factor=None, overflow="drop")}


@pytest.fixture(scope="module", params=list(OPTION_SETS))
def cluster(request, hf_models, ray_serve, local_redis, tmp_path_factory):
    from ray import serve

    name, options = request.param, OPTION_SETS[request.param]
    ns = f"moe-options-{name}"
    ckpt, _ = hf_models("mixtral")
    token_file = tmp_path_factory.mktemp("tok") / "token"
    token_file.write_text(TOKEN)
    cfg = ClusterConfig(
        model=str(ckpt), dtype="float32", namespace=ns, expert_shards=2, redundant_slots_per_shard=0,
        attention_replicas=1, torch_threads=1, api_token_file=str(token_file), engine=EngineSettings(kv_cache_mib=16),
        redis=RedisSettings(url=local_redis.url, password_file=local_redis.password_file, key_prefix=ns,
                            window_s=1.0, flush_interval_s=0.2, socket_timeout_s=0.3),
        autoscaler=AutoscalerSettings(enabled=False), dashboard=DashboardSettings(telemetry_interval_s=0.3),
        **options)
    serve.run(build_app(cfg), name=APP_NAME, route_prefix=None)
    ingress = serve.get_app_handle(APP_NAME)
    yield {"name": name, "options": options, "ckpt": ckpt, "api": ingress.address.remote().result(timeout_s=120),
           "dashboard": ingress.dashboard_address.remote().result(timeout_s=60)}
    serve.delete(APP_NAME)


def _reference(ckpt, options: dict):
    """The in-process engine with the same options, one request at a time (as the test sends them): its
    tokens, its router's overflow counts, and its step log. The checkpoint's own top-k: no option at all."""
    if options["capacity_factor"] is None and options["moe_top_k"] == load_spec(ckpt).moe.top_k:
        engine = LLMEngine(ckpt, EngineConfig(dtype="float32"))
    else:
        engine = LLMEngine(ckpt, EngineConfig(dtype="float32", top_k_override=options["moe_top_k"],
                                              capacity_factor=options["capacity_factor"],
                                              overflow=options["overflow"]))
    log = _StepLog(engine)
    params = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
    tokens = [engine.generate([p], params)[0] for p in PROMPTS]
    return engine, tokens, log


def _overflow_on_metrics(url: str) -> dict[str, list[int]]:
    text = urllib.request.urlopen(url + "metrics", timeout=10).read().decode()
    out: dict[str, dict[int, int]] = {"dropped": {}, "rerouted": {}}
    for fam in text_string_to_metric_families(text):
        if fam.name == "moeyard:moe_overflow":
            for s in fam.samples:
                if s.name.endswith("_total"):
                    per = out[s.labels["outcome"]]
                    per[int(s.labels["layer"])] = per.get(int(s.labels["layer"]), 0) + int(s.value)
    return {k: [v[layer] for layer in sorted(v)] for k, v in out.items()}


def test_tokens_model_info_and_counted_overflow(cluster):
    options = cluster["options"]
    engine, want_tokens, log = _reference(cluster["ckpt"], options)
    counts = engine.router.overflow_counts()
    want = {"dropped": list(counts.dropped), "rerouted": list(counts.rerouted)}
    cfg, gates = engine.router.gate_cfg, engine.router.gates
    limited = options["capacity_factor"] is not None
    if limited and options["overflow"] == "drop":            # the drops, from the gate alone
        ref = [0] * len(gates)
        for step in log.steps:
            for layer, calls in step.items():
                _, ids = select_experts(router_logits(torch.cat(calls["hidden"]), gates[layer].weight, cfg), cfg)
                ref[layer] += count_dropped(ids, cfg.num_experts, cfg.capacity_factor)
        assert want["dropped"] == ref and sum(ref) > 0 and sum(want["rerouted"]) == 0
    elif limited:                                            # rerouted, and never past an expert's capacity
        assert sum(want["rerouted"]) > 0
        for step in log.steps:
            for layer, calls in step.items():
                ids = torch.cat(calls["ids"])
                cap = expert_capacity(ids.shape[0], cfg.top_k, cfg.num_experts, cfg.capacity_factor)
                assert int(torch.bincount(ids[ids >= 0], minlength=cfg.num_experts).max()) <= cap

    with MoeyardClient(cluster["api"], token=TOKEN, timeout=120) as client:
        got = [client.generate_all(p, max_new_tokens=NEW_TOKENS, ignore_eos=True).token_ids for p in PROMPTS]
        info = client.model_info()
    assert got == want_tokens
    spec = load_spec(cluster["ckpt"])
    served_k = options["moe_top_k"] or spec.moe.top_k
    assert (info["top_k"], info["moe_top_k"], info["capacity_factor"], info["overflow"]) == (
        2, served_k, options["capacity_factor"] or 0.0, options["overflow"] if options["capacity_factor"] else "")
    assert info["active_params"] == spec.total_and_active_params(served_k)[1]
    if options["moe_top_k"] == 1:
        assert info["active_params"] < spec.total_and_active_params()[1]

    url = cluster["dashboard"]
    if options["capacity_factor"] is None:                    # no limit: nothing counted, no panel section
        assert _overflow_on_metrics(url) == {"dropped": [], "rerouted": []}
        return
    deadline = time.monotonic() + 60
    while (seen := _overflow_on_metrics(url)) != want and time.monotonic() < deadline:
        time.sleep(0.3)                                           # the replica publishes every 0.3 s
    assert seen == want
    req = urllib.request.Request(url + "api/state", headers={"Authorization": f"Bearer {TOKEN}"})
    state = json.loads(urllib.request.urlopen(req, timeout=10).read())
    assert state["serving"]["overflow_dropped"] == want["dropped"]
    assert state["serving"]["overflow_rerouted"] == want["rerouted"]
    req = urllib.request.Request(url + "api/panels", headers={"Authorization": f"Bearer {TOKEN}"})
    serving = json.loads(urllib.request.urlopen(req, timeout=10).read())["panels"]["serving"]
    assert "expert capacity overflow" in serving                  # the panel the page shows, as rendered
    for layer, (d, r) in enumerate(zip(want["dropped"], want["rerouted"])):
        assert f'data-layer="{layer}" data-dropped="{d}" data-rerouted="{r}"' in serving
