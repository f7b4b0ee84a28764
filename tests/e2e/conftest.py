"""The real stack, started once per test session: embedded etcd, then
`baton up` (control plane, router, one prefill and one decode worker, each
worker a real vLLM engine), plus a plain vLLM engine for parity."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from baton.etcd_server import EmbeddedEtcd
from baton.model_store import DEFAULT_MODEL_NAME, ensure_default_model
from baton.rpc import free_port
from tests.e2e.prompts import LONG_TASKS, SHORT_QUESTIONS

REPO = Path(__file__).resolve().parents[2]
PARITY_MAX_TOKENS = 24
# Short, so the test of a transfer that never arrives does not wait long.
KV_FETCH_TIMEOUT_MS = 4000


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

    def env_flags(self) -> list[str]:
        return ["--etcd", self.etcd_endpoint, "--control-plane", self.control_plane]


def baton_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "baton.cli", *args]


@pytest.fixture(scope="session")
def model_path() -> Path:
    return ensure_default_model()


@pytest.fixture(scope="session")
def tokenizer(model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_path))


def chat_ids(tokenizer, content: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False).input_ids


@pytest.fixture(scope="session")
def parity_prompts(tokenizer) -> list[list[int]]:
    prompts = [chat_ids(tokenizer, q) for q in SHORT_QUESTIONS]
    prompts += [chat_ids(tokenizer, f"{doc}\n\n{question}") for doc, question in LONG_TASKS]
    return prompts


class ReferenceJob:
    """The plain engine runs in its own process while the stack starts."""

    def __init__(self, prompts: list[list[int]], workdir: Path):
        self._in = workdir / "reference_in.json"
        self._out = workdir / "reference_out.json"
        self._log = workdir / "reference.log"
        self._in.write_text(json.dumps({"prompts": prompts, "max_tokens": PARITY_MAX_TOKENS}))
        self._proc = subprocess.Popen(
            [sys.executable, str(REPO / "tests/e2e/reference_engine.py"), str(self._in), str(self._out)],
            stdout=open(self._log, "wb"), stderr=subprocess.STDOUT, cwd=REPO)

    def result(self, timeout_s: float = 900) -> list[list[int]]:
        code = self._proc.wait(timeout_s)
        assert code == 0, f"reference engine failed ({code}):\n" + self._log.read_text()[-3000:]
        return json.loads(self._out.read_text())

    def stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()


@pytest.fixture(scope="session")
def reference(parity_prompts, tmp_path_factory):
    job = ReferenceJob(parity_prompts, tmp_path_factory.mktemp("reference"))
    yield job
    job.stop()


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


@pytest.fixture(scope="session")
def stack(etcd, model_path, reference, tmp_path_factory) -> Stack:
    log_dir = tmp_path_factory.mktemp("stack-logs")
    http_port, grpc_port, cp_port = free_port(), free_port(), free_port()
    env = {**os.environ, "BATON_KV_FETCH_TIMEOUT_MS": str(KV_FETCH_TIMEOUT_MS)}
    proc = subprocess.Popen(
        baton_command("up", "--etcd", etcd.endpoint, "--http-port", str(http_port),
                      "--router-grpc-port", str(grpc_port), "--control-plane", f"127.0.0.1:{cp_port}",
                      "--log-dir", str(log_dir)),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env)
    lines = _read_until(proc, "baton: ready", timeout_s=900)
    if not any("baton: ready" in line for line in lines):
        proc.kill()
        pytest.fail("baton up did not become ready:\n" + "\n".join(lines[-50:]))
    yield Stack(f"http://127.0.0.1:{http_port}/v1", f"127.0.0.1:{grpc_port}", etcd.endpoint,
                f"127.0.0.1:{cp_port}", log_dir, DEFAULT_MODEL_NAME, model_path, proc)
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

    assert asyncio.run(list_workers(etcd.endpoint, "/baton/v1")) == []


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
