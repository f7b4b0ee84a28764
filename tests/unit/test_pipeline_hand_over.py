"""The pipeline's hand-over, against in-process stand-ins for the control
plane and the workers: prefill's first token is streamed at once; decode
continues after it when that is exact, else samples it again, and its own
first token is checked and not repeated, and on a mismatch decoding resumes
after the streamed token."""

import pytest
from vllm import SamplingParams

from baton import sampling
from baton.rpc import ServiceBinding, start_server
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


class FakeCluster(control_plane_pb2_grpc.ControlPlaneServicer, prefill_pb2_grpc.PrefillWorkerServicer,
                  decode_pb2_grpc.DecodeWorkerServicer):
    """Prefill answers token 7. Decode samples ``decode_first`` first, then
    10, 11, ... until max_tokens; with first_token_id it continues after it."""

    def __init__(self, address: str, decode_first: int):
        self.address = address
        self.decode_first = decode_first
        self.decodes: list[decode_pb2.DecodeRequest] = []
        self.reports: list[control_plane_pb2.TransferReport] = []

    async def Schedule(self, request, context):
        worker = control_plane_pb2.WorkerEndpoint(worker_id="w", address=self.address, kv_address=self.address)
        return control_plane_pb2.Placement(prefill=worker, decode=worker, transfer_id="t1")

    async def ReportTransfer(self, request, context):
        self.reports.append(request)
        return control_plane_pb2.TransferReportAck(state="closed")

    async def Prefill(self, request, context):
        return prefill_pb2.PrefillResponse(first=common_pb2.GeneratedTokens(token_ids=[7]))

    async def Decode(self, request, context):
        self.decodes.append(request)
        max_tokens = sampling.decode(request.sampling).max_tokens
        tokens = [10 + i for i in range(max_tokens)]
        if not request.HasField("first_token_id"):
            tokens[0] = self.decode_first
        for i, token in enumerate(tokens):
            last = i == len(tokens) - 1
            yield decode_pb2.DecodeResponse(
                tokens=common_pb2.GeneratedTokens(
                    token_ids=[token],
                    finish_reason=common_pb2.FINISH_REASON_LENGTH if last else common_pb2.FINISH_REASON_UNSPECIFIED),
                kv=common_pb2.KVLoadStats(transfer_id=request.transfer_id, external_tokens=2) if last else None)


SEEDED = SamplingParams(max_tokens=4, temperature=0.8, seed=3)


async def run(decode_first: int, params: SamplingParams = SEEDED) -> tuple[list[int], FakeCluster, Metrics]:
    from baton.rpc import free_port

    port = free_port()
    cluster = FakeCluster(f"127.0.0.1:{port}", decode_first)
    server, _, _ = await start_server("fake", [
        ServiceBinding("baton.v1.ControlPlane", control_plane_pb2_grpc.add_ControlPlaneServicer_to_server, cluster),
        ServiceBinding("baton.v1.PrefillWorker", prefill_pb2_grpc.add_PrefillWorkerServicer_to_server, cluster),
        ServiceBinding("baton.v1.DecodeWorker", decode_pb2_grpc.add_DecodeWorkerServicer_to_server, cluster),
    ], "127.0.0.1", port)
    metrics = Metrics()
    pipeline = Pipeline(cluster.address, registry=None, model_name="m", metrics=metrics, timeout_s=10)
    try:
        tokens = []
        async for step in pipeline.generate(EngineRequest("r", PROMPT, params)):
            tokens.extend(step.tokens.token_ids)
        return tokens, cluster, metrics
    finally:
        await pipeline.close()
        await server.stop(0)


@pytest.mark.parametrize("params", [SamplingParams(max_tokens=4, temperature=0),
                                    SamplingParams(max_tokens=4, temperature=0.8),
                                    SamplingParams(max_tokens=4, temperature=0, repetition_penalty=1.2)])
async def test_decode_continues_after_the_streamed_token_with_the_transferred_kv(params):
    tokens, cluster, metrics = await run(decode_first=8, params=params)
    assert tokens == [7, 10, 11, 12]
    (decode,) = cluster.decodes
    assert decode.first_token_id == 7 and decode.transfer_id == "t1" and decode.request_id == "r"
    assert sampling.decode(decode.sampling).max_tokens == 3
    assert metrics.first_token_mismatches._value.get() == 0


async def test_a_seeded_decode_samples_the_first_token_again_and_it_is_not_repeated():
    tokens, cluster, metrics = await run(decode_first=7)
    assert tokens == [7, 11, 12, 13]
    (decode,) = cluster.decodes
    assert not decode.HasField("first_token_id") and decode.transfer_id == "t1"
    assert sampling.decode(decode.sampling).max_tokens == 4
    assert metrics.first_token_mismatches._value.get() == 0


async def test_a_first_token_mismatch_resumes_after_prefills_token():
    tokens, cluster, metrics = await run(decode_first=8)
    assert tokens == [7, 10, 11, 12], "the client's stream goes on from the token it already has"
    first, resumed = cluster.decodes
    assert resumed.first_token_id == 7 and resumed.transfer_id == "" and resumed.request_id == "r-resumed"
    assert sampling.decode(resumed.sampling).max_tokens == 3
    assert metrics.first_token_mismatches._value.get() == 1
