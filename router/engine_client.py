"""vLLM's frontend over the Baton cluster.

``BatonEngineClient`` is vLLM's ``AsyncLLM`` with its engine core swapped for
``ClusterEngineCore``: the renderer (chat templates, tokenizing), the input
processor (validation, defaults) and the output processor (incremental,
UTF-8-safe detokenizing over prefill's and decode's tokens together, stop
strings, logprobs, ``n`` > 1) are vLLM's own, so a request gets the answer
`vllm serve` would give, field for field. Both Baton's HTTP API (vLLM's
OpenAI server, mounted as is) and its gRPC ``Inference`` API use it.
"""

from __future__ import annotations

import asyncio
from argparse import Namespace

from vllm.v1.engine.async_llm import AsyncLLM

from router.engine_core import ClusterEngineCore


def frontend_args(model_path: str, served_model_name: str, max_model_len: int, host: str, port: int,
                  extra: list[str] | None = None) -> Namespace:
    """The arguments `vllm serve` would parse for this model: vLLM's OpenAI
    server and its engine configuration are built from them."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser())
    return parser.parse_args([
        "--model", model_path, "--served-model-name", served_model_name,
        "--max-model-len", str(max_model_len), "--host", host, "--port", str(port),
        "--disable-log-stats", "--disable-uvicorn-access-log", *(extra or [])])


class BatonEngineClient(AsyncLLM):
    # AsyncLLM.__init__ starts an engine process; this builds the same
    # frontend parts and takes the cluster as engine core instead.
    def __init__(self, args: Namespace, core: ClusterEngineCore):
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.renderers import renderer_from_config
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.input_processor import InputProcessor
        from vllm.v1.engine.output_processor import OutputProcessor

        vllm_config = AsyncEngineArgs.from_cli_args(args).create_engine_config(
            usage_context=UsageContext.OPENAI_API_SERVER)
        self.vllm_config = vllm_config
        self.model_config = vllm_config.model_config
        self.scheduler_config = vllm_config.scheduler_config
        self.observability_config = vllm_config.observability_config
        self.log_requests = False
        self.log_stats = False
        self.logger_manager = None
        self.admission_stats = None
        self.renderer = renderer_from_config(vllm_config)
        self.input_processor = InputProcessor(vllm_config, self.renderer)
        self.output_processor = OutputProcessor(
            self.renderer.tokenizer, log_stats=False,
            stream_interval=vllm_config.scheduler_config.stream_interval,
            tracing_enabled=False, admission_stats=None)
        self.engine_core = core
        core.on_request_error(self._fail_request)
        self._deliveries: set[asyncio.Task] = set()
        self.output_handler = None
        self.profiler = None
        self._client_count = 1
        self._elastic_ep_lock = asyncio.Lock()
        self._profile_lock = asyncio.Lock()
        self._frontend_profiler_injected = False
        self._profile_session_guard_enabled = True
        self._profile_session_active = False

    def _fail_request(self, request_id: str, exc: Exception) -> None:
        """End one request with an error, once the client has what came before
        it: vLLM's output collector lets an error replace an output not yet
        taken."""
        states = self.output_processor.request_states

        async def deliver() -> None:
            while (state := states.get(request_id)) is not None and state.queue is not None:
                if state.queue.output is None:
                    state.queue.put(exc)
                    # AsyncLLM.generate does not abort on GracefulHTTPError:
                    # forget the request here, with its siblings when n > 1.
                    owner = state.parent_req.request_id if state.parent_req else request_id
                    await self.abort(owner, internal=True)
                    return
                await asyncio.sleep(0.005)

        task = asyncio.get_running_loop().create_task(deliver())
        self._deliveries.add(task)
        task.add_done_callback(self._deliveries.discard)
