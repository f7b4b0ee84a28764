"""One trace per request, the client's: a request carrying a W3C
``traceparent`` goes through the real stack (router, control plane, prefill
worker and engine, KV transfer, decode worker and engine), every service
exporting OTLP to a receiver in this process; every span lands in the
client's trace, each under the hop that caused it."""

from __future__ import annotations

import json
import secrets

import httpx
import pytest

from kv_transfer.transport import BACKENDS
from tests.e2e.conftest import wait_for
from tests.e2e.otlp_receiver import Span

SERVER, CLIENT, PRODUCER, CONSUMER = 2, 3, 4, 5  # OTLP span kinds


def traced_request(stack, content: str, trace_id: str, parent_id: str, request_id: str,
                   backend: str) -> httpx.Response:
    return httpx.post(f"{stack.http_base}/chat/completions", timeout=300, headers={
        "traceparent": f"00-{trace_id}-{parent_id}-01", "tracestate": "gateway=edge-7",
        "X-Request-Id": request_id}, json={
        "model": stack.model_name, "max_tokens": 12, "temperature": 0,
        "kv_transfer_params": {"kv_backend": backend},
        "messages": [{"role": "user", "content": content}]})


def one(spans: list[Span], name: str, service: str | None = None) -> Span:
    found = [s for s in spans if s.name == name and (service is None or s.service == service)]
    assert len(found) == 1, (name, service, [(s.service, s.name) for s in spans])
    return found[0]


def complete(spans: list[Span]) -> bool:
    """Every hop has reported: the engines export on their own schedule."""
    names = {s.name for s in spans}
    return {"POST /v1/chat/completions", "kv.send", "kv.load", "baton.v1.DecodeWorker/Decode",
            "engine.decode"} <= names


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_request_joins_the_clients_trace_at_every_hop(stack, otlp, model_path, backend):
    trace_id, parent_id, request_id = secrets.token_hex(16), secrets.token_hex(8), f"client-{secrets.token_hex(4)}"
    response = traced_request(stack, f"Name three rivers of Europe and one fact about each ({backend}).", trace_id,
                              parent_id, request_id, backend)
    assert response.status_code == 200, response.text
    assert response.headers["x-request-id"] == request_id
    loaded = response.json()["kv_transfer_params"]
    assert loaded["external_tokens"] > 0 and not loaded["recomputed"] and loaded["backend"] == backend, loaded

    spans = wait_for(lambda: (found := otlp.trace(trace_id)) and complete(found) and found, 30,
                     "the request's spans from every service")
    by_id = {s.span_id: s for s in spans}
    assert len(by_id) == len(spans), [(s.service, s.name, s.span_id) for s in spans
                                      if sum(t.span_id == s.span_id for t in spans) > 1]

    http = one(spans, "POST /v1/chat/completions", "baton-router")
    assert http.kind == SERVER and http.parent_span_id == parent_id, "the router must continue the client's trace"
    assert http.trace_state == "gateway=edge-7"
    assert http.attributes["http.response.status_code"] == 200
    assert http.attributes["baton.request_id"] == request_id
    for span in spans:  # one tree, rooted at the client's span
        assert span is http or span.parent_span_id in by_id, f"{span.service} {span.name} has no parent in the trace"
        assert span.error is None, (span.name, span.error)

    def parent(span: Span) -> Span:
        return by_id[span.parent_span_id]

    generate = one(spans, "router.generate")
    assert parent(generate) is http and request_id in generate.attributes["baton.request_id"]
    schedule = one(spans, "schedule", "baton-router")
    placed = one(spans, "baton.v1.ControlPlane/Schedule", "baton-control-plane")
    assert parent(schedule) is generate and parent(placed) is schedule and placed.kind == SERVER
    assert placed.attributes["baton.decision"] == "disaggregated"
    assert placed.attributes["baton.transfer_id"] == loaded["transfer_id"]

    prefill_call = one(spans, "prefill", "baton-router")
    prefill = one(spans, "baton.v1.PrefillWorker/Prefill", "baton-prefill-worker")
    assert parent(prefill_call) is generate and parent(prefill) is prefill_call
    assert parent(one(spans, "engine.prefill", "baton-prefill-worker")) is prefill
    assert parent(one(spans, "engine.queue", "baton-prefill-worker")) is prefill

    decode_call = one(spans, "decode", "baton-router")
    decode = one(spans, "baton.v1.DecodeWorker/Decode", "baton-decode-worker")
    assert parent(decode_call) is generate and parent(decode) is decode_call
    assert parent(one(spans, "engine.decode", "baton-decode-worker")) is decode
    assert parent(one(spans, "engine.queue", "baton-decode-worker")) is decode
    assert {"first token", "finish"} <= set(decode.event_names)

    # The transfer: sent by the prefill engine under its prefill, loaded by
    # the decode engine under its decode, the same bytes both ends.
    send = one(spans, "kv.send", "baton-prefill-engine")
    load = one(spans, "kv.load", "baton-decode-engine")
    assert send.kind == PRODUCER and parent(send) is prefill
    assert load.kind == CONSUMER and parent(load) is decode
    layers = json.loads((model_path / "config.json").read_text())["num_hidden_layers"]
    assert send.event_names.count("layer saved") == layers
    for span in (send, load):
        assert span.attributes["baton.transfer_id"] == loaded["transfer_id"]
        assert span.attributes["baton.kv.backend"] == loaded["backend"]
        assert span.attributes["baton.kv.blocks"] > 0
    assert load.attributes["baton.kv.bytes"] == loaded["bytes"] > 0, "the load span must say what decode loaded"
    if loaded["backend"] != "nixl":  # a pull: the producer offers, the consumer reads
        assert send.attributes["baton.kv.bytes"] >= loaded["bytes"]
    assert prefill.start_ns <= send.start_ns and load.end_ns <= decode.end_ns


def test_a_request_without_trace_headers_gets_a_trace_and_a_request_id(stack, otlp):
    response = httpx.post(f"{stack.http_base}/chat/completions", timeout=300, json={
        "model": stack.model_name, "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]})
    assert response.status_code == 200, response.text
    request_id = response.headers["x-request-id"]
    assert request_id
    assert request_id in response.json()["id"]
