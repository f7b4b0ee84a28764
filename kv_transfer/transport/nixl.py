"""NIXL backend: the decode engine reads the prompt's blocks straight out of
the prefill engine's paged KV cache into the blocks vLLM allocated for it.

One NIXL agent per engine registers every layer's KV tensor once. Transfers
are one-sided READs over UCX: shared memory between processes on one host,
TCP or RDMA across hosts, and VRAM to VRAM (NVLink, GPUDirect RDMA) when the
caches live on GPUs; the code is the same, only the memory type differs.

Why the consumer pulls: the prefill engine never waits for a decode engine.
It computes at full speed, keeps the prompt's blocks (vLLM delays freeing
them) and announces them; the decode engine reads them when it has its own
blocks, with no staging copy and no second hop. A push (prefill WRITEs)
would need decode's block ids before prefill computes. vLLM's own
NixlConnector and llm-d make the same choice.

Agents talk through NIXL notifications:

    producer → consumer   B<transfer id>   the prompt's step began
                          R<json>          blocks ready: ids, tokens, per-block digests
                          F<json>          the blocks are gone (request aborted)
    consumer → producer   D<transfer id>   read (or given up): free the blocks

Integrity: the producer hashes each block (all layers, xxh3) after the
forward; the consumer hashes what landed and refuses a mismatch.

Of a last block the prompt fills only in part, only the filled token slots
are read, where that takes a few descriptors per layer (FlashAttention's
layout: one per K and V half). vLLM's CPU attention scatters them (keys
transposed, or packed in AMX tiles), hundreds of small pieces per layer:
reading them took 35 ms against 1 ms for the whole block, which is read
instead.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
import xxhash

from baton.logs import get_logger
from kv_transfer.connector.metadata import LoadSpec, SaveSpec
from kv_transfer.transport.base import KVCache, Received
from kv_transfer.wire import WireError, blocks_for_tokens

log = get_logger(__name__)

_MEM_TYPE = {"cpu": "DRAM", "cuda": "VRAM"}


class TransferUnavailable(Exception):
    """The producer never offered the blocks, or withdrew them."""


Runs = tuple[tuple[int, int], ...]  # (element offset, length) within a block laid out as its shape
MAX_PARTIAL_PIECES = 16  # per block and layer; a partial block in more pieces is read whole
_PROGRESS_AFTER_SEND_S = 1.0  # how long the poller drives the agent after a notification went out


@dataclass(frozen=True)
class Geometry:
    """Where block ``b`` of layer ``l`` lives: ``outer`` contiguous segments
    of ``inner_bytes`` at ``bases[l] + (o * num_blocks + b) * inner_bytes``
    (e.g. the K and V halves of a ``(2, num_blocks, ...)`` tensor)."""

    bases: tuple[int, ...]
    outer: int
    num_blocks: int
    inner_bytes: int
    element_size: int
    mem_type: str
    device_id: int

    @classmethod
    def of(cls, cache: KVCache) -> Geometry:
        first, dim = cache.layers[0], cache.block_dims[0]
        for tensor, block_dim in zip(cache.layers, cache.block_dims, strict=True):
            if not tensor.is_contiguous() or block_dim != dim or tensor.shape != first.shape:
                raise ValueError("NIXL backend: every layer's KV tensor must be contiguous and shaped alike")
        shape, size, device = tuple(first.shape), first.element_size(), first.device
        return cls(tuple(t.data_ptr() for t in cache.layers), math.prod(shape[:dim]), cache.num_blocks,
                   size * math.prod(shape[dim + 1:]), size, _MEM_TYPE[device.type], device.index or 0)

    @property
    def block_bytes(self) -> int:
        """One block of every layer."""
        return len(self.bases) * self.outer * self.inner_bytes

    def pieces(self, block: int, runs: Runs) -> list[tuple[int, int]]:
        """(offset from a layer's base, length) of ``runs`` of a block."""
        pieces = []
        for offset, length in runs:
            start, end = offset * self.element_size, (offset + length) * self.element_size
            while start < end:  # a run may span the outer segments
                o, within = divmod(start, self.inner_bytes)
                take = min(end - start, self.inner_bytes - within)
                pieces.append(((o * self.num_blocks + block) * self.inner_bytes + within, take))
                start += take
        return pieces

    def segments(self, blocks: list[int], whole: Runs, last: Runs) -> list[tuple[int, int, int]]:
        """(address, length, device) of the given blocks, layer by layer:
        ``whole`` runs of each, ``last`` runs of the last one. Two lists
        built for the same number of blocks and runs pair up in order."""
        shape = [p for i, b in enumerate(blocks) for p in self.pieces(b, last if i == len(blocks) - 1 else whole)]
        return [(base + offset, length, self.device_id) for base in self.bases for offset, length in shape]

    def to_dict(self) -> dict:
        return {"bases": list(self.bases), "outer": self.outer, "num_blocks": self.num_blocks,
                "inner_bytes": self.inner_bytes, "element_size": self.element_size, "mem_type": self.mem_type,
                "device_id": self.device_id}

    @classmethod
    def from_dict(cls, data: dict) -> Geometry:
        return cls(tuple(data["bases"]), data["outer"], data["num_blocks"], data["inner_bytes"],
                   data["element_size"], data["mem_type"], data["device_id"])


@dataclass(frozen=True)
class Peer:
    """Another engine's agent, as its registry endpoint describes it."""

    agent: str
    metadata: bytes
    layout_hash: str
    geometry: Geometry
    rank: int  # its ``ParallelRank.index``

    @classmethod
    def parse(cls, endpoint: str) -> Peer:
        try:
            data = json.loads(endpoint)
            return cls(data["agent"], base64.b64decode(data["metadata"]), data["layout_hash"],
                       Geometry.from_dict(data["geometry"]), int(data["rank"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise WireError(f"not a NIXL endpoint: {exc}") from exc


def block_digests(layers: list[torch.Tensor], geometry: Geometry, blocks: list[int], whole: Runs,
                  last: Runs) -> list[str]:
    """xxh3-64 of each block over all layers, in layer order: its ``whole``
    runs, or ``last`` runs for the last one."""
    views = [t.view(torch.uint8).view(-1) for t in layers]
    digests = []
    for i, b in enumerate(blocks):
        h = xxhash.xxh3_64()
        pieces = geometry.pieces(b, last if i == len(blocks) - 1 else whole)
        for view in views:
            for start, length in pieces:
                segment = view[start:start + length]
                h.update(memoryview(segment.numpy() if segment.device.type == "cpu" else segment.cpu().numpy()))
        digests.append(h.hexdigest())
    return digests


@dataclass
class _Offer:
    """Producer: a prompt's blocks, announced and kept until read."""

    req_id: str
    transfer_id: str
    consumer: str  # agent name
    held: bool | None = None  # set once the scheduler said whether it delayed the free
    done: bool = False
    # Its TTL runs from when the consumer is told the blocks are ready to
    # read (None until then), not from when the step that computes them
    # began: one prefill step can outlast the TTL on a loaded host.
    announced_s: float | None = None


@dataclass
class _Note:
    kind: str  # "B", "R" or "F"
    body: dict = field(default_factory=dict)
    received_s: float = 0.0


class NixlBackend:
    name = "nixl"
    holds_source_blocks = True

    def __init__(self, agent_name: str, fetch_timeout_ms: int = 15_000, start_timeout_ms: int = 3_000,
                 offer_ttl_s: float = 60.0):
        from nixl._api import nixl_agent, nixl_agent_config

        self._agent_name = agent_name
        # No progress thread: NIXL's spins without pause (a whole core per
        # engine here). Progress happens when this backend calls in: while a
        # read runs, and every poll while transfers are pending.
        self._agent = nixl_agent(agent_name, nixl_agent_config(enable_prog_thread=False, backends=["UCX"]))
        self._agent_lock = threading.Lock()  # the agent is driven from several threads
        self._fetch_timeout_s = fetch_timeout_ms / 1000
        self._start_timeout_s = start_timeout_ms / 1000
        self._offer_ttl_s = offer_ttl_s
        self._cache: KVCache | None = None
        self._geometry: Geometry | None = None
        self._runs_by_tokens: dict[int, Runs] = {}
        self._peers: dict[str, Peer] = {}  # agent name → peer
        self._cond = threading.Condition()
        self._offers: dict[str, _Offer] = {}  # transfer id → offer (producer)
        self._notes: dict[str, _Note] = {}  # transfer id → latest word from its producer (consumer)
        self._waiting = 0  # consumer loads waiting for a note
        self._freed: set[str] = set()  # held req ids whose blocks may be freed
        # Producer: transfers their consumer gave up on (or declined) before
        # they were offered, by transfer id → when it said so; an offer that
        # comes late is done at once instead of held until its TTL.
        self._given_up: dict[str, float] = {}
        self._closed = False
        # Without a progress thread, a notification sent while nothing else
        # drives the agent stays queued (a consumer's "done" or "given up"
        # after its last read, a first message before the connection is up):
        # the poller drives it a while after each send.
        self._progress_until = 0.0
        # One thread, so a transfer's B always goes out before its R.
        self._announcer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="baton-nixl-announce")
        self._poller = threading.Thread(target=self._poll_loop, name="baton-nixl-notifs", daemon=True)
        self._poller.start()

    # --- set-up -----------------------------------------------------------
    def attach(self, cache: KVCache) -> None:
        self._cache = cache
        self._geometry = Geometry.of(cache)
        with self._agent_lock:
            self._agent.register_memory(self._agent.get_reg_descs(cache.layers))
        log.info("nixl agent ready", agent=self._agent_name, layers=len(cache.layers),
                 mem_type=self._geometry.mem_type)

    def endpoint(self) -> str:
        with self._agent_lock:
            metadata = self._agent.get_agent_metadata()
        return json.dumps({"agent": self._agent_name, "metadata": base64.b64encode(metadata).decode(),
                           "layout_hash": self._cache.layout.layout_hash(), "geometry": self._geometry.to_dict(),
                           "rank": self._cache.rank.index})

    def _peer(self, endpoint: str) -> Peer:
        peer = Peer.parse(endpoint)
        with self._agent_lock:
            known = self._peers.get(peer.agent)
            if known is None:
                self._agent.add_remote_agent(peer.metadata)
                self._peers[peer.agent] = known = peer
        return known

    # --- producer ---------------------------------------------------------
    def send(self, spec: SaveSpec) -> _Outbound:
        consumer = self._peer(spec.kv_target)
        offer = _Offer(spec.req_id, spec.transfer_id, consumer.agent)
        with self._cond:
            offer.done = self._given_up.pop(spec.transfer_id, None) is not None
            self._offers[spec.transfer_id] = offer
            self._cond.notify_all()
        self._announcer.submit(self._notify, consumer.agent, b"B" + spec.transfer_id.encode())
        return _Outbound(self, spec, consumer.agent)

    def _announce(self, spec: SaveSpec, consumer: str) -> None:
        with self._cond:
            offer = self._offers.get(spec.transfer_id)
            if offer is not None:
                offer.announced_s = time.monotonic()
        blocks = list(spec.block_ids)
        last = self._runs(self._tokens_in(len(blocks) - 1, spec.num_tokens))
        body = {"t": spec.transfer_id, "n": spec.num_tokens, "b": blocks,
                "h": block_digests(self._cache.layers, self._geometry, blocks, self._runs(), last)}
        self._notify(consumer, b"R" + json.dumps(body).encode())

    def _notify(self, agent: str, message: bytes) -> None:
        try:
            with self._agent_lock:
                self._agent.send_notif(agent, message)
        except Exception as exc:
            log.warning("nixl notification failed", peer=agent, kind=message[:1].decode(), error=str(exc))
            if type(exc).__name__ == "nixlRemoteDisconnectError":
                self._consumer_gone(agent)
            return
        with self._cond:
            self._progress_until = time.monotonic() + _PROGRESS_AFTER_SEND_S
            self._cond.notify_all()

    def _consumer_gone(self, agent: str) -> None:
        """``agent`` disconnected: a restarted engine is another agent, so
        nothing offered to it will be read; its blocks are freed now (once
        held), not at the offer TTL."""
        with self._cond:
            gone = [offer for offer in self._offers.values() if offer.consumer == agent and not offer.done]
            for offer in gone:
                offer.done = True
                self._release(offer)
        if gone:
            log.warning("kv consumer gone; freeing what was offered to it", peer=agent, offers=len(gone))

    def hold(self, req_ids: set[str], held: bool) -> None:
        if not req_ids:
            return
        with self._cond:
            offered = {offer.req_id for offer in self._offers.values()}
            if held:
                # No offer left to wait for (it could not be opened, or it
                # expired before this news): vLLM must free the blocks now,
                # or the request stays and its engine steps forever.
                self._freed |= req_ids - offered
            for offer in list(self._offers.values()):
                if offer.req_id not in req_ids:
                    continue
                offer.held = held
                if held and offer.done:
                    self._release(offer)
                elif not held:  # the blocks are being freed: the consumer must not read them
                    del self._offers[offer.transfer_id]
                    if not offer.done:
                        self._announcer.submit(self._notify, offer.consumer, b"F" + json.dumps(
                            {"t": offer.transfer_id, "e": "the prefill request ended before its KV was read"}
                        ).encode())

    def finished_sending(self) -> set[str]:
        with self._cond:
            freed, self._freed = self._freed, set()
        return freed

    # --- consumer ---------------------------------------------------------
    def cancel(self, transfer_id: str) -> None:
        with self._cond:
            self._notes[transfer_id] = _Note("F", {"t": transfer_id, "e": "the request ended first"},
                                             time.monotonic())
            self._cond.notify_all()

    def decline(self, transfer_id: str, source: str) -> None:
        peer = self._peer(source)
        self._announcer.submit(self._notify, peer.agent, b"D" + transfer_id.encode())

    def receive(self, spec: LoadSpec) -> Received:
        peer = self._peer(spec.source)
        try:
            return self._receive(spec, peer)
        finally:
            # Read or given up: either way the producer may free the blocks.
            self._announcer.submit(self._notify, peer.agent, b"D" + spec.transfer_id.encode())

    def _receive(self, spec: LoadSpec, peer: Peer) -> Received:
        mine = self._cache.layout.layout_hash()
        if peer.layout_hash != mine:
            raise WireError(f"KV layout mismatch (producer {peer.layout_hash}, consumer {mine}): prefill and "
                            "decode workers must serve the same model with the same dtype and block size")
        if peer.rank != self._cache.rank.index:
            raise WireError(f"KV rank mismatch: reading rank {peer.rank}'s shard into rank {self._cache.rank.index} "
                            f"({self._cache.rank})")
        offer = self._await_offer(spec.transfer_id)
        if offer["n"] != spec.num_tokens:
            raise WireError(f"transfer covers {offer['n']} tokens, expected {spec.num_tokens}")
        remote_blocks, digests = offer["b"], offer["h"]
        if len(remote_blocks) != blocks_for_tokens(spec.num_tokens, self._cache.layout.block_size) or len(
                digests) != len(remote_blocks):
            raise WireError(f"transfer offers {len(remote_blocks)} blocks for {spec.num_tokens} tokens")
        wanted = list(range(spec.first_block, spec.first_block + len(spec.block_ids)))
        local = list(spec.block_ids)
        received = Received(0)
        whole = self._runs()
        if wanted:
            last = self._runs(self._tokens_in(wanted[-1], spec.num_tokens))
            self._transfer(peer, self._geometry.segments(local, whole, last), self._geometry.mem_type,
                           peer.geometry.segments([remote_blocks[i] for i in wanted], whole, last))
            self._verify(self._cache.layers, self._geometry, local, whole, last, [digests[i] for i in wanted])
            received.bytes = (len(local) - 1) * self._geometry.block_bytes + self._bytes(last)
        keep = spec.keep_block
        if 0 <= keep < len(remote_blocks):
            tokens = self._tokens_in(keep, spec.num_tokens)
            if keep in wanted:
                local_block = local[wanted.index(keep)]
                slots = self._cache.slots
                received.kept = {i: slots.copy_first(t.select(d, local_block), tokens)
                                 for i, (t, d) in enumerate(zip(self._cache.layers, self._cache.block_dims,
                                                                strict=True))}
            else:
                received.kept = self._read_aside(peer, remote_blocks[keep], tokens, digests[keep])
                received.bytes += self._bytes(self._runs(tokens))
        return received

    def _tokens_in(self, block: int, num_tokens: int) -> int:
        """Slots of a prompt's ``block`` its ``num_tokens`` fill."""
        size = self._cache.layout.block_size
        return min(size, num_tokens - block * size)

    def _runs(self, tokens: int | None = None) -> Runs:
        """Where a block's first ``tokens`` slots are (all of them if None)."""
        slots = self._cache.slots
        if tokens is None or tokens >= slots.block_size:
            return ((0, slots.elements),)
        runs = self._runs_by_tokens.get(tokens)
        if runs is None:
            runs = tuple(slots.runs(tokens))
            if len(self._geometry.pieces(0, runs)) > MAX_PARTIAL_PIECES:
                runs = ((0, slots.elements),)
            self._runs_by_tokens[tokens] = runs
        return runs

    def _bytes(self, runs: Runs) -> int:
        """Of ``runs`` of a block, over every layer."""
        return len(self._cache.layers) * self._geometry.element_size * sum(length for _, length in runs)

    def _await_offer(self, transfer_id: str) -> dict:
        started = time.monotonic()
        with self._cond:
            self._waiting += 1
            self._cond.notify_all()
            try:
                while True:
                    note = self._notes.get(transfer_id)
                    if note is not None and note.kind in ("R", "F"):
                        del self._notes[transfer_id]
                        if note.kind == "F":
                            raise TransferUnavailable(f"transfer {transfer_id}: {note.body.get('e', 'withdrawn')}")
                        return note.body
                    began = note is not None
                    limit = self._fetch_timeout_s if began else min(self._start_timeout_s, self._fetch_timeout_s)
                    left = started + limit - time.monotonic()
                    if left <= 0:
                        if began:
                            raise TransferUnavailable(
                                f"transfer {transfer_id} did not arrive within {self._fetch_timeout_s:.1f} s")
                        raise TransferUnavailable(
                            f"transfer {transfer_id}: its push never started within {limit:.1f} s")
                    self._cond.wait(left)
            finally:
                self._waiting -= 1

    def _transfer(self, peer: Peer, local: list, local_mem: str, remote: list) -> None:
        deadline = time.monotonic() + self._fetch_timeout_s
        with self._agent_lock:
            local_descs = self._agent.get_xfer_descs(local, local_mem)
            remote_descs = self._agent.get_xfer_descs(remote, peer.geometry.mem_type)
            handle = self._agent.initialize_xfer("READ", local_descs, remote_descs, peer.agent)
            state = self._agent.transfer(handle)
        try:
            while state != "DONE":
                if state == "ERR":
                    raise WireError(f"NIXL read from {peer.agent} failed")
                if time.monotonic() > deadline:
                    raise WireError(f"NIXL read from {peer.agent} did not finish in {self._fetch_timeout_s:.1f} s")
                time.sleep(0)  # let the GIL go; the copy itself runs in UCX
                with self._agent_lock:
                    state = self._agent.check_xfer_state(handle)
        finally:
            with self._agent_lock:
                self._agent.release_xfer_handle(handle)

    @staticmethod
    def _verify(layers: list[torch.Tensor], geometry: Geometry, blocks: list[int], whole: Runs, last: Runs,
                expected: list[str]) -> None:
        got = block_digests(layers, geometry, blocks, whole, last)
        bad = [i for i, (a, b) in enumerate(zip(got, expected, strict=True)) if a != b]
        if bad:
            raise WireError(f"{len(bad)} of {len(expected)} blocks failed their checksum (first: block {bad[0]})")

    def _read_aside(self, peer: Peer, remote_block: int, tokens: int, digest: str) -> dict[int, torch.Tensor]:
        """One block the decode engine recomputes and restores (the prompt's
        last position opens a new block): its first ``tokens`` slots, read
        into a scratch buffer laid out as the cache, one block per layer."""
        cache = self._cache
        scratch = torch.empty((len(cache.layers), *cache.layout.block_shape), dtype=cache.layers[0].dtype,
                              device=cache.device)
        layers = list(scratch)
        aside = dataclasses.replace(self._geometry, bases=tuple(t.data_ptr() for t in layers), num_blocks=1)
        with self._agent_lock:
            registered = self._agent.get_reg_descs([scratch])
            self._agent.register_memory(registered)
        runs = self._runs(tokens)
        try:
            self._transfer(peer, aside.segments([0], runs, runs), aside.mem_type,
                           peer.geometry.segments([remote_block], runs, runs))
        finally:
            with self._agent_lock:
                self._agent.deregister_memory(registered)
        self._verify(layers, aside, [0], runs, runs, [digest])
        return {i: cache.slots.copy_first(t, tokens) for i, t in enumerate(layers)}

    # --- notifications ----------------------------------------------------
    def _poll_loop(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._waiting and not self._offers:
                    if self._progress_until > time.monotonic():
                        break
                    self._cond.wait()
                if self._closed:
                    return
            try:
                with self._agent_lock:
                    notifs = self._agent.get_new_notifs()
            except Exception as exc:
                log.warning("nixl notifications unreadable", error=str(exc))
                notifs = {}
            with self._cond:
                for messages in notifs.values():
                    for message in messages:
                        self._on_notif(message)
                self._expire(time.monotonic())
                self._cond.notify_all()
            # Tighter while a load waits: this poll is part of its latency.
            time.sleep(0.0001 if self._waiting else 0.0005)

    def _on_notif(self, message: bytes) -> None:
        kind, payload = message[:1].decode(), message[1:]
        if kind == "D":
            offer = self._offers.get(payload.decode())
            if offer is not None:
                offer.done = True
                self._release(offer)
            else:
                self._given_up[payload.decode()] = time.monotonic()
        elif kind == "B":
            self._notes.setdefault(payload.decode(), _Note("B", received_s=time.monotonic()))
        elif kind in ("R", "F"):
            body = json.loads(payload)
            self._notes[body["t"]] = _Note(kind, body, time.monotonic())

    def _release(self, offer: _Offer) -> None:
        if offer.held:
            self._freed.add(offer.req_id)
            del self._offers[offer.transfer_id]

    def _expire(self, now: float) -> None:
        for offer in list(self._offers.values()):
            if offer.announced_s is not None and now - offer.announced_s > self._offer_ttl_s:
                if not offer.done:
                    log.warning("kv offer expired unread; freeing its blocks", transfer_id=offer.transfer_id)
                offer.done = True
                if offer.held is None:  # no word yet whether they were held: ``hold`` frees them then
                    del self._offers[offer.transfer_id]
                else:
                    self._release(offer)
        for tid, note in list(self._notes.items()):
            if now - note.received_s > self._offer_ttl_s:
                del self._notes[tid]
        for tid, said_s in list(self._given_up.items()):
            if now - said_s > self._offer_ttl_s:
                del self._given_up[tid]

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._announcer.shutdown(wait=False, cancel_futures=True)


class _Outbound:
    def __init__(self, backend: NixlBackend, spec: SaveSpec, consumer: str):
        self._backend = backend
        self._spec = spec
        self._consumer = consumer

    def layer_saved(self, index: int, kv_layer: torch.Tensor) -> None:
        pass  # the consumer reads the blocks from the cache itself

    def step_done(self) -> None:
        self._backend._announcer.submit(self._backend._announce, self._spec, self._consumer)
