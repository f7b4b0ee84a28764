"""Bounded admission: places scale with the live decode workers, a request
past them is refused at once with a Retry-After, and a place is held until
the answer's last byte."""

from __future__ import annotations

import json

from router.admission import Admission, AdmitGenerations


def test_places_scale_with_the_live_decode_workers():
    live = [2]
    refused = []
    admission = Admission(3, lambda: live[0], on_refused=lambda: refused.append(1))
    assert [admission.enter() for _ in range(7)] == [True] * 6 + [False]
    assert refused == [1] and admission.in_flight == 6
    live[0] = 3  # a worker joined: three more places at once
    assert [admission.enter() for _ in range(4)] == [True] * 3 + [False]
    admission.leave(2.0)
    assert admission.enter()


def test_retry_after_follows_how_fast_places_free():
    admission = Admission(2, lambda: 1)
    for _ in range(50):  # answers of 8 s, two at a time: a place frees every ~4 s
        admission.enter()
        admission.leave(8.0)
    assert admission.retry_after_s() == 4
    assert Admission(256, lambda: 4).retry_after_s() == 1  # at least a second


def test_no_bound_when_turned_off():
    admission = Admission(0, lambda: 1)
    assert all(admission.enter() for _ in range(10_000))


class App:
    """Answers at once."""

    def __init__(self):
        self.calls = 0

    async def __call__(self, scope, receive, send):
        self.calls += 1
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


async def call(gate, path="/v1/chat/completions", method="POST"):
    sent = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b"{}"}

    await gate({"type": "http", "method": method, "path": path}, receive, send)
    return sent


async def test_a_generation_past_capacity_gets_openai_style_429_with_retry_after():
    app, admission = App(), Admission(1, lambda: 1)
    gate = AdmitGenerations(app, admission, clock=lambda: 0.0)
    admission.enter()  # the one place is taken
    sent = await call(gate)
    assert app.calls == 0 and sent[0]["status"] == 429
    headers = dict(sent[0]["headers"])
    assert headers[b"retry-after"] == b"1" and headers[b"content-type"] == b"application/json"
    error = json.loads(sent[1]["body"])["error"]
    assert error["code"] == 429 and "capacity" in error["message"]
    # What is not a generation passes: an overloaded router stays observable.
    assert (await call(gate, "/v1/models", "GET"))[0]["status"] == 200
    assert (await call(gate, "/tokenize"))[0]["status"] == 200
    admission.leave(1.0)
    assert (await call(gate))[0]["status"] == 200 and admission.in_flight == 0
