"""Only workers carrying every label the request requires (data residency:
a request that must stay in a region is never placed outside it)."""

from __future__ import annotations

from collections.abc import Sequence

from control_plane.scheduling.request import Candidate, SchedulingRequest


class HasLabels:
    name = "has-labels"
    client_error = True
    soft = False

    def keep(self, request: SchedulingRequest, candidate: Candidate, pool: Sequence[Candidate]) -> bool:
        return all(candidate.labels.get(key) == value for key, value in request.required_labels.items())

    def why_none(self, request: SchedulingRequest) -> str:
        wanted = ",".join(f"{k}={v}" for k, v in sorted(request.required_labels.items()))
        return f"no live worker serving model {request.model!r} carries the required labels {wanted}"
