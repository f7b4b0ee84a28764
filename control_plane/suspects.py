"""Workers a request just failed on: out of placement at once, not when
their registry lease runs out (seconds during which every new request
would be sent to a dead process), and back as soon as they answer a gRPC
health check again (a transient error costs a second, not the worker)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from baton.logs import get_logger
from baton.rpc import channel

log = get_logger(__name__)

HealthCheck = Callable[[str], Awaitable[bool]]


async def answers_health_check(address: str, timeout_s: float = 1.0) -> bool:
    async with channel(address) as ch:
        try:
            reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
        except grpc.aio.AioRpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


@dataclass
class _Suspect:
    address: str
    reason: str
    since_s: float


class Suspects:
    def __init__(self, check: HealthCheck = answers_health_check):
        self._check = check
        self._by_id: dict[str, _Suspect] = {}

    def __contains__(self, worker_id: str) -> bool:
        return worker_id in self._by_id

    def __len__(self) -> int:
        return len(self._by_id)

    def mark(self, worker_id: str, address: str, reason: str) -> None:
        if worker_id not in self._by_id:
            log.warning("worker suspect: out of placement until it answers a health check", worker=worker_id,
                        reason=reason)
            self._by_id[worker_id] = _Suspect(address, reason, time.monotonic())

    def forget(self, worker_id: str) -> None:
        """It left the registry: nothing to probe."""
        self._by_id.pop(worker_id, None)

    async def probe(self) -> None:
        """One round: every suspect that answers is back in placement."""
        for worker_id, suspect in list(self._by_id.items()):
            if await self._check(suspect.address) and self._by_id.get(worker_id) is suspect:
                del self._by_id[worker_id]
                log.info("worker answers again: back in placement", worker=worker_id,
                         suspect_s=round(time.monotonic() - suspect.since_s, 1))

    async def run(self, interval_s: float = 1.0) -> None:
        while True:
            await asyncio.sleep(interval_s)
            await self.probe()
