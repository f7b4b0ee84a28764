"""Serving benchmark: three systems on the same machine, same load, same run:
one plain vLLM OpenAI server (the baseline), Baton (1 prefill + 1 decode
worker, one core each) and vLLM's own prefill/decode disaggregation (a
prefill and a decode `vllm serve`, one core each, NixlConnector between
them, behind bench/vllm_pd_proxy.py). Each is measured by two clients:
vLLM's own `vllm bench serve` (run as a module: the CPU build's console
script is broken) and Baton's own client below, which must agree with it.

    python -m bench.serve [--requests 24] [--rate 2] [--input-len 512] [--output-tokens 64]

Load: vLLM's random dataset (distinct random-token prompts, no prefix-cache
hits), streaming chat completions with `ignore_eos`, Poisson arrivals. Both
clients send the same prompts (Baton's client marks each at its start, so
neither finds the other's in the prefix cache) on the same arrival schedule
(vLLM's own, from the same seed). Reports TTFT, time per output token (TPOT)
and output throughput, Baton's and vLLM P/D's ratios to vLLM (and Baton's
to vLLM P/D), and how far the two clients' TTFTs are apart. Writes
bench/results/serve.json and .png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from baton.model_store import DEFAULT_MODEL_NAME, ensure_default_model
from bench.client import stream_chat
from bench.servers import baton_up, vllm_pd, vllm_serve

RESULTS = Path(__file__).resolve().parent / "results"
SEED = 7


def vllm_bench_args(args, base: str, result_dir: Path) -> list[str]:
    """`vllm bench serve` flags for the load; also what builds the prompts
    Baton's client sends."""
    return ["--backend", "openai-chat", "--base-url", base, "--endpoint", "/v1/chat/completions",
            "--model", DEFAULT_MODEL_NAME, "--tokenizer", str(ensure_default_model()),
            "--dataset-name", "random", "--random-input-len", str(args.input_len),
            "--random-output-len", str(args.output_tokens), "--num-prompts", str(args.requests),
            "--request-rate", str(args.rate), "--ignore-eos", "--temperature", "0", "--seed", str(SEED),
            "--disable-tqdm", "--save-result", "--result-dir", str(result_dir),
            "--result-filename", "vllm-bench.json"]


def _vllm_bench_parser():
    from vllm.benchmarks.serve import add_cli_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    return parser


def make_prompts(args) -> list[str]:
    """The prompts `vllm bench serve` sends for this load, each marked at its
    start so that neither client finds the other's in the prefix cache."""
    from transformers import AutoTokenizer
    from vllm.benchmarks.datasets import get_samples

    bench_args = _vllm_bench_parser().parse_args(vllm_bench_args(args, "http://unused", RESULTS))
    tokenizer = AutoTokenizer.from_pretrained(str(ensure_default_model()))
    return [f"[{i}] {sample.prompt}" for i, sample in enumerate(get_samples(bench_args, tokenizer))]


def run_vllm_bench(args, base: str, out_dir: Path) -> dict:
    """vLLM's own client against ``base``: its TTFT, TPOT and throughput."""
    out_dir.mkdir(parents=True, exist_ok=True)
    code = ("import sys; from bench.serve import _vllm_bench_parser; from vllm.benchmarks.serve import main; "
            "main(_vllm_bench_parser().parse_args(sys.argv[1:]))")
    subprocess.run([sys.executable, "-c", code, *vllm_bench_args(args, base, out_dir)], check=True,
                   stdout=open(out_dir / "vllm-bench.log", "wb"), stderr=subprocess.STDOUT)
    report = json.loads((out_dir / "vllm-bench.json").read_text())
    return {"requests": report["completed"], "ttft_p50_s": report["median_ttft_ms"] / 1000,
            "tpot_p50_s": report["median_tpot_ms"] / 1000, "output_tokens_per_s": report["output_throughput"]}


async def one_request(client: httpx.AsyncClient, base: str, prompt: str, max_tokens: int) -> dict:
    return await stream_chat(client, base, [{"role": "user", "content": prompt}], max_tokens)


async def run_load(base: str, prompts: list[str], rate: float, max_tokens: int) -> dict:
    import numpy as np
    from vllm.benchmarks.serve import get_request

    async with httpx.AsyncClient(timeout=600) as client:
        # Warm up with the load's own shapes (a few long prompts at once,
        # marked so they leave nothing in the prefix cache for the load).
        await asyncio.gather(*(one_request(client, base, f"[warm-up {i}] {prompt}", 8)
                               for i, prompt in enumerate(prompts[:4])))
        started = time.perf_counter()
        tasks = []
        np.random.seed(SEED)  # the arrival schedule `vllm bench serve --seed SEED` draws
        async for prompt, _rate in get_request(prompts, rate):
            tasks.append(asyncio.create_task(one_request(client, base, prompt, max_tokens)))
        results = await asyncio.gather(*tasks)
        wall = time.perf_counter() - started
    ttft = sorted(r["ttft_s"] for r in results)
    tpot = sorted(r["tpot_s"] for r in results if r["tpot_s"] is not None)
    pct = lambda xs, q: xs[min(len(xs) - 1, int(q * len(xs)))]  # noqa: E731
    return {"requests": len(results), "wall_s": wall,
            "ttft_p50_s": statistics.median(ttft), "ttft_p90_s": pct(ttft, 0.9),
            "first_text_p50_s": statistics.median(r["first_text_s"] for r in results),
            "tpot_p50_s": statistics.median(tpot), "tpot_p90_s": pct(tpot, 0.9),
            "output_tokens_per_s": sum(r["tokens"] for r in results) / wall}


def bench_baton(args, prompts, log_dir: Path) -> dict:
    with baton_up(log_dir / "baton") as base:
        return measure(args, prompts, base, log_dir / "baton")


def measure(args, prompts, base: str, out_dir: Path) -> dict:
    """The same load twice: Baton's client, then `vllm bench serve`."""
    ours = asyncio.run(run_load(f"{base}/v1", prompts, args.rate, args.output_tokens))
    ours["vllm_bench_serve"] = run_vllm_bench(args, base, out_dir)
    ours["ttft_p50_clients_ratio"] = ours["vllm_bench_serve"]["ttft_p50_s"] / ours["ttft_p50_s"]
    return ours


def bench_vllm(args, prompts, log_dir: Path) -> dict:
    with vllm_serve(log_dir) as base:
        return measure(args, prompts, base, log_dir / "vllm")


def bench_vllm_pd(args, prompts, log_dir: Path) -> dict:
    with vllm_pd(log_dir / "vllm_pd") as base:
        return measure(args, prompts, base, log_dir / "vllm_pd")


RATIO_KEYS = ("ttft_p50_s", "ttft_p90_s", "tpot_p50_s", "tpot_p90_s", "output_tokens_per_s")


def ratios(system: dict, reference: dict) -> dict:
    return {k: system[k] / reference[k] for k in RATIO_KEYS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--rate", type=float, default=2.0, help="requests per second (Poisson)")
    parser.add_argument("--input-len", type=int, default=512, help="prompt tokens")
    parser.add_argument("--output-tokens", type=int, default=64)
    args = parser.parse_args()
    prompts = make_prompts(args)
    log_dir = RESULTS / "serve-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    vllm = bench_vllm(args, prompts, log_dir)
    print("vLLM (baseline) :", json.dumps(vllm), flush=True)
    baton = bench_baton(args, prompts, log_dir)
    print("Baton           :", json.dumps(baton), flush=True)
    vllm_pd = bench_vllm_pd(args, prompts, log_dir)
    print("vLLM P/D        :", json.dumps(vllm_pd), flush=True)
    compared = {"baton_over_vllm": ratios(baton, vllm), "vllm_pd_over_vllm": ratios(vllm_pd, vllm),
                "baton_over_vllm_pd": ratios(baton, vllm_pd)}
    for label, key in (("Baton / vLLM    :", "baton_over_vllm"), ("vLLM P/D / vLLM :", "vllm_pd_over_vllm"),
                       ("Baton / vLLM P/D:", "baton_over_vllm_pd")):
        print(label, json.dumps({k: round(v, 2) for k, v in compared[key].items()}), flush=True)
    for name, run in (("vLLM", vllm), ("Baton", baton), ("vLLM P/D", vllm_pd)):
        print(f"{name}: TTFT p50 Baton's client {run['ttft_p50_s']:.3f} s, vllm bench serve "
              f"{run['vllm_bench_serve']['ttft_p50_s']:.3f} s (ratio {run['ttft_p50_clients_ratio']:.2f})")
    result = {"benchmark": "serve", "command": "make bench-serve", "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "load": {**vars(args), "dataset": "vllm random", "seed": SEED},
              "baseline": "one vLLM OpenAI server (both cores)", "vllm": vllm, "baton": baton,
              "vllm_pd_setup": "vLLM prefill + decode server, one core each, NixlConnector (UCX, CPU KV cache), "
                               "bench/vllm_pd_proxy.py in front",
              "vllm_pd": vllm_pd, **compared}
    (RESULTS / "serve.json").write_text(json.dumps(result, indent=2) + "\n")
    _plot({"vLLM": vllm, "Baton": baton, "vLLM P/D": vllm_pd}, RESULTS / "serve.png")
    print(f"wrote {RESULTS / 'serve.json'} and serve.png")


def _plot(systems: dict[str, dict], path: Path) -> None:
    """One bar per system for each metric, then each system's TTFT p50 as
    both clients measured it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("ttft_p50_s", "TTFT p50 (s)"), ("ttft_p90_s", "TTFT p90 (s)"), ("tpot_p50_s", "TPOT p50 (s)"),
               ("output_tokens_per_s", "output tok/s")]
    names = list(systems)
    colors = ["#888888", "#1f77b4", "#2ca02c"][: len(names)]
    fig, axes = plt.subplots(1, len(metrics) + 1, figsize=(17, 3.5))
    for ax, (key, label) in zip(axes, metrics, strict=False):
        ax.bar(names, [run[key] for run in systems.values()], color=colors)
        ax.set_title(label)
    clients = axes[-1]
    xs = range(len(names))
    clients.bar([x - 0.2 for x in xs], [run["ttft_p50_s"] for run in systems.values()], 0.4,
                label="Baton's client")
    clients.bar([x + 0.2 for x in xs], [run["vllm_bench_serve"]["ttft_p50_s"] for run in systems.values()], 0.4,
                label="vllm bench serve")
    clients.set_xticks(list(xs), names)
    clients.set_title("TTFT p50 (s) by client")
    clients.legend(fontsize=7)
    fig.suptitle("vLLM, Baton (1P+1D) and vLLM P/D (1P+1D, NIXL), same load")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
