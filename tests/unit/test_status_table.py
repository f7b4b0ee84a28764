"""`baton status`'s table shows what `--json` holds."""

from baton.status import render_table


def test_the_table_shows_labels_counters_and_backends():
    status = {"workers": [
        {"worker_id": "decode-0", "role": "decode", "address": "127.0.0.1:1", "state": "ready", "model": "m",
         "labels": {"tier": "a", "region": "eu"},
         "transfers": {"total": 3, "consumed": 2, "failed": 1, "expired": 0, "in_flight": 0, "kv_bytes": 5 << 20}},
        {"worker_id": "prefill-0", "role": "prefill", "address": "127.0.0.1:2", "state": "ready", "model": "m",
         "labels": {}, "transfers": None}],
        "kv_backends": {"grpc": {"placed": 3, "consumed": 2, "failed": 1, "recomputed": 1, "expired": 0,
                                 "bytes": 4096, "fallbacks": 0}}}
    table = render_table(status)
    decode, prefill = (line for line in table.splitlines() if line.startswith(("decode-0", "prefill-0")))
    assert "region=eu,tier=a" in decode and "consumed=2" in decode
    assert " - " in prefill and "control plane unreachable" in prefill
    assert "KV BACKEND" in table and "4.0 KiB" in table and "kv=5.0 MiB" in decode
    assert render_table({"workers": [], "kv_backends": None}) == "no workers registered"


def test_the_table_shows_recent_errors_newest_first():
    status = {"workers": [
        {"worker_id": "decode-0", "role": "decode", "address": "a:2", "state": "ready", "model": "m", "labels": {},
         "transfers": {"total": 1, "consumed": 0, "failed": 1, "expired": 0, "in_flight": 0, "kv_bytes": 0}}],
        "kv_backends": None, "recent_errors": [
            {"unix_s": 1_800_000_100.0, "kind": "recomputed", "worker_id": "decode-0", "transfer_id": "ab" * 16,
             "detail": "the decode worker could not load the KV"},
            {"unix_s": 1_800_000_000.0, "kind": "suspect", "worker_id": "prefill-1", "transfer_id": "",
             "detail": "request r1 failed on it"}]}
    lines = render_table(status).splitlines()
    start = lines.index("RECENT ERRORS (newest first)")
    assert "recomputed" in lines[start + 1] and "decode-0 abababab" in lines[start + 1]
    assert "could not load the KV" in lines[start + 1]
    assert "suspect" in lines[start + 2] and "request r1 failed on it" in lines[start + 2]


def test_the_table_shows_the_prefix_index_and_load_per_worker():
    engine = {"running": 2, "waiting": 1, "kv_cache_usage": 0.25, "prefix_cache_queries": 900,
              "prefix_cache_hits": 512}
    status = {"policy": "kv-aware", "workers": [
        {"worker_id": "prefill-0", "role": "prefill", "address": "a:1", "state": "ready", "model": "m",
         "labels": {}, "transfers": {"total": 1, "consumed": 1, "failed": 0, "expired": 0, "in_flight": 0, "kv_bytes": 5 << 20},
         "scheduling": {"prefix_source": "events", "cached_blocks": 7, "queued_prefill_tokens": 321,
                        "running": 0, "engine": engine}},
        {"worker_id": "decode-0", "role": "decode", "address": "a:2", "state": "ready", "model": "m",
         "labels": {}, "transfers": {"total": 1, "consumed": 1, "failed": 0, "expired": 0, "in_flight": 0, "kv_bytes": 5 << 20},
         "scheduling": {"prefix_source": "history", "cached_blocks": 3, "queued_prefill_tokens": 0,
                        "running": 4, "engine": None}}],
        "kv_backends": None,
        "prefix_index": {"predicted_tokens": 512, "hit_tokens": 512, "exact": 3, "reported": 4},
        "decisions": {"disaggregated": 3, "short-uncached": 1}}
    table = render_table(status)
    assert "policy: kv-aware; placements: disaggregated 3, short-uncached 1" in table
    prefill = [line for line in table.splitlines() if line.startswith("prefill-0")][1]
    assert "events, 7 blocks" in prefill and "321" in prefill and "kv=25%" in prefill and "512/900" in prefill
    decode = [line for line in table.splitlines() if line.startswith("decode-0")][1]
    assert "history, 3 blocks" in decode and "not reported" in decode
    assert "exact in 3 of 4 placements" in table
