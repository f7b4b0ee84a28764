"""Where an HTTP request enters Baton. Its server span starts the request's
trace, or joins the caller's (a gateway's, an application's) when the
request carries W3C ``traceparent``/``tracestate`` headers. It gets an
``X-Request-Id``, the caller's or a new one, returned on the response (vLLM's
frontend takes it into the request's id, so logs and spans carry it). Its
arrival time starts the clock of the latency metrics."""

from __future__ import annotations

import time
import uuid

from opentelemetry import trace

from baton.telemetry import extract_context, tracer
from router.metrics import arrival_s

_tracer = tracer("baton.router.http")
_REQUEST_ID = b"x-request-id"


class HttpEntry:
    """ASGI middleware; outermost, so refused requests are traced too."""

    def __init__(self, app):
        self._app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self._app(scope, receive, send)
        arrival_s.set(time.monotonic())
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        request_id = headers.get("x-request-id", "").strip()
        if not request_id:
            request_id = uuid.uuid4().hex
            scope = {**scope, "headers": [*scope["headers"], (_REQUEST_ID, request_id.encode())]}
        method, path = scope["method"], scope["path"]
        attributes = {"http.request.method": method, "url.path": path, "baton.request_id": request_id}
        if scope.get("client"):
            attributes["client.address"] = scope["client"][0]
        with _tracer.start_as_current_span(f"{method} {path}", context=extract_context(headers),
                                           kind=trace.SpanKind.SERVER, attributes=attributes) as span:

            async def send_with_id(message):
                if message["type"] == "http.response.start":
                    status = message["status"]
                    span.set_attribute("http.response.status_code", status)
                    if status >= 500:
                        span.set_status(trace.Status(trace.StatusCode.ERROR))
                    message = {**message, "headers": [*message.get("headers", ()), (_REQUEST_ID, request_id.encode())]}
                await send(message)

            await self._app(scope, receive, send_with_id)
