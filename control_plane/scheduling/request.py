"""What the pipeline sees: the request, and each worker it may go to."""

from __future__ import annotations

from dataclasses import dataclass, field

from baton.registry import WorkerRecord


@dataclass(frozen=True)
class SchedulingRequest:
    model: str = ""  # served model name; empty: any
    prompt_tokens: int = 0
    required_labels: dict[str, str] = field(default_factory=dict)  # every one must match the worker's


@dataclass(frozen=True)
class Candidate:
    worker_id: str
    model: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    in_flight: int = 0  # placements handed out and not yet reported back

    @classmethod
    def of(cls, worker: WorkerRecord, in_flight: int = 0) -> Candidate:
        return cls(worker.worker_id, worker.model, dict(worker.labels), in_flight)
