"""``ControlPlane`` servicer: thin I/O shell over the registry view, the
scheduling pipeline and the transfer table."""

from __future__ import annotations

import asyncio
import time

import grpc

from baton.logs import bind_request, get_logger
from baton.registry import RegistryWatcher, WorkerRecord
from baton.v1 import common_pb2, control_plane_pb2, control_plane_pb2_grpc
from control_plane.kv_backend import choose_backend
from control_plane.scheduling import Candidate, NoWorker, Scheduler, SchedulingRequest
from control_plane.transfers import TransferState, TransferTable
from kv_transfer.transport import BACKENDS, FALLBACK_BACKEND

log = get_logger(__name__)

SERVICE_NAME = control_plane_pb2.DESCRIPTOR.services_by_name["ControlPlane"].full_name
_ROLE = {"prefill": common_pb2.WORKER_ROLE_PREFILL, "decode": common_pb2.WORKER_ROLE_DECODE}
_OUTCOME = {
    control_plane_pb2.TRANSFER_OUTCOME_CONSUMED: TransferState.CONSUMED,
    control_plane_pb2.TRANSFER_OUTCOME_FAILED: TransferState.FAILED,
    control_plane_pb2.TRANSFER_OUTCOME_RECOMPUTED: TransferState.FAILED,
}


class ControlPlaneServicer(control_plane_pb2_grpc.ControlPlaneServicer):
    def __init__(self, registry: RegistryWatcher, schedulers: dict[str, Scheduler],
                 transfers: TransferTable, kv_backend: str = FALLBACK_BACKEND):
        """``schedulers`` maps role → pipeline; one instance per role so that
        the rotation state of one pool never skews the other. ``kv_backend``:
        the deployment's transfer backend."""
        self._registry = registry
        self._schedulers = schedulers
        self._transfers = transfers
        self._kv_backend = kv_backend

    def _pick(self, role: str, request: SchedulingRequest) -> WorkerRecord:
        """Raises ``NoWorker`` (its message names the role's pool)."""
        pool = {w.worker_id: w for w in self._registry.by_role(role)}
        candidates = [Candidate.of(w, self._transfers.in_flight(w.worker_id)) for w in pool.values()]
        try:
            return pool[self._schedulers[role].pick(request, candidates).worker_id]
        except NoWorker as exc:
            raise NoWorker(f"{role}: {exc}", exc.client_error) from None

    async def Schedule(self, request: control_plane_pb2.ScheduleRequest, context: grpc.aio.ServicerContext):
        bind_request(request.request_id)
        wanted = request.kv_backend or self._kv_backend
        if wanted not in BACKENDS:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"unknown KV backend {wanted!r}; choose from {', '.join(BACKENDS)}")
        wanted_request = SchedulingRequest(request.model, request.prompt_tokens, dict(request.required_labels))
        try:
            decode = self._pick("decode", wanted_request)
            prefill = self._pick("prefill", wanted_request)
        except NoWorker as exc:
            # A constraint nothing can meet is the client's; no worker at all
            # is capacity (not UNAVAILABLE: that would mean the control
            # plane itself is down).
            code = grpc.StatusCode.FAILED_PRECONDITION if exc.client_error else grpc.StatusCode.RESOURCE_EXHAUSTED
            await context.abort(code, str(exc))
        backend = choose_backend(wanted, prefill, decode)
        transfer = self._transfers.open(request.request_id, prefill.worker_id, decode.worker_id, time.monotonic(),
                                        backend, fallback=backend != wanted)
        if backend != wanted:
            # Loud and counted: a silent fallback costs users days.
            log.warning("KV backend not offered by this pair; falling back", wanted=wanted, using=backend,
                        prefill=prefill.worker_id, decode=decode.worker_id,
                        fallbacks=self._transfers.by_backend[backend]["fallbacks"])
        log.info("placed", prefill=prefill.worker_id, decode=decode.worker_id, transfer_id=transfer.transfer_id,
                 prompt_tokens=request.prompt_tokens, kv_backend=backend)
        return control_plane_pb2.Placement(
            prefill=control_plane_pb2.WorkerEndpoint(worker_id=prefill.worker_id, address=prefill.address,
                                                     kv_endpoint=prefill.kv_endpoints.get(backend, "")),
            decode=control_plane_pb2.WorkerEndpoint(worker_id=decode.worker_id, address=decode.address,
                                                    kv_address=decode.kv_address,
                                                    kv_endpoint=decode.kv_endpoints.get(backend, "")),
            transfer_id=transfer.transfer_id,
            kv_backend=backend,
        )

    async def ReportTransfer(self, request: control_plane_pb2.TransferReport, context):
        state = _OUTCOME.get(request.outcome)
        if state is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "outcome must be CONSUMED, FAILED or RECOMPUTED")
        recomputed = request.outcome == control_plane_pb2.TRANSFER_OUTCOME_RECOMPUTED
        closed = self._transfers.close(request.transfer_id, state, request.bytes, request.tokens, recomputed)
        if closed is None:
            return control_plane_pb2.TransferReportAck(state="unknown")
        if recomputed:
            log.warning("KV not loaded; the decode worker recomputed the prompt", transfer_id=request.transfer_id,
                        backend=closed.backend, decode=closed.decode_id, detail=request.detail,
                        recomputed=self._transfers.by_backend[closed.backend]["recomputed"])
        log.info("transfer closed", transfer_id=request.transfer_id, state=state.value, bytes=request.bytes,
                 tokens=request.tokens, detail=request.detail)
        return control_plane_pb2.TransferReportAck(state=state.value)

    async def ListWorkers(self, request, context) -> control_plane_pb2.ListWorkersResponse:
        response = control_plane_pb2.ListWorkersResponse()
        for worker in sorted(self._registry.workers.values(), key=lambda w: (w.role, w.worker_id)):
            counts = self._transfers.counters.get(worker.worker_id, {})
            response.workers.append(control_plane_pb2.WorkerStatus(
                worker_id=worker.worker_id, role=_ROLE.get(worker.role, 0), address=worker.address,
                kv_address=worker.kv_address, model=worker.model, state=worker.state,
                in_flight=self._transfers.in_flight(worker.worker_id),
                transfers_total=counts.get("total", 0), transfers_consumed=counts.get("consumed", 0),
                transfers_failed=counts.get("failed", 0), transfers_expired=counts.get("expired", 0),
            ))
        for backend, counts in sorted(self._transfers.by_backend.items()):
            response.kv_backends.append(control_plane_pb2.KVBackendStatus(
                backend=backend, **{field: counts[field] for field in (
                    "placed", "consumed", "failed", "recomputed", "expired", "bytes", "fallbacks")}))
        return response

    async def run_expiry(self, interval_s: float = 1.0) -> None:
        while True:
            await asyncio.sleep(interval_s)
            for transfer in self._transfers.expire(time.monotonic()):
                log.warning("transfer expired", transfer_id=transfer.transfer_id, request_id=transfer.request_id)
