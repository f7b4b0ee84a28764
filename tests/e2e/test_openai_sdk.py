"""The official openai SDK, unmodified, against the router."""

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.e2e.prompts import CAPITAL_QUESTION

QUESTION = [{"role": "user", "content": CAPITAL_QUESTION}]


def test_chat_completion(openai_client, stack):
    reply = openai_client.chat.completions.create(model=stack.model_name, messages=QUESTION,
                                                  temperature=0, max_tokens=32)
    assert "Paris" in reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.prompt_tokens > 0 and reply.usage.completion_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_chat_completion_streaming(openai_client, stack):
    stream = openai_client.chat.completions.create(
        model=stack.model_name, messages=QUESTION, temperature=0, max_tokens=32, stream=True,
        stream_options={"include_usage": True})
    pieces, reasons, usage = [], [], None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            reasons.append(choice.finish_reason)
    text = "".join(pieces)
    assert "Paris" in text
    assert len([p for p in pieces if p]) > 3, "tokens must arrive as separate chunks"
    assert reasons[-1] == "stop"
    assert usage is not None and usage.completion_tokens >= len([p for p in pieces if p])


def test_completions(openai_client, stack):
    reply = openai_client.completions.create(model=stack.model_name, prompt="The capital of France is",
                                             temperature=0, max_tokens=5)
    assert "Paris" in reply.choices[0].text
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 5


def test_completions_streaming(openai_client, stack):
    stream = openai_client.completions.create(model=stack.model_name, prompt="The capital of France is",
                                              temperature=0, max_tokens=5, stream=True)
    text = "".join(c.choices[0].text for c in stream if c.choices)
    assert "Paris" in text


def test_two_concurrent_requests(openai_client, stack):
    def ask(question):
        return openai_client.chat.completions.create(
            model=stack.model_name, temperature=0, max_tokens=24,
            messages=[{"role": "user", "content": question}]).choices[0].message.content

    with ThreadPoolExecutor(2) as pool:
        paris, colors = pool.map(ask, [CAPITAL_QUESTION, "Name three primary colors."])
    assert "Paris" in paris
    assert any(c in colors.lower() for c in ("red", "blue", "yellow"))


def test_models(openai_client, stack):
    assert [m.id for m in openai_client.models.list()] == [stack.model_name]


def test_stop_sequence(openai_client, stack):
    reply = openai_client.chat.completions.create(model=stack.model_name, messages=QUESTION, temperature=0,
                                                  max_tokens=32, stop=["Paris"])
    content = reply.choices[0].message.content
    assert content.startswith("The capital of France is") and "Paris" not in content
    assert reply.choices[0].finish_reason == "stop"


def test_seed_makes_sampling_repeatable(openai_client, stack):
    def sample(seed):
        return openai_client.completions.create(
            model=stack.model_name, prompt="Once upon a time", temperature=1.0, top_p=0.9, seed=seed,
            max_tokens=16).choices[0].text

    first = sample(1234)
    assert sample(1234) == first
    assert len({first, sample(1), sample(2)}) > 1, "different seeds should not all sample the same text"


@pytest.mark.parametrize("read_chunks", [1, 2, 5, 12])
def test_a_client_that_goes_away_cancels_its_decode(stack, read_chunks):
    import httpx

    from tests.e2e.conftest import wait_for

    body = {"model": stack.model_name, "messages": QUESTION, "max_tokens": 1500, "ignore_eos": True,
            "stream": True}
    with httpx.stream("POST", f"{stack.http_base}/chat/completions", json=body, timeout=60) as response:
        chunks = 0
        for line in response.iter_lines():
            if line.startswith("data: {"):
                request_id = json.loads(line[6:])["id"]
                chunks += 1
            if chunks >= read_chunks:
                break  # leaving the block closes the connection

    transfer_id = ""

    def records(log_name: str, event: str) -> list[dict]:
        lines = (stack.log_dir / log_name).read_text(errors="replace").splitlines()
        parsed = [json.loads(line) for line in lines if line.startswith("{") and f'"{event}"' in line]
        return [r for r in parsed if ours(r) or r.get("transfer_id") == transfer_id]

    def ours(record: dict) -> bool:  # engine requests are "<response id>-<suffix>"
        return str(record.get("request_id", "")).startswith(request_id)

    time.sleep(2)
    placed = [r for r in records("control-plane.log", "placed") if ours(r)]
    if not placed:  # gone before the router even asked for a placement
        assert not [r for r in records("prefill-0.log", "prefill done") if ours(r)]
        return
    transfer_id = placed[0]["transfer_id"]
    # The router closes the transfer as failed: the request did not complete.
    (closed,) = wait_for(lambda: records("control-plane.log", "transfer closed"), 30, "the transfer to close")
    assert closed["state"] == "failed"
    # Depending on when the client left, the decode worker was cancelled
    # mid-stream or never started; either way it did not run on.
    for record in records("decode-0.log", "decode cancelled"):
        assert record["tokens"] < 1400, "the decode ran on after its client left"
    time.sleep(2)
    assert not [r for r in records("decode-0.log", "decode done") if ours(r)]
    from tests.e2e.test_kv_transfer import _inbox_stats

    wait_for(lambda: _inbox_stats(stack).inbox_bytes == 0, 10, "the request's received KV to be freed")


def test_the_first_chunk_waits_for_the_first_token_and_carries_it(stack, tokenizer):
    """By order, not timing: when the client holds the first SSE chunk, the
    router has already logged the prefill worker's first token; that chunk
    carries the role (as vLLM's does, written with the first token's chunk)
    and the first text is that token's."""
    import httpx

    body = {"model": stack.model_name, "messages": QUESTION, "max_tokens": 8, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{stack.http_base}/chat/completions", json=body, timeout=120) as response:
        lines = (line for line in response.iter_lines() if line.startswith("data: {"))
        first = json.loads(next(lines)[len("data: "):])
        router_log = (stack.log_dir / "router.log").read_text(errors="replace").splitlines()
        rest = list(lines)
    records = [json.loads(line) for line in router_log if line.startswith("{") and "first token from prefill" in line]
    (record,) = [r for r in records if str(r.get("request_id", "")).startswith(first["id"])]
    assert first["choices"][0]["delta"]["role"] == "assistant"
    texts = [first["choices"][0]["delta"].get("content")]
    texts += [c["delta"].get("content") for line in rest for c in json.loads(line[len("data: "):])["choices"]]
    first_text = next(t for t in texts if t)
    assert first_text == tokenizer.decode([record["token_id"]])
    assert len([t for t in texts if t]) > 1, "the answer goes on after the first token"
