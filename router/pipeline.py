"""A request's path: schedule → prefill → decode, streaming as it goes.

The first token comes back from the prefill worker and is yielded at once.
The decode worker then loads the prompt's KV through the transfer the control
plane allocated and continues after that token: its first step computes the
second token. When the sampling keeps state about the answer (a seed's
random stream, penalties over output tokens, a grammar), continuing would
not be what one engine does: the decode worker then recomputes the prompt's
last position and samples the answer from its first token itself, one step
slower. That first token is checked against the one already streamed; on a
mismatch (a near tie that the two engines' numerics break differently)
decoding restarts after the streamed token instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc
from opentelemetry import trace

from baton import sampling
from baton.errors import (
    BatonError,
    ClientError,
    DeadlineExceededError,
    NoCapacityError,
    RetryableError,
    from_rpc_error,
)
from baton.logs import get_logger
from baton.registry import RegistryWatcher
from baton.rpc import ChannelPool, channel
from baton.telemetry import traced_stream, tracer
from baton.v1 import (
    common_pb2,
    control_plane_pb2,
    control_plane_pb2_grpc,
    decode_pb2,
    decode_pb2_grpc,
    kv_transfer_pb2,
    kv_transfer_pb2_grpc,
    prefill_pb2,
    prefill_pb2_grpc,
)
from control_plane.scheduling import Candidate, NoWorker, SchedulingRequest, make_scheduler
from kv_transfer.transport import FALLBACK_BACKEND, PULL_BACKENDS
from router import key_guard
from router.metrics import Metrics, arrived_s

if TYPE_CHECKING:
    from vllm import SamplingParams

log = get_logger(__name__)
_tracer = tracer("baton.router")


@dataclass
class Step:
    """Tokens the cluster produced for a request since the last step."""

    tokens: common_pb2.GeneratedTokens  # finish_reason set on the last step
    kv: common_pb2.KVLoadStats | None = None  # on the last step of a decode
    prompt_logprobs: list[common_pb2.PositionLogprobs] = field(default_factory=list)  # first step


@dataclass(frozen=True)
class EngineRequest:
    """One engine request (one of the n answers): what vLLM's frontend built."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams  # max_tokens resolved
    kv_backend: str = ""  # asked for by the client; empty: the deployment's default
    required_labels: dict[str, str] = field(default_factory=dict)  # only workers carrying them may serve it
    remote_prefill: bool | None = None  # the client's choice of where the prompt runs; None: the control plane's
    deadline_s: float | None = None  # time.monotonic() by which it must end: the client's, or the router's timeout


def _left(request: EngineRequest) -> float:
    """Seconds left of the request's deadline, for the next hop; raises
    once none is left. (``generate`` always sets one.)"""
    if request.deadline_s is None:
        return math.inf
    left = request.deadline_s - time.monotonic()
    if left <= 0:
        raise DeadlineExceededError(f"request {request.request_id}: its deadline passed")
    return left


# A decode call that ended so failed on the worker, not on the request:
# another decode worker can take the answer over.
_WORKER_FAILED = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL,
                            grpc.StatusCode.CANCELLED, grpc.StatusCode.RESOURCE_EXHAUSTED})


def _placement_attributes(placement: control_plane_pb2.Placement) -> dict:
    return {"baton.prefill_worker": placement.prefill.worker_id, "baton.decode_worker": placement.decode.worker_id,
            "baton.transfer_id": placement.transfer_id, "baton.kv_backend": placement.kv_backend,
            "baton.decision": placement.decision or "local-fallback",
            "baton.prefill_cached_tokens": placement.prefill_cached_tokens,
            "baton.decode_cached_tokens": placement.decode_cached_tokens}


class _DecodeWorkerFailed(Exception):
    def __init__(self, error: BatonError):
        super().__init__(error.message)
        self.error = error


class _HandingOff(Exception):
    """The decode worker drains: it asks for its answer to move, with its
    KV, to another decode worker (``HandOff``)."""

    def __init__(self, request_id: str, worker: control_plane_pb2.WorkerEndpoint, call: grpc.aio.Call):
        super().__init__(f"decode worker {worker.worker_id} is handing request {request_id} off")
        self.request_id = request_id  # of the decode call
        self.worker = worker
        # Kept open until HandOff is called or given up: the worker keeps
        # the request (and its KV) only while its Decode call lasts.
        self.call = call


async def _releasing(steps: AsyncIterator[Step], source: grpc.aio.Call) -> AsyncIterator[Step]:
    """``steps`` of an answer handed off from ``source`` (the draining
    worker's Decode call, kept open so that the worker stays while the
    receiver reads its KV): released once the first step comes (the KV is
    loaded, or recomputed) or the steps end."""
    async with contextlib.aclosing(steps):
        try:
            first = await anext(steps, None)
        finally:
            source.cancel()
        if first is None:
            return
        yield first
        async for step in steps:
            yield step


class _FirstTokenMismatch(Exception):
    """Decode sampled another first token than prefill (numerics differ at a
    near tie): its continuation does not follow what the client has."""


class Pipeline:
    def __init__(self, control_plane_address: str, registry: RegistryWatcher, model_name: str,
                 metrics: Metrics, timeout_s: float, decode_moves: int = 2, decode_handoffs: bool = True):
        self._channels = ChannelPool(channel)
        self._control_plane = control_plane_pb2_grpc.ControlPlaneStub(self._channels.get(control_plane_address))
        self._registry = registry
        self._model_name = model_name
        self._metrics = metrics
        self._timeout_s = timeout_s
        self._decode_moves = decode_moves  # per request, to another decode worker when one fails
        self._decode_handoffs = decode_handoffs  # a draining decode worker's answers move with their KV
        # Without the control plane, the same pipeline places requests
        # over the router's own registry view (no load figures: rotation).
        self._fallback = {role: make_scheduler("round-robin", role) for role in ("prefill", "decode")}
        self._background: set[asyncio.Task] = set()

    async def close(self) -> None:
        if self._background:  # reports still on their way: give them a moment
            await asyncio.wait(set(self._background), timeout=2)
        for ch in self._channels.take_all():
            await ch.close()

    async def _schedule(self, request: EngineRequest, avoid: tuple[str, ...] = (),
                        move_from: str = "") -> control_plane_pb2.Placement:
        message = control_plane_pb2.ScheduleRequest(
            request_id=request.request_id, model=self._model_name, prompt_tokens=len(request.prompt_token_ids),
            prompt_token_ids=request.prompt_token_ids, max_tokens=request.params.max_tokens or 0,
            kv_backend=request.kv_backend, required_labels=request.required_labels, avoid_workers=avoid,
            move_from=move_from)
        if request.remote_prefill is not None:
            message.remote_prefill = request.remote_prefill
        with _tracer.start_as_current_span("schedule", kind=trace.SpanKind.CLIENT, attributes={
                "baton.request_id": request.request_id, "baton.avoid_workers": list(avoid),
                "baton.move_from": move_from}) as span:
            try:
                placement = await self._control_plane.Schedule(message, timeout=min(5.0, _left(request)))
            except grpc.aio.AioRpcError as exc:
                # Down, or hung (no answer in 5 s): place over the last known
                # membership. Anything else: reachable, but it said no.
                if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise from_rpc_error(exc, "control plane") from exc
                _left(request)  # unless the request's own deadline is what passed
                if move_from:  # the control plane coordinates every KV transfer
                    raise NoCapacityError("control plane unreachable: no hand-off with KV") from exc
                log.warning("control plane unreachable; placing locally", error=exc.details())
                span.add_event("control plane unreachable; placed by the router", {"error": exc.details() or ""})
                self._metrics.local_placements.inc()
                placement = self._fallback_placement(request, avoid)
            span.set_attributes(_placement_attributes(placement))
            return placement

    async def _schedule_shielded(self, request: EngineRequest, avoid: tuple[str, ...] = (),
                                 move_from: str = "") -> control_plane_pb2.Placement:
        """Schedule; if the client leaves meanwhile, the placement may still
        be made: close its transfer once it lands, so it does not count as
        load until it expires."""
        scheduling = asyncio.ensure_future(self._schedule(request, avoid, move_from))
        try:
            return await asyncio.shield(scheduling)
        except asyncio.CancelledError:
            def close_orphan(task: asyncio.Task) -> None:
                if not task.cancelled() and task.exception() is None:
                    self._report(task.result().transfer_id, control_plane_pb2.TRANSFER_OUTCOME_FAILED,
                                 detail="client left while being scheduled")

            scheduling.add_done_callback(close_orphan)
            self._background.add(scheduling)
            scheduling.add_done_callback(self._background.discard)
            raise

    def _fallback_placement(self, request: EngineRequest, avoid: tuple[str, ...] = ()) -> control_plane_pb2.Placement:
        wanted = SchedulingRequest(self._model_name, len(request.prompt_token_ids), request.required_labels)
        chosen = {}
        for role, scheduler in self._fallback.items():
            pool = {w.worker_id: w for w in self._registry.by_role(role) if w.worker_id not in avoid}
            try:
                pick = scheduler.pick(wanted, [Candidate.of(w) for w in pool.values()])
            except NoWorker as exc:
                if exc.client_error:
                    raise ClientError(f"{role}: {exc}") from None
                raise NoCapacityError(f"control plane unreachable and no {role} worker: {exc}") from None
            chosen[role] = pool[pick.worker_id]
        p, d = chosen["prefill"], chosen["decode"]
        return control_plane_pb2.Placement(
            prefill=control_plane_pb2.WorkerEndpoint(worker_id=p.worker_id, address=p.address),
            decode=control_plane_pb2.WorkerEndpoint(worker_id=d.worker_id, address=d.address,
                                                    kv_address=d.kv_address, kv_endpoint=d.kv_address),
            transfer_id=uuid.uuid4().hex, kv_backend=FALLBACK_BACKEND)

    def generate(self, request: EngineRequest) -> AsyncIterator[Step]:
        span = _tracer.start_span("router.generate", attributes={
            "baton.request_id": request.request_id, "baton.prompt_tokens": len(request.prompt_token_ids)})
        return traced_stream(self._measured(request, self._generate(request)), span)

    async def _measured(self, request: EngineRequest, steps: AsyncIterator[Step]) -> AsyncIterator[Step]:
        """``steps``, timed as the client sees them: to the first token, between
        tokens, to the end; counted by how the request ended."""
        metrics, model = self._metrics, self._model_name
        arrived = last = arrived_s()
        generated, status = 0, "server_error"
        try:
            async with contextlib.aclosing(steps):
                async for step in steps:
                    count = len(step.tokens.token_ids)
                    if count:
                        now = time.monotonic()
                        if generated:
                            gap = (now - last) / count
                            for _ in range(count):
                                metrics.itl.labels(model).observe(gap)
                        else:
                            metrics.ttft.labels(model).observe(now - arrived)
                        last, generated = now, generated + count
                    yield step
            status = "ok"
            metrics.e2e.labels(model).observe(time.monotonic() - arrived)
        except (asyncio.CancelledError, GeneratorExit):
            status = "cancelled"
            raise
        except BatonError as exc:
            status = "client_error" if 400 <= exc.http_status < 500 else "server_error"
            raise
        finally:
            metrics.requests.labels(status, model).inc()
            metrics.prompt_tokens.labels(model).inc(len(request.prompt_token_ids))
            metrics.generation_tokens.labels(model).inc(generated)
            key_guard.charge(len(request.prompt_token_ids) + generated)

    async def _generate(self, request: EngineRequest) -> AsyncIterator[Step]:
        started = time.monotonic()
        # One budget for the whole request, each hop given what is left of it.
        ends = started + self._timeout_s
        request = dataclasses.replace(request, deadline_s=min(request.deadline_s or ends, ends))
        placement = await self._schedule_shielded(request)
        max_tokens = request.params.max_tokens
        local = not placement.prefill.worker_id  # placed so: the decode worker prefills, nothing moves
        # A one-token answer needs no decode, so nothing to hand over.
        pushed_id = placement.transfer_id if max_tokens > 1 and not local else ""
        handed_to_decode = False
        outcome = common_pb2.KVLoadStats()  # the decode's own report, on its last message
        try:
            first = None if local else await self._prefill(request, placement, pushed_id)
            if first is None and not local:
                # The prefill worker failed: out of placement, and the
                # prompt placed again without it (another prefill worker,
                # or the decode worker prefills).
                self._metrics.prefill_retries.inc()
                self._free_staged(placement, pushed_id)
                self._report(placement.transfer_id, control_plane_pb2.TRANSFER_OUTCOME_FAILED,
                             detail=f"prefill worker {placement.prefill.worker_id} failed; placed again")
                placement = await self._schedule_shielded(request, avoid=(placement.prefill.worker_id,))
                local = not placement.prefill.worker_id
                pushed_id = placement.transfer_id if max_tokens > 1 and not local else ""
                first = None if local else await self._prefill(request, placement, pushed_id)
            if first is None:  # placed so, or the prefill worker failed again: decode prefills locally
                self._free_staged(placement, pushed_id)
                handed_to_decode = True
                async with contextlib.aclosing(self._moving(
                        request, placement, self._decode(request, placement, "", outcome), [])) as steps:
                    async for step in steps:
                        yield step
                return
            # The prefill worker's share is done: its load ends now, not with the decode.
            self._in_background(self._control_plane.ReportPrefillDone(control_plane_pb2.PrefillDone(
                transfer_id=placement.transfer_id, cached_tokens=first.cached_prompt_tokens), timeout=5))
            token = first.first
            continues = sampling.continues_exactly(request.params)
            log.info("first token from prefill", token_id=token.token_ids[0], prefill=placement.prefill.worker_id,
                     cached_tokens=first.cached_prompt_tokens, decode_continues=continues)
            if token.finish_reason == common_pb2.FINISH_REASON_UNSPECIFIED and max_tokens == 1:
                token.finish_reason = common_pb2.FINISH_REASON_LENGTH
            yield Step(token, prompt_logprobs=list(first.prompt_logprobs))
            if token.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED:
                return
            handed_to_decode = True
            first_id = token.token_ids[0]
            # Continuing after the first token spares the decode engine a
            # step (sampling it again) in the hand-off pause.
            if continues:
                decoding = self._decode(request, placement, pushed_id, outcome, after_first=first_id)
            else:
                decoding = self._decode(request, placement, pushed_id, outcome, expect_first=first_id)
            produced = [first_id]
            try:
                async with contextlib.aclosing(self._moving(request, placement, decoding, produced)) as steps:
                    async for step in steps:
                        yield step
            except _FirstTokenMismatch:
                self._metrics.first_token_mismatches.inc()
                # The prompt's KV now sits in the decode worker's prefix cache.
                resumed = dataclasses.replace(request, request_id=f"{request.request_id}-resumed")
                decoding = self._decode(resumed, placement, "", outcome, after_first=first_id)
                async with contextlib.aclosing(self._moving(request, placement, decoding, [first_id])) as steps:
                    async for step in steps:
                        yield step
            log.info("request finished", prefill=placement.prefill.worker_id,
                     decode=placement.decode.worker_id, transfer_id=pushed_id,
                     seconds=round(time.monotonic() - started, 3))
        finally:
            # Ended before decode (first token was the last, prefill failed,
            # client gone): close the transfer and free any KV already pushed.
            if local:
                self._report(placement.transfer_id, control_plane_pb2.TRANSFER_OUTCOME_LOCAL,
                             detail="the decode worker prefilled, as placed")
            elif not handed_to_decode:
                self._free_staged(placement, pushed_id)
                self._report(placement.transfer_id, control_plane_pb2.TRANSFER_OUTCOME_FAILED,
                             detail="ended before decode")
            else:
                self._report_load(placement.transfer_id, outcome)

    def _report_load(self, transfer_id: str, outcome: common_pb2.KVLoadStats) -> None:
        """Close a transfer by what its decode worker said of the load."""
        if outcome.external_tokens > 0 and not outcome.recomputed:
            self._report(transfer_id, control_plane_pb2.TRANSFER_OUTCOME_CONSUMED,
                         nbytes=outcome.bytes, tokens=outcome.external_tokens)
        elif outcome.recomputed:
            self._report(transfer_id, control_plane_pb2.TRANSFER_OUTCOME_RECOMPUTED,
                         detail="the decode worker could not load the KV")
        elif outcome.transfer_id:
            self._report(transfer_id, control_plane_pb2.TRANSFER_OUTCOME_FAILED,
                         detail="KV not loaded: the decode worker had the prompt cached")
        else:
            self._report(transfer_id, control_plane_pb2.TRANSFER_OUTCOME_FAILED,
                         detail="decode ended before reporting its KV load (stop string, client gone or error)")

    async def _moving(self, request: EngineRequest, placement: control_plane_pb2.Placement,
                      decoding: AsyncIterator[Step], produced: list[int]) -> AsyncIterator[Step]:
        """``decoding``'s steps; when its decode worker fails mid-answer, the
        request moves to another decode worker, which prefills the prompt
        and the tokens already streamed (``produced``, those before
        ``decoding`` included) and goes on: the client sees one unbroken
        stream. At most ``decode_moves`` times per request."""
        budget = request.params.max_tokens
        moved_to: list[str] = []  # the recomputing moves' transfers, closed when the answer ends
        handed: list[tuple[str, common_pb2.KVLoadStats]] = []  # the hand-offs' transfers and their loads
        try:
            for move in range(self._decode_moves + 1):
                try:
                    async with contextlib.aclosing(decoding) as steps:
                        async for step in steps:
                            produced.extend(step.tokens.token_ids)
                            yield step
                    return
                except _HandingOff as leaving:
                    left = budget - len(produced)
                    handing = None
                    try:
                        if move == self._decode_moves or left < 1:
                            raise NoCapacityError(str(leaving)) from None
                        handing = await self._hand_off(request, leaving, produced, left, move + 1)
                    finally:
                        if handing is None:
                            leaving.call.cancel()  # the draining worker lets the request go
                    if handing is not None:
                        placement, decoding, outcome = handing
                        decoding = _releasing(decoding, leaving.call)
                        handed.append((placement.transfer_id, outcome))
                        continue
                    log.warning("decode worker drains and its answer could not be handed off; moving it",
                                decode=placement.decode.worker_id, tokens_streamed=len(produced))
                except _DecodeWorkerFailed as failed:
                    left = budget - len(produced)
                    if move == self._decode_moves or left < 1:
                        raise failed.error from None
                    log.warning("decode worker failed mid-answer; moving the request", error=failed.error.message,
                                decode=placement.decode.worker_id, tokens_streamed=len(produced))
                self._metrics.decode_moves.inc()
                params = request.params.clone()
                params.max_tokens = left
                params.min_tokens = max(0, params.min_tokens - len(produced))
                moved = dataclasses.replace(request, request_id=f"{request.request_id}-moved{move + 1}",
                                            prompt_token_ids=[*request.prompt_token_ids, *produced], params=params,
                                            remote_prefill=False)
                placement = await self._schedule_shielded(moved, avoid=(placement.decode.worker_id,))
                moved_to.append(placement.transfer_id)
                decoding = self._decode(moved, placement, "", common_pb2.KVLoadStats(),
                                        continued=bool(produced))
        finally:
            for transfer_id in moved_to:
                self._report(transfer_id, control_plane_pb2.TRANSFER_OUTCOME_LOCAL,
                             detail="a failed decode worker's request, moved here")
            for transfer_id, outcome in handed:
                self._report_load(transfer_id, outcome)

    async def _hand_off(self, request: EngineRequest, leaving: _HandingOff, produced: list[int], left: int,
                        number: int
                        ) -> tuple[control_plane_pb2.Placement, AsyncIterator[Step], common_pb2.KVLoadStats] | None:
        """The answer continues on another decode worker with its KV, sent
        on from the draining one: placed by the control plane, handed off
        there, then decoded after the last token streamed, as after a
        prefill's first token. None when that cannot be (the caller moves it
        by recomputing instead)."""
        if not produced or not self._decode_handoffs:
            return None
        params = request.params.clone()
        # ``_decode`` counts the last token streamed as its first.
        params.max_tokens = left + 1
        params.min_tokens = max(0, params.min_tokens - len(produced) + 1)
        moved = dataclasses.replace(request, request_id=f"{request.request_id}-handoff{number}", params=params,
                                    prompt_token_ids=[*request.prompt_token_ids, *produced[:-1]], remote_prefill=None)
        source = leaving.worker
        try:
            placement = await self._schedule_shielded(moved, move_from=source.worker_id)
        except BatonError as exc:
            log.warning("no decode worker to hand the answer to", decode=source.worker_id, error=exc.message)
            return None
        stub = decode_pb2_grpc.DecodeWorkerStub(self._channels.get(source.address))
        try:
            handed = await stub.HandOff(decode_pb2.HandOffRequest(
                request_id=leaving.request_id, transfer_id=placement.transfer_id,
                kv_target=placement.decode.kv_endpoint, kv_backend=placement.kv_backend),
                timeout=min(15.0, _left(request)))  # the worker waits up to 10 s for its engine
        except grpc.aio.AioRpcError as exc:
            log.warning("hand-off refused", decode=source.worker_id, error=exc.details())
            self._report(placement.transfer_id, control_plane_pb2.TRANSFER_OUTCOME_FAILED, detail="hand-off refused")
            return None
        if handed.tokens != len(moved.prompt_token_ids):
            # Not what the client has: the receiver would continue elsewhere.
            log.warning("hand-off covers other tokens than were streamed", handed=handed.tokens,
                        streamed=len(moved.prompt_token_ids) + 1)
            self._report(placement.transfer_id, control_plane_pb2.TRANSFER_OUTCOME_FAILED,
                         detail="hand-off covered other tokens")
            return None
        self._metrics.decode_handoffs.inc()
        log.info("answer handed off with its KV", source=source.worker_id, decode=placement.decode.worker_id,
                 transfer_id=placement.transfer_id, kv_backend=placement.kv_backend, tokens=handed.tokens)
        outcome = common_pb2.KVLoadStats()
        decoding = self._decode(moved, placement, placement.transfer_id, outcome,
                                after_first=produced[-1], continued=True)
        return placement, decoding, outcome

    async def _prefill(self, request: EngineRequest, placement: control_plane_pb2.Placement,
                       transfer_id: str) -> prefill_pb2.PrefillResponse | None:
        """The first token, or None when the prefill worker is unreachable."""
        prefill = prefill_pb2_grpc.PrefillWorkerStub(self._channels.get(placement.prefill.address))
        with _tracer.start_as_current_span("prefill", kind=trace.SpanKind.CLIENT, attributes={
                "baton.worker_id": placement.prefill.worker_id, "baton.transfer_id": transfer_id}) as span:
            try:
                return await prefill.Prefill(prefill_pb2.PrefillRequest(
                    request_id=request.request_id, prompt_token_ids=request.prompt_token_ids,
                    sampling=sampling.encode(request.params), transfer_id=transfer_id,
                    kv_target=placement.decode.kv_endpoint if transfer_id else "",
                    kv_backend=placement.kv_backend if transfer_id else ""), timeout=_left(request))
            except grpc.aio.AioRpcError as exc:
                error = from_rpc_error(exc, f"prefill worker {placement.prefill.worker_id}")
                if not isinstance(error, RetryableError):
                    raise error from exc
                log.warning("prefill failed", prefill=placement.prefill.worker_id, error=error.message)
                span.set_status(trace.Status(trace.StatusCode.ERROR, f"worker failed; placed again: {error.message}"))
                return None

    def _decode(self, request: EngineRequest, placement: control_plane_pb2.Placement, transfer_id: str,
                outcome: common_pb2.KVLoadStats, *, expect_first: int | None = None,
                after_first: int | None = None, continued: bool = False) -> AsyncIterator[Step]:
        span = _tracer.start_span("decode", kind=trace.SpanKind.CLIENT, attributes={
            "baton.request_id": request.request_id, "baton.worker_id": placement.decode.worker_id,
            "baton.transfer_id": transfer_id, "baton.continued": continued})
        return traced_stream(self._decode_steps(request, placement, transfer_id, outcome,
                                                expect_first=expect_first, after_first=after_first,
                                                continued=continued), span, not_errors=(_HandingOff,))

    async def _decode_steps(self, request: EngineRequest, placement: control_plane_pb2.Placement, transfer_id: str,
                            outcome: common_pb2.KVLoadStats, *, expect_first: int | None = None,
                            after_first: int | None = None, continued: bool = False) -> AsyncIterator[Step]:
        """Decode the answer; ``outcome`` gets the decode's KV load stats.
        ``expect_first``: the token prefill streamed, to be sampled again and
        checked, not repeated. ``after_first``: continue after that token.
        ``continued``: the prompt holds tokens the client already has (a
        moved request): no first token, no prompt logprobs from it."""
        params = request.params
        message = decode_pb2.DecodeRequest(request_id=request.request_id,
                                           prompt_token_ids=request.prompt_token_ids, transfer_id=transfer_id)
        if transfer_id:
            message.kv_backend = placement.kv_backend
            message.kv_source = placement.prefill.kv_endpoint
        if after_first is not None:
            params = params.clone()
            params.max_tokens -= 1
            params.min_tokens = max(0, params.min_tokens - 1)
            message.first_token_id = after_first
        message.sampling.CopyFrom(sampling.encode(params))
        decode = decode_pb2_grpc.DecodeWorkerStub(self._channels.get(placement.decode.address))
        finished = handing_off = False
        call = decode.Decode(message, timeout=_left(request))
        try:
            async for item in call:
                if item.handing_off:
                    handing_off = True
                    raise _HandingOff(message.request_id, placement.decode, call)
                tokens = item.tokens
                if expect_first is not None and tokens.token_ids:
                    if tokens.token_ids[0] != expect_first:
                        log.warning("decode sampled another first token; resuming after prefill's",
                                    prefill_token=expect_first, decode_token=tokens.token_ids[0])
                        raise _FirstTokenMismatch
                    del tokens.token_ids[0]
                    if tokens.logprobs:
                        del tokens.logprobs[0]
                    expect_first = None
                if item.HasField("kv"):
                    outcome.CopyFrom(item.kv)
                finished = tokens.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED
                if tokens.token_ids or finished:
                    yield Step(tokens, outcome if finished else None, [] if continued else list(item.prompt_logprobs))
        except grpc.aio.AioRpcError as exc:
            error = from_rpc_error(exc, f"decode worker {placement.decode.worker_id}")
            if exc.code() in _WORKER_FAILED:
                raise _DecodeWorkerFailed(error) from exc
            raise error from exc
        finally:
            # Closed early (client gone, stop string, mismatch): cancel now,
            # not when the call is garbage-collected, so the worker stops.
            if not handing_off:
                call.cancel()
            if not finished:
                # Gone before the decode engine loaded the KV (or while it
                # did): free it there now rather than at its inbox TTL.
                self._free_staged(placement, transfer_id)

    def _report(self, transfer_id: str, outcome: int, nbytes: int = 0, tokens: int = 0, detail: str = "") -> None:
        if not transfer_id:
            return
        report = control_plane_pb2.TransferReport(transfer_id=transfer_id, outcome=outcome, bytes=nbytes,
                                                  tokens=tokens, detail=detail)
        self._in_background(self._control_plane.ReportTransfer(report, timeout=5))

    def _free_staged(self, placement: control_plane_pb2.Placement, transfer_id: str) -> None:
        """Free KV pushed to the decode engine for a decode that will not
        happen; a no-op there if it was already loaded or never pushed.
        (Pull backends push nothing: the producer frees unread blocks.)"""
        if not transfer_id or (placement.kv_backend or FALLBACK_BACKEND) in PULL_BACKENDS:
            return
        stub = kv_transfer_pb2_grpc.KVTransferStub(self._channels.get(placement.decode.kv_address))
        self._in_background(stub.Discard(kv_transfer_pb2.DiscardRequest(transfer_id=transfer_id), timeout=5))

    def _in_background(self, call) -> None:
        """Bookkeeping must never fail or delay the answer: run it in the
        background, holding a strong reference until it is done."""

        async def run():
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
                await call

        task = asyncio.create_task(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)


