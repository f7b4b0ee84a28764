"""Least in-flight work first; ties broken round-robin so equal workers
share the load instead of the first one taking everything."""

from __future__ import annotations

from control_plane.policy.base import Candidate, PlacementPolicy, PolicyError


class LeastLoadedPolicy(PlacementPolicy):
    name = "least-loaded"

    def __init__(self):
        self._turn = 0

    def pick(self, candidates: list[Candidate]) -> Candidate:
        if not candidates:
            raise PolicyError("no candidates")
        lowest = min(c.in_flight for c in candidates)
        tied = sorted((c for c in candidates if c.in_flight == lowest), key=lambda c: c.worker_id)
        choice = tied[self._turn % len(tied)]
        self._turn += 1
        return choice
