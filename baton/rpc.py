"""gRPC server and channel construction shared by every service.

Every server serves gRPC health checking and reflection besides its own
services, and carries trace context; every channel injects it. Both use the
process's TLS (``baton.tls``) when it has one.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from baton import tls as tls_config
from baton.telemetry import ServerTraceInterceptor, client_interceptors
from baton.tls import Tls

# KV chunks stay well below this; other messages are tiny.
MAX_MESSAGE_BYTES = 8 << 20
# A peer that went away (a restarted control plane, a worker back on its
# address, etcd) is reached again within a second or two of its return, not
# after gRPC's default backoff, which grows to two minutes. Subchannels are
# shared within a process, so one channel without these options would hold
# every other channel to the same address back too.
RECONNECT_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]
C = TypeVar("C")

_CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    *RECONNECT_OPTIONS,
]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class ServiceBinding:
    """One servicer to mount: ``add(servicer, server)`` is the generated
    ``add_XServicer_to_server`` and ``name`` the full service name."""

    name: str
    add: Callable[[object, grpc.aio.Server], None]
    servicer: object


def _add_health_and_reflection(server, bindings: list[ServiceBinding], health_servicer) -> list[str]:
    """Mount the bindings, health and reflection; returns the services' names."""
    for binding in bindings:
        binding.add(binding.servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [b.name for b in bindings]
    reflection.enable_server_reflection(
        [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
        server,
    )
    return names


def _bind(server, host: str, port: int, tls: Tls | None) -> int:
    tls = tls or tls_config.current()
    if tls.enabled and not tls.cert_file:
        # Its clients dial TLS: a plaintext server would only fail every call.
        raise RuntimeError(f"TLS is on (tls_ca_file) but this server has no tls_cert_file/tls_key_file to serve {host}:{port}")
    credentials = tls.server_credentials()
    if credentials is None:
        return server.add_insecure_port(f"{host}:{port}")
    return server.add_secure_port(f"{host}:{port}", credentials)


async def start_server(
    service: str, bindings: Iterable[ServiceBinding], host: str, port: int, tls: Tls | None = None
) -> tuple[grpc.aio.Server, int, health.HealthServicer]:
    """Start a server; returns it, the bound port and its health servicer.
    ``tls``: how it serves (default: this process's internal TLS, if any)."""
    bindings = list(bindings)
    server = grpc.aio.server(
        interceptors=[ServerTraceInterceptor(service)], options=_CHANNEL_OPTIONS
    )
    health_servicer = health.aio.HealthServicer()
    names = _add_health_and_reflection(server, bindings, health_servicer)
    bound = _bind(server, host, port, tls)
    if bound == 0:
        raise RuntimeError(f"{service}: cannot bind {host}:{port}")
    await server.start()
    for name in ["", *names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, bound, health_servicer


def start_sync_server(bindings: Iterable[ServiceBinding], host: str, port: int, max_workers: int,
                      handlers: Iterable[grpc.GenericRpcHandler] = ()) -> tuple[grpc.Server, int]:
    """A thread-pool server for code outside an event loop (vLLM's engine
    processes), with health and reflection too; at most ``max_workers`` RPCs
    at once, more are refused with RESOURCE_EXHAUSTED."""
    from concurrent.futures import ThreadPoolExecutor

    bindings = list(bindings)
    server = grpc.server(ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="baton-rpc"),
                         maximum_concurrent_rpcs=max_workers, options=_CHANNEL_OPTIONS)
    server.add_generic_rpc_handlers(tuple(handlers))
    health_servicer = health.HealthServicer()
    names = _add_health_and_reflection(server, bindings, health_servicer)
    bound = _bind(server, host, port, None)
    if bound == 0:
        raise RuntimeError(f"cannot bind {host}:{port}")
    server.start()
    for name in ["", *names]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, bound


def channel(address: str) -> grpc.aio.Channel:
    """To another Baton service (TLS when this process uses it)."""
    tls = tls_config.current()
    credentials = tls.channel_credentials()
    if credentials is None:
        return grpc.aio.insecure_channel(address, options=_CHANNEL_OPTIONS, interceptors=client_interceptors())
    return grpc.aio.secure_channel(address, credentials, options=_CHANNEL_OPTIONS + tls.channel_options(),
                                   interceptors=client_interceptors())


def sync_channel(address: str) -> grpc.Channel:
    """For code outside an event loop (vLLM's engine processes)."""
    tls = tls_config.current()
    credentials = tls.channel_credentials()
    if credentials is None:
        return grpc.insecure_channel(address, options=_CHANNEL_OPTIONS)
    return grpc.secure_channel(address, credentials, options=_CHANNEL_OPTIONS + tls.channel_options())


class ChannelPool(Generic[C]):
    """One channel per peer address, made by ``make`` (``channel`` or
    ``sync_channel``) on first use and reused; safe to share between
    threads (channels themselves are)."""

    def __init__(self, make: Callable[[str], C]):
        self._make = make
        self._lock = threading.Lock()
        self._by_address: dict[str, C] = {}

    def get(self, address: str) -> C:
        with self._lock:
            found = self._by_address.get(address)
            if found is None:
                found = self._by_address[address] = self._make(address)
            return found

    def take_all(self) -> list[C]:
        """Every channel, forgotten here: the caller closes them (``close()``,
        awaited for asyncio channels)."""
        with self._lock:
            channels, self._by_address = list(self._by_address.values()), {}
        return channels
