"""Strict rotation over live workers, ignoring load (a baseline)."""

from __future__ import annotations

from control_plane.policy.base import Candidate, PlacementPolicy, PolicyError


class RoundRobinPolicy(PlacementPolicy):
    name = "round-robin"

    def __init__(self):
        self._turn = 0

    def pick(self, candidates: list[Candidate]) -> Candidate:
        if not candidates:
            raise PolicyError("no candidates")
        ordered = sorted(candidates, key=lambda c: c.worker_id)
        choice = ordered[self._turn % len(ordered)]
        self._turn += 1
        return choice
