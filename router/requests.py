"""Validated generation requests, shared by the HTTP and gRPC front ends."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from baton.errors import ClientError, NotFoundError
from baton.v1 import common_pb2


@dataclass(frozen=True)
class Limits:
    model_name: str
    max_model_len: int
    max_tokens_limit: int
    default_max_tokens: int
    vocab_size: int
    default_temperature: float | None = None  # from the model's generation_config.json
    default_top_p: float | None = None


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling: common_pb2.SamplingParams  # max_tokens resolved


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def check_model(limits: Limits, model: str) -> None:
    if model != limits.model_name:
        raise NotFoundError(f"The model `{model}` does not exist. Available: {limits.model_name}",
                            param="model", code="model_not_found")


def build(limits: Limits, request_id: str, token_ids: list[int], *, max_tokens: int | None,
          temperature: float | None, top_p: float | None, seed: int | None,
          stop: list[str], ignore_eos: bool = False) -> GenerationRequest:
    if not token_ids:
        raise ClientError("the prompt is empty", param="prompt")
    if any(t < 0 or t >= limits.vocab_size for t in token_ids):
        raise ClientError(f"token ids must be in [0, {limits.vocab_size})", param="prompt")
    room = limits.max_model_len - len(token_ids)
    if room < 1:
        raise ClientError(
            f"This model's maximum context length is {limits.max_model_len} tokens. However, your "
            f"prompt has {len(token_ids)} tokens. Please reduce the length of the prompt.",
            param="messages", code="context_length_exceeded")
    if max_tokens is None:
        max_tokens = min(limits.default_max_tokens, room)
    elif max_tokens < 1:
        raise ClientError(f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
    elif max_tokens > limits.max_tokens_limit:
        raise ClientError(f"max_tokens must be at most {limits.max_tokens_limit}, got {max_tokens}",
                          param="max_tokens")
    elif max_tokens > room:
        raise ClientError(
            f"This model's maximum context length is {limits.max_model_len} tokens. However, you "
            f"requested {len(token_ids) + max_tokens} tokens ({len(token_ids)} in the prompt, "
            f"{max_tokens} for the completion). Please reduce the length of the prompt or max_tokens.",
            param="max_tokens", code="context_length_exceeded")
    temperature = limits.default_temperature if temperature is None else temperature
    top_p = limits.default_top_p if top_p is None else top_p
    if temperature is not None and not 0 <= temperature <= 2:
        raise ClientError("temperature must be in [0, 2]", param="temperature")
    if top_p is not None and not 0 < top_p <= 1:
        raise ClientError("top_p must be in (0, 1]", param="top_p")
    if len(stop) > 4:
        raise ClientError("at most 4 stop sequences", param="stop")
    if any(not s for s in stop):
        raise ClientError("stop sequences must not be empty", param="stop")
    if seed is not None and not -(2**63) <= seed < 2**63:
        raise ClientError("seed must fit in a signed 64-bit integer", param="seed")
    sampling = common_pb2.SamplingParams(max_tokens=max_tokens, stop=stop, ignore_eos=ignore_eos)
    if temperature is not None:
        sampling.temperature = temperature
    if top_p is not None:
        sampling.top_p = top_p
    if seed is not None:
        sampling.seed = seed
    return GenerationRequest(request_id, list(token_ids), sampling)
