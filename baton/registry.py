"""Worker registry in etcd: registration with a kept-alive lease, and a
watcher that keeps a live view of the workers under the prefix.

Layout: ``<prefix>/workers/<role>/<worker_id>`` → JSON ``WorkerRecord``,
attached to a lease of ``lease_ttl_s``. Deleting the key or letting the lease
expire is how a worker leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import aetcd
import grpc

from baton import tls as tls_config
from baton.logs import get_logger
from baton.rpc import RECONNECT_OPTIONS

log = get_logger(__name__)

ROLES = ("prefill", "decode")


@dataclass(frozen=True)
class WorkerRecord:
    worker_id: str
    role: str  # "prefill" | "decode"
    address: str  # host:port of the worker's gRPC service
    model: str  # served model name
    kv_address: str = ""  # decode: host:port of its KVTransfer endpoint
    kv_endpoints: dict[str, str] = field(default_factory=dict)  # KV backend → how peers reach its engine
    labels: dict[str, str] = field(default_factory=dict)
    state: str = "ready"  # "draining": finishing its requests, takes no new ones
    block_size: int = 0  # tokens per KV block of its engine
    kv_cache_blocks: int = 0  # blocks in its engine's KV cache
    kv_events: bool = False  # its engine's KV events reach the control plane (else: prefix index from history)
    pid: int = 0  # of the worker process, for operators acting on one worker
    # New on every start: a worker restarted under the same id (and maybe
    # the same address) is another peer, and what was placed on its
    # predecessor is failed, not handed to it.
    instance: str = ""
    metrics_address: str = ""  # host:port of its Prometheus /metrics

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> WorkerRecord:
        data = json.loads(raw)
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def parse_labels(text: str) -> dict[str, str]:
    """``"region=eu, zone=a"`` → ``{"region": "eu", "zone": "a"}``; raises
    ValueError on anything else."""
    labels: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ValueError(f"label {item!r} is not key=value")
        labels[key.strip()] = value.strip()
    return labels


def workers_prefix(prefix: str) -> str:
    return prefix.rstrip("/") + "/workers/"


def worker_key(prefix: str, record: WorkerRecord) -> str:
    return f"{workers_prefix(prefix)}{record.role}/{record.worker_id}"


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"etcd endpoint {endpoint!r}: expected host:port")
    return host, int(port)


def etcd_client(endpoint: str) -> aetcd.Client:
    host, port = parse_endpoint(endpoint)
    tls = tls_config.current()
    credentials = tls.channel_credentials()
    if credentials is None:
        return aetcd.Client(host=host, port=port, timeout=5, options=dict(RECONNECT_OPTIONS))
    return _TlsEtcdClient(credentials, host=host, port=port, timeout=5,
                          options=dict(RECONNECT_OPTIONS + tls.channel_options()))


class _TlsEtcdClient(aetcd.Client):
    """aetcd's client over a TLS channel (aetcd itself dials plaintext only)."""

    def __init__(self, credentials: grpc.ChannelCredentials, **kwargs):
        super().__init__(**kwargs)
        self._credentials = credentials

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        if self._is_connecting:
            await asyncio.wait_for(self._connected.wait(), self._connect_wait_timeout)
            return
        from aetcd import rpc, watcher

        try:
            self._is_connecting = True
            self.channel = grpc.aio.secure_channel(f"{self._host}:{self._port}", self._credentials,
                                                   options=self._options.items())
            self.kvstub = rpc.KVStub(self.channel)
            self.clusterstub = rpc.ClusterStub(self.channel)
            self.leasestub = rpc.LeaseStub(self.channel)
            self.maintenancestub = rpc.MaintenanceStub(self.channel)
            self._watcher = watcher.Watcher(rpc.WatchStub(self.channel), timeout=self._timeout,
                                            metadata=self.metadata)
            self._connected.set()
        finally:
            self._is_connecting = False


class Registration:
    """Keeps one worker's key alive in etcd until ``stop()``."""

    def __init__(self, endpoint: str, prefix: str, record: WorkerRecord, ttl_s: int):
        self._client = etcd_client(endpoint)
        self._key = worker_key(prefix, record).encode()
        self._record = record
        self._ttl_s = ttl_s
        self._lease: aetcd.Lease | None = None
        self._task: asyncio.Task | None = None

    @property
    def key(self) -> str:
        return self._key.decode()

    async def start(self) -> None:
        """Registers; with etcd unreachable, the worker serves anyway and
        registers as soon as etcd answers."""
        try:
            await self._client.connect()
            await self._put()
            log.info("registered", key=self.key, address=self._record.address)
        except Exception as exc:
            log.warning("etcd unreachable; registering once it answers", key=self.key, error=str(exc))
        self._task = asyncio.create_task(self._keep_alive(), name="registry-keepalive")

    async def _put(self) -> None:
        lease = await self._client.lease(self._ttl_s)
        await self._client.put(self._key, self._record.to_json(), lease=lease)
        # Only a lease that holds the key counts: if the put failed, the next
        # round registers again instead of refreshing an empty lease.
        self._lease = lease

    async def set_state(self, state: str) -> None:
        """Publish a new state under the same lease (a re-registration keeps it)."""
        self._record = dataclasses.replace(self._record, state=state)
        try:
            await self._client.put(self._key, self._record.to_json(), lease=self._lease)
        except Exception as exc:  # etcd down: the lease ends it soon anyway
            log.warning("could not publish the worker's state", key=self.key, state=state, error=str(exc))

    async def _keep_alive(self) -> None:
        interval = self._ttl_s / 3
        while True:
            await asyncio.sleep(interval)
            try:
                response = await self._lease.refresh() if self._lease is not None else None
                # No lease, or TTL 0 (expired while etcd was unreachable):
                # register again instead of silently staying invisible.
                if response is None or getattr(response, "TTL", 1) <= 0:
                    log.warning("not registered; registering again", key=self.key)
                    self._lease = None
                    await self._put()
                    log.info("registered", key=self.key, address=self._record.address)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # etcd down: keep trying, never crash the worker
                log.warning("lease refresh failed", key=self.key, error=str(exc))

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(Exception):
            await self._client.delete(self._key)
            if self._lease is not None:
                await self._lease.revoke()
        with contextlib.suppress(Exception):
            await self._client.close()
        log.info("deregistered", key=self.key)


class RegistryWatcher:
    """A live map worker_id → WorkerRecord, from a prefix read plus a watch.

    Listeners (``on_change(kind, record)``) are called for every put
    ("put") and delete ("delete"). The watch is re-established (from a fresh
    read) whenever it breaks.
    """

    def __init__(
        self,
        endpoint: str,
        prefix: str,
        on_change: Callable[[str, WorkerRecord], None] | None = None,
    ):
        self._endpoint = endpoint
        self._prefix = workers_prefix(prefix).encode()
        self._listeners: list[Callable[[str, WorkerRecord], None]] = [on_change] if on_change else []
        self.workers: dict[str, WorkerRecord] = {}
        self._ready = asyncio.Event()
        self._task: asyncio.Task | None = None

    async def start(self, wait_s: float = 10.0) -> None:
        self._task = asyncio.create_task(self._run(), name="registry-watch")
        await asyncio.wait_for(self._ready.wait(), wait_s)

    async def _run(self) -> None:
        while True:
            client = etcd_client(self._endpoint)
            try:
                await client.connect()
                snapshot = await client.get_prefix(self._prefix)
                fresh: dict[str, WorkerRecord] = {}
                for kv in snapshot:
                    record = WorkerRecord.from_json(kv.value)
                    fresh[record.worker_id] = record
                self._replace(fresh)
                self._ready.set()
                watch = await client.watch_prefix(
                    self._prefix, start_revision=snapshot.header.revision + 1
                )
                async for event in watch:
                    self._apply(event)
            except asyncio.CancelledError:
                with contextlib.suppress(Exception):
                    await client.close()
                raise
            except Exception as exc:
                log.warning("registry watch broke; retrying", error=str(exc))
            with contextlib.suppress(Exception):
                await client.close()
            await asyncio.sleep(1.0)

    def _replace(self, fresh: dict[str, WorkerRecord]) -> None:
        gone = [w for w in self.workers if w not in fresh]
        for worker_id in gone:
            self._notify("delete", self.workers.pop(worker_id))
        for worker_id, record in fresh.items():
            if self.workers.get(worker_id) != record:
                known = worker_id in self.workers
                self.workers[worker_id] = record
                self._notify("put", record, known)

    def _apply(self, event) -> None:
        key = event.kv.key.decode()
        worker_id = key.rsplit("/", 1)[-1]
        if event.kind == "PUT":
            record = WorkerRecord.from_json(event.kv.value)
            known = record.worker_id in self.workers
            self.workers[record.worker_id] = record
            self._notify("put", record, known)
        elif event.kind == "DELETE":
            record = self.workers.pop(worker_id, None)
            if record is not None:
                self._notify("delete", record)

    def _notify(self, kind: str, record: WorkerRecord, known: bool = False) -> None:
        event = "left" if kind == "delete" else "changed" if known else "joined"
        log.info(f"worker {event}", worker_id=record.worker_id, role=record.role, address=record.address,
                 state=record.state, instance=record.instance)
        for listener in self._listeners:
            listener(kind, record)

    def on_change(self, listener: Callable[[str, WorkerRecord], None]) -> None:
        self._listeners.append(listener)
        for record in self.workers.values():  # what it missed
            listener("put", record)

    def by_role(self, role: str) -> list[WorkerRecord]:
        return sorted((w for w in self.workers.values() if w.role == role), key=lambda w: w.worker_id)

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task


async def list_workers(endpoint: str, prefix: str) -> list[WorkerRecord]:
    client = etcd_client(endpoint)
    try:
        await client.connect()
        return [WorkerRecord.from_json(kv.value) for kv in await client.get_prefix(workers_prefix(prefix).encode())]
    finally:
        with contextlib.suppress(Exception):
            await client.close()
