"""What both public APIs share: validation, tokenization, running a request
through the pipeline with metrics."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

from router import requests as gen_requests
from router.metrics import Metrics
from router.pipeline import Delta, Pipeline
from router.tokenization import Tokenizer


class Frontend:
    def __init__(self, tokenizer: Tokenizer, limits: gen_requests.Limits, pipeline: Pipeline, metrics: Metrics):
        self.tokenizer = tokenizer
        self.limits = limits
        self.pipeline = pipeline
        self.metrics = metrics
        self.started_at = int(time.time())

    def _build(self, prefix: str, model: str, token_ids: list[int], body_like) -> gen_requests.GenerationRequest:
        return gen_requests.build(
            self.limits, gen_requests.new_request_id(prefix), token_ids,
            max_tokens=body_like.resolved_max_tokens(), temperature=body_like.temperature,
            top_p=body_like.top_p, seed=body_like.seed, stop=body_like.stop_list(),
            ignore_eos=body_like.ignore_eos)

    async def prepare_chat(self, body, messages: list[dict[str, str]]) -> gen_requests.GenerationRequest:
        gen_requests.check_model(self.limits, body.model)
        return self._build("chatcmpl", body.model, await self.tokenizer.chat(messages), body)

    async def prepare_completion(self, body, prompt: str | list[int]) -> gen_requests.GenerationRequest:
        gen_requests.check_model(self.limits, body.model)
        token_ids = prompt if isinstance(prompt, list) else await self.tokenizer.text(prompt)
        return self._build("cmpl", body.model, token_ids, body)

    async def run(self, gen: gen_requests.GenerationRequest, api: str) -> AsyncIterator[Delta]:
        self.metrics.prompt_tokens.inc(len(gen.prompt_token_ids))
        outcome = "ok"
        try:
            async with contextlib.aclosing(self.pipeline.generate(gen)) as deltas:
                async for delta in deltas:
                    self.metrics.completion_tokens.inc(len(delta.token_ids))
                    yield delta
        except (asyncio.CancelledError, GeneratorExit):
            outcome = "cancelled"
            raise
        except BaseException:
            outcome = "error"
            raise
        finally:
            self.metrics.requests.labels(api=api, outcome=outcome).inc()
