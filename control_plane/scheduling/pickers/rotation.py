"""Strict rotation, ignoring scores (a baseline)."""

from __future__ import annotations

from collections.abc import Sequence

from control_plane.scheduling.request import Candidate


class Rotation:
    name = "rotation"

    def __init__(self):
        self._turn = 0

    def pick(self, scored: Sequence[tuple[Candidate, float]]) -> Candidate:
        choice = scored[self._turn % len(scored)][0]
        self._turn += 1
        return choice
