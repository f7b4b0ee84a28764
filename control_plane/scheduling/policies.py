"""The named policies: configurations of the pipeline."""

from __future__ import annotations

from collections.abc import Callable

from control_plane.scheduling.filters.labels import HasLabels
from control_plane.scheduling.filters.model import ServesModel
from control_plane.scheduling.pickers.best_score import BestScore
from control_plane.scheduling.pickers.rotation import Rotation
from control_plane.scheduling.pipeline import Scheduler
from control_plane.scheduling.scorers.load import LeastInFlight


def _filters():
    return [ServesModel(), HasLabels()]


POLICIES: dict[str, Callable[[], Scheduler]] = {
    "least-loaded": lambda: Scheduler("least-loaded", _filters(), [(LeastInFlight(), 1.0)], BestScore()),
    "round-robin": lambda: Scheduler("round-robin", _filters(), [], Rotation()),
}


def make_scheduler(name: str) -> Scheduler:
    """A fresh pipeline (its pickers keep state: one per worker pool)."""
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose one of {sorted(POLICIES)}") from None
