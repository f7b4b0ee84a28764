"""The public gRPC ``Inference`` service, over the same vLLM frontend as the
HTTP API: the same defaults, validation, text, stop handling and logprobs."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable
from http import HTTPStatus

import grpc

from baton import sampling
from baton.logs import bind_request
from baton.v1 import common_pb2, inference_pb2, inference_pb2_grpc
from router import constraints
from router.admission import Admission, refusal_message
from router.api_keys import ApiKey
from router.engine_client import BatonEngineClient
from router.key_guard import UNAUTHORIZED_MESSAGE, KeyGuard
from router.request_limits import too_many_tokens

SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name
_HTTP_TO_GRPC = {HTTPStatus.BAD_REQUEST: grpc.StatusCode.INVALID_ARGUMENT,
                 HTTPStatus.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
                 HTTPStatus.SERVICE_UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
                 HTTPStatus.GATEWAY_TIMEOUT: grpc.StatusCode.DEADLINE_EXCEEDED,
                 HTTPStatus.TOO_MANY_REQUESTS: grpc.StatusCode.RESOURCE_EXHAUSTED}


class _InvalidRequest(Exception):
    pass


def sampling_params(s: inference_pb2.SamplingParams, defaults: dict):
    """The request's SamplingParams, defaults from the model's generation
    config first, as vLLM's OpenAI server builds them."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

    kwargs = dict(defaults)
    for name in ("temperature", "top_p", "seed", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                 "repetition_penalty", "logprobs", "skip_special_tokens"):
        if s.HasField(name):
            kwargs[name] = getattr(s, name)
    which = s.WhichOneof("structured_output")
    if which == "json_schema":
        kwargs["structured_outputs"] = StructuredOutputsParams(json=s.json_schema)
    elif which == "json_object":
        kwargs["structured_outputs"] = StructuredOutputsParams(json_object=True)
    elif which == "regex":
        kwargs["structured_outputs"] = StructuredOutputsParams(regex=s.regex)
    kwargs.pop("max_tokens", None)  # resolved against the prompt's length
    try:
        # from_optional, as vLLM's OpenAI server: it clamps logit_bias too.
        return SamplingParams.from_optional(
            **kwargs, max_tokens=s.max_tokens or None, n=s.n or 1, stop=list(s.stop) or None,
            stop_token_ids=list(s.stop_token_ids) or None, ignore_eos=s.ignore_eos, min_tokens=s.min_tokens,
            logit_bias=dict(s.logit_bias) or None, include_stop_str_in_output=s.include_stop_str_in_output,
            output_kind=RequestOutputKind.DELTA)
    except ValueError as exc:  # vLLM's own range checks
        raise _InvalidRequest(str(exc)) from exc


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    def __init__(self, engines: dict[str, BatonEngineClient], live_models: Callable[[], set[str]],
                 admission: Admission | None = None, clock: Callable[[], float] = lambda: 0.0,
                 guard: KeyGuard | None = None, max_tokens_cap: int = 0):
        """``engines``: model name → its frontend, the default (for requests
        that name none) first; ``admission``: the router's places, shared
        with its HTTP API; ``guard``: its API keys and their limits."""
        self._guard = guard
        self._max_tokens_cap = max_tokens_cap
        self._engines = engines
        self._admission = admission or Admission(0, lambda: 0)
        self._clock = clock
        self._default = next(iter(engines))
        self._live_models = live_models
        self._defaults = {name: e.model_config.get_diff_sampling_param() for name, e in engines.items()}

    @staticmethod
    async def _prompt_ids(engine: BatonEngineClient, request: inference_pb2.GenerateRequest) -> list[int]:
        tokenizer = engine.get_tokenizer()
        which = request.WhichOneof("input")
        if which == "token_ids":
            return list(request.token_ids.ids)
        if which == "prompt":
            return await asyncio.to_thread(lambda: tokenizer.encode(request.prompt))
        if which == "chat":
            if not request.chat.messages:
                raise _InvalidRequest("chat.messages is empty")
            messages = [{"role": m.role, "content": m.content} for m in request.chat.messages]

            def render() -> list[int]:
                text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
                return tokenizer(text, add_special_tokens=False).input_ids

            try:
                return await asyncio.to_thread(render)
            except Exception as exc:
                raise _InvalidRequest(f"cannot apply the chat template: {exc}") from exc
        raise _InvalidRequest("give one of prompt, chat or token_ids")

    async def Generate(self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext):
        from vllm.entrypoints.serve.utils.api_utils import get_max_tokens
        from vllm.exceptions import GracefulHTTPError, VLLMClientError
        from vllm.inputs import TokensPrompt
        from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

        key = await self._authenticate(context)
        model = request.model or self._default  # none: the default one, as over HTTP
        engine = self._engines.get(model)
        if engine is None:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"The model `{request.model}` does not exist. Available: {', '.join(self._engines)}")
        request_id = request.request_id or f"grpc-{uuid.uuid4().hex}"
        bind_request(request_id)
        if self._max_tokens_cap and request.sampling.max_tokens > self._max_tokens_cap:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                too_many_tokens({"max_tokens": request.sampling.max_tokens}, self._max_tokens_cap))
        if key is not None and (refusal := self._guard.enter(key)) is not None:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refusal.message,
                                trailing_metadata=(("retry-after", str(refusal.retry_after_s)),))
        if not self._admission.enter():
            if key is not None:
                self._guard.leave(key)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refusal_message(self._admission),
                                trailing_metadata=(("retry-after", str(self._admission.retry_after_s())),))
        started = self._clock()
        held = self._guard.hold(key) if key is not None else None
        try:
            prompt_ids = await self._prompt_ids(engine, request)
            if not prompt_ids:
                raise _InvalidRequest("the prompt is empty")
            params = sampling_params(request.sampling, self._defaults[model])
            if request.HasField("remote_prefill"):  # where HTTP clients put it, vLLM's own field
                params.extra_args = {**(params.extra_args or {}),
                                     "kv_transfer_params": {"do_remote_prefill": request.remote_prefill}}
            max_model_len = engine.model_config.max_model_len
            room = max_model_len - len(prompt_ids)
            if room < 1:
                raise _InvalidRequest(f"This model's maximum context length is {max_model_len} tokens. "
                                      f"However, your prompt contains {len(prompt_ids)} input tokens.")
            if params.max_tokens is None:  # the default, as vLLM's OpenAI server resolves it
                params.max_tokens = get_max_tokens(max_model_len, None, len(prompt_ids), self._defaults[model])
            if params.max_tokens > room:
                raise _InvalidRequest(
                    f"This model's maximum context length is {max_model_len} "
                    f"tokens. However, you requested {params.max_tokens} output tokens and your prompt "
                    f"contains {len(prompt_ids)} input tokens.")
            produced: dict[int, int] = {}
            # This RPC's task is its own: the requirement ends with it.
            constraints.require(dict(request.required_labels))
            constraints.within(context.time_remaining())  # the client's deadline, carried downstream
            outputs = engine.generate(TokensPrompt(prompt_token_ids=prompt_ids), params, request_id)
            async with contextlib.aclosing(outputs):
                async for output in outputs:
                    for choice in output.outputs:
                        produced[choice.index] = produced.get(choice.index, 0) + len(choice.token_ids)
                        yield self._message(request_id, output, choice, len(prompt_ids), produced[choice.index],
                                            params.logprobs)
        except _InvalidRequest as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except VLLMClientError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except GracefulHTTPError as exc:
            await context.abort(_HTTP_TO_GRPC.get(exc.http_status, grpc.StatusCode.INTERNAL), exc.message)
        except (EngineGenerateError, EngineDeadError) as exc:
            cause = exc.__cause__ or exc
            await context.abort(grpc.StatusCode.INTERNAL, f"generation failed: {cause}")
        finally:
            self._admission.leave(self._clock() - started)
            if key is not None:
                self._guard.leave(key)  # first: the release below may be in another context
                with contextlib.suppress(ValueError):  # closed by the loop's finalizer, not this task
                    self._guard.release(held)

    async def _authenticate(self, context: grpc.aio.ServicerContext) -> ApiKey | None:
        """The caller's key (None when the router has no keys); aborts
        UNAUTHENTICATED without a valid one."""
        if self._guard is None or not self._guard.enabled:
            return None
        authorization = dict(context.invocation_metadata() or ()).get("authorization", "")
        key = self._guard.authenticate(authorization)
        if key is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHORIZED_MESSAGE)
        return key

    @staticmethod
    def _message(request_id, output, choice, prompt_tokens: int, produced: int, logprobs: int | None):
        message = inference_pb2.GenerateResponse(
            request_id=request_id, text=choice.text, token_ids=list(choice.token_ids), index=choice.index,
            prompt_tokens=prompt_tokens, completion_tokens=produced,
            finish_reason=sampling.finish_reason(choice.finish_reason),
            logprobs=sampling.logprob_rows(choice.token_ids, choice.logprobs, logprobs))
        if isinstance(choice.stop_reason, int):
            message.stop_token_id = choice.stop_reason
        elif isinstance(choice.stop_reason, str):
            message.stop_string = choice.stop_reason
        kv = output.kv_transfer_params
        if choice.finish_reason and kv:
            message.kv.CopyFrom(common_pb2.KVLoadStats(**kv))
        return message

    async def ListModels(self, request, context):
        await self._authenticate(context)
        live = self._live_models()
        return inference_pb2.ListModelsResponse(models=[name for name in self._engines if name in live])
