"""Kubernetes' naming rules that the schemas leave out, checked as the API server would.

* container port names (``IANA_SVC_NAME``: at most 15 characters, a letter, no ``--``);
* a ``Service`` name (a DNS-1035 label: it becomes a DNS name and environment variables);
* any object's ``metadata``: a DNS-1123 subdomain name, a DNS-1123 label namespace, string labels
  and annotations.

Errors are ``<json path>: <what is wrong>`` strings, as everywhere in :mod:`moeyard.cluster.k8s.validate`.
"""

from __future__ import annotations

import re
from typing import Any

from moeyard.cluster.k8s.paths import _join

_IANA_SVC_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


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


def _service_name_errors(svc: dict, path: str) -> list[str]:
    """A Service's name is a DNS-1035 label: it starts with a letter (it becomes a DNS name and env vars)."""
    name = (svc.get("metadata") or {}).get("name") if isinstance(svc.get("metadata"), dict) else None
    if isinstance(name, str) and not (len(name) <= 63 and _DNS_1035.match(name)):
        return [(f"{path}: {name!r} is not a valid Service name (DNS-1035 label: a lowercase letter first, "
                 f"then lowercase alnum or '-', at most 63 characters)")]
    return []


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
