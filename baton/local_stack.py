"""``baton up``: etcd, control plane, router and workers on this machine,
each service its own process, started and stopped in order."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from baton.config import Settings
from baton.etcd_server import EmbeddedEtcd
from baton.model_store import default_cache_dir, resolve_model
from baton.served_models import served_models


@dataclass
class Child:
    name: str
    proc: subprocess.Popen
    log_path: Path


def _die_with_parent() -> None:
    """Runs in the child before exec: if `baton up` dies without cleaning up
    (SIGKILL), the kernel sends the service SIGTERM instead of orphaning it."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _cpu_plan(n_prefill: int, n_decode: int, cores: list[int] | None = None) -> tuple[list[str], list[str]]:
    """One core per engine (engines sharing a core set fight over it, which
    costs more than it gives). Decode engines take theirs first, from the
    last core down: where there are fewer cores than engines, prefill engines
    share the rest rather than a decode engine's core, whose tokens are what
    streams."""
    cores = sorted(os.sched_getaffinity(0)) if cores is None else cores
    decode = [cores[-1 - j % len(cores)] for j in range(n_decode)]
    left = [c for c in cores if c not in decode] or cores
    prefill = [left[i % len(left)] for i in range(n_prefill)]
    return [str(c) for c in prefill], [str(c) for c in decode]


class LocalStack:
    def __init__(self, settings: Settings, prefill: int, decode: int, log_dir: Path):
        self.settings = settings
        self.n_prefill = prefill
        self.n_decode = decode
        self.log_dir = log_dir
        self.children: list[Child] = []
        self.etcd: EmbeddedEtcd | None = None
        self.etcd_endpoint = settings.etcd_endpoint
        self.control_plane = settings.control_plane_address
        self.models = served_models(settings)

    def _spawn(self, name: str, command: list[str], env_extra: dict[str, str] | None = None) -> Child:
        log_path = self.log_dir / f"{name}.log"
        env = {**os.environ, **(env_extra or {}), "PYTHONUNBUFFERED": "1"}
        log_file = open(log_path, "ab")  # noqa: SIM115 - owned by the child for its lifetime
        proc = subprocess.Popen(
            [sys.executable, "-m", "baton.cli", *command],
            stdout=log_file, stderr=subprocess.STDOUT, env=env,
            # Own session: Ctrl-C reaches only `baton up`, which then stops
            # the services in order (router first, etcd last).
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
        child = Child(name, proc, log_path)
        self.children.append(child)
        return child

    def _common(self) -> list[str]:
        s = self.settings
        return ["--etcd", self.etcd_endpoint, "--etcd-prefix", s.etcd_prefix, "--host", s.host,
                "--control-plane", self.control_plane, "--max-model-len", str(s.max_model_len),
                "--log-level", s.log_level]

    def start(self, embedded_etcd: bool) -> None:
        if embedded_etcd:
            # etcd's usual port when free, so `baton status` finds it unasked.
            self.etcd = EmbeddedEtcd(self.settings.host, prefer_port=2379).start()
            self.etcd_endpoint = self.etcd.endpoint
        common = self._common()
        self._spawn("control-plane", ["control-plane", *common, "--policy", self.settings.policy,
                                      "--kv-backend", self.settings.kv_backend,
                                      "--disaggregation", self.settings.disaggregation])
        prefill_cores, decode_cores = _cpu_plan(self.n_prefill * len(self.models),
                                                self.n_decode * len(self.models))
        cache = ["--kv-cache-gib", str(self.settings.kv_cache_gib),
                 "--kv-cache-blocks", str(self.settings.kv_cache_blocks)]
        for m, served in enumerate(self.models):
            # The first model's workers keep the plain names (prefill-0, ...).
            prefix = "" if m == 0 else f"{_id_safe(served.name)}-"
            model = ["--served-model-name", served.name] + (["--model", served.model] if served.model else [])
            for i in range(self.n_prefill):
                name = f"{prefix}prefill-{i}"
                self._spawn(name, ["prefill-worker", *common, *model, "--worker-id", name,
                                   "--cpu-cores", prefill_cores[m * self.n_prefill + i], *cache])
            for j in range(self.n_decode):
                name = f"{prefix}decode-{j}"
                self._spawn(name, ["decode-worker", *common, *model, "--worker-id", name,
                                   "--cpu-cores", decode_cores[m * self.n_decode + j], *cache])
        router_models = ",".join(f"{s.name}={s.model}" for s in self.models)
        self._spawn("router", ["router", *common, "--models", router_models,
                               "--http-port", str(self.settings.http_port),
                               "--grpc-port", str(self.settings.router_grpc_port)])

    def wait_ready(self, timeout_s: float) -> None:
        import asyncio

        from baton.registry import list_workers

        deadline = time.monotonic() + timeout_s
        want = (self.n_prefill + self.n_decode) * len(self.models)
        health = f"http://{self.settings.host}:{self.settings.http_port}/health"
        while time.monotonic() < deadline:
            self.check_children()
            try:
                registered = len(asyncio.run(list_workers(self.etcd_endpoint, self.settings.etcd_prefix)))
                with urllib.request.urlopen(health, timeout=2) as response:
                    router_ok = response.status == 200
            except Exception:
                registered, router_ok = 0, False
            if router_ok and registered >= want:
                return
            time.sleep(1.0)
        raise RuntimeError(f"the stack was not ready within {timeout_s:.0f} s; logs in {self.log_dir}")

    def check_children(self) -> None:
        for child in self.children:
            code = child.proc.poll()
            if code is not None:
                tail = child.log_path.read_text(errors="replace").splitlines()[-25:]
                raise RuntimeError(f"{child.name} exited with code {code}; last lines of {child.log_path}:\n"
                                   + "\n".join(tail))

    def stop(self, grace_s: float | None = None) -> None:
        """Router first (no new requests), then workers, then the control
        plane, then etcd. Signals during the stop do not interrupt it."""
        previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
        if grace_s is None:  # a draining worker may take its drain time
            grace_s = self.settings.drain_timeout_s + 10
        try:
            stages = [[c for c in self.children if c.name == "router"],
                      [c for c in self.children if c.name not in ("router", "control-plane")],
                      [c for c in self.children if c.name == "control-plane"]]
            for stage in stages:
                live = [c for c in stage if c.proc.poll() is None]
                for child in live:
                    child.proc.send_signal(signal.SIGTERM)
                deadline = time.monotonic() + grace_s
                for child in live:
                    try:
                        child.proc.wait(max(0.1, deadline - time.monotonic()))
                    except subprocess.TimeoutExpired:
                        # The whole session: the engine's own subprocesses too.
                        os.killpg(child.proc.pid, signal.SIGKILL)
                        child.proc.wait()
            if self.etcd:
                self.etcd.stop()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def run_up(args: argparse.Namespace, settings: Settings) -> int:
    if args.prefill < 1 or args.decode < 1:
        raise ValueError("--prefill and --decode must be at least 1")
    from control_plane.scheduling import make_scheduler

    make_scheduler(settings.policy)  # a bad --policy or --models fails here, before anything starts
    models = served_models(settings)
    for served in models:
        resolve_model(served.model)  # convert the default model once, before any service needs it
    log_dir = Path(args.log_dir) if args.log_dir else default_cache_dir() / "runs" / time.strftime("%Y%m%d-%H%M%S")
    log_dir.mkdir(parents=True, exist_ok=True)
    stack = LocalStack(settings, args.prefill, args.decode, log_dir)
    stopping = False

    def on_signal(signum, frame):
        nonlocal stopping
        if not stopping:
            stopping = True
            raise KeyboardInterrupt

    # Both explicitly: a shell starting us in the background leaves SIGINT
    # ignored, and Python then never raises KeyboardInterrupt for Ctrl-C.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(f"baton: starting etcd, control plane, router, {args.prefill} prefill and {args.decode} decode "
          f"worker(s) per model ({', '.join(s.name for s in models)}); logs in {log_dir}", flush=True)
    try:
        stack.start(embedded_etcd=args.etcd_endpoint is None)
        stack.wait_ready(timeout_s=600)
        base = f"http://{settings.host}:{settings.http_port}/v1"
        print(f"baton: ready. OpenAI-compatible endpoint: {base}\n"
              f"baton: gRPC Inference: {settings.host}:{settings.router_grpc_port}   "
              f"etcd: {stack.etcd_endpoint}   control plane: {stack.control_plane}\n"
              f"baton: try  curl {base}/chat/completions -H 'Content-Type: application/json' "
              f"-d '{{\"model\": \"{models[0].name}\", \"messages\": "
              f"[{{\"role\": \"user\", \"content\": \"Name the capital of France.\"}}]}}'\n"
              f"baton: `baton status --etcd {stack.etcd_endpoint} --control-plane {stack.control_plane}` "
              f"lists the workers. Ctrl-C stops everything.", flush=True)
        while True:
            stack.check_children()
            time.sleep(1.0)
    except KeyboardInterrupt:
        print("\nbaton: stopping...", flush=True)
        return 0
    finally:
        stack.stop()
        print("baton: stopped.", flush=True)


def _id_safe(name: str) -> str:
    """A model name as part of a worker id (names may hold "/")."""
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name)
