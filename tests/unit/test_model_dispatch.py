"""The router's HTTP dispatch over several models' frontends (fake ASGI apps)."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

from router.model_dispatch import ModelDispatch


class FakeFrontend:
    """Answers with its name and the body it received; lists one model card."""

    def __init__(self, name: str):
        self.name = name
        card = SimpleNamespace(model_dump=lambda: {"id": name, "object": "model"})

        async def show_available_models():
            return SimpleNamespace(data=[card])

        self.state = SimpleNamespace(openai_serving_models=SimpleNamespace(
            show_available_models=show_available_models))

    async def __call__(self, scope, receive, send):
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        payload = json.dumps({"frontend": self.name, "body": body.decode()}).encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": payload})


def call(app, method: str, path: str, chunks: list[bytes] = ()) -> tuple[int, dict]:
    pending = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    sent = []

    async def receive():
        return pending.pop(0) if pending else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    asyncio.run(app({"type": "http", "method": method, "path": path, "headers": []}, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, json.loads(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))


def dispatch(live=("a", "b")) -> ModelDispatch:
    return ModelDispatch({"a": FakeFrontend("a"), "b": FakeFrontend("b")}, lambda: set(live))


def test_a_request_goes_to_the_frontend_of_the_model_it_names_with_its_whole_body():
    body = json.dumps({"model": "b", "prompt": "x" * 1000}).encode()
    status, answer = call(dispatch(), "POST", "/v1/completions", [body[:300], body[300:]])
    assert status == 200 and answer == {"frontend": "b", "body": body.decode()}


def test_no_model_or_a_body_that_is_not_json_goes_to_the_default_frontend():
    assert call(dispatch(), "POST", "/v1/completions", [b'{"prompt": "hi"}'])[1]["frontend"] == "a"
    assert call(dispatch(), "POST", "/v1/completions", [b"not json"])[1]["frontend"] == "a"
    assert call(dispatch(), "GET", "/health")[1]["frontend"] == "a"


def test_an_unknown_model_gets_openais_404_naming_every_served_model():
    status, answer = call(dispatch(), "POST", "/v1/chat/completions", [b'{"model": "zzz", "messages": []}'])
    assert status == 404
    assert answer["error"]["type"] == "NotFoundError" and answer["error"]["param"] == "model"
    assert "`zzz`" in answer["error"]["message"] and "a, b" in answer["error"]["message"]


def test_models_lists_only_models_with_a_live_worker():
    assert [c["id"] for c in call(dispatch(), "GET", "/v1/models")[1]["data"]] == ["a", "b"]
    assert [c["id"] for c in call(dispatch(live=("b",)), "GET", "/v1/models")[1]["data"]] == ["b"]
    assert call(dispatch(live=()), "GET", "/v1/models")[1] == {"object": "list", "data": []}


def test_one_model_passes_every_request_through_unread():
    single = ModelDispatch({"a": FakeFrontend("a")}, lambda: {"a"})
    assert call(single, "POST", "/v1/completions", [b'{"model": "zzz"}'])[1]["frontend"] == "a"
