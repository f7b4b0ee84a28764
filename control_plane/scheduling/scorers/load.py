"""Fewer placements in flight scores higher: the idlest worker scores 1,
each placement more than it costs 1 / (1 + the idlest's)."""

from __future__ import annotations

from collections.abc import Sequence

from control_plane.scheduling.request import Candidate, SchedulingRequest


class LeastInFlight:
    name = "least-in-flight"

    def score(self, request: SchedulingRequest, candidates: Sequence[Candidate]) -> dict[str, float]:
        lowest = min(c.in_flight for c in candidates)
        return {c.worker_id: (1 + lowest) / (1 + c.in_flight) for c in candidates}
