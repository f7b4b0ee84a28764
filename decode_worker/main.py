"""``baton decode-worker``: one decode worker process. Its engine hosts the
KV endpoints prefill workers send to (see ``kv_transfer.transport``)."""

from __future__ import annotations

from baton.config import Settings
from baton.engine import Engine
from baton.rpc import ServiceBinding
from baton.v1 import decode_pb2_grpc
from baton.worker import run_worker
from decode_worker.service import SERVICE_NAME, DecodeServicer


async def serve(settings: Settings) -> None:
    def bindings(engine: Engine) -> list[ServiceBinding]:
        return [ServiceBinding(SERVICE_NAME, decode_pb2_grpc.add_DecodeWorkerServicer_to_server,
                               DecodeServicer(engine))]

    await run_worker(
        "decode", settings, "kv_consumer", bindings,
        connector_options={"kv_port": settings.kv_port, "fetch_timeout_ms": settings.kv_fetch_timeout_ms,
                           "push_start_timeout_ms": settings.kv_push_start_timeout_ms},
    )
