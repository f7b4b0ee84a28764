"""Observability overhead: the same closed-loop load on `baton up` (1
prefill + 1 decode worker) with everything observed, and with nothing.

    python -m bench.overhead [--requests 32] [--concurrency 6] [--max-tokens 48] [--rounds 4]

"on": every service and engine exports its spans over OTLP to a receiver
in this process (the SDK's default batching), and every /metrics (router,
control plane, both workers) is scraped every ``--scrape-interval`` seconds:
5 by default, as deploy/observability/prometheus.yml does (a worker's
scrape costs it ~40 ms of CPU, most of it rendering vLLM's own metrics:
at 1 s that alone took ~4 % of a core from each worker). "off": the OpenTelemetry SDK disabled (no span is made) and
nobody scrapes. Both stacks are up at once (their engines pinned to the
same cores, only one loaded at a time) and take turns, round by round, in
alternating order, with the same prompts: drift in the machine's speed
(rounds of one stack differed by 25 % when run one stack after the other)
falls on both alike. Medians over the rounds are reported.

Writes bench/results/overhead.json (``ratio``: output throughput on / off;
goal >= 0.97) and overhead.png.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from bench.client import stream_chat
from bench.servers import baton_up

RESULTS = Path(__file__).resolve().parent / "results"
MODES = ("off", "on")


def prompts(count: int) -> list[str]:
    from tests.e2e.prompts import long_document

    return [f"Summarize this report in a few sentences.\n\n{long_document(3000 + i, 24)}" for i in range(count)]


def metrics_endpoints(log_dir: Path) -> list[str]:
    """Every service's /metrics, from what `baton up` recorded and the registry."""
    from baton.registry import list_workers

    run = json.loads((log_dir / "up.json").read_text())
    workers = asyncio.run(list_workers(run["etcd"], run["etcd_prefix"]))
    return [run["http"].removesuffix("/v1") + "/metrics", run["control_plane_metrics"],
            *(f"http://{w.metrics_address}/metrics" for w in workers)]


@contextlib.contextmanager
def scraping(urls: list[str], interval_s: float) -> Iterator[dict]:
    """Scrape every url each ``interval_s`` in a thread, as Prometheus would."""
    stats = {"scrapes": 0, "bytes": 0, "failures": 0}
    stop = threading.Event()

    def run() -> None:
        with httpx.Client(timeout=5) as client:
            while not stop.wait(interval_s):
                for url in urls:
                    try:
                        stats["bytes"] += len(client.get(url).raise_for_status().content)
                        stats["scrapes"] += 1
                    except httpx.HTTPError:
                        stats["failures"] += 1

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield stats
    finally:
        stop.set()
        thread.join()


async def closed_loop(base: str, texts: list[str], concurrency: int, max_tokens: int) -> dict:
    queue = list(texts)
    results: list[dict] = []
    async with httpx.AsyncClient(timeout=600) as client:

        async def user() -> None:
            while queue:
                text = queue.pop()
                results.append(await stream_chat(client, base, [{"role": "user", "content": text}], max_tokens))

        started = time.perf_counter()
        await asyncio.gather(*(user() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    ttft = sorted(r["ttft_s"] for r in results)
    return {"requests": len(results), "wall_s": wall, "output_tokens_per_s": sum(r["tokens"] for r in results) / wall,
            "ttft_p50_s": statistics.median(ttft), "ttft_p99_s": ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))]}


def environment(mode: str, receiver) -> dict[str, str]:
    on = {k: v for k, v in receiver.env.items() if not k.startswith("OTEL_BSP_")}
    return on if mode == "on" else {"OTEL_SDK_DISABLED": "true"}


def run(args, texts: list[str], log_dir: Path, receiver) -> dict[str, dict]:
    with contextlib.ExitStack() as stacks:
        bases = {mode: stacks.enter_context(baton_up(log_dir / mode, env=environment(mode, receiver)))
                 for mode in MODES}
        for base in bases.values():  # the load's shapes, outside any prefix cache of the rounds
            asyncio.run(closed_loop(f"{base}/v1", [f"[warm-up] {t}" for t in texts[:args.concurrency]],
                                    args.concurrency, 8))
        endpoints = metrics_endpoints(log_dir / "on")
        rounds: dict[str, list[dict]] = {mode: [] for mode in MODES}
        spans = 0
        scrapes = {"scrapes": 0, "bytes": 0, "failures": 0}
        for r in range(args.rounds):
            for mode in MODES if r % 2 == 0 else tuple(reversed(MODES)):
                before = receiver.count()
                # Each round's prompts behind a marker of its own: no round
                # finds another's in the prefix cache.
                load = [f"[round {r}] {t}" for t in texts]
                scrape = scraping(endpoints, args.scrape_interval) if mode == "on" else contextlib.nullcontext({})
                with scrape as scraped:
                    rounds[mode].append(asyncio.run(closed_loop(f"{bases[mode]}/v1", load, args.concurrency,
                                                                args.max_tokens)))
                time.sleep(6)  # the last batches of spans (the SDK exports every 5 s)
                if mode == "on":
                    spans += receiver.count() - before
                    scrapes = {k: scrapes[k] + v for k, v in scraped.items()}
                print(f"round {r} {mode}: {json.dumps(rounds[mode][-1])}", flush=True)
    results = {}
    for mode, done in rounds.items():
        results[mode] = {key: statistics.median(r[key] for r in done)
                         for key in ("output_tokens_per_s", "ttft_p50_s", "ttft_p99_s", "wall_s")}
        results[mode]["rounds"] = done
    results["on"].update(spans_received=spans, scrapes=scrapes)
    return results


def main() -> None:
    from tests.e2e.otlp_receiver import OtlpReceiver

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--scrape-interval", type=float, default=5.0, help="seconds between scrapes of each service")
    args = parser.parse_args()
    texts = prompts(args.requests)
    log_dir = RESULTS / "overhead-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    receiver = OtlpReceiver().start()
    try:
        modes = run(args, texts, log_dir, receiver)
    finally:
        receiver.stop()
    on, off = modes["on"], modes["off"]
    ratio = on["output_tokens_per_s"] / off["output_tokens_per_s"]
    result = {"benchmark": "overhead", "command": "make bench-overhead", "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "load": {**vars(args), "kind": "closed loop, streamed, greedy, ignore_eos"},
              "baseline": "off: OTEL_SDK_DISABLED=true, no scrapes; both stacks up at once, rounds alternating",
              "ratio_per_round_pair": [a["output_tokens_per_s"] / b["output_tokens_per_s"]
                                       for a, b in zip(on["rounds"], off["rounds"], strict=True)],
              "on": on, "off": off, "ratio": ratio, "goal": 0.97,
              "ttft_p50_ratio": on["ttft_p50_s"] / off["ttft_p50_s"]}
    (RESULTS / "overhead.json").write_text(json.dumps(result, indent=2) + "\n")
    _plot(modes, ratio, RESULTS / "overhead.png")
    print(f"throughput on/off {ratio:.3f} (goal >= 0.97); TTFT p50 on/off {result['ttft_p50_ratio']:.3f}; "
          f"{on['spans_received']} spans received, {on['scrapes']['scrapes']} scrapes")
    print(f"wrote {RESULTS / 'overhead.json'} and overhead.png")


def _plot(modes: dict[str, dict], ratio: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(11, 3.5))
    for ax, (key, label) in zip(axes, (("output_tokens_per_s", "output tok/s"), ("ttft_p50_s", "TTFT p50 (s)"),
                                       ("ttft_p99_s", "TTFT p99 (s)")), strict=True):
        ax.bar(list(modes), [m[key] for m in modes.values()], color=["#888888", "#1f77b4"])
        for i, m in enumerate(modes.values()):  # each round, over its bar
            ax.scatter([i] * len(m["rounds"]), [r[key] for r in m["rounds"]], color="black", s=10, zorder=3)
        ax.set_title(label)
    fig.suptitle(f"Tracing + metrics on vs off: throughput ratio {ratio:.3f} (goal >= 0.97)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
