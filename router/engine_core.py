"""The Baton cluster as vLLM's engine core.

vLLM's frontend (``AsyncLLM``) talks to its engine core through a small
contract: add a request, abort requests, pull ``EngineCoreOutputs`` (new
token ids, logprobs, finish reasons). ``ClusterEngineCore`` keeps that
contract, and runs each request through Baton's pipeline (schedule →
prefill → KV hand-over → decode) instead of one local engine. Everything
the frontend does around it, from chat templates and validation to
detokenizing, stop strings and logprobs, is vLLM's own code.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING

from baton import sampling
from baton.errors import BatonError
from baton.logs import bind_request, get_logger
from baton.v1 import common_pb2
from router import constraints
from router.pipeline import EngineRequest, Pipeline, Step

if TYPE_CHECKING:
    from vllm.v1.engine import EngineCoreOutput, EngineCoreRequest

log = get_logger(__name__)


class _Resources:
    """What AsyncLLM asks of its engine core's health."""

    engine_dead = False  # workers come and go; the cluster as a whole stays up


def _finish_reason(reason: int):
    from vllm.v1.engine import FinishReason

    return {common_pb2.FINISH_REASON_STOP: FinishReason.STOP,
            common_pb2.FINISH_REASON_LENGTH: FinishReason.LENGTH}.get(reason, FinishReason.ABORT)


def _asked(params) -> dict:
    """The request body's ``kv_transfer_params`` (vLLM passes them along in
    ``extra_args``)."""
    asked = ((params.extra_args or {}).get("kv_transfer_params") or {}) if params is not None else {}
    return asked if isinstance(asked, dict) else {}


def requested_kv_backend(params) -> str:
    """A client may pick the transfer backend of its request with
    ``"kv_transfer_params": {"kv_backend": "grpc"}``; the control plane checks it."""
    backend = _asked(params).get("kv_backend", "")
    return backend if isinstance(backend, str) else ""


def requested_remote_prefill(params) -> bool | None:
    """vLLM's own ``"kv_transfer_params": {"do_remote_prefill": true}``: the
    client wants the prompt run on a prefill worker (false: on the decode
    worker); absent, the control plane decides."""
    asked = _asked(params).get("do_remote_prefill")
    return asked if isinstance(asked, bool) else None


def to_engine_output(request_id: str, step: Step) -> EngineCoreOutput:
    from vllm.v1.engine import EngineCoreOutput

    tokens = step.tokens
    output = EngineCoreOutput(request_id=request_id, new_token_ids=list(tokens.token_ids))
    if tokens.logprobs:
        output.new_logprobs = sampling.logprobs_lists(tokens.logprobs)
    if step.prompt_logprobs:
        output.new_prompt_logprobs_tensors = sampling.logprobs_tensors(step.prompt_logprobs)
    if tokens.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED:
        output.finish_reason = _finish_reason(tokens.finish_reason)
        if tokens.HasField("stop_token_id"):
            output.stop_reason = tokens.stop_token_id
    if step.kv is not None and step.kv.transfer_id:
        output.kv_transfer_params = {"transfer_id": step.kv.transfer_id,
                                     "external_tokens": step.kv.external_tokens,
                                     "bytes": step.kv.bytes, "recomputed": step.kv.recomputed,
                                     "backend": step.kv.backend}
    return output


def as_http_error(exc: BatonError) -> Exception:
    """What vLLM's frontend turns into an error response with this status."""
    from vllm.exceptions import GracefulHTTPError

    return GracefulHTTPError(exc.message, HTTPStatus(exc.http_status))


@dataclass(frozen=True)
class _Failure:
    request_id: str
    error: Exception


class ClusterEngineCore:
    """The part of vLLM's ``EngineCoreClient`` that ``AsyncLLM`` uses."""

    def __init__(self, pipeline: Pipeline):
        self.resources = _Resources()
        self.engine_ranks_managed = [0]
        self._pipeline = pipeline
        # Outputs and failures in the order they happened: a request's error
        # reaches the frontend only after the tokens that came before it.
        self._outputs: asyncio.Queue[EngineCoreOutput | _Failure] = asyncio.Queue()
        self._due: list[_Failure] = []
        self._running: dict[str, asyncio.Task] = {}
        self._fail: Callable[[str, Exception], None] = lambda _request_id, _exc: None

    def on_request_error(self, fail: Callable[[str, Exception], None]) -> None:
        """``fail(request_id, exc)`` ends one request with an error."""
        self._fail = fail

    async def get_supported_tasks_async(self) -> tuple[str, ...]:
        return ("generate",)

    def get_kv_event_sources(self) -> dict:
        return {}  # the workers' engines publish their own

    async def add_request_async(self, request: EngineCoreRequest) -> None:
        params = request.sampling_params
        engine_request = EngineRequest(request.request_id, list(request.prompt_token_ids), params,
                                       requested_kv_backend(params), constraints.required_labels(),
                                       requested_remote_prefill(params), constraints.deadline())
        task = asyncio.create_task(self._run(engine_request), name=f"request-{request.request_id}")
        self._running[request.request_id] = task
        task.add_done_callback(lambda _t: self._running.pop(request.request_id, None))

    async def _run(self, request: EngineRequest) -> None:
        bind_request(request.request_id)
        try:
            async for step in self._pipeline.generate(request):
                self._outputs.put_nowait(to_engine_output(request.request_id, step))
        except asyncio.CancelledError:
            pass  # aborted: the frontend already forgot the request
        except BatonError as exc:
            log.warning("request failed", status=exc.http_status, error=exc.message)
            self._outputs.put_nowait(_Failure(request.request_id, as_http_error(exc)))
        except Exception as exc:
            log.exception("request failed")
            self._outputs.put_nowait(_Failure(request.request_id, exc))

    async def get_output_async(self):
        """The next batch of outputs. AsyncLLM processes each batch before
        asking for the next, so failures seen with a batch are delivered at
        the next call, after the outputs that preceded them."""
        from vllm.v1.engine import EngineCoreOutputs

        for failure in self._due:
            self._fail(failure.request_id, failure.error)
        self._due = []
        items = [await self._outputs.get()]
        while not self._outputs.empty():
            items.append(self._outputs.get_nowait())
        self._due = [item for item in items if isinstance(item, _Failure)]
        return EngineCoreOutputs(outputs=[item for item in items if not isinstance(item, _Failure)])

    async def abort_requests_async(self, request_ids: Iterable[str]) -> None:
        for request_id in request_ids:
            task = self._running.pop(request_id, None)
            if task is not None:
                task.cancel()

    def shutdown(self, timeout: float | None = None) -> None:
        for task in self._running.values():
            task.cancel()
        self._running.clear()
