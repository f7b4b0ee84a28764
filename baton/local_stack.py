"""``baton up``: etcd, control plane, router and workers on this machine,
each service its own process, started and stopped in order, and restarted
when one dies while serving (as compose's ``restart: unless-stopped``)."""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from baton.config import Settings
from baton.etcd_server import EmbeddedEtcd
from baton.model_store import default_cache_dir, resolve_model
from baton.rpc import free_port
from baton.served_models import served_models
from baton.tls import Tls
from baton.tls import use as use_tls
from baton.up_control import SOCKET_FILE, ControlSocket, write_run_file

# A service that dies this often within the window is failing, not
# unlucky: the stack stops instead of restarting it forever.
RESTARTS_PER_WINDOW = 5
RESTART_WINDOW_S = 300.0


@dataclass
class Child:
    name: str
    command: list[str]
    proc: subprocess.Popen
    log_path: Path
    restarts: list[float] = field(default_factory=list)  # monotonic times
    role: str = ""  # workers: "prefill" | "decode"
    model_index: int = 0  # workers: which of the served models
    index: int = 0  # workers: N of prefill-N
    retired: bool = False  # scaled away: draining, not to be restarted


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
    launcher = [sys.executable, "-m", "baton.cli"]  # what each service's command is given to

    def __init__(self, settings: Settings, prefill: int, decode: int, log_dir: Path):
        self.settings = settings
        self.n_prefill = prefill
        self.n_decode = decode
        self.log_dir = log_dir
        self.children: list[Child] = []
        self.etcd: EmbeddedEtcd | None = None
        self.etcd_endpoint = settings.etcd_endpoint
        self.control_plane = settings.control_plane_address
        self.control_plane_metrics = f"{settings.host}:{free_port(settings.host)}"
        self.models = served_models(settings)

    def _spawn(self, name: str, command: list[str]) -> Child:
        log_path = self.log_dir / f"{name}.log"
        child = Child(name, command, self._popen(command, log_path), log_path)
        self.children.append(child)
        return child

    def _popen(self, command: list[str], log_path: Path) -> subprocess.Popen:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(log_path, "ab") as log_file:  # the child holds its own copy
            return subprocess.Popen(
                [*self.launcher, *command],
                stdout=log_file, stderr=subprocess.STDOUT, env=env,
                # Own session: Ctrl-C reaches only `baton up`, which then stops
                # the services in order (router first, etcd last).
                start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )

    def _common(self) -> list[str]:
        s = self.settings
        return ["--etcd", self.etcd_endpoint, "--etcd-prefix", s.etcd_prefix, "--host", s.host,
                "--control-plane", self.control_plane, "--max-model-len", str(s.max_model_len),
                "--log-level", s.log_level]

    def start(self, embedded_etcd: bool) -> None:
        if embedded_etcd:
            # etcd's usual port when free, so `baton status` finds it unasked.
            self.etcd = EmbeddedEtcd(self.settings.host, prefer_port=2379, tls=Tls.internal(self.settings)).start()
            self.etcd_endpoint = self.etcd.endpoint
        common = self._common()
        self._spawn("control-plane", ["control-plane", *common, "--policy", self.settings.policy,
                                      "--kv-backend", self.settings.kv_backend,
                                      "--disaggregation", self.settings.disaggregation,
                                      "--metrics-port", self.control_plane_metrics.rpartition(":")[2]])
        for m in range(len(self.models)):
            for i in range(self.n_prefill):
                self._spawn_worker("prefill", m, i)
            for j in range(self.n_decode):
                self._spawn_worker("decode", m, j)
        router_models = ",".join(f"{s.name}={s.model}" for s in self.models)
        self._spawn("router", ["router", *common, "--models", router_models,
                               "--http-port", str(self.settings.http_port),
                               "--grpc-port", str(self.settings.router_grpc_port),
                               *(["--api-keys-file", self.settings.api_keys_file] if self.settings.api_keys_file
                                 else [])])

    def _spawn_worker(self, role: str, m: int, index: int) -> Child:
        """Worker ``index`` of ``role`` for model ``m``, on its core of the
        plan for the current counts."""
        served = self.models[m]
        # The first model's workers keep the plain names (prefill-0, ...).
        name = ("" if m == 0 else f"{_id_safe(served.name)}-") + f"{role}-{index}"
        per_model = self.n_prefill if role == "prefill" else self.n_decode
        prefill_cores, decode_cores = _cpu_plan(self.n_prefill * len(self.models), self.n_decode * len(self.models))
        cores = (prefill_cores if role == "prefill" else decode_cores)[(m * per_model + index) % (
            per_model * len(self.models))]
        model = ["--served-model-name", served.name] + (["--model", served.model] if served.model else [])
        child = self._spawn(name, [f"{role}-worker", *self._common(), *model, "--worker-id", name,
                                   "--cpu-cores", cores, "--kv-cache-gib", str(self.settings.kv_cache_gib),
                                   "--kv-cache-blocks", str(self.settings.kv_cache_blocks),
                                   "--metrics-port", "0"])
        child.role, child.model_index, child.index = role, m, index
        return child

    def scale(self, prefill: int, decode: int) -> dict:
        """Add workers (they take traffic once registered) or drain the
        newest ones (SIGTERM: out of placement at once, running answers
        finish or move); per model. Returns the workers started and drained."""
        if prefill < 1 or decode < 1:
            raise ValueError("--prefill and --decode must be at least 1")
        started, draining = [], []
        self.n_prefill, self.n_decode = prefill, decode
        for role, want in (("prefill", prefill), ("decode", decode)):
            for m in range(len(self.models)):
                live = sorted((c for c in self.children if c.role == role and c.model_index == m and not c.retired),
                              key=lambda c: c.index)
                for child in live[want:]:
                    child.retired = True
                    if child.proc.poll() is None:
                        child.proc.send_signal(signal.SIGTERM)
                    draining.append(child.name)
                taken = {c.index for c in live[:want]}
                free = (i for i in itertools.count() if i not in taken and not self._named(role, m, i))
                for _ in range(want - len(live)):
                    started.append(self._spawn_worker(role, m, next(free)).name)
        print(f"baton: scaling to {prefill} prefill and {decode} decode worker(s) per model; "
              f"starting {started or 'none'}, draining {draining or 'none'}", flush=True)
        return {"started": started, "draining": draining, "prefill": prefill, "decode": decode}

    def handle(self, request: dict) -> dict:
        """A request from `baton scale` (baton.up_control)."""
        if request.get("command") == "scale":
            return self.scale(int(request.get("prefill") or self.n_prefill),
                              int(request.get("decode") or self.n_decode))
        if request.get("command") == "counts":
            return {"prefill": self.n_prefill, "decode": self.n_decode}
        raise ValueError(f"unknown request {request.get('command')!r}")

    def _named(self, role: str, m: int, index: int) -> bool:
        """Still running under that name (a drained worker not yet gone)."""
        return any(c.role == role and c.model_index == m and c.index == index for c in self.children)

    def wait_ready(self, timeout_s: float) -> None:
        import asyncio

        from baton.registry import list_workers

        deadline = time.monotonic() + timeout_s
        want = (self.n_prefill + self.n_decode) * len(self.models)
        health = f"{http_scheme(self.settings)}://{self.settings.host}:{self.settings.http_port}/health"
        # Our own child on this host: its name need not match the public certificate's.
        unverified = ssl._create_unverified_context()
        while time.monotonic() < deadline:
            self.check_children()
            try:
                registered = len(asyncio.run(list_workers(self.etcd_endpoint, self.settings.etcd_prefix)))
                with urllib.request.urlopen(health, timeout=2, context=unverified) as response:
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

    def revive(self, now_s: float | None = None) -> list[str]:
        """Restart every service that exited while the stack serves; returns
        their names. A restarted worker registers under its old id with a new
        instance, so its predecessor's transfers are failed, not reused.
        Raises RuntimeError when one keeps dying (a crash loop)."""
        now_s = time.monotonic() if now_s is None else now_s
        revived = []
        if self.etcd is not None and not self.etcd.running:
            # Same port and data: the workers' keys and leases come back with it.
            print("baton: etcd exited; restarting it", flush=True)
            self.etcd.stop(keep_data=True)
            self.etcd.start()
            revived.append("etcd")
        for child in self.children:
            code = child.proc.poll()
            if code is None:
                continue
            if child.retired:
                print(f"baton: {child.name} drained and stopped (code {code})", flush=True)
                continue
            child.restarts = [t for t in child.restarts if now_s - t < RESTART_WINDOW_S] + [now_s]
            if len(child.restarts) > RESTARTS_PER_WINDOW:
                tail = child.log_path.read_text(errors="replace").splitlines()[-25:]
                raise RuntimeError(f"{child.name} exited {len(child.restarts)} times within "
                                   f"{RESTART_WINDOW_S:.0f} s (last code {code}); last lines of {child.log_path}:\n"
                                   + "\n".join(tail))
            # What it left behind in its session (an engine process) would
            # hold the cores and memory its successor needs.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.proc.pid, signal.SIGKILL)
            print(f"baton: {child.name} exited with code {code}; restarting it", flush=True)
            child.proc = self._popen(child.command, child.log_path)
            revived.append(child.name)
        self.children = [c for c in self.children if not (c.retired and c.proc.poll() is not None)]
        return revived

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
    use_tls(Tls.internal(settings))  # for its own calls to etcd
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
    control = None
    try:
        stack.start(embedded_etcd=args.etcd_endpoint is None)
        stack.wait_ready(timeout_s=600)
        base = f"{http_scheme(settings)}://{settings.host}:{settings.http_port}/v1"
        write_run_file(log_dir, {"etcd": stack.etcd_endpoint, "etcd_prefix": settings.etcd_prefix,
                                 "control_plane": stack.control_plane, "http": base,
                                 "control_plane_metrics": f"http://{stack.control_plane_metrics}/metrics",
                                 "grpc": f"{settings.host}:{settings.router_grpc_port}",
                                 "models": [s.name for s in models]})
        control = ControlSocket(log_dir / SOCKET_FILE)
        print(f"baton: ready. OpenAI-compatible endpoint: {base}\n"
              f"baton: gRPC Inference: {settings.host}:{settings.router_grpc_port}   "
              f"etcd: {stack.etcd_endpoint}   control plane: {stack.control_plane}\n"
              f"baton: try  curl {base}/chat/completions -H 'Content-Type: application/json' "
              f"-d '{{\"model\": \"{models[0].name}\", \"messages\": "
              f"[{{\"role\": \"user\", \"content\": \"Name the capital of France.\"}}]}}'\n"
              f"baton: metrics: {base.removesuffix('/v1')}/metrics (router), "
              f"http://{stack.control_plane_metrics}/metrics (control plane), workers' in `baton status --json`\n"
              f"baton: `baton status --watch` shows the workers live; `baton scale --prefill N --decode M` "
              f"resizes. Ctrl-C stops everything.",
              flush=True)
        while True:
            stack.revive()
            control.serve_pending(stack.handle)
            time.sleep(0.2)
    except KeyboardInterrupt:
        print("\nbaton: stopping...", flush=True)
        return 0
    finally:
        if control is not None:
            control.close()
        stack.stop()
        print("baton: stopped.", flush=True)


def http_scheme(settings: Settings) -> str:
    return "https" if settings.https_cert_file else "http"


def _id_safe(name: str) -> str:
    """A model name as part of a worker id (names may hold "/")."""
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name)
