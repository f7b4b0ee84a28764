"""Staging store of a decode worker: KV pushed by prefill workers waits here
until the engine fetches it.

Bounded: a push whose payload would exceed the capacity is refused up front.
Expiring: staged KV nobody fetched within ``ttl_s`` is dropped. Each transfer
moves forward only: RECEIVING → COMPLETE → CONSUMED, or → FAILED / EXPIRED
(sticky). Runs on one event loop; not thread-safe.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections import OrderedDict
from dataclasses import dataclass

from baton.v1 import kv_transfer_pb2 as pb
from kv_transfer.wire import WIRE_VERSION, WireError, check_chunk, layer_payload_bytes


class TransferState(enum.Enum):
    RECEIVING = "receiving"
    COMPLETE = "complete"
    CONSUMED = "consumed"
    FAILED = "failed"
    EXPIRED = "expired"


_TERMINAL = {TransferState.CONSUMED, TransferState.FAILED, TransferState.EXPIRED}


class StagingFull(Exception):
    pass


class TransferUnavailable(Exception):
    """Fetch of a transfer that failed, expired or never arrived in time."""


@dataclass
class StagedTransfer:
    header: pb.KVHeader
    layers: list[bytearray]
    received: list[int]  # bytes received per layer
    created_s: float  # time.monotonic()
    state: TransferState = TransferState.RECEIVING
    reason: str = ""

    @property
    def nbytes(self) -> int:
        return sum(len(layer) for layer in self.layers)


@dataclass(frozen=True)
class TransferRecord:
    """What is remembered of a transfer after its memory is freed."""

    transfer_id: str
    state: TransferState
    num_tokens: int
    bytes: int
    reason: str = ""


class StagingStore:
    def __init__(self, capacity_bytes: int, ttl_s: float, history: int = 4096):
        self.capacity_bytes = capacity_bytes
        self.ttl_s = ttl_s
        self._staged: dict[str, StagedTransfer] = {}
        self._waiters: dict[str, asyncio.Event] = {}
        self._history: OrderedDict[str, TransferRecord] = OrderedDict()
        self._history_size = history
        self.counters = {"received": 0, "fetched": 0, "expired": 0, "rejected": 0, "failed": 0,
                         "never_started": 0}

    @property
    def staged_bytes(self) -> int:
        return sum(t.nbytes for t in self._staged.values())

    @property
    def staged_transfers(self) -> int:
        return len(self._staged)

    def record(self, transfer_id: str) -> TransferRecord | None:
        return self._history.get(transfer_id)

    # --- producer side ----------------------------------------------------
    def begin(self, header: pb.KVHeader) -> StagedTransfer:
        tid = header.transfer_id
        if not tid:
            raise WireError("header without transfer_id")
        if header.wire_version != WIRE_VERSION:
            raise WireError(f"KV wire version {header.wire_version}, this worker speaks {WIRE_VERSION}: "
                            "run the same Baton version on prefill and decode workers")
        if tid in self._staged or tid in self._history:
            past = self._history.get(tid)
            if past is not None and past.reason == "discarded":
                raise WireError(f"transfer {tid} was discarded")
            raise WireError(f"transfer {tid} was already pushed")
        layer_bytes = layer_payload_bytes(header)
        total = layer_bytes * len(header.layer_names)
        if self.staged_bytes + total > self.capacity_bytes:
            self.counters["rejected"] += 1
            self._remember(tid, TransferState.FAILED, header.num_tokens, 0, "staging full")
            self._wake(tid)
            raise StagingFull(
                f"staging full: {self.staged_bytes + total} B needed, capacity {self.capacity_bytes} B"
            )
        staged = StagedTransfer(
            header=header,
            layers=[bytearray(layer_bytes) for _ in header.layer_names],
            received=[0] * len(header.layer_names),
            created_s=time.monotonic(),
        )
        self._staged[tid] = staged
        return staged

    def add(self, staged: StagedTransfer, data: pb.KVData) -> None:
        if staged.state is not TransferState.RECEIVING:
            raise WireError(f"transfer {staged.header.transfer_id} is {staged.state.value}")
        if data.layer_index >= len(staged.received):
            raise WireError(f"layer index {data.layer_index} out of range ({len(staged.received)} layers)")
        check_chunk(staged.header, data, staged.received[data.layer_index])
        end = data.offset + len(data.data)
        staged.layers[data.layer_index][data.offset:end] = data.data
        staged.received[data.layer_index] = end

    def complete(self, staged: StagedTransfer) -> None:
        if staged.state is not TransferState.RECEIVING:  # expired or discarded meanwhile
            raise WireError(f"transfer {staged.header.transfer_id} is {staged.state.value}")
        expected = layer_payload_bytes(staged.header)
        short = [i for i, n in enumerate(staged.received) if n != expected]
        if short:
            self.fail(staged, f"push ended with {len(short)} incomplete layers")
            raise WireError(f"incomplete push: layers {short[:5]} short")
        staged.state = TransferState.COMPLETE
        self.counters["received"] += 1
        self._wake(staged.header.transfer_id)

    def fail(self, staged: StagedTransfer, reason: str) -> None:
        if staged.state in _TERMINAL:
            return
        self._finish(staged, TransferState.FAILED, reason)
        self.counters["failed"] += 1

    # --- consumer side ----------------------------------------------------
    async def take(self, transfer_id: str, timeout_s: float, start_timeout_s: float | None = None) -> StagedTransfer:
        """Wait until the transfer is complete, then hand it over and forget
        it: the caller owns the bytes from here on. A push that has not even
        started within ``start_timeout_s`` is given up at once: the producer
        opens its push before it answers its first token, so by now it failed."""
        started = time.monotonic()
        while True:
            staged = self._staged.get(transfer_id)
            if staged is not None and staged.state is TransferState.COMPLETE:
                self._finish(staged, TransferState.CONSUMED, "")
                self.counters["fetched"] += 1
                return staged
            past = self._history.get(transfer_id)
            if past is not None and past.state is not TransferState.CONSUMED:
                raise TransferUnavailable(f"transfer {transfer_id} {past.state.value}: {past.reason}")
            if past is not None:
                raise TransferUnavailable(f"transfer {transfer_id} was already fetched")
            # Not begun yet: the shorter start timeout bounds the wait.
            waiting_for_start = staged is None and start_timeout_s is not None and start_timeout_s < timeout_s
            remaining = started + (start_timeout_s if waiting_for_start else timeout_s) - time.monotonic()
            if remaining <= 0:
                if waiting_for_start:
                    self.counters["never_started"] += 1
                    raise TransferUnavailable(
                        f"transfer {transfer_id}: its push never started within {start_timeout_s:.1f} s")
                raise TransferUnavailable(f"transfer {transfer_id} did not arrive within {timeout_s:.1f} s")
            event = self._waiters.setdefault(transfer_id, asyncio.Event())
            try:
                await asyncio.wait_for(event.wait(), remaining)
            except TimeoutError:
                pass
            finally:
                self._waiters.pop(transfer_id, None)

    def discard(self, transfer_id: str) -> int:
        """Free a transfer nobody will fetch; returns the bytes freed. A push
        that has not arrived yet is refused when it does."""
        staged = self._staged.get(transfer_id)
        if staged is not None:
            freed = staged.nbytes
            self._finish(staged, TransferState.FAILED, "discarded")
            return freed
        if transfer_id not in self._history:
            self._remember(transfer_id, TransferState.FAILED, 0, 0, "discarded")
        return 0

    # --- housekeeping -----------------------------------------------------
    def expire(self, now_s: float | None = None) -> int:
        now_s = time.monotonic() if now_s is None else now_s
        old = [t for t in self._staged.values() if now_s - t.created_s > self.ttl_s]
        for staged in old:
            self._finish(staged, TransferState.EXPIRED, f"not fetched within {self.ttl_s} s")
            self.counters["expired"] += 1
        return len(old)

    async def run_expiry(self, interval_s: float = 1.0) -> None:
        while True:
            await asyncio.sleep(interval_s)
            self.expire()

    def _finish(self, staged: StagedTransfer, state: TransferState, reason: str) -> None:
        tid = staged.header.transfer_id
        staged.state = state
        staged.reason = reason
        self._staged.pop(tid, None)
        self._remember(tid, state, staged.header.num_tokens, staged.nbytes, reason)
        self._wake(tid)

    def _remember(self, tid: str, state: TransferState, num_tokens: int, nbytes: int, reason: str) -> None:
        self._history[tid] = TransferRecord(tid, state, num_tokens, nbytes, reason)
        self._history.move_to_end(tid)
        while len(self._history) > self._history_size:
            self._history.popitem(last=False)

    def _wake(self, tid: str) -> None:
        event = self._waiters.get(tid)
        if event is not None:
            event.set()
