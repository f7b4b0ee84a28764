"""gRPC streaming, the backend that needs nothing but gRPC: the producer
streams each layer's blocks, as its forward computes them, straight to a
small gRPC server inside the consumer engine, which keeps them in the
engine's inbox until the load writes them into vLLM's blocks. One hop, and
bulk bytes never go through protobuf.

``/baton.v1.KVBytes/Push`` is a client stream of raw messages: first the
transfer header (JSON, ``TransferHeader``), then a byte stream cut into
messages of at most ``chunk_bytes``: per layer, in the order computed, a
12-byte frame (``<iq``: layer index, xxh3 of the payload; never split across
messages) and the payload (the transfer's blocks in request order, C
order). Small layers that are ready together share a message: a message
costs far more than its bytes in Python gRPC. A layer that fits in one
message is never split, so the consumer keeps it where gRPC put it (a view
of the message, no copy); only a layer bigger than a message is assembled.
The consumer checks each layer as it completes, while later ones still
arrive.

It answers a ``PushAck``, or RESOURCE_EXHAUSTED (inbox full) /
FAILED_PRECONDITION (layout mismatch, declined) right after the header,
before any KV byte moves. The same server hosts ``baton.v1.KVTransfer``
(``Discard``, ``Stats``) over the inbox.
"""

from __future__ import annotations

import json
import struct
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import grpc
import torch

from baton.logs import get_logger
from baton.rpc import ChannelPool, ServiceBinding, start_sync_server, sync_channel
from baton.v1 import kv_transfer_pb2 as pb
from baton.v1 import kv_transfer_pb2_grpc as pb_grpc
from kv_transfer.blocks import as_bytes
from kv_transfer.connector.metadata import SaveSpec
from kv_transfer.transport.base import KVCache
from kv_transfer.transport.inbox import (
    Inbox,
    InboxBackend,
    TransferHeader,
    check_layer,
    digest,
    payload_bytes,
)
from kv_transfer.transport.layer_queue import CopyBudget, LayerQueue
from kv_transfer.wire import WireError

log = get_logger(__name__)

PUSH_METHOD = "/baton.v1.KVBytes/Push"
_LAYER_FRAME = struct.Struct("<iq")
# Pushes received at once; more are refused (RESOURCE_EXHAUSTED) and recomputed.
MAX_CONCURRENT_PUSHES = 8


class _Interrupted(Exception):
    """The producer's stream ended before the transfer was whole."""


def _messages(push: LayerQueue, cache: KVCache, chunk_bytes: int):
    spec = push.spec
    yield json.dumps(TransferHeader.of(spec.transfer_id, spec.num_tokens, len(spec.block_ids), cache).to_dict()).encode()
    pieces: list = []
    size = 0
    for index, layer in push.layers(len(cache.layers)):
        payload = as_bytes(layer)
        framed = _LAYER_FRAME.size + len(payload)
        # Start a new message rather than split a layer that fits in one.
        if pieces and (size + _LAYER_FRAME.size > chunk_bytes or (framed <= chunk_bytes < size + framed)):
            yield b"".join(pieces)
            pieces, size = [], 0
        pieces.append(_LAYER_FRAME.pack(index, digest(layer)))
        size += _LAYER_FRAME.size
        offset = 0
        while offset < len(payload):
            take = min(chunk_bytes - size, len(payload) - offset)
            pieces.append(payload[offset: offset + take])
            size += take
            offset += take
            if size == chunk_bytes:
                yield b"".join(pieces)  # the one copy of the bytes on this side
                pieces, size = [], 0
        if pieces and not push.has_ready():  # pipelined: do not wait for the next layer
            yield b"".join(pieces)
            pieces, size = [], 0
    if pieces:
        yield b"".join(pieces)


def _view(message: bytes, offset: int, count: int) -> torch.Tensor:
    """``count`` bytes of a received message, in place: gRPC gave the message
    to us alone and nothing writes to it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "not writable": it is only read
        return torch.frombuffer(message, dtype=torch.uint8, count=count, offset=offset)


class _Receiver:
    """The consumer engine's server side: one thread per push, bounded."""

    def __init__(self, cache: KVCache, inbox: Inbox):
        self._cache = cache
        self._inbox = inbox

    def push(self, frames, context: grpc.ServicerContext) -> pb.PushAck:
        try:
            header = TransferHeader.from_dict(json.loads(next(frames)))
        except (StopIteration, ValueError) as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"a push must start with its JSON header: {exc}")
        cache = self._cache
        layer_bytes = payload_bytes(cache, header.num_tokens)
        refusal = self._inbox.reserve(header, layer_bytes * len(cache.layers), self._inbox.check(cache, header))
        if refusal:
            log.warning("kv push refused", transfer_id=header.transfer_id, reason=refusal)
            code = grpc.StatusCode.RESOURCE_EXHAUSTED if "full" in refusal else grpc.StatusCode.FAILED_PRECONDITION
            context.abort(code, refusal)
        try:
            layers = self._receive_layers(frames, header, layer_bytes)
        except Exception as exc:
            reason = str(exc) if isinstance(exc, WireError) else f"push interrupted: {exc or type(exc).__name__}"
            self._inbox.finish(header.transfer_id, None, reason)
            log.warning("kv push failed", transfer_id=header.transfer_id, error=reason)
            if isinstance(exc, WireError):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, reason)
            raise
        self._inbox.finish(header.transfer_id, layers)
        return pb.PushAck(bytes=layer_bytes * len(layers))

    def _receive_layers(self, frames, header: TransferHeader, layer_bytes: int):
        cache = self._cache
        count = len(cache.layers)
        layers: list[torch.Tensor | None] = [None] * count
        done = 0
        index, expected, buffer, into, filled = -1, 0, None, None, 0
        for message in frames:
            view = memoryview(message)
            position = 0
            while position < len(view):
                if buffer is None:
                    if done == count:
                        raise WireError("data after the last layer")
                    if len(view) - position < _LAYER_FRAME.size:
                        raise WireError("a layer frame split across messages")
                    index, expected = _LAYER_FRAME.unpack_from(view, position)
                    position += _LAYER_FRAME.size
                    if not 0 <= index < count or layers[index] is not None:
                        raise WireError(f"layer {index} out of range or sent twice")
                    if len(view) - position >= layer_bytes:  # whole in this message: no copy
                        layer = _view(message, position, layer_bytes)
                        position += layer_bytes
                        layers[index] = layer.view(cache.layers[index].dtype)
                        check_layer(index, layers[index], expected)
                        done += 1
                        continue
                    buffer, filled = torch.empty(layer_bytes, dtype=torch.uint8), 0
                    into = memoryview(buffer.numpy())
                take = min(layer_bytes - filled, len(view) - position)
                into[filled: filled + take] = view[position: position + take]
                filled += take
                position += take
                if filled == layer_bytes:
                    layers[index] = buffer.view(cache.layers[index].dtype)
                    check_layer(index, layers[index], expected)
                    buffer = None
                    done += 1
        if done != count:
            raise _Interrupted(f"the stream ended after {done} of {count} layers")
        return layers


class _Control(pb_grpc.KVTransferServicer):
    def __init__(self, inbox: Inbox):
        self._inbox = inbox

    def Discard(self, request: pb.DiscardRequest, context) -> pb.DiscardAck:
        freed = self._inbox.decline(request.transfer_id)
        log.info("kv discarded", transfer_id=request.transfer_id, bytes=freed)
        return pb.DiscardAck(freed_bytes=freed)

    def Stats(self, request, context) -> pb.KVStats:
        s = self._inbox.stats()
        return pb.KVStats(inbox_bytes=s["bytes"], inbox_transfers=s["transfers"],
                          received_total=s.get("received", 0), loaded_total=s.get("loaded", 0),
                          expired_total=s.get("expired", 0), refused_total=s.get("refused", 0),
                          failed_total=s.get("failed", 0), never_started_total=s.get("never_started", 0))


class GrpcBackend(InboxBackend):
    name = "grpc"

    def __init__(self, host: str = "127.0.0.1", port: int = 0, consumer: bool = False, inbox: Inbox | None = None,
                 chunk_bytes: int = 1 << 20, fetch_timeout_ms: int = 15_000, start_timeout_ms: int = 3_000,
                 push_timeout_s: float = 60.0, copies: CopyBudget | None = None):
        super().__init__(inbox, fetch_timeout_ms, start_timeout_ms, copies)
        self._host = host
        self._port = port
        self._consumer = consumer
        self._chunk_bytes = chunk_bytes
        self._push_timeout_s = push_timeout_s
        self._server: grpc.Server | None = None
        self._channels = ChannelPool(sync_channel)  # one per consumer, shared by the push threads
        # Pushes wait on layers as the forward computes them.
        self._pushes = ThreadPoolExecutor(max_workers=MAX_CONCURRENT_PUSHES, thread_name_prefix="baton-kv-push")

    def attach(self, cache: KVCache) -> None:
        self._cache = cache
        if not self._consumer:
            return
        receiver = _Receiver(cache, self._inbox)
        push = grpc.method_handlers_generic_handler("baton.v1.KVBytes", {
            "Push": grpc.stream_unary_rpc_method_handler(receiver.push,
                                                         response_serializer=pb.PushAck.SerializeToString)})
        control = ServiceBinding(pb.DESCRIPTOR.services_by_name["KVTransfer"].full_name,
                                 pb_grpc.add_KVTransferServicer_to_server, _Control(self._inbox))
        # Room for the pushes plus a few control calls.
        self._server, self._port = start_sync_server([control], self._host, self._port, MAX_CONCURRENT_PUSHES + 2,
                                                     [push])
        log.info("grpc kv endpoint ready", endpoint=self.endpoint())

    def endpoint(self) -> str:
        return f"{self._host}:{self._port}" if self._server is not None else ""

    # --- producer ---------------------------------------------------------
    def send(self, spec: SaveSpec) -> LayerQueue:
        push = LayerQueue(spec, self._cache, "cpu", self._copies)
        self._pushes.submit(self._run_push, push)
        return push

    def _run_push(self, push: LayerQueue) -> None:
        spec = push.spec
        sent, error = 0, ""
        try:
            push_method = self._channels.get(spec.kv_target).stream_unary(
                PUSH_METHOD, response_deserializer=pb.PushAck.FromString)
            ack = push_method(
                _messages(push, self._cache, self._chunk_bytes), timeout=self._push_timeout_s)
            sent = ack.bytes
            log.info("kv pushed", transfer_id=spec.transfer_id, bytes=ack.bytes, target=spec.kv_target,
                     backend=self.name, ms=round((time.monotonic() - push.started_s) * 1000, 1))
        except Exception as exc:  # the consumer recomputes; its inbox already knows
            error = (exc.details() if isinstance(exc, grpc.RpcError) else str(exc)) or type(exc).__name__
            log.warning("kv push failed", transfer_id=spec.transfer_id, target=spec.kv_target, error=error)
        finally:
            push.finish(sent, error)

    def close(self) -> None:
        self._pushes.shutdown(wait=False, cancel_futures=True)
        for channel in self._channels.take_all():
            channel.close()
        if self._server is not None:
            self._server.stop(grace=None)
