"""Several models behind one HTTP port: each model has its own vLLM OpenAI
frontend (its tokenizer, chat template, generation defaults), and a request
goes to the frontend of the model its JSON body names, as a multi-model
`vllm serve` deployment behind a gateway would route it. A body that names
no model (vLLM allows that) or one nobody serves goes to the first frontend,
which answers as `vllm serve` does (its default model); one naming a model
nobody serves gets vLLM's 404 body, listing every model served.
``/v1/models`` lists the models that have a live worker."""

from __future__ import annotations

import json
from collections.abc import Callable

MODELS_PATH = "/v1/models"


class ModelDispatch:
    def __init__(self, apps: dict[str, object], live_models: Callable[[], set[str]]):
        """``apps``: model name → its frontend (ASGI app), the default first."""
        self._apps = apps
        self._default = next(iter(apps.values()))
        self._live_models = live_models

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self._default(scope, receive, send)
        if scope["path"] == MODELS_PATH and scope["method"] == "GET":
            return await self._list_models(send)
        if scope["method"] != "POST" or len(self._apps) == 1:
            return await self._default(scope, receive, send)
        messages, body = [], b""
        while True:  # the whole body: its `model` decides where it goes
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        named = _named_model(body)
        if named and named not in self._apps:
            return await _send_json(send, 404, {"error": {
                "message": f"The model `{named}` does not exist. Valid models: {', '.join(self._apps)}.",
                "type": "NotFoundError", "param": "model", "code": 404}})
        app = self._apps.get(named, self._default)

        async def replay():
            return messages.pop(0) if messages else await receive()

        await app(scope, replay, send)

    async def _list_models(self, send) -> None:
        live = self._live_models()
        cards = []
        for name, app in self._apps.items():
            if name in live:
                listed = await app.state.openai_serving_models.show_available_models()
                cards.extend(card.model_dump() for card in listed.data)
        await _send_json(send, 200, {"object": "list", "data": cards})


async def _send_json(send, status: int, content: dict) -> None:
    body = json.dumps(content).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _named_model(body: bytes) -> str | None:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None  # the default frontend gives vLLM's error body
    model = data.get("model") if isinstance(data, dict) else None
    return model if isinstance(model, str) else None
