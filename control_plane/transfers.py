"""Transfer bookkeeping: every placement allocates a transfer id, tracked
until reported consumed or failed, or expired after ``ttl_s``. Forward-only:
PLACED → CONSUMED | FAILED | EXPIRED, or LOCAL for a placement without a
prefill worker (the decode worker prefilled; nothing moved). Pure: time is
passed in. Counted per worker and per KV backend.

The open transfers are also the load the control plane has handed out, per
phase: a prefill worker owes the uncached prompt tokens of its placements
until their prefill is reported done (not until the decode ends); a decode
worker holds its placements' sequences, and their tokens' KV, until they
end, and decodes those whose prompt is in (prefilled there, or whose first
token came back from the prefill worker)."""

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
    LOCAL = "local"


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
    prefill_tokens: int = 0  # uncached prompt tokens the prefill worker computes
    decode_tokens: int = 0  # prompt + answer: the KV the decode worker will hold
    predicted_cached: int = 0  # prompt tokens the index expected cached on the prefill worker
    prefill_done: bool = False


class TransferTable:
    def __init__(self, ttl_s: float):
        self.ttl_s = ttl_s
        self._open: dict[str, Transfer] = {}
        # per worker id: "total", the states, "bytes" moved
        self.counters: dict[str, Counter] = {}
        # per backend: "placed", "fallbacks", the states, "recomputed", "bytes"
        self.by_backend: dict[str, Counter] = {}
        # per worker: "prefill_tokens" owed, "running" sequences (of them "decoding"), "decode_tokens" held
        self._load: dict[str, Counter] = {}
        # the prefix index's predictions against the prefill engines' reports
        self.prefix = Counter()

    def open(self, request_id: str, prefill_id: str, decode_id: str, now_s: float, backend: str = "",
             fallback: bool = False, prefill_tokens: int = 0, decode_tokens: int = 0,
             predicted_cached: int = 0) -> Transfer:
        transfer = Transfer(uuid.uuid4().hex, request_id, prefill_id, decode_id, now_s, backend,
                            prefill_tokens=prefill_tokens, decode_tokens=decode_tokens,
                            predicted_cached=predicted_cached)
        self._open[transfer.transfer_id] = transfer
        for worker in filter(None, (prefill_id, decode_id)):
            self.counters.setdefault(worker, Counter())["total"] += 1
        if backend:  # none: nothing moves
            counts = self.by_backend.setdefault(backend, Counter())
            counts["placed"] += 1
            counts["fallbacks"] += fallback
        if prefill_id:
            self._load.setdefault(prefill_id, Counter())["prefill_tokens"] += prefill_tokens
        decode = self._load.setdefault(decode_id, Counter())
        decode["running"] += 1
        decode["decode_tokens"] += decode_tokens
        if not prefill_id:  # the decode worker prefills it: decoding from the start
            transfer.prefill_done = True
            decode["decoding"] += 1
        return transfer

    def prefill_done(self, transfer_id: str, cached_tokens: int) -> Transfer | None:
        """The prefill worker's part is over; ``cached_tokens``: what its
        engine found cached. Unknown ids and repeats return None."""
        transfer = self._open.get(transfer_id)
        if transfer is None or transfer.prefill_done:
            return None
        self._end_prefill(transfer)
        self.prefix["reported"] += 1
        self.prefix["predicted_tokens"] += transfer.predicted_cached
        self.prefix["hit_tokens"] += cached_tokens
        self.prefix["exact"] += transfer.predicted_cached == cached_tokens
        return transfer

    def _end_prefill(self, transfer: Transfer) -> None:
        transfer.prefill_done = True
        self._load[transfer.prefill_id]["prefill_tokens"] -= transfer.prefill_tokens
        self._load[transfer.decode_id]["decoding"] += 1

    def close(self, transfer_id: str, state: TransferState, nbytes: int = 0, tokens: int = 0,
              recomputed: bool = False) -> Transfer | None:
        """Record the outcome; unknown or already-closed ids return None."""
        transfer = self._open.pop(transfer_id, None)
        if transfer is None:
            return None
        transfer.state, transfer.bytes, transfer.tokens = state, nbytes, tokens
        if not transfer.prefill_done:
            self._end_prefill(transfer)
        decode = self._load[transfer.decode_id]
        decode["running"] -= 1
        decode["decoding"] -= 1
        decode["decode_tokens"] -= transfer.decode_tokens
        for worker in filter(None, (transfer.prefill_id, transfer.decode_id)):
            counts = self.counters.setdefault(worker, Counter())
            counts[state.value] += 1
            counts["bytes"] += nbytes
        if transfer.backend:
            counts = self.by_backend.setdefault(transfer.backend, Counter())
            counts[state.value] += 1
            counts["recomputed"] += recomputed
            counts["bytes"] += nbytes
        return transfer

    def fail_worker(self, worker_id: str) -> list[Transfer]:
        """Close every open transfer placed on ``worker_id`` as FAILED: its
        process is gone (a new one took its id), so nothing it held is
        coming, and its load must not weigh on its successor."""
        mine = [t.transfer_id for t in self._open.values() if worker_id in (t.prefill_id, t.decode_id)]
        return [t for t in (self.close(tid, TransferState.FAILED) for tid in mine) if t]

    def expire(self, now_s: float) -> list[Transfer]:
        old = [t.transfer_id for t in self._open.values() if now_s - t.created_s > self.ttl_s]
        return [t for t in (self.close(tid, TransferState.EXPIRED) for tid in old) if t]

    def in_flight(self, worker_id: str) -> int:
        return sum(1 for t in self._open.values() if worker_id in (t.prefill_id, t.decode_id))

    def queued_prefill_tokens(self, worker_id: str) -> int:
        return self._load.get(worker_id, Counter())["prefill_tokens"]

    def running(self, worker_id: str) -> int:
        """Decode sequences placed on the worker and not yet ended."""
        return self._load.get(worker_id, Counter())["running"]

    def decoding(self, worker_id: str) -> int:
        """Of those, the ones whose prompt is in: what a local prefill there holds up."""
        return self._load.get(worker_id, Counter())["decoding"]

    def decode_tokens(self, worker_id: str) -> int:
        return self._load.get(worker_id, Counter())["decode_tokens"]

    @property
    def open_count(self) -> int:
        return len(self._open)
