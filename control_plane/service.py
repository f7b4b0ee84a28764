"""``ControlPlane`` servicer: thin I/O shell over the registry view, the
scheduling pipeline and the transfer table."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import grpc
from opentelemetry import trace

from baton.logs import bind_request, get_logger
from baton.registry import RegistryWatcher, WorkerRecord
from baton.v1 import common_pb2, control_plane_pb2, control_plane_pb2_grpc
from control_plane.kv_backend import choose_backend
from control_plane.prefix_index import Cleared, PrefixIndex, Removed, Stored, block_keys
from control_plane.recent_errors import RecentErrors
from control_plane.scheduling import Candidate, EngineReport, NoWorker, Scheduler, SchedulingRequest
from control_plane.scheduling.disaggregation import DISAGGREGATED, MOVED, REQUESTED, Disaggregation
from control_plane.suspects import Suspects
from control_plane.transfers import TransferState, TransferTable
from kv_transfer.transport import BACKENDS, FALLBACK_BACKEND

log = get_logger(__name__)

SERVICE_NAME = control_plane_pb2.DESCRIPTOR.services_by_name["ControlPlane"].full_name
_ROLE = {"prefill": common_pb2.WORKER_ROLE_PREFILL, "decode": common_pb2.WORKER_ROLE_DECODE}
_OUTCOME = {
    control_plane_pb2.TRANSFER_OUTCOME_CONSUMED: TransferState.CONSUMED,
    control_plane_pb2.TRANSFER_OUTCOME_FAILED: TransferState.FAILED,
    control_plane_pb2.TRANSFER_OUTCOME_RECOMPUTED: TransferState.FAILED,
    control_plane_pb2.TRANSFER_OUTCOME_LOCAL: TransferState.LOCAL,
}


def _event(message: control_plane_pb2.KVCacheEvent):
    kind = message.WhichOneof("kind")
    if kind == "stored":
        stored = message.stored
        parent = stored.parent_block_hash if stored.HasField("parent_block_hash") else None
        return Stored(list(stored.block_hashes), parent, list(stored.token_ids), stored.block_size)
    if kind == "removed":
        return Removed(list(message.removed.block_hashes))
    return Cleared() if kind == "cleared" else None


class _PromptKeys:
    """A prompt's block keys, computed once per block size it is matched at."""

    def __init__(self, token_ids):
        self._tokens = list(token_ids)
        self._by_size: dict[int, list[int]] = {}

    def at(self, block_size: int) -> list[int]:
        if block_size <= 0:
            return []
        if block_size not in self._by_size:
            self._by_size[block_size] = block_keys(self._tokens, block_size)
        return self._by_size[block_size]


class ControlPlaneServicer(control_plane_pb2_grpc.ControlPlaneServicer):
    def __init__(self, registry: RegistryWatcher, schedulers: dict[str, Scheduler],
                 transfers: TransferTable, kv_backend: str = FALLBACK_BACKEND, policy: str = "",
                 disaggregation: Disaggregation | None = None, suspects: Suspects | None = None):
        """``schedulers`` maps role → pipeline; one instance per role so that
        the rotation state of one pool never skews the other. ``kv_backend``:
        the deployment's transfer backend."""
        self._registry = registry
        self._schedulers = schedulers
        self._transfers = transfers
        self._kv_backend = kv_backend
        self._policy = policy
        self._disaggregation = disaggregation or Disaggregation()
        self._decisions: Counter = Counter()  # placements by decision
        self._prefixes = PrefixIndex()
        self._engines: dict[str, EngineReport] = {}
        self._engine_reports: dict[str, control_plane_pb2.EngineLoad] = {}
        self.suspects = suspects if suspects is not None else Suspects()
        self.recent_errors = RecentErrors()
        self._instances: dict[str, str] = {}  # worker id → the process instance registered under it
        registry.on_change(self._worker_changed)

    def _forget(self, worker_id: str) -> None:
        self.suspects.forget(worker_id)
        self._prefixes.forget(worker_id)
        self._engines.pop(worker_id, None)
        self._engine_reports.pop(worker_id, None)

    def _worker_changed(self, kind: str, record: WorkerRecord) -> None:
        worker_id = record.worker_id
        if kind == "delete":
            self._forget(worker_id)
            self._instances.pop(worker_id, None)
            return
        previous = self._instances.get(worker_id)
        self._instances[worker_id] = record.instance
        if previous is not None and previous != record.instance:
            # Restarted under its old id before its old key left: another
            # process, with an empty cache and none of its predecessor's
            # requests.
            failed = self._transfers.fail_worker(worker_id)
            self._forget(worker_id)
            self.recent_errors.add("restarted", worker_id, detail=f"came back as another process; "
                                   f"{len(failed)} of its transfers failed")
            log.warning("worker restarted; its predecessor's transfers failed", worker_id=worker_id,
                        instance=record.instance, failed_transfers=len(failed))
        self._prefixes.track(worker_id, events=record.kv_events, block_size=record.block_size,
                             capacity_blocks=record.kv_cache_blocks)

    @property
    def policy(self) -> str:
        return self._policy

    @property
    def decisions(self) -> Counter:
        return self._decisions

    @property
    def transfers(self) -> TransferTable:
        return self._transfers

    def worker_states(self) -> list[tuple[str, str, str]]:
        """(role, state, model) of each registered worker."""
        return [(w.role, self._state(w), w.model) for w in self._registry.workers.values()]

    def _state(self, worker: WorkerRecord) -> str:
        """Its registry state, unless a request just failed on it."""
        return "suspect" if worker.worker_id in self.suspects else worker.state

    def _candidate(self, worker: WorkerRecord, keys: _PromptKeys, now_s: float) -> Candidate:
        block_size = self._prefixes.block_size(worker.worker_id) or worker.block_size
        matched = self._prefixes.matched_blocks(worker.worker_id, keys.at(block_size), now_s)
        worker_id = worker.worker_id
        return Candidate.of(worker, self._transfers.in_flight(worker_id), self._state(worker),
                            cached_tokens=matched * block_size,
                            queued_prefill_tokens=self._transfers.queued_prefill_tokens(worker_id),
                            running=self._transfers.running(worker_id),
                            decoding=self._transfers.decoding(worker_id),
                            decode_tokens=self._transfers.decode_tokens(worker_id),
                            engine=self._engines.get(worker_id))

    def _pick(self, role: str, request: SchedulingRequest, keys: _PromptKeys, now_s: float) -> Candidate:
        """Raises ``NoWorker`` (its message names the role's pool)."""
        candidates = [self._candidate(w, keys, now_s) for w in self._registry.by_role(role)]
        try:
            return self._schedulers[role].pick(request, candidates)
        except NoWorker as exc:
            raise NoWorker(f"{role}: {exc}", exc.client_error) from None

    async def Schedule(self, request: control_plane_pb2.ScheduleRequest, context: grpc.aio.ServicerContext):
        bind_request(request.request_id)
        wanted = request.kv_backend or self._kv_backend
        if wanted not in BACKENDS:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"unknown KV backend {wanted!r}; choose from {', '.join(BACKENDS)}")
        prompt_tokens = len(request.prompt_token_ids) or request.prompt_tokens
        wanted_request = SchedulingRequest(request.model, prompt_tokens, dict(request.required_labels),
                                           request.max_tokens)
        keys, now = _PromptKeys(request.prompt_token_ids), time.monotonic()
        for worker_id in request.avoid_workers:
            worker = self._registry.workers.get(worker_id)
            if worker is not None:
                self.suspects.mark(worker_id, worker.address, f"request {request.request_id} failed on it")
                self.recent_errors.add("suspect", worker_id, detail=f"request {request.request_id} failed on it")
        # A running request leaving a draining decode worker with its KV:
        # that worker is the KV's source, where a prefill worker would be.
        move_source = self._registry.workers.get(request.move_from) if request.move_from else None
        if request.move_from and (move_source is None or move_source.role != "decode"):
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"no decode worker {request.move_from!r} to move a request from")
        try:
            decode_pick = self._pick("decode", wanted_request, keys, now)
            if decode_pick.worker_id == request.move_from:
                raise NoWorker("decode: none but the worker the request leaves")
            try:
                prefill_pick = None if move_source else self._pick("prefill", wanted_request, keys, now)
            except NoWorker:
                if request.HasField("remote_prefill") and request.remote_prefill:
                    raise
                prefill_pick = None  # the decode worker serves alone
        except NoWorker as exc:
            # A constraint nothing can meet is the client's; no worker at all
            # is capacity (not UNAVAILABLE: that would mean the control
            # plane itself is down).
            code = grpc.StatusCode.FAILED_PRECONDITION if exc.client_error else grpc.StatusCode.RESOURCE_EXHAUSTED
            await context.abort(code, str(exc))
        if move_source is not None:
            decision = MOVED
        elif request.HasField("remote_prefill") and prefill_pick is not None:
            decision = REQUESTED
            if not request.remote_prefill:
                prefill_pick = None
        else:
            decision = self._disaggregation.decide(wanted_request, prefill_pick, decode_pick)
            if decision != DISAGGREGATED:
                prefill_pick = None
        self._decisions[decision] += 1
        decode = self._registry.workers[decode_pick.worker_id]
        prefill = move_source or (self._registry.workers[prefill_pick.worker_id] if prefill_pick else None)
        backend = choose_backend(wanted, prefill, decode) if prefill else ""
        transfer = self._transfers.open(request.request_id, prefill.worker_id if prefill else "", decode.worker_id,
                                        now, backend, fallback=bool(prefill) and backend != wanted,
                                        prefill_tokens=prefill_pick.uncached_tokens(wanted_request) if prefill_pick
                                        else 0,
                                        decode_tokens=prompt_tokens + request.max_tokens,
                                        predicted_cached=prefill_pick.cached_tokens if prefill_pick else 0)
        # Both will hold the prompt's blocks: the prefill worker computes
        # them, the decode worker loads them (or computes them itself).
        for worker in filter(None, (None if move_source else prefill, decode)):
            self._prefixes.placed(worker.worker_id, keys.at(self._prefixes.block_size(worker.worker_id)), now)
        if prefill and backend != wanted:
            # Loud and counted: a silent fallback costs users days.
            log.warning("KV backend not offered by this pair; falling back", wanted=wanted, using=backend,
                        prefill=prefill.worker_id, decode=decode.worker_id,
                        fallbacks=self._transfers.by_backend[backend]["fallbacks"])
        log.info("placed", prefill=prefill.worker_id if prefill else "", decode=decode.worker_id,
                 transfer_id=transfer.transfer_id, prompt_tokens=prompt_tokens, kv_backend=backend,
                 decision=decision, prefill_cached_tokens=prefill_pick.cached_tokens if prefill_pick else 0,
                 decode_cached_tokens=decode_pick.cached_tokens,
                 queued_prefill_tokens=prefill_pick.queued_prefill_tokens if prefill_pick else 0)
        trace.get_current_span().set_attributes({
            "baton.policy": self._policy, "baton.decision": decision, "baton.kv_backend": backend,
            "baton.prefill_worker": prefill.worker_id if prefill else "", "baton.decode_worker": decode.worker_id,
            "baton.transfer_id": transfer.transfer_id, "baton.prompt_tokens": prompt_tokens,
            "baton.prefill_cached_tokens": prefill_pick.cached_tokens if prefill_pick else 0,
            "baton.decode_cached_tokens": decode_pick.cached_tokens})
        placement = control_plane_pb2.Placement(
            decode=control_plane_pb2.WorkerEndpoint(worker_id=decode.worker_id, address=decode.address,
                                                    kv_address=decode.kv_address,
                                                    kv_endpoint=decode.kv_endpoints.get(backend, "")),
            transfer_id=transfer.transfer_id,
            kv_backend=backend,
            decode_cached_tokens=decode_pick.cached_tokens,
            decision=decision,
        )
        if prefill:
            placement.prefill.CopyFrom(control_plane_pb2.WorkerEndpoint(
                worker_id=prefill.worker_id, address=prefill.address,
                kv_endpoint=prefill.kv_endpoints.get(backend, "")))
            placement.prefill_cached_tokens = prefill_pick.cached_tokens if prefill_pick else 0
        return placement

    async def ReportPrefillDone(self, request: control_plane_pb2.PrefillDone, context):
        transfer = self._transfers.prefill_done(request.transfer_id, request.cached_tokens)
        if transfer is None:
            return control_plane_pb2.TransferReportAck(state="unknown")
        if transfer.predicted_cached != request.cached_tokens:
            log.info("prefix index missed", transfer_id=request.transfer_id, prefill=transfer.prefill_id,
                     predicted_cached_tokens=transfer.predicted_cached, cached_tokens=request.cached_tokens)
        return control_plane_pb2.TransferReportAck(state=transfer.state.value)

    async def ReportWorker(self, request_iterator, context):
        worker_id = ""
        async for report in request_iterator:
            worker_id = report.worker_id
            if report.reset:
                self._prefixes.reset(worker_id)
            for message in report.events:
                event = _event(message)
                if event is not None:
                    self._prefixes.apply(worker_id, event)
            if report.HasField("load"):
                load = report.load
                self._engines[worker_id] = EngineReport(load.running, load.waiting, load.kv_cache_usage)
                self._engine_reports[worker_id] = load
        return control_plane_pb2.WorkerReportAck()

    async def ReportTransfer(self, request: control_plane_pb2.TransferReport, context):
        state = _OUTCOME.get(request.outcome)
        if state is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "outcome must be CONSUMED, FAILED, RECOMPUTED or LOCAL")
        recomputed = request.outcome == control_plane_pb2.TRANSFER_OUTCOME_RECOMPUTED
        closed = self._transfers.close(request.transfer_id, state, request.bytes, request.tokens, recomputed)
        if closed is None:
            return control_plane_pb2.TransferReportAck(state="unknown")
        if recomputed or state == TransferState.FAILED:
            self.recent_errors.add("recomputed" if recomputed else "transfer-failed", closed.decode_id,
                                   request.transfer_id, request.detail)
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
                kv_address=worker.kv_address, model=worker.model,
                state=self._state(worker),
                in_flight=self._transfers.in_flight(worker.worker_id),
                transfers_total=counts.get("total", 0), transfers_consumed=counts.get("consumed", 0),
                transfers_failed=counts.get("failed", 0), transfers_expired=counts.get("expired", 0),
                kv_bytes=counts.get("bytes", 0),
                prefix_source=self._prefixes.source(worker.worker_id),
                cached_blocks=self._prefixes.cached_blocks(worker.worker_id),
                queued_prefill_tokens=self._transfers.queued_prefill_tokens(worker.worker_id),
                running=self._transfers.running(worker.worker_id),
                engine=self._engine_reports.get(worker.worker_id),
            ))
        for backend, counts in sorted(self._transfers.by_backend.items()):
            response.kv_backends.append(control_plane_pb2.KVBackendStatus(
                backend=backend, **{field: counts[field] for field in (
                    "placed", "consumed", "failed", "recomputed", "expired", "bytes", "fallbacks")}))
        prefix = self._transfers.prefix
        response.prefix_index.CopyFrom(control_plane_pb2.PrefixIndexStatus(
            predicted_tokens=prefix["predicted_tokens"], hit_tokens=prefix["hit_tokens"], exact=prefix["exact"],
            reported=prefix["reported"]))
        response.policy = self._policy
        response.decisions.update(self._decisions)
        response.recent_errors.extend(control_plane_pb2.RecentError(
            unix_s=e.unix_s, kind=e.kind, worker_id=e.worker_id, transfer_id=e.transfer_id, detail=e.detail)
            for e in self.recent_errors.newest_first())
        return response

    async def run_expiry(self, interval_s: float = 1.0) -> None:
        while True:
            await asyncio.sleep(interval_s)
            for transfer in self._transfers.expire(time.monotonic()):
                log.warning("transfer expired", transfer_id=transfer.transfer_id, request_id=transfer.request_id)
                self.recent_errors.add("expired", transfer.decode_id, transfer.transfer_id,
                                       f"request {transfer.request_id}: no report back")
