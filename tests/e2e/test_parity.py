"""Greedy output through the disaggregated path equals one plain vLLM engine
given the same token ids, token for token."""

from baton.v1 import common_pb2, inference_pb2, inference_pb2_grpc
from tests.e2e.conftest import PARITY_MAX_TOKENS


def generate_ids(channel, token_ids: list[int], max_tokens: int) -> tuple[list[int], list]:
    stub = inference_pb2_grpc.InferenceStub(channel)
    request = inference_pb2.GenerateRequest(
        model="SmolLM2-135M-Instruct", token_ids=inference_pb2.TokenIds(ids=token_ids),
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0))
    ids, messages = [], []
    for message in stub.Generate(request, timeout=300):
        ids.extend(message.token_ids)
        messages.append(message)
    return ids, messages


def test_greedy_output_matches_a_plain_engine(stack, grpc_channel, parity_prompts, reference):
    assert any(len(p) > 600 for p in parity_prompts), "parity must cover prompts over 600 tokens"
    assert any(len(p) < 100 for p in parity_prompts)
    expected = reference.result()
    mismatches = []
    for index, prompt in enumerate(parity_prompts):  # one at a time: batching changes CPU numerics
        got, messages = generate_ids(grpc_channel, prompt, PARITY_MAX_TOKENS)
        kv = messages[-1].kv
        assert kv.external_tokens == len(prompt) and not kv.recomputed, (
            f"prompt {index}: KV was not loaded from the transfer: {kv}")
        if got != expected[index]:
            mismatches.append((index, len(prompt), got, expected[index]))
    assert not mismatches, "\n".join(
        f"prompt {i} ({n} tokens): baton {g} != vllm {e}" for i, n, g, e in mismatches)
