"""docker-compose.yml's topology and settings, run by `baton up` (no Docker
engine runs here): the shared stack is etcd, a control plane, a router and
one prefill and one decode worker started with compose's BATON_* settings
(conftest), and each compose healthcheck, pointed at the service's address
on this host, passes; pointed at nothing, it fails."""

from __future__ import annotations

import asyncio
import subprocess

import yaml

from baton.registry import list_workers
from tests.e2e.conftest import REPO, baton_command, compose_settings


def _health(target: str) -> subprocess.CompletedProcess:
    return subprocess.run(baton_command("health", target), cwd=REPO, capture_output=True, text=True, timeout=60)


def test_the_stack_runs_with_composes_settings(stack):
    settings = compose_settings()
    assert settings["BATON_ADVERTISE_HOST"] == "auto"
    assert settings.items() <= stack.env.items()
    workers = asyncio.run(list_workers(stack.etcd_endpoint, stack.etcd_prefix))
    assert {w.role for w in workers} >= {"prefill", "decode"}
    for worker in workers:  # "auto": the address on the route to etcd
        assert worker.address.rpartition(":")[0] == "127.0.0.1", worker


def test_each_compose_healthcheck_passes_on_its_service(stack):
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    workers = asyncio.run(list_workers(stack.etcd_endpoint, stack.etcd_prefix))
    here = {"control-plane": [stack.control_plane],
            "router": [stack.http_base.removesuffix("/v1") + "/health"],
            "prefill": [w.address for w in workers if w.role == "prefill"],
            "decode": [w.address for w in workers if w.role == "decode"]}
    for name, targets in here.items():
        check = compose["services"][name]["healthcheck"]["test"]
        assert check[1:3] == ["baton", "health"]
        for target in targets:
            done = _health(target)
            assert done.returncode == 0, f"{name} at {target}: {done.stdout} {done.stderr}"
            assert "SERVING" in done.stdout or ": 200" in done.stdout
    assert _health("127.0.0.1:1").returncode == 1
    assert _health("http://127.0.0.1:1/health").returncode == 1
