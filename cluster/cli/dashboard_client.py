"""The dashboard's state over HTTP, for ``moeyard top``: ``GET /api/state`` with the bearer token,
parsed back into :class:`~moeyard.cluster.dashboard.state.DashboardState` (checked field by field,
so a dashboard of another version gives a clear error, not a half-drawn screen)."""

from __future__ import annotations

import dataclasses
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

from moeyard.cluster.dashboard.state import (
    BalancerView,
    DashboardState,
    EventView,
    HeatmapView,
    PlacementView,
    ReplicaHealth,
    ServingView,
    ShardHealth,
    ShardSeries,
)
from moeyard.model.economics import Economics

__all__ = ["DashboardError", "fetch_state", "state_from_dict", "state_url"]



def _obj(d: Any, cls: type, where: str,
         nested: dict[str, Callable[[Any, str], Any]] | None = None) -> Any:
    """``cls(**d)`` with required fields checked and nested values converted by ``nested[name]``."""
    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected an object, got {type(d).__name__}")  # noqa: TRY004
    nested = nested or {}
    kwargs = {}
    for f in dataclasses.fields(cls):
        path = f"{where}.{f.name}"
        if f.name not in d:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ValueError(f"missing field {path!r}")
            continue
        value = d[f.name]
        conv = nested.get(f.name)
        kwargs[f.name] = conv(value, path) if conv is not None else value
    return cls(**kwargs)


def _optional(conv: Callable[[Any, str], Any]) -> Callable[[Any, str], Any]:
    return lambda v, where: None if v is None else conv(v, where)


def _list_of(conv: Callable[[Any, str], Any]) -> Callable[[Any, str], Any]:
    def build(v: Any, where: str) -> list:
        if not isinstance(v, list):
            raise ValueError(f"{where}: expected a list, got {type(v).__name__}")  # noqa: TRY004
        return [conv(x, f"{where}[{i}]") for i, x in enumerate(v)]
    return build


def _plain(cls: type) -> Callable[[Any, str], Any]:
    return lambda v, where: _obj(v, cls, where)


def _serving_view(v: Any, where: str) -> ServingView:
    return _obj(v, ServingView, where, {"replicas": _list_of(_plain(ReplicaHealth)),
                                        "shards": _list_of(_plain(ShardHealth))})


def state_from_dict(d: dict) -> DashboardState:
    """Rebuild a :class:`DashboardState` from its ``dataclasses.asdict`` / JSON form.

    Raises ``ValueError`` naming the first missing (or ill-typed) field, e.g.
    ``missing field 'state.serving.replicas[0].running'``.
    """
    return _obj(d, DashboardState, "state", {
        "placement": _optional(_plain(PlacementView)),
        "heatmap": _optional(_plain(HeatmapView)),
        "shard_series": _optional(_plain(ShardSeries)),
        "events": _list_of(_plain(EventView)),
        "serving": _serving_view,
        "economics": _optional(_plain(Economics)),
        "notes": _list_of(lambda v, where: str(v)),
        "balancer": _optional(_plain(BalancerView)),
        "warnings": _list_of(lambda v, where: str(v)),
    })


# --------------------------------------------------------------------------- HTTP


class DashboardError(RuntimeError):
    """The dashboard could not be asked, refused, or answered something unusable."""


def state_url(url: str, lookback_s: float) -> str:
    base = url if url.endswith("/") else url + "/"
    return urllib.parse.urljoin(base, "api/state") + "?" + urllib.parse.urlencode({"lookback": f"{lookback_s:g}"})


def fetch_state(url: str, token: str | None, lookback_s: float, timeout_s: float = 5) -> DashboardState:
    """``GET {url}api/state?lookback=...`` with ``Authorization: Bearer <token>``.

    Raises :class:`DashboardError` with a one-line reason on any failure.
    """
    req = urllib.request.Request(state_url(url, lookback_s), headers={"Accept": "application/json"})
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            body = resp.read()
    except urllib.error.HTTPError as e:
        if e.code == 401:
            raise DashboardError("dashboard refused the token (401)") from None
        detail = _http_detail(e)
        raise DashboardError(f"dashboard answered HTTP {e.code}" + (f": {detail}" if detail else "")) from None
    except urllib.error.URLError as e:
        if isinstance(e.reason, TimeoutError):
            raise DashboardError(f"dashboard at {url} did not answer within {timeout_s:g}s") from None
        reason = "" if isinstance(e.reason, ConnectionRefusedError) else f" ({e.reason})"
        raise DashboardError(f"dashboard at {url} is not reachable{reason}") from None
    except TimeoutError:
        raise DashboardError(f"dashboard at {url} did not answer within {timeout_s:g}s") from None
    except ConnectionError as e:
        raise DashboardError(f"dashboard at {url} is not reachable ({e})") from None
    try:
        data = json.loads(body)
    except ValueError as e:
        raise DashboardError(f"dashboard answered something that is not JSON ({e})") from None
    try:
        return state_from_dict(data)
    except (ValueError, TypeError) as e:
        raise DashboardError(f"malformed dashboard state: {e}") from None


def _http_detail(e: urllib.error.HTTPError) -> str:
    try:
        text = e.read().decode("utf-8", "replace").strip()
    except OSError:
        return ""
    try:
        obj = json.loads(text)
        if isinstance(obj, dict):
            text = str(obj.get("error") or obj.get("detail") or obj.get("message") or text)
    except ValueError:
        pass
    return text.splitlines()[0][:200] if text else ""


