"""OpenTelemetry tracing and W3C trace-context propagation over gRPC.

The exporter follows the standard ``OTEL_TRACES_EXPORTER`` variable:
``none`` (default), ``console`` or ``otlp`` (endpoint from the usual
``OTEL_EXPORTER_OTLP_*`` variables, batching from ``OTEL_BSP_*``). Spans
are created even without an exporter, so trace ids exist and propagate to
every hop and every log line.
"""

from __future__ import annotations

import contextlib
import os
import random
import time
from collections.abc import AsyncIterator, Mapping, Sequence

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
from opentelemetry.sdk.trace.id_generator import IdGenerator

_configured = False


class _SystemRandomIds(IdGenerator):
    """Span and trace ids from the OS's randomness. The SDK's default draws
    from ``random``, which vLLM seeds alike in every engine (the model's
    seed): two engines then made the same span ids."""

    _random = random.SystemRandom()

    def generate_span_id(self) -> int:
        return self._random.getrandbits(64) or 1

    def generate_trace_id(self) -> int:
        return self._random.getrandbits(128) or 1


def _provider(service: str) -> TracerProvider:
    provider = TracerProvider(resource=Resource.create({"service.name": f"baton-{service}"}),
                              id_generator=_SystemRandomIds())
    exporter_name = os.environ.get("OTEL_TRACES_EXPORTER", "none").strip().lower()
    if exporter_name == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    elif exporter_name == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    elif exporter_name not in ("none", ""):
        raise ValueError(f"OTEL_TRACES_EXPORTER={exporter_name!r}: use none, console or otlp")
    return provider


def setup_tracing(service: str) -> None:
    global _configured
    if _configured:
        return
    _configured = True
    trace.set_tracer_provider(_provider(service))


_engine_providers: dict[int, TracerProvider] = {}


def engine_tracer(service: str, name: str) -> trace.Tracer:
    """A tracer for code inside a vLLM engine's processes (the KV
    connector). They are forked from a worker whose global provider, and
    its exporter thread, do not carry over usefully; each process gets a
    provider of its own, under its own service name."""
    provider = _engine_providers.get(os.getpid())
    if provider is None:
        provider = _engine_providers[os.getpid()] = _provider(service)
    return provider.get_tracer(name)


def flush_engine_tracing() -> None:
    provider = _engine_providers.get(os.getpid())
    if provider is not None:
        provider.force_flush(timeout_millis=2_000)


def context_of(traceparent: str) -> otel_context.Context | None:
    """The remote parent a ``traceparent`` header names (None if empty)."""
    return extract_context({"traceparent": traceparent}) if traceparent else None


def wall_ns(monotonic_s: float) -> int:
    """A ``time.monotonic()`` instant (any process on this host: vLLM's
    engine timestamps are monotonic) as span time, ns since the epoch."""
    return time.time_ns() - int((time.monotonic() - monotonic_s) * 1e9)


def record_span(tracer_: trace.Tracer, name: str, start_s: float, end_s: float,
                attributes: dict | None = None) -> None:
    """A child of the current span for an interval already over (monotonic
    seconds), such as an engine's queue wait."""
    if start_s <= 0 or end_s < start_s:
        return
    span = tracer_.start_span(name, start_time=wall_ns(start_s), attributes=attributes)
    span.end(end_time=wall_ns(end_s))


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)


def current_trace_id() -> str:
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""


def inject_headers() -> dict[str, str]:
    """W3C headers (traceparent, tracestate) of the current context."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def current_traceparent() -> str:
    """The current context's W3C ``traceparent`` ("" outside any span), to
    hand to work done elsewhere (an engine's KV transfer)."""
    return inject_headers().get("traceparent", "")


def extract_context(headers: Mapping[str, str]) -> otel_context.Context:
    return propagate.extract(dict(headers))


async def traced_stream(
    stream: AsyncIterator,
    span: trace.Span,
    parent: otel_context.Context | None = None,
    not_errors: tuple[type[BaseException], ...] = (),
) -> AsyncIterator:
    """Iterate ``stream`` with ``span`` current, ending the span at the end
    (an exception ends it in error unless one of ``not_errors``).

    The span's context is attached around each step rather than across
    yields: a stream may be closed from another context (client gone,
    cancellation), where detaching a token attached earlier fails.
    """
    ctx = trace.set_span_in_context(span, parent)
    try:
        while True:
            token = otel_context.attach(ctx)
            try:
                item = await anext(stream)
            except StopAsyncIteration:
                return
            except not_errors as exc:
                span.add_event(str(exc))
                raise
            except BaseException as exc:
                span.record_exception(exc)
                span.set_status(trace.Status(trace.StatusCode.ERROR, str(exc)))
                raise
            finally:
                otel_context.detach(token)
            yield item
    finally:
        span.end()
        await stream.aclose()


def _with_trace_metadata(metadata: Sequence[tuple[str, str]] | None) -> list[tuple[str, str]]:
    merged = list(metadata or ())
    merged.extend(inject_headers().items())
    return merged


def _traced_details(details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
    return grpc.aio.ClientCallDetails(
        method=details.method,
        timeout=details.timeout,
        metadata=grpc.aio.Metadata(*_with_trace_metadata(details.metadata)),
        credentials=details.credentials,
        wait_for_ready=details.wait_for_ready,
    )


# grpc.aio files each interceptor under the first call kind it implements
# only, so each kind needs its own class.
class _UnaryUnaryTrace(grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(_traced_details(client_call_details), request)


class _UnaryStreamTrace(grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(_traced_details(client_call_details), request)


class _StreamUnaryTrace(grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return await continuation(_traced_details(client_call_details), request_iterator)


def client_interceptors() -> list:
    """Add the caller's trace context to every outgoing call's metadata."""
    return [_UnaryUnaryTrace(), _UnaryStreamTrace(), _StreamUnaryTrace()]


class ServerTraceInterceptor(grpc.aio.ServerInterceptor):
    """Starts a server span for each call, parented by the caller's context."""

    def __init__(self, service: str):
        self._tracer = tracer(f"baton.{service}")

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        if method.startswith("/grpc.health") or method.startswith("/grpc.reflection"):
            return handler
        headers = {k: v for k, v in (handler_call_details.invocation_metadata or ()) if isinstance(v, str)}
        parent = extract_context(headers)
        span_name = method.lstrip("/")
        tracer_ = self._tracer

        if handler.unary_unary:
            inner = handler.unary_unary

            async def unary_unary(request, context):
                with tracer_.start_as_current_span(span_name, context=parent, kind=trace.SpanKind.SERVER):
                    return await inner(request, context)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary, handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_stream:
            inner_stream = handler.unary_stream

            async def unary_stream(request, context):
                span = tracer_.start_span(span_name, context=parent, kind=trace.SpanKind.SERVER)
                # aclosing: a cancelled call closes the servicer's stream now.
                async with contextlib.aclosing(traced_stream(inner_stream(request, context), span, parent)) as items:
                    async for item in items:
                        yield item

            return grpc.unary_stream_rpc_method_handler(
                unary_stream, handler.request_deserializer, handler.response_serializer
            )
        if handler.stream_unary:
            inner_su = handler.stream_unary

            async def stream_unary(request_iterator, context):
                with tracer_.start_as_current_span(span_name, context=parent, kind=trace.SpanKind.SERVER):
                    return await inner_su(request_iterator, context)

            return grpc.stream_unary_rpc_method_handler(
                stream_unary, handler.request_deserializer, handler.response_serializer
            )
        return handler
