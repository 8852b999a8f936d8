"""Schema validation of the manifests, one kind at a time. Pure functions, no cluster and no network:

* KubeRay resources (``RayService``, ``RayCluster``) against the ``openAPIV3Schema`` of the KubeRay
  CRDs (a folder of ``ray.io_*.yaml`` files: ``crd_dir`` or the ``MOEYARD_KUBERAY_CRDS`` environment
  variable), with ``jsonschema.Draft4Validator``. Unknown fields are errors, as with the API server's
  strict field validation (``kubectl apply --validate=strict``, kubectl's default); the CRDs' CEL
  rules (``x-kubernetes-validations``) are not applied.
* Built-in kinds (Deployment, Service, ...) with the ``kubernetes-validate`` package (strict), plus
  the port and Service names it does not check (:mod:`moeyard.cluster.k8s.names`).
* ``PodMonitor`` (prometheus-operator; no schema offline): a structural check.

The CRDs, ``jsonschema`` and ``kubernetes_validate`` are loaded when first needed, not at import time.
"""

from __future__ import annotations

import copy
import functools
import os
import re
from pathlib import Path
from typing import Any

import yaml

from moeyard.cluster.k8s.names import (
    _container_port_errors,
    _metadata_errors,
    _service_name_errors,
    _valid_port_name,
)
from moeyard.cluster.k8s.paths import json_path

CRD_ENV = "MOEYARD_KUBERAY_CRDS"
"""Environment variable naming the folder of KubeRay CRD files (``ray.io_rayservices.yaml``, ...)."""
KUBERNETES_VERSION = "1.33"
"""The Kubernetes version the built-in kinds are validated against."""
CRD_FILES = {"RayService": "ray.io_rayservices.yaml", "RayCluster": "ray.io_rayclusters.yaml"}
KUBERAY_KINDS = frozenset(CRD_FILES)
_DURATION = re.compile(r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?"
                       r"(([0-9]+)ms)?)$")
"""prometheus-operator's ``Duration`` (``15s``, ``1m30s``)."""


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


# --------------------------------------------------------------------------------------- PodMonitor

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
