"""The push backends, for real: ``collective`` on Gloo process groups and
``grpc`` on a gRPC server in the consumer, with KV caches shaped like
vLLM's. Blocks land where they should, a corrupted layer is refused, a full
inbox refuses before any byte moves, and a producer killed mid-transfer
fails only its own transfer."""

from __future__ import annotations

import multiprocessing as mp
import time

import pytest
import torch

from kv_transfer.connector.metadata import LoadSpec, SaveSpec
from kv_transfer.transport.base import KVCache
from kv_transfer.transport.collective import CollectiveBackend
from kv_transfer.transport.grpc_stream import GrpcBackend
from kv_transfer.transport.inbox import Inbox, TransferUnavailable
from kv_transfer.transport.layer_queue import CopyBudget, CopyBudgetExceeded

BLOCK = 4
NUM_BLOCKS = 16
LAYERS = 3


def make_cache(seed: int, model: str = "test-model") -> KVCache:
    generator = torch.Generator().manual_seed(seed)
    layers = {f"model.layers.{i}.attn": torch.randn((2, NUM_BLOCKS, 3, BLOCK, 8), generator=generator).to(
        torch.bfloat16) for i in range(LAYERS)}
    return KVCache(layers, NUM_BLOCKS, model, BLOCK)


def make_backend(kind: str, name: str, consumer: bool, copies: CopyBudget | None = None):
    if kind == "collective":
        return CollectiveBackend(name, "127.0.0.1", consumer=consumer, fetch_timeout_ms=10_000,
                                 start_timeout_ms=500, inbox=Inbox(1 << 20, 30), copies=copies)
    # "grpc": small chunks, a layer takes several messages and is assembled;
    # "grpc-whole-layers": layers share a message and are read in place.
    chunk_bytes = 1000 if kind == "grpc" else 1 << 20
    return GrpcBackend("127.0.0.1", 0, consumer, Inbox(1 << 20, 30), chunk_bytes=chunk_bytes,
                       fetch_timeout_ms=10_000, start_timeout_ms=500, copies=copies)


@pytest.fixture(scope="module", params=["collective", "grpc", "grpc-whole-layers"])
def kind(request):
    return request.param


@pytest.fixture(scope="module")
def consumer(kind):
    backend = make_backend(kind, "test-consumer", consumer=True)
    backend.attach(make_cache(2))
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def producer(kind):
    backend = make_backend(kind, "test-producer", consumer=False)
    backend.attach(make_cache(1))
    yield backend
    backend.close()


def push(producer, consumer, transfer_id: str, blocks: tuple[int, ...], tokens: int) -> None:
    outbound = producer.send(SaveSpec(f"req-{transfer_id}", transfer_id, consumer.endpoint(), blocks, tokens, "",
                                      producer.name))
    # In execution order, which is not the order of the sorted layer names
    # ("layers.10" sorts before "layers.2").
    for index in (1, 2, 0):
        outbound.layer_saved(index, producer._cache.layers[index])
    outbound.step_done()


def block(cache: KVCache, layer: int, block_id: int, tokens: int = BLOCK) -> torch.Tensor:
    """A block's first ``tokens`` slots (this layout: K/V, heads, tokens, head dim)."""
    return cache.layers[layer].select(cache.block_dims[layer], block_id)[:, :, :tokens]


def last_slot(cache: KVCache, layer: int, block_id: int) -> torch.Tensor:
    return cache.layers[layer].select(cache.block_dims[layer], block_id)[:, :, BLOCK - 1]


def test_blocks_land_in_the_consumers_blocks(producer, consumer):
    push(producer, consumer, "t-ok", (5, 9, 2), 3 * BLOCK - 1)
    beyond = [last_slot(consumer._cache, layer, 13).clone()
              for layer in range(LAYERS)]
    received = consumer.receive(LoadSpec("d-ok", "t-ok", (11, 12, 13), 0, 3 * BLOCK - 1, 2, consumer.name))
    # Of the last block, only the slots the prompt fills moved.
    token_bytes = sum(block(consumer._cache, layer, 0, 1).numel() * 2 for layer in range(LAYERS))
    assert received.bytes == (3 * BLOCK - 1) * token_bytes
    for layer in range(LAYERS):
        for src, dst in zip((5, 9), (11, 12), strict=True):
            assert torch.equal(block(producer._cache, layer, src), block(consumer._cache, layer, dst))
        assert torch.equal(block(producer._cache, layer, 2, BLOCK - 1), block(consumer._cache, layer, 13, BLOCK - 1))
        assert torch.equal(last_slot(consumer._cache, layer, 13), beyond[layer])
        assert torch.equal(received.kept[layer], block(producer._cache, layer, 2, BLOCK - 1).reshape(-1))
    assert consumer._inbox.bytes == 0, "loaded KV is freed"


def test_a_layer_damaged_on_the_way_is_refused(kind, producer, consumer, monkeypatch):
    from kv_transfer.transport import collective, grpc_stream

    module = collective if kind == "collective" else grpc_stream
    real_digest = module.digest
    # The producer's checksum no longer matches the bytes it sends.
    monkeypatch.setattr(module, "digest", lambda blocks: real_digest(blocks) ^ 1)
    push(producer, consumer, "t-bad", (7,), BLOCK)
    with pytest.raises(TransferUnavailable, match="checksum"):
        consumer.receive(LoadSpec("d-bad", "t-bad", (3,), 0, BLOCK, -1, consumer.name))
    assert consumer._inbox.bytes == 0
    monkeypatch.undo()
    push(producer, consumer, "t-good", (7,), BLOCK)
    consumer.receive(LoadSpec("d-good", "t-good", (3,), 0, BLOCK, -1, consumer.name))
    assert torch.equal(block(producer._cache, 1, 7), block(consumer._cache, 1, 3))


def test_a_transfer_that_never_starts_is_given_up_after_the_start_timeout(consumer):
    started = time.monotonic()
    with pytest.raises(TransferUnavailable, match="never started"):
        consumer.receive(LoadSpec("d-none", "t-none", (3,), 0, BLOCK, -1, consumer.name))
    assert time.monotonic() - started < 5


def test_a_push_that_comes_after_its_load_gave_up_is_refused(producer, consumer):
    """The decode engine recomputed the prompt when the push had not begun
    within the start timeout; the push that comes late is refused before
    it is kept, not held in the inbox until its TTL."""
    with pytest.raises(TransferUnavailable, match="never started"):
        consumer.receive(LoadSpec("d-late", "t-late", (3,), 0, BLOCK, -1, consumer.name))
    refused = consumer._inbox.counters["refused"]
    push(producer, consumer, "t-late", (1, 2), 2 * BLOCK)
    deadline = time.monotonic() + 5
    while consumer._inbox.counters["refused"] == refused and time.monotonic() < deadline:
        time.sleep(0.01)
    assert consumer._inbox.counters["refused"] == refused + 1, "the late push was taken in"
    assert consumer._inbox.bytes == 0


def test_a_full_inbox_refuses_and_the_pair_goes_on(producer, consumer):
    big = tuple(range(NUM_BLOCKS))
    consumer._inbox._capacity, saved = 1000, consumer._inbox._capacity  # less than one transfer
    try:
        push(producer, consumer, "t-full", big, NUM_BLOCKS * BLOCK)
        with pytest.raises(TransferUnavailable, match="inbox full"):
            consumer.receive(LoadSpec("d-full", "t-full", big, 0, NUM_BLOCKS * BLOCK, -1, consumer.name))
    finally:
        consumer._inbox._capacity = saved
    push(producer, consumer, "t-after", (1,), BLOCK)
    consumer.receive(LoadSpec("d-after", "t-after", (4,), 0, BLOCK, -1, consumer.name))
    assert torch.equal(block(producer._cache, 0, 1), block(consumer._cache, 0, 4))


def test_a_producer_of_another_model_is_refused_before_any_byte_moves(kind, producer, consumer):
    stranger = make_backend(kind, "stranger", consumer=False)
    stranger.attach(make_cache(5, model="another-model"))
    try:
        started = time.monotonic()
        push(stranger, consumer, "t-stranger", (1, 2), 2 * BLOCK)
        with pytest.raises(TransferUnavailable, match="layout mismatch"):
            consumer.receive(LoadSpec("d-stranger", "t-stranger", (3, 4), 0, 2 * BLOCK, -1, consumer.name))
        assert time.monotonic() - started < 5
    finally:
        stranger.close()
    assert consumer._inbox.bytes == 0
    push(producer, consumer, "t-known", (2,), BLOCK)
    consumer.receive(LoadSpec("d-known", "t-known", (5,), 0, BLOCK, -1, consumer.name))
    assert torch.equal(block(producer._cache, 1, 2), block(consumer._cache, 1, 5))


def test_layer_copies_past_their_bound_open_no_transfer(kind, consumer):
    # Room for one 2-block transfer of 3 layers (2 x 384 B a layer) in flight, not two.
    budget = CopyBudget(3000)
    small = make_backend(kind, "test-small-producer", consumer=False, copies=budget)
    small.attach(make_cache(5))
    try:
        first = small.send(SaveSpec("req-b1", "t-b1", consumer.endpoint(), (0, 1), 2 * BLOCK, "", kind))
        with pytest.raises(CopyBudgetExceeded, match="STAGING_CAPACITY_MIB"):
            small.send(SaveSpec("req-b2", "t-b2", consumer.endpoint(), (2, 3), 2 * BLOCK, "", kind))
        for index, layer in enumerate(small._cache.layers):
            first.layer_saved(index, layer)
        first.step_done()
        consumer.receive(LoadSpec("d-b1", "t-b1", (6, 7), 0, 2 * BLOCK, -1, consumer.name))
        deadline = time.monotonic() + 10
        while budget.bytes:  # given back once the push is over
            assert time.monotonic() < deadline, "the copies' bytes never came back"
            time.sleep(0.01)
        push(small, consumer, "t-b3", (2, 3), 2 * BLOCK)
        consumer.receive(LoadSpec("d-b3", "t-b3", (8, 9), 0, 2 * BLOCK, -1, consumer.name))
        assert torch.equal(block(small._cache, 0, 3), block(consumer._cache, 0, 9))
    finally:
        small.close()


def _doomed_producer(kind: str, endpoint: str) -> None:
    """Opens a transfer and sends a layer, then waits to be killed."""
    backend = make_backend(kind, "doomed-producer", consumer=False)
    backend.attach(make_cache(3))
    outbound = backend.send(SaveSpec("req-doomed", "t-doomed", endpoint, (0, 1), 2 * BLOCK, "", kind))
    outbound.layer_saved(0, backend._cache.layers[0])
    time.sleep(600)


def test_a_killed_producer_fails_only_its_own_transfer(kind, producer, consumer):
    doomed = mp.get_context("spawn").Process(target=_doomed_producer, args=(kind, consumer.endpoint()), daemon=True)
    doomed.start()
    deadline = time.monotonic() + 60
    while consumer._inbox._items.get("t-doomed") is None:  # mid-transfer: header in, layers coming
        assert time.monotonic() < deadline, "the doomed producer never started its transfer"
        time.sleep(0.05)
    doomed.kill()
    # collective: the pair is torn down; grpc: the stream is cut.
    with pytest.raises(TransferUnavailable, match="pair broke|push interrupted"):
        consumer.receive(LoadSpec("d-doomed", "t-doomed", (3, 4), 0, 2 * BLOCK, -1, consumer.name))
    # The other pair serves on.
    push(producer, consumer, "t-survivor", (6,), BLOCK)
    consumer.receive(LoadSpec("d-survivor", "t-survivor", (8,), 0, BLOCK, -1, consumer.name))
    assert torch.equal(block(producer._cache, 2, 6), block(consumer._cache, 2, 8))
