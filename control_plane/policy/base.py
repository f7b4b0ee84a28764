"""The policy contract."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass


@dataclass(frozen=True)
class Candidate:
    worker_id: str
    in_flight: int  # placements handed out and not yet reported back


class PolicyError(Exception):
    """No candidate can take the request."""


class PlacementPolicy(ABC):
    name: str

    @abstractmethod
    def pick(self, candidates: list[Candidate]) -> Candidate:
        """Choose one of ``candidates`` (non-empty, any order)."""
