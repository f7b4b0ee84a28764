"""`baton up` restarts a service that dies while the stack serves, with
the same command, and kills what the dead one left in its session; one
that keeps dying stops the stack instead of looping."""

from __future__ import annotations

import os
import sys
import time

import pytest

from baton.config import Settings
from baton.local_stack import RESTARTS_PER_WINDOW, LocalStack

# A stand-in service: leaves a grandchild in its session (as a worker
# leaves its engine), records both pids, then lives until killed.
SERVICE = """
import os, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
with open(os.environ["STANDIN_PIDS"], "a") as out:
    out.write(f"{os.getpid()} {child.pid}\\n")
time.sleep(600)
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split()[2] != "Z"


def started(record, count: int) -> list[tuple[int, int]]:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        lines = record.read_text().split("\n") if record.exists() else []
        pids = [tuple(map(int, line.split())) for line in lines if line]
        if len(pids) >= count:
            return pids
        time.sleep(0.05)
    raise AssertionError(f"the service did not start {count} time(s)")


@pytest.fixture
def stack(tmp_path, monkeypatch):
    monkeypatch.setenv("STANDIN_PIDS", str(tmp_path / "pids"))
    monkeypatch.chdir(tmp_path)
    stack = LocalStack(Settings(), 1, 1, tmp_path)
    stack.launcher = [sys.executable, "-c", SERVICE]
    yield stack
    stack.stop(grace_s=2)


def test_a_service_that_dies_is_restarted_and_its_leftovers_killed(stack, tmp_path):
    record = tmp_path / "pids"
    stack._spawn("router", ["router"])
    [(first, grandchild)] = started(record, 1)
    assert stack.revive() == []  # all alive: nothing to do

    os.kill(first, 9)
    deadline = time.monotonic() + 10
    while stack.revive() == [] and time.monotonic() < deadline:
        time.sleep(0.05)
    second, _ = started(record, 2)[1]
    assert second != first and alive(second)
    deadline = time.monotonic() + 10
    while alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(grandchild), "the dead service's leftover process still runs"


def test_a_service_that_keeps_dying_stops_the_stack(stack, tmp_path):
    record = tmp_path / "pids"
    stack._spawn("control-plane", ["control-plane"])
    now = 1000.0
    for round_ in range(RESTARTS_PER_WINDOW):
        pid, _ = started(record, round_ + 1)[round_]
        stack.children[0].proc.kill()
        stack.children[0].proc.wait()
        assert stack.revive(now_s=now + round_) == ["control-plane"]
    stack.children[0].proc.kill()
    stack.children[0].proc.wait()
    with pytest.raises(RuntimeError, match="control-plane exited 6 times"):
        stack.revive(now_s=now + RESTARTS_PER_WINDOW)


def test_scaling_starts_new_workers_and_drains_the_newest_without_restarting_them(stack, tmp_path):
    stack.start(embedded_etcd=False)  # control plane, prefill-0, decode-0, router: stand-ins
    names = lambda: sorted(c.name for c in stack.children)  # noqa: E731
    assert names() == ["control-plane", "decode-0", "prefill-0", "router"]
    assert stack.scale(1, 3) == {"started": ["decode-1", "decode-2"], "draining": [], "prefill": 1, "decode": 3}
    added = {c.name: c for c in stack.children}
    assert added["decode-2"].command[added["decode-2"].command.index("--worker-id") + 1] == "decode-2"

    assert stack.scale(1, 1) == {"started": [], "draining": ["decode-1", "decode-2"], "prefill": 1, "decode": 1}
    for name in ("decode-1", "decode-2"):
        assert added[name].proc.wait(10) == -15  # SIGTERM: a worker drains on it
    assert stack.revive() == []  # drained away, not restarted
    assert names() == ["control-plane", "decode-0", "prefill-0", "router"]
    assert stack.scale(1, 2)["started"] == ["decode-1"]  # its name is free again
    with pytest.raises(ValueError):
        stack.scale(0, 1)
