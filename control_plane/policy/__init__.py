"""Placement policies: pure functions of (request, snapshot) → choice.
No I/O, no clock, no asyncio inside, so they are unit-testable."""

from control_plane.policy.base import Candidate, PlacementPolicy, PolicyError
from control_plane.policy.least_loaded import LeastLoadedPolicy
from control_plane.policy.round_robin import RoundRobinPolicy

POLICIES: dict[str, type[PlacementPolicy]] = {
    LeastLoadedPolicy.name: LeastLoadedPolicy,
    RoundRobinPolicy.name: RoundRobinPolicy,
}


def make_policy(name: str) -> PlacementPolicy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose one of {sorted(POLICIES)}") from None


__all__ = ["Candidate", "PlacementPolicy", "PolicyError", "POLICIES", "make_policy"]
