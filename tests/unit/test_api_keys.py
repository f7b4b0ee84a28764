"""API keys, their limits and the router's request limits, as pure logic
and as ASGI middleware around a stand-in app (the real router is in
tests/e2e/test_api_keys.py)."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from baton.config import load_settings
from router.api_keys import ApiKey, KeyLimits, KeyRing, bearer, digest, new_key
from router.key_guard import KeyGuard, RequireApiKey, charge
from router.key_limits import KeyLimiter, TokenBucket
from router.request_limits import RequestLimits, too_many_tokens


def write_keys(tmp_path, text: str) -> str:
    path = tmp_path / "keys.toml"
    path.write_text(text)
    return str(path)


def test_a_keys_file_holds_digests_and_limits(tmp_path):
    key, sha = new_key()
    path = write_keys(tmp_path, f'[keys.team-a]\nsha256 = "{sha}"\nrequests_per_minute = 5\n')
    ring = KeyRing.load(path, f"ops:{digest('other')}", KeyLimits(tokens_per_minute=100))
    assert len(ring) == 2
    found = ring.find(key)
    assert found.name == "team-a"
    assert found.limits == KeyLimits(requests_per_minute=5, tokens_per_minute=100)  # the default fills the rest
    assert ring.find("other").name == "ops"
    assert ring.find("wrong") is None and ring.find("") is None
    assert key not in (tmp_path / "keys.toml").read_text()


@pytest.mark.parametrize("text, named", [
    ('[keys.a]\nsha256 = "bk-plaintext-key"\n', "keys.a: sha256 must be 64 hex digits"),
    ('[keys.a]\nrequests_per_minute = 1\n', "keys.a: needs sha256"),
    (f'[keys.a]\nsha256 = "{"0" * 64}"\nrequests_per_minit = 1\n', "keys.a: unknown fields ['requests_per_minit']"),
    (f'[keys.a]\nsha256 = "{"0" * 64}"\nconcurrent_streams = -1\n', "keys.a.concurrent_streams: must be"),
    (f'[keys.a]\nsha256 = "{"0" * 64}"\n[keys.b]\nsha256 = "{"0" * 64}"\n', "the same key as 'a'"),
    ('[key.a]\nsha256 = "x"\n', "unknown tables ['key']"),
    ("# no key yet\n", "configured but no key"),  # an empty Secret must not leave the API open
])
def test_a_bad_keys_file_is_refused_naming_the_field(tmp_path, text, named):
    path = write_keys(tmp_path, text)
    with pytest.raises(ValueError, match="api_keys_file") as refused:
        load_settings({"api_keys_file": path}, env={})
    assert named in str(refused.value)


@pytest.mark.parametrize("overrides, named", [
    ({"api_keys": "no-digest"}, "api_keys: 'no-digest' is not NAME:SHA256"),
    ({"key_requests_per_minute": -1}, "key_requests_per_minute must be >= 0"),
    ({"stream_write_timeout_s": -2.0}, "stream_write_timeout_s must be >= 0"),
    ({"max_tokens_cap": "many"}, "setting max_tokens_cap='many'"),
])
def test_bad_key_and_limit_settings_are_refused_naming_the_field(overrides, named):
    with pytest.raises(ValueError) as refused:
        load_settings(overrides, env={})
    assert named in str(refused.value)


def test_bearer_reads_the_openai_sdk_header():
    assert bearer("Bearer bk-1") == "bk-1"
    assert bearer("bearer  bk-1 ") == "bk-1"
    assert bearer("Basic abc") == "" and bearer("") == ""


def test_a_token_bucket_allows_a_burst_then_refills_steadily():
    bucket = TokenBucket(60, now=0.0)  # one a second
    for _ in range(60):
        assert bucket.wait_s(1, 0.0) == 0
        bucket.take(1, 0.0)
    assert bucket.wait_s(1, 0.0) == pytest.approx(1.0)
    assert bucket.wait_s(1, 1.0) == 0
    assert bucket.wait_s(1, 1000.0) == 0 and bucket.level == 60  # never above a minute's worth


def key(**limits) -> ApiKey:
    return ApiKey("k", "0" * 64, KeyLimits(**limits))


def test_requests_per_minute_refuse_with_the_wait():
    limiter, k = KeyLimiter(), key(requests_per_minute=2)
    assert limiter.enter(k, 0.0) is None and limiter.enter(k, 0.0) is None
    refusal = limiter.enter(k, 1.0)
    assert refusal.limit == "requests_per_minute" and refusal.retry_after_s == 29  # 1 per 30 s, 1 s gone
    assert limiter.enter(k, 31.0) is None


def test_tokens_are_charged_when_a_request_ends_and_debt_refuses():
    limiter, k = KeyLimiter(), key(tokens_per_minute=600)  # 10 a second
    assert limiter.enter(k, 0.0) is None
    limiter.charge(k, 700, 0.0)  # the request ran to its end: 100 in debt
    limiter.leave(k)
    refusal = limiter.enter(k, 0.0)
    assert refusal.limit == "tokens_per_minute" and refusal.retry_after_s == 11
    assert limiter.enter(k, 11.0) is None


def test_concurrent_streams_are_counted_until_they_end():
    limiter, k = KeyLimiter(), key(concurrent_streams=1)
    assert limiter.enter(k, 0.0) is None
    assert limiter.enter(k, 0.0).limit == "concurrent_streams"
    limiter.leave(k)
    assert limiter.enter(k, 0.0) is None


def test_too_many_tokens_names_the_field_whatever_the_numbers_form():
    assert too_many_tokens({"max_tokens": 65}, 64) == "max_tokens is 65, above this server's limit of 64 tokens per request."
    assert "max_completion_tokens" in too_many_tokens({"max_completion_tokens": 100}, 64)
    for sneaky in ("100000", 1e5, 64.5):  # vLLM's request models coerce these to ints
        assert too_many_tokens({"max_tokens": sneaky}, 64), sneaky
    assert too_many_tokens({"max_tokens": 64}, 64) == "" and too_many_tokens({}, 64) == ""
    assert too_many_tokens({"max_tokens": "many"}, 64) == ""  # vLLM refuses that itself


# --- the middleware, around a stand-in app ---------------------------------

async def echo_app(scope, receive, send):
    """Charges 5 tokens, answers the body it read."""
    body = (await receive())["body"]
    charge(5)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": body})


def guarded(app, ring: KeyRing, now=lambda: 0.0, **limits) -> tuple:
    guard = KeyGuard(ring, now)
    options = {"max_body_bytes": 1000, "max_tokens_cap": 64, "write_timeout_s": 0.2, **limits}
    return RequireApiKey(RequestLimits(app, **options), guard), guard


def call(app, path="/v1/completions", body=None, headers=None):
    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://router") as client:
            if body is None:
                return await client.get(path, headers=headers)
            return await client.post(path, content=body, headers=headers)

    return asyncio.run(go())


def test_without_a_valid_key_the_answer_is_401_in_openais_shape():
    ring = KeyRing([ApiKey("a", digest("bk-good"), KeyLimits())])
    app, guard = guarded(echo_app, ring)
    for headers in (None, {"Authorization": "Bearer bk-bad"}, {"Authorization": "bk-good"}):
        response = call(app, body=b"{}", headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
        assert response.headers["www-authenticate"].startswith("Bearer")
    assert call(app, "/v1/models", headers={"Authorization": "Bearer bk-bad"}).status_code == 401
    assert call(app, "/metrics").status_code == 401  # it names the keys and their usage
    assert call(app, "/health").status_code == 200  # probes need no key
    assert call(app, body=b"{}", headers={"Authorization": "Bearer bk-good"}).status_code == 200
    assert guard.tokens.labels("a")._value.get() == 5


def test_a_key_over_its_limit_gets_429_with_retry_after():
    ring = KeyRing([ApiKey("a", digest("bk-a"), KeyLimits(requests_per_minute=1))])
    app, guard = guarded(echo_app, ring)
    auth = {"Authorization": "Bearer bk-a"}
    assert call(app, body=b"{}", headers=auth).status_code == 200
    refused = call(app, body=b"{}", headers=auth)
    assert refused.status_code == 429 and refused.headers["retry-after"] == "60"
    assert refused.json()["error"]["type"] == "rate_limit_exceeded"
    assert guard.requests.labels("a", "requests_per_minute")._value.get() == 1
    # vLLM's other generation routes count too; tokenizing does not.
    assert call(app, "/v1/chat/completions/batch", body=b"{}", headers=auth).status_code == 429
    assert call(app, "/invocations", body=b"{}", headers=auth).status_code == 429
    assert call(app, "/tokenize", body=b"{}", headers=auth).status_code == 200


def test_no_keys_configured_lets_everything_through():
    app, _ = guarded(echo_app, KeyRing([]))
    assert call(app, body=b'{"prompt": "hi"}').text == '{"prompt": "hi"}'


def test_a_body_over_the_limit_is_413_and_a_length_over_the_cap_400():
    app, _ = guarded(echo_app, KeyRing([]))
    too_big = call(app, body=b"x" * 1001)
    assert too_big.status_code == 413 and "1000 bytes" in too_big.json()["error"]["message"]
    over_cap = call(app, "/v1/chat/completions", body=json.dumps({"max_tokens": 65}).encode())
    assert over_cap.status_code == 400 and "limit of 64 tokens" in over_cap.json()["error"]["message"]
    assert call(app, "/invocations", body=json.dumps({"max_tokens": "1e5"}).encode()).status_code == 400
    assert call(app, body=json.dumps({"max_tokens": 64}).encode()).status_code == 200


def test_a_client_that_stops_reading_has_its_answer_closed_after_the_write_timeout():
    """As vLLM streams: a Starlette StreamingResponse over an async
    generator. The stalled write counts as a disconnect, the stream stops
    and the generator is closed (where vLLM aborts the request)."""
    from starlette.responses import StreamingResponse

    closed = asyncio.Event()

    async def tokens():
        try:
            while True:
                yield b"data: token\n\n"
        finally:
            closed.set()

    async def streaming_app(scope, receive, send):
        await receive()
        await StreamingResponse(tokens(), media_type="text/event-stream")(scope, receive, send)

    async def go():
        app, _ = guarded(streaming_app, KeyRing([]))
        sent = 0

        async def stalled_send(message):
            nonlocal sent
            sent += 1
            if sent > 3:
                await asyncio.Event().wait()  # the client's window is full: never drains

        async def receive():
            await asyncio.Event().wait()  # the client never disconnects either

        async def first_receive():
            first_receive.calls += 1
            if first_receive.calls == 1:
                return {"type": "http.request", "body": b"{}", "more_body": False}
            return await receive()

        first_receive.calls = 0
        started = asyncio.get_running_loop().time()
        await asyncio.wait_for(app({"type": "http", "method": "POST", "path": "/v1/completions", "headers": []},
                                   first_receive, stalled_send), 5)
        await asyncio.wait_for(closed.wait(), 5)
        return asyncio.get_running_loop().time() - started

    assert asyncio.run(go()) < 2  # the 0.2 s write timeout, not the 5 s fallback
