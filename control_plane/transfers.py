"""Transfer bookkeeping: every placement allocates a transfer id, tracked
until reported consumed or failed, or expired after ``ttl_s``. Forward-only:
PLACED → CONSUMED | FAILED | EXPIRED. Pure: time is passed in.
Counted per worker and per KV backend."""

from __future__ import annotations

import enum
import uuid
from collections import Counter
from dataclasses import dataclass


class TransferState(enum.Enum):
    PLACED = "placed"
    CONSUMED = "consumed"
    FAILED = "failed"
    EXPIRED = "expired"


@dataclass
class Transfer:
    transfer_id: str
    request_id: str
    prefill_id: str
    decode_id: str
    created_s: float
    backend: str = ""
    state: TransferState = TransferState.PLACED
    bytes: int = 0
    tokens: int = 0


class TransferTable:
    def __init__(self, ttl_s: float):
        self.ttl_s = ttl_s
        self._open: dict[str, Transfer] = {}
        # per worker id: "total", "consumed", "failed", "expired"
        self.counters: dict[str, Counter] = {}
        # per backend: "placed", "fallbacks", the states, "recomputed", "bytes"
        self.by_backend: dict[str, Counter] = {}

    def open(self, request_id: str, prefill_id: str, decode_id: str, now_s: float, backend: str = "",
             fallback: bool = False) -> Transfer:
        transfer = Transfer(uuid.uuid4().hex, request_id, prefill_id, decode_id, now_s, backend)
        self._open[transfer.transfer_id] = transfer
        for worker in (prefill_id, decode_id):
            self.counters.setdefault(worker, Counter())["total"] += 1
        counts = self.by_backend.setdefault(backend, Counter())
        counts["placed"] += 1
        counts["fallbacks"] += fallback
        return transfer

    def close(self, transfer_id: str, state: TransferState, nbytes: int = 0, tokens: int = 0,
              recomputed: bool = False) -> Transfer | None:
        """Record the outcome; unknown or already-closed ids return None."""
        transfer = self._open.pop(transfer_id, None)
        if transfer is None:
            return None
        transfer.state, transfer.bytes, transfer.tokens = state, nbytes, tokens
        for worker in (transfer.prefill_id, transfer.decode_id):
            self.counters.setdefault(worker, Counter())[state.value] += 1
        counts = self.by_backend.setdefault(transfer.backend, Counter())
        counts[state.value] += 1
        counts["recomputed"] += recomputed
        counts["bytes"] += nbytes
        return transfer

    def expire(self, now_s: float) -> list[Transfer]:
        old = [t.transfer_id for t in self._open.values() if now_s - t.created_s > self.ttl_s]
        return [t for t in (self.close(tid, TransferState.EXPIRED) for tid in old) if t]

    def in_flight(self, worker_id: str) -> int:
        return sum(1 for t in self._open.values() if worker_id in (t.prefill_id, t.decode_id))

    @property
    def open_count(self) -> int:
        return len(self._open)
