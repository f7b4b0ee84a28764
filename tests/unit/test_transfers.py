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
