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

from moeyard.cluster.settings.tls import TLSSettings


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
