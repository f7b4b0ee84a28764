"""Sampling parameters and generated tokens between the router and the
engines: the one place that encodes and decodes them.

The router's vLLM frontend builds a request's ``SamplingParams`` exactly as
`vllm serve` would (defaults from the model's generation config, validation,
structured-output set-up); the workers' engines run with those same
parameters, carried in vLLM's own msgpack encoding. Workers send back token
ids and logprobs only: text is made once, in the router.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from baton.v1 import common_pb2

if TYPE_CHECKING:
    from vllm import SamplingParams
    from vllm.logprobs import Logprob


class SamplingMismatchError(ValueError):
    """The peer runs another vLLM release: its parameters cannot be trusted."""


def _vllm_version() -> str:
    import vllm

    return vllm.__version__


def encode(params: SamplingParams) -> common_pb2.EngineSampling:
    from vllm.v1.serial_utils import MsgpackEncoder

    (buffer,) = MsgpackEncoder().encode(params)
    return common_pb2.EngineSampling(vllm_sampling_params=bytes(buffer), vllm_version=_vllm_version())


def decode(message: common_pb2.EngineSampling) -> SamplingParams:
    from vllm import SamplingParams
    from vllm.v1.serial_utils import MsgpackDecoder

    if message.vllm_version != _vllm_version():
        raise SamplingMismatchError(
            f"sampling parameters from vLLM {message.vllm_version or '?'}, this worker runs "
            f"{_vllm_version()}: run the same vLLM release on router and workers")
    return MsgpackDecoder(SamplingParams).decode(message.vllm_sampling_params)


def for_engine(params: SamplingParams, *, max_tokens: int, stream: bool,
               prompt_logprobs: bool = False) -> SamplingParams:
    """The copy an engine runs: no text (the router detokenizes and matches
    stop strings), one answer per engine request (the router fans out n).
    Prompt logprobs are the prefill worker's to compute (``prompt_logprobs``);
    elsewhere they would force recomputing the whole prompt."""
    from vllm.sampling_params import RequestOutputKind

    engine = params.clone()
    engine.max_tokens = max_tokens
    engine.min_tokens = min(engine.min_tokens, max_tokens)
    engine.n = 1
    engine.stop = []
    engine.detokenize = False
    engine.output_kind = RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY
    if not prompt_logprobs:
        engine.prompt_logprobs = None
        engine.skip_reading_prefix_cache = False
    if engine.extra_args:
        # A client's kv_transfer_params (vLLM copies them from the request
        # body) must never steer a worker's connector: Baton sets its own.
        engine.extra_args = _steering_args(engine) or None
    if engine.structured_outputs is not None:
        # Chosen again by the worker's engine, from its own configuration.
        engine.structured_outputs._backend = None
        engine.structured_outputs._backend_was_auto = False
    # Checked here, as a client error: vLLM's engine core checks them again
    # when it receives the request, and an error there stops its input thread.
    engine._verify_args()
    return engine


def continues_exactly(params: SamplingParams) -> bool:
    """Whether a decode engine given prompt + first token goes on exactly as
    one engine that sampled that token itself would.

    Nothing of the answer may steer sampling but through the tokens: a
    seeded generator's state, penalties over output tokens only, a grammar's
    state, bad-word sequences, a thinking budget or a watermark all count
    the first token as output, which the continuation sees as prompt.
    Otherwise the decode engine samples the first token again (from the
    transferred KV) and goes on from there: exact, one step slower."""
    return not ((params.temperature > 0 and params.seed is not None)
                or params.presence_penalty or params.frequency_penalty
                or params.structured_outputs is not None or params.bad_words
                or params.thinking_token_budget is not None or params.repetition_detection is not None
                or params.watermarking or _steering_args(params))


def _steering_args(params: SamplingParams) -> dict:
    """``extra_args`` an engine's logits processors may read (the connector
    parameters vLLM copies there are Baton's business, never an engine's)."""
    return {k: v for k, v in (params.extra_args or {}).items() if k not in ("kv_transfer_params", "ec_transfer_params")}


_FINISH = {"stop": common_pb2.FINISH_REASON_STOP, "length": common_pb2.FINISH_REASON_LENGTH}


def finish_reason(reason: str | None) -> int:
    """vLLM's finish reason of an answer as the proto's (None: still running)."""
    if reason is None:
        return common_pb2.FINISH_REASON_UNSPECIFIED
    return _FINISH.get(reason, common_pb2.FINISH_REASON_ABORT)


def position_logprobs(token_id: int, candidates: dict[int, Logprob], k: int) -> common_pb2.PositionLogprobs:
    """One position of vLLM's per-token logprob dict as the engine produced
    it: the chosen token first, then the top ``k`` by rank."""
    chosen = candidates[token_id]
    top = sorted(((lp.rank, tid, lp.logprob) for tid, lp in candidates.items() if lp.rank is not None
                  and lp.rank <= k), key=lambda item: item[0])[:k]
    return common_pb2.PositionLogprobs(
        token_ids=[token_id, *(tid for _, tid, _ in top)],
        logprobs=[chosen.logprob, *(value for _, _, value in top)],
        rank=chosen.rank if chosen.rank is not None else 0)


def logprob_rows(token_ids: Sequence[int], logprobs: Sequence[dict[int, Logprob]] | None,
                 k: int | None) -> list[common_pb2.PositionLogprobs]:
    if logprobs is None or k is None:
        return []
    width = k if k >= 0 else max((len(c) for c in logprobs), default=0)
    return [position_logprobs(t, c, width) for t, c in zip(token_ids, logprobs, strict=True)]


def prompt_logprob_rows(prompt: Sequence[int], prompt_logprobs: Sequence[dict[int, Logprob] | None],
                        k: int) -> list[common_pb2.PositionLogprobs]:
    """vLLM's prompt logprobs as rows: the first prompt token has none."""
    return logprob_rows(prompt[1:], prompt_logprobs[1:], k)


def logprobs_lists(rows: Sequence[common_pb2.PositionLogprobs]):
    """Rows as vLLM's ``LogprobsLists``, what its output processor reads."""
    import numpy as np
    from vllm.v1.outputs import LogprobsLists

    width = max(len(r.token_ids) for r in rows)
    ids = np.zeros((len(rows), width), dtype=np.int32)
    values = np.full((len(rows), width), float("-inf"), dtype=np.float32)
    for i, row in enumerate(rows):
        ids[i, :len(row.token_ids)] = row.token_ids
        values[i, :len(row.logprobs)] = row.logprobs
    ranks = np.array([r.rank for r in rows], dtype=np.int32)
    return LogprobsLists(ids, values, ranks)


def logprobs_tensors(rows: Sequence[common_pb2.PositionLogprobs]):
    """Prompt logprob rows as vLLM's ``LogprobsTensors``."""
    import torch
    from vllm.v1.outputs import LogprobsTensors

    lists = logprobs_lists(rows)
    return LogprobsTensors(torch.from_numpy(lists.logprob_token_ids).long(),
                           torch.from_numpy(lists.logprobs), torch.from_numpy(lists.sampled_token_ranks).long())
