"""``baton decode-worker``: one decode worker process. The KVTransfer
endpoint starts first, so the engine's connector knows where to fetch from."""

from __future__ import annotations

import asyncio
import contextlib

from baton.config import Settings, advertised
from baton.engine import Engine
from baton.rpc import ServiceBinding, start_server
from baton.v1 import decode_pb2_grpc, kv_transfer_pb2_grpc
from baton.worker import run_worker
from decode_worker.service import SERVICE_NAME, DecodeServicer
from kv_transfer.service import SERVICE_NAME as KV_SERVICE_NAME
from kv_transfer.service import KVTransferServicer
from kv_transfer.staging import StagingStore


async def serve(settings: Settings) -> None:
    store = StagingStore(settings.staging_capacity_mib << 20, settings.staging_ttl_s)
    kv_server, kv_port, _ = await start_server(
        "kv-transfer",
        [ServiceBinding(KV_SERVICE_NAME, kv_transfer_pb2_grpc.add_KVTransferServicer_to_server,
                        KVTransferServicer(store, settings.kv_chunk_bytes))],
        settings.host, settings.kv_port)
    expiry = asyncio.create_task(store.run_expiry(), name="staging-expiry")

    def bindings(engine: Engine) -> list[ServiceBinding]:
        return [ServiceBinding(SERVICE_NAME, decode_pb2_grpc.add_DecodeWorkerServicer_to_server,
                               DecodeServicer(engine, store))]

    local_kv = f"127.0.0.1:{kv_port}" if settings.host in ("0.0.0.0", "127.0.0.1") else f"{settings.host}:{kv_port}"
    try:
        await run_worker(
            "decode", settings, "kv_consumer", bindings,
            connector_options={"fetch_address": local_kv, "fetch_timeout_ms": settings.kv_fetch_timeout_ms,
                               "push_start_timeout_ms": settings.kv_push_start_timeout_ms,
                               "chunk_bytes": settings.kv_chunk_bytes},
            kv_address=advertised(settings, kv_port),
        )
    finally:
        expiry.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await expiry
        await kv_server.stop(grace=2)
