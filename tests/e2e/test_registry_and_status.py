"""Workers join and leave through etcd while the stack serves; `baton status`
and the gRPC health/reflection services tell what is running."""

import asyncio
import json
import signal
import subprocess
from pathlib import Path

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from baton.registry import list_workers, parse_labels
from tests.e2e.conftest import REPO, WORKER_LABELS, baton_command, wait_for
from tests.e2e.prompts import CAPITAL_QUESTION


def workers(stack) -> dict[str, object]:
    return {w.worker_id: w for w in asyncio.run(list_workers(stack.etcd_endpoint, stack.etcd_prefix))}


def status_json(stack) -> dict:
    out = subprocess.run(baton_command("status", "--json", *stack.env_flags()), capture_output=True,
                         text=True, timeout=60, cwd=REPO, check=True).stdout
    return json.loads(out)


def status(stack) -> dict[str, dict]:
    return {row["worker_id"]: row for row in status_json(stack)["workers"]}


def ask(stack) -> dict:
    response = httpx.post(f"{stack.http_base}/chat/completions", timeout=120, json={
        "model": stack.model_name, "max_tokens": 12, "temperature": 0,
        "messages": [{"role": "user", "content": CAPITAL_QUESTION}]})
    assert response.status_code == 200, response.text
    return response.json()


def test_status_lists_the_workers_with_counters(stack):
    ask(stack)
    whole = status_json(stack)
    rows = {row["worker_id"]: row for row in whole["workers"]}
    assert {"prefill-0", "decode-0"} <= set(rows)
    assert any(counts["bytes"] > 0 for counts in whole["kv_backends"].values()), whole["kv_backends"]
    assert isinstance(whole["recent_errors"], list)
    for worker_id, role in (("prefill-0", "prefill"), ("decode-0", "decode")):
        row = rows[worker_id]
        assert row["role"] == role and row["state"] == "ready" and row["model"] == stack.model_name
        assert row["labels"] == parse_labels(WORKER_LABELS)
        assert row["address"].startswith("127.0.0.1:")
        assert row["transfers"]["consumed"] >= 1 and row["transfers"]["kv_bytes"] > 0
        assert httpx.get(f"http://{row['metrics_address']}/metrics", timeout=10).status_code == 200
        # The worker's own process, for an operator (or a fault test) to signal.
        assert f"--worker-id {worker_id}" in Path(f"/proc/{row['pid']}/cmdline").read_bytes().replace(
            b"\0", b" ").decode()
    assert rows["decode-0"]["kv_address"].startswith("127.0.0.1:")


def test_status_finds_a_baton_up_by_its_log_folder(stack):
    """`baton up` records where it runs; `baton status --run` (or, with no
    endpoints given, the latest `baton up` still running) reads it."""
    out = subprocess.run(baton_command("status", "--json", "--run", str(stack.log_dir)), capture_output=True,
                         text=True, timeout=60, cwd=REPO, check=True).stdout
    found = {row["worker_id"]: row for row in json.loads(out)["workers"]}
    assert set(found) == set(status(stack)) and found["decode-0"]["transfers"] is not None


def test_status_watch_redraws_until_interrupted(stack):
    proc = subprocess.Popen(baton_command("status", "--watch", "0.5", "--run", str(stack.log_dir)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        out, err = proc.communicate(timeout=4)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err  # Ctrl-C
    frames = out.split("\x1b[H\x1b[2J")[1:]
    assert len(frames) >= 3, out
    assert all("prefill-0" in frame and "decode-0" in frame and "kv=" in frame for frame in frames[:-1])


def test_a_worker_started_later_gets_traffic_and_leaves_cleanly(stack, tmp_path):
    log = open(tmp_path / "decode-late.log", "wb")
    proc = subprocess.Popen(
        baton_command("decode-worker", *stack.env_flags(), "--worker-id", "decode-late", "--cpu-cores", "1",
                      "--kv-cache-gib", "1"),
        stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        wait_for(lambda: "decode-late" in workers(stack) or proc.poll() is not None, 600, "decode-late to register")
        assert proc.poll() is None, (tmp_path / "decode-late.log").read_text()[-3000:]
        # Least-loaded with round-robin ties: sequential requests alternate.
        for _ in range(4):
            assert "Paris" in ask(stack)["choices"][0]["message"]["content"]
        late = status(stack)["decode-late"]["transfers"]
        assert late["consumed"] >= 1, late
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    assert code == 0
    assert "decode-late" not in workers(stack), "the registry key must vanish when the worker stops"
    assert "Paris" in ask(stack)["choices"][0]["message"]["content"]


def test_every_server_serves_health_and_reflection(stack):
    addresses = [stack.grpc_address, stack.control_plane] + [w.address for w in workers(stack).values()]
    addresses += [w.kv_address for w in workers(stack).values() if w.kv_address]
    for address in addresses:
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, address
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                  timeout=10)
            names = {s.name for r in responses for s in r.list_services_response.service}
            assert any(n.startswith("baton.v1.") for n in names), (address, names)


def test_one_trace_id_covers_every_hop(stack):
    request_id = ask(stack)["id"]

    def trace_ids(log_name: str) -> set[str]:
        ids = set()
        for line in (stack.log_dir / log_name).read_text(errors="replace").splitlines():
            if line.startswith("{") and request_id in line:
                record = json.loads(line)
                # Engine requests are "<response id>-<suffix>" (vLLM's internal ids).
                if str(record.get("request_id", "")).startswith(request_id) and record.get("trace_id"):
                    ids.add(record["trace_id"])
        return ids

    # The decode worker logs its end just after the router's answer went out.
    decode = wait_for(lambda: trace_ids("decode-0.log"), 10, "the decode worker's log")
    router, prefill = trace_ids("router.log"), trace_ids("prefill-0.log")
    assert len(router) == 1, router
    assert prefill == router and decode == router

