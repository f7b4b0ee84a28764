"""Prefill time, in tokens: what the worker still owes its earlier
placements plus what this prompt needs beyond its cached prefix. The
lowest cost scores 1. One unit for both terms is what keeps a hot prefix
from herding: a worker holding it wins only while its queue is shorter
than the prefix it saves."""

from __future__ import annotations

from collections.abc import Sequence

from control_plane.scheduling.request import Candidate, SchedulingRequest


class PrefillCost:
    name = "prefill-cost"

    def score(self, request: SchedulingRequest, candidates: Sequence[Candidate]) -> dict[str, float]:
        costs = {c.worker_id: c.queued_prefill_tokens + c.uncached_tokens(request) for c in candidates}
        lowest = min(costs.values())
        return {worker_id: (1 + lowest) / (1 + cost) for worker_id, cost in costs.items()}
