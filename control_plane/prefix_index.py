"""Which prompt prefixes each worker's engine holds in its prefix cache.

Fed by the engines' own KV events: ``BlockStored`` carries each block's
token ids, so blocks are keyed by Baton's own chained hash of the tokens
(``block_keys``) and a lookup needs nothing of vLLM's hash seed;
``BlockRemoved`` names blocks by the engine's hash, mapped back to ours.
A placement also counts a prompt's blocks as cached on the worker that will
compute them, for a few seconds, until the engine's events confirm it:
requests sharing a prefix that arrive together find it.

A worker whose engine publishes no events gets an index learned from
routing history instead: every prompt placed on it is taken as cached
there, the oldest forgotten beyond the engine's capacity. Each worker's
source is reported, so a silently empty index shows.

Pure: time is passed in.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import xxhash

ROOT = 0  # the parent key of a prompt's first block
PROVISIONAL_S = 5.0  # how long a placement's blocks count as cached without an event


def block_keys(token_ids: Sequence[int], block_size: int) -> list[int]:
    """Keys of a prompt's whole blocks, each chained on its parent's."""
    keys: list[int] = []
    parent = ROOT
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        tokens = array("I", token_ids[start:start + block_size]).tobytes()
        parent = xxhash.xxh3_64_intdigest(parent.to_bytes(8, "little") + tokens)
        keys.append(parent)
    return keys


@dataclass(frozen=True)
class Stored:
    """The engine cached blocks (``BlockStored``)."""

    engine_hashes: Sequence[int]
    parent_engine_hash: int | None  # None: the blocks start a prompt
    token_ids: Sequence[int]
    block_size: int


@dataclass(frozen=True)
class Removed:
    """The engine evicted blocks (``BlockRemoved``)."""

    engine_hashes: Sequence[int]


@dataclass(frozen=True)
class Cleared:
    """The engine dropped its whole prefix cache (``AllBlocksCleared``)."""


KVEvent = Stored | Removed | Cleared


@dataclass
class WorkerPrefixes:
    source: str  # "events" | "history"
    block_size: int
    capacity_blocks: int
    keys: OrderedDict[int, None] = field(default_factory=OrderedDict)  # cached, oldest first
    key_of: dict[int, int] = field(default_factory=dict)  # engine hash → key
    engine_hash_of: dict[int, int] = field(default_factory=dict)  # key → engine hash
    provisional: dict[int, float] = field(default_factory=dict)  # key → placed at
    orphans: int = 0  # stored blocks whose parent the index never saw: not indexable

    def holds(self, key: int, now_s: float) -> bool:
        if key in self.keys:
            return True
        placed = self.provisional.get(key)
        return placed is not None and now_s - placed <= PROVISIONAL_S


class PrefixIndex:
    def __init__(self) -> None:
        self._workers: dict[str, WorkerPrefixes] = {}

    def track(self, worker_id: str, *, events: bool, block_size: int, capacity_blocks: int) -> None:
        """Start (or keep) indexing a worker; a worker seen anew starts empty."""
        current = self._workers.get(worker_id)
        source = "events" if events else "history"
        if current is None or current.source != source or current.block_size != block_size:
            self._workers[worker_id] = WorkerPrefixes(source, block_size, max(1, capacity_blocks))

    def forget(self, worker_id: str) -> None:
        self._workers.pop(worker_id, None)

    def reset(self, worker_id: str) -> None:
        """Its events were interrupted: what the index holds may be stale."""
        current = self._workers.get(worker_id)
        if current is not None:
            self._workers[worker_id] = WorkerPrefixes(current.source, current.block_size, current.capacity_blocks)

    def source(self, worker_id: str) -> str:
        current = self._workers.get(worker_id)
        return current.source if current else ""

    def block_size(self, worker_id: str) -> int:
        current = self._workers.get(worker_id)
        return current.block_size if current else 0

    def cached_blocks(self, worker_id: str) -> int:
        current = self._workers.get(worker_id)
        return len(current.keys) if current else 0

    def orphans(self, worker_id: str) -> int:
        current = self._workers.get(worker_id)
        return current.orphans if current else 0

    def apply(self, worker_id: str, event: KVEvent) -> None:
        prefixes = self._workers.get(worker_id)
        if prefixes is None or prefixes.source != "events":
            return
        if isinstance(event, Cleared):
            self.reset(worker_id)
        elif isinstance(event, Removed):
            for engine_hash in event.engine_hashes:
                key = prefixes.key_of.pop(engine_hash, None)
                if key is not None:
                    prefixes.keys.pop(key, None)
                    prefixes.engine_hash_of.pop(key, None)
        else:
            self._stored(prefixes, event)

    @staticmethod
    def _stored(prefixes: WorkerPrefixes, event: Stored) -> None:
        if event.block_size != prefixes.block_size or len(event.token_ids) != event.block_size * len(
                event.engine_hashes):
            prefixes.orphans += len(event.engine_hashes)
            return
        if event.parent_engine_hash is None:
            parent = ROOT
        elif event.parent_engine_hash in prefixes.key_of:
            parent = prefixes.key_of[event.parent_engine_hash]
        else:
            prefixes.orphans += len(event.engine_hashes)
            return
        for i, engine_hash in enumerate(event.engine_hashes):
            tokens = array("I", event.token_ids[i * event.block_size:(i + 1) * event.block_size]).tobytes()
            parent = xxhash.xxh3_64_intdigest(parent.to_bytes(8, "little") + tokens)
            prefixes.keys[parent] = None
            prefixes.keys.move_to_end(parent)
            prefixes.key_of[engine_hash] = parent
            prefixes.engine_hash_of[parent] = engine_hash
            prefixes.provisional.pop(parent, None)

    def placed(self, worker_id: str, keys: Sequence[int], now_s: float) -> None:
        """``worker_id`` will compute a prompt with these block keys."""
        prefixes = self._workers.get(worker_id)
        if prefixes is None:
            return
        if prefixes.source == "history":
            for key in keys:
                prefixes.keys[key] = None
                prefixes.keys.move_to_end(key)
            while len(prefixes.keys) > prefixes.capacity_blocks:
                prefixes.keys.popitem(last=False)
            return
        for key in keys:
            if key not in prefixes.keys:
                prefixes.provisional[key] = now_s
        stale = [k for k, placed in prefixes.provisional.items() if now_s - placed > PROVISIONAL_S]
        for key in stale:
            del prefixes.provisional[key]

    def matched_blocks(self, worker_id: str, keys: Sequence[int], now_s: float) -> int:
        """How many of a prompt's leading blocks the worker holds."""
        prefixes = self._workers.get(worker_id)
        if prefixes is None:
            return 0
        matched = 0
        for key in keys:
            if not prefixes.holds(key, now_s):
                break
            matched += 1
        return matched
