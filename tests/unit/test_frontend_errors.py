"""vLLM's OpenAI server over the cluster engine core, with a stand-in
pipeline: a failure before the first token is an HTTP error with its status,
a failure mid-stream is an error event that ends the stream, and the router
goes on serving."""

import json

import httpx
import pytest

from baton.errors import RetryableError
from baton.model_store import DEFAULT_MODEL_NAME, ensure_default_model
from baton.v1 import common_pb2
from router.pipeline import Step


class FakePipeline:
    """Answers "fail-early" with an error, "fail-late" with one token then an
    error, anything else with three tokens."""

    async def generate(self, request):
        params = request.params
        if params.max_tokens == 5:  # "fail-early"
            raise RetryableError("no prefill worker can take the request")
        yield Step(common_pb2.GeneratedTokens(token_ids=[504]))
        if params.max_tokens == 6:  # "fail-late"
            raise RetryableError("decode worker decode-0: Socket closed")
        yield Step(common_pb2.GeneratedTokens(token_ids=[3575, 282],
                                              finish_reason=common_pb2.FINISH_REASON_LENGTH))


@pytest.fixture(scope="module")
async def app():
    from router.engine_client import BatonEngineClient, frontend_args
    from router.engine_core import ClusterEngineCore
    from router.http_api import create_app

    args = frontend_args(str(ensure_default_model()), DEFAULT_MODEL_NAME, 2048, "127.0.0.1", 0)
    engine = BatonEngineClient(args, ClusterEngineCore(FakePipeline()))
    app = await create_app(engine, args)
    app.state.baton_engine = engine
    yield app
    engine.shutdown()


def body(max_tokens: int, stream: bool) -> dict:
    return {"model": DEFAULT_MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": max_tokens, "stream": stream}


async def test_errors_reach_the_client_and_the_router_goes_on(app):
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router") as client:
        early = await client.post("/v1/chat/completions", json=body(5, stream=False))
        assert early.status_code == 503 and "no prefill worker" in early.json()["error"]["message"]

        late = await client.post("/v1/chat/completions", json=body(6, stream=True))
        events = [line[len("data: "):] for line in late.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        payloads = [json.loads(e) for e in events[:-1]]
        assert any(p.get("choices") for p in payloads), "the first token was streamed"
        assert "Socket closed" in payloads[-1]["error"]["message"], "the stream ends with an error event"

        ok = await client.post("/v1/chat/completions", json=body(3, stream=False))
        assert ok.status_code == 200
        assert ok.json()["choices"][0]["message"]["content"] == "The capital of"

        # n = 2 where one answer fails: the request fails, and nothing of it stays behind.
        both = await client.post("/v1/chat/completions", json={**body(6, stream=False), "n": 2})
        assert both.status_code == 503
        assert (await client.get("/kv_event_sources")).status_code == 200
    import asyncio

    await asyncio.sleep(0.1)
    engine = app.state.baton_engine
    assert engine.output_processor.request_states == {}, "failed requests must not stay registered"
    assert engine.engine_core._running == {}
