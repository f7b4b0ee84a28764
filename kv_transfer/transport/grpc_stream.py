"""gRPC chunk streaming, the backend that needs nothing but gRPC: the
producer streams ``KVChunk``s to the consumer worker's ``KVTransfer.Push``
(its staging store); the consumer engine reads them back from its local
``KVTransfer.Fetch`` and writes them into its blocks. Chunks stay far below
the 4 MiB message limit."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import torch

from baton.logs import get_logger
from baton.rpc import sync_channel
from baton.v1 import kv_transfer_pb2 as pb
from baton.v1 import kv_transfer_pb2_grpc as pb_grpc
from kv_transfer.blocks import as_bytes, from_bytes, scatter_blocks
from kv_transfer.connector.metadata import LoadSpec, SaveSpec
from kv_transfer.transport.base import KVCache, Received
from kv_transfer.transport.layer_queue import LayerQueue
from kv_transfer.wire import WireError, blocks_for_tokens, chunk_layer, layer_payload_bytes

log = get_logger(__name__)



class _ChannelCache:
    """One channel per peer, shared by threads (gRPC channels are thread-safe)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._channels: dict[str, grpc.Channel] = {}

    def stub(self, address: str) -> pb_grpc.KVTransferStub:
        with self._lock:
            channel = self._channels.get(address)
            if channel is None:
                channel = self._channels[address] = sync_channel(address)
        return pb_grpc.KVTransferStub(channel)

    def close(self) -> None:
        with self._lock:
            for channel in self._channels.values():
                channel.close()
            self._channels.clear()


class GrpcStreamSender:
    def __init__(self, chunk_bytes: int, timeout_s: float = 60.0):
        self._chunk_bytes = chunk_bytes
        self._timeout_s = timeout_s
        self._channels = _ChannelCache()

    def push(self, target, header, layers: Iterable[tuple[int, memoryview]], metadata) -> int:
        sent = 0

        def messages():
            nonlocal sent
            yield pb.KVChunk(header=header)
            for layer_index, payload in layers:
                for chunk in chunk_layer(layer_index, payload, self._chunk_bytes):
                    sent += len(chunk.data.data)
                    yield chunk

        self._channels.stub(target).Push(messages(), timeout=self._timeout_s, metadata=metadata)
        return sent

    def close(self) -> None:
        self._channels.close()


class GrpcStreamReceiver:
    def __init__(self, address: str):
        self._address = address
        self._channels = _ChannelCache()

    def fetch(self, transfer_id: str, wait_timeout_ms: int,
              start_timeout_ms: int = 0) -> tuple[pb.KVHeader, Iterator[pb.KVData]]:
        """Block until the transfer is staged; return its header and chunks.
        Raises at once if its push has not begun within ``start_timeout_ms``."""
        stream = self._channels.stub(self._address).Fetch(
            pb.FetchRequest(transfer_id=transfer_id, wait_timeout_ms=wait_timeout_ms,
                            start_timeout_ms=start_timeout_ms),
            timeout=wait_timeout_ms / 1000 + 60,
        )
        first = next(stream)
        if first.WhichOneof("payload") != "header":
            raise WireError("fetch stream did not start with a header")

        def data() -> Iterator[pb.KVData]:
            for chunk in stream:
                if chunk.WhichOneof("payload") != "data":
                    raise WireError("second header in a fetch stream")
                yield chunk.data

        return first.header, data()

    def close(self) -> None:
        self._channels.close()


class GrpcBackend:
    name = "grpc"
    holds_source_blocks = False

    def __init__(self, chunk_bytes: int = 1 << 20, fetch_address: str = "", fetch_timeout_ms: int = 15_000,
                 start_timeout_ms: int = 3_000):
        self._sender = GrpcStreamSender(chunk_bytes)
        self._receiver = GrpcStreamReceiver(fetch_address) if fetch_address else None
        self._fetch_timeout_ms = fetch_timeout_ms
        self._start_timeout_ms = start_timeout_ms
        self._cache: KVCache | None = None
        # Pushes wait on layers as the forward computes them.
        self._pushes = ThreadPoolExecutor(max_workers=16, thread_name_prefix="baton-kv-push")

    def attach(self, cache: KVCache) -> None:
        self._cache = cache

    def endpoint(self) -> str:
        return ""  # the decode worker publishes its KVTransfer address itself

    # --- producer ---------------------------------------------------------
    def send(self, spec: SaveSpec) -> LayerQueue:
        push = LayerQueue(spec, self._cache, "cpu")
        self._pushes.submit(self._run_push, push)
        return push

    def _run_push(self, push: LayerQueue) -> None:
        spec = push.spec
        header = self._cache.layout.header(spec.transfer_id, spec.num_tokens, len(spec.block_ids))
        metadata = [("traceparent", spec.traceparent)] if spec.traceparent else []
        try:
            layers = ((index, as_bytes(blocks)) for index, blocks in push.layers(len(self._cache.layers)))
            sent = self._sender.push(spec.kv_target, header, layers, metadata)
            log.info("kv pushed", transfer_id=spec.transfer_id, bytes=sent, target=spec.kv_target,
                     blocks=len(spec.block_ids), ms=round((time.monotonic() - push.started_s) * 1000, 1))
        except Exception as exc:
            log.warning("kv push failed", transfer_id=spec.transfer_id, target=spec.kv_target, error=str(exc))

    def hold(self, req_ids: set[str], held: bool) -> None:
        pass

    def finished_sending(self) -> set[str]:
        return set()

    def cancel(self, transfer_id: str) -> None:
        pass  # the decode worker discards the transfer, which ends the fetch

    def decline(self, transfer_id: str, source: str) -> None:
        pass  # the decode worker discards what was staged for it

    # --- consumer ---------------------------------------------------------
    def receive(self, spec: LoadSpec) -> Received:
        if self._receiver is None:
            raise WireError("this engine has no KVTransfer endpoint to fetch from")
        header, chunks = self._receiver.fetch(spec.transfer_id, self._fetch_timeout_ms, self._start_timeout_ms)
        cache = self._cache
        mine = cache.layout.layout_hash()
        if header.layout_hash != mine:
            raise WireError(
                f"KV layout mismatch (producer {header.layout_hash}, consumer {mine}): prefill and "
                "decode workers must serve the same model with the same dtype and block size"
            )
        if header.num_tokens != spec.num_tokens:
            raise WireError(f"transfer covers {header.num_tokens} tokens, expected {spec.num_tokens}")
        if header.num_blocks != blocks_for_tokens(header.num_tokens, cache.layout.block_size):
            raise WireError(f"transfer has {header.num_blocks} blocks for {header.num_tokens} tokens")
        wanted = slice(spec.first_block, spec.first_block + len(spec.block_ids))
        layer_bytes = layer_payload_bytes(header)
        dtype = getattr(torch, header.dtype)
        shape = (header.num_blocks, *header.block_shape)
        buffers: dict[int, bytearray] = {}
        received = Received(0)
        done_layers = 0
        for data in chunks:
            buf = buffers.setdefault(data.layer_index, bytearray())
            if data.offset != len(buf):
                raise WireError(f"layer {data.layer_index}: out-of-order chunk")
            buf.extend(data.data)
            received.bytes += len(data.data)
            if len(buf) == layer_bytes:
                index = data.layer_index
                all_blocks = from_bytes(buf, dtype, shape)
                if 0 <= spec.keep_block < header.num_blocks:
                    received.kept[index] = all_blocks[spec.keep_block].clone()
                scatter_blocks(cache.layers[index], cache.block_dims[index], list(spec.block_ids),
                               all_blocks[wanted])
                del buffers[index]
                done_layers += 1
        if done_layers != len(header.layer_names):
            raise WireError(f"fetch ended with {done_layers} of {len(header.layer_names)} layers")
        return received

    def close(self) -> None:
        self._pushes.shutdown(wait=False, cancel_futures=True)
        self._sender.close()
        if self._receiver is not None:
            self._receiver.close()
