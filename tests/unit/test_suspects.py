"""Suspect workers: out of placement the moment a request fails on them,
back when they answer a health check, forgotten when they leave."""

from __future__ import annotations

from baton.registry import WorkerRecord
from baton.v1 import control_plane_pb2
from control_plane.scheduling import make_scheduler
from control_plane.service import ControlPlaneServicer
from control_plane.suspects import Suspects
from control_plane.transfers import TransferTable


class Health:
    def __init__(self):
        self.serving: set[str] = set()
        self.asked: list[str] = []

    async def __call__(self, address: str) -> bool:
        self.asked.append(address)
        return address in self.serving


async def test_a_suspect_stays_out_until_it_answers_a_health_check():
    health = Health()
    suspects = Suspects(health)
    suspects.mark("d1", "d1:1", "request r failed on it")
    await suspects.probe()
    assert "d1" in suspects and health.asked == ["d1:1"]
    health.serving.add("d1:1")
    await suspects.probe()
    assert "d1" not in suspects and len(suspects) == 0


async def test_a_worker_that_left_is_not_probed():
    health = Health()
    suspects = Suspects(health)
    suspects.mark("d1", "d1:1", "failed")
    suspects.forget("d1")
    await suspects.probe()
    assert health.asked == []


class FakeRegistry:
    def __init__(self, workers):
        self.workers = {w.worker_id: w for w in workers}
        self.listeners = []

    def on_change(self, listener):
        self.listeners.append(listener)

    def by_role(self, role):
        return sorted((w for w in self.workers.values() if w.role == role), key=lambda w: w.worker_id)

    def leave(self, worker_id):
        record = self.workers.pop(worker_id)
        for listener in self.listeners:
            listener("delete", record)


def decode(worker_id):
    return WorkerRecord(worker_id, "decode", f"{worker_id}:1", "m", kv_address=f"{worker_id}:2")


class Context:
    async def abort(self, code, details):
        raise AssertionError(f"aborted: {code} {details}")


async def schedule(servicer, request_id, avoid=()):
    placement = await servicer.Schedule(control_plane_pb2.ScheduleRequest(
        request_id=request_id, model="m", prompt_tokens=4, kv_backend="grpc", avoid_workers=avoid), Context())
    return placement.decode.worker_id


async def test_a_worker_a_request_avoids_is_out_of_placement_for_every_request_until_it_answers():
    registry, health = FakeRegistry([decode("d1"), decode("d2")]), Health()
    servicer = ControlPlaneServicer(registry, {r: make_scheduler("round-robin", r) for r in ("prefill", "decode")},
                                    TransferTable(60), "grpc", suspects=Suspects(health))
    assert await schedule(servicer, "r0", avoid=["d1"]) == "d2"
    assert {await schedule(servicer, f"r{i}") for i in range(1, 5)} == {"d2"}
    listed = {w.worker_id: w.state for w in (await servicer.ListWorkers(None, Context())).workers}
    assert listed == {"d1": "suspect", "d2": "ready"}
    health.serving.add("d1:1")
    await servicer.suspects.probe()
    assert {await schedule(servicer, f"r{i}") for i in range(5, 9)} == {"d1", "d2"}
    registry.leave("d1")
    assert "d1" not in servicer.suspects


async def test_a_draining_worker_takes_no_new_placement():
    import dataclasses

    draining = dataclasses.replace(decode("d1"), state="draining")
    servicer = ControlPlaneServicer(FakeRegistry([draining, decode("d2")]),
                                    {r: make_scheduler("round-robin", r) for r in ("prefill", "decode")},
                                    TransferTable(60), "grpc", suspects=Suspects(Health()))
    assert {await schedule(servicer, f"r{i}") for i in range(4)} == {"d2"}
