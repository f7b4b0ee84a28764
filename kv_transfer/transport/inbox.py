"""The consumer half the push backends share: KV that arrived ahead of the
engine's load waits in one bounded, expiring inbox per engine, and a load
checks it and writes it into the blocks vLLM allocated.

Bytes are accounted from the moment a transfer is accepted until its load
has written them (or it failed, expired or was declined), so the bound holds
for memory really in use. A transfer that does not fit is refused before a
byte of it moves, and its load learns so at once.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

import torch
import xxhash

from baton.logs import get_logger
from kv_transfer.connector.metadata import LoadSpec
from kv_transfer.transport.base import KVCache, Received
from kv_transfer.transport.layer_queue import CopyBudget
from kv_transfer.wire import WireError, blocks_for_tokens

log = get_logger(__name__)


class TransferUnavailable(Exception):
    """The transfer failed, was refused, or never arrived in time."""


def digest(tensor: torch.Tensor) -> int:
    """xxh3 of a tensor's bytes, as a signed 64-bit value (fits an int64 tensor)."""
    host = tensor if tensor.device.type == "cpu" else tensor.cpu()
    return int.from_bytes(xxhash.xxh3_64_digest(memoryview(host.reshape(-1).view(torch.uint8).numpy())),
                          "little", signed=True)


@dataclass(frozen=True)
class TransferHeader:
    """What a producer announces before any KV byte moves."""

    transfer_id: str
    num_tokens: int
    num_blocks: int
    layout_hash: str  # covers the parallel sizes
    rank: int = 0  # the producer's rank index (``ParallelRank.index``)

    @classmethod
    def of(cls, transfer_id: str, num_tokens: int, num_blocks: int, cache: KVCache) -> TransferHeader:
        return cls(transfer_id, num_tokens, num_blocks, cache.layout.layout_hash(), cache.rank.index)

    def to_dict(self) -> dict:
        return {"t": self.transfer_id, "n": self.num_tokens, "blocks": self.num_blocks, "layout": self.layout_hash,
                "rank": self.rank}

    @classmethod
    def from_dict(cls, raw: dict) -> TransferHeader:
        try:
            return cls(str(raw["t"]), int(raw["n"]), int(raw["blocks"]), str(raw["layout"]), int(raw["rank"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise WireError(f"malformed transfer header: {exc}") from exc


def check_layer(index: int, layer: torch.Tensor, expected: int) -> None:
    """Raise if a received layer's bytes are not the ones the producer hashed."""
    if digest(layer) != expected:
        raise WireError(f"layer {index} failed its checksum")


def payload_bytes(cache: KVCache, num_tokens: int) -> int:
    """Bytes of one layer's payload for a prompt of ``num_tokens``."""
    return cache.prompt(num_tokens).elements * cache.layers[0].element_size()


@dataclass
class Inbound:
    header: TransferHeader
    nbytes: int
    created_s: float
    layers: list[torch.Tensor] = field(default_factory=list)  # flat payloads by layer index, checked
    state: str = "receiving"  # → "complete" | "failed"
    reason: str = ""


class Inbox:
    def __init__(self, capacity_bytes: int, ttl_s: float):
        self._capacity = capacity_bytes
        self._ttl_s = ttl_s
        self._cond = threading.Condition()
        self._items: dict[str, Inbound] = {}
        self._declined: OrderedDict[str, float] = OrderedDict()
        self.bytes = 0
        self.counters: Counter[str] = Counter()

    def check(self, cache: KVCache, header: TransferHeader) -> str:
        """Why a transfer with this header cannot be accepted ("" if it can)."""
        if header.layout_hash != cache.layout.layout_hash():
            return (f"KV layout mismatch (producer {header.layout_hash}, consumer {cache.layout.layout_hash()}): "
                    "prefill and decode workers must serve the same model with the same dtype and block size")
        if header.rank != cache.rank.index:
            return f"KV rank mismatch: rank {header.rank}'s shard sent to rank {cache.rank.index} ({cache.rank})"
        if header.num_blocks != blocks_for_tokens(header.num_tokens, cache.layout.block_size):
            return f"{header.num_blocks} blocks for {header.num_tokens} tokens"
        return ""

    def reserve(self, header: TransferHeader, nbytes: int, refusal: str = "") -> str:
        """Accept the transfer ("") or say why not; a refusal is remembered,
        so the engine's load learns it at once instead of waiting."""
        tid = header.transfer_id
        with self._cond:
            self._expire(time.monotonic())
            if tid in self._declined:
                self.counters["refused"] += 1
                return "declined by the consumer"
            if tid in self._items:
                return "already received"
            if not refusal and self.bytes + nbytes > self._capacity:
                refusal = f"inbox full ({self.bytes + nbytes} B needed, capacity {self._capacity} B)"
            if refusal:
                self.counters["refused"] += 1
                self._items[tid] = Inbound(header, 0, time.monotonic(), state="failed", reason=refusal)
            else:
                self._items[tid] = Inbound(header, nbytes, time.monotonic())
                self.bytes += nbytes
            self._cond.notify_all()
            return refusal

    def finish(self, tid: str, layers: list[torch.Tensor] | None, reason: str = "") -> None:
        """The transfer arrived whole and checked (``layers`` by layer
        index), or failed."""
        with self._cond:
            item = self._items.get(tid)
            if item is None or item.state != "receiving":
                return
            if tid in self._declined:  # its load gave up while it arrived: nobody will take it
                self._drop(tid)
                return
            if layers is None:
                item.state, item.reason = "failed", reason
                self.counters["failed"] += 1
                self._release_bytes(item)
            else:
                item.state, item.layers = "complete", layers
                self.counters["received"] += 1
            self._cond.notify_all()

    def take(self, tid: str, start_timeout_s: float, timeout_s: float) -> Inbound:
        started = time.monotonic()
        with self._cond:
            while True:
                item = self._items.get(tid)
                if item is not None and item.state != "receiving":
                    if item.state == "failed":
                        self._drop(tid)
                        raise TransferUnavailable(f"transfer {tid} failed: {item.reason}")
                    return item
                if tid in self._declined:
                    raise TransferUnavailable(f"transfer {tid}: the request ended first")
                limit = timeout_s if item is not None else min(start_timeout_s, timeout_s)
                left = started + limit - time.monotonic()
                if left <= 0:
                    # The prompt is recomputed: what still comes is refused
                    # (or dropped once in) rather than held until the TTL.
                    self._declined[tid] = time.monotonic()
                    if item is None:
                        self.counters["never_started"] += 1
                        raise TransferUnavailable(f"transfer {tid}: its push never started within {limit:.1f} s")
                    raise TransferUnavailable(f"transfer {tid} did not arrive within {timeout_s:.1f} s")
                self._cond.wait(left)

    def release(self, tid: str, loaded: bool = False) -> None:
        with self._cond:
            self._drop(tid)
            if loaded:
                self.counters["loaded"] += 1

    def decline(self, tid: str) -> int:
        """Nobody will load ``tid``: free what arrived, refuse what comes.
        Returns the bytes freed."""
        with self._cond:
            self._declined[tid] = time.monotonic()
            item = self._items.get(tid)
            freed = 0
            if item is not None and item.state != "receiving":
                freed = item.nbytes
                self._drop(tid)
            self._cond.notify_all()
            return freed

    def expire(self) -> None:
        with self._cond:
            self._expire(time.monotonic())

    def stats(self) -> dict[str, int]:
        with self._cond:
            self._expire(time.monotonic())
            return {"bytes": self.bytes, "transfers": sum(1 for i in self._items.values() if i.nbytes),
                    **self.counters}

    def _release_bytes(self, item: Inbound) -> None:
        self.bytes -= item.nbytes
        item.nbytes = 0

    def _drop(self, tid: str) -> None:
        item = self._items.pop(tid, None)
        if item is not None:
            self._release_bytes(item)

    def _expire(self, now: float) -> None:
        for tid, item in list(self._items.items()):
            if item.state != "receiving" and now - item.created_s > self._ttl_s:
                if item.state == "complete":
                    self.counters["expired"] += 1
                    log.warning("kv expired unloaded", transfer_id=tid, bytes=item.nbytes)
                self._drop(tid)
        while self._declined and now - next(iter(self._declined.values())) > self._ttl_s:
            self._declined.popitem(last=False)


def load(inbox: Inbox, cache: KVCache, spec: LoadSpec, start_timeout_s: float, timeout_s: float) -> Received:
    """Wait for ``spec``'s transfer and write the wanted blocks into
    ``spec.block_ids``; the inbox's bytes are freed whatever happens."""
    item = inbox.take(spec.transfer_id, start_timeout_s, timeout_s)
    loaded = False
    try:
        header = item.header
        if header.num_tokens != spec.num_tokens:
            raise WireError(f"transfer covers {header.num_tokens} tokens, expected {spec.num_tokens}")
        prompt = cache.prompt(header.num_tokens)
        received = Received(item.nbytes)
        for index, payload in enumerate(item.layers):
            if 0 <= spec.keep_block < prompt.num_blocks:
                received.kept[index] = prompt.block(payload, spec.keep_block).clone()
            prompt.scatter(payload, cache.layers[index], cache.block_dims[index], spec.first_block,
                           list(spec.block_ids))
        loaded = True
        return received
    finally:
        inbox.release(spec.transfer_id, loaded)


class InboxBackend:
    """What the push backends share: the producer keeps nothing (its
    layers were copied out as they ran), and the consumer loads from the
    engine's inbox."""

    holds_source_blocks = False

    def __init__(self, inbox: Inbox | None, fetch_timeout_ms: int, start_timeout_ms: int,
                 copies: CopyBudget | None = None):
        self._inbox = inbox if inbox is not None else Inbox(1 << 30, 60.0)
        self._copies = copies if copies is not None else CopyBudget(1 << 30)  # producer: layer copies in flight
        self._fetch_timeout_s = fetch_timeout_ms / 1000
        self._start_timeout_s = start_timeout_ms / 1000
        self._cache: KVCache | None = None

    def hold(self, req_ids: set[str], held: bool) -> None:
        pass

    def finished_sending(self) -> set[str]:
        return set()

    def receive(self, spec: LoadSpec) -> Received:
        return load(self._inbox, self._cache, spec, self._start_timeout_s, self._fetch_timeout_s)

    def cancel(self, transfer_id: str) -> None:
        self._inbox.decline(transfer_id)

    def decline(self, transfer_id: str, source: str) -> None:
        self._inbox.decline(transfer_id)
