"""The scheduling pipeline, piece by piece and as the named policies."""

import pytest

from control_plane.scheduling import (
    Candidate,
    NoWorker,
    Scheduler,
    SchedulingRequest,
    make_scheduler,
)
from control_plane.scheduling.filters.labels import HasLabels
from control_plane.scheduling.filters.model import ServesModel
from control_plane.scheduling.pickers.best_score import BestScore
from control_plane.scheduling.pickers.rotation import Rotation
from control_plane.scheduling.scorers.load import LeastInFlight

ANY = SchedulingRequest()


def test_serves_model_keeps_the_models_workers():
    f = ServesModel()
    assert f.keep(SchedulingRequest("m"), Candidate("a", "m")) and not f.keep(SchedulingRequest("m"), Candidate("a", "x"))
    assert f.keep(ANY, Candidate("a", "x")), "no model asked: any"
    assert "'m'" in f.why_none(SchedulingRequest("m")) and not f.client_error


def test_has_labels_keeps_workers_carrying_every_required_label():
    f = HasLabels()
    eu = SchedulingRequest(required_labels={"region": "eu"})
    assert f.keep(eu, Candidate("a", labels={"region": "eu", "zone": "b"}))
    assert not f.keep(eu, Candidate("b", labels={"region": "us"}))
    assert not f.keep(eu, Candidate("c"))
    assert f.keep(ANY, Candidate("c")), "nothing required: any"
    assert not f.keep(SchedulingRequest(required_labels={"region": "eu", "zone": "a"}),
                      Candidate("a", labels={"region": "eu", "zone": "b"}))
    assert "region=eu" in f.why_none(eu) and f.client_error


def test_least_in_flight_scores_the_idlest_highest():
    scores = LeastInFlight().score(ANY, [Candidate("a", in_flight=3), Candidate("b", in_flight=1),
                                         Candidate("c", in_flight=1)])
    assert scores["b"] == scores["c"] == 1.0 and scores["a"] == pytest.approx(0.5)


def test_best_score_rotates_over_ties():
    picker = BestScore()
    scored = [(Candidate("a"), 1.0), (Candidate("b"), 1.0), (Candidate("c"), 0.2)]
    assert [picker.pick(scored).worker_id for _ in range(4)] == ["a", "b", "a", "b"]


def test_rotation_ignores_scores():
    picker = Rotation()
    scored = [(Candidate("a"), 0.0), (Candidate("b"), 1.0)]
    assert [picker.pick(scored).worker_id for _ in range(3)] == ["a", "b", "a"]


def test_scores_are_weighted_and_summed():
    class Prefers:
        name = "prefers"

        def __init__(self, worker_id):
            self.worker_id = worker_id

        def score(self, request, candidates):
            return {c.worker_id: 1.0 if c.worker_id == self.worker_id else 0.0 for c in candidates}

    pool = [Candidate("a"), Candidate("b")]
    assert Scheduler("t", [], [(Prefers("a"), 1.0), (Prefers("b"), 2.0)], BestScore()).pick(ANY, pool).worker_id == "b"
    assert Scheduler("t", [], [(Prefers("a"), 3.0), (Prefers("b"), 2.0)], BestScore()).pick(ANY, pool).worker_id == "a"


def test_least_loaded_picks_the_idlest_and_breaks_ties_round_robin():
    policy = make_scheduler("least-loaded")
    assert policy.pick(ANY, [Candidate("a", in_flight=3), Candidate("b", in_flight=1)]).worker_id == "b"
    policy = make_scheduler("least-loaded")
    pool = [Candidate("b"), Candidate("a"), Candidate("c", in_flight=5)]
    assert [policy.pick(ANY, pool).worker_id for _ in range(4)] == ["a", "b", "a", "b"]


def test_round_robin_rotates_regardless_of_load():
    policy = make_scheduler("round-robin")
    pool = [Candidate("a", in_flight=9), Candidate("b")]
    assert [policy.pick(ANY, pool).worker_id for _ in range(3)] == ["a", "b", "a"]


@pytest.mark.parametrize("name", ["least-loaded", "round-robin"])
def test_every_policy_places_only_inside_the_required_labels(name):
    policy = make_scheduler(name)
    pool = [Candidate("a", "m", {"region": "us"}), Candidate("b", "m", {"region": "eu"}, in_flight=7),
            Candidate("c", "x", {"region": "eu"})]
    eu = SchedulingRequest("m", required_labels={"region": "eu"})
    assert {policy.pick(eu, pool).worker_id for _ in range(5)} == {"b"}
    with pytest.raises(NoWorker, match="region=mars") as refused:
        policy.pick(SchedulingRequest("m", required_labels={"region": "mars"}), pool)
    assert refused.value.client_error


def test_no_worker_for_the_model_is_a_capacity_error_that_names_it():
    with pytest.raises(NoWorker, match="'m'") as refused:
        make_scheduler("least-loaded").pick(SchedulingRequest("m"), [Candidate("a", "x")])
    assert not refused.value.client_error
    with pytest.raises(NoWorker):
        make_scheduler("least-loaded").pick(ANY, [])


def test_unknown_policy_names_the_choices():
    with pytest.raises(ValueError, match="least-loaded"):
        make_scheduler("fastest")
