"""The observability files docker compose mounts: Prometheus' configuration
passes `promtool check config` and scrapes every Baton service where it
serves /metrics; every query of the Grafana dashboard is valid PromQL
(`promtool check rules`) on a provisioned data source; the collector passes
traces from OTLP to Jaeger. (The e2e metrics test checks that every metric
the dashboard reads is one the services export.)"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
OBSERVABILITY = REPO / "deploy" / "observability"
DASHBOARD = OBSERVABILITY / "grafana" / "dashboards" / "baton.json"


def promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool is missing: `make setup` installs Debian's prometheus package, which has it"
    return path


def dashboard_queries() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [t["expr"] for p in panels if p["type"] != "row" for t in p["targets"]]


def test_prometheus_config_passes_promtool():
    done = subprocess.run([promtool(), "check", "config", str(OBSERVABILITY / "prometheus.yml")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_prometheus_scrapes_every_baton_service_on_its_metrics_port():
    """The router and the control plane by name; workers by DNS, which
    resolves a service's name to every replica (and the GPU workers carry
    the CPU workers' names as aliases)."""
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    config = yaml.safe_load((OBSERVABILITY / "prometheus.yml").read_text())
    targets = {t for job in config["scrape_configs"] for group in job.get("static_configs", [])
               for t in group["targets"]}
    targets |= {f"{name}:{sd['port']}" for job in config["scrape_configs"] for sd in job.get("dns_sd_configs", [])
                for name in sd["names"]}
    expected = set()
    for name, service in compose["services"].items():
        if not str(service.get("image", "")).startswith("baton:"):
            continue
        if service["command"][0] == "router":
            port = service["command"][service["command"].index("--http-port") + 1]
        else:
            port = service["environment"]["BATON_METRICS_PORT"]
        aliases = service.get("networks", {}).get("default", {}).get("aliases", [])
        expected.add(f"{aliases[0] if aliases else name}:{port}")
    assert targets == expected


def test_every_dashboard_query_is_valid_promql(tmp_path):
    queries = dashboard_queries()
    assert len(queries) >= 15
    # Grafana's own variable: what promtool cannot know.
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"baton:dashboard_query_{i}", "expr": q.replace("$__rate_interval", "1m")}
        for i, q in enumerate(queries)]}]}
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rules))
    done = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_dashboard_covers_what_operators_watch_on_provisioned_sources():
    dashboard = json.loads(DASHBOARD.read_text())
    sources = yaml.safe_load((OBSERVABILITY / "grafana" / "provisioning" / "datasources" / "baton.yaml").read_text())
    uids = {s["uid"] for s in sources["datasources"]}
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    for panel in panels:
        assert panel["datasource"]["uid"] in uids and all(t["datasource"]["uid"] in uids for t in panel["targets"])
    text = " ".join(dashboard_queries())
    for metric in ("baton_time_to_first_token_seconds", "baton_inter_token_latency_seconds",
                   "baton_generation_tokens_total", "baton_kv_transfer_bytes_total", "baton_kv_load_duration_seconds",
                   "baton_scheduling_decisions_total", "vllm:num_requests_running", "vllm:kv_cache_usage_perc"):
        assert metric in text, metric
    provider = yaml.safe_load((OBSERVABILITY / "grafana" / "provisioning" / "dashboards" / "baton.yaml").read_text())
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    mounted = {v.split(":")[1]: v.split(":")[0] for v in compose["services"]["grafana"]["volumes"]}
    assert (REPO / mounted[provider["providers"][0]["options"]["path"]] / DASHBOARD.name).exists()


def test_the_collector_passes_traces_from_otlp_to_jaeger():
    config = yaml.safe_load((OBSERVABILITY / "otel-collector.yaml").read_text())
    pipeline = config["service"]["pipelines"]["traces"]
    assert pipeline["receivers"] == ["otlp"] and "grpc" in config["receivers"]["otlp"]["protocols"]
    (exporter,) = pipeline["exporters"]
    assert config["exporters"][exporter]["endpoint"] == "jaeger:4317"
