"""Filters → weighted scorers → picker."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from control_plane.scheduling.request import Candidate, SchedulingRequest


class NoWorker(Exception):
    """No worker can take the request; the message says which filter left
    none. ``client_error``: the request asked for what no live worker has
    (a label), not for more capacity."""

    def __init__(self, message: str, client_error: bool = False):
        super().__init__(message)
        self.client_error = client_error


class Filter(Protocol):
    name: str
    client_error: bool  # a request this filter leaves without workers asked for the impossible
    soft: bool  # a preference: if it would leave no worker, it leaves all of them

    def keep(self, request: SchedulingRequest, candidate: Candidate, pool: Sequence[Candidate]) -> bool:
        """Whether ``candidate`` (one of ``pool``, what earlier filters left) stays."""

    def why_none(self, request: SchedulingRequest) -> str:
        """Why no candidate is left after this filter, for the client."""


class Scorer(Protocol):
    name: str

    def score(self, request: SchedulingRequest, candidates: Sequence[Candidate]) -> dict[str, float]:
        """Per worker id, a score in [0, 1]; higher is better."""


class Picker(Protocol):
    name: str

    def pick(self, scored: Sequence[tuple[Candidate, float]]) -> Candidate:
        """One of ``scored`` (non-empty, sorted by worker id)."""


class Scheduler:
    def __init__(self, name: str, filters: Sequence[Filter], scorers: Sequence[tuple[Scorer, float]],
                 picker: Picker):
        self.name = name
        self.filters = list(filters)
        self.scorers = list(scorers)  # (scorer, weight)
        self.picker = picker

    def pick(self, request: SchedulingRequest, candidates: Sequence[Candidate]) -> Candidate:
        pool = sorted(candidates, key=lambda c: c.worker_id)
        if not pool:
            raise NoWorker("no live worker")
        for f in self.filters:
            kept = [c for c in pool if f.keep(request, c, pool)]
            if not kept and not f.soft:
                raise NoWorker(f.why_none(request), f.client_error)
            pool = kept or pool
        totals = dict.fromkeys((c.worker_id for c in pool), 0.0)
        for scorer, weight in self.scorers:
            for worker_id, value in scorer.score(request, pool).items():
                totals[worker_id] += weight * value
        return self.picker.pick([(c, totals[c.worker_id]) for c in pool])
