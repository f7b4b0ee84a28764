"""The NIXL backend on real NIXL agents (UCX over shared memory), two in one
process, with KV caches shaped like vLLM's: the blocks land where they
should, corruption and withdrawn or missing transfers are refused, and the
producer frees its blocks once they were read."""

from __future__ import annotations

import time

import pytest
import torch

pytest.importorskip("nixl._api", reason="NIXL is installed by `make setup`")

from kv_transfer.connector.metadata import LoadSpec, SaveSpec  # noqa: E402
from kv_transfer.transport.base import KVCache  # noqa: E402
from kv_transfer.transport.nixl import NixlBackend, TransferUnavailable  # noqa: E402
from kv_transfer.wire import WireError  # noqa: E402

BLOCK = 4  # tokens per block
NUM_BLOCKS = 16


def make_cache(seed: int) -> KVCache:
    generator = torch.Generator().manual_seed(seed)
    layers = {f"model.layers.{i}.attn": torch.randn((2, NUM_BLOCKS, 3, BLOCK, 8), generator=generator).to(
        torch.bfloat16) for i in range(3)}
    return KVCache(layers, NUM_BLOCKS, "test-model", BLOCK)


@pytest.fixture(scope="module")
def pair():
    producer = NixlBackend("test-producer", fetch_timeout_ms=5_000, start_timeout_ms=300, offer_ttl_s=30)
    consumer = NixlBackend("test-consumer", fetch_timeout_ms=5_000, start_timeout_ms=300, offer_ttl_s=30)
    producer.attach(make_cache(1))
    consumer.attach(make_cache(2))
    yield producer, consumer
    producer.close()
    consumer.close()


def offer(producer, consumer, transfer_id: str, blocks: tuple[int, ...], tokens: int):
    spec = SaveSpec(f"req-{transfer_id}", transfer_id, consumer.endpoint(), blocks, tokens, "", "nixl")
    producer.send(spec).step_done()
    producer._announcer.submit(lambda: None).result()  # the offer went out
    return spec


def wait_freed(producer, req_id: str) -> None:
    deadline = time.monotonic() + 5
    freed: set[str] = set()
    while req_id not in freed and time.monotonic() < deadline:
        freed |= producer.finished_sending()
        time.sleep(0.01)
    assert req_id in freed, "the producer did not free the blocks"


def block(cache: KVCache, layer: int, block_id: int, tokens: int = BLOCK) -> torch.Tensor:
    """A block's first ``tokens`` slots (this layout: K/V, heads, tokens, head dim)."""
    return cache.layers[layer].select(cache.block_dims[layer], block_id)[:, :, :tokens]


def last_slot(cache: KVCache, layer: int, block_id: int) -> torch.Tensor:
    return cache.layers[layer].select(cache.block_dims[layer], block_id)[:, :, BLOCK - 1]


def token_bytes(cache: KVCache) -> int:
    """One token's KV over every layer."""
    return sum(block(cache, layer, 0, 1).numel() * 2 for layer in range(len(cache.layers)))


def test_blocks_land_in_the_consumers_blocks_and_the_producer_frees_them(pair):
    producer, consumer = pair
    spec = offer(producer, consumer, "t-ok", (5, 9, 2), 3 * BLOCK - 1)
    load = LoadSpec("d-ok", "t-ok", (11, 12, 13), 0, 3 * BLOCK - 1, -1, "nixl", producer.endpoint())
    beyond = [last_slot(consumer._cache, layer, 13).clone()
              for layer in range(3)]
    received = consumer.receive(load)
    # Of the last block, only the slots the prompt fills move.
    assert received.bytes == (3 * BLOCK - 1) * token_bytes(consumer._cache)
    for layer in range(3):
        for src, dst in zip((5, 9), (11, 12), strict=True):
            assert torch.equal(block(producer._cache, layer, src), block(consumer._cache, layer, dst))
        assert torch.equal(block(producer._cache, layer, 2, BLOCK - 1), block(consumer._cache, layer, 13, BLOCK - 1))
        assert torch.equal(last_slot(consumer._cache, layer, 13), beyond[layer])
    producer.hold({spec.req_id}, True)
    wait_freed(producer, spec.req_id)


def test_a_prefix_hit_reads_only_the_missing_blocks_and_keeps_the_restore_block(pair):
    producer, consumer = pair
    # 2 blocks and a token of prompt: the consumer has block 0 cached, reads
    # block 1, and keeps block 2's one token (the prompt's last position,
    # which it recomputes and restores) aside.
    offer(producer, consumer, "t-keep", (3, 4, 6), 2 * BLOCK + 1)
    load = LoadSpec("d-keep", "t-keep", (14,), 1, 2 * BLOCK + 1, 2, "nixl", producer.endpoint())
    received = consumer.receive(load)
    assert received.bytes == (BLOCK + 1) * token_bytes(consumer._cache)
    for layer in range(3):
        assert torch.equal(block(producer._cache, layer, 4), block(consumer._cache, layer, 14))
        assert torch.equal(received.kept[layer], block(producer._cache, layer, 6, 1).reshape(-1))


def test_a_corrupted_block_is_refused(pair):
    producer, consumer = pair
    offer(producer, consumer, "t-bad", (7, 8), 2 * BLOCK)
    block(producer._cache, 1, 8)[0, 0, 0, 0] += 1  # flipped after its digest was sent
    load = LoadSpec("d-bad", "t-bad", (0, 1), 0, 2 * BLOCK, -1, "nixl", producer.endpoint())
    with pytest.raises(WireError, match="checksum"):
        consumer.receive(load)


def test_a_withdrawn_offer_is_not_read(pair):
    producer, consumer = pair
    spec = offer(producer, consumer, "t-gone", (10,), BLOCK)
    producer.hold({spec.req_id}, False)  # the prefill request was aborted: its blocks are freed
    producer._announcer.submit(lambda: None).result()
    time.sleep(0.3)  # the withdrawal reaches the consumer's queue behind the offer
    load = LoadSpec("d-gone", "t-gone", (6,), 0, BLOCK, -1, "nixl", producer.endpoint())
    with pytest.raises(TransferUnavailable, match="ended before"):
        consumer.receive(load)


def test_a_transfer_that_never_starts_is_given_up_after_the_start_timeout(pair):
    producer, consumer = pair
    load = LoadSpec("d-none", "t-none", (6,), 0, BLOCK, -1, "nixl", producer.endpoint())
    started = time.monotonic()
    with pytest.raises(TransferUnavailable, match="never started"):
        consumer.receive(load)
    assert time.monotonic() - started < 3  # the start timeout (0.3 s), not the fetch timeout (5 s)


def test_a_peer_with_another_layout_is_refused(pair):
    producer, consumer = pair
    other = NixlBackend("test-other-layout")
    try:
        layers = {f"model.layers.{i}.attn": torch.zeros((2, NUM_BLOCKS, 3, BLOCK, 8), dtype=torch.float16)
                  for i in range(3)}
        other.attach(KVCache(layers, NUM_BLOCKS, "test-model", BLOCK))
        load = LoadSpec("d-layout", "t-layout", (6,), 0, BLOCK, -1, "nixl", other.endpoint())
        with pytest.raises(WireError, match="layout mismatch"):
            consumer.receive(load)
    finally:
        other.close()


def test_a_declined_offer_is_freed_at_once(pair):
    producer, consumer = pair
    spec = offer(producer, consumer, "t-declined", (12,), BLOCK)
    producer.hold({spec.req_id}, True)
    consumer.decline("t-declined", producer.endpoint())  # the decode had the prompt cached
    wait_freed(producer, spec.req_id)


def test_a_load_whose_request_ended_stops_waiting(pair):
    import threading

    producer, consumer = pair
    load = LoadSpec("d-cancel", "t-cancel", (6,), 0, BLOCK, -1, "nixl", producer.endpoint())
    consumer_agent = producer._peer(consumer.endpoint()).agent
    producer._announcer.submit(producer._notify, consumer_agent, b"Bt-cancel").result()  # begun
    errors = []
    waiter = threading.Thread(target=lambda: errors.append(pytest.raises(TransferUnavailable, consumer.receive,
                                                                         load)))
    started = time.monotonic()
    waiter.start()
    time.sleep(0.5)  # begun: past the start timeout, still waiting for the prefill
    assert waiter.is_alive()
    consumer.cancel("t-cancel")
    waiter.join(3)
    assert not waiter.is_alive() and time.monotonic() - started < 3
    assert "ended first" in str(errors[0].value)


def test_held_blocks_without_an_offer_are_freed_at_once(pair):
    """The prefill finished and vLLM kept its blocks for a transfer whose
    offer could not be opened (or is gone): nothing will read them, and
    an engine holding them would step forever."""
    producer, _ = pair
    producer.hold({"req-never-offered"}, True)
    wait_freed(producer, "req-never-offered")


def test_an_offer_lives_its_ttl_from_when_its_blocks_are_ready(pair):
    """A prefill step longer than the offer TTL (a loaded host) does not
    expire the offer before its blocks are even computed; once announced,
    an unread offer expires after the TTL and its held blocks are freed."""
    _, consumer = pair
    producer = NixlBackend("test-slow-producer", offer_ttl_s=0.3)
    producer.attach(make_cache(3))
    try:
        spec = SaveSpec("req-slow", "t-slow", consumer.endpoint(), (3,), BLOCK, "", "nixl")
        outbound = producer.send(spec)
        time.sleep(1.0)  # the step computing the prompt runs past the TTL
        assert "t-slow" in producer._offers, "expired before its blocks were ready"
        outbound.step_done()
        producer._announcer.submit(lambda: None).result()
        producer.hold({spec.req_id}, True)  # the request finished; vLLM keeps the blocks
        assert producer.finished_sending() == set(), "freed before anyone could read them"
        wait_freed(producer, spec.req_id)  # nobody read them: freed after the TTL
    finally:
        producer.close()


def test_an_offer_made_after_its_consumer_gave_up_is_freed_once_held(pair):
    """The decode engine recomputed the prompt when no offer had come
    within the start timeout; the prefill's late offer is not held for the
    TTL (30 s here): its blocks are freed as soon as vLLM holds them."""
    producer, consumer = pair
    # Another prefill's offer keeps the producer reading its notifications:
    # the consumer's "given up" arrives before the late offer exists.
    other = offer(producer, consumer, "t-other", (5,), BLOCK)
    load = LoadSpec("d-late", "t-late", (6,), 0, BLOCK, -1, "nixl", producer.endpoint())
    with pytest.raises(TransferUnavailable, match="never started"):
        consumer.receive(load)
    consumer._announcer.submit(lambda: None).result()  # its "given up" went out
    deadline = time.monotonic() + 5
    while "t-late" not in producer._given_up and time.monotonic() < deadline:
        time.sleep(0.01)
    assert "t-late" in producer._given_up, "the consumer's word did not arrive"
    spec = offer(producer, consumer, "t-late", (4,), BLOCK)
    producer.hold({spec.req_id}, True)
    wait_freed(producer, spec.req_id)
    producer.hold({other.req_id}, False)


def _doomed_consumer(conn) -> None:
    """A decode engine's side in its own process: reads one offer, then
    waits to be killed."""
    consumer = NixlBackend("test-doomed-consumer", fetch_timeout_ms=5_000, start_timeout_ms=3_000)
    consumer.attach(make_cache(2))
    conn.send(consumer.endpoint())
    source = conn.recv()
    conn.send(consumer.receive(LoadSpec("d-first", "t-first", (6,), 0, BLOCK, -1, "nixl", source)).bytes)
    time.sleep(600)


def test_blocks_offered_to_a_consumer_that_died_are_freed_at_once():
    """The decode engine died (SIGKILL): what the prefill offered it is
    freed when the next word to it fails, not at the offer TTL (30 s)."""
    import multiprocessing as mp
    import os
    import signal

    context = mp.get_context("spawn")
    ours, theirs = context.Pipe()
    process = context.Process(target=_doomed_consumer, args=(theirs,), daemon=True)
    process.start()
    producer = NixlBackend("test-producer-of-the-dead", offer_ttl_s=30)
    try:
        producer.attach(make_cache(1))
        assert ours.poll(60), "the consumer did not start"
        consumer_endpoint = ours.recv()
        ours.send(producer.endpoint())
        first = SaveSpec("req-first", "t-first", consumer_endpoint, (3,), BLOCK, "", "nixl")
        producer.send(first).step_done()
        assert ours.poll(30) and ours.recv() > 0, "the first offer was not read"
        os.kill(process.pid, signal.SIGKILL)
        process.join(10)
        spec = SaveSpec("req-orphan", "t-orphan", consumer_endpoint, (4,), BLOCK, "", "nixl")
        producer.send(spec).step_done()
        producer.hold({first.req_id, spec.req_id}, True)
        wait_freed(producer, spec.req_id)
    finally:
        producer.close()
        if process.is_alive():
            process.kill()
