from control_plane.transfers import TransferState, TransferTable


def test_transfer_lifecycle_counts_per_worker():
    table = TransferTable(ttl_s=10)
    t = table.open("r1", "p0", "d0", now_s=0)
    assert table.in_flight("p0") == 1 and table.in_flight("d0") == 1
    assert table.close(t.transfer_id, TransferState.CONSUMED, nbytes=100, tokens=5).state is TransferState.CONSUMED
    assert table.in_flight("d0") == 0
    assert table.counters["d0"]["total"] == 1 and table.counters["d0"]["consumed"] == 1


def test_closing_twice_is_ignored_forward_only():
    table = TransferTable(ttl_s=10)
    t = table.open("r1", "p0", "d0", now_s=0)
    table.close(t.transfer_id, TransferState.FAILED)
    assert table.close(t.transfer_id, TransferState.CONSUMED) is None
    assert table.counters["p0"]["failed"] == 1 and table.counters["p0"]["consumed"] == 0


def test_expiry_after_ttl():
    table = TransferTable(ttl_s=10)
    old = table.open("r1", "p0", "d0", now_s=0)
    table.open("r2", "p0", "d0", now_s=8)
    expired = table.expire(now_s=11)
    assert [t.transfer_id for t in expired] == [old.transfer_id]
    assert table.open_count == 1 and table.counters["d0"]["expired"] == 1


def test_counts_per_backend_with_recomputes_and_fallbacks():
    table = TransferTable(ttl_s=10)
    loaded = table.open("r1", "p0", "d0", now_s=0, backend="nixl")
    recomputed = table.open("r2", "p0", "d0", now_s=0, backend="nixl")
    fell_back = table.open("r3", "p1", "d0", now_s=0, backend="grpc", fallback=True)
    table.close(loaded.transfer_id, TransferState.CONSUMED, nbytes=4096, tokens=100)
    table.close(recomputed.transfer_id, TransferState.FAILED, recomputed=True)
    table.close(fell_back.transfer_id, TransferState.CONSUMED, nbytes=1024, tokens=30)
    nixl, grpc = table.by_backend["nixl"], table.by_backend["grpc"]
    assert (nixl["placed"], nixl["consumed"], nixl["failed"], nixl["recomputed"], nixl["bytes"]) == (2, 1, 1, 1, 4096)
    assert (grpc["placed"], grpc["fallbacks"], grpc["consumed"], grpc["bytes"]) == (1, 1, 1, 1024)
    assert nixl["fallbacks"] == 0


def test_load_is_counted_per_phase():
    table = TransferTable(ttl_s=10)
    first = table.open("r1", "p0", "d0", now_s=0, backend="nixl", prefill_tokens=300, decode_tokens=400,
                       predicted_cached=128)
    table.open("r2", "p0", "d0", now_s=0, backend="nixl", prefill_tokens=200, decode_tokens=250)
    assert table.queued_prefill_tokens("p0") == 500 and table.running("d0") == 2
    assert table.decode_tokens("d0") == 650 and table.decoding("d0") == 0
    # The first token came back: the prefill worker is done with r1, the decode worker is not.
    assert table.prefill_done(first.transfer_id, cached_tokens=128) is first
    assert table.prefill_done(first.transfer_id, cached_tokens=128) is None  # once
    assert table.queued_prefill_tokens("p0") == 200 and table.running("d0") == 2 and table.decoding("d0") == 1
    table.close(first.transfer_id, TransferState.CONSUMED)
    assert table.queued_prefill_tokens("p0") == 200 and table.running("d0") == 1 and table.decode_tokens("d0") == 250
    assert table.decoding("d0") == 0
    assert (table.prefix["reported"], table.prefix["exact"], table.prefix["hit_tokens"]) == (1, 1, 128)


def test_a_transfer_closed_before_its_prefill_reported_frees_both_phases():
    table = TransferTable(ttl_s=10)
    t = table.open("r1", "p0", "d0", now_s=0, prefill_tokens=300, decode_tokens=400)
    table.close(t.transfer_id, TransferState.FAILED)
    assert table.queued_prefill_tokens("p0") == 0 and table.running("d0") == 0 and table.decode_tokens("d0") == 0
    assert table.decoding("d0") == 0


def test_a_local_placement_loads_only_the_decode_worker_and_no_backend():
    table = TransferTable(ttl_s=10)
    t = table.open("r1", "", "d0", now_s=0, prefill_tokens=0, decode_tokens=90)
    assert table.running("d0") == 1 and table.decoding("d0") == 1 and "" not in table.counters
    assert table.by_backend == {}
    table.close(t.transfer_id, TransferState.LOCAL)
    assert table.running("d0") == 0 and table.counters["d0"]["local"] == 1 and table.by_backend == {}


def test_failing_a_worker_closes_only_its_open_transfers_and_frees_its_load():
    table = TransferTable(ttl_s=60)
    gone = table.open("r1", "p1", "d1", 0.0, "grpc", prefill_tokens=100, decode_tokens=164)
    table.open("r2", "p2", "d1", 0.0, "grpc", prefill_tokens=50, decode_tokens=80)
    kept = table.open("r3", "p2", "d2", 0.0, "grpc", prefill_tokens=30, decode_tokens=40)
    failed = table.fail_worker("p1")
    assert [t.transfer_id for t in failed] == [gone.transfer_id]
    assert failed[0].state is TransferState.FAILED
    assert table.queued_prefill_tokens("p1") == 0 and table.running("d1") == 1
    assert table.in_flight("p2") == 2 and table.counters["p1"]["failed"] == 1
    assert table.close(kept.transfer_id, TransferState.CONSUMED) is not None
    assert table.fail_worker("nobody") == []
