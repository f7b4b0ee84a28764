"""Soak: many concurrent streaming clients for minutes while workers die
and replacements join; does every request end in a complete answer?

    python -m bench.soak [--clients 32] [--seconds 180]

Topology: `baton up` (1 prefill + 1 decode worker) plus one more prefill
and one more decode worker started beside it, so 2 + 2. Every client
loops (bounded in count and time, loopback only): a greedy streamed chat,
then the next. Meanwhile the extra decode worker is SIGKILLed (with its
engine), a replacement started; then the extra prefill worker likewise.
Each request ends as one of: completed (all its tokens and a finish
reason), failed_with_error (an HTTP error or an error event: the client
knows), lost (neither: the worst outcome). Writes
bench/results/soak.json (`sent`, `completed`, `failed_with_error`, `lost`,
`migrated`, `retried`, `p99_ttft_s`, the events) and soak.png. Goal:
`lost` = 0 and `failed_with_error` = 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from baton.etcd_server import EmbeddedEtcd
from baton.model_store import DEFAULT_MODEL_NAME
from baton.rpc import free_port
from bench.serve import RESULTS
from bench.servers import baton_up
from tests.e2e.prompts import SHORT_QUESTIONS, long_document

REPO = Path(__file__).resolve().parent.parent
MAX_TOKENS = 32


def start_worker(role: str, worker_id: str, core: str, etcd: str, control_plane: str, log_dir: Path):
    log = open(log_dir / f"{worker_id}.log", "wb")  # noqa: SIM115 - the worker's for its lifetime
    # Its own session, so SIGKILL to the group takes its engine too.
    return subprocess.Popen([sys.executable, "-m", "baton.cli", f"{role}-worker", "--etcd", etcd,
                             "--control-plane", control_plane, "--worker-id", worker_id, "--cpu-cores", core],
                            stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)


def prompt(i: int) -> list[dict]:
    """Short questions and ~600-token documents, mixed."""
    if i % 3 == 2:
        content = f"Summarize this report in one sentence.\n\n{long_document(i, 40)}"
    else:
        content = f"{SHORT_QUESTIONS[i % len(SHORT_QUESTIONS)]} (request {i})"
    return [{"role": "user", "content": content}]


async def one_request(client: httpx.AsyncClient, base: str, i: int) -> dict:
    body = {"model": DEFAULT_MODEL_NAME, "messages": prompt(i), "max_tokens": MAX_TOKENS, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    started = time.monotonic()
    first = None
    finish = None
    tokens = 0
    try:
        async with client.stream("POST", f"{base}/chat/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                return {"outcome": "failed_with_error", "error": f"HTTP {response.status_code}: {response.text[:200]}",
                        "started": started}
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return {"outcome": "failed_with_error", "error": str(chunk["error"])[:200], "started": started}
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                for choice in chunk.get("choices", []):
                    first = first or time.monotonic()
                    finish = choice.get("finish_reason") or finish
    except httpx.HTTPError as exc:
        return {"outcome": "failed_with_error", "error": repr(exc)[:200], "started": started}
    if finish is None or tokens != MAX_TOKENS:
        return {"outcome": "lost", "tokens": tokens, "finish": finish, "started": started}
    return {"outcome": "completed", "ttft_s": first - started, "started": started, "ended": time.monotonic()}


async def client_loop(base: str, index: int, clients: int, deadline: float, results: list, max_requests: int):
    async with httpx.AsyncClient(timeout=300) as client:
        for n in range(max_requests):
            if time.monotonic() >= deadline:
                return
            results.append(await one_request(client, base, n * clients + index))


def placements(control_plane: str) -> dict[str, int]:
    """Per live worker, requests the control plane placed on it."""
    import grpc

    from baton.v1 import control_plane_pb2, control_plane_pb2_grpc

    with grpc.insecure_channel(control_plane) as channel:
        reply = control_plane_pb2_grpc.ControlPlaneStub(channel).ListWorkers(
            control_plane_pb2.ListWorkersRequest(), timeout=10)
    return {w.worker_id: w.transfers_total for w in reply.workers}


def counter(base: str, name: str) -> float:
    text = httpx.get(base.removesuffix("/v1") + "/metrics", timeout=10).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


def wait_registered(etcd: str, worker_id: str, proc: subprocess.Popen, timeout_s: float) -> None:
    from baton.registry import list_workers

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        if any(w.worker_id == worker_id for w in asyncio.run(list_workers(etcd, "/baton/v1"))):
            return
        time.sleep(1)
    raise RuntimeError(f"{worker_id} did not join")


async def chaos(etcd: str, control_plane: str, log_dir: Path, workers: dict, events: list, t0: float,
                seconds: float) -> None:
    """Kill the extra decode worker, start a replacement; then the extra prefill worker."""
    # Early enough that each replacement (an engine start under full load:
    # about two minutes here) serves before the end.
    plan = [(0.1, "decode", "decode-x", "decode-y", "1"), (0.4, "prefill", "prefill-x", "prefill-y", "0")]
    for at, role, victim, replacement, core in plan:
        await asyncio.sleep(max(0.0, t0 + at * seconds - time.monotonic()))
        os.killpg(workers[victim].pid, signal.SIGKILL)
        events.append({"t_s": round(time.monotonic() - t0, 1), "event": f"SIGKILL {victim}"})
        await asyncio.sleep(5)
        workers[replacement] = start_worker(role, replacement, core, etcd, control_plane, log_dir)
        events.append({"t_s": round(time.monotonic() - t0, 1), "event": f"start {replacement}"})


async def soak(base: str, etcd: str, control_plane: str, log_dir: Path, workers: dict, args) -> dict:
    results: list[dict] = []
    events: list[dict] = []
    migrated0, retried0 = counter(base, "baton_decode_moves_total"), counter(base, "baton_prefill_retries_total")
    t0 = time.monotonic()
    deadline = t0 + args.seconds
    chaos_task = asyncio.create_task(chaos(etcd, control_plane, log_dir, workers, events, t0, args.seconds))
    await asyncio.gather(*(client_loop(base, i, args.clients, deadline, results, args.max_requests_per_client)
                           for i in range(args.clients)))
    await chaos_task
    outcomes = {k: sum(r["outcome"] == k for r in results) for k in ("completed", "failed_with_error", "lost")}
    ttfts = sorted(r["ttft_s"] for r in results if r["outcome"] == "completed")
    return {
        "sent": len(results), **outcomes,
        "migrated": counter(base, "baton_decode_moves_total") - migrated0,
        "retried": counter(base, "baton_prefill_retries_total") - retried0,
        "p99_ttft_s": ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))] if ttfts else None,
        "ttft_p50_s": statistics.median(ttfts) if ttfts else None,
        "wall_s": round(time.monotonic() - t0, 1),
        "placements_by_worker": placements(control_plane),
        "events": events,
        "errors": [r["error"] for r in results if r["outcome"] == "failed_with_error"][:20],
        "timeline": [{"t_s": round(r["started"] - t0, 2), "outcome": r["outcome"]} for r in results],
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    bins = range(0, int(result["wall_s"]) + 10, 5)
    for outcome, color in (("completed", "tab:green"), ("failed_with_error", "tab:orange"), ("lost", "tab:red")):
        starts = [r["t_s"] for r in result["timeline"] if r["outcome"] == outcome]
        ax.hist(starts, bins=bins, color=color, alpha=0.7, label=f"{outcome} ({len(starts)})")
    for event in result["events"]:
        ax.axvline(event["t_s"], color="black", linestyle="--", linewidth=0.8)
        ax.text(event["t_s"], ax.get_ylim()[1] * 0.95, event["event"], rotation=90, va="top", fontsize=7)
    ax.set_xlabel("request start (s)")
    ax.set_ylabel("requests per 5 s")
    ax.set_title(f"Soak: {result['load']['clients']} streaming clients, 2 prefill + 2 decode, workers killed; "
                 f"lost {result['lost']}, errors {result['failed_with_error']}, moved {result['migrated']:.0f}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=300)
    parser.add_argument("--max-requests-per-client", type=int, default=200)
    args = parser.parse_args()
    log_dir = RESULTS / "soak-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    etcd = EmbeddedEtcd("127.0.0.1").start()
    control_plane = f"127.0.0.1:{free_port()}"
    workers: dict[str, subprocess.Popen] = {}
    try:
        with baton_up(log_dir / "baton", "--etcd", etcd.endpoint, control_plane=control_plane) as base:
            base = f"{base}/v1"
            for role, worker_id, core in (("prefill", "prefill-x", "0"), ("decode", "decode-x", "1")):
                workers[worker_id] = start_worker(role, worker_id, core, etcd.endpoint, control_plane, log_dir)
            for worker_id, proc in workers.items():
                wait_registered(etcd.endpoint, worker_id, proc, 600)
            result = asyncio.run(soak(base, etcd.endpoint, control_plane, log_dir, workers, args))
    finally:
        for proc in workers.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in workers.values():
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        etcd.stop()
    result = {"benchmark": "soak", "command": "make soak", "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "load": {"clients": args.clients, "seconds": args.seconds, "max_tokens": MAX_TOKENS,
                       "topology": "baton up (1 prefill + 1 decode) + prefill-x + decode-x beside it"},
              **result}
    (RESULTS / "soak.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, RESULTS / "soak.png")
    print(json.dumps({k: v for k, v in result.items() if k not in ("timeline",)}, indent=1))


if __name__ == "__main__":
    main()
