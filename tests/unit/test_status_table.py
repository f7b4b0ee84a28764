"""`baton status`'s table shows what `--json` holds."""

from baton.status import render_table


def test_the_table_shows_labels_counters_and_backends():
    status = {"workers": [
        {"worker_id": "decode-0", "role": "decode", "address": "127.0.0.1:1", "state": "ready", "model": "m",
         "labels": {"tier": "a", "region": "eu"},
         "transfers": {"total": 3, "consumed": 2, "failed": 1, "expired": 0, "in_flight": 0}},
        {"worker_id": "prefill-0", "role": "prefill", "address": "127.0.0.1:2", "state": "ready", "model": "m",
         "labels": {}, "transfers": None}],
        "kv_backends": {"grpc": {"placed": 3, "consumed": 2, "failed": 1, "recomputed": 1, "expired": 0,
                                 "bytes": 4096, "fallbacks": 0}}}
    table = render_table(status)
    decode, prefill = (line for line in table.splitlines() if line.startswith(("decode-0", "prefill-0")))
    assert "region=eu,tier=a" in decode and "consumed=2" in decode
    assert " - " in prefill and "control plane unreachable" in prefill
    assert "KV BACKEND" in table and "4096" in table
    assert render_table({"workers": [], "kv_backends": None}) == "no workers registered"
