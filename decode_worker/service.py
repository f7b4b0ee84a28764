"""``DecodeWorker`` servicer: generates the answer with the prompt's KV
loaded from the transfer (or recomputed if it never arrives)."""

from __future__ import annotations

import asyncio
import contextlib

import grpc

from baton import sampling
from baton.engine import ENGINE_DEAD, Engine, generated_tokens, is_engine_dead, is_input_error
from baton.logs import bind_request, get_logger
from baton.v1 import common_pb2, decode_pb2, decode_pb2_grpc
from kv_transfer.params import ConsumerParams, LoadReport, parse
from kv_transfer.transport import FALLBACK_BACKEND

log = get_logger(__name__)

SERVICE_NAME = decode_pb2.DESCRIPTOR.services_by_name["DecodeWorker"].full_name


class DecodeServicer(decode_pb2_grpc.DecodeWorkerServicer):
    def __init__(self, engine: Engine):
        self._engine = engine

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
                                       request.kv_source).to_dict()
        report: LoadReport | None = None
        produced = 0
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
                    completion = output.outputs[0]
                    produced += len(completion.token_ids)
                    message = decode_pb2.DecodeResponse(tokens=generated_tokens(completion, wanted.logprobs))
                    if params.prompt_logprobs is not None and output.prompt_logprobs and produced == len(
                            completion.token_ids):  # the first message only
                        message.prompt_logprobs.extend(sampling.prompt_logprob_rows(
                            prompt, output.prompt_logprobs, params.prompt_logprobs))
                    if output.finished:
                        parsed = parse(output.kv_transfer_params)
                        report = parsed if isinstance(parsed, LoadReport) else None
                        message.kv.CopyFrom(self._load_stats(request.transfer_id, backend, report))
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
        log.info("decode done", transfer_id=request.transfer_id, tokens=produced,
                 external_tokens=report.external_tokens if report else 0,
                 recomputed=bool(report and report.failed))

    def _load_stats(self, transfer_id: str, backend: str, report: LoadReport | None) -> common_pb2.KVLoadStats:
        if not transfer_id or report is None:
            return common_pb2.KVLoadStats()
        return common_pb2.KVLoadStats(
            transfer_id=transfer_id,
            external_tokens=report.external_tokens,
            bytes=report.bytes if report.external_tokens else 0,
            recomputed=report.failed,
            backend=backend,
        )
