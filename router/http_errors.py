"""OpenAI-style error responses written straight to ASGI, for the router's
middleware that answers before vLLM's app runs."""

from __future__ import annotations

import json


async def send_error(send, status: int, message: str, kind: str, code, headers=(), param: str | None = None) -> None:
    body = json.dumps({"error": {"message": message, "type": kind, "param": param, "code": code}}).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})
