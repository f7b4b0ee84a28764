"""The whole stack over TLS: `baton up` with certificates this test makes,
mutual TLS between the services (etcd, control plane, workers, the decode
engine's `grpc` KV server) and HTTPS and TLS gRPC at the router. A request
goes through every hop with its KV moved over TLS; a peer without a
certificate, with one from another CA, or in plaintext is refused on every
internal port, and a server with a rogue certificate is refused by Baton's
clients."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess

import grpc
import httpx
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from baton import tls
from baton.rpc import free_port, start_sync_server
from baton.tls import Tls
from baton.v1 import inference_pb2, inference_pb2_grpc
from tests.e2e.certificates import CertificateAuthority
from tests.e2e.conftest import (
    KV_FETCH_TIMEOUT_MS,
    KV_PUSH_START_TIMEOUT_MS,
    REPO,
    _read_until,
    baton_command,
)

pytestmark = pytest.mark.own_stack


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    ca, rogue = CertificateAuthority(folder, "baton"), CertificateAuthority(folder, "rogue")
    return {"ca": ca, "service": ca.issue("service"), "operator": ca.issue("operator"), "public": ca.issue("router"),
            "rogue": rogue.issue("service")}


@contextlib.contextmanager
def using(tls_config: Tls):
    """This test process talks to Baton's services so, for a while (other
    modules talk to the shared plaintext stack)."""
    before = tls.current()
    tls.use(tls_config)
    try:
        yield
    finally:
        tls.use(before)


@pytest.fixture(scope="module")
def secure(pki, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("tls-stack")
    service = pki["service"]
    env = {**os.environ, "BATON_TLS_CERT_FILE": str(service.cert), "BATON_TLS_KEY_FILE": str(service.key),
           "BATON_TLS_CA_FILE": str(pki["ca"].cert), "BATON_TLS_MUTUAL": "true", "BATON_KV_BACKEND": "grpc",
           "BATON_HTTPS_CERT_FILE": str(pki["public"].cert), "BATON_HTTPS_KEY_FILE": str(pki["public"].key),
           "BATON_DISAGGREGATION": "always", "BATON_KV_FETCH_TIMEOUT_MS": str(KV_FETCH_TIMEOUT_MS),
           "BATON_KV_PUSH_START_TIMEOUT_MS": str(KV_PUSH_START_TIMEOUT_MS)}
    http_port, grpc_port, cp_port = free_port(), free_port(), free_port()
    # No --etcd: `baton up` starts its own, over TLS too.
    proc = subprocess.Popen(baton_command("up", "--http-port", str(http_port), "--router-grpc-port", str(grpc_port),
                                          "--control-plane", f"127.0.0.1:{cp_port}", "--log-dir", str(log_dir)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env)
    lines = _read_until(proc, "baton: ready", timeout_s=900)
    if not any("baton: ready" in line for line in lines):
        proc.kill()
        pytest.fail("baton up over TLS did not become ready:\n" + "\n".join(lines[-50:]))
    run = json.loads((log_dir / "up.json").read_text())
    operator = Tls(str(pki["operator"].cert), str(pki["operator"].key), str(pki["ca"].cert), True)
    with using(operator):
        from baton.registry import list_workers

        workers = asyncio.run(list_workers(run["etcd"], run["etcd_prefix"]))
    yield {"run": run, "http": run["http"], "grpc": f"127.0.0.1:{grpc_port}", "env": env, "workers": workers,
           "operator": operator, "log_dir": log_dir}
    proc.send_signal(signal.SIGINT)
    assert proc.wait(120) == 0


def test_a_request_crosses_every_hop_over_tls_with_its_kv(secure, pki):
    assert secure["http"].startswith("https://")
    with httpx.Client(verify=str(pki["ca"].cert), timeout=180) as http:
        response = http.post(secure["http"] + "/chat/completions", json={
            "model": "SmolLM2-135M-Instruct", "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "user", "content": "Name the capital of France."}]})
        assert response.status_code == 200, response.text
        kv = response.json()["kv_transfer_params"]
        assert kv["backend"] == "grpc" and kv["recomputed"] is False and kv["bytes"] > 0
        sdk = openai.OpenAI(base_url=secure["http"], api_key="unused", http_client=http)
        assert sdk.chat.completions.create(model="SmolLM2-135M-Instruct", max_tokens=4,
                                           messages=[{"role": "user", "content": "Hi"}]).choices[0].message.content
    # The public gRPC API: TLS, no client certificate (clients use API keys).
    credentials = grpc.ssl_channel_credentials(pki["ca"].cert.read_bytes())
    with grpc.secure_channel(secure["grpc"], credentials) as channel:
        messages = list(inference_pb2_grpc.InferenceStub(channel).Generate(inference_pb2.GenerateRequest(
            prompt="The capital of France is", sampling=inference_pb2.SamplingParams(max_tokens=4, temperature=0)),
            timeout=180))
        assert sum(len(m.token_ids) for m in messages) == 4
        assert messages[-1].kv.bytes > 0 and not messages[-1].kv.recomputed
    # Plain HTTP on the public port gets nowhere.
    with pytest.raises(httpx.HTTPError):
        httpx.get(secure["http"].replace("https://", "http://") + "/models", timeout=10)


def _health(address: str, credentials: grpc.ChannelCredentials | None) -> str:
    """SERVING, or how the call failed."""
    channel = (grpc.secure_channel(address, credentials) if credentials
               else grpc.insecure_channel(address))
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        except grpc.RpcError as exc:
            return exc.code().name


def _credentials(pki, client: str | None) -> grpc.ChannelCredentials:
    issued = pki[client] if client else None
    return grpc.ssl_channel_credentials(pki["ca"].cert.read_bytes(),
                                        private_key=issued.key.read_bytes() if issued else None,
                                        certificate_chain=issued.cert.read_bytes() if issued else None)


def test_internal_ports_accept_only_peers_with_a_certificate_from_the_ca(secure, pki):
    addresses = {"control plane": secure["run"]["control_plane"]}
    for worker in secure["workers"]:
        addresses[worker.worker_id] = worker.address
        if worker.kv_address:
            addresses[f"{worker.worker_id} KV server"] = worker.kv_address
    assert any("KV server" in name for name in addresses)
    for name, address in addresses.items():
        assert _health(address, _credentials(pki, "operator")) == "SERVING", name
        assert _health(address, None) == "UNAVAILABLE", f"{name} answered plaintext"
        assert _health(address, _credentials(pki, None)) == "UNAVAILABLE", f"{name} took a peer without certificate"
        assert _health(address, _credentials(pki, "rogue")) == "UNAVAILABLE", f"{name} took another CA's certificate"


def test_etcd_accepts_only_peers_with_a_certificate_from_the_ca(secure, pki):
    from baton.registry import list_workers

    run = secure["run"]
    with using(secure["operator"]):
        assert asyncio.run(list_workers(run["etcd"], run["etcd_prefix"]))
    for refused in (Tls(), Tls(ca_file=str(pki["ca"].cert)),
                    Tls(str(pki["rogue"].cert), str(pki["rogue"].key), str(pki["ca"].cert), True)):
        with using(refused), pytest.raises(Exception):  # noqa: B017 — aetcd wraps the refusal its own way
            asyncio.run(asyncio.wait_for(list_workers(run["etcd"], run["etcd_prefix"]), 15))


def test_a_server_with_a_rogue_certificate_is_refused_by_batons_clients(secure, pki):
    rogue = Tls(str(pki["rogue"].cert), str(pki["rogue"].key))
    with using(rogue):
        impostor, port = start_sync_server([], "127.0.0.1", 0, 2, [])
    try:
        from baton.rpc import sync_channel

        with using(secure["operator"]), sync_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.RpcError) as refused:
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        impostor.stop(None)


def test_baton_status_reads_the_stack_over_tls(secure):
    env = {**secure["env"], "BATON_TLS_CERT_FILE": secure["operator"].cert_file,
           "BATON_TLS_KEY_FILE": secure["operator"].key_file}
    shown = subprocess.run(baton_command("status", "--json", "--run", str(secure["log_dir"])), cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert {w["worker_id"] for w in json.loads(shown.stdout)["workers"]} == {"prefill-0", "decode-0"}

