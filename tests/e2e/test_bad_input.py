"""Bad input gets a 4xx with an OpenAI-style error body; the router keeps serving."""

import grpc
import httpx
import pytest

from baton.v1 import common_pb2, inference_pb2, inference_pb2_grpc

CHAT = [{"role": "user", "content": "Hi"}]


def post(stack, path: str, **kwargs) -> httpx.Response:
    return httpx.post(f"{stack.http_base}{path}", timeout=60, **kwargs)


def assert_openai_error(response: httpx.Response, status: int, param: str | None = None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] in ("invalid_request_error", "not_found_error")
    if param is not None:
        assert error["param"] == param


@pytest.mark.parametrize("path", ["/chat/completions", "/completions"])
def test_malformed_json(stack, path):
    response = post(stack, path, content=b'{"model": "x", "messages": [', headers={"content-type": "application/json"})
    assert_openai_error(response, 400)


def test_body_that_is_not_an_object(stack):
    assert_openai_error(post(stack, "/chat/completions", json=[1, 2, 3]), 400)


def test_unknown_model(stack):
    response = post(stack, "/chat/completions", json={"model": "gpt-17", "messages": CHAT})
    assert_openai_error(response, 404, "model")
    assert response.json()["error"]["code"] == "model_not_found"


def test_prompt_longer_than_the_context(stack):
    response = post(stack, "/completions", json={"model": stack.model_name, "prompt": "hello " * 5000})
    assert_openai_error(response, 400)
    assert "context length" in response.json()["error"]["message"]


def test_prompt_plus_max_tokens_over_the_context(stack):
    response = post(stack, "/completions", json={"model": stack.model_name, "prompt": "hello " * 1000,
                                                 "max_tokens": 1500})
    assert_openai_error(response, 400, "max_tokens")


@pytest.mark.parametrize("max_tokens", [0, -5])
def test_max_tokens_not_positive(stack, max_tokens):
    response = post(stack, "/chat/completions", json={"model": stack.model_name, "messages": CHAT,
                                                      "max_tokens": max_tokens})
    assert_openai_error(response, 400, "max_tokens")


def test_max_tokens_too_large(stack):
    response = post(stack, "/chat/completions", json={"model": stack.model_name, "messages": CHAT,
                                                      "max_tokens": 10**9})
    assert_openai_error(response, 400, "max_tokens")


@pytest.mark.parametrize("field,value", [
    ("max_tokens", "ten"), ("temperature", "hot"), ("messages", "hello"), ("stream", "yes"),
    ("messages", [{"role": "user", "content": 42}]), ("messages", [{"content": "no role"}]),
])
def test_wrong_types(stack, field, value):
    body = {"model": stack.model_name, "messages": CHAT, field: value}
    assert_openai_error(post(stack, "/chat/completions", json=body), 400)


@pytest.mark.parametrize("field,value", [("stop", [""]), ("stop", ""), ("seed", 2**64)])
def test_values_the_engine_would_refuse(stack, field, value):
    body = {"model": stack.model_name, "messages": CHAT, field: value}
    assert_openai_error(post(stack, "/chat/completions", json=body), 400, field)


def test_missing_model(stack):
    assert_openai_error(post(stack, "/chat/completions", json={"messages": CHAT}), 400, "model")


def test_empty_messages(stack):
    response = post(stack, "/chat/completions", json={"model": stack.model_name, "messages": []})
    assert_openai_error(response, 400, "messages")


def test_empty_prompt(stack):
    assert_openai_error(post(stack, "/completions", json={"model": stack.model_name, "prompt": ""}), 400)


def test_n_greater_than_one(stack):
    response = post(stack, "/chat/completions", json={"model": stack.model_name, "messages": CHAT, "n": 2})
    assert_openai_error(response, 400, "n")


def test_temperature_out_of_range(stack):
    response = post(stack, "/chat/completions", json={"model": stack.model_name, "messages": CHAT,
                                                      "temperature": 7})
    assert_openai_error(response, 400, "temperature")


def test_still_serving_after_bad_input(stack):
    response = post(stack, "/chat/completions", json={"model": stack.model_name, "max_tokens": 16,
                                                      "temperature": 0,
                                                      "messages": [{"role": "user",
                                                                    "content": "What is the capital of France?"}]})
    assert response.status_code == 200
    assert "Paris" in response.json()["choices"][0]["message"]["content"]


def test_grpc_bad_input_is_invalid_argument(stack, grpc_channel):
    stub = inference_pb2_grpc.InferenceStub(grpc_channel)
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(inference_pb2.GenerateRequest(
            model=stack.model_name, prompt="hi", sampling=common_pb2.SamplingParams(max_tokens=10**9)), timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(inference_pb2.GenerateRequest(model="nope", prompt="hi"), timeout=30))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(inference_pb2.GenerateRequest(model=stack.model_name), timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
