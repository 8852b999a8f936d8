"""MoE serving options through a real cluster (Ray, 2 expert shards, 1 attention replica, Redis, fp32):
``moe_top_k: 1`` (the checkpoint routes top-2) and ``capacity_factor: 0.5`` with ``overflow: drop``. The
tokens equal the in-process engine with the same options, ``ModelInfo`` reports the served top-k (and the
active parameters that follow from it), and the drops the replica counts (``/metrics``, the dashboard's
state) equal a reference computed from the gate alone on the same steps."""

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
from moeyard.router_service.gate import count_dropped, router_logits, select_experts
from tests.attention.test_capacity_engine import _StepLog

pytestmark = pytest.mark.timeout(600)
TOKEN = "moe-options-token-0123456789"
NS = "moe-options"
PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16], [11, 12, 13, 40, 41, 42, 43], [7, 7, 7, 8, 9]]
NEW_TOKENS = 6
OPTIONS = dict(moe_top_k=1, capacity_factor=0.5, overflow="drop")


@pytest.fixture(scope="module")
def cluster(hf_models, ray_serve, local_redis, tmp_path_factory):
    from ray import serve

    ckpt, _ = hf_models("mixtral")
    token_file = tmp_path_factory.mktemp("tok") / "token"
    token_file.write_text(TOKEN)
    cfg = ClusterConfig(
        model=str(ckpt), dtype="float32", namespace=NS, expert_shards=2, redundant_slots_per_shard=0,
        attention_replicas=1, torch_threads=1, api_token_file=str(token_file), engine=EngineSettings(kv_cache_mib=16),
        redis=RedisSettings(url=local_redis.url, password_file=local_redis.password_file, key_prefix=NS,
                            window_s=1.0, flush_interval_s=0.2, socket_timeout_s=0.3),
        autoscaler=AutoscalerSettings(enabled=False), dashboard=DashboardSettings(telemetry_interval_s=0.3),
        **OPTIONS)
    serve.run(build_app(cfg), name=APP_NAME, route_prefix=None)
    ingress = serve.get_app_handle(APP_NAME)
    yield {"api": ingress.address.remote().result(timeout_s=120), "ckpt": ckpt,
           "dashboard": ingress.dashboard_address.remote().result(timeout_s=60)}
    serve.delete(APP_NAME)


def _reference(ckpt):
    """The in-process engine with the same options, one request at a time (as the test sends them), and
    the drops of its steps recomputed from the gate alone."""
    engine = LLMEngine(ckpt, EngineConfig(dtype="float32", top_k_override=OPTIONS["moe_top_k"],
                                          capacity_factor=OPTIONS["capacity_factor"], overflow="drop"))
    log = _StepLog(engine)
    params = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
    tokens = [engine.generate([p], params)[0] for p in PROMPTS]
    cfg, gates = engine.router.gate_cfg, engine.router.gates
    drops = [0] * len(gates)
    for step in log.steps:
        for layer, calls in step.items():
            _, ids = select_experts(router_logits(torch.cat(calls["hidden"]), gates[layer].weight, cfg), cfg)
            drops[layer] += count_dropped(ids, cfg.num_experts, cfg.capacity_factor)
    assert engine.router.overflow_counts().dropped == tuple(drops)
    return tokens, drops


def _dropped_on_metrics(url: str) -> list[int]:
    text = urllib.request.urlopen(url + "metrics", timeout=10).read().decode()
    out: dict[int, int] = {}
    for fam in text_string_to_metric_families(text):
        if fam.name == "moeyard:moe_overflow":
            for s in fam.samples:
                if s.name.endswith("_total") and s.labels["outcome"] == "dropped":
                    out[int(s.labels["layer"])] = out.get(int(s.labels["layer"]), 0) + int(s.value)
    return [out[k] for k in sorted(out)]


def test_tokens_model_info_and_counted_drops(cluster):
    want_tokens, want_drops = _reference(cluster["ckpt"])
    assert sum(want_drops) > 0                                     # the factor binds on these prompts
    with MoeyardClient(cluster["api"], token=TOKEN, timeout=120) as client:
        got = [client.generate_all(p, max_new_tokens=NEW_TOKENS, ignore_eos=True).token_ids for p in PROMPTS]
        info = client.model_info()
    assert got == want_tokens
    spec = load_spec(cluster["ckpt"])
    assert (info["top_k"], info["moe_top_k"], info["capacity_factor"], info["overflow"]) == (2, 1, 0.5, "drop")
    assert info["active_params"] == spec.total_and_active_params(1)[1] < spec.total_and_active_params()[1]
    url = cluster["dashboard"]
    deadline = time.monotonic() + 60
    while (seen := _dropped_on_metrics(url)) != want_drops and time.monotonic() < deadline:
        time.sleep(0.3)                                           # the replica publishes every 0.3 s
    assert seen == want_drops
    req = urllib.request.Request(url + "api/state", headers={"Authorization": f"Bearer {TOKEN}"})
    state = json.loads(urllib.request.urlopen(req, timeout=10).read())
    assert state["serving"]["overflow_dropped"] == want_drops
    req = urllib.request.Request(url + "api/panels", headers={"Authorization": f"Bearer {TOKEN}"})
    panels = json.loads(urllib.request.urlopen(req, timeout=10).read())
    serving = panels["panels"]["serving"]                         # the panel the page shows, as rendered
    assert "expert capacity overflow" in serving
    for layer, n in enumerate(want_drops):
        assert f'data-layer="{layer}" data-dropped="{n}" data-rerouted="0"' in serving
