"""A worker restarted under its old id is a new peer: the control plane
fails what was placed on its predecessor instead of counting it as load
(or handing its KV to the successor); a state change of the same process
(draining) is not a restart."""

from __future__ import annotations

import dataclasses

from baton.v1 import control_plane_pb2
from control_plane.scheduling import make_scheduler
from control_plane.service import ControlPlaneServicer
from control_plane.suspects import Suspects
from control_plane.transfers import TransferTable
from tests.unit.test_suspects import Context, FakeRegistry, Health, decode


class Registry(FakeRegistry):
    def put(self, record):
        self.workers[record.worker_id] = record
        for listener in self.listeners:
            listener("put", record)


def servicer_over(registry):
    return ControlPlaneServicer(registry, {r: make_scheduler("round-robin", r) for r in ("prefill", "decode")},
                                TransferTable(60), "grpc", suspects=Suspects(Health()))


async def in_flight(servicer) -> dict[str, int]:
    return {w.worker_id: w.in_flight for w in (await servicer.ListWorkers(None, Context())).workers}


async def test_a_restarted_worker_starts_without_its_predecessors_transfers():
    first = dataclasses.replace(decode("d1"), instance="a")
    registry = Registry([])
    servicer = servicer_over(registry)
    registry.put(first)
    for i in range(3):
        await servicer.Schedule(control_plane_pb2.ScheduleRequest(
            request_id=f"r{i}", model="m", prompt_tokens=4, kv_backend="grpc"), Context())
    assert await in_flight(servicer) == {"d1": 3}

    registry.put(dataclasses.replace(first, state="draining"))  # same process
    assert await in_flight(servicer) == {"d1": 3}

    registry.put(dataclasses.replace(first, address="d1:9", instance="b"))  # restarted
    assert await in_flight(servicer) == {"d1": 0}
    listed = await servicer.ListWorkers(None, Context())
    assert listed.workers[0].transfers_failed == 3
