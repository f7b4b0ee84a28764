"""Only workers serving the requested model."""

from __future__ import annotations

from collections.abc import Sequence

from control_plane.scheduling.request import Candidate, SchedulingRequest


class ServesModel:
    name = "serves-model"
    client_error = False  # the model's workers may be starting or restarting
    soft = False

    def keep(self, request: SchedulingRequest, candidate: Candidate, pool: Sequence[Candidate]) -> bool:
        return not request.model or candidate.model == request.model

    def why_none(self, request: SchedulingRequest) -> str:
        return f"no live worker serves model {request.model!r}"
