"""Placement as a pipeline, pure and unit-testable (no I/O, no clock, no
asyncio): filters drop the workers that cannot take a request, weighted
scorers rate the rest, a picker chooses. Policies are named configurations
of it (``policies.py``), one filter, scorer or picker per module."""

from control_plane.scheduling.pipeline import NoWorker, Scheduler
from control_plane.scheduling.policies import DEFAULT_POLICY, POLICIES, make_scheduler
from control_plane.scheduling.request import Candidate, EngineReport, SchedulingRequest

__all__ = ["DEFAULT_POLICY", "POLICIES", "Candidate", "EngineReport", "NoWorker", "Scheduler", "SchedulingRequest",
           "make_scheduler"]
