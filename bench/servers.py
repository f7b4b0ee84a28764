"""The two systems every benchmark compares, started for one measurement and
stopped after it: `baton up` and one plain `vllm serve` (the baseline)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from baton.model_store import DEFAULT_MODEL_NAME, ensure_default_model
from baton.rpc import free_port


def wait_http(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"{url} not healthy within {timeout_s} s")


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


@contextlib.contextmanager
def vllm_serve(log_dir: Path, max_model_len: int = 2048, kv_cache_gib: int = 2) -> Iterator[str]:
    """One `vllm serve` with Baton's model and flags; yields its base URL."""
    port = free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server",
                             "--model", str(ensure_default_model()), "--served-model-name", DEFAULT_MODEL_NAME,
                             "--enforce-eager", "--max-model-len", str(max_model_len), "--port", str(port),
                             "--disable-log-stats"],
                            stdout=open(log_dir / "vllm.log", "wb"), stderr=subprocess.STDOUT,
                            env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib)},
                            start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc, 900)
        yield f"http://127.0.0.1:{port}"
    finally:
        _stop(proc)


@contextlib.contextmanager
def baton_up(log_dir: Path, *flags: str) -> Iterator[str]:
    """`baton up` (1 prefill + 1 decode worker unless ``flags`` say more);
    yields its base URL once a real answer comes back."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "baton.cli", "up", "--http-port", str(port),
                             "--router-grpc-port", str(free_port()), "--control-plane", f"127.0.0.1:{free_port()}",
                             "--log-dir", str(log_dir), *flags],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/health", proc, 900)
        # The router answers before both workers registered: wait for a real answer.
        deadline = time.monotonic() + 600
        while httpx.post(f"{base}/v1/completions", timeout=120, json={
                "model": DEFAULT_MODEL_NAME, "prompt": "hi", "max_tokens": 2}).status_code != 200:
            if time.monotonic() > deadline:
                raise RuntimeError("baton up did not answer")
            time.sleep(2)
        yield base
    finally:
        _stop(proc)
