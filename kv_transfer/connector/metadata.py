"""What the scheduler side tells the worker side each step, and back."""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorMetadata,
    KVConnectorWorkerMetadata,
)

from kv_transfer.transport import FALLBACK_BACKEND


@dataclass(frozen=True)
class SaveSpec:
    """Producer: this step completes the prompt of ``req_id``; push its KV."""

    req_id: str
    transfer_id: str
    kv_target: str  # the consumer's endpoint for ``backend``
    block_ids: tuple[int, ...]  # engine block ids covering the prompt, in order
    num_tokens: int  # prompt tokens covered
    traceparent: str
    backend: str = FALLBACK_BACKEND


@dataclass(frozen=True)
class LoadSpec:
    """Consumer: fetch transfer ``transfer_id`` and write request blocks
    ``first_block ..`` into engine blocks ``block_ids``."""

    req_id: str
    transfer_id: str
    block_ids: tuple[int, ...]
    first_block: int  # index within the request of block_ids[0]
    num_tokens: int  # prompt tokens the transfer covers
    keep_block: int = -1  # request block to keep for a RestoreSpec, or -1
    backend: str = FALLBACK_BACKEND
    source: str = ""  # the producer's endpoint for ``backend`` (pull backends)
    traceparent: str = ""


@dataclass(frozen=True)
class RestoreSpec:
    """Consumer: this step recomputes the prompt's last position of
    ``req_id`` (to sample the answer's first token), which rewrites that
    position's KV in engine block ``block_id``. After each layer the
    transferred block goes back, so every later token attends over exactly
    the KV the prefill engine computed, as in one engine."""

    req_id: str
    block_id: int


@dataclass
class BatonConnectorMetadata(KVConnectorMetadata):
    saves: list[SaveSpec] = field(default_factory=list)
    loads: list[LoadSpec] = field(default_factory=list)
    restores: list[RestoreSpec] = field(default_factory=list)
    # Pull backends: finished producer requests whose blocks the scheduler
    # kept for the consumer to read (``held``) or freed at once (``released``).
    held: set[str] = field(default_factory=set)
    released: set[str] = field(default_factory=set)
    # Consumer: (backend, transfer id, producer endpoint) of requests that
    # ended without loading their transfer (a local prefix hit, an abort).
    declined: list[tuple[str, str, str]] = field(default_factory=list)
    # Running requests handed, with their KV, to another engine (a draining
    # decode worker): their blocks go out now, outside any forward.
    moves: list[SaveSpec] = field(default_factory=list)


@dataclass
class BatonWorkerMetadata(KVConnectorWorkerMetadata):
    """Worker side → scheduler side, each step: the KV bytes each finished
    load moved, by request (summed over the engine's ranks, which each load
    their shard), and how long it took."""

    loaded_bytes: dict[str, int] = field(default_factory=dict)
    load_seconds: dict[str, float] = field(default_factory=dict)  # the slowest rank's

    def aggregate(self, other: KVConnectorWorkerMetadata) -> BatonWorkerMetadata:
        if isinstance(other, BatonWorkerMetadata):
            for req_id, nbytes in other.loaded_bytes.items():
                self.loaded_bytes[req_id] = self.loaded_bytes.get(req_id, 0) + nbytes
            for req_id, seconds in other.load_seconds.items():
                self.load_seconds[req_id] = max(self.load_seconds.get(req_id, 0.0), seconds)
        return self
