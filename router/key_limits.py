"""Per-key limits: requests per minute and tokens per minute as token
buckets (a key may spend a minute's budget in a burst, then refills
steadily), and streams open at once. Tokens (prompt + generated) are known
only when a request ends, so they are charged then and a key in debt is
refused until its bucket refills: a request is never cut short for its
tokens. Pure: time is passed in."""

from __future__ import annotations

import math
from dataclasses import dataclass

from router.api_keys import ApiKey


class TokenBucket:
    def __init__(self, per_minute: int, now: float):
        self.capacity = float(per_minute)
        self.level = float(per_minute)
        self._per_s = per_minute / 60
        self._at = now

    def _refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self._at) * self._per_s)
        self._at = max(self._at, now)

    def wait_s(self, amount: float, now: float) -> float:
        """Seconds until ``amount`` can be taken (0: now)."""
        self._refill(now)
        return max(0.0, (amount - self.level) / self._per_s)

    def take(self, amount: float, now: float) -> None:
        """Take ``amount``, into debt if need be."""
        self._refill(now)
        self.level -= amount


@dataclass(frozen=True)
class Refusal:
    limit: str  # the limit that refused: requests_per_minute, tokens_per_minute, concurrent_streams
    retry_after_s: int
    message: str


class _KeyState:
    def __init__(self, key: ApiKey, now: float):
        limits = key.limits
        self.requests = TokenBucket(limits.requests_per_minute, now) if limits.requests_per_minute else None
        self.tokens = TokenBucket(limits.tokens_per_minute, now) if limits.tokens_per_minute else None
        self.streams = 0


class KeyLimiter:
    def __init__(self):
        self._states: dict[str, _KeyState] = {}

    def _state(self, key: ApiKey, now: float) -> _KeyState:
        state = self._states.get(key.name)
        if state is None:
            state = self._states[key.name] = _KeyState(key, now)
        return state

    def streams(self, key: ApiKey) -> int:
        state = self._states.get(key.name)
        return state.streams if state else 0

    def enter(self, key: ApiKey, now: float) -> Refusal | None:
        """Admit one request of ``key`` (it holds a stream until ``leave``),
        or say which limit refuses it and when to retry."""
        state, limits = self._state(key, now), key.limits
        if limits.concurrent_streams and state.streams >= limits.concurrent_streams:
            return Refusal("concurrent_streams", 1,
                           f"API key '{key.name}' has {state.streams} requests in progress, at most "
                           f"{limits.concurrent_streams} at once; retry when one ends.")
        if state.tokens is not None and (wait := state.tokens.wait_s(1, now)) > 0:
            return Refusal("tokens_per_minute", max(1, math.ceil(wait)),
                           f"API key '{key.name}' used its {limits.tokens_per_minute} tokens per minute; "
                           f"retry after {max(1, math.ceil(wait))} s.")
        if state.requests is not None and (wait := state.requests.wait_s(1, now)) > 0:
            return Refusal("requests_per_minute", max(1, math.ceil(wait)),
                           f"API key '{key.name}' made its {limits.requests_per_minute} requests per minute; "
                           f"retry after {max(1, math.ceil(wait))} s.")
        if state.requests is not None:
            state.requests.take(1, now)
        state.streams += 1
        return None

    def leave(self, key: ApiKey) -> None:
        self._states[key.name].streams -= 1

    def charge(self, key: ApiKey, tokens: int, now: float) -> None:
        state = self._state(key, now)
        if state.tokens is not None:
            state.tokens.take(tokens, now)
