"""``baton router``: the public HTTP and gRPC endpoints in one process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import uvicorn

from baton import tls
from baton.config import Settings, key_limits
from baton.logs import get_logger, setup_logging
from baton.model_store import resolve_model
from baton.registry import RegistryWatcher
from baton.rpc import ServiceBinding, start_server
from baton.served_models import served_models
from baton.telemetry import setup_tracing
from baton.tls import Tls
from baton.v1 import inference_pb2_grpc
from baton.worker import wait_for_signal

log = get_logger(__name__)


async def serve(settings: Settings) -> None:
    setup_logging("router", settings.log_level)
    tls.use(Tls.internal(settings))
    public_tls = Tls.public(settings)
    setup_tracing("router")
    from vllm.v1.metrics.prometheus import get_prometheus_registry

    from router.admission import Admission, AdmitGenerations
    from router.api_keys import KeyRing
    from router.constraints import RequireLabels
    from router.engine_client import BatonEngineClient, frontend_args
    from router.engine_core import ClusterEngineCore
    from router.grpc_api import SERVICE_NAME, InferenceServicer
    from router.http_api import create_app
    from router.http_entry import HttpEntry
    from router.key_guard import KeyGuard, RequireApiKey
    from router.metrics import Metrics
    from router.model_dispatch import ModelDispatch
    from router.pipeline import Pipeline
    from router.request_limits import RequestLimits

    keys = (KeyRing.load(settings.api_keys_file, settings.api_keys, key_limits(settings))
            if settings.api_keys_file or settings.api_keys else KeyRing([]))
    guard = KeyGuard(keys, time.monotonic, get_prometheus_registry())
    frontend_extra = settings.frontend_args.split()
    if settings.max_tokens_cap:  # requests that ask for no length get at most the cap (vLLM's own override)
        frontend_extra += ["--override-generation-config", json.dumps({"max_new_tokens": settings.max_tokens_cap})]
    models = served_models(settings)
    registry = RegistryWatcher(settings.etcd_endpoint, settings.etcd_prefix)
    await registry.start()
    metrics = Metrics(get_prometheus_registry())
    # One vLLM frontend per model: its own tokenizer, template and defaults.
    pipelines, engines, apps = [], {}, {}
    for served in models:
        model_path = await asyncio.to_thread(resolve_model, served.model)
        pipeline = Pipeline(settings.control_plane_address, registry, served.name, metrics,
                            settings.request_timeout_s, settings.decode_moves, settings.decode_handoffs)
        pipelines.append(pipeline)
        args = frontend_args(str(model_path), served.name, settings.max_model_len, settings.host,
                             settings.http_port, frontend_extra)
        # Building vLLM's configuration reads the model's files: not on the loop.
        engines[served.name] = await asyncio.to_thread(BatonEngineClient, args, ClusterEngineCore(pipeline))
        apps[served.name] = await create_app(engines[served.name], args)

    # As `vllm serve` does once it is up: the startup heap (torch, vLLM,
    # tokenizers) leaves the collector's view, so a full collection while
    # serving takes milliseconds instead of ~0.8 s of a stalled event loop.
    from vllm.utils.gc_utils import freeze_gc_heap

    freeze_gc_heap()

    def live_models() -> set[str]:
        return {w.model for w in registry.by_role("decode")}

    # HTTP and gRPC share the places: one bound for the router.
    admission = Admission(settings.max_requests_per_decode_worker,
                          lambda: sum(w.state == "ready" for w in registry.by_role("decode")), metrics.refused.inc)
    metrics.admitted.set_function(lambda: admission.in_flight)

    grpc_server, grpc_port, _ = await start_server(
        "router",
        [ServiceBinding(SERVICE_NAME, inference_pb2_grpc.add_InferenceServicer_to_server,
                        InferenceServicer(engines, live_models, admission, time.monotonic, guard,
                                          settings.max_tokens_cap))],
        settings.host, settings.router_grpc_port, tls=public_tls)
    app = ModelDispatch(apps, live_models)
    # Outermost first: traced, key checked, limits, then admission: a request
    # without a valid key or over a limit never takes an admission place.
    guarded = RequireApiKey(RequestLimits(AdmitGenerations(RequireLabels(app), admission, time.monotonic),
                                          settings.max_request_body_bytes, settings.max_tokens_cap,
                                          settings.stream_write_timeout_s), guard)
    http = uvicorn.Server(uvicorn.Config(HttpEntry(guarded),
                                         host=settings.host, port=settings.http_port,
                                         log_level="warning", access_log=False, lifespan="off",
                                         ssl_certfile=public_tls.cert_file or None,
                                         ssl_keyfile=public_tls.key_file or None))
    http.install_signal_handlers = lambda: None  # we own SIGINT/SIGTERM
    http_task = asyncio.create_task(http.serve(), name="http")
    log.info("router serving", http=f"{'https' if public_tls.cert_file else 'http'}://{settings.host}:{settings.http_port}/v1",
             grpc=f"{settings.host}:{grpc_port}", models=list(engines), api_keys=len(guard.ring))
    try:
        stop = asyncio.create_task(wait_for_signal())
        await asyncio.wait({stop, http_task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        http.should_exit = True
        with contextlib.suppress(Exception):
            await http_task
        await grpc_server.stop(grace=2)
        for engine in engines.values():
            engine.shutdown()
        for pipeline in pipelines:
            await pipeline.close()
        await registry.stop()
