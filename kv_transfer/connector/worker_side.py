"""Worker half of the Baton connector: moves KV bytes. Lives in the process
that owns the KV tensors (vLLM's worker).

Producer: ``save_kv_layer`` copies a finished prompt's blocks of each layer
out of the paged cache as soon as the layer has run, and a sender thread
streams them to the decode worker while later layers still compute.

Consumer: ``start_load_kv`` hands each load to a thread that fetches the
staged KV from the local ``KVTransfer`` endpoint and writes it into the
blocks vLLM allocated; the scheduler keeps the request waiting until
``get_transfer_results`` reports it, failed loads included (vLLM then
recomputes the prompt).
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorTransferResults

from baton.logs import get_logger
from kv_transfer.blocks import (
    as_bytes,
    block_shape,
    find_block_dim,
    from_bytes,
    gather_blocks,
    scatter_blocks,
)
from kv_transfer.connector.metadata import BatonConnectorMetadata, LoadSpec, SaveSpec
from kv_transfer.transport.base import KVReceiver, KVSender
from kv_transfer.wire import KVLayout, WireError, blocks_for_tokens, layer_payload_bytes

log = get_logger(__name__)

_END = object()


@dataclass
class _Push:
    spec: SaveSpec
    layers: queue.Queue  # (layer_index, memoryview) items, then _END
    started_s: float


class BatonWorkerSide:
    def __init__(self, layout_signature: str, block_size: int, num_blocks: int,
                 sender: KVSender | None, receiver: KVReceiver | None, fetch_timeout_ms: int,
                 push_start_timeout_ms: int = 0):
        self._signature = layout_signature
        self._block_size = block_size
        self._num_blocks = num_blocks
        self._sender = sender
        self._receiver = receiver
        self._fetch_timeout_ms = fetch_timeout_ms
        self._push_start_timeout_ms = push_start_timeout_ms
        self._caches: dict[str, torch.Tensor] = {}
        self._block_dims: dict[str, int] = {}
        self._layer_index: dict[str, int] = {}
        self.layout: KVLayout | None = None
        self._pushes: dict[str, _Push] = {}  # this step's pushes by req_id
        # Separate pools: pushes wait on layers and loads on the network, and
        # neither kind may starve the other.
        self._push_pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="baton-kv-push")
        self._load_pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="baton-kv-load")
        self._lock = threading.Lock()
        self._finished_recving: set[str] = set()
        self._failed_recving: set[str] = set()
        self._kept: dict[str, dict[int, torch.Tensor]] = {}  # req_id → layer index → block, for restores
        self._in_flight: set[str] = set()  # req_ids whose load runs
        self._gone: set[str] = set()  # req_ids that finished while their load ran
        self._restores: list[tuple[int, dict[int, torch.Tensor]]] = []  # this step's (block id, kept)

    # --- set-up -----------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        names = sorted(kv_caches)
        first = kv_caches[names[0]]
        self._caches = dict(kv_caches)
        for index, name in enumerate(names):
            self._block_dims[name] = find_block_dim(kv_caches[name], self._num_blocks)
            self._layer_index[name] = index
        shape = block_shape(first, self._block_dims[names[0]])
        self.layout = KVLayout(self._signature, tuple(names), str(first.dtype).removeprefix("torch."),
                               self._block_size, shape)
        log.info("kv caches registered", layers=len(names), block_shape=shape,
                 layout_hash=self.layout.layout_hash())

    # --- producer ---------------------------------------------------------
    def start_step(self, meta: BatonConnectorMetadata) -> None:
        for spec in meta.saves:
            push = _Push(spec, queue.Queue(), time.monotonic())
            self._pushes[spec.req_id] = push
            self._push_pool.submit(self._run_push, push)
        with self._lock:
            kept = [(r.block_id, self._kept.pop(r.req_id, None)) for r in meta.restores]
        self._restores = [(block_id, blocks) for block_id, blocks in kept if blocks is not None]

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor) -> None:
        if not self._pushes and not self._restores:
            return
        index = self._layer_index[layer_name]
        block_dim = self._block_dims[layer_name]
        for block_id, kept in self._restores:
            scatter_blocks(kv_layer, block_dim, [block_id], kept[index].unsqueeze(0))
        for push in self._pushes.values():
            blocks = gather_blocks(kv_layer, block_dim, list(push.spec.block_ids))
            push.layers.put((index, as_bytes(blocks)))

    def end_step(self) -> None:
        for push in self._pushes.values():
            push.layers.put(_END)
        self._pushes = {}
        self._restores = []

    def _run_push(self, push: _Push) -> None:
        spec = push.spec
        header = self.layout.header(spec.transfer_id, spec.num_tokens, len(spec.block_ids))
        expected = len(self.layout.layer_names)

        def layers():
            seen = 0
            while True:
                item = push.layers.get()
                if item is _END:
                    break
                seen += 1
                yield item
            if seen != expected:
                # Abort the stream: the consumer marks the transfer failed.
                raise WireError(f"only {seen} of {expected} layers were saved")

        metadata = [("traceparent", spec.traceparent)] if spec.traceparent else []
        try:
            sent = self._sender.push(spec.kv_target, header, layers(), metadata)
            log.info("kv pushed", transfer_id=spec.transfer_id, bytes=sent, target=spec.kv_target,
                     blocks=len(spec.block_ids), ms=round((time.monotonic() - push.started_s) * 1000, 1))
        except Exception as exc:
            log.warning("kv push failed", transfer_id=spec.transfer_id, target=spec.kv_target, error=str(exc))

    # --- consumer ---------------------------------------------------------
    def start_load(self, meta: BatonConnectorMetadata) -> None:
        for spec in meta.loads:
            with self._lock:
                self._in_flight.add(spec.req_id)
            self._load_pool.submit(self._run_load, spec)

    def _run_load(self, spec: LoadSpec) -> None:
        started = time.monotonic()
        try:
            loaded = self._load(spec)
            log.info("kv loaded", transfer_id=spec.transfer_id, req_id=spec.req_id, bytes=loaded,
                     blocks=len(spec.block_ids), ms=round((time.monotonic() - started) * 1000, 1))
            with self._lock:
                self._finished_recving.add(spec.req_id)
        except Exception as exc:
            log.warning("kv load failed; the prompt will be recomputed", transfer_id=spec.transfer_id,
                        req_id=spec.req_id, error=str(exc))
            with self._lock:
                self._failed_recving.add(spec.req_id)
                self._finished_recving.add(spec.req_id)
        finally:
            with self._lock:
                self._in_flight.discard(spec.req_id)
                if spec.req_id in self._gone:  # aborted meanwhile: nobody will restore
                    self._gone.discard(spec.req_id)
                    self._kept.pop(spec.req_id, None)

    def _load(self, spec: LoadSpec) -> int:
        header, chunks = self._receiver.fetch(spec.transfer_id, self._fetch_timeout_ms,
                                              self._push_start_timeout_ms)
        mine = self.layout.layout_hash()
        if header.layout_hash != mine:
            raise WireError(
                f"KV layout mismatch (producer {header.layout_hash}, consumer {mine}): prefill and "
                "decode workers must serve the same model with the same dtype and block size"
            )
        if header.num_tokens != spec.num_tokens:
            raise WireError(f"transfer covers {header.num_tokens} tokens, expected {spec.num_tokens}")
        if header.num_blocks != blocks_for_tokens(header.num_tokens, self._block_size):
            raise WireError(f"transfer has {header.num_blocks} blocks for {header.num_tokens} tokens")
        wanted = slice(spec.first_block, spec.first_block + len(spec.block_ids))
        layer_bytes = layer_payload_bytes(header)
        dtype = getattr(torch, header.dtype)
        shape = (header.num_blocks, *header.block_shape)
        buffers: dict[int, bytearray] = {}
        kept: dict[int, torch.Tensor] = {}
        loaded = 0
        done_layers = 0
        for data in chunks:
            buf = buffers.setdefault(data.layer_index, bytearray())
            if data.offset != len(buf):
                raise WireError(f"layer {data.layer_index}: out-of-order chunk")
            buf.extend(data.data)
            if len(buf) == layer_bytes:
                name = header.layer_names[data.layer_index]
                all_blocks = from_bytes(buf, dtype, shape)
                if 0 <= spec.keep_block < header.num_blocks:
                    kept[data.layer_index] = all_blocks[spec.keep_block].clone()
                blocks = all_blocks[wanted]
                scatter_blocks(self._caches[name], self._block_dims[name], list(spec.block_ids), blocks)
                loaded += blocks.numel() * blocks.element_size()
                del buffers[data.layer_index]
                done_layers += 1
        if done_layers != len(header.layer_names):
            raise WireError(f"fetch ended with {done_layers} of {len(header.layer_names)} layers")
        if kept:
            with self._lock:
                self._kept[spec.req_id] = kept
        return loaded

    def transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        with self._lock:
            for req_id in finished_req_ids:  # ended before its restore (aborted)
                self._kept.pop(req_id, None)
                if req_id in self._in_flight:
                    self._gone.add(req_id)
            results = KVConnectorTransferResults(
                finished_recving=self._finished_recving, failed_recving=self._failed_recving)
            self._finished_recving = set()
            self._failed_recving = set()
        return results

    def shutdown(self) -> None:
        self._push_pool.shutdown(wait=False, cancel_futures=True)
        self._load_pool.shutdown(wait=False, cancel_futures=True)
        for endpoint in (self._sender, self._receiver):
            if endpoint is not None:
                endpoint.close()
