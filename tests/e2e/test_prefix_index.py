"""The control plane's prefix index against what the real engines reuse:
fed by their KV events, it predicts the prefill engine's cache hit of a
prompt exactly, and a decode worker that holds a prefix loads only the rest."""

from __future__ import annotations

import httpx

from tests.e2e.conftest import wait_for
from tests.e2e.prompts import long_document
from tests.e2e.test_registry_and_status import status, status_json


def _chat(stack, content: str, backend: str = "nixl") -> dict:
    response = httpx.post(f"{stack.http_base}/chat/completions", timeout=300, json={
        "model": stack.model_name, "max_tokens": 4, "temperature": 0,
        "kv_transfer_params": {"kv_backend": backend},
        "messages": [{"role": "user", "content": content}]})
    assert response.status_code == 200, response.text
    return response.json()


def test_every_worker_indexes_from_its_engines_events(stack):
    rows = status(stack)
    for worker_id in ("prefill-0", "decode-0"):
        assert rows[worker_id]["scheduling"]["prefix_source"] == "events"
    assert status_json(stack)["policy"] == "kv-aware"


def test_the_index_predicts_the_engines_cache_hit_exactly(stack):
    document = long_document(11, 50)  # ~750 tokens: several whole 128-token blocks
    before = status_json(stack)["prefix_index"]
    first = _chat(stack, f"{document}\n\nWhat is the first item about?")
    # The engine's BlockStored events reach the index after its step.
    wait_for(lambda: status(stack)["prefill-0"]["scheduling"]["cached_blocks"] >= 5, 30,
             "the prefill engine's stored blocks to reach the index")
    second = _chat(stack, f"{document}\n\nWhat is the last item about?")
    after = status_json(stack)["prefix_index"]
    assert after["reported"] - before["reported"] == 2
    # Both predictions were what the prefill engine then found cached: none
    # for the first prompt, the shared document's whole blocks for the second.
    assert after["exact"] - before["exact"] == 2
    hit = after["hit_tokens"] - before["hit_tokens"]
    assert hit == after["predicted_tokens"] - before["predicted_tokens"]
    assert hit >= 5 * 128 and hit % 128 == 0 and hit < second["usage"]["prompt_tokens"]
    assert first["usage"]["prompt_tokens"] > hit


def test_a_decode_worker_that_holds_a_prefix_receives_only_the_rest(stack):
    document = long_document(12, 50)
    first = _chat(stack, f"{document}\n\nName one crop.")
    assert first["kv_transfer_params"]["external_tokens"] == first["usage"]["prompt_tokens"]
    wait_for(lambda: status(stack)["decode-0"]["scheduling"]["cached_blocks"] >= 5, 30,
             "the decode engine's loaded blocks to reach the index")
    second = _chat(stack, f"{document}\n\nName one tool.")
    kv, prompt_tokens = second["kv_transfer_params"], second["usage"]["prompt_tokens"]
    # The decode engine had the document's whole blocks from the first
    # request: only the rest crossed, and the answer is still right.
    assert not kv["recomputed"] and 0 < kv["external_tokens"] <= prompt_tokens - 5 * 128
    assert kv["bytes"] < first["kv_transfer_params"]["bytes"] / 2
