"""Anti-herding: a prefill worker whose queue is more than ``max_gap``
tokens longer than the shortest one's takes no new request, however much of
its prompt it holds. Bounds how far one hot prefix can pile onto one worker
while others idle."""

from __future__ import annotations

from collections.abc import Sequence

from control_plane.scheduling.request import Candidate, SchedulingRequest


class LoadGapCap:
    name = "load-gap-cap"
    client_error = False
    soft = True

    def __init__(self, max_gap_tokens: int = 2048):
        self.max_gap_tokens = max_gap_tokens

    def keep(self, request: SchedulingRequest, candidate: Candidate, pool: Sequence[Candidate]) -> bool:
        shortest = min(c.queued_prefill_tokens for c in pool)
        return candidate.queued_prefill_tokens - shortest <= self.max_gap_tokens

    def why_none(self, request: SchedulingRequest) -> str:
        return "no worker within the load gap"
