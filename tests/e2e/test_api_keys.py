"""API keys and the limits that protect the engines, through a second router
beside the shared stack's, configured as an operator would: a keys file of
digests made by `baton api-key`, per-key limits, a body size limit, a cap
on tokens per request and a write timeout. Clients are the openai SDK, raw
HTTP and the gRPC stubs."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time

import grpc
import httpx
import openai
import pytest

from baton.v1 import inference_pb2, inference_pb2_grpc
from tests.e2e.conftest import REPO, baton_command, second_router, wait_for
from tests.e2e.test_metrics import endpoints, scrape_all, value

MAX_TOKENS_CAP = 1000
MAX_MODEL_LEN = 1536  # the guarded router's: below the engines' 2048, it bounds prompts at the door
MAX_BODY_BYTES = 64 << 10
WRITE_TIMEOUT_S = 1.0
TOKENS_PER_MINUTE = 40
LIMITS = {"open": "", "rpm": "requests_per_minute = 2", "tpm": f"tokens_per_minute = {TOKENS_PER_MINUTE}",
          "streams": "concurrent_streams = 1"}


def new_key(name: str, keys_file) -> str:
    made = subprocess.run(baton_command("api-key", name, "--append-to", str(keys_file)), cwd=REPO, check=True,
                          capture_output=True, text=True)
    return made.stdout.strip()


@pytest.fixture(scope="module")
def guarded(stack, tmp_path_factory):
    folder = tmp_path_factory.mktemp("guarded-router")
    keys_file = folder / "keys.toml"
    keys = {name: new_key(name, keys_file) for name in LIMITS}
    text = keys_file.read_text()
    for name, limit in LIMITS.items():  # the operator adds each key's limits under its table
        text = text.replace(f"[keys.{name}]\n", f"[keys.{name}]\n{limit}\n")
    keys_file.write_text(text)
    assert not any(key in text for key in keys.values()), "the keys file must hold digests only"
    log_path = folder / "router.log"
    env = {"BATON_MAX_TOKENS_CAP": str(MAX_TOKENS_CAP), "BATON_MAX_REQUEST_BODY_BYTES": str(MAX_BODY_BYTES),
           "BATON_STREAM_WRITE_TIMEOUT_S": str(WRITE_TIMEOUT_S)}
    with second_router(stack, log_path, env, "--api-keys-file", str(keys_file),
                       "--max-model-len", str(MAX_MODEL_LEN)) as router:
        base = router.http_base.removesuffix("/v1")
        yield {"base": base, "grpc": router.grpc_address, "keys": keys, "log": log_path,
               "port": int(base.rpartition(":")[2])}


def metrics_text(guarded) -> str:
    """The router's /metrics, as Prometheus scrapes it with a key."""
    auth = {"Authorization": f"Bearer {guarded['keys']['open']}"}
    return httpx.get(guarded["base"] + "/metrics", headers=auth, timeout=10).raise_for_status().text


def guarded_samples(guarded):
    from prometheus_client.parser import text_string_to_metric_families

    return [(s.name, s.labels, s.value) for family in text_string_to_metric_families(metrics_text(guarded))
            for s in family.samples]


def client(guarded, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=guarded["base"] + "/v1", api_key=key, timeout=120, max_retries=0)


def chat(guarded, key: str, content: str = "Name a color.", max_tokens: int = 8):
    return client(guarded, key).chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": content}], max_tokens=max_tokens,
        temperature=0)


def test_without_a_valid_key_every_api_refuses(guarded):
    with pytest.raises(openai.AuthenticationError) as refused:
        chat(guarded, "bk-not-a-key")
    assert refused.value.status_code == 401
    assert refused.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client(guarded, "bk-not-a-key").models.list()
    for path, method in (("/v1/chat/completions", "POST"), ("/v1/models", "GET"), ("/tokenize", "POST")):
        no_key = httpx.request(method, guarded["base"] + path, json={"model": "SmolLM2-135M-Instruct"}, timeout=30)
        assert no_key.status_code == 401, (path, no_key.text)
        assert no_key.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(guarded["base"] + "/health").status_code == 200  # probes need no key
    assert httpx.get(guarded["base"] + "/metrics").status_code == 401  # it names keys and their usage
    assert "baton_api_key_unauthorized_total" in metrics_text(guarded)
    with grpc.insecure_channel(guarded["grpc"]) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        for metadata in ((), (("authorization", "Bearer bk-not-a-key"),)):
            with pytest.raises(grpc.RpcError) as refused:
                list(stub.Generate(inference_pb2.GenerateRequest(prompt="Hi"), metadata=metadata, timeout=30))
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as refused:
            stub.ListModels(inference_pb2.ListModelsRequest(), timeout=30)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        answer = list(stub.Generate(inference_pb2.GenerateRequest(
            prompt="The sky is", sampling=inference_pb2.SamplingParams(max_tokens=4)),
            metadata=(("authorization", f"Bearer {guarded['keys']['open']}"),), timeout=120))
        assert sum(len(m.token_ids) for m in answer) == 4


def test_a_valid_key_is_served_and_its_usage_counted(guarded):
    reply = chat(guarded, guarded["keys"]["open"], "Wie heißt die Hauptstadt von Österreich?")
    assert reply.choices[0].message.content and reply.usage.completion_tokens > 0
    samples = guarded_samples(guarded)
    assert value(samples, "baton_api_key_requests_total", key="open", outcome="admitted") >= 1
    assert value(samples, "baton_api_key_tokens_total", key="open") >= reply.usage.total_tokens
    assert guarded["keys"]["open"] not in metrics_text(guarded)


def test_requests_per_minute_refuse_with_retry_after(guarded):
    key = guarded["keys"]["rpm"]
    chat(guarded, key)
    chat(guarded, key)
    with pytest.raises(openai.RateLimitError) as refused:
        chat(guarded, key)
    assert 1 <= int(refused.value.response.headers["retry-after"]) <= 30
    assert "2 requests per minute" in refused.value.message
    chat(guarded, guarded["keys"]["open"])  # another key is not touched


def test_tokens_per_minute_refuse_once_spent(guarded):
    key = guarded["keys"]["tpm"]
    first = chat(guarded, key, "Tell me about the sea.", max_tokens=32)
    assert first.usage.total_tokens > TOKENS_PER_MINUTE  # the request ran whole, into debt
    with pytest.raises(openai.RateLimitError) as refused:
        chat(guarded, key)
    assert int(refused.value.response.headers["retry-after"]) >= 1
    assert f"{TOKENS_PER_MINUTE} tokens per minute" in refused.value.message


def test_concurrent_streams_refuse_a_second_stream(guarded):
    key = guarded["keys"]["streams"]
    started, release = threading.Event(), threading.Event()
    tokens: list[str] = []

    def first_stream():
        stream = client(guarded, key).chat.completions.create(
            model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "Count to fifty."}],
            max_tokens=48, temperature=0, stream=True)
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                tokens.append(chunk.choices[0].delta.content)
                started.set()
                release.wait(60)

    thread = threading.Thread(target=first_stream)
    thread.start()
    assert started.wait(120), "the first stream did not start"
    with pytest.raises(openai.RateLimitError) as refused:
        chat(guarded, key)
    assert refused.value.response.headers["retry-after"] == "1"
    release.set()
    thread.join(120)
    assert len(tokens) > 1
    wait_for(lambda: _streams(guarded, "streams") == 0, 30, "the stream to be counted out")
    assert chat(guarded, key).choices[0].message.content


def _streams(guarded, key_name: str) -> float:
    return value(guarded_samples(guarded), "baton_api_key_streams", key=key_name)


def test_a_body_too_large_is_413_and_a_length_over_the_cap_400(guarded):
    auth = {"Authorization": f"Bearer {guarded['keys']['open']}"}
    body = {"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "x" * MAX_BODY_BYTES}]}
    too_big = httpx.post(guarded["base"] + "/v1/chat/completions", json=body, headers=auth, timeout=60)
    assert too_big.status_code == 413, too_big.text
    assert f"{MAX_BODY_BYTES} bytes" in too_big.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError) as refused:
        chat(guarded, guarded["keys"]["open"], max_tokens=MAX_TOKENS_CAP + 1)
    assert f"limit of {MAX_TOKENS_CAP} tokens" in refused.value.message
    with grpc.insecure_channel(guarded["grpc"]) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            list(inference_pb2_grpc.InferenceStub(channel).Generate(inference_pb2.GenerateRequest(
                prompt="Hi", sampling=inference_pb2.SamplingParams(max_tokens=MAX_TOKENS_CAP + 1)),
                metadata=(("authorization", f"Bearer {guarded['keys']['open']}"),), timeout=60))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    chat(guarded, guarded["keys"]["open"])  # and it goes on serving


def test_a_prompt_longer_than_the_routers_limit_is_refused_before_anything_runs(stack, guarded):
    from tests.e2e.prompts import long_document

    # ~1.7k tokens with the chat template. Its own seed: a prefix shared with the parity
    # prompts would leave their blocks cached, computed in another batch, and flip greedy parity.
    content = long_document(4000, 85) + "\nSummarize."
    with pytest.raises(openai.BadRequestError) as refused:
        chat(guarded, guarded["keys"]["open"], content, max_tokens=4)
    assert "maximum context length" in refused.value.message and str(MAX_MODEL_LEN) in refused.value.message
    # The shared stack's router, with the engines' own limit, takes it.
    reply = openai.OpenAI(base_url=stack.http_base, api_key="unused", timeout=180).chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": content}], max_tokens=4)
    assert MAX_MODEL_LEN < reply.usage.prompt_tokens < 2048


def test_a_request_past_its_deadline_ends_and_frees_the_engines(stack, guarded):
    """The client's gRPC deadline (HTTP requests get REQUEST_TIMEOUT_S, the
    same budget): a 1000-token answer asked within 4 s ends with
    DEADLINE_EXCEEDED, and the engines stop generating it."""
    decode = endpoints(stack)["decode"]
    started = time.monotonic()
    with grpc.insecure_channel(guarded["grpc"]) as channel:
        with pytest.raises(grpc.RpcError) as ended:
            list(inference_pb2_grpc.InferenceStub(channel).Generate(inference_pb2.GenerateRequest(
                prompt="Tell a long story.", sampling=inference_pb2.SamplingParams(
                    max_tokens=MAX_TOKENS_CAP, ignore_eos=True)),
                metadata=(("authorization", f"Bearer {guarded['keys']['open']}"),), timeout=4))
    assert ended.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 10
    wait_for(lambda: value(scrape_all(decode), "vllm:num_requests_running") == 0, 30,
             "the decode engine to stop the request past its deadline")


def test_a_client_that_stops_reading_is_dropped_and_its_requests_freed(stack, guarded):
    """Eight long answers with every token's 20 top logprobs fill the
    socket's buffers within a few hundred tokens; the client never reads.
    The router drops it after the write timeout and the engines stop:
    far fewer than the 8 x 1000 tokens asked are generated, and nothing
    runs on the decode engines after."""
    decode = endpoints(stack)["decode"]
    before = value(scrape_all(decode), "vllm:generation_tokens_total")
    body = json.dumps({"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "Tell a story."}],
                       "max_tokens": MAX_TOKENS_CAP, "ignore_eos": True, "n": 8, "stream": True, "logprobs": True,
                       "top_logprobs": 20, "temperature": 1.0}).encode()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", guarded["port"]))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: router\r\nContent-Type: application/json\r\n"
                 + f"Authorization: Bearer {guarded['keys']['open']}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                 + body)
    try:
        wait_for(lambda: "client stopped reading" in guarded["log"].read_text(), 240, "the router to drop the client")

        def decode_idle() -> bool:
            return value(scrape_all(decode), "vllm:num_requests_running") == 0

        wait_for(decode_idle, 60, "the decode engines to stop the dropped requests")
        time.sleep(2)
        generated = value(scrape_all(decode), "vllm:generation_tokens_total") - before
        assert generated < 8 * MAX_TOKENS_CAP * 0.8, f"{generated} tokens generated: the requests ran on"
        assert decode_idle()
    finally:
        sock.close()
    assert chat(guarded, guarded["keys"]["open"]).choices[0].message.content  # serving goes on
