"""The KV hand-off as a user sees it: one request at a time, long prompts,
streamed through Baton (1 prefill + 1 decode worker, each KV backend) and through one plain
`vllm serve` in the same run.

    python -m bench.handoff [--lengths 1024 4096] [--requests 5] [--output-tokens 16] [--backends nixl collective grpc]

Baton streams the first token from the prefill worker, so the hand-off
shows as the pause between the first and the second token. Per prompt
length: TTFT of each system and Baton's ratio to vLLM's, the pause before
the second token and `gap_ratio` (that pause ÷ vLLM's inter-token latency).
Writes bench/results/handoff.json and .png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import httpx

from baton.model_store import DEFAULT_MODEL_NAME, ensure_default_model
from bench.serve import RESULTS
from bench.servers import baton_up, vllm_serve
from tests.e2e.prompts import long_document

MAX_MODEL_LEN = 8192  # SmolLM2 allows 8k


def prompts(length: int, count: int, first: int = 0) -> list[list[int]]:
    """``count`` distinct token-id prompts of exactly ``length`` tokens (no
    prefix-cache hits between them)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(ensure_default_model()))
    out = []
    for i in range(first, first + count):
        text = f"Request {i}. " + " ".join(long_document(i * 7 + s, 60) for s in range(1 + length // 900))
        ids = tokenizer(text).input_ids
        assert len(ids) >= length, "document too short for the prompt length"
        out.append(ids[:length])
    return out


def one_request(base: str, prompt: list[int], output_tokens: int, backend: str = "") -> dict:
    body = {"model": DEFAULT_MODEL_NAME, "prompt": prompt, "max_tokens": output_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True}
    if backend:  # Baton: the request picks its transfer backend
        body["kv_transfer_params"] = {"kv_backend": backend}
    started = time.perf_counter()
    arrivals = []
    with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"]:
                arrivals.append(time.perf_counter() - started)
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    return {"ttft_s": arrivals[0], "second_token_pause_s": gaps[0], "itl_s": statistics.median(gaps[1:])}


def measure(base: str, lengths: list[int], count: int, output_tokens: int, backend: str = "",
            first: int = 0) -> dict:
    """``first``: where this run's prompts start, so that no run hits
    another's prefix cache."""
    one_request(base, prompts(64, 1, first + 999)[0], 4, backend)  # warm up
    result = {}
    for length in lengths:
        rows = [one_request(base, p, output_tokens, backend) for p in prompts(length, count, first)]
        result[str(length)] = {key: statistics.median(r[key] for r in rows) for key in rows[0]}
    return result


def run_vllm(args, log_dir: Path) -> dict:
    with vllm_serve(log_dir, max_model_len=MAX_MODEL_LEN, kv_cache_gib=1) as base:
        return measure(base, args.lengths, args.requests, args.output_tokens)


def run_baton(args, log_dir: Path) -> dict:
    """Every backend on the same engines, one after the other."""
    # Every prompt on the prefill worker: the hand-off is what is measured.
    with baton_up(log_dir / "baton", "--max-model-len", str(MAX_MODEL_LEN), "--disaggregation", "always") as base:
        return {backend: measure(base, args.lengths, args.requests, args.output_tokens, backend, 100 * (i + 1))
                for i, backend in enumerate(args.backends)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--requests", type=int, default=5, help="per length, one at a time")
    parser.add_argument("--output-tokens", type=int, default=16)
    parser.add_argument("--backends", nargs="+", default=["nixl", "collective", "grpc"])
    args = parser.parse_args()
    log_dir = RESULTS / "handoff-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    vllm = run_vllm(args, log_dir)
    print("vLLM :", json.dumps(vllm), flush=True)
    baton = run_baton(args, log_dir)
    print("Baton:", json.dumps(baton), flush=True)
    ratios = {backend: {length: {"ttft_ratio": row["ttft_s"] / vllm[length]["ttft_s"],
                                 "gap_ratio": row["second_token_pause_s"] / vllm[length]["itl_s"]}
                        for length, row in rows.items()} for backend, rows in baton.items()}
    print("Baton / vLLM:", json.dumps(ratios), flush=True)
    result = {"benchmark": "handoff", "command": "make bench-handoff", "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "load": vars(args), "baseline": "one vLLM OpenAI server", "vllm": vllm, "baton": baton,
              "baton_over_vllm": ratios}
    (RESULTS / "handoff.json").write_text(json.dumps(result, indent=2) + "\n")
    _plot(vllm, baton, RESULTS / "handoff.png")
    print(f"wrote {RESULTS / 'handoff.json'} and handoff.png")


def _plot(vllm: dict, baton: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = list(vllm)
    fig, (ttft, gap) = plt.subplots(1, 2, figsize=(10, 3.5))
    width = 0.8 / (1 + len(baton))
    for i, (name, rows) in enumerate([("vLLM", vllm), *((f"Baton ({b})", r) for b, r in baton.items())]):
        xs = [x + i * width for x in range(len(lengths))]
        ttft.bar(xs, [rows[n]["ttft_s"] for n in lengths], width, label=name)
        key = "itl_s" if name == "vLLM" else "second_token_pause_s"
        gap.bar(xs, [rows[n][key] * 1000 for n in lengths], width, label=name)
    for ax, title in ((ttft, "TTFT (s)"), (gap, "pause before token 2 (ms); vLLM: its ITL")):
        ax.set_xticks([x + width * len(baton) / 2 for x in range(len(lengths))], [f"{n} tokens" for n in lengths])
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.suptitle("KV hand-off, one request at a time")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
