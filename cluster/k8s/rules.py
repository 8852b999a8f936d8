"""The project's own rules on the ``RayService`` (:func:`moeyard_rules`), on top of the CRD schema.

* ``rayStartParams`` are strings; the head has ``num-cpus: "0"``; worker groups have sane replica bounds;
* an ``experts`` worker group, with GPUs (and a matching ``num-gpus``) when the cluster uses them;
* valid port names everywhere, the head exposes the gRPC API and the dashboard / ``/metrics``, and
  the ``serveService`` has a valid Service name;
* a ``serveConfigV2`` that Ray Serve accepts and that builds the moeyard application
  (:func:`serve_config_errors`);
* placement and capacity: every custom resource the actors are pinned to is advertised by a group,
  the control resource is on the head, and the groups can hold the shards and replicas the config asks.

Ray, pydantic and the Serve application are imported when first needed, not at import time.
"""

from __future__ import annotations

import importlib
import json
from typing import Any

import yaml

from moeyard.cluster.k8s.names import _container_port_errors, _service_name_errors
from moeyard.cluster.k8s.paths import json_path

GPU = "nvidia.com/gpu"
EXPERTS_GROUP = "experts"
ATTENTION_GROUP = "attention"
HEAD_PORTS = ("serve-grpc", "moeyard-http")
"""Port names the head container must expose: the gRPC API and the dashboard / ``/metrics``."""


def _groups(doc: dict) -> list[tuple[str, str | None, dict]]:
    """(JSON path, group name or None for the head, group spec) of every node group of a RayService."""
    rcc = ((doc.get("spec") or {}).get("rayClusterConfig") or {}) if isinstance(doc.get("spec"), dict) else {}
    out = []
    head = rcc.get("headGroupSpec")
    if isinstance(head, dict):
        out.append(("spec.rayClusterConfig.headGroupSpec", None, head))
    for i, g in enumerate(rcc.get("workerGroupSpecs") or []):
        if isinstance(g, dict):
            out.append((f"spec.rayClusterConfig.workerGroupSpecs[{i}]", g.get("groupName"), g))
    return out


def _containers(group: dict) -> list[dict]:
    tpl = group.get("template")
    spec = tpl.get("spec") if isinstance(tpl, dict) else None
    cs = spec.get("containers") if isinstance(spec, dict) else None
    return [c for c in cs if isinstance(c, dict)] if isinstance(cs, list) else []


def _gpus(container: dict, which: str = "limits") -> Any:
    res = container.get("resources")
    m = res.get(which) if isinstance(res, dict) else None
    return m.get(GPU) if isinstance(m, dict) else None


def _number(v: Any) -> float | None:
    """A rayStartParams / quantity value as a number (``"1"``, ``1``, ``"500m"``), or None."""
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, (int, float)):
        return float(v)
    s = str(v).strip()
    try:
        return float(s[:-1]) / 1000 if s.endswith("m") else float(s)
    except ValueError:
        return None


def _custom_resources(value: Any) -> dict:
    """``rayStartParams.resources`` (JSON, possibly quoted once more for the shell) as a dict, or {}."""
    v = value
    for _ in range(3):
        if isinstance(v, dict):
            return v
        if not isinstance(v, str):
            return {}
        try:
            v = json.loads(v)
        except ValueError:
            return {}
    return v if isinstance(v, dict) else {}


def _import_path_target(import_path: str):
    """What Ray Serve imports for ``module.sub:attr`` (or ``module.sub.attr``)."""
    if ":" in import_path:
        module, _, attr = import_path.partition(":")
    else:
        module, _, attr = import_path.rpartition(".")
    if not module or not attr:
        raise ImportError(f"{import_path!r} is not 'module:attribute'")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def serve_config_errors(text: Any, path: str = "spec.serveConfigV2") -> tuple[list[str], list]:
    """Errors of a ``serveConfigV2`` string, and the :class:`~moeyard.cluster.config.ClusterConfig` of each
    application whose ``args`` validated. The string must parse as YAML and validate with Ray's
    ``ServeDeploySchema``; every ``import_path`` must import; every application's ``args`` must be a
    ``ClusterConfig`` and the imported builder must turn them into a Serve ``Application`` (building
    only binds deployments: no Ray cluster is needed or started)."""
    if not isinstance(text, str):
        return [f"{path}: must be a YAML string, got {type(text).__name__}"], []
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        return [f"{path}: not valid YAML: {e}"], []
    if not isinstance(data, dict):
        return [f"{path}: must hold a mapping (the Serve config), got {type(data).__name__}"], []
    import pydantic
    from ray.serve import Application
    from ray.serve.schema import ServeDeploySchema

    from moeyard.cluster.config import ClusterConfig

    errs: list[str] = []
    try:
        ServeDeploySchema.model_validate(data)
    except pydantic.ValidationError as e:
        errs += [f"{path}: {json_path(err['loc'])}: {err['msg']} (Ray ServeDeploySchema)" for err in e.errors()]
    apps = data.get("applications")
    if not isinstance(apps, list) or not apps:
        return errs + [f"{path}: applications: none: the config deploys nothing"], []
    configs = []
    for i, app in enumerate(apps):
        p = f"{path}: applications[{i}]"
        if not isinstance(app, dict):
            continue
        target = None
        ip = app.get("import_path")
        if not isinstance(ip, str):
            errs.append(f"{p}.import_path: missing")
        else:
            try:
                target = _import_path_target(ip)
            except Exception as e:  # noqa: BLE001 - any import failure is a manifest error
                errs.append(f"{p}.import_path: {ip!r} does not import: {type(e).__name__}: {e}")
        args = app.get("args")
        if args is None:
            args = {}
        if not isinstance(args, dict):
            errs.append(f"{p}.args: must be a mapping (a ClusterConfig), got {type(args).__name__}")
            continue
        try:
            cfg = ClusterConfig.model_validate(args)
        except pydantic.ValidationError as e:
            errs += [f"{p}.args.{json_path(err['loc'])}: {err['msg']} (ClusterConfig)" for err in e.errors()]
            continue
        configs.append(cfg)
        if target is None:
            continue
        if isinstance(target, Application):
            built = target
            if args:
                errs.append(f"{p}.args: {ip} is an Application, not a builder: it takes no args")
        elif callable(target):
            try:
                built = target(args)
            except Exception as e:  # noqa: BLE001
                errs.append(f"{p}: {ip}(args) failed: {type(e).__name__}: {e}")
                continue
        else:
            errs.append(f"{p}.import_path: {ip} is neither an application builder nor an Application")
            continue
        if not isinstance(built, Application):
            errs.append(f"{p}: {ip}(args) returned {type(built).__name__}, not a Ray Serve Application")
    return errs, configs


def moeyard_rules(doc: dict) -> list[str]:
    """The project's rules for a ``RayService``, on top of the CRD schema."""
    errs: list[str] = []
    groups = _groups(doc)
    if not groups or groups[0][1] is not None:
        return ["spec.rayClusterConfig.headGroupSpec: missing"]
    # rayStartParams: strings (KubeRay passes them to `ray start`); the head schedules no work
    for path, _, g in groups:
        params = g.get("rayStartParams")
        if params is None:
            continue
        if not isinstance(params, dict):
            errs.append(f"{path}.rayStartParams: must be a mapping of strings")
            continue
        for key, v in params.items():
            if not isinstance(v, str):
                errs.append(f"{path}.rayStartParams.{key}: {v!r} ({type(v).__name__}) must be a string: KubeRay "
                            f"passes rayStartParams to `ray start` as strings (quote it in the manifest)")
    head_path, _, head = groups[0]
    if (head.get("rayStartParams") or {}).get("num-cpus") != "0":
        errs.append(f"{head_path}.rayStartParams.num-cpus: must be \"0\" (the head runs control actors only, "
                    f"pinned by a custom resource), got {(head.get('rayStartParams') or {}).get('num-cpus')!r}")
    # worker groups: sane replica bounds, an `experts` group
    for path, name, g in groups[1:]:
        lo, n, hi = g.get("minReplicas"), g.get("replicas"), g.get("maxReplicas")
        if all(isinstance(x, int) for x in (lo, hi)) and lo > hi:
            errs.append(f"{path}: minReplicas {lo} > maxReplicas {hi}")
        if all(isinstance(x, int) for x in (lo, n, hi)) and not lo <= n <= hi:
            errs.append(f"{path}.replicas: {n} is outside [minReplicas {lo}, maxReplicas {hi}]")
    experts = [(p, g) for p, name, g in groups[1:] if name == EXPERTS_GROUP]
    if not experts:
        errs.append(f"spec.rayClusterConfig.workerGroupSpecs: no worker group named {EXPERTS_GROUP!r} "
                    f"(the expert shards' pods)")
    # ports: valid names everywhere; the head exposes the API and the dashboard
    for path, _, g in groups:
        errs += _container_port_errors((g.get("template") or {}).get("spec") or {}, f"{path}.template.spec")
    head_cs = _containers(head)
    head_ports = {}
    if not head_cs:
        errs.append(f"{head_path}.template.spec.containers: no containers")
    else:
        head_ports = {p.get("name"): p.get("containerPort") for p in head_cs[0].get("ports") or []
                      if isinstance(p, dict)}
        for name in HEAD_PORTS:
            if name not in head_ports:
                errs.append(f"{head_path}.template.spec.containers[0].ports: no port named {name!r}")
    spec = doc.get("spec") if isinstance(doc.get("spec"), dict) else {}
    if isinstance(spec.get("serveService"), dict):
        errs += _service_name_errors(spec["serveService"], "spec.serveService.metadata.name")
    # serveConfigV2: Ray accepts it and it builds the moeyard application
    serve_errs, configs = serve_config_errors(spec.get("serveConfigV2"))
    errs += serve_errs
    use_gpu = any(c.use_gpu for c in configs)
    attention_gpu = any(c.attention_use_gpu for c in configs)
    # GPUs: the experts group's Ray container (the first, as KubeRay reads it) has them, and Ray knows
    gpu_anywhere = any(_gpus(c, w) is not None for _, _, g in groups for c in _containers(g)
                       for w in ("limits", "requests"))
    for path, g in experts:
        errs += _gpu_errors(path, g, "expert shards", "use_gpu", use_gpu or gpu_anywhere, configs and not use_gpu,
                            "serveConfigV2 has use_gpu: true" if use_gpu else f"the cluster requests {GPU}")
    # ... and the attention group's when the replicas reserve GPUs (attention_use_gpu)
    for path, name, g in groups[1:]:
        if name == ATTENTION_GROUP:
            errs += _gpu_errors(path, g, "attention replicas", "attention_use_gpu", attention_gpu,
                                configs and not attention_gpu, "serveConfigV2 has attention_use_gpu: true")
    # every custom resource the actors are pinned to is advertised; the groups hold what the config asks
    for cfg in configs:
        errs += _placement_errors(cfg, groups, head_ports)
    return errs


def _gpu_errors(path: str, g: dict, who: str, field: str, needed: bool, unused: bool, why: str) -> list[str]:
    """A group's GPUs: a limit when the config uses them (``needed``), a ``num-gpus`` equal to it, and none
    the config would leave idle (``unused``)."""
    errs = []
    cs = _containers(g)
    limit = _gpus(cs[0]) if cs else None
    num_gpus = (g.get("rayStartParams") or {}).get("num-gpus")
    cpath = f"{path}.template.spec.containers[0].resources.limits.{GPU}"
    if needed:
        if _number(limit) is None or _number(limit) < 1:
            errs.append(f"{cpath}: missing ({why}): the {who}' pods need a GPU limit")
        elif _number(num_gpus) != _number(limit):
            errs.append(f"{path}.rayStartParams.num-gpus: {num_gpus!r} must equal the container's {GPU} "
                        f"limit {limit!r} (Ray schedules the {who} on what num-gpus advertises)")
    if unused and _number(limit):
        errs.append(f"{cpath}: {limit!r} GPUs but serveConfigV2 has {field}: false (the {who} would not use them)")
    return errs


def _placement_errors(cfg, groups: list[tuple[str, str | None, dict]], head_ports: dict) -> list[str]:
    errs = []
    advertised = {}
    for path, name, g in groups:
        for r in _custom_resources((g.get("rayStartParams") or {}).get("resources")):
            advertised.setdefault(r, []).append((path, name, g))
    rr = cfg.ray_resources
    for role, res in (("control", rr.control), ("attention", rr.attention), ("experts", rr.experts)):
        if res is not None and res not in advertised:
            errs.append(f"spec.rayClusterConfig: no group advertises the custom resource {res!r} "
                        f"(ray_resources.{role}): its actors would never be scheduled")
    if rr.control is not None and rr.control in advertised and advertised[rr.control][0][1] is not None:
        errs.append(f"spec.rayClusterConfig.headGroupSpec.rayStartParams.resources: the control resource "
                    f"{rr.control!r} must be on the head")

    def capacity(res: str | None, per: float, need: int, what: str, gpu: bool = False) -> None:
        for path, name, g in advertised.get(res, []) if res else []:
            if name is None:
                continue
            params = g.get("rayStartParams") or {}
            per_pod = int((_number(params.get("num-cpus")) or 0) // per)
            if gpu:
                per_pod = min(per_pod, int(_number(params.get("num-gpus")) or 0))
            hi = g.get("maxReplicas")
            if isinstance(hi, int) and per_pod * hi < need:
                errs.append(f"{path}: holds at most {per_pod * hi} {what} ({per_pod} per pod x maxReplicas {hi}); "
                            f"serveConfigV2 needs {need}")

    capacity(rr.experts, cfg.shard_num_cpus, max(cfg.expert_shards, cfg.autoscaler.max_shards or 0),
             "expert shards", gpu=cfg.use_gpu)
    capacity(rr.attention, cfg.replica_num_cpus, cfg.attention_replicas, "attention replicas")
    for name, want in (("serve-grpc", cfg.api_port), ("moeyard-http", cfg.dashboard.port)):
        if name in head_ports and head_ports[name] != want:
            errs.append(f"spec.rayClusterConfig.headGroupSpec.template.spec.containers[0].ports: {name} is "
                        f"{head_ports[name]}, serveConfigV2 listens on {want}")
    return errs
