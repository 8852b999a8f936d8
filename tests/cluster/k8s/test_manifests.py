"""The committed manifests (``deploy/rendered/*``, ``deploy/overlays/*``) validate offline against the
KubeRay CRDs, the Kubernetes schemas and the project's rules; they match what ``moeyard render-k8s``
renders; and broken manifests are caught by the same validation."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import yaml

from moeyard.cluster.k8s import validate as V

REPO = Path(__file__).resolve().parents[3]
RENDERED = REPO / "deploy" / "rendered"
OVERLAYS = REPO / "deploy" / "overlays"
PROFILES = ("cpu", "gpu")
# the overlay -> the rendered profile it builds on
OVERLAY_PROFILE = {"dev": "cpu", "prod": "gpu"}


@pytest.fixture(scope="session")
def crd_dir() -> Path:
    """The KubeRay CRD folder: ``$MOEYARD_KUBERAY_CRDS`` (set by ``.ci/run``), else the checkout's sibling
    ``shared/kuberay/crds``. Missing = a failure, not a skip: these tests need the CRDs."""
    env = os.environ.get(V.CRD_ENV)
    path = Path(env) if env else Path(__file__).resolve().parents[4] / "shared" / "kuberay" / "crds"
    if not (path / "ray.io_rayservices.yaml").is_file():
        pytest.fail(f"these tests need the KubeRay CRD folder (ray.io_rayservices.yaml, ray.io_rayclusters.yaml): "
                    f"{path} has none; set {V.CRD_ENV} to the folder holding them", pytrace=False)
    return path


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _rendered_cases() -> list:
    cases = []
    for profile in PROFILES:
        for f in sorted((RENDERED / profile).glob("*.yaml")):
            if f.name == "kustomization.yaml":
                continue
            for i, d in enumerate(_docs(f)):
                cases.append(pytest.param(profile, f.name, i, id=f"{profile}/{f.name}[{i}]-{d.get('kind')}"))
    return cases


def _rayservice(profile: str) -> dict:
    return _docs(RENDERED / profile / "rayservice.yaml")[0]


def _serve(doc: dict) -> dict:
    return yaml.safe_load(doc["spec"]["serveConfigV2"])


def _group(doc: dict, name: str) -> dict:
    return next(g for g in doc["spec"]["rayClusterConfig"]["workerGroupSpecs"] if g["groupName"] == name)


def _contains(node, needle: str) -> bool:
    if isinstance(node, dict):
        return any(_contains(k, needle) or _contains(v, needle) for k, v in node.items())
    if isinstance(node, list):
        return any(_contains(v, needle) for v in node)
    return isinstance(node, str) and needle in node


# ------------------------------------------------------------------------------------ rendered files

@pytest.mark.parametrize("profile,name,index", _rendered_cases())
def test_rendered_document_validates(crd_dir, profile, name, index):
    doc = _docs(RENDERED / profile / name)[index]
    assert V.validate_manifest(doc, crd_dir) == []


@pytest.mark.parametrize("profile", PROFILES)
def test_rendered_dir_validates(crd_dir, profile):
    result = V.validate_dir(RENDERED / profile, crd_dir)
    assert {k: v for k, v in result.items() if v} == {}
    assert set(result) == {"kustomization.yaml", "podmonitor.yaml[0] PodMonitor/moeyard",
                           "rayservice.yaml[0] RayService/moeyard", "redis.yaml[0] Deployment/moeyard-redis",
                           "redis.yaml[1] Service/moeyard-redis"}


def test_kustomization_must_list_exactly_the_files(crd_dir, tmp_path):
    for f in (RENDERED / "cpu").glob("*.yaml"):
        (tmp_path / f.name).write_text(f.read_text())
    (tmp_path / "extra.yaml").write_text((RENDERED / "cpu" / "podmonitor.yaml").read_text())
    errs = V.validate_dir(tmp_path, crd_dir)["kustomization.yaml"]
    assert len(errs) == 1 and "extra.yaml" in errs[0]


def test_cpu_rayservice_has_no_gpus():
    doc = _rayservice("cpu")
    assert not _contains(doc, "nvidia.com/gpu")
    assert all("num-gpus" not in g["rayStartParams"] for g in doc["spec"]["rayClusterConfig"]["workerGroupSpecs"])
    assert _serve(doc)["applications"][0]["args"]["use_gpu"] is False


def test_gpu_rayservice_puts_gpus_on_the_experts_and_the_attention_replicas():
    doc = _rayservice("gpu")
    for name in ("experts", "attention"):
        group = _group(doc, name)
        (container,) = group["template"]["spec"]["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert container["resources"]["requests"]["nvidia.com/gpu"] == "1"
        assert group["rayStartParams"]["num-gpus"] == "1"
        assert group["template"]["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    # none on the head (control actors only)
    assert not _contains(doc["spec"]["rayClusterConfig"]["headGroupSpec"], "nvidia.com/gpu")
    args = _serve(doc)["applications"][0]["args"]
    assert args["use_gpu"] is True and args["attention_use_gpu"] is True and args["device"] == "auto"


@pytest.mark.parametrize("profile", PROFILES)
def test_serve_config_builds_the_app(profile):
    import ray
    from ray.serve import Application
    from ray.serve.schema import ServeDeploySchema

    from moeyard.cluster.config import ClusterConfig

    serve = _serve(_rayservice(profile))
    schema = ServeDeploySchema.model_validate(serve)
    (app,) = schema.applications
    assert app.import_path == "moeyard.cluster.serving.app:app_builder"
    builder = V._import_path_target(app.import_path)
    args = serve["applications"][0]["args"]
    cfg = ClusterConfig.model_validate(args)
    assert cfg.kubernetes is None and cfg.shard_host == "0.0.0.0"
    was_up = ray.is_initialized()  # (other tests of the session may have started Ray)
    assert isinstance(builder(args), Application)
    assert ray.is_initialized() == was_up  # building binds deployments only: it starts no Ray cluster
    errs, configs = V.serve_config_errors(_rayservice(profile)["spec"]["serveConfigV2"])
    assert errs == [] and configs == [cfg]


# -------------------------------------------------------------------------------------------- overlays

@pytest.mark.parametrize("overlay", sorted(OVERLAY_PROFILE))
def test_overlay_applies_and_validates(crd_dir, overlay):
    kust = yaml.safe_load((OVERLAYS / overlay / "kustomization.yaml").read_text())
    base = {(d["kind"], d["metadata"]["name"]): d
            for f in (RENDERED / OVERLAY_PROFILE[overlay]).glob("*.yaml") if f.name != "kustomization.yaml"
            for d in _docs(f)}
    docs = V.apply_overlay(OVERLAYS / overlay)
    assert sorted((d["kind"], d["metadata"]["name"]) for d in docs) == sorted(base)
    for d in docs:
        key = f"{d['kind']}/{d['metadata']['name']}"
        assert V.validate_manifest(d, crd_dir) == [], key
        assert d["metadata"]["namespace"] == kust["namespace"], key
        assert d["metadata"]["labels"]["environment"] == overlay, key
        assert d["metadata"]["labels"]["app.kubernetes.io/name"] == "moeyard", key
    rs = next(d for d in docs if d["kind"] == "RayService")
    groups = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    if overlay == "dev":
        assert {d["metadata"]["namespace"] for d in base.values()} == {"moeyard"}  # changed by the overlay
        assert kust["namespace"] == "moeyard-dev"
        assert rs["spec"]["rayClusterConfig"]["autoscalerOptions"]["idleTimeoutSeconds"] == 60
        assert [g["maxReplicas"] for g in groups] == [1, 1]
    else:
        assert groups[1]["groupName"] == "experts"
        assert "podAntiAffinity" in groups[1]["template"]["spec"]["affinity"]
        assert groups[1]["template"]["spec"]["containers"][0]["imagePullPolicy"] == "Always"
    # the rendered files are untouched
    assert _rayservice(OVERLAY_PROFILE[overlay]) == base[("RayService", "moeyard")]


def _overlay(tmp_path: Path, patch_text: str, extra: str = "") -> Path:
    d = tmp_path / "overlay"
    d.mkdir()
    rel = os.path.relpath(RENDERED / "cpu", d)
    (d / "kustomization.yaml").write_text(
        f"apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nnamespace: x\nresources:\n- {rel}\n"
        f"patches:\n- path: ops.yaml\n  target: {{group: ray.io, version: v1, kind: RayService, name: moeyard}}\n"
        + extra)
    (d / "ops.yaml").write_text(patch_text)
    return d


def test_overlay_patch_must_not_be_a_rayservice_document(tmp_path):
    d = _overlay(tmp_path, "apiVersion: ray.io/v1\nkind: RayService\nmetadata: {name: moeyard}\nspec: {}\n")
    with pytest.raises(ValueError, match="RayService document"):
        V.apply_overlay(d)


def test_overlay_errors(tmp_path):
    ops = "- {op: replace, path: /spec/rayClusterConfig/autoscalerOptions/idleTimeoutSeconds, value: 1}\n"
    d = _overlay(tmp_path, ops)
    (d / "kustomization.yaml").write_text((d / "kustomization.yaml").read_text().replace("name: moeyard", "name: nope"))
    with pytest.raises(ValueError, match="matches no resource"):
        V.apply_overlay(d)
    (d / "kustomization.yaml").write_text((d / "kustomization.yaml").read_text().replace("name: nope", "name: moeyard")
                                          + "images:\n- {name: moeyard, newTag: x}\n")
    with pytest.raises(ValueError, match="not supported"):
        V.apply_overlay(d)
    (tmp_path / "bad").mkdir()
    d2 = _overlay(tmp_path / "bad", "- {op: replace, path: /spec/nope/deeper, value: 1}\n")
    with pytest.raises(ValueError, match="cannot apply"):
        V.apply_overlay(d2)


def test_overlay_that_breaks_the_manifest_is_caught(crd_dir, tmp_path):
    """An overlay that shrinks the experts group below the config's shards validates as an error."""
    d = _overlay(tmp_path, "- {op: replace, path: /spec/rayClusterConfig/workerGroupSpecs/1/maxReplicas, value: 0}\n"
                           "- {op: replace, path: /spec/rayClusterConfig/workerGroupSpecs/1/minReplicas, value: 0}\n"
                           "- {op: replace, path: /spec/rayClusterConfig/workerGroupSpecs/1/replicas, value: 0}\n")
    rs = next(x for x in V.apply_overlay(d) if x["kind"] == "RayService")
    errs = V.validate_manifest(rs, crd_dir)
    assert any("expert shards" in e and "workerGroupSpecs[1]" in e for e in errs), errs


# ---------------------------------------------------------------------------------------------- drift

@pytest.mark.parametrize("profile", PROFILES)
def test_rendered_files_match_the_config(profile, monkeypatch, capsys):
    from moeyard.cluster.cli.main import main
    from moeyard.cluster.config import load_config
    from moeyard.cluster.k8s.render import render

    monkeypatch.chdir(REPO)
    config = f"deploy/config/{profile}.yaml"
    assert main(["render-k8s", "--config", config, "--out", f"deploy/rendered/{profile}", "--check"]) == 0, \
        capsys.readouterr().err
    files = render(load_config(config), config)
    assert sorted(files) == sorted(p.name for p in (RENDERED / profile).glob("*.yaml"))
    for name, text in files.items():
        assert (RENDERED / profile / name).read_text() == text, name


def test_check_reports_drift(tmp_path, monkeypatch, capsys):
    from moeyard.cluster.cli.main import main

    monkeypatch.chdir(REPO)
    out = tmp_path / "cpu"
    assert main(["render-k8s", "--config", "deploy/config/cpu.yaml", "--out", str(out)]) == 0
    assert main(["render-k8s", "--config", "deploy/config/cpu.yaml", "--out", str(out), "--check"]) == 0
    text = (out / "rayservice.yaml").read_text()
    (out / "rayservice.yaml").write_text(text.replace("maxReplicas: 2", "maxReplicas: 3"))
    capsys.readouterr()
    assert main(["render-k8s", "--config", "deploy/config/cpu.yaml", "--out", str(out), "--check"]) == 1
    assert "rayservice.yaml" in capsys.readouterr().err


# ----------------------------------------------------------------------------- broken manifests caught

def _workers(d: dict) -> list[dict]:
    return d["spec"]["rayClusterConfig"]["workerGroupSpecs"]


def _head(d: dict) -> dict:
    return d["spec"]["rayClusterConfig"]["headGroupSpec"]


def _edit_serve(d: dict, edit) -> None:
    serve = yaml.safe_load(d["spec"]["serveConfigV2"])
    edit(serve)
    d["spec"]["serveConfigV2"] = yaml.safe_dump(serve, sort_keys=False)


def _num_gpus_int(d):
    _workers(d)[1]["rayStartParams"]["num-gpus"] = 1


def _no_gpu_limit(d):
    _workers(d)[1]["template"]["spec"]["containers"][0]["resources"]["limits"].pop("nvidia.com/gpu")


def _num_gpus_mismatch(d):
    _workers(d)[1]["rayStartParams"]["num-gpus"] = "2"


def _head_cpus(d):
    _head(d)["rayStartParams"]["num-cpus"] = "2"


def _unknown_spec_field(d):
    d["spec"]["serveConfig"] = "applications: []"


def _unknown_nested_field(d):
    _workers(d)[0]["replica"] = 3


def _bad_import_attr(d):
    _edit_serve(d, lambda s: s["applications"][0].update(import_path="moeyard.cluster.serving.app:no_such_builder"))


def _bad_import_module(d):
    _edit_serve(d, lambda s: s["applications"][0].update(import_path="cluster.no_such_module:app_builder"))


def _unknown_config_key(d):
    _edit_serve(d, lambda s: s["applications"][0]["args"].update(expert_shard=4))


def _bad_serve_schema(d):
    _edit_serve(d, lambda s: s.update(proxy_location="Everywhere"))


def _long_port_name(d):
    _head(d)["template"]["spec"]["containers"][0]["ports"][-1]["name"] = "moeyard-dashboard-http"


def _no_grpc_port(d):
    ports = _head(d)["template"]["spec"]["containers"][0]["ports"]
    ports[:] = [p for p in ports if p["name"] != "serve-grpc"]


def _no_experts_group(d):
    _workers(d)[1]["groupName"] = "shards"


def _experts_too_small(d):
    _workers(d)[1].update(maxReplicas=4, replicas=4, minReplicas=4)


def _gpus_unused(d):
    _edit_serve(d, lambda s: s["applications"][0]["args"].update(use_gpu=False))


def _attention_gpus_unused(d):
    _edit_serve(d, lambda s: s["applications"][0]["args"].update(attention_use_gpu=False))


def _attention_no_gpu_limit(d):
    _workers(d)[0]["template"]["spec"]["containers"][0]["resources"]["limits"].pop("nvidia.com/gpu")


def _resource_not_advertised(d):
    _workers(d)[1]["rayStartParams"]["resources"] = '"{\\"other\\": 1000}"'


BROKEN_RAYSERVICE = {
    # name: (profile, how to break it, a substring of one of the errors)
    "num-gpus-int": ("gpu", _num_gpus_int, "workerGroupSpecs[1].rayStartParams.num-gpus: 1 is not of type 'string'"),
    "no-gpu-limit": ("gpu", _no_gpu_limit, "limits.nvidia.com/gpu: missing"),
    "num-gpus-mismatch": ("gpu", _num_gpus_mismatch, "num-gpus: '2' must equal"),
    "head-num-cpus": ("cpu", _head_cpus, "headGroupSpec.rayStartParams.num-cpus: must be \"0\""),
    "unknown-spec-field": ("cpu", _unknown_spec_field, "spec: Additional properties are not allowed ('serveConfig'"),
    "unknown-nested-field": ("cpu", _unknown_nested_field, "workerGroupSpecs[0]: Additional properties"),
    "bad-import-attr": ("cpu", _bad_import_attr, "'moeyard.cluster.serving.app:no_such_builder' does not import"),
    "bad-import-module": ("cpu", _bad_import_module, "does not import: ModuleNotFoundError"),
    "unknown-config-key": ("cpu", _unknown_config_key, "args.expert_shard: Extra inputs are not permitted"),
    "serve-schema": ("cpu", _bad_serve_schema, "proxy_location: Input should be"),
    "long-port-name": ("cpu", _long_port_name, "'moeyard-dashboard-http' is not a valid port name"),
    "no-grpc-port": ("cpu", _no_grpc_port, "no port named 'serve-grpc'"),
    "no-experts-group": ("cpu", _no_experts_group, "no worker group named 'experts'"),
    "experts-too-small": ("gpu", _experts_too_small, "holds at most 4 expert shards"),
    "gpus-unused": ("gpu", _gpus_unused, "use_gpu: false"),
    "attention-gpus-unused": ("gpu", _attention_gpus_unused, "attention_use_gpu: false (the attention replicas"),
    "attention-no-gpu-limit": ("gpu", _attention_no_gpu_limit,
                               "workerGroupSpecs[0].template.spec.containers[0].resources.limits.nvidia.com/gpu: "
                               "missing (serveConfigV2 has attention_use_gpu: true)"),
    "resource-not-advertised": ("cpu", _resource_not_advertised, "'moeyard_experts' (ray_resources.experts)"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_RAYSERVICE))
def test_broken_rayservice_is_caught(crd_dir, case):
    profile, breaker, expected = BROKEN_RAYSERVICE[case]
    doc = copy.deepcopy(_rayservice(profile))
    breaker(doc)
    errs = V.validate_manifest(doc, crd_dir)
    assert any(expected in e for e in errs), errs


def test_numeric_ray_start_param_gets_a_clear_message(crd_dir):
    doc = copy.deepcopy(_rayservice("gpu"))
    _num_gpus_int(doc)
    errs = V.validate_manifest(doc, crd_dir)
    assert all("rayStartParams" in e for e in errs) and len(errs) == 2, errs
    assert any("must be a string" in e for e in errs)


def _redis(profile: str = "cpu") -> list[dict]:
    return _docs(RENDERED / profile / "redis.yaml")


def test_broken_builtin_kinds_are_caught(crd_dir):
    dep, svc = (copy.deepcopy(d) for d in _redis())
    dep["spec"]["replicas"] = "one"
    (err,) = V.validate_manifest(dep, crd_dir)
    assert err.startswith("spec.replicas: 'one' is not of type 'integer'"), err
    dep = copy.deepcopy(_redis()[0])
    del dep["spec"]["selector"]  # required
    assert V.validate_manifest(dep, crd_dir) == ["spec: 'selector' is a required property"]
    dep = copy.deepcopy(_redis()[0])
    dep["spec"]["template"]["spec"]["containers"][0]["resource"] = {}  # strict: unknown field
    assert "Additional properties" in V.validate_manifest(dep, crd_dir)[0]
    dep = copy.deepcopy(_redis()[0])
    dep["spec"]["template"]["spec"]["containers"][0]["ports"][0]["name"] = "redis-server-port"
    assert "not a valid port name" in V.validate_manifest(dep, crd_dir)[0]
    svc["metadata"]["name"] = "1-redis"
    assert "not a valid Service name" in V.validate_manifest(svc, crd_dir)[0]


def test_broken_podmonitor_is_caught(crd_dir):
    pm = _docs(RENDERED / "cpu" / "podmonitor.yaml")[0]
    no_selector = copy.deepcopy(pm)
    del no_selector["spec"]["selector"]
    assert any("spec.selector" in e for e in V.validate_manifest(no_selector, crd_dir))
    empty = copy.deepcopy(pm)
    empty["spec"]["selector"]["matchLabels"] = {}
    assert any("matchLabels" in e for e in V.validate_manifest(empty, crd_dir))
    bad = copy.deepcopy(pm)
    bad["apiVersion"] = "monitoring.coreos.com/v1alpha1"
    bad["spec"]["podMetricsEndpoints"][0].update(port=8080, path="metrics", interval="often")
    errs = V.validate_manifest(bad, crd_dir)
    assert [e.split(":")[0] for e in errs] == ["apiVersion", "spec.podMetricsEndpoints[0].port",
                                               "spec.podMetricsEndpoints[0].path",
                                               "spec.podMetricsEndpoints[0].interval"], errs


def test_unknown_kind_is_an_error(crd_dir):
    (err,) = V.validate_manifest({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}},
                                 crd_dir)
    assert "unknown kind 'Widget'" in err
    assert V.validate_manifest({"kind": "Service"}, crd_dir) == ["<root>: apiVersion and kind are required"]


def test_crd_errors_carry_every_path(crd_dir):
    doc = copy.deepcopy(_rayservice("gpu"))
    _num_gpus_int(doc)
    _workers(doc)[0]["maxReplicas"] = "8"
    errs = V.crd_errors(doc, crd_dir)
    assert errs == ["spec.rayClusterConfig.workerGroupSpecs[0].maxReplicas: '8' is not of type 'integer'",
                    "spec.rayClusterConfig.workerGroupSpecs[1].rayStartParams.num-gpus: 1 is not of type 'string'"]


def test_raycluster_validates_against_its_crd(crd_dir):
    rc = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": "c"},
          "spec": copy.deepcopy(_rayservice("cpu")["spec"]["rayClusterConfig"])}
    assert V.validate_manifest(rc, crd_dir) == []
    rc["spec"]["serveConfigV2"] = "x"
    assert V.validate_manifest(rc, crd_dir) == [
        "spec: Additional properties are not allowed ('serveConfigV2' was unexpected)"]


# -------------------------------------------------------------------------------------- CRD loading

def test_load_crd_schema(crd_dir):
    import jsonschema

    schema = V.load_crd_schema(crd_dir, "RayService")
    jsonschema.Draft4Validator.check_schema(schema)
    seen = []

    def walk(n):
        if isinstance(n, dict):
            if n.get("x-kubernetes-int-or-string"):
                seen.append(n)
            for v in n.values():
                walk(v)
        elif isinstance(n, list):
            for v in n:
                walk(v)

    walk(schema)
    assert seen and all(n["anyOf"] == [{"type": "integer"}, {"type": "string"}] and "type" not in n for n in seen)
    assert "additionalProperties" not in schema["properties"]["spec"]  # strict only on request
    assert V.load_crd_schema(crd_dir, "RayService", strict=True)["properties"]["spec"]["additionalProperties"] is False
    assert "headGroupSpec" in V.load_crd_schema(crd_dir, "RayCluster")["properties"]["spec"]["properties"]
    # the dict is the caller's own
    schema["properties"].clear()
    assert V.load_crd_schema(crd_dir, "RayService")["properties"]


def test_missing_crd_dir_is_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'nope'}.*{V.CRD_ENV}"):
        V.load_crd_schema(tmp_path / "nope", "RayService")
    with pytest.raises(FileNotFoundError, match=f"no CustomResourceDefinition of kind RayService in {tmp_path}"):
        V.load_crd_schema(tmp_path, "RayService")
    monkeypatch.delenv(V.CRD_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match=V.CRD_ENV):
        V.validate_manifest(_rayservice("cpu"), None)


def test_crd_dir_from_the_environment(crd_dir, monkeypatch):
    monkeypatch.setenv(V.CRD_ENV, str(crd_dir))
    assert V.validate_manifest(_rayservice("cpu"), None) == []
