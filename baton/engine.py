"""One vLLM engine (AsyncLLM) as both worker roles use it."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from baton import device, sampling
from baton.logs import get_logger
from baton.v1 import common_pb2

log = get_logger(__name__)


@dataclass(frozen=True)
class EngineOptions:
    model_path: str
    served_model_name: str
    kv_role: str  # "kv_producer" | "kv_consumer" | "kv_both"
    connector_options: dict[str, Any] = field(default_factory=dict)
    max_model_len: int = 2048
    enforce_eager: bool = True
    cpu_cores: str = ""
    kv_cache_gib: int = 1
    kv_cache_blocks: int = 0  # a cap on the cache's blocks; 0: what its space allows
    gpu_memory_utilization: float = 0.5
    kv_events_endpoint: str = ""  # where the engine publishes its KV cache events (ZMQ); "" for none
    dtype: str = "auto"  # see ``device.engine_dtype``


@dataclass
class EngineLoad:
    """The engine's own view of its load, as its scheduler last reported it."""

    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0
    prefix_cache_queries: int = 0  # tokens looked up since start
    prefix_cache_hits: int = 0


def _load_logger(load: EngineLoad):
    """A vLLM stat logger (factory) that keeps ``load`` current."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class LoadLogger(StatLoggerBase):
        def __init__(self, vllm_config, engine_index: int = 0):
            pass

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
            if scheduler_stats is None:
                return
            load.running = scheduler_stats.num_running_reqs
            load.waiting = scheduler_stats.num_waiting_reqs
            load.kv_cache_usage = scheduler_stats.kv_cache_usage
            load.prefix_cache_queries += scheduler_stats.prefix_cache_stats.queries
            load.prefix_cache_hits += scheduler_stats.prefix_cache_stats.hits

        def log_engine_initialized(self):
            pass

    return LoadLogger


def is_input_error(exc: BaseException) -> bool:
    """Whether vLLM refused a request for its input (the caller's fault)."""
    from vllm.exceptions import VLLMClientError

    return isinstance(exc, (VLLMClientError, ValueError))


ENGINE_DEAD = "this worker's engine died; the worker is leaving"


def is_engine_dead(exc: BaseException) -> bool:
    """Whether vLLM refused a request because its engine is gone: the
    worker's fault, to answer UNAVAILABLE (the router goes elsewhere)."""
    from vllm.v1.engine.exceptions import EngineDeadError

    return isinstance(exc, EngineDeadError)


def generated_tokens(completion, logprobs: int | None) -> common_pb2.GeneratedTokens:
    """A worker's answer so far: token ids and logprobs, never text."""
    message = common_pb2.GeneratedTokens(
        token_ids=list(completion.token_ids),
        logprobs=sampling.logprob_rows(completion.token_ids, completion.logprobs, logprobs),
        finish_reason=sampling.finish_reason(completion.finish_reason))
    if isinstance(completion.stop_reason, int):
        message.stop_token_id = completion.stop_reason
    return message


class Engine:
    """Owns an AsyncLLM; ``start`` blocks while the engine loads (~45 s on CPU)."""

    def __init__(self, llm, options: EngineOptions, load: EngineLoad | None = None):
        self._llm = llm
        self.options = options
        self.load = load or EngineLoad()

    @property
    def block_size(self) -> int:
        return self._llm.vllm_config.cache_config.block_size

    @property
    def num_blocks(self) -> int:
        return self._llm.vllm_config.cache_config.num_gpu_blocks or 0

    @classmethod
    def start(cls, options: EngineOptions) -> Engine:
        device.apply_engine_environment(options.cpu_cores, options.kv_cache_gib)
        from vllm.config import KVEventsConfig, KVTransferConfig
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        transfer = KVTransferConfig(
            kv_connector="BatonConnector",
            kv_connector_module_path="kv_transfer.connector",
            kv_role=options.kv_role,
            kv_load_failure_policy="recompute",
            kv_connector_extra_config=dict(options.connector_options),
        )
        args = AsyncEngineArgs(
            model=options.model_path,
            served_model_name=[options.served_model_name],
            dtype=device.engine_dtype(options.dtype),
            max_model_len=options.max_model_len,
            enforce_eager=options.enforce_eager,
            enable_prefix_caching=True,
            kv_transfer_config=transfer,
            kv_events_config=KVEventsConfig(enable_kv_cache_events=True, publisher="zmq",
                                            endpoint=options.kv_events_endpoint)
            if options.kv_events_endpoint else None,
            num_gpu_blocks_override=options.kv_cache_blocks or None,
            disable_log_stats=True,  # vLLM's own stat loggers; ours below still gets the stats
            **device.engine_memory_args(options.gpu_memory_utilization),
        )
        started = time.monotonic()
        log.info("engine starting", model=options.model_path, kv_role=options.kv_role)
        load = EngineLoad()
        llm = AsyncLLM.from_engine_args(args, stat_loggers=[_load_logger(load)])
        log.info("engine ready", seconds=round(time.monotonic() - started, 1))
        return cls(llm, options, load)

    @property
    def dead(self) -> bool:
        """vLLM stopped the engine for good (its model process died, say):
        every request to it fails from now on."""
        return self._llm is not None and self._llm.errored

    async def until_dead(self, poll_s: float = 1.0) -> None:
        # vLLM sets a flag, it signals nothing: polled.
        while not self.dead:  # noqa: ASYNC110
            await asyncio.sleep(poll_s)

    async def generate(self, token_ids: list[int], params, request_id: str,
                       kv_transfer_params: dict[str, Any] | None) -> AsyncIterator[Any]:
        from vllm.inputs import TokensPrompt

        if kv_transfer_params is not None:
            params.extra_args = {**(params.extra_args or {}), "kv_transfer_params": kv_transfer_params}
        # aclosing: an early exit aborts the engine request at once, not when
        # the generator happens to be garbage-collected.
        stream = self._llm.generate(TokensPrompt(prompt_token_ids=token_ids), params, request_id)
        async with contextlib.aclosing(stream):
            async for output in stream:
                yield output

    def shutdown(self) -> None:
        if self._llm is not None:
            self._llm.shutdown()
            # Drop it now: AsyncLLM.__del__ at interpreter exit fails noisily.
            self._llm = None
