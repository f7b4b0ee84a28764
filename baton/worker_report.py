"""A worker's report stream to the control plane: its engine's KV cache
events (vLLM publishes them over ZMQ) and, every second, its engine's load.

Events lost on the way (a new stream, a gap in vLLM's sequence numbers, a
full queue) cannot be replayed into the index: the report then says
``reset`` and the control plane forgets what it held for this worker,
rather than routing on a stale picture."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc

from baton.engine import EngineLoad
from baton.logs import get_logger
from baton.rpc import channel
from baton.v1 import control_plane_pb2, control_plane_pb2_grpc

log = get_logger(__name__)

LOAD_INTERVAL_S = 1.0
QUEUE_BATCHES = 1024  # event batches buffered while the control plane is slow or away


def _hash(value) -> int:
    """vLLM's external block hash: an int, or bytes where configured so."""
    if isinstance(value, bytes):
        return int.from_bytes(value[-8:], "big")
    return int(value) & ((1 << 64) - 1)


def to_proto(events) -> list[control_plane_pb2.KVCacheEvent]:
    """vLLM's KV events as the report carries them (unknown kinds skipped)."""
    from vllm.distributed.kv_events import AllBlocksCleared, BlockRemoved, BlockStored

    out = []
    for event in events:
        if isinstance(event, BlockStored):
            stored = control_plane_pb2.BlocksStored(block_hashes=[_hash(h) for h in event.block_hashes],
                                                    token_ids=event.token_ids, block_size=event.block_size)
            if event.parent_block_hash is not None:
                stored.parent_block_hash = _hash(event.parent_block_hash)
            out.append(control_plane_pb2.KVCacheEvent(stored=stored))
        elif isinstance(event, BlockRemoved):
            out.append(control_plane_pb2.KVCacheEvent(removed=control_plane_pb2.BlocksRemoved(
                block_hashes=[_hash(h) for h in event.block_hashes])))
        elif isinstance(event, AllBlocksCleared):
            out.append(control_plane_pb2.KVCacheEvent(cleared=control_plane_pb2.AllBlocksCleared()))
    return out


def load_message(load: EngineLoad) -> control_plane_pb2.EngineLoad:
    return control_plane_pb2.EngineLoad(running=load.running, waiting=load.waiting,
                                        kv_cache_usage=load.kv_cache_usage,
                                        prefix_cache_queries=load.prefix_cache_queries,
                                        prefix_cache_hits=load.prefix_cache_hits)


class WorkerReporter:
    def __init__(self, worker_id: str, control_plane_address: str, events_endpoint: str, load: EngineLoad):
        self._worker_id = worker_id
        self._address = control_plane_address
        self._endpoint = events_endpoint
        self._load = load
        self._queue: asyncio.Queue[control_plane_pb2.WorkerReport] = asyncio.Queue(QUEUE_BATCHES)
        self._lost = True  # nothing sent yet: the first report resets
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        """Reports the engine's load, and its KV events if it publishes them
        (``events_endpoint`` not empty)."""
        self._tasks = [asyncio.create_task(self._report(), name="worker-report")]
        if self._endpoint:
            self._tasks.append(asyncio.create_task(self._subscribe(), name="kv-events"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def _offer(self, report: control_plane_pb2.WorkerReport) -> None:
        try:
            self._queue.put_nowait(report)
        except asyncio.QueueFull:
            self._lost = True  # dropped: the index must start over

    async def _subscribe(self) -> None:
        import msgspec
        import zmq
        import zmq.asyncio
        from vllm.distributed.kv_events import KVEventBatch

        decoder = msgspec.msgpack.Decoder(type=KVEventBatch)
        context = zmq.asyncio.Context.instance()
        socket = context.socket(zmq.SUB)
        socket.setsockopt(zmq.SUBSCRIBE, b"")
        socket.connect(self._endpoint)
        expected = None
        try:
            while True:
                _topic, seq_bytes, payload = await socket.recv_multipart()
                seq = int.from_bytes(seq_bytes, "big")
                if expected is not None and seq != expected:
                    log.warning("kv events lost; the control plane's index of this worker starts over",
                                expected=expected, got=seq)
                    self._lost = True
                expected = seq + 1
                events = to_proto(decoder.decode(payload).events)
                if events:
                    self._offer(control_plane_pb2.WorkerReport(worker_id=self._worker_id, events=events))
        finally:
            socket.close(linger=0)

    async def _reports(self) -> AsyncIterator[control_plane_pb2.WorkerReport]:
        next_load = 0.0
        loop = asyncio.get_running_loop()
        while True:
            timeout = max(0.0, next_load - loop.time())
            try:
                report = await asyncio.wait_for(self._queue.get(), timeout)
            except TimeoutError:
                report = control_plane_pb2.WorkerReport(worker_id=self._worker_id)
            if loop.time() >= next_load:
                report.load.CopyFrom(load_message(self._load))
                next_load = loop.time() + LOAD_INTERVAL_S
            if self._lost:
                report.reset, self._lost = True, False
            yield report

    async def _report(self) -> None:
        backoff = 0.5
        loop = asyncio.get_running_loop()
        while True:
            opened = loop.time()
            try:
                async with channel(self._address) as ch:
                    stub = control_plane_pb2_grpc.ControlPlaneStub(ch)
                    await stub.ReportWorker(self._reports())
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as exc:
                log.info("control plane report stream ended; reconnecting", code=exc.code().name,
                         error=exc.details())
            except Exception as exc:
                log.warning("control plane report stream failed; reconnecting", error=str(exc))
            self._lost = True
            backoff = 0.5 if loop.time() - opened > 10 else min(backoff * 2, 5.0)
            await asyncio.sleep(backoff)
