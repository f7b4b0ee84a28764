"""The real stack, started once per test session: embedded etcd, then
`baton up` (control plane, router, one prefill and one decode worker, each
worker a real vLLM engine), plus a real `vllm serve` with the same model and
flags: the reference every parity test compares with."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import pytest

from baton.config import load_settings
from baton.device import engine_dtype
from baton.etcd_server import EmbeddedEtcd
from baton.model_store import DEFAULT_MODEL_NAME, ensure_default_model
from baton.rpc import free_port
from tests.e2e.otlp_receiver import OtlpReceiver
from tests.e2e.prompts import LONG_TASKS, SHORT_QUESTIONS

REPO = Path(__file__).resolve().parents[2]
PARITY_MAX_TOKENS = 24
# A transfer whose push never starts is given up after the short start
# timeout, long before the fetch timeout (the test of it checks which).
KV_FETCH_TIMEOUT_MS = 60_000
KV_PUSH_START_TIMEOUT_MS = 2_000


@dataclass
class Stack:
    http_base: str
    grpc_address: str
    etcd_endpoint: str
    control_plane: str
    log_dir: Path
    model_name: str
    model_path: Path
    proc: subprocess.Popen
    etcd_prefix: str = "/baton/v1"
    env: dict[str, str] = field(default_factory=dict)  # what its services run with, beyond this process's


    def env_flags(self) -> list[str]:
        return ["--etcd", self.etcd_endpoint, "--etcd-prefix", self.etcd_prefix, "--control-plane", self.control_plane]


def baton_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "baton.cli", *args]


def pytest_collection_modifyitems(items) -> None:
    """Modules with a `baton up` of their own run first, before the shared
    stack and the reference `vllm serve` start (on first use): one set of
    engines alive at a time. In float32 (see ``baton.device.engine_dtype``)
    an engine takes ~3 GB with its worker, and the shared stack, `vllm
    serve` and a two-model stack together ran 24 GB out of memory."""
    items.sort(key=lambda item: item.get_closest_marker("own_stack") is None)  # stable: file order otherwise


@pytest.fixture(scope="session")
def model_path() -> Path:
    return ensure_default_model()


@pytest.fixture(scope="session")
def tokenizer(model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_path))


def engine_torch_dtype(model_path: Path):
    """The dtype the stack's engines (and the reference `vllm serve`) run in."""
    import json

    import torch

    name = engine_dtype(load_settings().dtype)
    if name == "auto":
        name = json.loads((model_path / "config.json").read_text()).get("torch_dtype", "bfloat16")
    return getattr(torch, name)


def chat_ids(tokenizer, content: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False).input_ids


@pytest.fixture(scope="session")
def parity_prompts(tokenizer) -> list[list[int]]:
    prompts = [chat_ids(tokenizer, q) for q in SHORT_QUESTIONS]
    prompts += [chat_ids(tokenizer, f"{doc}\n\n{question}") for doc, question in LONG_TASKS]
    return prompts


class VllmServer:
    """`vllm serve` (run as a module: the CPU build's console script is
    broken), started in the background while the stack starts."""

    def __init__(self, model_path: Path, model_name: str, workdir: Path):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self._log = workdir / "vllm-serve.log"
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONUNBUFFERED": "1"}
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_path),
             "--served-model-name", model_name, "--max-model-len", "2048", "--enforce-eager",
             "--dtype", engine_dtype(load_settings().dtype),  # what Baton's engines run in
             "--host", "127.0.0.1", "--port", str(self.port)],
            stdout=open(self._log, "wb"), stderr=subprocess.STDOUT, cwd=REPO, env=env)
        self._ready = False

    def wait_ready(self, timeout_s: float = 900) -> str:
        import httpx

        deadline = time.monotonic() + timeout_s
        while not self._ready:
            if self._proc.poll() is not None:
                pytest.fail("vllm serve exited:\n" + self._log.read_text(errors="replace")[-3000:])
            try:
                self._ready = httpx.get(f"{self.base}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                pass
            if not self._ready:
                if time.monotonic() > deadline:
                    pytest.fail("vllm serve did not become healthy")
                time.sleep(1)
        return self.base

    def stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(30)
            except subprocess.TimeoutExpired:
                self._proc.kill()


@pytest.fixture(scope="session")
def vllm_serve(model_path, tmp_path_factory):
    server = VllmServer(model_path, DEFAULT_MODEL_NAME, tmp_path_factory.mktemp("vllm-serve"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def reference(vllm_serve) -> str:
    """Base URL of the ready `vllm serve`."""
    return vllm_serve.wait_ready()


@pytest.fixture(scope="session")
def etcd():
    server = EmbeddedEtcd().start()
    yield server
    server.stop()


def _read_until(proc: subprocess.Popen, marker: str, timeout_s: float) -> list[str]:
    lines: list[str] = []
    found = threading.Event()

    def pump():
        for line in proc.stdout:
            lines.append(line.rstrip())
            if marker in line:
                found.set()
        found.set()

    threading.Thread(target=pump, daemon=True).start()
    found.wait(timeout_s)
    return lines


WORKER_LABELS = "region=eu,tier=test"  # what every worker of the shared stack carries
# Settings docker-compose.yml gives by host name and fixed port: one host
# here, where `baton up` picks the addresses and ports.
COMPOSE_HOST_SPECIFIC = {"BATON_ETCD_ENDPOINT", "BATON_CONTROL_PLANE_ADDRESS", "BATON_HOST", "BATON_METRICS_PORT"}


def compose_settings() -> dict[str, str]:
    """The BATON_* settings docker-compose.yml gives every Baton service,
    but those naming its hosts and ports: the shared stack runs with them."""
    import yaml

    env = yaml.safe_load((REPO / "docker-compose.yml").read_text())["x-baton"]["environment"]
    return {k: str(v) for k, v in env.items() if k.startswith("BATON_") and k not in COMPOSE_HOST_SPECIFIC}


@contextlib.contextmanager
def baton_stack(etcd, log_dir: Path, env_extra: dict[str, str], *flags: str, prefix: str = "/baton/v1"):
    """`baton up` on ``etcd`` under ``prefix``; stopped with Ctrl-C, after
    which it must exit cleanly with every worker gone from the registry."""
    http_port, grpc_port, cp_port = free_port(), free_port(), free_port()
    env = {**os.environ, **env_extra}
    proc = subprocess.Popen(
        baton_command("up", "--etcd", etcd.endpoint, "--etcd-prefix", prefix, "--http-port", str(http_port),
                      "--router-grpc-port", str(grpc_port), "--control-plane", f"127.0.0.1:{cp_port}",
                      "--log-dir", str(log_dir), *flags),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env)
    lines = _read_until(proc, "baton: ready", timeout_s=900)
    if not any("baton: ready" in line for line in lines):
        proc.kill()
        pytest.fail("baton up did not become ready:\n" + "\n".join(lines[-50:]))
    yield Stack(f"http://127.0.0.1:{http_port}/v1", f"127.0.0.1:{grpc_port}", etcd.endpoint,
                f"127.0.0.1:{cp_port}", log_dir, DEFAULT_MODEL_NAME, ensure_default_model(), proc, prefix, env_extra)
    proc.send_signal(signal.SIGINT)  # Ctrl-C
    try:
        code = proc.wait(120)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("baton up did not stop within 120 s of Ctrl-C")
    # Stopped cleanly: exit 0, and every worker left the registry itself.
    assert code == 0, f"baton up exited with {code}"
    import asyncio

    from baton.registry import list_workers

    assert asyncio.run(list_workers(etcd.endpoint, prefix)) == []


@contextlib.contextmanager
def second_router(stack: Stack, log_path: Path, env: dict[str, str], *flags: str):
    """Another router beside the shared stack's (several routers may serve
    one cluster) with settings of its own; yields it as a Stack (its own
    HTTP and gRPC addresses, the shared stack's cluster)."""
    http_port, grpc_port = free_port(), free_port()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            baton_command("router", *stack.env_flags(), "--http-port", str(http_port), "--grpc-port", str(grpc_port),
                          *flags),
            stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, **env})
    base = f"http://127.0.0.1:{http_port}"

    def healthy() -> bool:
        assert proc.poll() is None, log_path.read_text()[-3000:]
        try:
            return httpx.get(f"{base}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(healthy, 300, f"the second router ({log_path})")
        yield Stack(f"{base}/v1", f"127.0.0.1:{grpc_port}", stack.etcd_endpoint, stack.control_plane, stack.log_dir,
                    stack.model_name, stack.model_path, proc, stack.etcd_prefix, env)
    finally:
        proc.terminate()
        proc.wait(60)


@pytest.fixture(scope="session")
def otlp():
    """Where the shared stack's services send their spans."""
    receiver = OtlpReceiver().start()
    yield receiver
    receiver.stop()


@pytest.fixture(scope="session")
def stack(etcd, model_path, vllm_serve, otlp, tmp_path_factory) -> Stack:
    # Every prompt on a prefill worker: the tests of the KV hand-over need
    # one for each request, however short (test_routing runs "auto").
    env = {**compose_settings(), "BATON_KV_FETCH_TIMEOUT_MS": str(KV_FETCH_TIMEOUT_MS),
           "BATON_KV_PUSH_START_TIMEOUT_MS": str(KV_PUSH_START_TIMEOUT_MS),
           "BATON_LABELS": WORKER_LABELS, "BATON_DISAGGREGATION": "always", **otlp.env}
    with baton_stack(etcd, tmp_path_factory.mktemp("stack-logs"), env) as running:
        yield running


@pytest.fixture
def openai_client(stack):
    from openai import OpenAI

    return OpenAI(base_url=stack.http_base, api_key="unused", timeout=120)


@pytest.fixture
def grpc_channel(stack):
    channel = grpc.insecure_channel(stack.grpc_address)
    yield channel
    channel.close()


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
