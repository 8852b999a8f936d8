"""The application inside the rendered ``serveConfigV2`` runs: its args, with the pod paths swapped
for local ones, deploy on a real local Ray cluster whose node advertises the node groups' custom
resources; every actor lands through its pin, and greedy outputs equal the in-process engine."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from moeyard.attention.engine import EngineConfig, LLMEngine
from moeyard.attention.sequence import SamplingParams
from moeyard.client import MoeyardClient
from moeyard.cluster.k8s.render import ATTENTION_RESOURCE, CONTROL_RESOURCE, EXPERT_RESOURCE
from moeyard.model.make_model import make_model
from moeyard.model.make_model_options import MakeModelOptions

pytestmark = pytest.mark.timeout(300)
ROOT = Path(__file__).resolve().parents[3]
TOKEN = "rendered-app-token-0123456789"


def _rendered_args() -> dict:
    doc = yaml.safe_load((ROOT / "deploy/rendered/cpu/rayservice.yaml").read_text())
    serve_cfg = yaml.safe_load(doc["spec"]["serveConfigV2"])
    (app,) = serve_cfg["applications"]
    assert app["import_path"] == "moeyard.cluster.serving.app:app_builder"
    return app["args"]


def test_rendered_cpu_application_runs_pinned_by_its_resources(ray_serve, local_redis, tmp_path):
    import ray
    from ray import serve

    from moeyard.cluster.serving.app import APP_NAME, app_builder

    ckpt = tmp_path / "model"
    make_model(MakeModelOptions(family="mixtral", layers=2, hidden=64, intermediate=96, experts=8, top_k=2,
                                heads=4, kv_heads=2, vocab=300, dtype="float32", seed=4), ckpt)
    (tmp_path / "token").write_text(TOKEN)
    args = _rendered_args()
    assert args["ray_resources"] == {"control": CONTROL_RESOURCE, "attention": ATTENTION_RESOURCE,
                                     "experts": EXPERT_RESOURCE}
    # what differs on this machine: paths, loopback, one thread per process, float32 for exact parity
    args.update(model=str(ckpt), dtype="float32", api_host="127.0.0.1", api_port=0, shard_host="127.0.0.1",
                api_token_file=str(tmp_path / "token"), torch_threads=1, replica_num_cpus=1, shard_num_cpus=1,
                namespace="rendered-test")
    args["dashboard"].update(host="127.0.0.1", port=0)
    args["engine"]["kv_cache_mib"] = 16
    args["redis"].update(url=local_redis.url, password_file=local_redis.password_file, key_prefix="rendered-test")
    before = ray.available_resources()
    serve.run(app_builder(args), name=APP_NAME, route_prefix=None)
    try:
        addr = serve.get_app_handle(APP_NAME).address.remote().result(timeout_s=120)
        used = {r: before[r] - ray.available_resources().get(r, 0.0) for r in
                (CONTROL_RESOURCE, ATTENTION_RESOURCE, EXPERT_RESOURCE)}
        # 4 control actors (shard manager, autoscaler, dashboard, API ingress), 2 attention replicas and
        # 2 shards: each holds a token amount of its group's resource (Serve's own actors hold none)
        assert used[ATTENTION_RESOURCE] == pytest.approx(2 * 0.001)
        assert used[EXPERT_RESOURCE] == pytest.approx(2 * 0.001)
        assert used[CONTROL_RESOURCE] == pytest.approx(4 * 0.001)
        prompt = [5, 9, 17, 33, 2, 81]
        with MoeyardClient(addr, token=TOKEN, timeout=120) as client:
            got = client.generate_all(prompt, max_new_tokens=8, ignore_eos=True).token_ids
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            ref = LLMEngine(ckpt, EngineConfig(dtype="float32")).generate(
                [prompt], SamplingParams(max_tokens=8, ignore_eos=True))[0]
        finally:
            torch.set_num_threads(threads)
        assert got == ref
    finally:
        serve.delete(APP_NAME)
