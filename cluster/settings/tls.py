"""The TLS section of the cluster config (``tls:``): PEM file paths, never their contents,
so configs and ``serveConfigV2`` carry no secret (:mod:`moeyard.cluster.infra.tls` reads them)."""

from __future__ import annotations

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
