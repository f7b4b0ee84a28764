"""The named policies: configurations of the pipeline, per worker pool."""

from __future__ import annotations

from collections.abc import Callable

from control_plane.scheduling.filters.labels import HasLabels
from control_plane.scheduling.filters.load_gap import LoadGapCap
from control_plane.scheduling.filters.model import ServesModel
from control_plane.scheduling.filters.ready import Ready
from control_plane.scheduling.filters.saturation import NotSaturated
from control_plane.scheduling.pickers.best_score import BestScore
from control_plane.scheduling.pickers.rotation import Rotation
from control_plane.scheduling.pipeline import Scheduler
from control_plane.scheduling.scorers.decode_cost import DecodeCost
from control_plane.scheduling.scorers.load import LeastInFlight
from control_plane.scheduling.scorers.prefill_cost import PrefillCost


def _filters():
    # Ready last: a label nobody carries stays the client's error.
    return [ServesModel(), HasLabels(), Ready()]


def _kv_aware(role: str) -> Scheduler:
    if role == "prefill":
        return Scheduler("kv-aware", [*_filters(), NotSaturated(), LoadGapCap()], [(PrefillCost(), 1.0)],
                         BestScore())
    return Scheduler("kv-aware", [*_filters(), NotSaturated()], [(DecodeCost(), 1.0)], BestScore())


POLICIES: dict[str, Callable[[str], Scheduler]] = {
    "kv-aware": _kv_aware,
    "least-loaded": lambda role: Scheduler("least-loaded", _filters(), [(LeastInFlight(), 1.0)], BestScore()),
    "round-robin": lambda role: Scheduler("round-robin", _filters(), [], Rotation()),
}
DEFAULT_POLICY = "kv-aware"


def make_scheduler(name: str, role: str = "decode") -> Scheduler:
    """A fresh pipeline for one pool ("prefill" or "decode"); its pickers
    keep state, so each pool gets its own."""
    try:
        return POLICIES[name](role)
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose one of {sorted(POLICIES)}") from None
