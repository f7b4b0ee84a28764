"""When the control plane is unreachable the router places requests itself,
round-robin over its own registry view."""

import pytest

from baton.errors import NoCapacityError
from baton.registry import WorkerRecord
from router.metrics import Metrics
from router.pipeline import EngineRequest, Pipeline


class FakeRegistry:
    def __init__(self, workers):
        self.workers = {w.worker_id: w for w in workers}

    def by_role(self, role):
        return sorted((w for w in self.workers.values() if w.role == role), key=lambda w: w.worker_id)


def worker(worker_id, role):
    return WorkerRecord(worker_id, role, f"{worker_id}:1", "m", kv_address=f"{worker_id}:2" if role == "decode" else "")


async def test_fallback_when_the_control_plane_is_down():
    from baton.rpc import free_port

    registry = FakeRegistry([worker("p0", "prefill"), worker("d0", "decode"), worker("d1", "decode")])
    # Nothing listens on this port: Schedule fails with UNAVAILABLE.
    pipeline = Pipeline(f"127.0.0.1:{free_port()}", registry, "m", Metrics(), timeout_s=5)
    request = EngineRequest("r", [1, 2, 3], None)
    try:
        first = await pipeline._schedule(request)
        second = await pipeline._schedule(request)
    finally:
        await pipeline.close()
    assert first.prefill.worker_id == "p0" and first.decode.kv_address == "d0:2"
    assert second.decode.worker_id == "d1" and first.transfer_id != second.transfer_id


async def test_no_fallback_without_workers():
    pipeline = Pipeline("127.0.0.1:1", FakeRegistry([]), "m", Metrics(), timeout_s=5)
    try:
        with pytest.raises(NoCapacityError):
            await pipeline._schedule(EngineRequest("r", [1], None))
    finally:
        await pipeline.close()


