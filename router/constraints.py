"""Constraints a request carries: the labels a worker must have to serve it
(data residency: ``x-baton-require: region=eu`` on HTTP, a field on gRPC)
and the client's deadline (gRPC). They travel from the API layer to the
pipeline with the request's task, in context variables, because vLLM's
frontend sits between the two and knows nothing of them."""

from __future__ import annotations

import contextvars
import time

from baton.registry import parse_labels
from router.http_errors import send_error

REQUIRE_HEADER = "x-baton-require"

_required: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("baton_required_labels",
                                                                                  default=None)


_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("baton_deadline", default=None)


def within(seconds: float | None) -> None:
    """The request being handled must end within ``seconds`` (None: the
    router's own request timeout only)."""
    _deadline.set(None if seconds is None else time.monotonic() + seconds)


def deadline() -> float | None:
    """When the client's deadline passes, on ``time.monotonic()``'s clock."""
    return _deadline.get()


def require(labels: dict[str, str]) -> contextvars.Token:
    return _required.set(dict(labels))


def release(token: contextvars.Token) -> None:
    _required.reset(token)


def required_labels() -> dict[str, str]:
    """The labels the request being handled requires (none: any worker)."""
    return dict(_required.get() or {})


def parse_header(value: str) -> dict[str, str]:
    """Raises ValueError with a message for the client."""
    try:
        return parse_labels(value)
    except ValueError as exc:
        raise ValueError(f"{REQUIRE_HEADER}: {exc}; expected key=value[,key=value]") from None


class RequireLabels:
    """ASGI middleware around the HTTP app: the request's ``x-baton-require``
    holds for everything its handling does, streaming included; a malformed
    one gets vLLM's 400 error body before anything runs."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        header = None
        if scope["type"] == "http":
            for name, value in scope.get("headers", ()):
                if name.decode("latin-1").lower() == REQUIRE_HEADER:
                    header = value.decode("latin-1")
        if header is None:
            return await self.app(scope, receive, send)
        try:
            labels = parse_header(header)
        except ValueError as exc:
            await send_error(send, 400, str(exc), "BadRequestError", 400, param=REQUIRE_HEADER)
            return
        token = require(labels)
        try:
            await self.app(scope, receive, send)
        finally:
            release(token)
