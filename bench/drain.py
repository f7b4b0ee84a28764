"""The pause a drain puts into a running answer, with the answer's KV handed
to another decode worker against the answer recomputed there.

    python -m bench.drain [--streams 6] [--document-words 700] [--max-tokens 160]

For each mode, one `baton up --decode 2` (every prompt on the prefill worker,
drains of 0.5 s, KV over `grpc`: on two cores a decode engine shares its
core with the prefill engine, and NIXL reads stall between engines pinned
to one core):

- ``handoff`` (the default): the draining worker's running answers move with
  their KV over the KV data plane, and the receiving worker goes on
  after the last token streamed;
- ``recompute`` (`DECODE_HANDOFFS=false`): they move as after a failure, and
  the receiving worker prefills the prompt and the tokens streamed.

`--streams` greedy answers of ~1k-token prompts stream; once each has some
tokens, the decode worker running the most is drained (SIGTERM, as
`baton scale` and Kubernetes do). For each answer that moved (the router's
log names them), the pause is the longest gap between two of its chunks, set
against the median gap of the same answer before it. Writes
bench/results/drain.json (per mode: pauses, their median, the median gap;
``ratio`` = recompute pause / hand-off pause, median over the moved
answers) and drain.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import time
from pathlib import Path

import grpc
import httpx

from baton.model_store import DEFAULT_MODEL_NAME
from baton.registry import list_workers
from baton.rpc import free_port
from baton.v1 import common_pb2, control_plane_pb2, control_plane_pb2_grpc
from bench.serve import RESULTS
from bench.servers import baton_up
from tests.e2e.prompts import long_document

MODES = {"handoff": {}, "recompute": {"BATON_DECODE_HANDOFFS": "false"}}


async def stream(client: httpx.AsyncClient, base: str, i: int, words: int, max_tokens: int) -> dict:
    """One greedy streamed answer: its id and when each chunk came."""
    body = {"model": DEFAULT_MODEL_NAME, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "messages": [{"role": "user", "content":
                                          f"Summarize this report.\n\n{long_document(300 + i, words // 10)}"}]}
    arrivals: list[float] = []
    request_id = ""
    async with client.stream("POST", f"{base}/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"answer {i} failed: {chunk['error']}")
            request_id = chunk.get("id", request_id)
            if any(c.get("delta", {}).get("content") is not None for c in chunk.get("choices", [])):
                arrivals.append(time.monotonic())
    return {"request_id": request_id, "arrivals": arrivals}


def decode_workers(control_plane: str) -> list[control_plane_pb2.WorkerStatus]:
    with grpc.insecure_channel(control_plane) as channel:
        reply = control_plane_pb2_grpc.ControlPlaneStub(channel).ListWorkers(
            control_plane_pb2.ListWorkersRequest(), timeout=10)
    return [w for w in reply.workers if w.role == common_pb2.WORKER_ROLE_DECODE]


def moved_requests(router_log: Path) -> set[str]:
    """Request ids the router moved off a draining decode worker, either way."""
    moved = set()
    for line in router_log.read_text().splitlines():
        if line.startswith("{") and ("handed off with its KV" in line or "could not be handed off" in line):
            moved.add(json.loads(line)["request_id"])
    return moved


def pause(arrivals: list[float]) -> tuple[float, float]:
    """(the longest gap between chunks, the median gap before it)."""
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    at = max(range(len(gaps)), key=gaps.__getitem__)
    return gaps[at], statistics.median(gaps[:at] or gaps)


async def one_mode(mode: str, args, log_dir: Path) -> dict:
    control_plane = f"127.0.0.1:{free_port()}"
    env = {"BATON_DRAIN_TIMEOUT_S": "0.5", "BATON_DISAGGREGATION": "always", "BATON_KV_BACKEND": "grpc",
           **MODES[mode]}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with baton_up(log_dir / mode, "--decode", "2", control_plane=control_plane) as base:
            base += "/v1"
            etcd = _etcd(log_dir / mode)
            async with httpx.AsyncClient(timeout=600) as client:
                answers = [asyncio.create_task(stream(client, base, i, args.document_words, args.max_tokens))
                           for i in range(args.streams)]
                # Drain once every answer streams, with room left to move.
                deadline = time.monotonic() + 300
                while sum(w.engine.running for w in decode_workers(control_plane)) < args.streams:
                    if time.monotonic() > deadline:
                        raise RuntimeError("the answers did not all start streaming within 300 s")
                    await asyncio.sleep(0.2)
                await asyncio.sleep(args.drain_after_s)
                victim = max(decode_workers(control_plane), key=lambda w: w.engine.running)
                (record,) = [w for w in await list_workers(etcd, "/baton/v1")
                             if w.worker_id == victim.worker_id]
                os.kill(record.pid, signal.SIGTERM)
                drained = time.monotonic()
                results = await asyncio.gather(*answers)
            moved = moved_requests(log_dir / mode / "router.log")
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    pauses = []
    for result in results:
        if any(m.startswith(result["request_id"]) for m in moved):
            longest, median = pause(result["arrivals"])
            pauses.append({"pause_s": round(longest, 4), "median_gap_s": round(median, 4),
                           "tokens": len(result["arrivals"])})
    print(f"{mode}: drained {victim.worker_id} ({victim.engine.running} running) "
          f"{drained - min(r['arrivals'][0] for r in results):.1f} s in; {len(pauses)} answers moved: "
          + ", ".join(f"{p['pause_s']:.3f} s" for p in pauses), flush=True)
    return {"drained": victim.worker_id, "moved": len(pauses), "pauses": pauses,
            "pause_p50_s": statistics.median(p["pause_s"] for p in pauses) if pauses else None,
            "median_gap_s": statistics.median(p["median_gap_s"] for p in pauses) if pauses else None}


def _etcd(log_dir: Path) -> str:
    """`baton up`'s etcd, from its run file (written once every worker is
    ready, which may come after the first answer)."""
    run_file, deadline = log_dir / "up.json", time.monotonic() + 300
    while not run_file.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"no {run_file} within 300 s")
        time.sleep(0.5)
    return json.loads(run_file.read_text())["etcd"]


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for x, mode in enumerate(MODES):
        pauses = [p["pause_s"] for p in result["modes"][mode]["pauses"]]
        ax.scatter([x] * len(pauses), pauses, label=f"{mode}: pause at the move")
        gap = result["modes"][mode]["median_gap_s"]
        if gap:
            ax.hlines(gap, x - 0.3, x + 0.3, colors="gray", linestyles="dashed")
    ax.set_xticks(range(len(MODES)), list(MODES))
    ax.set_yscale("log")
    ax.set_ylabel("seconds (dashed: median gap between tokens)")
    ax.set_title(f"Draining a decode worker mid-answer: pause ratio {result['ratio']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=6)
    parser.add_argument("--document-words", type=int, default=700)
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--drain-after-s", type=float, default=2.0, help="once every answer streams")
    args = parser.parse_args()
    log_dir = RESULTS / "drain-logs"
    modes = {mode: asyncio.run(one_mode(mode, args, log_dir)) for mode in MODES}
    handoff, recompute = modes["handoff"]["pause_p50_s"], modes["recompute"]["pause_p50_s"]
    result = {"command": "make bench-drain", "streams": args.streams, "document_words": args.document_words,
              "max_tokens": args.max_tokens, "modes": modes,
              "ratio": round(recompute / handoff, 2) if handoff and recompute else None}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "drain.json").write_text(json.dumps(result, indent=2))
    plot(result, RESULTS / "drain.png")
    print(json.dumps({k: v for k, v in result.items() if k != "modes"}, indent=2))


if __name__ == "__main__":
    main()
