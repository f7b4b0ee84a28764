"""``DecodeWorker`` servicer: generates the answer with the prompt's KV
loaded from the transfer (or recomputed if it never arrives); draining, it
hands its running answers, with their KV, to the decode workers the router
places them on."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from baton import sampling
from baton.engine import ENGINE_DEAD, Engine, generated_tokens, is_engine_dead, is_input_error
from baton.engine_timeline import trace_decode
from baton.logs import bind_request, get_logger
from baton.telemetry import current_traceparent
from baton.v1 import common_pb2, decode_pb2, decode_pb2_grpc
from decode_worker.metrics import record_load
from kv_transfer.handoff import HandOffNote, until_sent, write_note
from kv_transfer.params import ConsumerParams, LoadReport, parse
from kv_transfer.transport import FALLBACK_BACKEND

log = get_logger(__name__)

SERVICE_NAME = decode_pb2.DESCRIPTOR.services_by_name["DecodeWorker"].full_name

# How long a stream that said handing_off waits for the router's HandOff;
# then it ends, and the router moves the answer by recomputing it.
HANDOFF_WAIT_S = 10.0
# How long HandOff waits for the engine to send (or offer) the KV: the
# abort it takes is done at the engine's next step.
HANDOFF_SEND_S = 10.0
# Handed off, a stream stays open, and this worker (whose engine the
# receiver reads the KV from) with it, until the router lets go: once the
# receiver streams, or after this long.
HANDOFF_HOLD_S = 30.0


@dataclass
class _Running:
    """A Decode call in progress, as a hand-off needs it."""

    engine_prompt_tokens: int  # the prompt its engine request runs on (first_token_id included)
    streamed: int = 0  # tokens sent to the caller
    leaving: bool = False  # draining: hand off at the next output
    handed: asyncio.Event = field(default_factory=asyncio.Event)  # HandOff wrote its note


class DecodeServicer(decode_pb2_grpc.DecodeWorkerServicer):
    def __init__(self, engine: Engine):
        self._engine = engine
        handoff_dir = engine.options.connector_options.get("handoff_dir", "")
        self._handoff_dir = Path(handoff_dir) if handoff_dir else None
        self._backends = set(engine.options.connector_options.get("backends", ()))
        self._running: dict[str, _Running] = {}
        self._idle = asyncio.Event()  # no Decode call in progress
        self._idle.set()
        self._handing_off = False  # draining: every answer, even one that comes now, is handed off

    async def drain(self, timeout_s: float) -> None:
        """Let running answers finish for up to ``timeout_s``; hand the rest
        off (each stream says so, the router places it and calls HandOff)
        and wait for their streams to end."""
        await self._until_idle(timeout_s)
        if not self._running or self._handoff_dir is None:
            return
        log.info("handing off running answers", requests=len(self._running))
        self._handing_off = True
        for running in self._running.values():
            running.leaving = True
        await self._until_idle(HANDOFF_WAIT_S + HANDOFF_SEND_S + HANDOFF_HOLD_S)

    async def _until_idle(self, timeout_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout_s)

    async def HandOff(self, request: decode_pb2.HandOffRequest, context: grpc.aio.ServicerContext):
        bind_request(request.request_id)
        running = self._running.get(request.request_id)
        if running is None or not running.leaving or running.handed.is_set():
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"request {request.request_id!r} is not waiting to be handed off here")
        if request.kv_backend not in self._backends or not request.kv_target or not request.transfer_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"a hand-off needs a transfer id, a target and one of {sorted(self._backends)}")
        # The KV of every token but the last one streamed: the receiver
        # computes that one, as after a prefill's first token.
        tokens = running.engine_prompt_tokens + running.streamed - 1
        write_note(self._handoff_dir, request.request_id,
                   HandOffNote(request.transfer_id, request.kv_target, request.kv_backend, tokens,
                               current_traceparent()))
        running.handed.set()  # its Decode aborts the engine request; the engine sends the KV as it goes
        log.info("handing off", transfer_id=request.transfer_id, backend=request.kv_backend, tokens=tokens)
        # Said only once the KV is on its way, so that the receiver's wait
        # for it starts as after a prefill.
        error = await until_sent(self._handoff_dir, request.request_id, HANDOFF_SEND_S)
        if error is None or error:
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"the engine did not send the KV: {error or f'no word within {HANDOFF_SEND_S} s'}")
        return decode_pb2.HandOffResponse(tokens=tokens)

    async def Decode(self, request: decode_pb2.DecodeRequest, context: grpc.aio.ServicerContext):
        bind_request(request.request_id)
        if not request.prompt_token_ids:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompt_token_ids is empty")
        prompt = list(request.prompt_token_ids)
        backend = request.kv_backend or FALLBACK_BACKEND
        if request.HasField("first_token_id"):
            prompt.append(request.first_token_id)
        kv_params = None
        if request.transfer_id:
            # The transfer covers the prefill prompt. After the first token
            # the connector loads all of it; without, all but the last
            # position, which this engine computes to sample that token.
            kv_params = ConsumerParams(request.transfer_id, len(request.prompt_token_ids), backend,
                                       request.kv_source, current_traceparent()).to_dict()
        report: LoadReport | None = None
        produced = 0
        running = _Running(len(prompt), leaving=self._handing_off)
        self._running[request.request_id] = running
        self._idle.clear()
        try:
            wanted = sampling.decode(request.sampling)
            if wanted.max_tokens is None or wanted.max_tokens < 1:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "max_tokens must be >= 1")
            # Prefilling locally, this worker is the one to compute prompt logprobs.
            local_prefill = not request.transfer_id and not request.HasField("first_token_id")
            params = sampling.for_engine(wanted, max_tokens=wanted.max_tokens, stream=True,
                                         prompt_logprobs=local_prefill)
            async with contextlib.aclosing(
                    self._engine.generate(prompt, params, request.request_id, kv_params)) as outputs:
                async for output in outputs:
                    if running.leaving and not output.finished:
                        # This output is dropped: the receiver computes it again.
                        yield decode_pb2.DecodeResponse(handing_off=True)
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(running.handed.wait(), HANDOFF_WAIT_S)
                        if not running.handed.is_set():
                            log.info("hand-off not asked for", tokens=produced, transfer_id=request.transfer_id)
                            return
                        # Closing the engine stream aborts the request; with
                        # the note written, its KV goes to the receiver.
                        await outputs.aclose()
                        log.info("decode handed off", tokens=produced, transfer_id=request.transfer_id)
                        await asyncio.sleep(HANDOFF_HOLD_S)  # cancelled when the router lets go
                        return
                    completion = output.outputs[0]
                    produced += len(completion.token_ids)
                    running.streamed = produced
                    message = decode_pb2.DecodeResponse(tokens=generated_tokens(completion, wanted.logprobs))
                    if params.prompt_logprobs is not None and output.prompt_logprobs and produced == len(
                            completion.token_ids):  # the first message only
                        message.prompt_logprobs.extend(sampling.prompt_logprob_rows(
                            prompt, output.prompt_logprobs, params.prompt_logprobs))
                    if output.finished:
                        parsed = parse(output.kv_transfer_params)
                        report = parsed if isinstance(parsed, LoadReport) else None
                        message.kv.CopyFrom(self._load_stats(request.transfer_id, backend, report))
                        trace_decode(output.metrics, produced, completion.finish_reason or "")
                    yield message
        except (asyncio.CancelledError, GeneratorExit):
            # The caller went away; closing the engine stream aborts its request.
            log.info("decode cancelled", tokens=produced, transfer_id=request.transfer_id)
            raise
        except Exception as exc:
            if is_engine_dead(exc):
                await context.abort(grpc.StatusCode.UNAVAILABLE, ENGINE_DEAD)
            if not is_input_error(exc):
                raise
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        finally:
            self._running.pop(request.request_id, None)
            if not self._running:
                self._idle.set()
        log.info("decode done", transfer_id=request.transfer_id, tokens=produced,
                 external_tokens=report.external_tokens if report else 0,
                 recomputed=bool(report and report.failed))

    def _load_stats(self, transfer_id: str, backend: str, report: LoadReport | None) -> common_pb2.KVLoadStats:
        if not transfer_id or report is None:
            return common_pb2.KVLoadStats()
        record_load(backend, report)
        return common_pb2.KVLoadStats(
            transfer_id=transfer_id,
            external_tokens=report.external_tokens,
            bytes=report.bytes if report.external_tokens else 0,
            recomputed=report.failed,
            backend=backend,
        )
