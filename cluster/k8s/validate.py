"""Offline validation of the Kubernetes manifests (``deploy/rendered/*``, ``deploy/overlays/*``).

Pure functions, no cluster and no network:

* KubeRay resources (``RayService``, ``RayCluster``) against the ``openAPIV3Schema`` of the KubeRay
  CRDs (a folder of ``ray.io_*.yaml`` files: ``crd_dir`` or the ``MOEYARD_KUBERAY_CRDS`` environment
  variable), with ``jsonschema.Draft4Validator``. Unknown fields are errors, as with the API server's
  strict field validation (``kubectl apply --validate=strict``, kubectl's default); the CRDs' CEL
  rules (``x-kubernetes-validations``) are not applied.
* Built-in kinds (Deployment, Service, ...) with the ``kubernetes-validate`` package (strict).
* ``PodMonitor`` (prometheus-operator; no schema offline): a structural check.
* The project's own rules on the ``RayService`` (:func:`moeyard_rules`): string ``rayStartParams``,
  a head with ``num-cpus: "0"``, an ``experts`` group with GPUs when the cluster uses them, port names,
  and a ``serveConfigV2`` that Ray Serve accepts and that builds the moeyard application.
* :func:`apply_overlay`: a small subset of kustomize, enough to validate the overlays' output.

Errors are returned as human-readable strings ``<json path>: <what is wrong>``; an empty list means
valid. Nothing here is loaded at import time: the CRDs, ``kubernetes_validate``, ``jsonpatch``, Ray
and the Serve application are imported when first needed.
"""

from __future__ import annotations

import copy
import functools
import importlib
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

CRD_ENV = "MOEYARD_KUBERAY_CRDS"
"""Environment variable naming the folder of KubeRay CRD files (``ray.io_rayservices.yaml``, ...)."""
KUBERNETES_VERSION = "1.33"
"""The Kubernetes version the built-in kinds are validated against."""
CRD_FILES = {"RayService": "ray.io_rayservices.yaml", "RayCluster": "ray.io_rayclusters.yaml"}
KUBERAY_KINDS = frozenset(CRD_FILES)
GPU = "nvidia.com/gpu"
EXPERTS_GROUP = "experts"
HEAD_PORTS = ("serve-grpc", "moeyard-http")
"""Port names the head container must expose: the gRPC API and the dashboard / ``/metrics``."""
CLUSTER_SCOPED = frozenset({
    "Namespace", "Node", "PersistentVolume", "StorageClass", "CustomResourceDefinition", "ClusterRole",
    "ClusterRoleBinding", "PriorityClass", "RuntimeClass", "IngressClass", "CSIDriver", "CSINode",
    "VolumeAttachment", "MutatingWebhookConfiguration", "ValidatingWebhookConfiguration",
    "APIService", "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"})
_IANA_SVC_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DURATION = re.compile(r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?"
                       r"(([0-9]+)ms)?)$")
"""prometheus-operator's ``Duration`` (``15s``, ``1m30s``)."""


# --------------------------------------------------------------------------------------------- paths

def json_path(parts: Iterable[Any]) -> str:
    """``["spec", "workerGroupSpecs", 1, "rayStartParams"]`` -> ``spec.workerGroupSpecs[1].rayStartParams``."""
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += f".{p}" if out else str(p)
    return out or "<root>"


def _join(path: str, *more: Any) -> str:
    return json_path([path, *more]) if path != "<root>" else json_path(more)


# ---------------------------------------------------------------------------------------- CRD schema

def crd_dir_from_env(crd_dir: Path | str | None = None) -> Path:
    """``crd_dir`` if given, else ``$MOEYARD_KUBERAY_CRDS``; :class:`FileNotFoundError` when neither is a folder."""
    if crd_dir is None:
        env = os.environ.get(CRD_ENV)
        if not env:
            raise FileNotFoundError(f"no KubeRay CRD folder: pass crd_dir or set {CRD_ENV} to the folder holding "
                                    f"{', '.join(CRD_FILES.values())}")
        crd_dir = env
    p = Path(crd_dir)
    if not p.is_dir():
        raise FileNotFoundError(f"KubeRay CRD folder {p} not found (set {CRD_ENV} to the folder holding "
                                f"{', '.join(CRD_FILES.values())})")
    return p


def _to_structural_jsonschema(node: Any, strict: bool) -> Any:
    """An OpenAPI v3 (Kubernetes structural) schema as a Draft 4 JSON schema: int-or-string as
    ``anyOf: [integer, string]``, ``nullable`` as a ``null`` type, and (``strict``) no unknown fields."""
    if isinstance(node, list):
        return [_to_structural_jsonschema(v, strict) for v in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for k, v in node.items():
        # ``properties`` maps field names to schemas: its keys are names, never keywords
        if k in ("properties", "patternProperties", "definitions") and isinstance(v, dict):
            out[k] = {name: _to_structural_jsonschema(s, strict) for name, s in v.items()}
        elif k in ("enum", "required", "x-kubernetes-list-map-keys", "x-kubernetes-validations", "default",
                   "example"):
            out[k] = v
        else:
            out[k] = _to_structural_jsonschema(v, strict)
    if out.get("x-kubernetes-int-or-string") is True:
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.pop("nullable", False) is True and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if (strict and "properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@functools.lru_cache(maxsize=8)
def _crd_schema_cached(crd_dir: str, kind: str, strict: bool) -> dict:
    folder = Path(crd_dir)
    candidates = [folder / CRD_FILES[kind]] if kind in CRD_FILES else []
    candidates += sorted(p for p in folder.glob("*.yaml") if p not in candidates)
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    for path in candidates:
        if not path.is_file():
            continue
        for crd in yaml.load_all(path.read_text(), Loader=loader):
            if not isinstance(crd, dict) or crd.get("kind") != "CustomResourceDefinition":
                continue
            if crd.get("spec", {}).get("names", {}).get("kind") != kind:
                continue
            for v in crd["spec"].get("versions", []):
                if v.get("name") == "v1":
                    return _to_structural_jsonschema(v["schema"]["openAPIV3Schema"], strict)
            raise ValueError(f"{path}: the {kind} CRD has no version v1")
    raise FileNotFoundError(f"no CustomResourceDefinition of kind {kind} in {folder} (expected "
                            f"{CRD_FILES.get(kind, '<crd>.yaml')}; {CRD_ENV} names this folder)")


def load_crd_schema(crd_dir: Path | str | None, kind: str, strict: bool = False) -> dict:
    """The ``openAPIV3Schema`` of ``kind`` (``RayService``, ``RayCluster``) at version ``v1`` from the KubeRay
    CRDs in ``crd_dir`` (default ``$MOEYARD_KUBERAY_CRDS``), as a Draft 4 JSON schema: every
    ``x-kubernetes-int-or-string: true`` becomes ``anyOf: [integer, string]``. ``strict`` also forbids
    unknown fields (``additionalProperties: false`` on every object schema with ``properties``), as the
    API server's strict field validation does. A fresh copy each call."""
    folder = crd_dir_from_env(crd_dir)
    return copy.deepcopy(_crd_schema_cached(str(folder.resolve()), kind, strict))


@functools.lru_cache(maxsize=8)
def _crd_validator(crd_dir: str, kind: str):
    import jsonschema

    schema = _crd_schema_cached(crd_dir, kind, True)
    return jsonschema.Draft4Validator(schema)


def _sort_key(e) -> tuple:
    return tuple(str(p) for p in e.absolute_path), e.message


def crd_errors(doc: dict, crd_dir: Path | str | None) -> list[str]:
    """Every schema error of a KubeRay document (strict: unknown fields too), each with its JSON path."""
    folder = crd_dir_from_env(crd_dir)
    validator = _crd_validator(str(folder.resolve()), doc["kind"])
    return [f"{json_path(e.absolute_path)}: {e.message}" for e in sorted(validator.iter_errors(doc), key=_sort_key)]


# ------------------------------------------------------------------------------------ built-in kinds

def builtin_errors(doc: dict) -> list[str]:
    """``kubernetes-validate`` (strict: unknown fields are errors) for a built-in kind; it reports the
    first error only. Plus the container port names (IANA_SVC_NAME), which the schema does not check."""
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        return [(f"kind: unknown kind {doc.get('kind')!r} (apiVersion {doc.get('apiVersion')!r}): neither a "
                 f"Kubernetes {KUBERNETES_VERSION} built-in nor a kind this validator knows")]
    except kubernetes_validate.ValidationError as e:
        return [f"{json_path(e.path)}: {e.message}"]
    errs = _service_name_errors(doc, "metadata.name") if doc.get("kind") == "Service" else []
    spec = doc.get("spec")
    template = spec.get("template") if isinstance(spec, dict) else None
    pod = template.get("spec") if isinstance(template, dict) else (spec if doc.get("kind") == "Pod" else None)
    if isinstance(pod, dict):
        base = "spec.template.spec" if template is not None else "spec"
        errs += _container_port_errors(pod, base)
    return errs


def _service_name_errors(svc: dict, path: str) -> list[str]:
    """A Service's name is a DNS-1035 label: it starts with a letter (it becomes a DNS name and env vars)."""
    name = (svc.get("metadata") or {}).get("name") if isinstance(svc.get("metadata"), dict) else None
    if isinstance(name, str) and not (len(name) <= 63 and _DNS_1035.match(name)):
        return [(f"{path}: {name!r} is not a valid Service name (DNS-1035 label: a lowercase letter first, "
                 f"then lowercase alnum or '-', at most 63 characters)")]
    return []


# --------------------------------------------------------------------------------------- PodMonitor

def _metadata_errors(doc: dict) -> list[str]:
    """What the API server checks of any object's metadata: a DNS-1123 name, a DNS label namespace."""
    meta = doc.get("metadata")
    if not isinstance(meta, dict):
        return ["metadata: missing or not a mapping"]
    errs = []
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        errs.append("metadata.name: missing")
    elif len(name) > 253 or not _DNS_SUBDOMAIN.match(name):
        errs.append(f"metadata.name: {name!r} is not a DNS-1123 subdomain (lowercase alnum, '-', '.')")
    ns = meta.get("namespace")
    if ns is not None and (not isinstance(ns, str) or len(ns) > 63 or not _DNS_LABEL.match(ns)):
        errs.append(f"metadata.namespace: {ns!r} is not a DNS-1123 label")
    for key in ("labels", "annotations"):
        m = meta.get(key)
        if m is not None and (not isinstance(m, dict)
                              or not all(isinstance(k, str) and isinstance(v, str) for k, v in m.items())):
            errs.append(f"metadata.{key}: must map strings to strings")
    return errs


def podmonitor_errors(doc: dict) -> list[str]:
    """A structural check of a prometheus-operator ``PodMonitor`` (its CRD is not available offline)."""
    errs = []
    if doc.get("apiVersion") != "monitoring.coreos.com/v1":
        errs.append(f"apiVersion: {doc.get('apiVersion')!r} is not monitoring.coreos.com/v1")
    errs += _metadata_errors(doc)
    spec = doc.get("spec")
    if not isinstance(spec, dict):
        return errs + ["spec: missing or not a mapping"]
    sel = spec.get("selector")
    labels = sel.get("matchLabels") if isinstance(sel, dict) else None
    if not isinstance(sel, dict):
        errs.append("spec.selector: missing: a PodMonitor without a selector matches no pods")
    elif not isinstance(labels, dict) or not labels:
        errs.append("spec.selector.matchLabels: missing or empty: give the labels of the pods to scrape")
    elif not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        errs.append("spec.selector.matchLabels: must map strings to strings")
    eps = spec.get("podMetricsEndpoints")
    if not isinstance(eps, list) or not eps:
        return errs + ["spec.podMetricsEndpoints: missing or empty"]
    for i, ep in enumerate(eps):
        p = json_path(["spec", "podMetricsEndpoints", i])
        if not isinstance(ep, dict):
            errs.append(f"{p}: not a mapping")
            continue
        port = ep.get("port")
        if not isinstance(port, str) or not port:
            errs.append(f"{p}.port: must be a port name (string), got {port!r}")
        elif not _valid_port_name(port):
            errs.append(f"{p}.port: {port!r} is not a valid port name (IANA_SVC_NAME)")
        path = ep.get("path")
        if path is not None and (not isinstance(path, str) or not path.startswith("/")):
            errs.append(f"{p}.path: must start with '/', got {path!r}")
        for key in ("interval", "scrapeTimeout"):
            v = ep.get(key)
            if v is not None and (not isinstance(v, str) or not _DURATION.match(v)):
                errs.append(f"{p}.{key}: {v!r} is not a duration like 30s")
    return errs


# ---------------------------------------------------------------------------------- moeyard's rules

def _valid_port_name(name: Any) -> bool:
    """Kubernetes' IANA_SVC_NAME: <= 15 characters, lowercase alnum and '-', a letter, no '--', no edge '-'."""
    return (isinstance(name, str) and 0 < len(name) <= 15 and bool(_IANA_SVC_NAME.match(name))
            and "--" not in name and any(c.isalpha() for c in name))


def _container_port_errors(pod_spec: dict, base: str) -> list[str]:
    errs = []
    for kind in ("initContainers", "containers"):
        for ci, c in enumerate(pod_spec.get(kind) or []):
            if not isinstance(c, dict):
                continue
            for pi, port in enumerate(c.get("ports") or []):
                name = port.get("name") if isinstance(port, dict) else None
                if name is not None and not _valid_port_name(name):
                    errs.append(f"{_join(base, kind, ci, 'ports', pi, 'name')}: {name!r} is not a valid port name "
                                f"(IANA_SVC_NAME: at most 15 characters, lowercase letters, digits and '-', "
                                f"at least one letter, no '--')")
    return errs


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
    """Errors of a ``serveConfigV2`` string, and the :class:`~cluster.config.ClusterConfig` of each
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

    from cluster.config import ClusterConfig

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
    # GPUs: the experts group's Ray container (the first, as KubeRay reads it) has them, and Ray knows
    gpu_anywhere = any(_gpus(c, w) is not None for _, _, g in groups for c in _containers(g)
                       for w in ("limits", "requests"))
    for path, g in experts:
        cs = _containers(g)
        limit = _gpus(cs[0]) if cs else None
        num_gpus = (g.get("rayStartParams") or {}).get("num-gpus")
        cpath = f"{path}.template.spec.containers[0].resources.limits.{GPU}"
        if use_gpu or gpu_anywhere:
            why = "serveConfigV2 has use_gpu: true" if use_gpu else f"the cluster requests {GPU}"
            if _number(limit) is None or _number(limit) < 1:
                errs.append(f"{cpath}: missing ({why}): the expert shards' pods need a GPU limit")
            elif _number(num_gpus) != _number(limit):
                errs.append(f"{path}.rayStartParams.num-gpus: {num_gpus!r} must equal the container's {GPU} "
                            f"limit {limit!r} (Ray schedules shards on what num-gpus advertises)")
        if configs and not use_gpu and _number(limit):
            errs.append(f"{cpath}: {limit!r} GPUs but serveConfigV2 has use_gpu: false (the shards would not use them)")
    # every custom resource the actors are pinned to is advertised; the groups hold what the config asks
    for cfg in configs:
        errs += _placement_errors(cfg, groups, head_ports)
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


# --------------------------------------------------------------------------------------- entry points

def validate_manifest(doc: dict, crd_dir: Path | str | None) -> list[str]:
    """Human-readable errors of one manifest (empty = valid): KubeRay kinds against the CRD schema (every
    error) plus, for a RayService, :func:`moeyard_rules`; built-in kinds with kubernetes-validate (strict);
    a PodMonitor structurally; any other kind is an error. ``crd_dir`` None = ``$MOEYARD_KUBERAY_CRDS``;
    a missing CRD folder raises :class:`FileNotFoundError` (a setup problem, not a manifest error)."""
    if not isinstance(doc, dict):
        return [f"<root>: a manifest must be a mapping, got {type(doc).__name__}"]
    kind, api = doc.get("kind"), doc.get("apiVersion")
    if not isinstance(kind, str) or not isinstance(api, str):
        return ["<root>: apiVersion and kind are required"]
    if kind in KUBERAY_KINDS:
        if api != "ray.io/v1":
            return [f"apiVersion: {api!r}: moeyard deploys {kind} as ray.io/v1"]
        errs = crd_errors(doc, crd_dir) + _metadata_errors(doc)
        return errs + moeyard_rules(doc) if kind == "RayService" else errs
    if kind == "PodMonitor":
        return podmonitor_errors(doc)
    return builtin_errors(doc)


def _load_docs(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _doc_label(doc: Any) -> str:
    if isinstance(doc, dict):
        name = (doc.get("metadata") or {}).get("name") if isinstance(doc.get("metadata"), dict) else None
        return f"{doc.get('kind')}/{name}"
    return type(doc).__name__


def validate_dir(path: Path | str, crd_dir: Path | str | None) -> dict[str, list[str]]:
    """Errors of every document of every ``*.yaml`` in a rendered folder, keyed ``"<file>[<i>] <Kind>/<name>"``.
    ``kustomization.yaml`` (key ``"kustomization.yaml"``) must list exactly the other files."""
    folder = Path(path)
    out: dict[str, list[str]] = {}
    files = sorted(folder.glob("*.yaml"))
    for f in files:
        if f.name == "kustomization.yaml":
            continue
        try:
            docs = _load_docs(f)
        except yaml.YAMLError as e:
            out[f.name] = [f"not valid YAML: {e}"]
            continue
        if not docs:
            out[f.name] = ["no documents"]
        for i, d in enumerate(docs):
            out[f"{f.name}[{i}] {_doc_label(d)}"] = validate_manifest(d, crd_dir)
    kfile = folder / "kustomization.yaml"
    if not kfile.is_file():
        out["kustomization.yaml"] = ["missing: overlays build on the folder through it"]
    else:
        errs = []
        try:
            k = yaml.safe_load(kfile.read_text()) or {}
        except yaml.YAMLError as e:
            k, errs = {}, [f"not valid YAML: {e}"]
        if not errs:
            if k.get("kind") != "Kustomization" or k.get("apiVersion") != "kustomize.config.k8s.io/v1beta1":
                errs.append("must be a kustomize.config.k8s.io/v1beta1 Kustomization")
            listed = k.get("resources") or []
            others = sorted(f.name for f in files if f.name != "kustomization.yaml")
            if sorted(listed) != others:
                errs.append(f"resources {listed} must list exactly the folder's other files {others}")
        out["kustomization.yaml"] = errs
    return out


# ------------------------------------------------------------------------------------- overlays

_KUSTOMIZATION_KEYS = {"apiVersion", "kind", "resources", "namespace", "labels", "patches"}


def _matches(doc: dict, target: dict) -> bool:
    api = doc.get("apiVersion", "")
    group, _, version = api.rpartition("/")
    meta = doc.get("metadata") or {}
    want = {"group": group, "version": version, "kind": doc.get("kind"), "name": meta.get("name"),
            "namespace": meta.get("namespace")}
    unknown = set(target) - set(want)
    if unknown:
        raise ValueError(f"patch target keys {sorted(unknown)} are not supported (group, version, kind, name, "
                         f"namespace)")
    return all(want[k] == v for k, v in target.items())


def _build(folder: Path, seen: tuple[Path, ...]) -> list[dict]:
    import jsonpatch

    folder = folder.resolve()
    if folder in seen:
        raise ValueError(f"kustomization cycle through {folder}")
    kfile = folder / "kustomization.yaml"
    if not kfile.is_file():
        raise FileNotFoundError(f"{kfile} not found")
    k = yaml.safe_load(kfile.read_text()) or {}
    unsupported = set(k) - _KUSTOMIZATION_KEYS
    if unsupported:
        raise ValueError(f"{kfile}: {sorted(unsupported)} not supported by this kustomize subset "
                         f"(supported: {sorted(_KUSTOMIZATION_KEYS)})")
    docs: list[dict] = []
    for res in k.get("resources") or []:
        p = folder / res
        if p.is_dir():
            docs += _build(p, seen + (folder,))
        elif p.is_file():
            docs += _load_docs(p)
        else:
            raise FileNotFoundError(f"{kfile}: resource {res} ({p}) not found")
    for i, patch in enumerate(k.get("patches") or []):
        where = f"{kfile}: patches[{i}]"
        if "path" in patch:
            ptext = (folder / patch["path"]).read_text()
            where += f" ({patch['path']})"
        elif "patch" in patch:
            ptext = patch["patch"]
        else:
            raise ValueError(f"{where}: needs a path or an inline patch")
        ops = yaml.safe_load(ptext)
        if isinstance(ops, dict) and ops.get("kind") == "RayService":
            raise ValueError(f"{where} is a RayService document: overlay patches must be JSON6902 operation "
                             f"lists targeting the rendered RayService, not RayService documents of their own")
        if not isinstance(ops, list):
            raise ValueError(f"{where}: only JSON6902 patches (a YAML list of operations) are supported")  # noqa: TRY004
        target = patch.get("target")
        if not isinstance(target, dict) or not target:
            raise ValueError(f"{where}: a JSON6902 patch needs a target")
        hits = [j for j, d in enumerate(docs) if _matches(d, target)]
        if not hits:
            raise ValueError(f"{where}: target {target} matches no resource")
        for j in hits:
            try:
                docs[j] = jsonpatch.JsonPatch(ops).apply(docs[j])
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as e:
                raise ValueError(f"{where}: cannot apply to {_doc_label(docs[j])}: {e}") from None
    ns = k.get("namespace")
    for d in docs:
        if ns and d.get("kind") not in CLUSTER_SCOPED:
            d.setdefault("metadata", {})["namespace"] = ns
    for i, entry in enumerate(k.get("labels") or []):
        extra = set(entry) - {"pairs"} - {key for key in ("includeSelectors", "includeTemplates")
                                          if entry.get(key) is False}
        if extra:
            raise ValueError(f"{kfile}: labels[{i}]: only `pairs` is supported (not {sorted(extra)})")
        for d in docs:
            d.setdefault("metadata", {}).setdefault("labels", {}).update(entry.get("pairs") or {})
    return docs


def apply_overlay(overlay_dir: Path | str) -> list[dict]:
    """The documents a kustomize overlay produces, for validation. A small subset of kustomize:

    * ``resources``: YAML files, or folders with a ``kustomization.yaml`` (built the same way, recursively);
    * ``patches``: JSON6902 operation lists only (``path:`` or inline ``patch:``), applied with ``jsonpatch``
      to the documents matching ``target`` (group, version, kind, name, namespace); a patch matching
      nothing is an error, and so is a patch file that is itself a ``kind: RayService`` document
      (the project's rule: overlay patches are operations on the rendered RayService);
    * ``namespace``: set on every namespaced document;
    * ``labels[].pairs``: added to ``metadata.labels`` (not to selectors or templates).

    Any other kustomization field raises :class:`ValueError` instead of being silently ignored."""
    return _build(Path(overlay_dir), ())
