"""The control plane and etcd failing under the shared stack while it
serves, with real processes and real signals.

- The control plane SIGKILLed while answers stream: running answers go on
  (the data path does not pass through it), new requests are placed by the
  router itself over its last known membership, `baton up` restarts the
  control plane, and the new one rebuilds its picture (workers from etcd,
  engine load from the workers' reports) and places again.
- etcd stopped for 30 s: every request sent meanwhile is answered (the
  control plane and router keep the membership they saw); when etcd is back
  every worker is registered and kept alive, and `baton status` works."""

from __future__ import annotations

import asyncio
import json
import secrets
import signal
import subprocess
import threading
import time

import grpc
import psutil

from baton.registry import list_workers
from baton.v1 import control_plane_pb2, control_plane_pb2_grpc
from kv_transfer.transport import FALLBACK_BACKEND
from tests.e2e.conftest import REPO, baton_command, wait_for
from tests.e2e.test_faults import MAX_TOKENS, TOPICS, answer, router_counter, stream, workers

OUTAGE_S = 30


def service_pid(stack, name: str) -> int:
    """The pid of one of `baton up`'s services."""
    for child in psutil.Process(stack.proc.pid).children():
        if name in child.cmdline():
            return child.pid
    raise AssertionError(f"baton up runs no {name}")


def start_streams(stack, results: dict) -> list[threading.Thread]:
    threads = [threading.Thread(target=stream, args=(stack, topic, results)) for topic in TOPICS]
    for thread in threads:
        thread.start()
    return threads


def check_complete(results: dict) -> None:
    assert set(results) == set(TOPICS)
    for topic, got in results.items():
        assert got["errors"] == [] and got["finish_reason"] == "length", (topic, got)
        assert got["tokens"] == MAX_TOKENS and got["text"], (topic, got)


def reachable_workers(stack):
    try:
        return workers(stack)
    except Exception:
        return None


def check_fallback_trace(spans) -> None:
    """Placed by the router alone, a request is one trace like any other,
    and says how it was placed."""
    by_id = {s.span_id: s for s in spans}
    (http,) = [s for s in spans if s.name == "POST /v1/chat/completions"]
    for span in spans:
        assert span is http or span.parent_span_id in by_id, f"{span.service} {span.name} has no parent in the trace"
    (schedule,) = [s for s in spans if s.name == "schedule"]
    assert "control plane unreachable; placed by the router" in schedule.event_names
    assert schedule.attributes["baton.decision"] == "local-fallback"
    assert not [s for s in spans if s.service == "baton-control-plane"]
    (send,) = [s for s in spans if s.name == "kv.send"]
    (load,) = [s for s in spans if s.name == "kv.load"]
    assert send.attributes["baton.kv.backend"] == load.attributes["baton.kv.backend"] == FALLBACK_BACKEND
    assert load.attributes["baton.kv.bytes"] > 0 and load.error is None


def test_the_control_plane_killed_under_load_loses_nothing_and_comes_back(stack, otlp):
    before = workers(stack)
    local_before = router_counter(stack, "baton_local_placements_total")
    results: dict[str, dict] = {}
    threads = start_streams(stack, results)
    wait_for(lambda: sum(w.engine.running for w in workers(stack).values()) > 0, 120, "answers to stream",
             interval_s=0.1)
    old_pid = service_pid(stack, "control-plane")
    # `baton up` restarts a dead service within a fraction of a second:
    # held (SIGSTOP) while the control plane is down, so that the requests
    # below surely meet the outage, then let go to restart it.
    supervisor = psutil.Process(stack.proc.pid)
    supervisor.suspend()
    try:
        psutil.Process(old_pid).send_signal(signal.SIGKILL)
        # Placed by the router itself while the control plane is down.
        trace_id = secrets.token_hex(16)
        during = [answer(stack, TOPICS[0], headers={"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"}),
                  answer(stack, TOPICS[1])]
    finally:
        supervisor.resume()
    assert all(during)
    assert router_counter(stack, "baton_local_placements_total") >= local_before + 2
    check_fallback_trace(wait_for(lambda: (found := otlp.trace(trace_id)) and {"kv.load", "engine.decode"} <= {
        s.name for s in found} and found, 30, "the trace of a request placed by the router alone"))
    for thread in threads:
        thread.join(300)
    check_complete(results)

    # Restarted by `baton up`; it knows every worker again, from etcd, and
    # their engines' load, from their reports.
    rebuilt = wait_for(lambda: reachable_workers(stack), 60, "the control plane to be back")
    assert service_pid(stack, "control-plane") != old_pid
    assert set(rebuilt) == set(before)
    wait_for(lambda: all(w.HasField("engine") for w in workers(stack).values()), 30, "engine reports")

    def placed_by_the_control_plane() -> bool:  # once the router's channel has reconnected
        before = router_counter(stack, "baton_local_placements_total")
        return bool(answer(stack, TOPICS[2])) and router_counter(stack, "baton_local_placements_total") == before

    wait_for(placed_by_the_control_plane, 30, "the router to place through the control plane again")
    local_after = router_counter(stack, "baton_local_placements_total")
    placed = [answer(stack, topic) for topic in TOPICS[2:4]]
    assert all(placed)
    assert router_counter(stack, "baton_local_placements_total") == local_after, "placed by the control plane"
    with grpc.insecure_channel(stack.control_plane) as channel:
        listed = control_plane_pb2_grpc.ControlPlaneStub(channel).ListWorkers(
            control_plane_pb2.ListWorkersRequest(), timeout=10)
    assert sum(listed.decisions.values()) >= len(placed), "the new control plane placed them"
    wait_for(lambda: all(w.in_flight == 0 for w in workers(stack).values()), 30, "in-flight counts at zero")


def test_etcd_stopped_for_30_s_loses_nothing_and_workers_stay_registered(stack, etcd):
    registered = {w.worker_id for w in asyncio.run(list_workers(etcd.endpoint, stack.etcd_prefix))}
    etcd.stop(keep_data=True)
    try:
        stopped = time.monotonic()
        results: dict[str, dict] = {}
        threads = start_streams(stack, results)
        during = []
        while time.monotonic() - stopped < OUTAGE_S:
            during.append(answer(stack, TOPICS[len(during) % len(TOPICS)]))
        for thread in threads:
            thread.join(300)
    finally:
        etcd.start()
    check_complete(results)
    assert len(during) >= 3 and all(during)

    def listed() -> set[str]:
        try:
            return {w.worker_id for w in asyncio.run(list_workers(etcd.endpoint, stack.etcd_prefix))}
        except Exception:
            return set()

    wait_for(lambda: listed() == registered, 30, "every worker registered again")
    time.sleep(12)  # past two lease lifetimes: kept alive, not left over
    assert listed() == registered
    status = subprocess.run(baton_command("status", *stack.env_flags(), "--json"), cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    assert {w["worker_id"] for w in json.loads(status.stdout)["workers"]} >= registered
    assert answer(stack, TOPICS[0])
