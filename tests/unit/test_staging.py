import asyncio
import zlib

import pytest

from baton.v1 import kv_transfer_pb2 as pb
from kv_transfer.staging import StagingFull, StagingStore, TransferState, TransferUnavailable
from kv_transfer.wire import WireError, chunk_layer, layer_payload_bytes


def header(tid="t1", blocks=2, layers=2) -> pb.KVHeader:
    return pb.KVHeader(transfer_id=tid, num_tokens=blocks * 4, block_size=4, num_blocks=blocks,
                       layer_names=[f"l{i}" for i in range(layers)], dtype="bfloat16", block_shape=[2, 4, 8],
                       layout_hash="h", wire_version=1)


def push_all(store: StagingStore, h: pb.KVHeader, chunk_bytes=100):
    staged = store.begin(h)
    size = layer_payload_bytes(h)
    for layer in range(len(h.layer_names)):
        payload = memoryview(bytes([layer + 1]) * size)
        for chunk in chunk_layer(layer, payload, chunk_bytes):
            store.add(staged, chunk.data)
    store.complete(staged)
    return staged


async def test_push_then_take_frees_memory():
    store = StagingStore(capacity_bytes=1 << 20, ttl_s=60)
    push_all(store, header())
    assert store.staged_bytes == 2 * layer_payload_bytes(header())
    staged = await store.take("t1", timeout_s=1)
    assert bytes(staged.layers[1][:3]) == b"\x02\x02\x02"
    assert store.staged_bytes == 0 and store.record("t1").state is TransferState.CONSUMED
    with pytest.raises(TransferUnavailable, match="already fetched"):
        await store.take("t1", timeout_s=0.1)


async def test_take_waits_for_a_push_that_arrives_later():
    store = StagingStore(capacity_bytes=1 << 20, ttl_s=60)
    waiter = asyncio.create_task(store.take("t1", timeout_s=5))
    await asyncio.sleep(0.05)
    push_all(store, header())
    assert (await waiter).state is TransferState.CONSUMED


async def test_take_times_out():
    store = StagingStore(capacity_bytes=1 << 20, ttl_s=60)
    with pytest.raises(TransferUnavailable, match="did not arrive"):
        await store.take("never", timeout_s=0.1)


async def test_capacity_is_enforced_and_the_consumer_learns_at_once():
    h = header()
    store = StagingStore(capacity_bytes=layer_payload_bytes(h), ttl_s=60)  # half of what is needed
    with pytest.raises(StagingFull):
        store.begin(h)
    with pytest.raises(TransferUnavailable, match="staging full"):
        await store.take("t1", timeout_s=5)
    assert store.counters["rejected"] == 1


def test_bad_checksum_and_gaps_are_refused():
    store = StagingStore(capacity_bytes=1 << 20, ttl_s=60)
    staged = store.begin(header())
    data = b"x" * 10
    with pytest.raises(WireError, match="checksum"):
        store.add(staged, pb.KVData(layer_index=0, offset=0, data=data, crc32=zlib.crc32(data) ^ 1))
    with pytest.raises(WireError, match="offset"):
        store.add(staged, pb.KVData(layer_index=0, offset=5, data=data, crc32=zlib.crc32(data)))
    with pytest.raises(WireError, match="incomplete"):
        store.complete(staged)
    assert store.record("t1").state is TransferState.FAILED and store.staged_bytes == 0


def test_unfetched_transfers_expire():
    store = StagingStore(capacity_bytes=1 << 20, ttl_s=5)
    staged = push_all(store, header())
    assert store.expire(now_s=staged.created_s + 6) == 1
    assert store.staged_bytes == 0 and store.record("t1").state is TransferState.EXPIRED


def test_discard_frees_staged_kv_and_refuses_a_late_push():
    store = StagingStore(capacity_bytes=1 << 20, ttl_s=60)
    push_all(store, header("early"))
    assert store.discard("early") == 2 * layer_payload_bytes(header())
    assert store.staged_bytes == 0
    assert store.discard("late") == 0
    with pytest.raises(WireError, match="discarded"):
        store.begin(header("late"))


async def test_a_push_that_never_started_is_given_up_at_once():
    store = StagingStore(capacity_bytes=1 << 20, ttl_s=60)
    with pytest.raises(TransferUnavailable, match="never started within 0.1 s"):
        await store.take("t1", timeout_s=30, start_timeout_s=0.1)
    assert store.counters["never_started"] == 1


async def test_a_push_under_way_is_waited_for_past_the_start_timeout():
    store = StagingStore(capacity_bytes=1 << 20, ttl_s=60)
    h = header()
    staged = store.begin(h)  # begun: the header arrived

    async def finish_later():
        await asyncio.sleep(0.3)
        size = layer_payload_bytes(h)
        for layer in range(len(h.layer_names)):
            for chunk in chunk_layer(layer, memoryview(bytes(size)), 100):
                store.add(staged, chunk.data)
        store.complete(staged)

    later = asyncio.create_task(finish_later())
    got = await store.take("t1", timeout_s=5, start_timeout_s=0.1)
    await later
    assert got.state is TransferState.CONSUMED and store.counters["never_started"] == 0
