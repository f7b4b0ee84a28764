"""Locality on the real stack: a request that requires labels is served only
by workers carrying them, and gets a clear 400 when no worker does; the
stack keeps serving. Every worker of the shared stack carries
``WORKER_LABELS``."""

import asyncio

import grpc
import httpx
import pytest

from baton.registry import list_workers, parse_labels
from baton.v1 import inference_pb2, inference_pb2_grpc
from tests.e2e.conftest import WORKER_LABELS


def ask(stack, require: str | None) -> httpx.Response:
    headers = {"x-baton-require": require} if require is not None else {}
    body = {"model": stack.model_name, "max_tokens": 4, "temperature": 0,
            "messages": [{"role": "user", "content": "Name a colour."}]}
    return httpx.post(f"{stack.http_base}/chat/completions", json=body, headers=headers, timeout=120)


def test_workers_register_their_labels(stack):
    workers = {w.worker_id: w for w in asyncio.run(list_workers(stack.etcd_endpoint, stack.etcd_prefix))}
    for worker_id in ("prefill-0", "decode-0"):
        assert workers[worker_id].labels == parse_labels(WORKER_LABELS) == {"region": "eu", "tier": "test"}


def test_a_request_is_served_inside_its_required_labels(stack):
    for require in ("region=eu", "region=eu, tier=test", ""):
        response = ask(stack, require)
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"]


def test_labels_no_worker_carries_get_a_clear_400_and_serving_goes_on(stack):
    response = ask(stack, "region=us")
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert "region=us" in error["message"] and "carries the required labels" in error["message"]
    response = ask(stack, "region=eu,tier=prod")
    assert response.status_code == 400 and "tier=prod" in response.json()["error"]["message"]
    assert ask(stack, None).status_code == 200


def test_a_malformed_requirement_is_refused_before_anything_runs(stack):
    response = ask(stack, "region")
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "x-baton-require" and "key=value" in error["message"]
    assert ask(stack, None).status_code == 200


def test_the_grpc_api_carries_the_requirement_too(stack, grpc_channel):
    stub = inference_pb2_grpc.InferenceStub(grpc_channel)

    def generate(**labels):
        request = inference_pb2.GenerateRequest(
            model=stack.model_name, prompt="The capital of France is", required_labels=labels,
            sampling=inference_pb2.SamplingParams(max_tokens=3, temperature=0.0))
        return [m for m in stub.Generate(request, timeout=120)]

    assert "".join(m.text for m in generate(region="eu"))
    with pytest.raises(grpc.RpcError) as refused:
        generate(region="us")
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "region=us" in refused.value.details()
    assert generate()
