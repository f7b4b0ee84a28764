"""When the control plane is unreachable the router places requests itself,
round-robin over its own registry view."""

import pytest
from vllm import SamplingParams

from baton.errors import ClientError, NoCapacityError
from baton.registry import WorkerRecord
from router.metrics import Metrics
from router.pipeline import EngineRequest, Pipeline


class FakeRegistry:
    def __init__(self, workers):
        self.workers = {w.worker_id: w for w in workers}

    def by_role(self, role):
        return sorted((w for w in self.workers.values() if w.role == role), key=lambda w: w.worker_id)


def worker(worker_id, role, **labels):
    return WorkerRecord(worker_id, role, f"{worker_id}:1", "m", kv_address=f"{worker_id}:2" if role == "decode" else "",
                        labels=labels)


async def test_fallback_when_the_control_plane_is_down():
    from baton.rpc import free_port

    registry = FakeRegistry([worker("p0", "prefill"), worker("d0", "decode"), worker("d1", "decode")])
    # Nothing listens on this port: Schedule fails with UNAVAILABLE.
    pipeline = Pipeline(f"127.0.0.1:{free_port()}", registry, "m", Metrics(), timeout_s=5)
    request = EngineRequest("r", [1, 2, 3], SamplingParams(max_tokens=4))
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
            await pipeline._schedule(EngineRequest("r", [1], SamplingParams(max_tokens=4)))
    finally:
        await pipeline.close()




async def test_the_fallback_keeps_to_the_required_labels():
    from baton.rpc import free_port

    registry = FakeRegistry([worker("p0", "prefill", region="eu"), worker("p1", "prefill", region="us"),
                             worker("d0", "decode", region="us"), worker("d1", "decode", region="eu")])
    pipeline = Pipeline(f"127.0.0.1:{free_port()}", registry, "m", Metrics(), timeout_s=5)
    try:
        for _ in range(3):
            placed = await pipeline._schedule(EngineRequest("r", [1, 2], SamplingParams(max_tokens=4), required_labels={"region": "eu"}))
            assert (placed.prefill.worker_id, placed.decode.worker_id) == ("p0", "d1")
        with pytest.raises(ClientError, match="region=mars"):
            await pipeline._schedule(EngineRequest("r", [1], SamplingParams(max_tokens=4), required_labels={"region": "mars"}))
    finally:
        await pipeline.close()
