"""``PrefillWorker`` servicer: runs the prompt, returns the first token; the
engine's connector pushes the prompt's KV to the decode worker."""

from __future__ import annotations

import contextlib

import grpc

from baton import sampling
from baton.engine import ENGINE_DEAD, Engine, generated_tokens, is_engine_dead, is_input_error
from baton.engine_timeline import trace_prefill
from baton.logs import bind_request, get_logger
from baton.telemetry import current_traceparent
from baton.v1 import common_pb2, prefill_pb2, prefill_pb2_grpc
from kv_transfer.params import ProducerParams
from kv_transfer.transport import FALLBACK_BACKEND

log = get_logger(__name__)

SERVICE_NAME = prefill_pb2.DESCRIPTOR.services_by_name["PrefillWorker"].full_name


class PrefillServicer(prefill_pb2_grpc.PrefillWorkerServicer):
    def __init__(self, engine: Engine):
        self._engine = engine

    async def Prefill(self, request: prefill_pb2.PrefillRequest, context: grpc.aio.ServicerContext):
        bind_request(request.request_id)
        if not request.prompt_token_ids:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompt_token_ids is empty")
        kv_params = None
        if request.transfer_id:
            if not request.kv_target:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "transfer_id given without kv_target")
            kv_params = ProducerParams(request.transfer_id, request.kv_target,
                                       current_traceparent(),
                                       request.kv_backend or FALLBACK_BACKEND).to_dict()
        final = None
        try:
            wanted = sampling.decode(request.sampling)
            params = sampling.for_engine(wanted, max_tokens=1, stream=False, prompt_logprobs=True)
            async with contextlib.aclosing(self._engine.generate(
                    list(request.prompt_token_ids), params, request.request_id, kv_params)) as outputs:
                async for output in outputs:
                    final = output
        except Exception as exc:
            if is_engine_dead(exc):
                await context.abort(grpc.StatusCode.UNAVAILABLE, ENGINE_DEAD)
            if not is_input_error(exc):
                raise
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        first = generated_tokens(final.outputs[0], wanted.logprobs)
        # max_tokens=1 always ends in "length": that is the hand-over, not the
        # end of the answer; the router knows the request's own max_tokens.
        if first.finish_reason == common_pb2.FINISH_REASON_LENGTH:
            first.finish_reason = common_pb2.FINISH_REASON_UNSPECIFIED
        log.info("prefill done", prompt_tokens=len(request.prompt_token_ids),
                 cached_tokens=final.num_cached_tokens or 0, transfer_id=request.transfer_id)
        trace_prefill(final.metrics, len(request.prompt_token_ids), final.num_cached_tokens or 0)
        prompt_logprobs = []
        if wanted.prompt_logprobs is not None and final.prompt_logprobs:
            prompt_logprobs = sampling.prompt_logprob_rows(
                list(request.prompt_token_ids), final.prompt_logprobs, wanted.prompt_logprobs)
        return prefill_pb2.PrefillResponse(first=first, cached_prompt_tokens=final.num_cached_tokens or 0,
                                           prompt_logprobs=prompt_logprobs)
