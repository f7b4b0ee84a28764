"""Which transfer backend a prefill/decode pair uses."""

from __future__ import annotations

from baton.registry import WorkerRecord
from kv_transfer.transport import FALLBACK_BACKEND, PULL_BACKENDS


def usable(backend: str, prefill: WorkerRecord, decode: WorkerRecord) -> bool:
    """The consumer must be reachable on it; on a pull backend the producer
    too (the consumer reads from it)."""
    if backend not in decode.kv_endpoints:
        return False
    return backend not in PULL_BACKENDS or backend in prefill.kv_endpoints


def choose_backend(wanted: str, prefill: WorkerRecord, decode: WorkerRecord) -> str:
    """``wanted`` if the pair offers it, else the fallback every decode
    worker offers; the caller logs the difference."""
    return wanted if usable(wanted, prefill, decode) else FALLBACK_BACKEND
