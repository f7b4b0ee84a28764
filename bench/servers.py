"""The systems the benchmarks compare, started for one measurement and
stopped after it: `baton up`, one plain `vllm serve` (the baseline) and
vLLM's own prefill/decode disaggregation (two `vllm serve` with the
NixlConnector behind bench/vllm_pd_proxy.py)."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from baton.config import load_settings
from baton.device import engine_dtype, engine_environment
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


def _start_vllm(port: int, log_path: Path, max_model_len: int, env: dict[str, str],
                *flags: str) -> subprocess.Popen:
    """One `vllm serve` (its API server module: the CPU build's console
    script is broken) with Baton's model and flags."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server",
                             "--model", str(ensure_default_model()), "--served-model-name", DEFAULT_MODEL_NAME,
                             "--enforce-eager", "--max-model-len", str(max_model_len), "--port", str(port),
                             "--disable-log-stats", "--dtype", engine_dtype(load_settings().dtype), *flags],
                            stdout=open(log_path, "wb"), stderr=subprocess.STDOUT,
                            env={**os.environ, **env}, start_new_session=True)


@contextlib.contextmanager
def vllm_serve(log_dir: Path, max_model_len: int = 2048, kv_cache_gib: int = 2) -> Iterator[str]:
    """One `vllm serve` with Baton's model and flags; yields its base URL."""
    port = free_port()
    proc = _start_vllm(port, log_dir / "vllm.log", max_model_len, {"VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib)})
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc, 900)
        yield f"http://127.0.0.1:{port}"
    finally:
        _stop(proc)


# vLLM's NIXL P/D on CPU: the KV cache lives in host memory, so the buffer
# NIXL registers and reads is that cache itself (DRAM, UCX backend).
NIXL_KV_TRANSFER_CONFIG = {"kv_connector": "NixlConnector", "kv_role": "kv_both", "kv_buffer_device": "cpu"}


def _wait_chat(base: str, procs: list[subprocess.Popen], timeout_s: float) -> None:
    """Until a chat completion comes back whole: /health answers before the
    two engines have ever exchanged KV."""
    deadline = time.monotonic() + timeout_s
    while True:
        if any(p.poll() is not None for p in procs):
            raise RuntimeError("a process of the vLLM P/D pair exited")
        try:
            if httpx.post(f"{base}/v1/chat/completions", timeout=120, json={
                    "model": DEFAULT_MODEL_NAME, "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 2}).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("the vLLM P/D pair did not answer")
        time.sleep(2)


def _ports_outside_ephemeral_range(count: int) -> list[int]:
    """Free ports the kernel never hands out by itself: a free ephemeral
    port can be taken by any connecting socket before the engine, a minute
    later, binds it (its NIXL handshake listener then fails and the engine
    hangs in start-up)."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports: list[int] = []
    for port in random.sample(range(max(1024, low - 8192), low), 256):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        ports.append(port)
        if len(ports) == count:
            return ports
    raise RuntimeError("no free port below the ephemeral range")


@contextlib.contextmanager
def vllm_pd(log_dir: Path, max_model_len: int = 2048, kv_cache_gib: int = 1) -> Iterator[str]:
    """vLLM's own prefill/decode disaggregation: a prefill and a decode
    `vllm serve`, NixlConnector between them, one core each (as Baton's two
    workers, with as much KV cache each and the same short busy poll of
    their queues), behind bench/vllm_pd_proxy.py;
    yields the proxy's base URL once a real answer comes back through it."""
    cores = sorted(os.sched_getaffinity(0))
    side_channel_ports = _ports_outside_ephemeral_range(2)
    procs: list[subprocess.Popen] = []
    try:
        engines = []
        for i, role in enumerate(("prefill", "decode")):
            port = free_port()
            # Each engine's NIXL agent answers handshakes on its own side
            # channel. The core is only where the engine starts: vLLM's NIXL
            # worker then moves the thread that runs the model to the last
            # core of its NUMA node: with one node, the same core for both.
            env = {**engine_environment(str(cores[i % len(cores)]), kv_cache_gib),
                   "VLLM_NIXL_SIDE_CHANNEL_HOST": "127.0.0.1",
                   "VLLM_NIXL_SIDE_CHANNEL_PORT": str(side_channel_ports[i])}
            procs.append(_start_vllm(port, log_dir / f"vllm-{role}.log", max_model_len, env,
                                     "--kv-transfer-config", json.dumps(NIXL_KV_TRANSFER_CONFIG)))
            engines.append(f"http://127.0.0.1:{port}")
        for engine, proc in zip(engines, procs, strict=True):
            wait_http(f"{engine}/health", proc, 900)
        port = free_port()
        procs.append(subprocess.Popen([sys.executable, "-m", "bench.vllm_pd_proxy", "--port", str(port),
                                       "--prefill", engines[0], "--decode", engines[1]],
                                      stdout=open(log_dir / "vllm-pd-proxy.log", "wb"), stderr=subprocess.STDOUT,
                                      cwd=Path(__file__).resolve().parent.parent, start_new_session=True))
        base = f"http://127.0.0.1:{port}"
        _wait_chat(base, procs, 600)
        yield base
    finally:
        for proc in reversed(procs):
            _stop(proc)


@contextlib.contextmanager
def baton_up(log_dir: Path, *flags: str, control_plane: str = "", env: dict[str, str] | None = None
             ) -> Iterator[str]:
    """`baton up` (1 prefill + 1 decode worker unless ``flags`` say more;
    its control plane at ``control_plane``, or any free port; ``env`` added
    to every service's environment); yields its base URL once a real answer
    comes back."""
    port = free_port()
    control_plane = control_plane or f"127.0.0.1:{free_port()}"
    proc = subprocess.Popen([sys.executable, "-m", "baton.cli", "up", "--http-port", str(port),
                             "--router-grpc-port", str(free_port()), "--control-plane", control_plane,
                             "--log-dir", str(log_dir), *flags],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, **(env or {})})
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
