"""One streamed chat completion, timed the way `vllm bench serve` times it."""

from __future__ import annotations

import json
import time

import httpx

from baton.model_store import DEFAULT_MODEL_NAME


async def stream_chat(client: httpx.AsyncClient, base: str, messages: list[dict], max_tokens: int) -> dict:
    """Greedy, ``ignore_eos``, streamed. TTFT is timed at the first chunk
    with a choice, as `vllm bench serve` does (vLLM writes it when the first
    token exists, its text possibly empty: part of a multi-byte character);
    time to first text at the first chunk with visible text."""
    body = {"model": DEFAULT_MODEL_NAME, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    started = time.perf_counter()
    first = first_text = None
    tokens = 0
    async with client.stream("POST", f"{base}/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk.get("choices"):
                now = time.perf_counter()
                first = first or now
                if first_text is None and any(c.get("delta", {}).get("content") for c in chunk["choices"]):
                    first_text = now
    end = time.perf_counter()
    return {"ttft_s": (first or end) - started, "first_text_s": (first_text or end) - started,
            "latency_s": end - started, "tokens": tokens,
            "tpot_s": (end - first) / max(1, tokens - 1) if first else None}
