"""``baton control-plane``: the control-plane process."""

from __future__ import annotations

import asyncio
import contextlib

from baton import tls
from baton.config import Settings
from baton.logs import get_logger, setup_logging
from baton.metrics_server import serve_metrics
from baton.registry import ROLES, RegistryWatcher
from baton.rpc import ServiceBinding, start_server
from baton.telemetry import setup_tracing
from baton.tls import Tls
from baton.v1 import control_plane_pb2_grpc
from baton.worker import wait_for_signal
from control_plane.metrics import control_plane_registry
from control_plane.scheduling import make_scheduler
from control_plane.scheduling.disaggregation import Disaggregation
from control_plane.service import SERVICE_NAME, ControlPlaneServicer
from control_plane.transfers import TransferTable

log = get_logger(__name__)


async def serve(settings: Settings) -> None:
    setup_logging("control-plane", settings.log_level)
    tls.use(Tls.internal(settings))
    setup_tracing("control-plane")
    schedulers = {role: make_scheduler(settings.policy, role) for role in ROLES}
    registry = RegistryWatcher(settings.etcd_endpoint, settings.etcd_prefix)
    await registry.start()
    servicer = ControlPlaneServicer(registry, schedulers, TransferTable(settings.transfer_ttl_s), settings.kv_backend,
                                    settings.policy, Disaggregation(enabled=settings.disaggregation == "auto"))
    port = int(settings.control_plane_address.rpartition(":")[2])
    server, bound, _ = await start_server(
        "control-plane",
        [ServiceBinding(SERVICE_NAME, control_plane_pb2_grpc.add_ControlPlaneServicer_to_server, servicer)],
        settings.host, port)
    metrics_port = serve_metrics(settings.host, settings.metrics_port, control_plane_registry(servicer))
    expiry = asyncio.create_task(servicer.run_expiry(), name="transfer-expiry")
    probes = asyncio.create_task(servicer.suspects.run(), name="suspect-probes")
    log.info("control plane serving", port=bound, metrics_port=metrics_port, policy=settings.policy,
             kv_backend=settings.kv_backend,
             disaggregation=settings.disaggregation)
    try:
        await wait_for_signal()
    finally:
        for task in (expiry, probes):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await server.stop(grace=2)
        await registry.stop()
