"""kv-aware scheduling on real engines: two prefill workers (one started
beside `baton up`, with other labels and without KV events) and one decode
worker, the control plane deciding where each prompt runs ("auto")."""

from __future__ import annotations

import os
import signal
import subprocess
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.e2e.conftest import REPO, baton_command, baton_stack, wait_for
from tests.e2e.prompts import CAPITAL_QUESTION, long_document
from tests.e2e.test_registry_and_status import status, status_json

pytestmark = pytest.mark.own_stack

PREFIX = "/baton/routing"


@pytest.fixture(scope="module")
def routing(etcd, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("routing-logs")
    with baton_stack(etcd, log_dir, {"BATON_LABELS": "zone=b"}, prefix=PREFIX) as stack:
        log = open(log_dir / "prefill-a.log", "wb")
        # An engine that publishes no KV events: its prefixes are learned from
        # routing. It shares prefill-0's core, not the decode engine's (see
        # baton.local_stack._cpu_plan).
        extra = subprocess.Popen(baton_command("prefill-worker", *stack.env_flags(), "--worker-id", "prefill-a",
                                               "--labels", "zone=a", "--cpu-cores", "0"),
                                 stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                 env={**os.environ, "BATON_KV_EVENTS": "false"})
        try:
            wait_for(lambda: "prefill-a" in status(stack) or extra.poll() is not None, 600, "prefill-a to join")
            assert extra.poll() is None, (log_dir / "prefill-a.log").read_text()[-3000:]
            yield stack
        finally:
            extra.send_signal(signal.SIGTERM)
            extra.wait(60)


def chat(stack, content: str, max_tokens: int = 4, remote_prefill: bool | None = None, **headers) -> dict:
    body = {"model": stack.model_name, "max_tokens": max_tokens, "temperature": 0,
            "messages": [{"role": "user", "content": content}]}
    if remote_prefill is not None:  # vLLM's own field: where the prompt runs
        body["kv_transfer_params"] = {"do_remote_prefill": remote_prefill}
    response = httpx.post(f"{stack.http_base}/chat/completions", timeout=300, headers=headers, json=body)
    assert response.status_code == 200, response.text
    return response.json()


def served(stack) -> dict[str, int]:
    """Placements per prefill worker so far."""
    return {worker_id: row["transfers"]["total"] for worker_id, row in status(stack).items()
            if row["role"] == "prefill"}


def decisions(stack) -> dict[str, int]:
    return status_json(stack)["decisions"] or {}


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after.get(k, 0) - before.get(k, 0) for k in after if after.get(k, 0) != before.get(k, 0)}


# The decode worker holds every prefix it loaded, so "auto" would prefill
# these short suffixes there: the tests of prefill placement ask for a
# prefill worker.
def test_requests_sharing_a_prefix_go_where_it_is_cached(routing):
    document = long_document(21, 50)
    before = served(routing)
    chat(routing, f"{document}\n\nWhat is item 3 about?", remote_prefill=True)
    first = delta(served(routing), before)
    assert sum(first.values()) == 1, first
    (holder,) = first
    for question in ("What is item 7 about?", "What is item 9 about?", "How many items are there?"):
        before = served(routing)
        chat(routing, f"{document}\n\n{question}", remote_prefill=True)
        assert delta(served(routing), before) == {holder: 1}


def on_prefill_a(routing, seeds) -> str:
    """A document prefill-a computed (equal workers take turns: one of two lands there)."""
    for seed in seeds:
        document = long_document(seed, 40)
        before = served(routing)
        chat(routing, f"{document}\n\nWhat is item 1 about?", remote_prefill=True)
        if delta(served(routing), before) == {"prefill-a": 1}:
            return document
    pytest.fail("no document landed on prefill-a")


def test_a_worker_without_kv_events_is_indexed_from_routing_history(routing):
    rows = status(routing)
    assert rows["prefill-0"]["scheduling"]["prefix_source"] == "events"
    assert rows["prefill-a"]["scheduling"]["prefix_source"] == "history"
    document = on_prefill_a(routing, (31, 32, 33))
    assert status(routing)["prefill-a"]["scheduling"]["cached_blocks"] >= 5
    for question in ("What is item 2 about?", "What is item 6 about?"):
        before = served(routing)
        chat(routing, f"{document}\n\n{question}", remote_prefill=True)
        assert delta(served(routing), before) == {"prefill-a": 1}


def test_a_hot_prefix_does_not_herd_onto_one_worker(routing):
    """A burst sharing a long prefix: the worker holding it takes requests
    only while its queue is shorter than what the prefix saves."""
    document = long_document(22, 30)  # ~450 tokens
    chat(routing, f"{document}\n\nSay hello.", remote_prefill=True)  # one worker now holds the prefix
    before = served(routing)
    # Each with ~300 tokens of its own after the shared part.
    prompts = [f"{document}\n\nNotes: {long_document(100 + i, 20)}\n\nWhat is note 3 about?" for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda p: chat(routing, p, remote_prefill=True), prompts))
    assert all(a["choices"][0]["finish_reason"] == "length" for a in answers)
    burst = delta(served(routing), before)
    assert sum(burst.values()) == 8
    assert len(burst) == 2 and min(burst.values()) >= 2, f"the burst herded: {burst}"


def test_a_request_is_never_placed_outside_its_required_labels(routing):
    document = on_prefill_a(routing, (23, 24, 25))
    # zone=b: only prefill-0 and decode-0 carry it, though prefill-a holds the prefix.
    for question in ("What is item 2 about?", "What is item 4 about?"):
        before = served(routing)
        chat(routing, f"{document}\n\n{question}", remote_prefill=True, **{"x-baton-require": "zone=b"})
        assert delta(served(routing), before) == {"prefill-0": 1}
    # zone=a: no decode worker carries it; nothing runs, a clear 400.
    response = httpx.post(f"{routing.http_base}/chat/completions", timeout=60,
                          headers={"x-baton-require": "zone=a"},
                          json={"model": routing.model_name, "max_tokens": 4, "messages": [
                              {"role": "user", "content": f"{document}\n\nWhat is item 5 about?"}]})
    assert response.status_code == 400 and "zone=a" in response.json()["error"]["message"]


def test_a_short_uncached_prompt_skips_the_prefill_worker(routing):
    before, decided = served(routing), decisions(routing)
    reply = chat(routing, CAPITAL_QUESTION, max_tokens=16)
    assert "Paris" in reply["choices"][0]["message"]["content"]
    assert delta(served(routing), before) == {}
    assert delta(decisions(routing), decided) == {"short-uncached": 1}
    assert not reply.get("kv_transfer_params"), "nothing moved"


def test_a_prefill_heavy_burst_does_not_leave_decode_idle(routing):
    """Long prompts arriving together back up both prefill workers: the
    control plane lets the decode worker, which has room, prefill some."""
    decided = decisions(routing)
    prompts = [f"{long_document(200 + i, 45)}\n\nSummarize it." for i in range(10)]
    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(lambda p: chat(routing, p, max_tokens=8), prompts))
    assert all(a["choices"][0]["finish_reason"] in ("length", "stop") for a in answers)
    made = delta(decisions(routing), decided)
    assert made.get("prefill-backlog", 0) >= 1 and made.get("disaggregated", 0) >= 2, made
    assert sum(made.values()) == len(prompts)
