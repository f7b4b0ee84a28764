"""The last things that went wrong, for ``baton status``: transfers that
failed, were recomputed or expired, and workers that failed a request or
came back as another process. Bounded; wall-clock times, for people."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class RecentError:
    unix_s: float
    kind: str  # "transfer-failed", "recomputed", "expired", "suspect", "restarted"
    worker_id: str
    transfer_id: str
    detail: str


class RecentErrors:
    def __init__(self, keep: int = 20, clock=time.time):
        self._errors: deque[RecentError] = deque(maxlen=keep)
        self._clock = clock

    def add(self, kind: str, worker_id: str = "", transfer_id: str = "", detail: str = "") -> None:
        self._errors.append(RecentError(self._clock(), kind, worker_id, transfer_id, detail))

    def newest_first(self) -> list[RecentError]:
        return list(reversed(self._errors))
