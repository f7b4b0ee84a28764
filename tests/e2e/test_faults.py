"""Workers dying or draining while Baton serves, with real processes and
real signals, beside the shared stack: an extra decode worker is SIGKILLed
(with its engine), or SIGTERMed, while greedy answers stream from it. Every
stream ends complete (all its tokens, no error event) after being moved
mid-answer, new requests go elsewhere at once (not when its lease runs
out), and the counters come back to zero.

The moved answers are compared with the answers without a failure, but not
asserted equal: a move recomputes the streamed tokens' KV in a prefill, and
in bf16 that can flip a near tie later in the answer, as vLLM's own
recompute after preemption can; batching with other streams alone flips
some (measured here, 6 streams per run, moves after 1-20 tokens: 0, 0, 1,
1 and 1 answers differed in five runs). What the test
asserts is what the design guarantees: nothing lost, nothing broken."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import threading
import time

import grpc
import httpx
import pytest

from baton.v1 import control_plane_pb2, control_plane_pb2_grpc
from tests.e2e.conftest import REPO, WORKER_LABELS, baton_command, wait_for
from tests.e2e.prompts import long_document

VICTIM = "victim"
# Prompts whose greedy answers did not depend on what else the engine
# batched with them (6 rounds of 6 of 12 topics, measured here); for others
# ("an old library", "a night train") six concurrent streams change the
# answer at a near tie with no failure at all, which would hide what a
# move changes in the printed comparison.
TOPICS = ["a lighthouse keeper", "a desert caravan", "a river town", "a mountain pass", "a small robot",
          "a painter"]
MAX_TOKENS = 64


def workers(stack) -> dict[str, control_plane_pb2.WorkerStatus]:
    with grpc.insecure_channel(stack.control_plane) as channel:
        reply = control_plane_pb2_grpc.ControlPlaneStub(channel).ListWorkers(
            control_plane_pb2.ListWorkersRequest(), timeout=10)
    return {w.worker_id: w for w in reply.workers}


@contextlib.contextmanager
def extra_worker(stack, log_path, role: str = "decode", drain_timeout_s: float = 20):
    # A prefill worker on the prefill engine's core; a decode worker on
    # both, for it consumes KV from the prefill engine and, drained, hands
    # KV to the decode engine (NIXL reads stall with a producer and a
    # consumer pinned to one core: baton.local_stack).
    with open(log_path, "wb") as log:
        # Its own session: SIGKILL to the group takes its engine down with it.
        proc = subprocess.Popen(baton_command(f"{role}-worker", *stack.env_flags(), "--worker-id", VICTIM,
                                              "--cpu-cores", "0,1" if role == "decode" else "0"),
                                stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
                                env={**os.environ, **stack.env, "BATON_LABELS": WORKER_LABELS,
                                     "BATON_DRAIN_TIMEOUT_S": str(drain_timeout_s)})
    try:
        wait_for(lambda: VICTIM in workers(stack) or proc.poll() is not None, 600, f"{VICTIM} to join")
        assert proc.poll() is None, log_path.read_text()[-3000:]
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)


def body(stack, topic: str, stream: bool, content: str = "") -> dict:
    content = content or f"Tell a long story about {topic}."
    request = {"model": stack.model_name, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
               "stream": stream, "messages": [{"role": "user", "content": content}]}
    if stream:
        request["stream_options"] = {"include_usage": True}
    return request


def answer(stack, topic: str, headers: dict | None = None) -> str:
    response = httpx.post(f"{stack.http_base}/chat/completions", json=body(stack, topic, False), headers=headers,
                          timeout=300)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def stream(stack, topic: str, out: dict, content: str = "", headers: dict | None = None) -> None:
    """The streamed text, its finish reason and any error event, in ``out``."""
    text, finish, errors, tokens = [], None, [], 0
    try:
        with httpx.stream("POST", f"{stack.http_base}/chat/completions", json=body(stack, topic, True, content),
                          headers=headers, timeout=300) as response:
            for line in response.iter_lines():
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    errors.append(event["error"])
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
                for choice in event.get("choices", []):
                    text.append(choice["delta"].get("content") or "")
                    finish = choice.get("finish_reason") or finish
    except httpx.HTTPError as exc:
        errors.append(repr(exc))
    out[topic] = {"text": "".join(text), "finish_reason": finish, "errors": errors, "tokens": tokens}


def router_counter(stack, name: str) -> float:
    metrics = httpx.get(stack.http_base.removesuffix("/v1") + "/metrics", timeout=10).text
    return sum(float(line.split()[-1]) for line in metrics.splitlines() if line.startswith(name + " "))


@pytest.fixture(scope="module")
def expected(stack) -> dict[str, str]:
    """The answers without a failure."""
    return {topic: answer(stack, topic) for topic in TOPICS}


def kill_engine(worker: subprocess.Popen) -> None:
    """SIGKILL a worker's engine (its model process), as the kernel's OOM
    killer does, and leave the worker process alone."""
    import psutil

    (engine,) = [p for p in psutil.Process(worker.pid).children(recursive=True) if p.name() == "VLLM::Worker"]
    engine.send_signal(signal.SIGKILL)


def retried_and_done(spans) -> bool:
    """A trace whose prefill failed once, with every hop after reported."""
    prefills = [s for s in spans if s.name == "prefill" and s.service == "baton-router"]
    names = {s.name for s in spans}
    return len(prefills) == 2 and {"POST /v1/chat/completions", "baton.v1.DecodeWorker/Decode"} <= names and (
        "kv.load" in names or not any(s.name == "baton.v1.PrefillWorker/Prefill" for s in spans))


def check_retry_trace(spans) -> None:
    """One tree under the client's span: the failed prefill on the victim,
    the second placement avoiding it, then prefill (or the decode worker
    alone), KV and decode as on any request."""
    by_id = {s.span_id: s for s in spans}
    (http,) = [s for s in spans if s.name == "POST /v1/chat/completions"]
    for span in spans:
        assert span is http or span.parent_span_id in by_id, f"{span.service} {span.name} has no parent in the trace"
    first, second = sorted((s for s in spans if s.name == "prefill" and s.service == "baton-router"),
                           key=lambda s: s.start_ns)
    assert first.attributes["baton.worker_id"] == VICTIM and first.error, first
    schedules = sorted((s for s in spans if s.name == "schedule"), key=lambda s: s.start_ns)
    assert len(schedules) == 2 and schedules[1].attributes["baton.avoid_workers"] == [VICTIM], schedules
    assert second.start_ns > schedules[1].start_ns and second.error is None
    assert schedules[1].attributes["baton.prefill_worker"] != VICTIM
    decode = [s for s in spans if s.name == "baton.v1.DecodeWorker/Decode"]
    assert decode and all(s.error is None for s in decode)


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL", "engine killed"])
def test_a_decode_worker_that_dies_or_drains_mid_answer_loses_nothing(stack, expected, how, tmp_path):
    # SIGTERM: a drain far shorter than what is left of these answers, so
    # what is running then is moved. Engine killed: the worker's engine is
    # dead, the worker serves no more and leaves on its own.
    with extra_worker(stack, tmp_path / f"{VICTIM}.log", drain_timeout_s=0.3) as victim:
        # Drained, the answers move with their KV (hand-offs); killed, by
        # recomputing (moves).
        counter = "baton_decode_handoffs_total" if how == "SIGTERM" else "baton_decode_moves_total"
        moves_before = router_counter(stack, counter)
        results: dict[str, dict] = {}
        threads = [threading.Thread(target=stream, args=(stack, topic, results)) for topic in TOPICS]
        for thread in threads:
            thread.start()
        # Once its engine is decoding some of them (and, to be killed, has
        # streamed a while).
        wait_for(lambda: workers(stack)[VICTIM].engine.running > 0, 120, f"{VICTIM} to decode", interval_s=0.1)
        if how == "SIGKILL":
            time.sleep(1.0)
            os.killpg(victim.pid, signal.SIGKILL)
        elif how == "engine killed":
            time.sleep(1.0)
            kill_engine(victim)
        else:
            victim.send_signal(signal.SIGTERM)
        after_kill = [answer(stack, topic) for topic in TOPICS[:2]]
        for thread in threads:
            thread.join(300)
        if how == "SIGTERM":
            assert victim.wait(60) == 0, "a drained worker exits cleanly"
        elif how == "engine killed":
            assert victim.wait(60) != 0, "a worker without its engine leaves, for its supervisor to restart it"
    check_nothing_lost(stack, expected, results, after_kill, counter, moves_before)


def check_nothing_lost(stack, expected, results, after_kill, counter, moves_before):
    # New requests sent right after went elsewhere, without an error (answer() checks the status).
    assert all(after_kill)
    for topic in TOPICS:
        got = results[topic]
        assert got["errors"] == [] and got["finish_reason"] == "length", (topic, got)
        assert got["tokens"] == MAX_TOKENS and got["text"], (topic, got)
    same = sum(results[t]["text"] == expected[t] for t in TOPICS)
    print(f"{same} of {len(TOPICS)} answers equal to the answers without a failure")
    assert router_counter(stack, counter) > moves_before, f"nothing was moved ({counter})"
    # Gone from the registry when its lease ran out; nothing left in flight.
    wait_for(lambda: VICTIM not in workers(stack), 30, f"{VICTIM} to leave the registry")
    wait_for(lambda: all(w.in_flight == 0 and w.running == 0 for w in workers(stack).values()), 30,
             "in-flight counts back to zero")


def test_a_prefill_worker_killed_while_prefilling_loses_nothing(stack, otlp, tmp_path):
    """Long prompts, so some are on the victim's engine when it dies: they
    are placed again (the other prefill worker, or their decode worker),
    and each one's trace shows it."""
    documents = [f"Summarize this report.\n\n{long_document(900 + i, 90)}" for i in range(4)]
    with extra_worker(stack, tmp_path / f"{VICTIM}.log", role="prefill") as victim:
        retries_before = router_counter(stack, "baton_prefill_retries_total")
        results: dict[str, dict] = {}
        requests = {f"doc{i}": text for i, text in enumerate(documents)}
        traces = {name: secrets.token_hex(16) for name in requests}

        def run(name: str) -> None:
            stream(stack, name, results, content=requests[name],
                   headers={"traceparent": f"00-{traces[name]}-{secrets.token_hex(8)}-01"})

        threads = [threading.Thread(target=run, args=(name,)) for name in requests]
        for thread in threads:
            thread.start()
        wait_for(lambda: workers(stack)[VICTIM].queued_prefill_tokens > 0, 120, f"{VICTIM} to prefill",
                 interval_s=0.05)
        os.killpg(victim.pid, signal.SIGKILL)
        for thread in threads:
            thread.join(300)
    for name in requests:
        got = results[name]
        assert got["errors"] == [] and got["finish_reason"] == "length", (name, got)
        assert got["tokens"] == MAX_TOKENS, (name, got)
    assert router_counter(stack, "baton_prefill_retries_total") > retries_before, "no prefill was placed again"
    retried = wait_for(lambda: [spans for trace_id in traces.values() if retried_and_done(spans := otlp.trace(trace_id))],
                       30, "the trace of a request placed again")
    for spans in retried:
        check_retry_trace(spans)
    wait_for(lambda: VICTIM not in workers(stack), 30, f"{VICTIM} to leave the registry")
    wait_for(lambda: all(w.in_flight == 0 and w.queued_prefill_tokens == 0 for w in workers(stack).values()), 30,
             "in-flight counts back to zero")
