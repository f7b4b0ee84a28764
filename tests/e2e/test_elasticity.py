"""`baton scale` on the running shared stack: a decode worker added while
Baton serves takes traffic once registered; scaled back, it drains (out of
placement at once, its running answers finish) and leaves, and nothing is
lost on the way."""

from __future__ import annotations

import json
import subprocess
import threading

from tests.e2e.conftest import REPO, baton_command, wait_for
from tests.e2e.test_faults import MAX_TOKENS, TOPICS, stream, workers


def scale(stack, *flags: str) -> dict:
    done = subprocess.run(baton_command("scale", "--run", str(stack.log_dir), *flags), cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def streams(stack, topics) -> tuple[dict, list[threading.Thread]]:
    results: dict[str, dict] = {}
    threads = [threading.Thread(target=stream, args=(stack, topic, results)) for topic in topics]
    for thread in threads:
        thread.start()
    return results, threads


def check_complete(results: dict, topics) -> None:
    assert set(results) == set(topics)
    for topic, got in results.items():
        assert got["errors"] == [] and got["tokens"] == MAX_TOKENS, (topic, got)


def test_a_worker_scaled_in_takes_traffic_and_scaled_out_drains_losing_nothing(stack):
    before = set(workers(stack))
    grown = scale(stack, "--decode", "2")  # returns once the new worker is registered and ready
    assert grown["started"] == ["decode-1"] and grown["ready"]["decode"] == 2
    assert set(workers(stack)) == before | {"decode-1"}

    results, threads = streams(stack, TOPICS)
    wait_for(lambda: workers(stack)["decode-1"].running > 0, 60, "the new worker to take requests")
    for thread in threads:
        thread.join(300)
    check_complete(results, TOPICS)
    assert workers(stack)["decode-1"].transfers_total > 0

    # Drain it while answers stream from it.
    results, threads = streams(stack, TOPICS)
    wait_for(lambda: workers(stack)["decode-1"].running > 0, 60, "answers on the new worker")
    shrunk = scale(stack, "--decode", "1")
    assert shrunk["draining"] == ["decode-1"]
    for thread in threads:
        thread.join(300)
    check_complete(results, TOPICS)
    assert set(workers(stack)) == before
    wait_for(lambda: all(w.in_flight == 0 for w in workers(stack).values()), 30, "in-flight counts at zero")
