"""TLS for the public API and mutual TLS for the internal expert protocol.

:class:`TLSSettings` names PEM files (never their contents, so configs and
``serveConfigV2`` carry no secret); the functions here read them when a server
or channel is built. The internal protocol uses one cluster certificate:
every shard presents it and requires a client certificate signed by the same
CA, every router presents it and checks the shard's against the CA under
``internal_server_name`` (shards are reached by IP, so the name is set
explicitly rather than taken from the address).
"""

from __future__ import annotations

from pathlib import Path

import grpc
from pydantic import BaseModel, ConfigDict, Field, model_validator


class TLSSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cert_file: str | None = Field(None, description="PEM certificate (chain) this cluster's servers present")
    key_file: str | None = Field(None, description="its PEM private key")
    ca_file: str | None = Field(None, description="PEM CA that signed it: clients and shards verify peers with it")
    api: bool = Field(True, description="serve the public gRPC API over TLS (when cert and key are set)")
    internal: bool = Field(True, description="mutual TLS between routers and expert shards (needs ca_file too)")
    internal_server_name: str = Field("moeyard-internal", description="name in the certificate routers check")

    @model_validator(mode="after")
    def _complete(self) -> "TLSSettings":
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("tls: set both cert_file and key_file, or neither")
        if self.cert_file is not None and self.internal and self.ca_file is None:
            raise ValueError("tls: mutual TLS for the expert protocol needs ca_file (or set internal: false)")
        return self

    @property
    def api_enabled(self) -> bool:
        return self.api and self.cert_file is not None

    @property
    def internal_enabled(self) -> bool:
        return self.internal and self.cert_file is not None


def _read(path: str | None) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"TLS file {path} cannot be read ({e.strerror})") from None


def api_server_credentials(tls: TLSSettings) -> grpc.ServerCredentials | None:
    """The public API's credentials (server auth only: clients authenticate with the bearer token)."""
    if not tls.api_enabled:
        return None
    return grpc.ssl_server_credentials([(_read(tls.key_file), _read(tls.cert_file))])


def shard_server_credentials(tls: TLSSettings) -> grpc.ServerCredentials | None:
    """An expert shard's credentials: its certificate, and a client certificate required."""
    if not tls.internal_enabled:
        return None
    return grpc.ssl_server_credentials([(_read(tls.key_file), _read(tls.cert_file))],
                                       root_certificates=_read(tls.ca_file), require_client_auth=True)


def router_channel_credentials(tls: TLSSettings) -> grpc.ChannelCredentials | None:
    """A router's (or the autoscaler's) credentials towards the shards."""
    if not tls.internal_enabled:
        return None
    return grpc.ssl_channel_credentials(root_certificates=_read(tls.ca_file), private_key=_read(tls.key_file),
                                        certificate_chain=_read(tls.cert_file))


def router_channel_options(tls: TLSSettings) -> list[tuple[str, str]]:
    return [("grpc.ssl_target_name_override", tls.internal_server_name)] if tls.internal_enabled else []
