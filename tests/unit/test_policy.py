import pytest

from control_plane.policy import Candidate, make_policy
from control_plane.policy.base import PolicyError


def test_least_loaded_picks_the_idlest():
    policy = make_policy("least-loaded")
    pick = policy.pick([Candidate("a", 3), Candidate("b", 1), Candidate("c", 2)])
    assert pick.worker_id == "b"


def test_least_loaded_breaks_ties_round_robin():
    policy = make_policy("least-loaded")
    candidates = [Candidate("b", 0), Candidate("a", 0), Candidate("c", 5)]
    assert [policy.pick(candidates).worker_id for _ in range(4)] == ["a", "b", "a", "b"]


def test_round_robin_rotates_regardless_of_load():
    policy = make_policy("round-robin")
    candidates = [Candidate("a", 9), Candidate("b", 0)]
    assert [policy.pick(candidates).worker_id for _ in range(3)] == ["a", "b", "a"]


def test_no_candidates_is_an_error():
    with pytest.raises(PolicyError):
        make_policy("least-loaded").pick([])


def test_unknown_policy_names_the_choices():
    with pytest.raises(ValueError, match="least-loaded"):
        make_policy("fastest")
