"""``baton router``: the public HTTP and gRPC endpoints in one process."""

from __future__ import annotations

import asyncio
import contextlib

import uvicorn

from baton.config import Settings
from baton.logs import get_logger, setup_logging
from baton.model_store import resolve_model
from baton.registry import RegistryWatcher
from baton.rpc import ServiceBinding, start_server
from baton.telemetry import setup_tracing
from baton.v1 import inference_pb2_grpc
from baton.worker import served_name, wait_for_signal

log = get_logger(__name__)


async def serve(settings: Settings) -> None:
    setup_logging("router", settings.log_level)
    setup_tracing("router")
    from vllm.v1.metrics.prometheus import get_prometheus_registry

    from router.constraints import RequireLabels
    from router.engine_client import BatonEngineClient, frontend_args
    from router.engine_core import ClusterEngineCore
    from router.grpc_api import SERVICE_NAME, InferenceServicer
    from router.http_api import create_app
    from router.metrics import Metrics
    from router.pipeline import Pipeline

    model_path = resolve_model(settings.model)
    name = served_name(settings, model_path)
    registry = RegistryWatcher(settings.etcd_endpoint, settings.etcd_prefix)
    await registry.start()
    metrics = Metrics(get_prometheus_registry())
    pipeline = Pipeline(settings.control_plane_address, registry, name, metrics, settings.request_timeout_s)
    args = frontend_args(str(model_path), name, settings.max_model_len, settings.host, settings.http_port,
                         settings.frontend_args.split())
    # Building vLLM's configuration reads the model's files: not on the loop.
    engine = await asyncio.to_thread(BatonEngineClient, args, ClusterEngineCore(pipeline))
    app = await create_app(engine, args)
    grpc_server, grpc_port, _ = await start_server(
        "router",
        [ServiceBinding(SERVICE_NAME, inference_pb2_grpc.add_InferenceServicer_to_server,
                        InferenceServicer(engine, name))],
        settings.host, settings.router_grpc_port)
    http = uvicorn.Server(uvicorn.Config(RequireLabels(app), host=settings.host, port=settings.http_port,
                                         log_level="warning", access_log=False, lifespan="off"))
    http.install_signal_handlers = lambda: None  # we own SIGINT/SIGTERM
    http_task = asyncio.create_task(http.serve(), name="http")
    log.info("router serving", http=f"http://{settings.host}:{settings.http_port}/v1",
             grpc=f"{settings.host}:{grpc_port}", model=name)
    try:
        stop = asyncio.create_task(wait_for_signal())
        await asyncio.wait({stop, http_task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        http.should_exit = True
        with contextlib.suppress(Exception):
            await http_task
        await grpc_server.stop(grace=2)
        engine.shutdown()
        await pipeline.close()
        await registry.stop()
