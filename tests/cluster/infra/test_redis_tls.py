"""Redis over TLS with AUTH: a real redis-server with a self-signed CA, reached by a rediss:// URL."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time

import pytest
import torch

from moeyard.cluster.control.load_store import LoadFlusher, read_load
from moeyard.cluster.control.placement_store import read_placement, write_placement
from moeyard.cluster.infra.redis_conn import RedisUnavailable, check_reachable, connect
from moeyard.cluster.settings.redis import RedisSettings
from moeyard.router_service.load_recorder import LoadRecorder
from moeyard.router_service.placement import round_robin_placement
from tests.certs import make_certs

pytestmark = pytest.mark.timeout(60)
PASSWORD = "tls-test-password-7f3a"


def _certs(d):
    return make_certs(d)


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory):
    exe = shutil.which("redis-server")
    assert exe, "redis-server is needed (.ci/run installs it)"
    d = tmp_path_factory.mktemp("redis-tls")
    ca, cert, key = _certs(d)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = d / "redis.conf"
    conf.write_text(f"bind 127.0.0.1\nport 0\ntls-port {port}\ntls-cert-file {cert}\ntls-key-file {key}\n"
                    f"tls-ca-cert-file {ca}\ntls-auth-clients no\nrequirepass {PASSWORD}\nsave \"\"\n"
                    f"appendonly no\ndir {d}\n")
    conf.chmod(0o600)
    proc = subprocess.Popen([exe, str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pw = d / "password"
    pw.write_text(PASSWORD)
    settings = RedisSettings(url=f"rediss://127.0.0.1:{port}/0", password_file=str(pw), ssl_ca_file=str(ca),
                             key_prefix="tls", flush_interval_s=0.05, window_s=1.0)
    deadline = time.monotonic() + 10
    while True:
        try:
            check_reachable(settings, timeout=1)
            break
        except RedisUnavailable:
            assert time.monotonic() < deadline and proc.poll() is None, "TLS redis-server did not start"
            time.sleep(0.1)
    yield settings
    proc.terminate()
    proc.wait(timeout=10)


def test_load_windows_and_placement_over_tls_with_auth(tls_redis):
    client = connect(tls_redis)
    p = round_robin_placement(2, 8, 2, 5, epoch=3)
    write_placement(client, "tls", p, "fp")
    assert read_placement(client, "tls").placement.epoch == 3
    rec = LoadRecorder(2, 8, 10)
    ids = torch.randint(0, 8, (16, 2))
    rec.record(0, ids, ids)
    flusher = LoadFlusher(rec, None, tls_redis, "r1")
    assert flusher.flush_now()
    w = read_load(client, "tls", since_s=60)
    assert int(w.expert_counts.sum()) == 32


def test_tls_without_the_ca_is_refused(tls_redis, tmp_path):
    untrusted = tls_redis.model_copy(update={"ssl_ca_file": None})
    with pytest.raises(RedisUnavailable) as e:
        check_reachable(untrusted, timeout=2)
    assert PASSWORD not in str(e.value)


def test_plain_connection_to_the_tls_port_is_refused(tls_redis):
    plain = tls_redis.model_copy(update={"url": tls_redis.url.replace("rediss://", "redis://"), "ssl_ca_file": None})
    with pytest.raises(RedisUnavailable):
        check_reachable(plain, timeout=2)
