"""RedisSettings, connect, check_reachable against a real redis-server; passwords never leak."""

from __future__ import annotations

import logging
import socket

import pytest
from pydantic import ValidationError

from moeyard.cluster.infra.redis_conn import RedisAuthError, RedisUnavailable, check_reachable, connect
from moeyard.cluster.settings.redis import PASSWORD_ENV, RedisSettings, redact_text, redact_url

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def password(local_redis):
    with open(local_redis.password_file) as f:
        return f.read().strip()


@pytest.fixture(autouse=True)
def _no_env_password(monkeypatch):
    monkeypatch.delenv(PASSWORD_ENV, raising=False)


def dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- settings ---------------------------------------------------------------------------------------


def test_defaults_and_off():
    s = RedisSettings()
    assert not s.enabled and s.key_prefix == "moeyard"
    assert (s.socket_timeout_s, s.flush_interval_s, s.window_s, s.window_ttl_s, s.max_buffered_windows) == \
        (0.5, 1.0, 5.0, 3600, 120)


@pytest.mark.parametrize("prefix", ["a:b", "a b", "", " x", "x*", "é"])
def test_prefix_forbids_colon_and_spaces(prefix):
    with pytest.raises(ValidationError):
        RedisSettings(key_prefix=prefix)


@pytest.mark.parametrize("kw", [
    dict(url="http://127.0.0.1:6379"),
    dict(url="redis://"),
    dict(url="redis://127.0.0.1:99999"),
    dict(url="redis://127.0.0.1:6379", ssl_ca_file="/ca.pem"),
    dict(url="rediss://127.0.0.1:6379", ssl_key_file="/k.pem"),
    dict(url="redis://127.0.0.1:6379", window_s=10, window_ttl_s=5),
    dict(unknown=1),
])
def test_invalid_settings(kw):
    with pytest.raises(ValidationError):
        RedisSettings(**kw)


def test_validation_errors_and_repr_hide_the_password():
    with pytest.raises(ValidationError) as ei:
        RedisSettings(url="http://:hunter2secret@127.0.0.1:6379")
    assert "hunter2secret" not in str(ei.value)
    s = RedisSettings(url="redis://:hunter2secret@127.0.0.1:6379/0")
    assert "hunter2secret" not in repr(s) and "hunter2secret" not in str(s)
    assert s.redacted_url() == "redis://:***@127.0.0.1:6379/0"
    tls = RedisSettings(url="rediss://u:pw@h:6380", ssl_ca_file="/ca.pem", ssl_cert_file="/c", ssl_key_file="/k")
    assert tls.ssl_ca_file == "/ca.pem"


@pytest.mark.parametrize("url,expect", [
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    ("redis://:s3cret@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
    ("rediss://alice:s3cret@host:6380", "rediss://alice:***@host:6380"),
    ("redis://s3cret@host:6379", "redis://***@host:6379"),
    ("redis://host:6379/0?password=s3cret&db=1", "redis://host:6379/0?password=***&db=1"),
    ("redis://:p%40ss%3Aw@host:1", "redis://:***@host:1"),
])
def test_redact_url(url, expect):
    assert redact_url(url) == expect


def test_redact_text_hides_file_and_url_passwords(tmp_path):
    pw = tmp_path / "pw"
    pw.write_text("filesecret\n")
    s = RedisSettings(url="redis://:urlsecret@h:1/0", password_file=str(pw))
    out = redact_text("a filesecret b redis://:urlsecret@h:1/0 c urlsecret", s)
    assert "filesecret" not in out and "urlsecret" not in out
    assert "redis://:***@h:1/0" in out


def test_password_sources(tmp_path, monkeypatch):
    pw = tmp_path / "pw"
    pw.write_text("from-file\nignored\n")
    assert RedisSettings(url="redis://h:1", password_file=str(pw)).password() == "from-file"
    monkeypatch.setenv(PASSWORD_ENV, "from-env")
    assert RedisSettings(url="redis://h:1", password_file=str(pw)).password() == "from-file"
    assert RedisSettings(url="redis://h:1").password() == "from-env"
    monkeypatch.delenv(PASSWORD_ENV)
    assert RedisSettings(url="redis://h:1").password() is None
    with pytest.raises(FileNotFoundError, match="password file"):
        RedisSettings(url="redis://h:1", password_file=str(tmp_path / "missing")).password()
    (tmp_path / "empty").write_text("")
    with pytest.raises(ValueError, match="empty"):
        RedisSettings(url="redis://h:1", password_file=str(tmp_path / "empty")).password()


# -- against a real server --------------------------------------------------------------------------


def test_connect_with_password_file(local_redis):
    s = local_redis.settings(socket_timeout_s=0.3)
    check_reachable(s, timeout=2)
    c = connect(s)
    try:
        assert c.ping()
        kw = c.connection_pool.connection_kwargs
        assert kw["socket_timeout"] == 0.3 and kw["socket_connect_timeout"] == 0.3
        assert kw["health_check_interval"] > 0
        assert c.get_retry().get_retries() == 2
    finally:
        c.close()


def test_connect_with_env_password_and_url_password(local_redis, password, monkeypatch):
    monkeypatch.setenv(PASSWORD_ENV, password)
    s = RedisSettings(url=local_redis.url)
    check_reachable(s)
    assert connect(s).ping()
    monkeypatch.delenv(PASSWORD_ENV)
    inline = RedisSettings(url=f"redis://:{password}@127.0.0.1:{local_redis.port}/0")
    check_reachable(inline)
    # a password file wins over the URL's password
    bad = RedisSettings(url=f"redis://:wrong@127.0.0.1:{local_redis.port}/0", password_file=local_redis.password_file)
    check_reachable(bad)


def test_wrong_password_is_a_clear_error_without_the_password(local_redis, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-password-xyz\n")
    s = RedisSettings(url=local_redis.url, password_file=str(wrong))
    with pytest.raises(RedisAuthError) as ei:
        check_reachable(s)
    msg = str(ei.value)
    assert local_redis.url in msg and "password" in msg
    assert "not-the-password-xyz" not in msg
    with pytest.raises(RedisAuthError) as ei:
        check_reachable(RedisSettings(url=f"redis://:not-the-password-xyz@127.0.0.1:{local_redis.port}/0"))
    assert "not-the-password-xyz" not in str(ei.value)
    assert f"redis://:***@127.0.0.1:{local_redis.port}/0" in str(ei.value)
    with pytest.raises(RedisAuthError):
        check_reachable(RedisSettings(url=local_redis.url))  # no password at all
    assert "not-the-password-xyz" not in caplog.text


def test_unreachable_url_names_the_redacted_url(caplog):
    caplog.set_level(logging.DEBUG)
    port = dead_port()
    s = RedisSettings(url=f"redis://:topsecret99@127.0.0.1:{port}/0")
    with pytest.raises(RedisUnavailable) as ei:
        check_reachable(s, timeout=0.5)
    msg = str(ei.value)
    assert msg.startswith(f"Redis at redis://:***@127.0.0.1:{port}/0 does not answer: ")
    assert "topsecret99" not in msg
    assert not isinstance(ei.value, RedisAuthError)
    assert "topsecret99" not in caplog.text
    with pytest.raises(RedisUnavailable, match=f"Redis at redis://127.0.0.1:{port} does not answer"):
        check_reachable(RedisSettings(url=f"redis://127.0.0.1:{port}"), timeout=0.5)


def test_missing_password_file_is_unavailable_not_a_crash(tmp_path):
    s = RedisSettings(url="redis://127.0.0.1:1/0", password_file=str(tmp_path / "nope"))
    with pytest.raises(RedisUnavailable, match="password file"):
        check_reachable(s)


def test_connect_refuses_when_off():
    with pytest.raises(ValueError, match="off"):
        connect(RedisSettings())
