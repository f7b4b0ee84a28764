"""The decode worker loads the prompt's KV from the transfer instead of
recomputing it, and recomputes correctly when the KV never arrives."""

import json
import math
import time

import grpc
import httpx
import pytest
from vllm import SamplingParams

from baton import sampling
from baton.v1 import decode_pb2, decode_pb2_grpc
from kv_transfer.transport import PULL_BACKENDS
from tests.e2e.conftest import KV_FETCH_TIMEOUT_MS, chat_ids, engine_torch_dtype
from tests.e2e.prompts import CAPITAL_QUESTION, long_document


def kv_bytes_per_token(model_path) -> int:
    config = json.loads((model_path / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    element_bytes = engine_torch_dtype(model_path).itemsize
    return 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * head_dim * element_bytes  # K+V


BACKENDS = ["nixl", "collective", "grpc"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_loads_the_prompt_kv_from_the_transfer(stack, model_path, backend):
    from tests.e2e.test_registry_and_status import status_json

    before = _inbox_stats(stack)
    counted_before = (status_json(stack)["kv_backends"] or {}).get(backend, {})
    body = {"model": stack.model_name, "max_tokens": 8, "temperature": 0,
            "kv_transfer_params": {"kv_backend": backend},
            "messages": [{"role": "user", "content": long_document(7 + BACKENDS.index(backend)) + "\nWhat flows north?"}]}
    response = httpx.post(f"{stack.http_base}/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    data = response.json()
    prompt_tokens = data["usage"]["prompt_tokens"]
    assert prompt_tokens > 600
    kv = data["kv_transfer_params"]
    assert kv["backend"] == backend
    assert kv["recomputed"] is False
    # Greedy: the decode engine continues after prefill's first token, with
    # every prompt position's KV from the transfer.
    assert kv["external_tokens"] == prompt_tokens
    # The push backends move the prompt's tokens, of its last block only the
    # slots it fills. NIXL reads that block whole: on vLLM's CPU attention
    # layout its filled slots are ~200 pieces a layer (see its module).
    block = 128  # tokens a block on CPU
    moved = math.ceil(prompt_tokens / block) * block if backend in PULL_BACKENDS else prompt_tokens
    assert kv["bytes"] == moved * kv_bytes_per_token(model_path)
    # Loaded KV is freed: nothing stays in the decode engine's inbox once the
    # request is done; the pull backend (nixl) goes through no inbox at all.
    stats = _inbox_stats(stack)
    assert stats.inbox_bytes == 0 and stats.inbox_transfers == 0
    assert stats.loaded_total - before.loaded_total == (0 if backend in PULL_BACKENDS else 1)
    # The control plane counts it under its backend (`baton status`); the
    # router reports it once the answer is out.
    from tests.e2e.conftest import wait_for

    def counted_now():
        now = (status_json(stack)["kv_backends"] or {}).get(backend, {})
        return now if now.get("consumed", 0) > counted_before.get("consumed", 0) else None

    counted = wait_for(counted_now, 10, "the transfer to be counted")
    assert counted["consumed"] - counted_before.get("consumed", 0) == 1
    assert counted["bytes"] - counted_before.get("bytes", 0) == kv["bytes"]
    assert counted["recomputed"] == counted_before.get("recomputed", 0)


def test_an_unknown_backend_is_refused_and_serving_goes_on(stack):
    body = {"model": stack.model_name, "max_tokens": 4, "kv_transfer_params": {"kv_backend": "carrier-pigeon"},
            "messages": [{"role": "user", "content": "Hi"}]}
    response = httpx.post(f"{stack.http_base}/chat/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    assert "carrier-pigeon" in response.json()["error"]["message"]
    body["kv_transfer_params"] = {}
    assert httpx.post(f"{stack.http_base}/chat/completions", json=body, timeout=60).status_code == 200


def _inbox_stats(stack):
    import asyncio

    from baton.registry import list_workers
    from baton.v1 import kv_transfer_pb2, kv_transfer_pb2_grpc

    workers = asyncio.run(list_workers(stack.etcd_endpoint, stack.etcd_prefix))
    kv_address = next(w.kv_address for w in workers if w.worker_id == "decode-0")
    with grpc.insecure_channel(kv_address) as channel:
        return kv_transfer_pb2_grpc.KVTransferStub(channel).Stats(kv_transfer_pb2.KVStatsRequest(), timeout=10)


def _decode_worker_address(stack) -> str:
    import asyncio

    from baton.registry import list_workers

    workers = asyncio.run(list_workers(stack.etcd_endpoint, stack.etcd_prefix))
    return next(w.address for w in workers if w.role == "decode" and w.worker_id == "decode-0")


def _kv_endpoint(stack, worker_id: str, backend: str) -> str:
    import asyncio

    from baton.registry import list_workers

    workers = asyncio.run(list_workers(stack.etcd_endpoint, stack.etcd_prefix))
    return next(w.kv_endpoints[backend] for w in workers if w.worker_id == worker_id)


def _doomed_producer(endpoint: str) -> None:
    """A prefill-side peer that opens a pair with the decode engine, sends a
    transfer it refuses (another model's layout), then waits to be killed."""
    import torch

    from kv_transfer.connector.metadata import SaveSpec
    from kv_transfer.transport.base import KVCache
    from kv_transfer.transport.collective import CollectiveBackend

    backend = CollectiveBackend("doomed-prefill", "127.0.0.1", consumer=False)
    backend.attach(KVCache({"layer": torch.zeros((4, 2, 8))}, 4, "another-model", 2))
    outbound = backend.send(SaveSpec("req-doomed", "t-doomed", endpoint, (0,), 2, "", "collective"))
    outbound.layer_saved(0, backend._cache.layers[0])
    outbound.step_done()
    time.sleep(600)


def test_a_killed_peer_takes_down_only_its_own_collective_pair(stack):
    import multiprocessing as mp

    from tests.e2e.conftest import wait_for

    def pair_logs(event: str) -> list[dict]:
        lines = (stack.log_dir / "decode-0.log").read_text(errors="replace").splitlines()
        return [json.loads(line) for line in lines
                if line.startswith("{") and f'"{event}"' in line and "doomed-prefill" in line]

    doomed = mp.get_context("spawn").Process(
        target=_doomed_producer, args=(_kv_endpoint(stack, "decode-0", "collective"),), daemon=True)
    doomed.start()
    wait_for(lambda: pair_logs("collective kv refused"), 60, "the doomed peer's transfer to be refused")
    doomed.kill()
    wait_for(lambda: pair_logs("collective pair torn down"), 30, "the killed peer's pair to be torn down")
    # The prefill worker's own pair serves on.
    body = {"model": stack.model_name, "max_tokens": 8, "temperature": 0,
            "kv_transfer_params": {"kv_backend": "collective"},
            "messages": [{"role": "user", "content": long_document(23) + "\nWhat flows north?"}]}
    response = httpx.post(f"{stack.http_base}/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    kv = response.json()["kv_transfer_params"]
    assert kv["backend"] == "collective" and kv["recomputed"] is False and kv["external_tokens"] > 600


@pytest.mark.parametrize("backend", BACKENDS)
def test_kv_that_never_arrives_is_recomputed_correctly(stack, tokenizer, grpc_channel, backend):
    from tests.e2e.test_parity import generate_ids

    prompt = chat_ids(tokenizer, CAPITAL_QUESTION)
    # The reference: the same request through the normal path.
    expected, _ = generate_ids(grpc_channel, prompt, 8)
    transfer_id = f"transfer-that-nobody-pushes-{backend}"
    with grpc.insecure_channel(_decode_worker_address(stack)) as channel:
        stub = decode_pb2_grpc.DecodeWorkerStub(channel)
        request = decode_pb2.DecodeRequest(
            request_id=f"never-arrives-{backend}", prompt_token_ids=prompt, first_token_id=expected[0],
            transfer_id=transfer_id, kv_backend=backend,
            kv_source=_kv_endpoint(stack, "prefill-0", backend) if backend == "nixl" else "",
            sampling=sampling.encode(SamplingParams(max_tokens=7, temperature=0.0)))
        started = time.monotonic()
        messages = list(stub.Decode(request, timeout=120))
        seconds = time.monotonic() - started
    got = [expected[0]] + [t for m in messages for t in m.tokens.token_ids]
    assert messages[-1].kv.recomputed is True
    assert messages[-1].kv.external_tokens == 0
    assert got == expected
    # Given up because the push never began, not after the 60 s fetch timeout,
    # said at warning level and counted.
    warnings = [json.loads(line) for line in (stack.log_dir / "decode-0.log").read_text().splitlines()
                if line.startswith("{") and transfer_id in line]
    assert any(w["level"] == "warning" and "never started" in w.get("error", "") for w in warnings), warnings
    assert seconds < KV_FETCH_TIMEOUT_MS / 1000
    if backend not in PULL_BACKENDS:
        assert _inbox_stats(stack).never_started_total >= 1


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b not in PULL_BACKENDS])
def test_kv_of_an_answer_that_ends_at_the_first_token_is_freed(stack, backend):
    from tests.e2e.conftest import wait_for

    before = _inbox_stats(stack)
    # "The" is the first token of the answer: prefill stops there, no decode runs.
    body = {"model": stack.model_name, "max_tokens": 16, "temperature": 0, "stop": ["The"],
            "kv_transfer_params": {"kv_backend": backend},
            "messages": [{"role": "user", "content": f"{CAPITAL_QUESTION} ({backend})"}]}
    response = httpx.post(f"{stack.http_base}/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["message"]["content"] == ""

    def landed():  # received whole, or refused because the discard came first
        now = _inbox_stats(stack)
        return now.received_total + now.refused_total > before.received_total + before.refused_total

    wait_for(landed, 10, "the prompt's KV to reach the decode engine")
    # Freed by the router's discard, long before the 60 s inbox TTL.
    wait_for(lambda: _inbox_stats(stack).inbox_bytes == 0, 10, "the received KV to be freed")


def test_decode_worker_prefills_locally_without_a_transfer(stack, tokenizer, grpc_channel):
    from tests.e2e.test_parity import generate_ids

    prompt = chat_ids(tokenizer, "Name three primary colors.")
    expected, _ = generate_ids(grpc_channel, prompt, 8)
    with grpc.insecure_channel(_decode_worker_address(stack)) as channel:
        request = decode_pb2.DecodeRequest(request_id="local-prefill", prompt_token_ids=prompt,
                                           sampling=sampling.encode(SamplingParams(max_tokens=8, temperature=0.0)))
        messages = list(decode_pb2_grpc.DecodeWorkerStub(channel).Decode(request, timeout=120))
    assert [t for m in messages for t in m.tokens.token_ids] == expected
    assert messages[-1].kv.external_tokens == 0


def _engine_layout_cache(model_path, num_blocks: int):
    """A KV cache with the engines' own layout (model, layer names, dtype,
    block shape), holding arbitrary bytes: a stand-in prefill engine."""
    import torch

    from kv_transfer.blocks import cpu_attention_isa
    from kv_transfer.transport.base import KVCache

    hf = json.loads((model_path / "config.json").read_text())
    signature = ";".join([",".join(hf["architectures"])] + [
        f"{key}={hf[key]}" for key in ("num_hidden_layers", "hidden_size", "num_key_value_heads", "vocab_size")])
    head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    dtype = engine_torch_dtype(model_path)
    layers = {f"model.layers.{i}.self_attn.attn": torch.randn(
        (num_blocks, hf["num_key_value_heads"], 128, 2 * head_dim)).to(dtype)
        for i in range(hf["num_hidden_layers"])}
    return KVCache(layers, num_blocks, signature, 128, cpu_attention_isa=cpu_attention_isa(dtype, 128, head_dim))


def _stand_in_producer(backend: str, name: str, cache):
    """A prefill engine's side of ``backend`` (Baton's own code) over ``cache``."""
    if backend == "nixl":
        from kv_transfer.transport.nixl import NixlBackend

        producer = NixlBackend(name, offer_ttl_s=30)
    elif backend == "collective":
        from kv_transfer.transport.collective import CollectiveBackend

        producer = CollectiveBackend(name, "127.0.0.1", consumer=False)
    else:
        from kv_transfer.transport.grpc_stream import GrpcBackend

        producer = GrpcBackend()
    producer.attach(cache)
    return producer


def _hand_over(producer, cache, spec) -> None:
    """What a prefill engine's connector does for ``spec``: every layer
    saved as it ran, then the step's end (NIXL then offers the blocks)."""
    outbound = producer.send(spec)
    for index, layer in enumerate(cache.layers):
        outbound.layer_saved(index, layer)
    outbound.step_done()


@pytest.mark.parametrize("backend", BACKENDS)
def test_kv_that_comes_late_is_recomputed_and_then_refused(stack, tokenizer, grpc_channel, model_path, backend):
    """A KV transfer delayed past the decode engine's start timeout: the
    decode recomputes at once (the right answer, not after the fetch
    timeout), and the KV that then comes is refused (push backends) or
    freed by its producer as soon as it is held (nixl), not kept until a
    TTL."""
    from kv_transfer.connector.metadata import SaveSpec
    from kv_transfer.wire import blocks_for_tokens
    from tests.e2e.conftest import wait_for
    from tests.e2e.test_parity import generate_ids

    prompt = chat_ids(tokenizer, f"Name one river in Europe ({backend}).")
    expected, _ = generate_ids(grpc_channel, prompt, 8)
    cache = _engine_layout_cache(model_path, 7)
    transfer_id = f"late-{backend}-{time.monotonic_ns()}"
    producer = _stand_in_producer(backend, f"late-prefill-{transfer_id}", cache)
    before = _inbox_stats(stack)
    try:
        with grpc.insecure_channel(_decode_worker_address(stack)) as channel:
            request = decode_pb2.DecodeRequest(
                request_id=f"late-{backend}", prompt_token_ids=prompt, first_token_id=expected[0],
                transfer_id=transfer_id, kv_backend=backend,
                kv_source=producer.endpoint() if backend == "nixl" else "",
                sampling=sampling.encode(SamplingParams(max_tokens=7, temperature=0.0)))
            started = time.monotonic()
            messages = list(decode_pb2_grpc.DecodeWorkerStub(channel).Decode(request, timeout=120))
            seconds = time.monotonic() - started
        assert [expected[0]] + [t for m in messages for t in m.tokens.token_ids] == expected
        assert messages[-1].kv.recomputed is True and seconds < KV_FETCH_TIMEOUT_MS / 1000

        # Now the delayed prefill hands its KV over.
        spec = SaveSpec("late-prefill", transfer_id, _kv_endpoint(stack, "decode-0", backend),
                        tuple(range(blocks_for_tokens(len(prompt), 128))), len(prompt), "", backend)
        _hand_over(producer, cache, spec)
        if backend in PULL_BACKENDS:
            producer.hold({spec.req_id}, True)  # its request ended; vLLM keeps the blocks for the reader
            freed: set[str] = set()
            wait_for(lambda: freed.update(producer.finished_sending()) or spec.req_id in freed, 10,
                     "the producer to free the blocks nobody will read (its offer TTL is 30 s)")
        else:
            wait_for(lambda: _inbox_stats(stack).refused_total > before.refused_total, 10,
                     "the late push to be refused")
            stats = _inbox_stats(stack)
            assert stats.inbox_bytes == 0 and stats.received_total == before.received_total
    finally:
        producer.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_corrupted_transfer_is_detected_and_recomputed(stack, tokenizer, grpc_channel, model_path, backend,
                                                         monkeypatch):
    """A stand-in prefill engine (Baton's own backend code, with the engines'
    layout) hands over KV that is damaged on the way; the decode engine
    refuses it, says why, and recomputes the right answer."""
    from kv_transfer.connector.metadata import SaveSpec
    from kv_transfer.wire import blocks_for_tokens
    from tests.e2e.test_parity import generate_ids

    prompt = chat_ids(tokenizer, f"Tell me one fact about the {backend} in a short sentence.")
    expected, _ = generate_ids(grpc_channel, prompt, 8)
    cache = _engine_layout_cache(model_path, 7)
    decode_logs = stack.log_dir / "decode-0.log"
    assert f'"layout_hash": "{cache.layout.layout_hash()}"' in decode_logs.read_text(), "not the engines' layout"
    transfer_id = f"corrupted-{backend}-{time.monotonic_ns()}"
    blocks = tuple(range(blocks_for_tokens(len(prompt), 128)))
    spec = SaveSpec("fake-prefill", transfer_id, _kv_endpoint(stack, "decode-0", backend), blocks, len(prompt), "",
                    backend)
    producer = _stand_in_producer(backend, f"fake-prefill-{transfer_id}", cache)
    source = ""
    if backend == "nixl":
        _hand_over(producer, cache, spec)
        producer._announcer.submit(lambda: None).result()
        cache.layers[5][0, 0, 0, 0] += 1  # damaged after its checksum went out
        source = producer.endpoint()
    else:
        from kv_transfer.transport import collective, grpc_stream

        module = collective if backend == "collective" else grpc_stream
        real_digest = module.digest
        monkeypatch.setattr(module, "digest", lambda t: real_digest(t) ^ 1)  # bits flipped on the way
        _hand_over(producer, cache, spec)
    try:
        with grpc.insecure_channel(_decode_worker_address(stack)) as channel:
            request = decode_pb2.DecodeRequest(
                request_id=f"corrupted-{backend}", prompt_token_ids=prompt, first_token_id=expected[0],
                transfer_id=transfer_id, kv_backend=backend, kv_source=source,
                sampling=sampling.encode(SamplingParams(max_tokens=7, temperature=0.0)))
            messages = list(decode_pb2_grpc.DecodeWorkerStub(channel).Decode(request, timeout=120))
    finally:
        producer.close()
    assert [expected[0]] + [t for m in messages for t in m.tokens.token_ids] == expected
    assert messages[-1].kv.recomputed is True
    warnings = [json.loads(line) for line in decode_logs.read_text().splitlines()
                if line.startswith("{") and transfer_id in line and '"kv load failed' in line]
    assert warnings and warnings[0]["level"] == "warning", warnings
    assert "checksum" in warnings[0]["error"], warnings[0]["error"]
