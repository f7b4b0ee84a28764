"""Overload, through a second router beside the shared stack's (several
routers may serve one cluster at once) whose bound is two requests per
decode worker: past it a generation is refused at once, HTTP 429 with an
OpenAI error body and Retry-After (the openai SDK's RateLimitError, which
it retries after that delay) and gRPC RESOURCE_EXHAUSTED with retry-after,
while the requests it admitted complete and the other router goes on
serving; when a place frees, requests are admitted again."""

from __future__ import annotations

import threading

import grpc
import openai
import pytest

from baton.v1 import common_pb2, inference_pb2, inference_pb2_grpc
from tests.e2e.conftest import second_router, wait_for
from tests.e2e.test_faults import MAX_TOKENS, TOPICS, answer, router_counter, stream, workers

PER_DECODE_WORKER = 2


@pytest.fixture(scope="module")
def bounded_router(stack, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("bounded-router") / "router.log"
    with second_router(stack, log_path, {"BATON_MAX_REQUESTS_PER_DECODE_WORKER": str(PER_DECODE_WORKER)}) as router:
        yield router


def test_past_its_bound_a_router_refuses_at_once_with_retry_after(stack, bounded_router):
    decode_workers = sum(w.role == common_pb2.WORKER_ROLE_DECODE and w.state == "ready"
                         for w in workers(stack).values())
    capacity = PER_DECODE_WORKER * decode_workers
    results: dict[str, dict] = {}
    threads = [threading.Thread(target=stream, args=(bounded_router, topic, results)) for topic in TOPICS[:capacity]]
    for thread in threads:
        thread.start()
    wait_for(lambda: router_counter(bounded_router, "baton_requests_in_flight") == capacity, 60,
             "the admitted answers to stream")

    client = openai.OpenAI(base_url=bounded_router.http_base, api_key="unused", max_retries=0, timeout=60)
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(model=stack.model_name, max_tokens=8,
                                       messages=[{"role": "user", "content": "Hello"}])
    assert refused.value.status_code == 429
    assert int(refused.value.response.headers["retry-after"]) >= 1
    assert refused.value.body["code"] == 429 and "capacity" in refused.value.body["message"]
    with grpc.insecure_channel(bounded_router.grpc_address) as channel:
        call = inference_pb2_grpc.InferenceStub(channel).Generate(inference_pb2.GenerateRequest(
            prompt="Hello", sampling=inference_pb2.SamplingParams(max_tokens=8)), timeout=60)
        with pytest.raises(grpc.RpcError) as exhausted:
            list(call)
    assert exhausted.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert int(dict(exhausted.value.trailing_metadata())["retry-after"]) >= 1
    # Each router bounds its own: the stack's router serves meanwhile.
    assert answer(stack, TOPICS[0])

    for thread in threads:
        thread.join(300)
    for topic, got in results.items():
        assert got["errors"] == [] and got["tokens"] == MAX_TOKENS, (topic, got)
    assert router_counter(bounded_router, "baton_requests_refused_total") == 2
    wait_for(lambda: router_counter(bounded_router, "baton_requests_in_flight") == 0, 30, "places to free")
    assert answer(bounded_router, TOPICS[1])  # admitted again
