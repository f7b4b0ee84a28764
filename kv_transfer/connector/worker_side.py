"""Worker half of the Baton connector: moves KV bytes. Lives in the process
that owns the KV tensors (vLLM's worker).

It drives the transfer backends (``kv_transfer.transport``), one per
transfer as the scheduler side named it. Producer: ``save_kv_layer`` hands
each layer of a finished prompt to the transfer as soon as the layer has run
(push backends copy its blocks out and send them while later layers still
compute). Consumer: ``start_load_kv`` hands each load to a thread that brings
the KV into the blocks vLLM allocated; the scheduler keeps the request
waiting until ``get_transfer_results`` reports it, failed loads included
(vLLM then recomputes the prompt).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorTransferResults

from baton.logs import get_logger
from kv_transfer.blocks import write_block
from kv_transfer.connector.metadata import (
    BatonConnectorMetadata,
    BatonWorkerMetadata,
    LoadSpec,
    SaveSpec,
)
from kv_transfer.connector.transfer_spans import TransferSpans
from kv_transfer.handoff import mark_sent
from kv_transfer.transport.base import (
    SINGLE_RANK,
    KVBackend,
    KVCache,
    Outbound,
    ParallelRank,
    endpoint_for,
)

log = get_logger(__name__)


class BatonWorkerSide:
    def __init__(self, layout_signature: str, block_size: int, num_blocks: int, backends: dict[str, KVBackend],
                 cpu_attention_isa: str = "", handoff_dir: str = "", spans: TransferSpans | None = None):
        self._signature = layout_signature
        self._spans = spans or TransferSpans("engine")
        self._cpu_attention_isa = cpu_attention_isa  # the attention's block layout, see ``TokenSlots``
        self._block_size = block_size
        self._num_blocks = num_blocks
        self._backends = backends
        self._handoff_dir = Path(handoff_dir) if handoff_dir else None
        self.cache: KVCache | None = None
        self._layer_index: dict[str, int] = {}
        self._outbound: dict[str, Outbound] = {}  # this step's transfers by req_id
        # Loads wait on the network; bounded, like every pool here.
        self._load_pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="baton-kv-load")
        self._lock = threading.Lock()
        self._finished_recving: set[str] = set()
        self._failed_recving: set[str] = set()
        self._loaded_bytes: dict[str, int] = {}  # finished loads' bytes, for the scheduler side's report
        self._load_seconds: dict[str, float] = {}  # ... and durations
        self._kept: dict[str, dict[int, torch.Tensor]] = {}  # req_id → layer index → block, for restores
        self._in_flight: dict[str, LoadSpec] = {}  # loads that run, by req_id
        self._gone: set[str] = set()  # req_ids that finished while their load ran
        self._restores: list[tuple[int, dict[int, torch.Tensor]]] = []  # this step's (block id, kept)

    @property
    def layout(self):
        return self.cache.layout if self.cache else None

    # --- set-up -----------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor], rank: ParallelRank = SINGLE_RANK) -> None:
        self.cache = KVCache(kv_caches, self._num_blocks, self._signature, self._block_size, rank,
                             self._cpu_attention_isa)
        self._layer_index = {name: i for i, name in enumerate(self.cache.names)}
        for backend in self._backends.values():
            backend.attach(self.cache)
        self._spans.start()
        log.info("kv caches registered", layers=len(self.cache.names), block_shape=self.cache.layout.block_shape,
                 layout_hash=self.cache.layout.layout_hash(), backends=sorted(self._backends), rank=str(rank))

    def endpoints(self) -> dict[str, str]:
        """Per backend, how peers reach this engine (empty ones left out)."""
        return {name: ep for name, backend in self._backends.items() if (ep := backend.endpoint())}

    def _backend(self, name: str) -> KVBackend:
        backend = self._backends.get(name)
        if backend is None:
            raise ValueError(f"KV backend {name!r} is not enabled on this engine ({sorted(self._backends)})")
        return backend

    # --- producer ---------------------------------------------------------
    def start_step(self, meta: BatonConnectorMetadata) -> None:
        # Before the holds below: a hand-off's offer must exist when vLLM's
        # hold on its blocks is announced, or they would be freed unread.
        for spec in meta.moves:
            self._hand_off(spec)
        for backend in self._backends.values():
            if backend.holds_source_blocks:
                backend.hold(meta.held, True)
                backend.hold(meta.released, False)
        for name, transfer_id, source in meta.declined:
            try:
                self._backend(name).decline(transfer_id, endpoint_for(source, self.cache.rank))
            except Exception as exc:  # the producer frees them at its TTL
                log.warning("could not decline a kv offer", transfer_id=transfer_id, error=str(exc))
        for spec in meta.saves:
            try:
                # One transfer per rank: this rank's shard goes to the consumer's same rank.
                spec = dataclasses.replace(spec, kv_target=endpoint_for(spec.kv_target, self.cache.rank))
                self._outbound[spec.req_id] = self._spans.sending(spec, self._backend(spec.backend).send(spec),
                                                                  spec.backend)
            except Exception as exc:  # the consumer recomputes when nothing arrives
                log.warning("kv transfer could not be opened", transfer_id=spec.transfer_id,
                            backend=spec.backend, error=str(exc))
        with self._lock:
            kept = [(r.block_id, self._kept.pop(r.req_id, None)) for r in meta.restores]
        self._restores = [(block_id, blocks) for block_id, blocks in kept if blocks is not None]

    def _hand_off(self, spec: SaveSpec) -> None:
        """A running request's KV, which no forward is writing any more,
        sent (or offered) whole now."""
        try:
            spec = dataclasses.replace(spec, kv_target=endpoint_for(spec.kv_target, self.cache.rank))
            outbound = self._spans.sending(spec, self._backend(spec.backend).send(spec), spec.backend)
            for index, layer in enumerate(self.cache.layers):
                outbound.layer_saved(index, layer)
            outbound.step_done()
            log.info("kv handed off", transfer_id=spec.transfer_id, req_id=spec.req_id, tokens=spec.num_tokens,
                     blocks=len(spec.block_ids), backend=spec.backend)
            error = ""
        except Exception as exc:  # the router moves the answer by recomputing it
            log.warning("kv hand-off could not be opened", transfer_id=spec.transfer_id, backend=spec.backend,
                        error=str(exc))
            error = str(exc) or type(exc).__name__
        if self._handoff_dir is not None and self.cache.rank.index == 0:  # one word for all ranks
            mark_sent(self._handoff_dir, spec.req_id, error)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor) -> None:
        if not self._outbound and not self._restores:
            return
        index = self._layer_index[layer_name]
        block_dim = self.cache.block_dims[index]
        for block_id, kept in self._restores:
            write_block(kv_layer, block_dim, self.cache.slots, block_id, kept[index])
        for outbound in self._outbound.values():
            outbound.layer_saved(index, kv_layer)

    def end_step(self) -> None:
        for outbound in self._outbound.values():
            outbound.step_done()
        self._outbound = {}
        self._restores = []

    # --- consumer ---------------------------------------------------------
    def start_load(self, meta: BatonConnectorMetadata) -> None:
        for spec in meta.loads:
            with self._lock:
                self._in_flight[spec.req_id] = spec
            self._load_pool.submit(self._run_load, spec)

    def _run_load(self, spec: LoadSpec) -> None:
        started = time.monotonic()
        span = self._spans.loading(spec)
        try:
            source = endpoint_for(spec.source, self.cache.rank)
            received = self._backend(spec.backend).receive(dataclasses.replace(spec, source=source))
            self._spans.loaded(span, received.bytes)
            log.info("kv loaded", transfer_id=spec.transfer_id, req_id=spec.req_id, bytes=received.bytes,
                     blocks=len(spec.block_ids), backend=spec.backend,
                     ms=round((time.monotonic() - started) * 1000, 1))
            with self._lock:
                if received.kept:
                    self._kept[spec.req_id] = received.kept
                self._loaded_bytes[spec.req_id] = received.bytes
                self._load_seconds[spec.req_id] = time.monotonic() - started
                self._finished_recving.add(spec.req_id)
        except Exception as exc:
            self._spans.load_failed(span, str(exc) or type(exc).__name__)
            log.warning("kv load failed; the prompt will be recomputed", transfer_id=spec.transfer_id,
                        req_id=spec.req_id, backend=spec.backend, error=str(exc))
            with self._lock:
                self._failed_recving.add(spec.req_id)
                self._finished_recving.add(spec.req_id)
        finally:
            with self._lock:
                self._in_flight.pop(spec.req_id, None)
                if spec.req_id in self._gone:  # aborted meanwhile: nobody will restore
                    self._gone.discard(spec.req_id)
                    self._kept.pop(spec.req_id, None)

    def transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        sending: set[str] = set()
        for backend in self._backends.values():
            sending |= backend.finished_sending()
        with self._lock:
            for req_id in finished_req_ids:  # ended before its restore (aborted)
                self._kept.pop(req_id, None)
                spec = self._in_flight.get(req_id)
                if spec is not None:
                    self._gone.add(req_id)
                    # Stop waiting for KV nobody needs: vLLM frees the
                    # request's blocks only once its load has ended.
                    self._backends[spec.backend].cancel(spec.transfer_id)
            results = KVConnectorTransferResults(finished_sending=sending,
                                                 finished_recving=self._finished_recving,
                                                 failed_recving=self._failed_recving)
            self._finished_recving = set()
            self._failed_recving = set()
        return results

    def worker_meta(self) -> BatonWorkerMetadata | None:
        """What this step's finished loads moved (taken after
        ``transfer_results``, so a load reported finished is in it)."""
        with self._lock:
            if not self._loaded_bytes:
                return None
            loaded, self._loaded_bytes = self._loaded_bytes, {}
            seconds, self._load_seconds = self._load_seconds, {}
        return BatonWorkerMetadata(loaded, seconds)

    def shutdown(self) -> None:
        self._load_pool.shutdown(wait=False, cancel_futures=True)
        for backend in self._backends.values():
            backend.close()
        self._spans.flush()
