"""docker-compose.yml is valid and runs only subcommands `baton` knows."""

from pathlib import Path

import yaml

from baton.cli import build_parser

COMPOSE = Path(__file__).resolve().parents[2] / "docker-compose.yml"


def test_compose_services_run_valid_baton_commands():
    spec = yaml.safe_load(COMPOSE.read_text())
    services = spec["services"]
    assert {"etcd", "control-plane", "router", "prefill", "decode"} <= set(services)
    parser = build_parser()
    for name, service in services.items():
        if name == "etcd":
            continue
        args = parser.parse_args(service["command"])  # exits (fails the test) on a bad flag
        assert args.command in ("control-plane", "router", "prefill-worker", "decode-worker")
        assert service["environment"]["BATON_ETCD_ENDPOINT"] == "etcd:2379"
    assert "8000:8000" in services["router"]["ports"]
