"""``baton router``: the public HTTP and gRPC endpoints in one process."""

from __future__ import annotations

import asyncio
import contextlib

import uvicorn

from baton.config import Settings
from baton.logs import get_logger, setup_logging
from baton.model_store import resolve_model, sampling_defaults
from baton.registry import RegistryWatcher
from baton.rpc import ServiceBinding, start_server
from baton.telemetry import setup_tracing
from baton.v1 import inference_pb2_grpc
from baton.worker import served_name, wait_for_signal
from router.frontend import Frontend
from router.grpc_api import SERVICE_NAME, InferenceServicer
from router.http_api import create_app
from router.metrics import Metrics
from router.pipeline import Pipeline
from router.requests import Limits
from router.tokenization import Tokenizer

log = get_logger(__name__)


async def serve(settings: Settings) -> None:
    setup_logging("router", settings.log_level)
    setup_tracing("router")
    model_path = resolve_model(settings.model)
    name = served_name(settings, model_path)
    tokenizer = await asyncio.to_thread(Tokenizer, str(model_path))
    registry = RegistryWatcher(settings.etcd_endpoint, settings.etcd_prefix)
    await registry.start()
    metrics = Metrics()
    pipeline = Pipeline(settings.control_plane_address, registry, name, metrics, settings.request_timeout_s)
    defaults = sampling_defaults(model_path)
    limits = Limits(name, settings.max_model_len, settings.max_tokens_limit, settings.default_max_tokens,
                    tokenizer.vocab_size, defaults.get("temperature"), defaults.get("top_p"))
    frontend = Frontend(tokenizer, limits, pipeline, metrics)
    grpc_server, grpc_port, _ = await start_server(
        "router",
        [ServiceBinding(SERVICE_NAME, inference_pb2_grpc.add_InferenceServicer_to_server,
                        InferenceServicer(frontend))],
        settings.host, settings.router_grpc_port)
    http = uvicorn.Server(uvicorn.Config(create_app(frontend), host=settings.host, port=settings.http_port,
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
        await pipeline.close()
        await registry.stop()
