"""Bad input gets the 4xx and OpenAI-style error body `vllm serve` gives for
it; the router keeps serving. gRPC gets a proper status."""

import grpc
import httpx
import pytest

from baton.v1 import inference_pb2, inference_pb2_grpc
from tests.e2e.prompts import CAPITAL_QUESTION

MODEL = "SmolLM2-135M-Instruct"
CHAT = [{"role": "user", "content": "Hi"}]


def _chat(**fields) -> dict:
    return {"model": MODEL, "messages": CHAT, **fields}


BAD_BODIES = {
    "unknown model": ("/chat/completions", {"model": "gpt-17", "messages": CHAT}),
    "empty messages": ("/chat/completions", {"model": MODEL, "messages": []}),
    "messages not a list": ("/chat/completions", _chat(messages="hello")),
    "message without role": ("/chat/completions", _chat(messages=[{"content": "no role"}])),
    "content of a wrong type": ("/chat/completions", _chat(messages=[{"role": "user", "content": 42}])),
    "max_tokens zero": ("/chat/completions", _chat(max_tokens=0)),
    "max_tokens negative": ("/chat/completions", _chat(max_tokens=-5)),
    "max_tokens huge": ("/chat/completions", _chat(max_tokens=10**9)),
    "max_tokens a string": ("/chat/completions", _chat(max_tokens="ten")),
    "temperature out of range": ("/chat/completions", _chat(temperature=7)),
    "temperature a string": ("/chat/completions", _chat(temperature="hot")),
    "seed too large": ("/chat/completions", _chat(seed=2**64)),
    "top_p zero": ("/chat/completions", _chat(top_p=0)),
    "logprobs too many": ("/chat/completions", _chat(logprobs=True, top_logprobs=1000)),
    "prompt over the context": ("/completions", {"model": MODEL, "prompt": "hello " * 5000}),
    "empty prompt": ("/completions", {"model": MODEL, "prompt": ""}),
    "token id out of the vocabulary": ("/completions", {"model": MODEL, "prompt": [5, 10**7]}),
    "body not an object": ("/chat/completions", [1, 2, 3]),
    "bad json schema": ("/chat/completions", _chat(response_format={"type": "json_schema",
                                                                    "json_schema": {"name": "x", "schema": 5}})),
}


@pytest.mark.parametrize("case", sorted(BAD_BODIES))
def test_bad_input_gets_the_error_vllm_gives(stack, reference, case):
    path, body = BAD_BODIES[case]
    ours = httpx.post(f"{stack.http_base}{path}", json=body, timeout=60)
    theirs = httpx.post(f"{reference}/v1{path}", json=body, timeout=60)
    assert 400 <= ours.status_code < 500, ours.text
    assert ours.status_code == theirs.status_code, (ours.text, theirs.text)
    mine, ref = ours.json()["error"], theirs.json()["error"]
    assert isinstance(mine["message"], str) and mine["message"]
    assert (mine["type"], mine["param"], mine["code"]) == (ref["type"], ref["param"], ref["code"])


@pytest.mark.parametrize("path", ["/chat/completions", "/completions"])
def test_malformed_json(stack, reference, path):
    raw = {"content": b'{"model": "x", "messages": [', "headers": {"content-type": "application/json"}}
    ours = httpx.post(f"{stack.http_base}{path}", timeout=60, **raw)
    theirs = httpx.post(f"{reference}/v1{path}", timeout=60, **raw)
    assert ours.status_code == theirs.status_code and 400 <= ours.status_code < 500
    assert ours.json()["error"]["message"]


def test_a_request_without_model_gets_the_served_one_as_with_vllm(stack, reference):
    for base in (stack.http_base, f"{reference}/v1"):
        response = httpx.post(f"{base}/chat/completions", json={"messages": CHAT, "max_tokens": 4}, timeout=120)
        assert response.status_code == 200 and response.json()["model"] == MODEL


def test_unknown_fields_are_ignored_as_with_vllm(stack, reference):
    body = _chat(max_tokens=4, frobnicate=1, metadata={"team": "x"})
    for base in (stack.http_base, f"{reference}/v1"):
        assert httpx.post(f"{base}/chat/completions", json=body, timeout=120).status_code == 200


def test_still_serving_after_bad_input(stack):
    response = httpx.post(f"{stack.http_base}/chat/completions", timeout=120, json={
        "model": MODEL, "max_tokens": 16, "temperature": 0,
        "messages": [{"role": "user", "content": CAPITAL_QUESTION}]})
    assert response.status_code == 200
    assert "Paris" in response.json()["choices"][0]["message"]["content"]


def test_grpc_bad_input_is_invalid_argument(stack, grpc_channel):
    stub = inference_pb2_grpc.InferenceStub(grpc_channel)
    for sampling in (inference_pb2.SamplingParams(max_tokens=10**9),
                     inference_pb2.SamplingParams(max_tokens=4, temperature=-1),
                     inference_pb2.SamplingParams(max_tokens=4, json_schema="{not json")):
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(inference_pb2.GenerateRequest(model=MODEL, prompt="hi", sampling=sampling),
                               timeout=60))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, sampling
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(inference_pb2.GenerateRequest(model="nope", prompt="hi"), timeout=30))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(inference_pb2.GenerateRequest(model=MODEL), timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # And it still answers.
    reply = list(stub.Generate(inference_pb2.GenerateRequest(
        model=MODEL, prompt="The capital of France is",
        sampling=inference_pb2.SamplingParams(max_tokens=4, temperature=0)), timeout=120))
    assert "Paris" in "".join(m.text for m in reply)
