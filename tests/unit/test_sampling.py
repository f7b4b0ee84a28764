"""Sampling parameters and generated tokens between router and engines."""

import pytest
from vllm import SamplingParams
from vllm.logprobs import Logprob
from vllm.sampling_params import (
    RepetitionDetectionParams,
    RequestOutputKind,
    StructuredOutputsParams,
)
from vllm.v1.engine import FinishReason

from baton import sampling
from baton.v1 import common_pb2
from router.engine_core import to_engine_output
from router.pipeline import Step


def test_params_round_trip_with_everything_vllm_supports():
    params = SamplingParams(temperature=0.8, seed=7, top_k=5, min_p=0.1, presence_penalty=0.5,
                            frequency_penalty=0.3, repetition_penalty=1.2, logit_bias={11: 5.0},
                            stop=["\n\n"], stop_token_ids=[2], min_tokens=3, logprobs=4, max_tokens=9,
                            structured_outputs=StructuredOutputsParams(json={"type": "object"}))
    back = sampling.decode(sampling.encode(params))
    for name in ("temperature", "seed", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                 "repetition_penalty", "logit_bias", "stop", "stop_token_ids", "min_tokens", "logprobs",
                 "max_tokens"):
        assert getattr(back, name) == getattr(params, name), name
    assert back.structured_outputs.json == {"type": "object"}


def test_a_worker_on_another_vllm_release_refuses_the_params():
    message = sampling.encode(SamplingParams())
    message.vllm_version = "0.0.1"
    with pytest.raises(sampling.SamplingMismatchError, match="same vLLM release"):
        sampling.decode(message)


def test_engines_make_tokens_not_text():
    params = SamplingParams(n=3, stop=["x"], max_tokens=50, seed=1,
                            structured_outputs=StructuredOutputsParams(regex="[a-z]+"))
    params.structured_outputs._backend = "xgrammar"
    engine = sampling.for_engine(params, max_tokens=1, stream=True)
    assert (engine.n, engine.stop, engine.max_tokens, engine.detokenize) == (1, [], 1, False)
    assert engine.output_kind == RequestOutputKind.DELTA and engine.seed == 1
    assert engine.structured_outputs._backend is None and engine.structured_outputs.regex == "[a-z]+"
    assert params.stop == ["x"] and params.max_tokens == 50  # the request's own copy is untouched


def test_logprob_rows_put_the_chosen_token_first_then_the_top_k_by_rank():
    # The chosen token 9 is ranked 3rd, outside the top 2.
    candidates = {4: Logprob(-0.5, rank=1), 6: Logprob(-1.0, rank=2), 9: Logprob(-2.0, rank=3)}
    (row,) = sampling.logprob_rows([9], [candidates], 2)
    assert list(row.token_ids) == [9, 4, 6] and row.rank == 3
    assert list(row.logprobs) == pytest.approx([-2.0, -0.5, -1.0])
    lists = sampling.logprobs_lists([row, row])
    assert lists.logprob_token_ids.shape == (2, 3) and list(lists.sampled_token_ranks) == [3, 3]


def test_steps_become_engine_outputs():
    tokens = common_pb2.GeneratedTokens(token_ids=[5, 6], finish_reason=common_pb2.FINISH_REASON_STOP,
                                        stop_token_id=6)
    kv = common_pb2.KVLoadStats(transfer_id="t", external_tokens=128, bytes=10)
    output = to_engine_output("r", Step(tokens, kv))
    assert output.new_token_ids == [5, 6] and output.finish_reason == FinishReason.STOP
    assert output.stop_reason == 6 and output.kv_transfer_params["external_tokens"] == 128
    running = to_engine_output("r", Step(common_pb2.GeneratedTokens(token_ids=[1])))
    assert running.finish_reason is None and running.kv_transfer_params is None


def test_a_prefill_of_one_token_keeps_min_tokens_valid():
    params = SamplingParams(min_tokens=20, max_tokens=30)
    engine = sampling.for_engine(params, max_tokens=1, stream=False)
    assert engine.min_tokens == 1 and engine.max_tokens == 1


def test_prompt_logprobs_stay_with_the_prefill():
    params = SamplingParams(prompt_logprobs=2, max_tokens=5)
    assert params.skip_reading_prefix_cache
    decode = sampling.for_engine(params, max_tokens=5, stream=True)
    assert decode.prompt_logprobs is None and decode.skip_reading_prefix_cache is False
    assert sampling.for_engine(params, max_tokens=1, stream=False, prompt_logprobs=True).prompt_logprobs == 2


def test_a_clients_kv_transfer_params_never_reach_a_worker_connector():
    params = SamplingParams(max_tokens=5, extra_args={
        "kv_transfer_params": {"baton": {"role": "producer", "transfer_id": "x", "kv_target": "evil:1"}},
        "ec_transfer_params": {}, "custom": 1})
    engine = sampling.for_engine(sampling.decode(sampling.encode(params)), max_tokens=5, stream=True)
    assert engine.extra_args == {"custom": 1}


@pytest.mark.parametrize(("params", "exact"), [
    (SamplingParams(temperature=0), True),
    (SamplingParams(temperature=0, seed=5), True),  # greedy: the seed draws nothing
    (SamplingParams(temperature=0.8), True),  # unseeded: any draw is as good
    (SamplingParams(temperature=0, repetition_penalty=1.3, logit_bias={3: 2.0}, min_tokens=4), True),
    (SamplingParams(temperature=0, extra_args={"kv_transfer_params": {"kv_backend": "grpc"}}), True),
    (SamplingParams(temperature=0.8, seed=5), False),
    (SamplingParams(temperature=0, presence_penalty=0.5), False),
    (SamplingParams(temperature=0, frequency_penalty=0.5), False),
    (SamplingParams(temperature=0, bad_words=["cat"]), False),
    (SamplingParams(temperature=0, structured_outputs=StructuredOutputsParams(regex="[a-z]+")), False),
    (SamplingParams(temperature=0, extra_args={"my_processor": 1}), False),
    (SamplingParams(temperature=0, repetition_detection=RepetitionDetectionParams(max_pattern_size=4, min_count=3)),
     False),
    (SamplingParams(temperature=0, watermarking=False), True),
    (SamplingParams(temperature=0, watermarking=True), False),
])
def test_a_continuation_after_the_first_token_is_exact_only_without_answer_state(params, exact):
    assert sampling.continues_exactly(params) is exact
