"""Offline validation of the Kubernetes manifests (``deploy/rendered/*``, ``deploy/overlays/*``): the
entry points.

:func:`validate_manifest` checks one document by kind, :func:`validate_dir` every document of a
rendered folder and its ``kustomization.yaml``. Pure functions, no cluster and no network. The checks
live in sibling modules, re-exported here:

* :mod:`moeyard.cluster.k8s.schemas`: KubeRay kinds against the KubeRay CRDs (strict), built-in kinds with
  ``kubernetes-validate`` (strict), a structural check of ``PodMonitor``;
* :mod:`moeyard.cluster.k8s.rules`: the project's rules on the ``RayService`` (:func:`moeyard_rules`), the
  ``serveConfigV2`` included;
* :mod:`moeyard.cluster.k8s.names`: Kubernetes' naming rules the schemas leave out (port, Service and object names);
* :mod:`moeyard.cluster.k8s.overlay`: :func:`apply_overlay`, a small subset of kustomize;
* :mod:`moeyard.cluster.k8s.paths`: :func:`json_path`.

Errors are returned as human-readable strings ``<json path>: <what is wrong>``; an empty list means
valid. Nothing here is loaded at import time: the CRDs, ``kubernetes_validate``, ``jsonpatch``, Ray
and the Serve application are imported when first needed.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from moeyard.cluster.k8s.names import _metadata_errors
from moeyard.cluster.k8s.overlay import CLUSTER_SCOPED, _doc_label, _load_docs, apply_overlay
from moeyard.cluster.k8s.paths import json_path
from moeyard.cluster.k8s.rules import (
    EXPERTS_GROUP,
    GPU,
    HEAD_PORTS,
    moeyard_rules,
    serve_config_errors,
)
from moeyard.cluster.k8s.rules import (
    _import_path_target as _import_path_target,  # re-exported: tests use it
)
from moeyard.cluster.k8s.schemas import (
    CRD_ENV,
    CRD_FILES,
    KUBERAY_KINDS,
    KUBERNETES_VERSION,
    builtin_errors,
    crd_dir_from_env,
    crd_errors,
    load_crd_schema,
    podmonitor_errors,
)

__all__ = [
    "CLUSTER_SCOPED", "CRD_ENV", "CRD_FILES", "EXPERTS_GROUP", "GPU", "HEAD_PORTS", "KUBERAY_KINDS",
    "KUBERNETES_VERSION", "apply_overlay", "builtin_errors", "crd_dir_from_env", "crd_errors", "json_path",
    "load_crd_schema", "moeyard_rules", "podmonitor_errors", "serve_config_errors", "validate_dir",
    "validate_manifest",
]


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
