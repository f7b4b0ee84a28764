"""TLS plumbing on real gRPC servers and a real etcd, without engines (the
whole stack over mutual TLS is tests/e2e/test_tls.py): settings refused
naming the field, servers that demand a certificate from their CA, clients
that refuse a server's rogue certificate."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from baton import tls
from baton.config import load_settings
from baton.etcd_server import EmbeddedEtcd
from baton.registry import list_workers
from baton.rpc import start_sync_server, sync_channel
from baton.tls import Tls
from tests.e2e.certificates import CertificateAuthority


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    ca, rogue = CertificateAuthority(folder, "baton"), CertificateAuthority(folder, "rogue")
    service, rogue_service = ca.issue("service"), rogue.issue("service")
    return {"ca": ca, "good": Tls(str(service.cert), str(service.key), str(ca.cert), True),
            "rogue": Tls(str(rogue_service.cert), str(rogue_service.key), str(ca.cert), True),
            "anonymous": Tls(ca_file=str(ca.cert))}


@pytest.fixture(autouse=True)
def plaintext_after():
    yield
    tls.use(Tls())


def check(address: str, client: Tls) -> str:
    tls.use(client)
    with sync_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        except grpc.RpcError as exc:
            return exc.code().name


def test_a_mutual_tls_server_takes_only_its_cas_certificates(pki):
    tls.use(pki["good"])
    server, port = start_sync_server([], "127.0.0.1", 0, 2)
    try:
        address = f"127.0.0.1:{port}"
        assert check(address, pki["good"]) == "SERVING"
        assert check(address, Tls()) == "UNAVAILABLE"  # plaintext
        assert check(address, pki["anonymous"]) == "UNAVAILABLE"  # TLS without a certificate
        assert check(address, pki["rogue"]) == "UNAVAILABLE"  # another CA's certificate
    finally:
        server.stop(None)


def test_a_client_refuses_a_server_with_a_rogue_certificate(pki):
    tls.use(Tls(pki["rogue"].cert_file, pki["rogue"].key_file))
    server, port = start_sync_server([], "127.0.0.1", 0, 2)
    try:
        assert check(f"127.0.0.1:{port}", pki["good"]) == "UNAVAILABLE"
    finally:
        server.stop(None)


def test_etcd_over_mutual_tls(pki):
    etcd = EmbeddedEtcd(tls=pki["good"]).start()
    try:
        tls.use(pki["good"])
        assert asyncio.run(list_workers(etcd.endpoint, "/baton/test")) == []
        for refused in (Tls(), pki["anonymous"], pki["rogue"]):
            tls.use(refused)
            with pytest.raises(Exception):  # noqa: B017 — aetcd wraps the refusal its own way
                asyncio.run(asyncio.wait_for(list_workers(etcd.endpoint, "/baton/test"), 15))
    finally:
        etcd.stop()


def test_servers_at_addresses_no_certificate_names_are_checked_for_one_service_name(pki):
    """Workers advertise container or pod IPs: every certificate carries one
    service name, and clients check that name instead of the address."""
    named = pki["ca"].issue("internal", names=("baton.internal",))
    server_side = Tls(str(named.cert), str(named.key), str(pki["ca"].cert), True)
    tls.use(server_side)
    server, port = start_sync_server([], "127.0.0.1", 0, 2)
    try:
        address = f"127.0.0.1:{port}"
        assert check(address, pki["good"]) == "UNAVAILABLE"  # 127.0.0.1 is not a name the certificate carries
        assert check(address, Tls(pki["good"].cert_file, pki["good"].key_file, pki["good"].ca_file, True,
                                  "baton.internal")) == "SERVING"
    finally:
        server.stop(None)


def test_a_server_without_a_certificate_refuses_to_start_when_tls_is_on(pki):
    tls.use(pki["anonymous"])  # a CA only: enough for a client, not for a server
    with pytest.raises(RuntimeError, match="no tls_cert_file"):
        start_sync_server([], "127.0.0.1", 0, 2)
    with pytest.raises(RuntimeError, match="no tls_cert_file"):
        EmbeddedEtcd(tls=pki["anonymous"])


@pytest.mark.parametrize("overrides, named", [
    ({"tls_cert_file": "CERT"}, "tls_key_file must be set with tls_cert_file"),
    ({"https_key_file": "KEY"}, "https_cert_file must be set with https_key_file"),
    ({"tls_ca_file": "/no/such/ca.pem", "kv_backend": "grpc"}, "tls_ca_file: no such file '/no/such/ca.pem'"),
    ({"tls_mutual": True}, "tls_mutual needs tls_ca_file"),
    ({"tls_ca_file": "CA"}, "kv_backend='nixl' moves KV unencrypted"),
])
def test_tls_settings_that_cannot_work_are_refused_naming_the_field(pki, overrides, named):
    files = {"CERT": pki["good"].cert_file, "KEY": pki["good"].key_file, "CA": pki["ca"].cert.as_posix()}
    overrides = {k: files.get(v, v) if isinstance(v, str) else v for k, v in overrides.items()}
    with pytest.raises(ValueError) as refused:
        load_settings(overrides, env={})
    assert named in str(refused.value)
