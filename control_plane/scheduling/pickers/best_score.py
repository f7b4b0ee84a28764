"""The best score; ties rotate, so equal workers share the load instead of
the first one taking everything."""

from __future__ import annotations

from collections.abc import Sequence

from control_plane.scheduling.request import Candidate


class BestScore:
    name = "best-score"

    def __init__(self, tolerance: float = 1e-9):
        self._tolerance = tolerance
        self._turn = 0

    def pick(self, scored: Sequence[tuple[Candidate, float]]) -> Candidate:
        best = max(score for _, score in scored)
        tied = [c for c, score in scored if score >= best - self._tolerance]
        choice = tied[self._turn % len(tied)]
        self._turn += 1
        return choice
