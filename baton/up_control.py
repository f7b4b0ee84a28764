"""How `baton scale` reaches a running `baton up`: it records where it runs
(``up.json`` in its log folder, and the latest run's in the cache folder)
and listens on a Unix socket there for one JSON request per connection.
Requests are carried out on `baton up`'s own loop, which owns the
processes; the socket thread only passes them over and waits."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import socket
import threading
from collections.abc import Callable
from pathlib import Path

from baton.model_store import default_cache_dir

RUN_FILE = "up.json"
SOCKET_FILE = "control.sock"


def latest_run_file() -> Path:
    return default_cache_dir() / RUN_FILE


def write_run_file(log_dir: Path, info: dict) -> None:
    text = json.dumps({**info, "pid": os.getpid(), "log_dir": str(log_dir),
                       "control_socket": str(log_dir / SOCKET_FILE)}, indent=2)
    (log_dir / RUN_FILE).write_text(text)
    latest = latest_run_file()
    latest.parent.mkdir(parents=True, exist_ok=True)
    latest.write_text(text)


def read_run_file(run_dir: str | None) -> dict:
    """The run in ``run_dir`` (a `baton up` log folder), else the latest."""
    path = Path(run_dir) / RUN_FILE if run_dir else latest_run_file()
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        raise RuntimeError(f"no `baton up` recorded at {path}; is one running?") from None
    with contextlib.suppress(ProcessLookupError):
        os.kill(info["pid"], 0)
        return info
    raise RuntimeError(f"the `baton up` recorded at {path} (pid {info['pid']}) is not running")


class ControlSocket:
    """Accepts requests on a thread; ``serve_pending(handle)`` answers them
    on the caller's thread."""

    def __init__(self, path: Path):
        self._path = path
        self._pending: queue.Queue[tuple[dict, queue.Queue]] = queue.Queue()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(str(path))
        os.chmod(path, 0o600)  # only its owner may scale the stack
        self._server.listen(4)
        threading.Thread(target=self._accept, name="up-control", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return  # closed
            with conn:
                try:
                    request = json.loads(conn.makefile("r").readline())
                    reply: queue.Queue = queue.Queue(1)
                    self._pending.put((request, reply))
                    answer = reply.get(timeout=60)
                except Exception as exc:
                    answer = {"error": str(exc)}
                with contextlib.suppress(OSError):
                    conn.sendall(json.dumps(answer).encode() + b"\n")

    def serve_pending(self, handle: Callable[[dict], dict]) -> None:
        while True:
            try:
                request, reply = self._pending.get_nowait()
            except queue.Empty:
                return
            try:
                reply.put(handle(request))
            except (ValueError, RuntimeError) as exc:
                reply.put({"error": str(exc)})

    def close(self) -> None:
        self._server.close()
        with contextlib.suppress(FileNotFoundError):
            self._path.unlink()


def send(path: str, request: dict, timeout_s: float = 90) -> dict:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        sock.connect(path)
        sock.sendall(json.dumps(request).encode() + b"\n")
        answer = json.loads(sock.makefile("r").readline())
    if "error" in answer:
        raise RuntimeError(answer["error"])
    return answer


def scale(run_dir: str | None, prefill: int | None, decode: int | None, wait_s: float) -> dict:
    """`baton scale`: ask the running `baton up` for these counts; with
    ``wait_s`` > 0, return once the registry shows them (new workers ready,
    drained ones gone)."""
    import asyncio
    import time

    from baton.registry import list_workers

    info = read_run_file(run_dir)
    reply = send(info["control_socket"], {"command": "scale", "prefill": prefill, "decode": decode})
    if wait_s <= 0:
        return reply
    deadline = time.monotonic() + wait_s
    want = {"prefill": reply["prefill"] * len(info["models"]), "decode": reply["decode"] * len(info["models"])}
    while True:
        try:
            workers = asyncio.run(list_workers(info["etcd"], info["etcd_prefix"]))
        except Exception:
            workers = None  # etcd busy or away: ask again
        if workers is not None:
            ready = {role: sum(w.role == role and w.state == "ready" for w in workers) for role in want}
            left = not any(w.worker_id in reply["draining"] for w in workers)
            if ready == want and left:
                return {**reply, "ready": ready}
        if time.monotonic() > deadline:
            raise RuntimeError(f"not scaled within {wait_s:.0f} s: want {want}, registry shows "
                               f"{ready if workers is not None else 'nothing (etcd unreachable)'}")
        time.sleep(1.0)
