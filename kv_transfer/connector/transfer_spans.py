"""The spans of the KV transfers an engine sends and loads, in the trace of
the request they serve (its ``traceparent`` comes with the transfer's
params). Recorded in the engine's own process, which exports them itself
(``baton.telemetry.engine_tracer``).

``kv.send`` (producer): from the prompt's first saved layer until the
backend is done with it (a push sent or failed; a pull offer announced),
an event per layer as it leaves the forward. ``kv.load`` (consumer): from
the load's start (waiting for the bytes included) until they are in the
engine's blocks, with the bytes that crossed."""

from __future__ import annotations

import torch
from opentelemetry import trace

from baton.telemetry import context_of, engine_tracer, flush_engine_tracing
from kv_transfer.connector.metadata import LoadSpec, SaveSpec
from kv_transfer.transport.base import Outbound


class TransferSpans:
    def __init__(self, service: str):
        self._service = service
        self._tracer: trace.Tracer | None = None

    def start(self) -> None:
        """Make the tracer (and its exporter) now, in the engine's process
        as it starts: made at the first transfer, it took that transfer's
        time (imports, an exporter thread) on the model or load thread."""
        if self._tracer is None:
            self._tracer = engine_tracer(self._service, "baton.kv_transfer")

    def _start(self, name: str, traceparent: str, kind: trace.SpanKind, attributes: dict) -> trace.Span:
        self.start()
        return self._tracer.start_span(name, context=context_of(traceparent), kind=kind, attributes=attributes)

    def sending(self, spec: SaveSpec, outbound: Outbound, backend: str) -> Outbound:
        span = self._start("kv.send", spec.traceparent, trace.SpanKind.PRODUCER, {
            "baton.transfer_id": spec.transfer_id, "baton.kv.backend": backend, "baton.kv.blocks": len(spec.block_ids),
            "baton.kv.tokens": spec.num_tokens, "baton.kv.target": spec.kv_target})
        return _TracedOutbound(outbound, span)

    def loading(self, spec: LoadSpec) -> trace.Span:
        return self._start("kv.load", spec.traceparent, trace.SpanKind.CONSUMER, {
            "baton.transfer_id": spec.transfer_id, "baton.kv.backend": spec.backend,
            "baton.kv.blocks": len(spec.block_ids), "baton.kv.tokens": spec.num_tokens})

    @staticmethod
    def loaded(span: trace.Span, nbytes: int) -> None:
        span.set_attribute("baton.kv.bytes", nbytes)
        span.end()

    @staticmethod
    def load_failed(span: trace.Span, error: str) -> None:
        span.set_status(trace.Status(trace.StatusCode.ERROR, f"recomputed: {error}"))
        span.end()

    def flush(self) -> None:
        if self._tracer is not None:
            flush_engine_tracing()


class _TracedOutbound:
    """An ``Outbound`` whose span ends when its backend is done with it:
    at the push's end when the backend says (``when_finished``), else when
    the forward is over."""

    def __init__(self, outbound: Outbound, span: trace.Span):
        self._outbound = outbound
        self._span = span
        self._layers = 0
        when_finished = getattr(outbound, "when_finished", None)
        self._ends_itself = when_finished is not None
        if when_finished is not None:
            when_finished(self._finished)

    def layer_saved(self, index: int, kv_layer: torch.Tensor) -> None:
        self._span.add_event("layer saved", {"baton.kv.layer": index})
        self._layers += 1
        self._outbound.layer_saved(index, kv_layer)

    def step_done(self) -> None:
        self._span.add_event("forward done", {"baton.kv.layers": self._layers})
        self._outbound.step_done()
        if not self._ends_itself:
            self._span.end()

    def _finished(self, nbytes: int, error: str) -> None:
        if nbytes:
            self._span.set_attribute("baton.kv.bytes", nbytes)
        if error:
            self._span.set_status(trace.Status(trace.StatusCode.ERROR, error))
        self._span.end()
