"""TLS for Baton's own gRPC hops (router ⇄ control plane ⇄ workers, etcd,
and the ``grpc`` KV data plane) and for the router's public endpoints.

Internal hops use one CA: every service serves the certificate
``tls_cert_file`` and checks its peers' against ``tls_ca_file``; with
``tls_mutual`` servers also demand a client certificate from that CA, so
only Baton's own services can call them. The router's public HTTP and gRPC
endpoints use ``https_cert_file`` (clients authenticate with API keys, not
certificates). Each process sets its own once, at start (``use``): the
services from their settings, the engines' KV connector from the options
the worker gives it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc


@dataclass(frozen=True)
class Tls:
    cert_file: str = ""
    key_file: str = ""
    ca_file: str = ""
    mutual: bool = False
    server_name: str = ""  # what server certificates are checked for ("": the dialed host)

    @property
    def enabled(self) -> bool:
        return bool(self.cert_file or self.ca_file)

    @classmethod
    def internal(cls, settings) -> Tls:
        return cls(settings.tls_cert_file, settings.tls_key_file, settings.tls_ca_file, settings.tls_mutual,
                   settings.tls_server_name)

    @classmethod
    def public(cls, settings) -> Tls:
        return cls(settings.https_cert_file, settings.https_key_file)

    def as_options(self) -> dict:
        return {"tls_cert_file": self.cert_file, "tls_key_file": self.key_file, "tls_ca_file": self.ca_file,
                "tls_mutual": self.mutual, "tls_server_name": self.server_name}

    def channel_options(self) -> list[tuple[str, str]]:
        if self.enabled and self.server_name:
            return [("grpc.ssl_target_name_override", self.server_name)]
        return []

    def server_credentials(self) -> grpc.ServerCredentials | None:
        if not self.cert_file:
            return None
        return grpc.ssl_server_credentials([(_read(self.key_file), _read(self.cert_file))],
                                           root_certificates=_read(self.ca_file) if self.mutual else None,
                                           require_client_auth=self.mutual)

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        if not self.enabled:
            return None
        mine = self.mutual and self.cert_file  # present our certificate where peers demand one
        return grpc.ssl_channel_credentials(root_certificates=_read(self.ca_file) if self.ca_file else None,
                                            private_key=_read(self.key_file) if mine else None,
                                            certificate_chain=_read(self.cert_file) if mine else None)


def _read(path: str) -> bytes:
    return Path(path).read_bytes()


_current = Tls()


def use(tls: Tls) -> None:
    """How this process talks to Baton's other services from now on."""
    global _current
    _current = tls


def current() -> Tls:
    return _current


def check(settings) -> None:
    """Raise, naming the field, if the TLS settings cannot work."""
    for cert, key in (("tls_cert_file", "tls_key_file"), ("https_cert_file", "https_key_file")):
        if bool(getattr(settings, cert)) != bool(getattr(settings, key)):
            missing = key if getattr(settings, cert) else cert
            raise ValueError(f"{missing} must be set with {cert if missing == key else key}")
    for name in ("tls_cert_file", "tls_key_file", "tls_ca_file", "https_cert_file", "https_key_file"):
        path = getattr(settings, name)
        if path and not Path(path).is_file():
            raise ValueError(f"{name}: no such file {path!r}")
    if settings.tls_mutual and not (settings.tls_ca_file and settings.tls_cert_file):
        raise ValueError("tls_mutual needs tls_ca_file (to check peers) and tls_cert_file/tls_key_file "
                         "(to be checked)")
    internal = Tls.internal(settings)
    if internal.enabled and settings.kv_backend != "grpc" and not settings.tls_allow_plaintext_kv:
        raise ValueError(f"kv_backend={settings.kv_backend!r} moves KV unencrypted (UCX / Gloo) while TLS is on: "
                         "set kv_backend=grpc (TLS too), or tls_allow_plaintext_kv=true on a fabric you trust")
