"""The router's door: with API keys configured, every request but health
and version probes must present a valid key (Prometheus too: /metrics names
the keys and their usage) (HTTP 401 / gRPC
UNAUTHENTICATED otherwise, OpenAI's error body), and a generation must
pass its key's limits (HTTP 429 / RESOURCE_EXHAUSTED, with Retry-After).
The key holds for the request's task (a context variable), so the pipeline
charges the tokens it served to it when the request ends. Usage per key is
in the router's metrics; the key itself never is."""

from __future__ import annotations

import contextvars
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge

from baton.logs import get_logger
from router.admission import generates
from router.api_keys import ApiKey, KeyRing, bearer
from router.http_errors import send_error
from router.key_limits import KeyLimiter, Refusal

log = get_logger(__name__)

OPEN_PATHS = frozenset({"/health", "/ping", "/version"})  # probes need no key; /metrics does (key names, usage)

_current: contextvars.ContextVar[tuple[KeyGuard, ApiKey] | None] = contextvars.ContextVar("baton_api_key",
                                                                                          default=None)


def charge(tokens: int) -> None:
    """Charge ``tokens`` to the key of the request being served (if any)."""
    held = _current.get()
    if held is not None:
        guard, key = held
        guard.charge(key, tokens)


class KeyGuard:
    def __init__(self, ring: KeyRing, clock: Callable[[], float], registry: CollectorRegistry | None = None):
        self.ring = ring
        self._clock = clock
        self._limiter = KeyLimiter()
        self.requests = Counter("baton_api_key_requests", "Requests per API key by outcome: admitted, or the limit "
                                "that refused it", ["key", "outcome"], registry=registry)
        self.tokens = Counter("baton_api_key_tokens", "Tokens (prompt + generated) served per API key", ["key"],
                              registry=registry)
        self.streams = Gauge("baton_api_key_streams", "Generation requests in progress per API key", ["key"],
                             registry=registry)
        self.unauthorized = Counter("baton_api_key_unauthorized", "Requests refused for a missing or unknown key",
                                    registry=registry)

    @property
    def enabled(self) -> bool:
        return self.ring.enabled

    def authenticate(self, authorization: str) -> ApiKey | None:
        key = self.ring.find(bearer(authorization))
        if key is None:
            self.unauthorized.inc()
        return key

    def enter(self, key: ApiKey) -> Refusal | None:
        refusal = self._limiter.enter(key, self._clock())
        self.requests.labels(key.name, refusal.limit if refusal else "admitted").inc()
        if refusal is None:
            self.streams.labels(key.name).inc()
        else:
            log.warning("api key limited", key=key.name, limit=refusal.limit, retry_after_s=refusal.retry_after_s)
        return refusal

    def leave(self, key: ApiKey) -> None:
        self._limiter.leave(key)
        self.streams.labels(key.name).dec()

    def charge(self, key: ApiKey, tokens: int) -> None:
        self._limiter.charge(key, tokens, self._clock())
        self.tokens.labels(key.name).inc(tokens)

    def hold(self, key: ApiKey) -> contextvars.Token:
        return _current.set((self, key))

    @staticmethod
    def release(token: contextvars.Token) -> None:
        _current.reset(token)


UNAUTHORIZED_MESSAGE = ("Incorrect or missing API key. Send it as 'Authorization: Bearer <key>' "
                        "(the openai SDK's api_key).")


class RequireApiKey:
    """ASGI: the HTTP side of ``KeyGuard`` (passes everything through when
    no key is configured)."""

    def __init__(self, app, guard: KeyGuard):
        self._app = app
        self._guard = guard

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self._guard.enabled or scope["path"] in OPEN_PATHS:
            return await self._app(scope, receive, send)
        authorization = ""
        for name, value in scope.get("headers", ()):
            if name.lower() == b"authorization":
                authorization = value.decode("latin-1")
        key = self._guard.authenticate(authorization)
        if key is None:
            return await send_error(send, 401, UNAUTHORIZED_MESSAGE, "invalid_request_error", "invalid_api_key",
                                    [(b"www-authenticate", b'Bearer realm="baton"')])
        if not generates(scope):
            return await self._app(scope, receive, send)
        refusal = self._guard.enter(key)
        if refusal is not None:
            return await send_error(send, 429, refusal.message, "rate_limit_exceeded", 429,
                                    [(b"retry-after", str(refusal.retry_after_s).encode())])
        token = self._guard.hold(key)
        try:
            await self._app(scope, receive, send)
        finally:
            self._guard.release(token)
            self._guard.leave(key)
