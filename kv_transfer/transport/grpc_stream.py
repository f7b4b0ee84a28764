"""gRPC chunk streaming: the producer streams ``KVChunk``s to the consumer's
``KVTransfer.Push``; the consumer engine reads them back from its local
``KVTransfer.Fetch``. Chunks stay far below the 4 MiB message limit."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator

import grpc

from baton.rpc import sync_channel
from baton.v1 import kv_transfer_pb2 as pb
from baton.v1 import kv_transfer_pb2_grpc as pb_grpc
from kv_transfer.wire import WireError, chunk_layer


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
