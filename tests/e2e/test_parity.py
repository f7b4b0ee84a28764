"""Greedy output through the disaggregated path equals a real `vllm serve`
given the same token ids, token for token, through gRPC ``Inference``."""

import httpx

from baton.v1 import common_pb2, inference_pb2, inference_pb2_grpc
from tests.e2e.conftest import PARITY_MAX_TOKENS


def generate_ids(channel, token_ids: list[int], max_tokens: int) -> tuple[list[int], list]:
    stub = inference_pb2_grpc.InferenceStub(channel)
    request = inference_pb2.GenerateRequest(
        model="SmolLM2-135M-Instruct", token_ids=inference_pb2.TokenIds(ids=token_ids),
        sampling=inference_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0))
    ids, messages = [], []
    for message in stub.Generate(request, timeout=300):
        ids.extend(message.token_ids)
        messages.append(message)
    return ids, messages


def vllm_ids(reference: str, token_ids: list[int], max_tokens: int) -> list[int]:
    response = httpx.post(f"{reference}/v1/completions", timeout=300, json={
        "model": "SmolLM2-135M-Instruct", "prompt": token_ids, "max_tokens": max_tokens, "temperature": 0,
        "return_token_ids": True})
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["token_ids"]


def test_greedy_output_matches_vllm_serve(stack, grpc_channel, parity_prompts, reference):
    assert any(len(p) > 600 for p in parity_prompts), "parity must cover prompts over 600 tokens"
    assert any(len(p) < 100 for p in parity_prompts)
    mismatches = []
    for index, prompt in enumerate(parity_prompts):  # one at a time: batching changes CPU numerics
        got, messages = generate_ids(grpc_channel, prompt, PARITY_MAX_TOKENS)
        kv = messages[-1].kv
        # Greedy: decode continues after prefill's first token with all the prompt's KV.
        assert kv.external_tokens == len(prompt) and not kv.recomputed, (
            f"prompt {index}: KV was not loaded from the transfer: {kv}")
        expected = vllm_ids(reference, prompt, PARITY_MAX_TOKENS)
        if got != expected:
            mismatches.append((index, len(prompt), got, expected))
    assert not mismatches, "\n".join(
        f"prompt {i} ({n} tokens): baton {g} != vllm {e}" for i, n, g, e in mismatches)


def test_grpc_sampling_logprobs_stops_and_n_as_vllm_serve(stack, grpc_channel, reference):
    """The gRPC API has the HTTP API's sampling: same request, same answers."""
    question = "Invent a name for a cat and explain it."
    stub = inference_pb2_grpc.InferenceStub(grpc_channel)
    request = inference_pb2.GenerateRequest(
        model="SmolLM2-135M-Instruct",
        chat=inference_pb2.ChatMessages(messages=[inference_pb2.ChatMessage(role="user", content=question)]),
        sampling=inference_pb2.SamplingParams(max_tokens=24, temperature=0.8, seed=7, n=2, logprobs=2,
                                              stop=["."], presence_penalty=0.5))
    texts, tokens, reasons, stops = {}, {}, {}, {}
    for message in stub.Generate(request, timeout=300):
        texts[message.index] = texts.get(message.index, "") + message.text
        tokens.setdefault(message.index, []).extend(message.token_ids)
        assert len(message.logprobs) == len(message.token_ids)
        assert all(lp.token_ids[0] == t for lp, t in zip(message.logprobs, message.token_ids, strict=True))
        if message.finish_reason:
            reasons[message.index] = message.finish_reason
            stops[message.index] = message.stop_string or None
    response = httpx.post(f"{reference}/v1/chat/completions", timeout=300, json={
        "model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": question}],
        "max_tokens": 24, "temperature": 0.8, "seed": 7, "n": 2, "logprobs": True, "top_logprobs": 2,
        "stop": ["."], "presence_penalty": 0.5})
    expected = {c["index"]: c for c in response.json()["choices"]}
    finish = {"stop": common_pb2.FINISH_REASON_STOP, "length": common_pb2.FINISH_REASON_LENGTH}
    assert set(texts) == {0, 1}
    for index, choice in expected.items():
        assert texts[index] == choice["message"]["content"]
        assert reasons[index] == finish[choice["finish_reason"]]
        assert stops[index] == choice["stop_reason"]
