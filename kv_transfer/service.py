"""The ``KVTransfer`` gRPC service a decode worker hosts over its staging store."""

from __future__ import annotations

import grpc

from baton.logs import get_logger
from baton.v1 import kv_transfer_pb2 as pb
from baton.v1 import kv_transfer_pb2_grpc as pb_grpc
from kv_transfer.staging import StagingFull, StagingStore, TransferState, TransferUnavailable
from kv_transfer.wire import WireError, chunk_layer

log = get_logger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["KVTransfer"].full_name


class KVTransferServicer(pb_grpc.KVTransferServicer):
    def __init__(self, store: StagingStore, chunk_bytes: int):
        self._store = store
        self._chunk_bytes = chunk_bytes

    async def Push(self, request_iterator, context: grpc.aio.ServicerContext) -> pb.PushAck:
        staged = None
        try:
            async for chunk in request_iterator:
                which = chunk.WhichOneof("payload")
                if staged is None:
                    if which != "header":
                        raise WireError("first message of a push must be the header")
                    staged = self._store.begin(chunk.header)
                elif which == "data":
                    self._store.add(staged, chunk.data)
                else:
                    raise WireError("a push carries exactly one header")
            if staged is None:
                raise WireError("empty push")
            self._store.complete(staged)
        except StagingFull as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except WireError as exc:
            if staged is not None:
                self._store.fail(staged, str(exc))
            log.warning("kv push refused", error=str(exc))
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        finally:
            # The producer went away mid-stream (cancel, crash): the partial
            # transfer is failed at once, so the consumer recomputes without
            # waiting for its timeout.
            if staged is not None and staged.state is TransferState.RECEIVING:
                self._store.fail(staged, "push interrupted")
        log.info("kv staged", transfer_id=staged.header.transfer_id, bytes=staged.nbytes,
                 tokens=staged.header.num_tokens)
        return pb.PushAck(bytes=staged.nbytes)

    async def Fetch(self, request: pb.FetchRequest, context: grpc.aio.ServicerContext):
        timeout_s = (request.wait_timeout_ms or 10_000) / 1000
        start_timeout_s = request.start_timeout_ms / 1000 if request.start_timeout_ms else None
        try:
            staged = await self._store.take(request.transfer_id, timeout_s, start_timeout_s)
        except TransferUnavailable as exc:
            log.warning("kv fetch given up; the decode engine recomputes", transfer_id=request.transfer_id,
                        error=str(exc))
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
            return
        yield pb.KVChunk(header=staged.header)
        for index, layer in enumerate(staged.layers):
            for chunk in chunk_layer(index, memoryview(layer), self._chunk_bytes):
                yield chunk

    async def Discard(self, request: pb.DiscardRequest, context) -> pb.DiscardAck:
        freed = self._store.discard(request.transfer_id)
        log.info("kv discarded", transfer_id=request.transfer_id, bytes=freed)
        return pb.DiscardAck(freed_bytes=freed)

    async def Stats(self, request, context) -> pb.KVStats:
        c = self._store.counters
        return pb.KVStats(
            staged_bytes=self._store.staged_bytes,
            staged_transfers=self._store.staged_transfers,
            received_total=c["received"],
            fetched_total=c["fetched"],
            expired_total=c["expired"],
            rejected_total=c["rejected"],
            failed_total=c["failed"],
            never_started_total=c["never_started"],
        )
