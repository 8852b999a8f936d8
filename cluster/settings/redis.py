"""The Redis section of the cluster config (``redis:``) and the redaction every Redis URL or error
text goes through before it reaches a log (the password never sits in the config: it is read from
``password_file`` or the ``MOEYARD_REDIS_PASSWORD`` environment variable)."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

PASSWORD_ENV = "MOEYARD_REDIS_PASSWORD"
KEY_PART_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
"""A key prefix or reporter id: no ':' (the key separator), no spaces, no glob characters."""
_MASK = "***"


class RedisSettings(BaseModel):
    """Where the cluster's Redis is and how the load statistics use it."""

    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    url: str | None = Field(None, description="redis:// or rediss:// URL; None = load statistics off")
    password_file: str | None = Field(
        None, description=f"file holding the password (else ${PASSWORD_ENV}, else the URL's)")
    key_prefix: str = Field("moeyard", pattern=KEY_PART_PATTERN, description="one prefix per cluster")
    socket_timeout_s: float = Field(0.5, gt=0, le=60)
    flush_interval_s: float = Field(1.0, gt=0)
    window_s: float = Field(5.0, gt=0)
    window_ttl_s: int = Field(3600, ge=1)
    max_buffered_windows: int = Field(120, ge=1)
    ssl_ca_file: str | None = None
    ssl_cert_file: str | None = None
    ssl_key_file: str | None = None

    @field_validator("url")
    @classmethod
    def _scheme(cls, v: str | None) -> str | None:
        if v is not None:
            parts = urlsplit(v)
            if parts.scheme not in ("redis", "rediss") or not parts.hostname:
                raise ValueError("url must look like redis://HOST:PORT[/DB] or rediss://HOST:PORT[/DB]")
            try:
                _ = parts.port  # raises on a port out of range
            except ValueError:
                raise ValueError("url has an invalid port") from None
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "RedisSettings":
        tls = [self.ssl_ca_file, self.ssl_cert_file, self.ssl_key_file]
        if any(tls) and (self.url is None or not self.url.startswith("rediss://")):
            raise ValueError("ssl_* files need a rediss:// url")
        if self.ssl_key_file and not self.ssl_cert_file:
            raise ValueError("ssl_key_file needs ssl_cert_file")
        if self.window_ttl_s < self.window_s:
            raise ValueError("window_ttl_s must be at least window_s")
        return self

    def __repr_args__(self):
        for k, v in super().__repr_args__():
            yield k, (redact_url(v) if k == "url" and v else v)

    @property
    def enabled(self) -> bool:
        return self.url is not None

    def redacted_url(self) -> str:
        return redact_url(self.url) if self.url else "<redis off>"

    def password(self) -> str | None:
        """``password_file`` (first line), else ``$MOEYARD_REDIS_PASSWORD``, else None (the URL's, if any)."""
        if self.password_file:
            p = Path(self.password_file).expanduser()
            try:
                text = p.read_text()
            except FileNotFoundError:
                raise FileNotFoundError(f"Redis password file {p} not found") from None
            lines = text.splitlines()
            if not lines or not lines[0]:
                raise ValueError(f"Redis password file {p} is empty")
            return lines[0]
        return os.environ.get(PASSWORD_ENV) or None


def redact_url(url: str) -> str:
    """``url`` with any password (userinfo or ``?password=``) replaced by ``***``; safe for logs."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, host = netloc.rsplit("@", 1)
            # "user:pw@" keeps the user; a lone "x@" is masked too (often a password missing its ':')
            user = userinfo.split(":", 1)[0] if ":" in userinfo else ""
            netloc = f"{user}:{_MASK}@{host}" if ":" in userinfo else f"{_MASK}@{host}"
        query = parts.query
        if query:
            pairs = parse_qsl(query, keep_blank_values=True)
            query = urlencode([(k, _MASK if k.lower() == "password" else v) for k, v in pairs], safe="*")
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except ValueError:
        return "<unparsable url>"


def _url_secrets(url: str | None) -> list[str]:
    if not url:
        return []
    try:
        parts = urlsplit(url)
    except ValueError:
        return [url]
    out = [parts.password] if parts.password else []
    if "@" in parts.netloc and ":" not in parts.netloc.rsplit("@", 1)[0]:
        out.append(parts.netloc.rsplit("@", 1)[0])  # masked by redact_url as well
    out += [v for k, v in parse_qsl(parts.query) if k.lower() == "password" and v]
    return out


def redact_text(text: str, settings: RedisSettings | None = None, secrets: list[str] | None = None) -> str:
    """``text`` with the settings' URL redacted and every known password replaced by ``***``."""
    hidden = list(secrets or [])
    if settings is not None and settings.url:
        text = text.replace(settings.url, redact_url(settings.url))
        hidden += _url_secrets(settings.url)
        try:
            pw = settings.password()
        except (OSError, ValueError):
            pw = None
        if pw:
            hidden.append(pw)
    for s in sorted({s for s in hidden if s}, key=len, reverse=True):
        text = text.replace(s, _MASK).replace(quote(s, safe=""), _MASK)
    return text


def strip_password(url: str) -> str:
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    userinfo, host = parts.netloc.rsplit("@", 1)
    user = userinfo.split(":", 1)[0]
    return urlunsplit((parts.scheme, f"{user}@{host}" if user else host, parts.path, parts.query,
                       parts.fragment))

