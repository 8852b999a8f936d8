"""Reading manifests: the YAML documents of a file, and those a kustomize overlay produces.

:func:`apply_overlay` implements a small subset of kustomize, enough to validate the overlays' output;
``jsonpatch`` is imported when first needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

CLUSTER_SCOPED = frozenset({
    "Namespace", "Node", "PersistentVolume", "StorageClass", "CustomResourceDefinition", "ClusterRole",
    "ClusterRoleBinding", "PriorityClass", "RuntimeClass", "IngressClass", "CSIDriver", "CSINode",
    "VolumeAttachment", "MutatingWebhookConfiguration", "ValidatingWebhookConfiguration",
    "APIService", "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"})
_KUSTOMIZATION_KEYS = {"apiVersion", "kind", "resources", "namespace", "labels", "patches"}


def _load_docs(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _doc_label(doc: Any) -> str:
    if isinstance(doc, dict):
        name = (doc.get("metadata") or {}).get("name") if isinstance(doc.get("metadata"), dict) else None
        return f"{doc.get('kind')}/{name}"
    return type(doc).__name__


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
