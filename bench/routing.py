"""Routing benchmark: the same multi-turn load on `baton up --prefill 2
--decode 1` under `round-robin` and under `kv-aware`, one after the other,
with the engines' KV caches shrunk so that the conversations do not all fit
in one engine's cache, but do in both prefill engines' together.

    python -m bench.routing [--sessions 12] [--turns 6] [--rate 1.5] [--kv-cache-blocks 48] [--kv-backend grpc]

Load: ``sessions`` conversations, each a ~600-token document of its own
and then turns (a question, a fixed answer, the next question ...): every
request repeats its conversation so far, the prefix-reuse pattern of chat
and agents. Turns of different sessions interleave at random (seeded),
Poisson arrivals; each turn is sent after its session's previous one was.
Every prompt runs on a prefill worker (`--disaggregation always`), so what
differs between the runs is only where the prefill placement sends it.

Reports per policy the prefill engines' own prefix-cache hit rate (cached
prompt tokens / prompt tokens, from the counters vLLM's scheduler keeps,
as each engine reports them), TTFT p50 / p99 and output throughput, and
the ratios kv-aware / round-robin (hit rate) and round-robin / kv-aware
(TTFT p50). Writes bench/results/routing.json and .png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from pathlib import Path

import httpx

from baton.rpc import free_port
from bench.client import stream_chat
from bench.servers import baton_up

RESULTS = Path(__file__).resolve().parent / "results"
SEED = 11
POLICIES = ("round-robin", "kv-aware")


def _document(session: int) -> str:
    from tests.e2e.prompts import long_document

    return long_document(1000 + session, 32)


def conversation(session: int, turns: int) -> list[dict]:
    """The messages of a session's request at turn ``turns`` (1-based)."""
    messages = [{"role": "system", "content": f"Session {session}. Answer from this report.\n{_document(session)}"}]
    for turn in range(1, turns + 1):
        messages.append({"role": "user", "content": f"Question {turn}: what does item {turn * 3} say, briefly?"})
        if turn < turns:  # a fixed earlier answer, so every run sends the same prompts
            messages.append({"role": "assistant",
                             "content": f"Item {turn * 3} is about the valley, the farmers and the old bridge."})
    return messages


def schedule(sessions: int, turns: int) -> list[tuple[int, int]]:
    """(session, turn) in arrival order: each session's turns in order,
    sessions interleaved at random."""
    rng = random.Random(SEED)
    pending = {s: 1 for s in range(sessions)}
    order = []
    while pending:
        session = rng.choice(sorted(pending))
        order.append((session, pending[session]))
        pending[session] += 1
        if pending[session] > turns:
            del pending[session]
    return order


async def run_load(base: str, order: list[tuple[int, int]], rate: float, max_tokens: int) -> dict:
    rng = random.Random(SEED)
    sent: dict[int, asyncio.Task] = {}  # session → its last turn's request
    async with httpx.AsyncClient(timeout=900) as client:
        # Warm the engines up on prompts no session shares.
        await asyncio.gather(*(stream_chat(client, base, [{"role": "user", "content": f"Warm-up {i}: hello."}], 4)
                               for i in range(2)))
        started = time.perf_counter()
        tasks = []
        for session, turn in order:
            previous = sent.get(session)
            if previous is not None:
                await asyncio.wait({previous})  # a turn follows its answer
            task = asyncio.create_task(stream_chat(client, base, conversation(session, turn), max_tokens))
            sent[session] = task
            tasks.append(task)
            await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
        wall = time.perf_counter() - started
    ttft = sorted(r["ttft_s"] for r in results)
    return {"requests": len(results), "wall_s": wall, "ttft_p50_s": statistics.median(ttft),
            "ttft_p99_s": ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))],
            "output_tok_s": sum(r["tokens"] for r in results) / wall}


def prefill_counters(control_plane: str) -> dict[str, tuple[int, int]]:
    """Per prefill worker, its engine's (prefix-cache hits, queries) in
    tokens, as the engine last reported them to the control plane."""
    import grpc

    from baton.v1 import common_pb2, control_plane_pb2, control_plane_pb2_grpc

    with grpc.insecure_channel(control_plane) as channel:
        response = control_plane_pb2_grpc.ControlPlaneStub(channel).ListWorkers(
            control_plane_pb2.ListWorkersRequest(), timeout=10)
    return {w.worker_id: (w.engine.prefix_cache_hits, w.engine.prefix_cache_queries) for w in response.workers
            if w.role == common_pb2.WORKER_ROLE_PREFILL and w.HasField("engine")}


def bench_policy(args, policy: str, order, log_dir: Path) -> dict:
    flags = ["--prefill", "2", "--decode", "1", "--policy", policy, "--disaggregation", "always",
             "--kv-cache-blocks", str(args.kv_cache_blocks), "--kv-backend", args.kv_backend]
    control_plane = f"127.0.0.1:{free_port()}"
    with baton_up(log_dir, *flags, control_plane=control_plane) as base:
        time.sleep(2.5)  # the engines report every second
        before = prefill_counters(control_plane)
        result = asyncio.run(run_load(f"{base}/v1", order, args.rate, args.output_tokens))
        time.sleep(2.5)
        after = prefill_counters(control_plane)
    hits = sum(after[w][0] - before.get(w, (0, 0))[0] for w in after)
    queries = sum(after[w][1] - before.get(w, (0, 0))[1] for w in after)
    result.update(prefix_hit_rate=hits / queries if queries else 0.0, prefix_hit_tokens=hits,
                  prompt_tokens_looked_up=queries)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sessions", type=int, default=12)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--rate", type=float, default=1.5, help="requests per second (Poisson)")
    parser.add_argument("--output-tokens", type=int, default=16)
    parser.add_argument("--kv-cache-blocks", type=int, default=48, help="each engine's KV cache, in blocks")
    # nixl keeps a prompt's blocks on the prefill engine until the decode
    # engine read them; in caches this small that competes with the prefix
    # cache the benchmark is about. The push backends free them at once.
    parser.add_argument("--kv-backend", default="grpc")
    args = parser.parse_args()
    order = schedule(args.sessions, args.turns)
    log_root = RESULTS / "routing-logs"
    runs = {}
    for policy in POLICIES:
        runs[policy] = bench_policy(args, policy, order, log_root / policy)
        print(f"{policy:<12}:", json.dumps({k: round(v, 3) if isinstance(v, float) else v
                                           for k, v in runs[policy].items()}), flush=True)
    rr, kv = runs["round-robin"], runs["kv-aware"]
    ratios = {"hit_rate": kv["prefix_hit_rate"] / rr["prefix_hit_rate"] if rr["prefix_hit_rate"] else float("inf"),
              "ttft_p50": rr["ttft_p50_s"] / kv["ttft_p50_s"]}
    print("ratios:", json.dumps({k: round(v, 2) for k, v in ratios.items()}), flush=True)
    result = {"benchmark": "routing", "command": "make bench-routing", "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "load": {**vars(args), "seed": SEED, "requests": len(order),
                       "workload": "multi-turn sessions, a ~600-token document each, turns interleaved"},
              "topology": f"baton up --prefill 2 --decode 1 --disaggregation always --kv-backend {args.kv_backend}",
              **runs, "ratios": ratios}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "routing.json").write_text(json.dumps(result, indent=2) + "\n")
    _plot(runs, ratios, RESULTS / "routing.png")
    print(f"wrote {RESULTS / 'routing.json'} and routing.png")


def _plot(runs: dict[str, dict], ratios: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("prefix_hit_rate", "prefix-cache hit rate"), ("ttft_p50_s", "TTFT p50 (s)"),
               ("ttft_p99_s", "TTFT p99 (s)"), ("output_tok_s", "output tok/s")]
    fig, axes = plt.subplots(1, len(metrics), figsize=(14, 3.5))
    for ax, (key, label) in zip(axes, metrics, strict=True):
        ax.bar(list(runs), [run[key] for run in runs.values()], color=["#888888", "#1f77b4"])
        ax.set_title(label)
    fig.suptitle(f"Same multi-turn load, 2 prefill + 1 decode: hit rate x{ratios['hit_rate']:.2f}, "
                 f"TTFT p50 / {ratios['ttft_p50']:.2f} with kv-aware")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
