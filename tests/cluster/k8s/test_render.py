"""``moeyard.cluster.k8s.render``: the in-cluster serve config, the manifests, and the configs it refuses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from moeyard.cluster.config import ClusterConfig, load_config
from moeyard.cluster.k8s import render as R

REPO = Path(__file__).resolve().parents[3]
CONFIGS = REPO / "deploy" / "config"


def _raw(profile: str) -> dict:
    return yaml.safe_load((CONFIGS / f"{profile}.yaml").read_text())


def _cfg(profile: str = "cpu", **k8s) -> ClusterConfig:
    """The committed config of ``profile`` with ``kubernetes:`` entries replaced (dotted keys nest)."""
    data = _raw(profile)
    for key, value in k8s.items():
        node = data["kubernetes"]
        *parents, last = key.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return ClusterConfig.model_validate(data)


def _docs(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d is not None]


# ------------------------------------------------------------------------------------- serve config

@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_serve_config_fills_in_cluster_values(profile):
    cfg = load_config(CONFIGS / f"{profile}.yaml")
    k = cfg.kubernetes
    s = R.serve_config(cfg)
    assert s.kubernetes is None
    assert s.api_host == "0.0.0.0" and s.shard_host == "0.0.0.0"
    assert s.api_port == k.api_port == 9000
    assert s.redis.url == f"redis://{k.name}-redis:6379/0"
    assert s.redis.password_file == f"{R.REDIS_DIR}/password" == "/etc/moeyard/redis/password"
    assert s.redis.key_prefix == cfg.redis.key_prefix
    assert s.api_token_file == f"{R.TOKEN_DIR}/token" == "/etc/moeyard/api-token/token"
    assert (s.ray_resources.control, s.ray_resources.attention, s.ray_resources.experts) == (
        "moeyard_control", "moeyard_attention", "moeyard_experts")
    assert s.dashboard.host == "0.0.0.0" and s.dashboard.port == k.dashboard_port and s.dashboard.token_file is None
    assert s.use_gpu is (profile == "gpu")
    # everything else is the config as written
    same = {"model", "dtype", "namespace", "expert_shards", "attention_replicas", "engine", "autoscaler"}
    assert s.model_dump(include=same) == cfg.model_dump(include=same)
    # the input is not modified
    assert cfg.api_host == "127.0.0.1" and cfg.kubernetes is not None


def test_serve_config_redis_url_follows_the_name():
    s = R.serve_config(_cfg(name="moe-a"))
    assert s.redis.url == "redis://moe-a-redis:6379/0"


def test_serve_config_v2_round_trips():
    cfg = _cfg("gpu")
    doc = yaml.safe_load(R.serve_config_v2(cfg))
    assert doc["proxy_location"] == "HeadOnly"
    assert doc["http_options"] == {"host": "0.0.0.0", "port": cfg.kubernetes.serve_http_port}
    (app,) = doc["applications"]
    assert app["import_path"] == "moeyard.cluster.serving.app:app_builder" and app["name"] == "moeyard"
    assert "kubernetes" not in app["args"]
    assert ClusterConfig.model_validate(app["args"]) == R.serve_config(cfg)


def test_external_redis_keeps_its_url():
    data = _raw("cpu")
    data["redis"]["url"] = "rediss://redis.example:6380/2"
    data["kubernetes"]["redis"] = {"deploy": False}
    cfg = ClusterConfig.model_validate(data)
    assert R.serve_config(cfg).redis.url == "rediss://redis.example:6380/2"
    files = R.render(cfg, "x.yaml")
    assert "redis.yaml" not in files
    assert yaml.safe_load(files["kustomization.yaml"])["resources"] == ["podmonitor.yaml", "rayservice.yaml"]


# ---------------------------------------------------------------------------------------- manifests

def test_render_files_and_header():
    files = R.render(_cfg("gpu"), "deploy/config/gpu.yaml")
    assert sorted(files) == ["kustomization.yaml", "podmonitor.yaml", "rayservice.yaml", "redis.yaml"]
    for text in files.values():
        assert text.startswith(R.HEADER.format(source="deploy/config/gpu.yaml"))
    assert yaml.safe_load(files["kustomization.yaml"])["resources"] == ["podmonitor.yaml", "rayservice.yaml",
                                                                        "redis.yaml"]
    assert "serveConfigV2: |" in files["rayservice.yaml"]  # a literal block, readable in review
    assert "podmonitor.yaml" not in R.render(_cfg(pod_monitor=False), "x")


def test_rayservice_groups():
    rs = R.rayservice(_cfg("gpu"))
    rcc = rs["spec"]["rayClusterConfig"]
    head = rcc["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert json.loads(json.loads(head["rayStartParams"]["resources"])) == {R.CONTROL_RESOURCE: 1000}
    ports = {p["name"]: p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert ports["serve-grpc"] == 9000 and ports["moeyard-http"] == 8090 and ports["serve"] == 8000
    attention, experts = rcc["workerGroupSpecs"]
    assert (attention["groupName"], experts["groupName"]) == ("attention", "experts")
    assert experts["rayStartParams"]["num-gpus"] == "1" and attention["rayStartParams"]["num-gpus"] == "1"
    no_attention_gpus = R.rayservice(_cfg("gpu", attention__size__gpus=0))["spec"]["rayClusterConfig"]
    assert "num-gpus" not in no_attention_gpus["workerGroupSpecs"][0]["rayStartParams"]
    assert (experts["minReplicas"], experts["replicas"], experts["maxReplicas"]) == (8, 8, 16)
    assert all(isinstance(v, str) for g in (head, attention, experts) for v in g["rayStartParams"].values())
    # only the head mounts the API token
    def mounts(g):
        return {m["name"] for m in g["template"]["spec"]["containers"][0]["volumeMounts"]}

    assert "api-token" in mounts(head) and "api-token" not in mounts(experts)


def test_redis_password_never_on_the_command_line():
    dep, svc = R.redis_objects(_cfg().kubernetes)
    script = dep["spec"]["template"]["spec"]["containers"][0]["command"][-1]
    assert "/etc/redis-secret/password" in script and "--requirepass" not in script
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]


# ------------------------------------------------------------------------------------- what it refuses

def test_render_needs_a_kubernetes_section():
    data = _raw("cpu")
    del data["kubernetes"]
    with pytest.raises(ValueError, match="no `kubernetes:` section"):
        R.render(ClusterConfig.model_validate(data), "x")


@pytest.mark.parametrize("model", ["/data/mixtral", "/modelsX/mixtral", "/models", None])
def test_model_must_be_under_the_mount(model):
    data = _raw("cpu")
    data["model"] = model
    with pytest.raises(ValueError, match="kubernetes.models_mount"):
        R.render(ClusterConfig.model_validate(data), "x")


def test_model_under_a_custom_mount():
    data = _raw("cpu")
    data["model"] = "/mnt/ckpt/demo"
    data["kubernetes"]["models_mount"] = "/mnt/ckpt/"
    assert R.serve_config(ClusterConfig.model_validate(data)).model == "/mnt/ckpt/demo"


def test_gpu_profile_needs_gpus_on_the_experts():
    with pytest.raises(ValueError, match="gpu profile needs kubernetes.experts.size.gpus >= 1"):
        R.render(_cfg("gpu", experts__size__gpus=0), "x")


@pytest.mark.parametrize("where", ["experts__size__gpus", "attention__size__gpus", "head__gpus"])
def test_cpu_profile_asks_for_no_gpus(where):
    with pytest.raises(ValueError, match="cpu profile asks for no GPUs"):
        R.render(_cfg("cpu", **{where: 1}), "x")


def test_experts_group_must_hold_the_shards():
    # cpu: 4 ray cpus / 2 per shard = 2 shards per pod; max_replicas 1 -> 2 < expert_shards 3
    data = _raw("cpu")
    data["expert_shards"] = 3
    data["kubernetes"]["experts"]["max_replicas"] = 1
    data["kubernetes"]["experts"]["min_replicas"] = 1
    with pytest.raises(ValueError, match="experts group holds at most 2 shards"):
        R.render(ClusterConfig.model_validate(data), "x")
    # gpu: one shard per GPU; max_shards 16 needs 16 one-GPU pods
    with pytest.raises(ValueError, match=r"holds at most 12 shards .* needs 16"):
        R.render(_cfg("gpu", experts__max_replicas=12), "x")
    # the ray_cpus bound too: 4 cpus / 4 per shard = 1 per pod, even with 2 GPUs
    with pytest.raises(ValueError, match="needs 16"):
        R.render(_cfg("gpu", experts__size__gpus=2, experts__max_replicas=8), "x")
    assert R.render(_cfg("gpu", experts__size__gpus=2, experts__ray_cpus=8, experts__max_replicas=8), "x")


def test_attention_group_must_hold_the_replicas():
    with pytest.raises(ValueError, match="attention group holds at most 1 replicas; the config asks for 2"):
        R.render(_cfg("cpu", attention__ray_cpus=2, attention__max_replicas=1, attention__replicas=1), "x")


def test_external_redis_needs_a_url():
    with pytest.raises(ValueError, match="set redis.url"):
        R.render(_cfg("cpu", redis={"deploy": False}), "x")


# ------------------------------------------------------------------------------------------- moeyard up

def test_moeyard_up_ignores_the_kubernetes_section():
    """The deploy configs are ordinary cluster configs: ``moeyard up --config`` loads them, and the
    Serve application built from them carries ``kubernetes:`` along without using it."""
    from ray.serve import Application

    from moeyard.cluster.serving.app import build_app

    cfg = load_config(CONFIGS / "cpu.yaml")
    assert cfg.kubernetes is not None and cfg.kubernetes.profile == "cpu"
    assert cfg.api_host == "127.0.0.1" and cfg.ray_resources.experts is None  # no in-cluster values
    assert load_config(CONFIGS / "cpu.yaml", api_port=7000).api_port == 7000
    assert isinstance(build_app(cfg), Application)
    without = cfg.model_copy(update={"kubernetes": None})
    assert without.model_dump(exclude={"kubernetes"}) == cfg.model_dump(exclude={"kubernetes"})
