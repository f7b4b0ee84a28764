"""The pipeline when a worker fails, against in-process stand-ins: a failed
prefill is placed again without its worker; a decode worker failing
mid-answer hands the request to another with the tokens already streamed,
and the client's stream goes on unbroken. The stand-in model's next token
is a function of its position, so a correct move changes nothing."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from vllm import SamplingParams

from baton import sampling
from baton.errors import DeadlineExceededError, RetryableError
from baton.rpc import ServiceBinding, free_port, start_server
from baton.v1 import (
    common_pb2,
    control_plane_pb2,
    control_plane_pb2_grpc,
    decode_pb2,
    decode_pb2_grpc,
    prefill_pb2,
    prefill_pb2_grpc,
)
from router.metrics import Metrics
from router.pipeline import EngineRequest, Pipeline

PROMPT = [1, 2, 3]


def token_at(position: int) -> int:
    return 100 + position


class Worker(prefill_pb2_grpc.PrefillWorkerServicer, decode_pb2_grpc.DecodeWorkerServicer):
    def __init__(self, worker_id: str, fail_after: int | None = None, drain_after: int | None = None,
                 refuse_hand_off: bool = False):
        """``fail_after``: tokens a decode streams before its worker dies
        (None: never; prefill: fails at once when set). ``drain_after``:
        tokens it streams before it drains and asks for a hand-off."""
        self.worker_id = worker_id
        self.fail_after = fail_after
        self.drain_after = drain_after
        self.refuse_hand_off = refuse_hand_off
        self.calls: list = []
        self.hand_offs: list[decode_pb2.HandOffRequest] = []
        self._handed = asyncio.Event()
        self._streaming: dict[str, int] = {}  # request id → engine prompt tokens + streamed
        self.first_yield_at: float | None = None  # when its Decode first streamed a token
        self.released_at: float | None = None  # when the Decode call that handed off ended
        self.address = ""

    @property
    def kv_endpoint(self) -> str:
        return f"kv-of-{self.worker_id}"

    async def HandOff(self, request, context):
        self.hand_offs.append(request)
        if self.refuse_hand_off or request.request_id not in self._streaming:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "not handing that off")
        self._handed.set()
        return decode_pb2.HandOffResponse(tokens=self._streaming[request.request_id] - 1)

    async def Prefill(self, request, context):
        self.calls.append(request)
        if self.fail_after is not None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "worker died")
        return prefill_pb2.PrefillResponse(
            first=common_pb2.GeneratedTokens(token_ids=[token_at(len(request.prompt_token_ids))]))

    async def Decode(self, request, context):
        self.calls.append(request)
        position = len(request.prompt_token_ids) + request.HasField("first_token_id")
        max_tokens = sampling.decode(request.sampling).max_tokens
        for i in range(max_tokens):
            if self.fail_after is not None and i == self.fail_after:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "Socket closed")
            if self.drain_after is not None and i == self.drain_after:
                self._streaming[request.request_id] = position + i
                try:
                    yield decode_pb2.DecodeResponse(handing_off=True)
                    await asyncio.wait_for(self._handed.wait(), 5)
                    await asyncio.sleep(5)  # the KV is read from here until the router lets go
                finally:
                    self.released_at = time.monotonic()
                    # As a real worker: a request is there to hand off
                    # only while its Decode call lasts.
                    del self._streaming[request.request_id]
                return
            if self.first_yield_at is None:
                self.first_yield_at = time.monotonic()
            last = i == max_tokens - 1
            message = decode_pb2.DecodeResponse(tokens=common_pb2.GeneratedTokens(
                token_ids=[token_at(position + i)],
                finish_reason=common_pb2.FINISH_REASON_LENGTH if last else common_pb2.FINISH_REASON_UNSPECIFIED))
            if last and request.transfer_id:
                message.kv.CopyFrom(common_pb2.KVLoadStats(transfer_id=request.transfer_id, bytes=1000,
                                                           external_tokens=len(request.prompt_token_ids)))
            yield message


class ControlPlane(control_plane_pb2_grpc.ControlPlaneServicer):
    """Places on the first prefill and decode worker not avoided so far."""

    def __init__(self, prefill: list[Worker], decode: list[Worker]):
        self.prefill, self.decode = prefill, decode
        self.avoided: set[str] = set()
        self.schedules: list[control_plane_pb2.ScheduleRequest] = []
        self.reports: list[control_plane_pb2.TransferReport] = []

    async def Schedule(self, request, context):
        self.schedules.append(request)
        self.avoided.update(request.avoid_workers)
        decode = next(w for w in self.decode if w.worker_id not in self.avoided | {request.move_from})
        placement = control_plane_pb2.Placement(
            decode=control_plane_pb2.WorkerEndpoint(worker_id=decode.worker_id, address=decode.address,
                                                    kv_address=decode.address, kv_endpoint=decode.kv_endpoint),
            transfer_id=f"t{len(self.schedules)}", kv_backend="nixl")
        if request.move_from:  # the draining decode worker is the KV's source
            source = next(w for w in self.decode if w.worker_id == request.move_from)
            placement.prefill.CopyFrom(control_plane_pb2.WorkerEndpoint(
                worker_id=source.worker_id, address=source.address, kv_endpoint=source.kv_endpoint))
            placement.decision = "moved"
            return placement
        prefill = next((w for w in self.prefill if w.worker_id not in self.avoided), None)
        if prefill is not None and not (request.HasField("remote_prefill") and not request.remote_prefill):
            placement.prefill.CopyFrom(control_plane_pb2.WorkerEndpoint(worker_id=prefill.worker_id,
                                                                        address=prefill.address))
        return placement

    async def ReportTransfer(self, request, context):
        self.reports.append(request)
        return control_plane_pb2.TransferReportAck(state="closed")

    async def ReportPrefillDone(self, request, context):
        return control_plane_pb2.TransferReportAck(state="prefilled")


async def run(prefill: list[Worker], decode: list[Worker], max_tokens: int = 8, moves: int = 2,
              request_deadline_s: float | None = None):
    servers = []
    for worker in [*prefill, *decode]:
        port = free_port()
        worker.address = f"127.0.0.1:{port}"
        server, _, _ = await start_server(worker.worker_id, [
            ServiceBinding("baton.v1.PrefillWorker", prefill_pb2_grpc.add_PrefillWorkerServicer_to_server, worker),
            ServiceBinding("baton.v1.DecodeWorker", decode_pb2_grpc.add_DecodeWorkerServicer_to_server, worker),
        ], "127.0.0.1", port)
        servers.append(server)
    control_plane = ControlPlane(prefill, decode)
    port = free_port()
    servers.append((await start_server("cp", [ServiceBinding(
        "baton.v1.ControlPlane", control_plane_pb2_grpc.add_ControlPlaneServicer_to_server, control_plane)],
        "127.0.0.1", port))[0])
    metrics = Metrics()
    pipeline = Pipeline(f"127.0.0.1:{port}", registry=None, model_name="m", metrics=metrics, timeout_s=10,
                        decode_moves=moves)
    tokens = []
    try:
        request = EngineRequest("r", PROMPT, SamplingParams(max_tokens=max_tokens, temperature=0),
                                deadline_s=request_deadline_s)
        async for step in pipeline.generate(request):
            tokens.extend(step.tokens.token_ids)
        return tokens, control_plane, metrics
    finally:
        await pipeline.close()
        for server in servers:
            await server.stop(0)


EXPECTED = [token_at(len(PROMPT) + i) for i in range(8)]


async def test_no_failure_no_move():
    tokens, control_plane, metrics = await run([Worker("p1")], [Worker("d1"), Worker("d2")])
    assert tokens == EXPECTED
    assert len(control_plane.schedules) == 1 and metrics.decode_moves._value.get() == 0


async def test_a_decode_worker_failing_mid_answer_hands_the_request_over_and_the_stream_goes_on():
    d1, d2 = Worker("d1", fail_after=3), Worker("d2")
    tokens, control_plane, metrics = await run([Worker("p1")], [d1, d2])
    assert tokens == EXPECTED, "one unbroken stream, as without the failure"
    moved = control_plane.schedules[-1]
    assert list(moved.avoid_workers) == ["d1"] and moved.HasField("remote_prefill") and not moved.remote_prefill
    (handed,) = d2.calls
    # The prompt and the 1 + 3 tokens already streamed; the rest to go.
    assert list(handed.prompt_token_ids) == PROMPT + EXPECTED[:4] and not handed.transfer_id
    assert sampling.decode(handed.sampling).max_tokens == 4
    assert metrics.decode_moves._value.get() == 1
    # The move's own placement is closed when the answer ends.
    assert any(r.transfer_id == "t2" and r.outcome == control_plane_pb2.TRANSFER_OUTCOME_LOCAL
               for r in control_plane.reports)


async def test_a_draining_decode_worker_hands_the_answer_off_with_its_kv():
    d1, d2 = Worker("d1", drain_after=3), Worker("d2")
    tokens, control_plane, metrics = await run([Worker("p1")], [d1, d2])
    assert tokens == EXPECTED, "one unbroken stream, as without the drain"
    moved = control_plane.schedules[-1]
    assert moved.move_from == "d1" and not moved.avoid_workers, "a drain is no failure"
    (hand_off,) = d1.hand_offs
    assert hand_off.request_id == "r" and hand_off.transfer_id == "t2" and hand_off.kv_target == "kv-of-d2"
    (continued,) = d2.calls
    # The prompt and 1 + 3 tokens streamed: the KV of all but the last,
    # which d2 computes and continues after, 4 tokens to go.
    assert list(continued.prompt_token_ids) == PROMPT + EXPECTED[:3]
    assert continued.first_token_id == EXPECTED[3] and sampling.decode(continued.sampling).max_tokens == 4
    assert continued.transfer_id == "t2" and continued.kv_source == "kv-of-d1"
    assert metrics.decode_handoffs._value.get() == 1 and metrics.decode_moves._value.get() == 0
    # d1 stays (its engine holds the KV d2 reads) until d2 streams, no longer.
    assert d2.first_yield_at <= d1.released_at < d2.first_yield_at + 1
    assert any(r.transfer_id == "t2" and r.outcome == control_plane_pb2.TRANSFER_OUTCOME_CONSUMED
               for r in control_plane.reports)


async def test_an_answer_that_cannot_be_handed_off_is_moved_by_recomputing():
    d1, d2 = Worker("d1", drain_after=3, refuse_hand_off=True), Worker("d2")
    tokens, control_plane, metrics = await run([Worker("p1")], [d1, d2])
    assert tokens == EXPECTED
    assert len(d1.hand_offs) == 1 and metrics.decode_handoffs._value.get() == 0
    assert metrics.decode_moves._value.get() == 1
    (moved,) = d2.calls
    assert list(moved.prompt_token_ids) == PROMPT + EXPECTED[:4] and not moved.transfer_id
    assert any(r.transfer_id == "t2" and r.outcome == control_plane_pb2.TRANSFER_OUTCOME_FAILED
               for r in control_plane.reports), "the refused hand-off's transfer is closed"


async def test_moves_are_bounded_then_the_client_gets_the_error():
    decode = [Worker(f"d{i}", fail_after=1) for i in range(4)]
    with pytest.raises(RetryableError, match="decode worker d2"):
        await run([Worker("p1")], decode, moves=2)


async def test_a_failed_prefill_is_placed_again_without_its_worker():
    p1, p2 = Worker("p1", fail_after=0), Worker("p2")
    tokens, control_plane, metrics = await run([p1, p2], [Worker("d1")])
    assert tokens == EXPECTED
    assert [list(s.avoid_workers) for s in control_plane.schedules] == [[], ["p1"]]
    assert len(p2.calls) == 1 and metrics.prefill_retries._value.get() == 1
    assert any(r.transfer_id == "t1" and r.outcome == control_plane_pb2.TRANSFER_OUTCOME_FAILED
               for r in control_plane.reports)


async def test_with_no_other_prefill_worker_the_decode_worker_prefills():
    d1 = Worker("d1")
    tokens, control_plane, _ = await run([Worker("p1", fail_after=0)], [d1])
    assert tokens == EXPECTED
    (decode,) = d1.calls
    assert list(decode.prompt_token_ids) == PROMPT and not decode.transfer_id


class Slow(Worker):
    """Records the deadline each call arrives with; its prefill takes prefill_s, its decode stalls."""

    def __init__(self, worker_id: str, stall_s: float = 0, prefill_s: float = 0):
        super().__init__(worker_id)
        self.stall_s = stall_s
        self.prefill_s = prefill_s
        self.time_left: list[float] = []
        self.cancelled = False

    async def Prefill(self, request, context):
        self.time_left.append(context.time_remaining())
        await asyncio.sleep(self.prefill_s)
        return await super().Prefill(request, context)

    async def Decode(self, request, context):
        self.time_left.append(context.time_remaining())
        try:
            await asyncio.sleep(self.stall_s)
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        async for item in super().Decode(request, context):
            yield item


async def test_every_hop_gets_what_is_left_of_the_clients_deadline():
    p1, d1 = Slow("p1", prefill_s=0.3), Slow("d1")
    deadline = time.monotonic() + 3
    tokens, _, _ = await run([p1], [d1], request_deadline_s=deadline)
    assert tokens == EXPECTED
    (prefill_left,), (decode_left,) = p1.time_left, d1.time_left
    # not the router's 10 s each: the decode gets what the 0.3 s prefill left of the client's 3 s
    assert 2.5 < prefill_left <= 3 and 2 < decode_left <= prefill_left - 0.25


async def test_past_its_deadline_a_request_fails_with_deadline_exceeded_and_is_not_moved():
    d1, d2 = Slow("d1", stall_s=30), Slow("d2")
    with pytest.raises(DeadlineExceededError):
        await run([Worker("p1")], [d1, d2], request_deadline_s=time.monotonic() + 1.5)
    assert d2.time_left == [], "no time is left to move it"
    for _ in range(50):  # the worker's call ends with the deadline, not after its 30 s
        if d1.cancelled:
            break
        await asyncio.sleep(0.05)
    assert d1.cancelled
