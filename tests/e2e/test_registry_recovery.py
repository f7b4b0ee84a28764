"""The registry through etcd outages, on a real etcd (no engines): while
etcd is down the watchers keep the last membership they saw, so routers and
the control plane go on placing requests; when it is back, with its data or
without, every worker is registered again within seconds, and one that
started during the outage registers too."""

from __future__ import annotations

import asyncio
import time

import pytest

from baton.etcd_server import EmbeddedEtcd
from baton.registry import Registration, RegistryWatcher, WorkerRecord, list_workers

PREFIX = "/recovery"
TTL_S = 3


def record(worker_id: str) -> WorkerRecord:
    return WorkerRecord(worker_id, "decode", f"127.0.0.1:{len(worker_id)}", "m", instance=worker_id + "-1")


async def until(predicate, timeout_s: float, what: str):
    """``predicate``: a plain callable, or one returning an awaitable."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


async def registered(etcd: EmbeddedEtcd) -> set[str]:
    try:
        return {w.worker_id for w in await list_workers(etcd.endpoint, PREFIX)}
    except Exception:
        return set()


@pytest.fixture
def etcd():
    server = EmbeddedEtcd().start()
    yield server
    server.stop()


@pytest.mark.parametrize("data", ["kept", "lost"])
async def test_workers_are_registered_again_after_etcd_comes_back(etcd, data):
    registration = Registration(etcd.endpoint, PREFIX, record("w1"), TTL_S)
    await registration.start()
    watcher = RegistryWatcher(etcd.endpoint, PREFIX)
    await watcher.start()
    late = None
    try:
        assert set(watcher.workers) == {"w1"}
        etcd.stop(keep_data=True)
        # Down for longer than the lease: the view stays, and a worker that
        # starts now serves unregistered instead of failing.
        late = Registration(etcd.endpoint, PREFIX, record("w2"), TTL_S)
        await late.start()
        await asyncio.sleep(3 * TTL_S)
        assert set(watcher.workers) == {"w1"}, "the last membership is kept while etcd is away"

        if data == "lost":
            etcd.wipe()
        etcd.start()
        both = {"w1", "w2"}

        async def both_registered() -> bool:
            return await registered(etcd) == both

        await until(both_registered, 5 * TTL_S, "both workers registered")
        await until(lambda: set(watcher.workers) == both, 10, "the watcher to see both")
        # Kept alive again, not a key left over until its lease ends.
        await asyncio.sleep(2 * TTL_S)
        assert await registered(etcd) == both
        await registration.set_state("draining")
        await until(lambda: watcher.workers["w1"].state == "draining", 10, "the state change to be seen")
    finally:
        for reg in filter(None, (late, registration)):
            await reg.stop()
        await watcher.stop()
