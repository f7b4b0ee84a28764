"""docker-compose.yml is valid: its Baton services run only subcommands
`baton` knows, export traces to the collector and serve metrics where
Prometheus scrapes them."""

from pathlib import Path

import yaml

from baton.cli import build_parser

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"


def baton_services(spec: dict) -> dict[str, dict]:
    return {name: s for name, s in spec["services"].items() if s.get("image") == "baton:latest"}


def test_compose_services_run_valid_baton_commands():
    spec = yaml.safe_load(COMPOSE.read_text())
    services = baton_services(spec)
    assert set(services) == {"control-plane", "router", "prefill", "decode"}
    parser = build_parser()
    for service in services.values():
        args = parser.parse_args(service["command"])  # exits (fails the test) on a bad flag
        assert args.command in ("control-plane", "router", "prefill-worker", "decode-worker")
        env = service["environment"]
        assert env["BATON_ETCD_ENDPOINT"] == "etcd:2379"
        assert env["OTEL_TRACES_EXPORTER"] == "otlp"
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4317"
    assert "8000:8000" in services["router"]["ports"]


def test_compose_mounts_the_observability_files_of_the_repository():
    spec = yaml.safe_load(COMPOSE.read_text())
    assert {"otel-collector", "jaeger", "prometheus", "grafana"} <= set(spec["services"])
    for name in ("otel-collector", "prometheus", "grafana"):
        for volume in spec["services"][name]["volumes"]:
            source = volume.split(":")[0]
            assert (REPO / source).exists(), f"{name} mounts {source}, which is not in the repository"
