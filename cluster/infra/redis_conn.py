"""Connection to the cluster's Redis (expert load statistics, later placement state).

:func:`connect` builds redis-py's pooled client for a
:class:`~moeyard.cluster.settings.redis.RedisSettings` with bounded timeouts and a
short retry; :func:`check_reachable` is the startup check that turns a Redis that
does not answer into a clear :class:`RedisUnavailable`. Every URL or error text
that reaches a log goes through :func:`~moeyard.cluster.settings.redis.redact_url`
/ :func:`~moeyard.cluster.settings.redis.redact_text` first.
"""

from __future__ import annotations

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from moeyard.cluster.settings.redis import PASSWORD_ENV, RedisSettings, redact_text, strip_password


class RedisUnavailable(RuntimeError):
    """Redis does not answer (or refuses us); the message names the redacted URL."""


class RedisAuthError(RedisUnavailable):
    """Redis answers but refuses the password (or wants one and got none)."""


def _client_kwargs(settings: RedisSettings, timeout: float, retries: int) -> tuple[str, dict]:
    if not settings.url:
        raise ValueError("Redis is off (redis url is not set)")
    url = settings.url
    kw: dict = dict(
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(ExponentialBackoff(cap=max(timeout, 0.01), base=min(0.05, timeout / 4)), retries=retries),
        health_check_interval=10,
        socket_keepalive=True,
    )
    password = settings.password()
    if password is not None:
        url = strip_password(url)  # a password in the URL would win over the keyword
        kw["password"] = password
    if url.startswith("rediss://"):
        kw.update(ssl_cert_reqs="required", ssl_ca_certs=settings.ssl_ca_file,
                  ssl_certfile=settings.ssl_cert_file, ssl_keyfile=settings.ssl_key_file)
    return url, kw


def connect(settings: RedisSettings) -> redis.Redis:
    """redis-py's pooled client for ``settings``: every command bounded by ``socket_timeout_s``,
    retried twice with exponential backoff on connection errors. Does not talk to Redis yet."""
    url, kw = _client_kwargs(settings, settings.socket_timeout_s, retries=2)
    return redis.Redis.from_url(url, **kw)


def check_reachable(settings: RedisSettings, timeout: float = 2.0) -> None:
    """PING Redis once (no retries); raise :class:`RedisUnavailable` (or :class:`RedisAuthError`)
    with the redacted URL if it does not answer. For startup checks."""
    where = settings.redacted_url()
    try:
        url, kw = _client_kwargs(settings, timeout, retries=0)
    except (OSError, ValueError) as e:
        raise RedisUnavailable(f"Redis at {where} cannot be used: {redact_text(str(e), settings)}") from None
    client = redis.Redis.from_url(url, **kw)
    try:
        client.ping()
    except redis.AuthenticationError as e:
        raise RedisAuthError(
            f"Redis at {where} refused authentication ({redact_text(str(e), settings)}); "
            f"check redis password_file or ${PASSWORD_ENV}") from None
    except redis.ResponseError as e:
        msg = redact_text(str(e), settings)
        if isinstance(e, redis.exceptions.AuthenticationWrongNumberOfArgsError) or "AUTH" in msg:
            raise RedisAuthError(f"Redis at {where} refused authentication ({msg}); "
                                 f"check redis password_file or ${PASSWORD_ENV}") from None
        raise RedisUnavailable(f"Redis at {where} does not answer PING: {msg}") from None
    except (redis.RedisError, OSError) as e:
        raise RedisUnavailable(f"Redis at {where} does not answer: {redact_text(str(e), settings)}") from None
    finally:
        client.close()
        client.connection_pool.disconnect()


__all__ = ["RedisUnavailable", "RedisAuthError", "connect", "check_reachable"]
