"""The decode worker's KV-load metrics, served beside its engine's own
``vllm:*`` metrics (one registry, one /metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

from kv_transfer.params import LoadReport

_LOAD_SECONDS = Histogram(
    "baton_kv_load_duration_seconds",
    "From the start of a prompt's KV load (waiting for the bytes included) until they are in the engine's cache",
    ["backend"], buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
_LOADED_BYTES = Counter("baton_kv_loaded_bytes", "KV bytes loaded into this engine's cache from transfers",
                        ["backend"])
_LOADS = Counter("baton_kv_loads", "Transfers this worker's requests waited for, by how they ended: loaded, or "
                 "recomputed (the KV did not come or was refused; the engine computed the prompt)",
                 ["backend", "outcome"])


def record_load(backend: str, report: LoadReport) -> None:
    if report.failed:
        _LOADS.labels(backend, "recomputed").inc()
    elif report.external_tokens:
        _LOADS.labels(backend, "loaded").inc()
        _LOADED_BYTES.labels(backend).inc(report.bytes)
        _LOAD_SECONDS.labels(backend).observe(report.seconds)
