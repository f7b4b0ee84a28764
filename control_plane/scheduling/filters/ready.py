"""Only workers taking new work: not draining (finishing what runs, on
SIGTERM) and not suspect (a request just failed on it; until it answers a
health check)."""

from __future__ import annotations

from collections.abc import Sequence

from control_plane.scheduling.request import Candidate, SchedulingRequest


class Ready:
    name = "ready"
    client_error = False  # others may come back or join
    soft = False

    def keep(self, request: SchedulingRequest, candidate: Candidate, pool: Sequence[Candidate]) -> bool:
        return candidate.state == "ready"

    def why_none(self, request: SchedulingRequest) -> str:
        return f"every worker serving model {request.model!r} is draining or suspect"
