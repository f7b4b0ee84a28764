"""Lifecycle shared by prefill and decode workers: engine, gRPC server,
registration, clean shutdown. Role packages supply only their servicers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

from baton import tls
from baton.config import Settings, advertise_host, advertised
from baton.engine import Engine, EngineOptions
from baton.logs import get_logger, setup_logging
from baton.metrics_server import serve_metrics
from baton.model_store import resolve_model
from baton.registry import Registration, WorkerRecord, parse_labels
from baton.rpc import ServiceBinding, start_server
from baton.served_models import worker_model
from baton.telemetry import setup_tracing
from baton.tls import Tls
from baton.worker_report import WorkerReporter
from kv_transfer.connector import read_endpoints
from kv_transfer.transport import available_backends

log = get_logger(__name__)

# After a servicer's own drain: what is still running then is cut off
# (the router moves it by recomputing) after this grace.
_STOP_GRACE_S = 2.0


async def wait_for_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def run_worker(
    role: str,
    settings: Settings,
    kv_role: str,
    make_bindings: Callable[[Engine], list[ServiceBinding]],
    connector_options: dict | None = None,
) -> None:
    """Start the engine, serve, register; on SIGINT/SIGTERM drain: leave the
    registry first (no new work arrives), let running requests finish for
    up to ``drain_timeout_s`` (a decode worker then hands the rest, with
    their KV, to the decode workers the router places them on; what cannot
    be handed off the router moves by recomputing it), then stop the
    engine."""
    worker_id = settings.worker_id or f"{role}-{uuid.uuid4().hex[:8]}"
    instance = uuid.uuid4().hex[:12]  # this process: a restart under the same id is another peer
    labels = parse_labels(settings.labels)  # a bad one fails before the engine starts
    setup_logging(f"{role}-worker", settings.log_level)
    internal_tls = Tls.internal(settings)
    tls.use(internal_tls)
    setup_tracing(f"{role}-worker")
    # Both block for long (model conversion, ~45 s engine start): keep the
    # loop free.
    model_path = await asyncio.to_thread(resolve_model, settings.model)
    name = worker_model(settings).name
    # The engine's connector writes how peers reach its KV here, per backend.
    scratch = Path(tempfile.mkdtemp(prefix="baton-kv-"))
    endpoint_file = scratch / "endpoints.json"
    # The engine publishes its KV cache events here (none if turned off); the reporter forwards them.
    events_endpoint = f"ipc://{scratch}/kv-events" if settings.kv_events else ""
    backends = available_backends()
    if internal_tls.enabled and not settings.tls_allow_plaintext_kv:
        backends = [b for b in backends if b == "grpc"]  # the one whose KV moves over TLS
    engine = await asyncio.to_thread(Engine.start, EngineOptions(
        model_path=str(model_path),
        served_model_name=name,
        kv_role=kv_role,
        connector_options={**(connector_options or {}), "backends": list(backends),
                           "endpoint_file": str(endpoint_file),
                           "agent_name": f"{worker_id}-{instance}",
                           "offer_ttl_s": settings.staging_ttl_s,
                           "kv_host": advertise_host(settings),
                           "staging_capacity_bytes": settings.staging_capacity_mib << 20,
                           "handoff_dir": str(scratch / "handoff"), **internal_tls.as_options()},
        max_model_len=settings.max_model_len,
        dtype=settings.dtype,
        enforce_eager=settings.enforce_eager,
        cpu_cores=settings.cpu_cores,
        kv_cache_gib=settings.kv_cache_gib,
        kv_cache_blocks=settings.kv_cache_blocks,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        kv_events_endpoint=events_endpoint,
    ))
    bindings = make_bindings(engine)
    server, port, health = await start_server(f"{role}-worker", bindings, settings.host, settings.grpc_port)
    # The engine's vllm:* metrics (vLLM's Prometheus stat logger runs in
    # this process) and the worker's own.
    metrics_port = serve_metrics(settings.host, settings.metrics_port)
    kv_endpoints = read_endpoints(str(endpoint_file))
    # A consumer engine hosts KVTransfer (its inbox) at its grpc endpoint.
    kv_address = kv_endpoints.get("grpc", "")
    record = WorkerRecord(worker_id=worker_id, role=role, address=advertised(settings, port),
                          model=name, kv_address=kv_address, kv_endpoints=kv_endpoints,
                          labels=labels, block_size=engine.block_size, kv_cache_blocks=engine.num_blocks,
                          kv_events=settings.kv_events, pid=os.getpid(), instance=instance,
                          metrics_address=advertised(settings, metrics_port))
    reporter = WorkerReporter(worker_id, settings.control_plane_address, events_endpoint, engine.load)
    reporter.start()
    registration = Registration(settings.etcd_endpoint, settings.etcd_prefix, record, settings.lease_ttl_s)
    await registration.start()
    log.info("worker serving", worker_id=worker_id, address=record.address, kv_address=kv_address,
             kv_backends=sorted(backends))
    signalled = asyncio.create_task(wait_for_signal(), name="signal")
    engine_died = asyncio.create_task(engine.until_dead(), name="engine-watch")
    try:
        await asyncio.wait({signalled, engine_died}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        signalled.cancel()
        engine_died.cancel()
        if engine.dead:
            # Serving on would fail every request sent here: leave, and exit
            # non-zero so a supervisor (baton up, compose, Kubernetes)
            # starts a new worker.
            log.error("engine died; the worker leaves", worker_id=worker_id)
        log.info("worker draining", worker_id=worker_id, drain_timeout_s=settings.drain_timeout_s)
        await health.enter_graceful_shutdown()  # health checks now say NOT_SERVING
        await registration.set_state("draining")  # out of placement; `baton status` shows it
        # A servicer that drains itself (decode: hands running answers off
        # with their KV) does so while the server still takes calls.
        drains = [b.servicer.drain for b in bindings if hasattr(b.servicer, "drain")]
        await asyncio.gather(*(drain(settings.drain_timeout_s) for drain in drains))
        await server.stop(grace=_STOP_GRACE_S if drains else settings.drain_timeout_s)
        await registration.stop()
        await reporter.stop()
        dead = engine.dead
        with contextlib.suppress(Exception):
            engine.shutdown()
        shutil.rmtree(scratch, ignore_errors=True)
    if dead:
        raise SystemExit(1)
