"""Bounded admission: a router takes at most so many generation requests at
once per live decode worker; past that it refuses at once, with a
``Retry-After`` that says when a place is likely free, instead of letting
every answer slow down without bound (a queue nobody leaves is an outage).

A request holds its place from the moment it is admitted to its last byte:
queued, prefilling or streaming alike. Pure: time is passed in."""

from __future__ import annotations

import math
from collections.abc import Callable

_RECENT_WEIGHT = 0.1  # of each finished request, in the mean duration


class Admission:
    def __init__(self, per_decode_worker: int, decode_workers: Callable[[], int],
                 on_refused: Callable[[], None] = lambda: None):
        """``per_decode_worker``: places per live decode worker (0: no bound);
        ``decode_workers``: how many are live now (membership changes
        resize the bound at once)."""
        self._per_worker = per_decode_worker
        self._decode_workers = decode_workers
        self._on_refused = on_refused
        self.in_flight = 0
        self._mean_s = 1.0  # a request's duration, weighted to recent ones

    @property
    def limit(self) -> int | None:
        if self._per_worker <= 0:
            return None
        return self._per_worker * max(1, self._decode_workers())

    def enter(self) -> bool:
        """Take a place; False (counted) when none is left."""
        limit = self.limit
        if limit is not None and self.in_flight >= limit:
            self._on_refused()
            return False
        self.in_flight += 1
        return True

    def leave(self, duration_s: float) -> None:
        self.in_flight -= 1
        self._mean_s += _RECENT_WEIGHT * (max(0.0, duration_s) - self._mean_s)

    def retry_after_s(self) -> int:
        """Whole seconds until a place is likely free: places free at about
        limit / mean duration per second."""
        limit = self.limit or 1
        return max(1, min(60, math.ceil(self._mean_s / limit)))


# POSTs that run no generation. Every other POST may reach the engines:
# vLLM's app has more generation routes than the OpenAI ones (batch,
# SageMaker's /invocations, scoring), so every other one counts.
NON_GENERATING_POSTS = frozenset({"/tokenize", "/detokenize"})


def generates(scope) -> bool:
    return scope["type"] == "http" and scope["method"] == "POST" and scope["path"] not in NON_GENERATING_POSTS


class AdmitGenerations:
    """ASGI: generation requests pass ``admission`` or get an OpenAI-style
    429 with ``Retry-After``; everything else (models, tokenize, health,
    metrics) passes untouched, so an overloaded router stays observable."""

    def __init__(self, app, admission: Admission, clock: Callable[[], float]):
        self._app = app
        self._admission = admission
        self._clock = clock

    async def __call__(self, scope, receive, send):
        if not generates(scope):
            return await self._app(scope, receive, send)
        if not self._admission.enter():
            return await _refuse(send, self._admission)
        started = self._clock()
        try:
            await self._app(scope, receive, send)  # returns after the last byte of the answer
        finally:
            self._admission.leave(self._clock() - started)


def refusal_message(admission: Admission) -> str:
    return (f"The server is at capacity ({admission.in_flight} requests in flight, at most {admission.limit}); "
            f"retry after {admission.retry_after_s()} s.")


async def _refuse(send, admission: Admission) -> None:
    from router.http_errors import send_error

    await send_error(send, 429, refusal_message(admission), "TooManyRequestsError", 429,
                     [(b"retry-after", str(admission.retry_after_s()).encode())])
