"""``baton prefill-worker``: one prefill worker process."""

from __future__ import annotations

from baton.config import Settings
from baton.engine import Engine
from baton.rpc import ServiceBinding
from baton.v1 import prefill_pb2_grpc
from baton.worker import run_worker
from prefill_worker.service import SERVICE_NAME, PrefillServicer


async def serve(settings: Settings) -> None:
    def bindings(engine: Engine) -> list[ServiceBinding]:
        return [ServiceBinding(SERVICE_NAME, prefill_pb2_grpc.add_PrefillWorkerServicer_to_server,
                               PrefillServicer(engine))]

    await run_worker("prefill", settings, "kv_producer", bindings,
                     connector_options={"chunk_bytes": settings.kv_chunk_bytes})
