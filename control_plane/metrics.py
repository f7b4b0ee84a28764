"""The control plane's Prometheus metrics, read from its state at each
scrape (so nothing is counted twice): placement decisions, live workers,
and the KV transfers it coordinated, per backend."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from control_plane.service import ControlPlaneServicer

_ENDED = ("consumed", "failed", "expired")


class ControlPlaneMetrics(Collector):
    def __init__(self, servicer: ControlPlaneServicer):
        self._servicer = servicer

    def collect(self):
        s = self._servicer
        decisions = CounterMetricFamily(
            "baton_scheduling_decisions", "Placements by policy and decision: where the prompt ran, and why "
            "(disaggregated, short-uncached, prefill-backlog, no-prefill-worker, requested, moved)",
            labels=["policy", "decision"])
        for decision, count in sorted(s.decisions.items()):
            decisions.add_metric([s.policy, decision], count)
        yield decisions

        workers = GaugeMetricFamily("baton_workers", "Registered workers by role, state (ready, draining, suspect) "
                                    "and model", labels=["role", "state", "model"])
        for (role, state, model), count in sorted(Counter(s.worker_states()).items()):
            workers.add_metric([role, state, model], count)
        yield workers

        transfers = s.transfers
        placed = CounterMetricFamily("baton_kv_transfers_placed", "KV transfers placed, by backend",
                                     labels=["backend"])
        ended = CounterMetricFamily("baton_kv_transfers", "KV transfers ended, by backend and outcome "
                                    "(consumed, failed, expired)", labels=["backend", "outcome"])
        recomputed = CounterMetricFamily("baton_kv_recomputes", "Transfers whose decode worker recomputed the "
                                         "prompt instead (the KV did not come, or was refused)", labels=["backend"])
        moved = CounterMetricFamily("baton_kv_transfer_bytes", "KV bytes decode workers loaded from transfers",
                                    labels=["backend"])
        fallbacks = CounterMetricFamily("baton_kv_backend_fallbacks", "Placements that asked for another backend "
                                        "and got this one (the pair did not offer it)", labels=["backend"])
        for backend, counts in sorted(transfers.by_backend.items()):
            placed.add_metric([backend], counts["placed"])
            for outcome in _ENDED:
                ended.add_metric([backend, outcome], counts[outcome])
            recomputed.add_metric([backend], counts["recomputed"])
            moved.add_metric([backend], counts["bytes"])
            fallbacks.add_metric([backend], counts["fallbacks"])
        yield from (placed, ended, recomputed, moved, fallbacks)
        yield GaugeMetricFamily("baton_kv_transfers_in_flight", "Placements not yet reported back",
                                value=transfers.open_count)


def control_plane_registry(servicer: ControlPlaneServicer) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(ControlPlaneMetrics(servicer))
    return registry
