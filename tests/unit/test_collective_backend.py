"""The collective backend on real Gloo process groups, with KV caches shaped
like vLLM's: blocks land where they should, a corrupted layer is refused,
and a producer killed mid-transfer takes down only its own pair."""

from __future__ import annotations

import multiprocessing as mp
import time

import pytest
import torch

from kv_transfer.connector.metadata import LoadSpec, SaveSpec
from kv_transfer.transport.base import KVCache
from kv_transfer.transport.collective import CollectiveBackend, TransferUnavailable
from kv_transfer.wire import WireError

BLOCK = 4
NUM_BLOCKS = 16
LAYERS = 3


def make_cache(seed: int) -> KVCache:
    generator = torch.Generator().manual_seed(seed)
    layers = {f"model.layers.{i}.attn": torch.randn((2, NUM_BLOCKS, 3, BLOCK, 8), generator=generator).to(
        torch.bfloat16) for i in range(LAYERS)}
    return KVCache(layers, NUM_BLOCKS, "test-model", BLOCK)


@pytest.fixture(scope="module")
def consumer():
    backend = CollectiveBackend("test-consumer", "127.0.0.1", consumer=True, fetch_timeout_ms=10_000,
                                start_timeout_ms=500, capacity_bytes=1 << 20, ttl_s=30)
    backend.attach(make_cache(2))
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def producer():
    backend = CollectiveBackend("test-producer", "127.0.0.1", consumer=False)
    backend.attach(make_cache(1))
    yield backend
    backend.close()


def push(producer: CollectiveBackend, consumer: CollectiveBackend, transfer_id: str, blocks: tuple[int, ...],
         tokens: int) -> None:
    outbound = producer.send(SaveSpec(f"req-{transfer_id}", transfer_id, consumer.endpoint(), blocks, tokens, "",
                                      "collective"))
    # In execution order, which is not the order of the sorted layer names
    # ("layers.10" sorts before "layers.2").
    for index in (1, 2, 0):
        outbound.layer_saved(index, producer._cache.layers[index])
    outbound.step_done()


def block(cache: KVCache, layer: int, block_id: int) -> torch.Tensor:
    return cache.layers[layer].select(cache.block_dims[layer], block_id)


def test_blocks_land_in_the_consumers_blocks(producer, consumer):
    push(producer, consumer, "t-ok", (5, 9, 2), 3 * BLOCK - 1)
    received = consumer.receive(LoadSpec("d-ok", "t-ok", (11, 12, 13), 0, 3 * BLOCK - 1, 2, "collective"))
    for layer in range(LAYERS):
        for src, dst in zip((5, 9, 2), (11, 12, 13), strict=True):
            assert torch.equal(block(producer._cache, layer, src), block(consumer._cache, layer, dst))
        assert torch.equal(received.kept[layer], block(producer._cache, layer, 2))
    assert consumer._inbox.bytes == 0, "loaded KV is freed"


def test_a_corrupted_layer_is_refused(producer, consumer):
    push(producer, consumer, "t-bad", (7,), BLOCK)
    deadline = time.monotonic() + 10
    while consumer._inbox._items.get("t-bad") is None or consumer._inbox._items["t-bad"].state != "complete":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    consumer._inbox._items["t-bad"].layers[1][0, 0, 0, 0, 0] += 1  # a bit flipped on the way
    with pytest.raises(WireError, match="checksum"):
        consumer.receive(LoadSpec("d-bad", "t-bad", (3,), 0, BLOCK, -1, "collective"))


def test_a_transfer_that_never_starts_is_given_up_after_the_start_timeout(consumer):
    started = time.monotonic()
    with pytest.raises(TransferUnavailable, match="never started"):
        consumer.receive(LoadSpec("d-none", "t-none", (3,), 0, BLOCK, -1, "collective"))
    assert time.monotonic() - started < 5


def test_a_full_inbox_refuses_and_the_pair_goes_on(producer, consumer):
    big = tuple(range(NUM_BLOCKS))
    consumer._inbox._capacity, saved = 1000, consumer._inbox._capacity  # less than one transfer
    try:
        push(producer, consumer, "t-full", big, NUM_BLOCKS * BLOCK)
        with pytest.raises(TransferUnavailable, match="inbox full"):
            consumer.receive(LoadSpec("d-full", "t-full", big, 0, NUM_BLOCKS * BLOCK, -1, "collective"))
    finally:
        consumer._inbox._capacity = saved
    push(producer, consumer, "t-after", (1,), BLOCK)
    consumer.receive(LoadSpec("d-after", "t-after", (4,), 0, BLOCK, -1, "collective"))
    assert torch.equal(block(producer._cache, 0, 1), block(consumer._cache, 0, 4))


def _doomed_producer(endpoint: str) -> None:
    """Opens a transfer and sends a layer, then waits to be killed."""
    backend = CollectiveBackend("doomed-producer", "127.0.0.1", consumer=False)
    backend.attach(make_cache(3))
    outbound = backend.send(SaveSpec("req-doomed", "t-doomed", endpoint, (0, 1), 2 * BLOCK, "", "collective"))
    outbound.layer_saved(0, backend._cache.layers[0])
    time.sleep(600)


def test_a_killed_producer_takes_down_only_its_own_pair(producer, consumer):
    doomed = mp.get_context("spawn").Process(target=_doomed_producer, args=(consumer.endpoint(),), daemon=True)
    doomed.start()
    deadline = time.monotonic() + 60
    while consumer._inbox._items.get("t-doomed") is None:  # mid-transfer: header in, layers coming
        assert time.monotonic() < deadline, "the doomed producer never started its transfer"
        time.sleep(0.05)
    doomed.kill()
    with pytest.raises(TransferUnavailable, match="pair broke"):
        consumer.receive(LoadSpec("d-doomed", "t-doomed", (3, 4), 0, 2 * BLOCK, -1, "collective"))
    # The other pair serves on.
    push(producer, consumer, "t-survivor", (6,), BLOCK)
    consumer.receive(LoadSpec("d-survivor", "t-survivor", (8,), 0, BLOCK, -1, "collective"))
    assert torch.equal(block(producer._cache, 2, 6), block(consumer._cache, 2, 8))
