"""The dashboard's HTTP server (aiohttp): token auth, the page, its JSON and ``/metrics``.

Routes:

``GET /metrics``            Prometheus text; no token (Prometheus scrapes it).
``GET /``                   the page (``static/index.html``).
``GET /static/{name}``      the page's script and styles, served from the package (no CDN).
``GET /api/state``          :class:`~moeyard.cluster.dashboard.state.DashboardState` as JSON.
``GET /api/panels``         the server-rendered panels (SVG / HTML fragments) as JSON.

Every path but ``/metrics`` answers 401 without the token (never a redirect). The
token is accepted as ``Authorization: Bearer <token>``, as a ``token`` query parameter
(a browser's first visit: the answer sets an HttpOnly, SameSite=Strict session cookie
that is an HMAC of the token, not the token), or as that cookie. ``lookback`` (seconds)
is the only other query parameter; anything malformed or unknown gets 400 with a message.
No access log is written: query strings may hold the token.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import html
import json
import logging
import math
from dataclasses import asdict
from importlib import resources

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from moeyard.cluster.dashboard.collect import DashboardSource
from moeyard.cluster.dashboard.prom import ClusterCollector

log = logging.getLogger(__name__)

COOKIE = "moeyard_dashboard"
STATIC_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
ALLOWED_QUERY = {"/": {"token"}, "/api/state": {"token", "lookback"}, "/api/panels": {"token", "lookback"}}

_LOGIN = """<!doctype html><html><head><meta charset="utf-8"><meta name="referrer" content="no-referrer">
<title>moeyard dashboard: token needed</title></head><body style="font-family:sans-serif;margin:3em">
<h1>moeyard dashboard</h1><p>{msg}</p>
<form method="get" action="/"><label>API token (<code>~/.moeyard/token</code>):
<input type="password" name="token" autofocus size="50"></label> <button type="submit">open</button></form>
</body></html>"""


class BadQuery(ValueError):
    pass


def session_value(token: str) -> str:
    """The cookie for ``token``: an HMAC, so the cookie is not the API token itself."""
    return hmac.new(token.encode(), b"moeyard-dashboard-session-v1", hashlib.sha256).hexdigest()


def parse_lookback(request: web.Request, default: float, max_s: float, min_s: float) -> float:
    """The ``lookback`` query parameter in seconds; :class:`BadQuery` naming the problem."""
    allowed = ALLOWED_QUERY.get(request.path, {"token"})
    unknown = sorted(set(request.query) - allowed)
    if unknown:
        raise BadQuery(f"unknown query parameter {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})")
    if len(request.query.getall("lookback", [])) > 1:
        raise BadQuery("lookback given more than once")
    raw = request.query.get("lookback")
    if raw is None:
        return default
    try:
        v = float(raw)
    except ValueError:
        raise BadQuery(f"lookback must be a number of seconds, got {raw[:40]!r}") from None
    if not math.isfinite(v) or not min_s <= v <= max_s:
        raise BadQuery(f"lookback must be between {min_s:g} and {max_s:g} seconds, got {raw[:40]!r}")
    return v


class DashboardServer:
    """Serves one :class:`DashboardSource`. ``token=None`` turns auth off (``require_auth: false``)."""

    def __init__(self, source: DashboardSource, token: str | None):
        self.source = source
        self.token = token
        self._session = session_value(token) if token else None
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(ClusterCollector(source))
        self.runner: web.AppRunner | None = None
        self.address: str | None = None
        self.app = web.Application(middlewares=[self._errors, self._auth], client_max_size=64 << 10)
        self.app.router.add_get("/metrics", self.metrics)
        self.app.router.add_get("/", self.index)
        self.app.router.add_get("/static/{name}", self.static)
        self.app.router.add_get("/api/state", self.api_state)
        self.app.router.add_get("/api/panels", self.api_panels)

    # -- middleware --------------------------------------------------------------------------
    @web.middleware
    async def _errors(self, request: web.Request, handler):
        try:
            return await handler(request)
        except BadQuery as e:
            return web.json_response({"error": "bad_request", "message": str(e)}, status=400)
        except web.HTTPException:
            raise
        except Exception:
            log.exception("dashboard request %s failed", request.path)
            return web.json_response({"error": "internal", "message": "internal error; see the dashboard log"},
                                     status=500)

    def _authorized(self, request: web.Request) -> tuple[bool, bool]:
        """(allowed, came by query: set the cookie)."""
        if self.token is None:
            return True, False
        header = request.headers.get("Authorization", "")
        if header.startswith("Bearer ") and hmac.compare_digest(header[7:].strip().encode(), self.token.encode()):
            return True, False
        cookie = request.cookies.get(COOKIE)
        if cookie and hmac.compare_digest(cookie.encode(), self._session.encode()):
            return True, False
        q = request.query.get("token")
        if q and hmac.compare_digest(q.encode(), self.token.encode()):
            return True, True
        return False, False

    @web.middleware
    async def _auth(self, request: web.Request, handler):
        if request.path == "/metrics":
            return await handler(request)
        ok, by_query = self._authorized(request)
        if not ok:
            msg = "a valid token is needed" if "token" not in request.query and \
                "Authorization" not in request.headers else "that token is not valid"
            if request.path.startswith("/api/") or "text/html" not in request.headers.get("Accept", ""):
                return web.json_response({"error": "unauthenticated", "message": msg}, status=401,
                                         headers={"WWW-Authenticate": 'Bearer realm="moeyard"'})
            return web.Response(text=_LOGIN.format(msg=html.escape(msg)), content_type="text/html", status=401,
                                headers={"WWW-Authenticate": 'Bearer realm="moeyard"'})
        resp = await handler(request)
        if by_query:
            resp.set_cookie(COOKIE, self._session, httponly=True, samesite="Strict", path="/")
        resp.headers.setdefault("Cache-Control", "no-store")
        resp.headers.setdefault("X-Content-Type-Options", "nosniff")
        resp.headers.setdefault("Referrer-Policy", "no-referrer")
        resp.headers.setdefault("Content-Security-Policy",
                                "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'")
        return resp

    # -- handlers ----------------------------------------------------------------------------
    def _lookback(self, request: web.Request) -> float:
        s = self.source.settings
        return parse_lookback(request, s.lookback_s, s.max_lookback_s, self.source.window_s)

    async def metrics(self, request: web.Request) -> web.Response:
        if request.query:
            raise BadQuery("/metrics takes no query parameters")
        body = await asyncio.to_thread(generate_latest, self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def index(self, request: web.Request) -> web.Response:
        parse_lookback(request, 0, 0, 0)  # rejects unknown parameters
        return web.Response(text=_static_text("index.html"), content_type="text/html")

    async def static(self, request: web.Request) -> web.Response:
        parse_lookback(request, 0, 0, 0)
        name = request.match_info["name"]
        suffix = name[name.rfind("."):] if "." in name else ""
        if name not in _static_names() or suffix not in STATIC_TYPES:
            raise web.HTTPNotFound(text=f"no static file {name[:60]!r}")
        return web.Response(text=_static_text(name), content_type=STATIC_TYPES[suffix])

    async def api_state(self, request: web.Request) -> web.Response:
        state = await asyncio.to_thread(self.source.state, self._lookback(request))
        resp = web.Response(text=json.dumps(asdict(state), allow_nan=False, default=_nan_safe),
                            content_type="application/json")
        resp.enable_compression()  # L x E heatmaps of large models are megabytes of JSON
        return resp

    async def api_panels(self, request: web.Request) -> web.Response:
        from moeyard.cluster.dashboard.render import render_panels

        lookback = self._lookback(request)

        def build():
            state = self.source.state(lookback)
            return {"time": state.time, "panels": render_panels(state)}
        resp = web.json_response(await asyncio.to_thread(build))
        resp.enable_compression()
        return resp

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self, host: str, port: int) -> str:
        self.runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, port)
        await site.start()
        sock = site._server.sockets[0]  # the port actually bound (port 0 = any free one)
        bound = sock.getsockname()[1]
        shown = host if ":" not in host else f"[{host}]"
        self.address = f"http://{shown}:{bound}/"
        log.info("dashboard at %s", self.address)
        return self.address

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


def _nan_safe(o):
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _static_dir():
    return resources.files("moeyard.cluster.dashboard") / "static"


def _static_names() -> set[str]:
    return {p.name for p in _static_dir().iterdir() if p.is_file()}


def _static_text(name: str) -> str:
    return (_static_dir() / name).read_text(encoding="utf-8")
