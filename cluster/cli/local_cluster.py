"""``moeyard up`` / ``status`` / ``down`` on this machine.

``up`` starts a Ray head (``ray start --head``: Ray outlives the command) or
joins one (``--address``), starts a ``redis-server`` of its own on a free
loopback port (unless ``--redis URL`` names one, which must answer), deploys the
one Serve application built from the config, waits until the API answers its
health check and prints ``API 127.0.0.1:PORT``. State lives in
``~/.moeyard/state.json`` so that ``down`` (no arguments) finds and stops
everything.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from moeyard.cluster.config import DEMO_MODEL_DIR, MOEYARD_HOME, ClusterConfig
from moeyard.cluster.infra.ray_auth import ray_env

log = logging.getLogger(__name__)

STATE_FILE = MOEYARD_HOME / "state.json"
LOG_DIR = MOEYARD_HOME / "logs"
REDIS_DIR = MOEYARD_HOME / "redis"
DEMO_MODEL = dict(family="mixtral", layers=4, hidden=256, intermediate=512, experts=8, top_k=2, heads=8,
                  kv_heads=2, vocab=4096, dtype="bfloat16", seed=0)


@dataclass
class ClusterState:
    ray_address: str
    started_ray: bool
    api: str
    namespace: str
    model: str
    pid: int
    redis_url: str | None = None
    """Redacted: never a password."""
    redis_prefix: str | None = None
    local_redis: dict | None = None
    """The redis-server ``up`` started (``LocalRedisInfo``), stopped by ``down``."""
    dashboard: str | None = None
    """Dashboard URL (``http://host:port/``)"""
    tls_ca_file: str | None = None
    """CA to verify the API's TLS certificate with (None: plaintext API)."""


def _connect(address: str, namespace: str) -> None:
    import ray

    ray_env()
    logging.getLogger("ray").setLevel(logging.WARNING)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    if not ray.is_initialized():
        ray.init(address=address, namespace=namespace, log_to_driver=False, logging_level=logging.WARNING)


def save_state(state: ClusterState) -> None:
    MOEYARD_HOME.mkdir(parents=True, exist_ok=True)
    STATE_FILE.write_text(json.dumps(asdict(state), indent=2))


def load_state() -> ClusterState | None:
    try:
        return ClusterState(**json.loads(STATE_FILE.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def ensure_token(path: Path) -> str:
    """The API token at ``path``, created (mode 0600) if missing."""
    if path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


def ensure_demo_model(path: Path = DEMO_MODEL_DIR) -> Path:
    if not (path / "config.json").is_file():
        from moeyard.model.make_model import make_model
        from moeyard.model.make_model_options import MakeModelOptions

        print(f"making the demo model in {path} ...", file=sys.stderr)
        make_model(MakeModelOptions(**DEMO_MODEL), path)
    return path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def logical_cpus(cfg: ClusterConfig) -> int:
    """Logical CPUs the head must advertise so every actor and replica fits."""
    need = cfg.expert_shards * cfg.shard_num_cpus + cfg.attention_replicas * cfg.replica_num_cpus + 2
    return int(max(need, os.cpu_count() or 1) + 0.999)


def start_ray_head(cfg: ClusterConfig) -> str:
    """``ray start --head`` on loopback; returns the GCS address."""
    ray_bin = shutil.which("ray", path=os.path.dirname(sys.executable)) or shutil.which("ray")
    if ray_bin is None:
        raise RuntimeError("the `ray` command is not installed in this environment")
    ray_env()
    if not (Path.home() / ".ray" / "auth_token").is_file() and not os.environ.get("RAY_AUTH_TOKEN"):
        # `ray start` needs a token to exist; generate one (its output is the token: never logged)
        subprocess.run([ray_bin, "get-auth-token", "--generate"], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=60, check=True)
    port = free_port()
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    cmd = [ray_bin, "start", "--head", f"--port={port}", f"--num-cpus={logical_cpus(cfg)}",
           "--node-ip-address=127.0.0.1", "--include-dashboard=false", "--disable-usage-stats"]
    with open(LOG_DIR / "ray-start.log", "ab") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"`ray start --head` failed (exit {proc.returncode}); see {LOG_DIR / 'ray-start.log'}")
    return f"127.0.0.1:{port}"


def deploy(cfg: ClusterConfig, ray_address: str, timeout_s: float = 300) -> tuple[str, str | None]:
    """Deploy the Serve application; returns the API address (once it is healthy) and the dashboard URL."""
    ray_env()
    from ray import serve

    from moeyard.cluster.serving.app import APP_NAME, build_app

    _connect(ray_address, cfg.namespace)
    serve.start(proxy_location="Disabled")
    serve.run(build_app(cfg), name=APP_NAME, route_prefix=None, blocking=False)
    ingress = serve.get_app_handle(APP_NAME)
    addr = ingress.address.remote().result(timeout_s=timeout_s)
    wait_healthy(addr, timeout_s, cfg.tls.ca_file if cfg.tls.api_enabled else None)
    return addr, ingress.dashboard_address.remote().result(timeout_s=60)


def wait_healthy(addr: str, timeout_s: float, tls_ca_file: str | None = None) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    if tls_ca_file is not None:
        channel = grpc.secure_channel(addr, grpc.ssl_channel_credentials(Path(tls_ca_file).read_bytes()))
    else:
        channel = grpc.insecure_channel(addr)
    with channel as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while True:
            try:
                r = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"API at {addr} not healthy after {timeout_s:.0f} s")
            time.sleep(0.5)


def up(cfg: ClusterConfig, address: str | None, detach: bool) -> int:
    if load_state() is not None:
        print(f"error: a cluster is already up (state in {STATE_FILE}); run `moeyard down` first", file=sys.stderr)
        return 1
    if cfg.model is None:
        from moeyard.cluster.cli.default_model import ensure_default_model

        cfg = cfg.model_copy(update={"model": str(ensure_default_model(ensure_demo_model))})
    elif not (Path(cfg.model) / "config.json").is_file():
        print(f"error: {cfg.model} is not a checkpoint directory (no config.json)", file=sys.stderr)
        return 2
    from moeyard.cluster.config import check_moe_options
    from moeyard.model.spec import load_spec

    try:
        check_moe_options(cfg, load_spec(cfg.model_dir()))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if cfg.require_auth:
        ensure_token(cfg.token_file())
    from moeyard.cluster.infra.redis_conn import RedisUnavailable, check_reachable
    from moeyard.cluster.infra.redis_server import LocalRedis

    local_redis = None
    if cfg.redis.enabled:
        try:
            check_reachable(cfg.redis, timeout=5)
        except RedisUnavailable as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    else:
        local_redis = LocalRedis.start(REDIS_DIR)
        cfg = cfg.model_copy(update={"redis": cfg.redis.model_copy(
            update={"url": local_redis.url, "password_file": local_redis.password_file})})
    started = address is None
    try:
        ray_address = address or start_ray_head(cfg)
    except BaseException:
        if local_redis is not None:
            LocalRedis.stop(local_redis)
        raise
    try:
        api, dashboard = deploy(cfg, ray_address)
    except BaseException:
        if started:
            stop_ray()
        if local_redis is not None:
            LocalRedis.stop(local_redis)
        raise
    save_state(ClusterState(ray_address, started, api, cfg.namespace, str(cfg.model_dir()), os.getpid(),
                            cfg.redis.redacted_url(), cfg.redis.key_prefix,
                            local_redis.to_dict() if local_redis else None, dashboard,
                            cfg.tls.ca_file if cfg.tls.api_enabled else None))
    print(f"API {api}", flush=True)
    print(f"Dashboard {dashboard or 'off'}", flush=True)
    if cfg.require_auth:
        print(f"API token in {cfg.token_file()}", file=sys.stderr, flush=True)
    if detach:
        return 0
    print("serving; Ctrl-C stops the cluster", file=sys.stderr, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    return down()


def stop_ray() -> None:
    ray_bin = shutil.which("ray", path=os.path.dirname(sys.executable)) or shutil.which("ray")
    with open(LOG_DIR / "ray-stop.log", "ab") as out:
        subprocess.run([ray_bin, "stop", "--grace-period", "30"], stdout=out, stderr=subprocess.STDOUT,
                       timeout=120, check=False)


def _drain_timeout() -> float:
    """The running app's ``drain_timeout_s`` (its deployed config), else the default."""
    from ray import serve

    from moeyard.cluster.config import ClusterConfig
    from moeyard.cluster.serving.app import APP_NAME

    try:
        cfg = serve.get_app_handle(APP_NAME).config.remote().result(timeout_s=30)
        return float(cfg["drain_timeout_s"])
    except Exception:
        return ClusterConfig().drain_timeout_s


def down() -> int:
    state = load_state()
    if state is None:
        print("no cluster is up", file=sys.stderr)
        return 0
    import ray
    from ray import serve

    from moeyard.cluster.serving.app import APP_NAME

    try:
        _connect(state.ray_address, state.namespace)
        drain_s = _drain_timeout()
        try:  # the API refuses new calls and lets the running ones finish (bounded)
            print(f"draining requests in flight (up to {drain_s:.0f} s) ...", file=sys.stderr, flush=True)
            serve.get_app_handle(APP_NAME).drain.remote(drain_s).result(timeout_s=drain_s + 30)
        except Exception as e:  # no app, or its ingress is gone: nothing to drain
            print(f"warning: could not drain the API ({type(e).__name__})", file=sys.stderr)
        serve.delete(APP_NAME)  # replicas finish what they hold (graceful_shutdown_timeout_s), then shards go
        for actor in ray.util.list_named_actors(all_namespaces=True):
            if actor["namespace"] == state.namespace and actor["name"].startswith(f"{state.namespace}-shard-"):
                ray.kill(ray.get_actor(actor["name"], namespace=state.namespace), no_restart=True)
        ray.shutdown()
    except Exception as e:  # Ray already gone: nothing left to drain
        print(f"warning: could not reach Ray at {state.ray_address}: {e}", file=sys.stderr)
    if state.started_ray:
        stop_ray()
    if state.local_redis:
        from moeyard.cluster.infra.redis_server import LocalRedis, LocalRedisInfo

        try:
            LocalRedis.stop(LocalRedisInfo.from_dict(state.local_redis))
        except Exception as e:
            print(f"warning: could not stop redis-server: {e}", file=sys.stderr)
    STATE_FILE.unlink(missing_ok=True)
    print("cluster stopped")
    return 0


def status(as_json: bool) -> int:
    state = load_state()
    if state is None:
        print("no cluster is up", file=sys.stderr)
        return 1
    from ray import serve

    from moeyard.cluster.serving.app import APP_NAME

    _connect(state.ray_address, state.namespace)
    app = serve.status().applications.get(APP_NAME)
    shards = serve.get_deployment_handle("ShardManager", APP_NAME).status.remote().result(timeout_s=30)
    deployments = {name: {"status": str(d.status.value if hasattr(d.status, "value") else d.status),
                          "replicas": dict(d.replica_states)}
                   for name, d in (app.deployments.items() if app else [])}
    try:
        wait_healthy(state.api, 5, state.tls_ca_file)
        api_health = "SERVING"
    except TimeoutError:
        api_health = "NOT_SERVING"
    try:
        placement = serve.get_deployment_handle("ShardManager", APP_NAME).placement_info.remote().result(
            timeout_s=30)
        events = serve.get_deployment_handle("Autoscaler", APP_NAME).events.remote(10).result(timeout_s=30)
    except Exception as e:  # status reports what it can
        placement, events = None, [{"kind": "error", "reason": f"{type(e).__name__}: {e}"}]
    report = {"api": state.api, "api_health": api_health, "dashboard": state.dashboard,
              "ray_address": state.ray_address,
              "redis": state.redis_url, "app_status": str(app.status.value if app else "MISSING"),
              "deployments": deployments, "placement_epoch": placement.epoch if placement else None,
              "shards": shards, "events": events}
    if as_json:
        print(json.dumps(report))
        return 0
    from rich.console import Console
    from rich.table import Table

    con = Console()
    con.print(f"API {state.api} ({api_health}) · Ray {state.ray_address} · Redis {state.redis_url} · "
              f"app {report['app_status']} · placement epoch {report['placement_epoch']}")
    con.print(f"Dashboard {state.dashboard or 'off'} (token: the API token) · `moeyard top` for the terminal view")
    t = Table("deployment", "status", "replicas")
    for name, d in deployments.items():
        t.add_row(name, d["status"], ", ".join(f"{k}: {v}" for k, v in d["replicas"].items()))
    con.print(t)
    t = Table("shard", "healthy", "address", "experts held (slot:expert) per MoE layer", "weights MiB", "RSS MiB")
    for s in shards:
        slots = s.get("slots") or {}
        rows = []
        for layer, held in sorted(slots.items(), key=lambda kv: int(kv[0])):
            rows.append(f"L{layer} " + " ".join(f"{p}:{e}" for p, e in held))
        t.add_row(str(s.get("shard_id")), str(s.get("healthy")), str(s.get("address", "-")), "\n".join(rows),
                  f"{s.get('weight_bytes', 0) / 2**20:.1f}", f"{s.get('rss_bytes', 0) / 2**20:.1f}")
    con.print(t)
    if events:
        t = Table("time", "event", "reason", title="autoscaler (newest first)")
        for e in events:
            when = time.strftime("%H:%M:%S", time.localtime(e["time"])) if "time" in e else "-"
            t.add_row(when, e["kind"], e["reason"])
        con.print(t)
    return 0


def rebalance(as_json: bool) -> int:
    """``moeyard rebalance``: plan from the recorded load and apply it live, now."""
    state = load_state()
    if state is None:
        print("error: no cluster is up", file=sys.stderr)
        return 1
    from ray import serve

    from moeyard.cluster.serving.app import APP_NAME

    _connect(state.ray_address, state.namespace)
    try:
        result = serve.get_deployment_handle("Autoscaler", APP_NAME).rebalance.remote().result(timeout_s=600)
    except Exception as e:
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        print(f"error: rebalance failed: {msg}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(dataclasses.asdict(result)))
    elif result.acted:
        print(f"rebalanced to epoch {result.epoch}: min balancedness {result.balancedness_before:.3f} -> "
              f"{result.balancedness_after:.3f}, {result.slots_moved} slots moved in {result.seconds:.2f}s")
    else:
        print(f"no move: {result.decision}")
    return 0
