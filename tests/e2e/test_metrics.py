"""Every service's Prometheus /metrics, read before and after known traffic
through the shared stack: the router's, the control plane's, each worker's
(its engine's own vllm:* metrics beside Baton's); what changed equals what
was sent."""

from __future__ import annotations

import asyncio
import json
import re

import httpx
from prometheus_client.parser import text_string_to_metric_families

from baton.registry import list_workers
from tests.e2e.conftest import REPO, wait_for

Samples = list[tuple[str, dict[str, str], float]]


def scrape(url: str) -> Samples:
    text = httpx.get(url, timeout=10).raise_for_status().text
    return [(s.name, s.labels, s.value) for family in text_string_to_metric_families(text) for s in family.samples]


def value(samples: Samples, name: str, **labels: str) -> float:
    """Summed over the series of ``name`` whose labels include ``labels``."""
    return sum(v for n, seen, v in samples if n == name and labels.items() <= seen.items())


def endpoints(stack) -> dict[str, list[str]]:
    """Per service (each worker role: all its workers), its /metrics."""
    workers = asyncio.run(list_workers(stack.etcd_endpoint, stack.etcd_prefix))
    found = {"router": [stack.http_base.removesuffix("/v1") + "/metrics"],
             "control_plane": [json.loads((stack.log_dir / "up.json").read_text())["control_plane_metrics"]]}
    for role in ("prefill", "decode"):
        found[role] = [f"http://{w.metrics_address}/metrics" for w in workers if w.role == role]
        assert found[role], f"no {role} worker"
    return found


def scrape_all(urls: list[str]) -> Samples:
    return [sample for url in urls for sample in scrape(url)]


PROMPTS = ["Name a bird that cannot fly.", "Wie heißt die Hauptstadt von Österreich?", "日本の首都はどこですか？"]


def test_every_service_counts_exactly_the_traffic_it_served(stack):
    urls = endpoints(stack)
    wait_for(lambda: value(scrape_all(urls["control_plane"]), "baton_kv_transfers_in_flight") == 0, 60,
             "earlier tests' requests to end")
    before = {name: scrape_all(service) for name, service in urls.items()}
    usage, loaded = [], []
    for prompt in PROMPTS:
        response = httpx.post(f"{stack.http_base}/chat/completions", timeout=300, json={
            "model": stack.model_name, "max_tokens": 6, "temperature": 0, "ignore_eos": True,
            "messages": [{"role": "user", "content": prompt}]})
        assert response.status_code == 200, response.text
        usage.append(response.json()["usage"])
        loaded.append(response.json()["kv_transfer_params"])
    prompt_tokens = sum(u["prompt_tokens"] for u in usage)
    completion_tokens = sum(u["completion_tokens"] for u in usage)
    assert completion_tokens == 6 * len(PROMPTS)
    n = len(PROMPTS)

    def consumed(samples: Samples) -> float:
        return value(samples, "baton_kv_transfers_total", outcome="consumed")

    # Transfers are reported to the control plane after the answer.
    wait_for(lambda: consumed(scrape_all(urls["control_plane"])) - consumed(before["control_plane"]) == n, 30,
             "the transfers to be reported consumed")
    after = {name: scrape_all(service) for name, service in urls.items()}

    def delta(service: str, name: str, **labels: str) -> float:
        return value(after[service], name, **labels) - value(before[service], name, **labels)

    model = stack.model_name
    # The router: where the client feels it.
    assert delta("router", "baton_requests_total", status="ok", model=model) == n
    assert delta("router", "baton_requests_total") == n
    assert delta("router", "baton_prompt_tokens_total", model=model) == prompt_tokens
    assert delta("router", "baton_generation_tokens_total", model=model) == completion_tokens
    assert delta("router", "baton_time_to_first_token_seconds_count", model=model) == n
    assert delta("router", "baton_e2e_request_latency_seconds_count", model=model) == n
    assert delta("router", "baton_inter_token_latency_seconds_count", model=model) == completion_tokens - n
    assert delta("router", "baton_e2e_request_latency_seconds_sum") > delta(
        "router", "baton_time_to_first_token_seconds_sum") > 0

    # The control plane: its decisions, its transfers, the workers it sees.
    assert delta("control_plane", "baton_scheduling_decisions_total", policy="kv-aware",
                 decision="disaggregated") == n
    assert delta("control_plane", "baton_kv_transfers_placed_total") == n
    assert delta("control_plane", "baton_kv_transfers_total", outcome="failed") == 0
    assert delta("control_plane", "baton_kv_recomputes_total") == 0
    backend = loaded[0]["backend"]
    assert delta("control_plane", "baton_kv_transfer_bytes_total", backend=backend) == sum(
        kv["bytes"] for kv in loaded) > 0
    registered = asyncio.run(list_workers(stack.etcd_endpoint, stack.etcd_prefix))
    for role in ("prefill", "decode"):
        ready = sum(w.role == role and w.state == "ready" for w in registered)
        assert value(after["control_plane"], "baton_workers", role=role, state="ready", model=model) == ready > 0

    # Each worker: its engine's own metrics, and the decode worker's KV loads.
    assert delta("prefill", "vllm:request_success_total") == n
    assert delta("prefill", "vllm:prompt_tokens_total") == prompt_tokens
    assert delta("prefill", "vllm:generation_tokens_total") == n  # the first token of each answer
    assert delta("decode", "vllm:request_success_total") == n
    assert delta("decode", "vllm:generation_tokens_total") == completion_tokens - n  # after prefill's first
    assert delta("decode", "baton_kv_loads_total", backend=backend, outcome="loaded") == n
    assert delta("decode", "baton_kv_loaded_bytes_total", backend=backend) == sum(kv["bytes"] for kv in loaded)
    assert delta("decode", "baton_kv_load_duration_seconds_count", backend=backend) == n
    for role in ("prefill", "decode"):
        names = {name for name, _, _ in after[role]}
        assert {"vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total"} <= names, role

    # Grafana's dashboard reads only what the services export.
    dashboard = json.loads((REPO / "deploy/observability/grafana/dashboards/baton.json").read_text())
    used = {name for panel in dashboard["panels"] for target in panel.get("targets", [])
            for name in re.findall(r"(?:baton_|vllm:)[a-z0-9_:]+", target["expr"])}
    exported = {name for samples in after.values() for name, _, _ in samples}
    assert used and used <= exported, sorted(used - exported)
