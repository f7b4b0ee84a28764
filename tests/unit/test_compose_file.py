"""docker-compose.yml, checked without a Docker engine (none runs here): the
compose-spec schema (check-jsonschema's bundled copy), then every
cross-reference: `depends_on` targets and conditions, volumes, profiles,
ports against the commands that bind them, healthchecks that run `baton
health` on the port the service serves, commands `baton` parses, and every
BATON_* variable a setting Baton reads. tests/e2e/test_compose_topology.py
runs the same services and checks with `baton up`."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import yaml

from baton.cli import build_parser
from baton.config import Settings

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
BATON_COMMANDS = {"control-plane", "router", "prefill-worker", "decode-worker"}
OTEL_VARIABLES = {"OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_INSECURE"}


def spec() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def baton_services(compose: dict) -> dict[str, dict]:
    return {name: s for name, s in compose["services"].items() if str(s.get("image", "")).startswith("baton:")}


def flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_the_file_is_valid_against_the_compose_spec():
    checked = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
                              str(COMPOSE)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_baton_services_run_commands_baton_parses():
    compose = spec()
    services = baton_services(compose)
    assert set(services) == {"control-plane", "router", "prefill", "decode", "prefill-gpu", "decode-gpu"}
    parser = build_parser()
    for name, service in services.items():
        args = parser.parse_args(service["command"])  # exits (fails the test) on a bad flag
        assert args.command in BATON_COMMANDS, name


def test_every_variable_is_a_setting_baton_reads():
    known = {f"BATON_{f.name.upper()}" for f in fields(Settings)}
    for name, service in baton_services(spec()).items():
        for variable in service["environment"]:
            assert variable in known or variable in OTEL_VARIABLES, f"{name} sets {variable}, which nothing reads"
        env = service["environment"]
        assert env["BATON_ETCD_ENDPOINT"].partition(":")[0] in spec()["services"]
        assert env["BATON_CONTROL_PLANE_ADDRESS"] == "control-plane:" + flag(
            spec()["services"]["control-plane"]["command"], "--control-plane").rpartition(":")[2]
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"].split("//")[1].partition(":")[0] in spec()["services"]


def test_depends_on_names_services_and_waits_for_health():
    services = spec()["services"]
    for name, service in services.items():
        for target, condition in service.get("depends_on", {}).items():
            assert target in services, f"{name} depends on {target}, which is not a service"
            if condition["condition"] == "service_healthy":
                assert "healthcheck" in services[target], f"{name} waits for {target}'s health; it has no check"
    for name in baton_services(spec()):
        waits = services[name]["depends_on"]
        assert waits["etcd"]["condition"] == "service_healthy", name
        if name != "control-plane":
            assert waits["control-plane"]["condition"] == "service_healthy", name


def test_every_baton_service_and_etcd_has_a_healthcheck_on_the_port_it_serves():
    compose = spec()
    parser = build_parser()
    for name, service in baton_services(compose).items():
        check = service["healthcheck"]["test"]
        assert check[:3] == ["CMD", "baton", "health"], name
        assert parser.parse_args(check[2:]).command == "health"
        command = service["command"]
        if command[0] == "router":
            assert check[3] == f"http://127.0.0.1:{flag(command, '--http-port')}/health"
        elif command[0] == "control-plane":
            assert check[3] == "127.0.0.1:" + flag(command, "--control-plane").rpartition(":")[2]
        else:
            assert check[3] == f"127.0.0.1:{flag(command, '--grpc-port')}", name
    assert "etcdctl" in compose["services"]["etcd"]["healthcheck"]["test"]


def test_workers_scale_without_per_replica_settings():
    for name, service in baton_services(spec()).items():
        assert "container_name" not in service, name
        if service["command"][0].endswith("-worker"):
            assert "--worker-id" not in service["command"], f"{name}: replicas must generate their ids"
            assert "ports" not in service, f"{name}: a published port cannot be shared by replicas"
            assert service["environment"]["BATON_ADVERTISE_HOST"] == "auto"


def test_volumes_and_ports_are_declared_and_published_where_served():
    compose = spec()
    declared = set(compose["volumes"])
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (REPO / source).exists(), f"{name} mounts {source}, which is not in the repository"
            else:
                assert source in declared, f"{name} mounts volume {source}, which is not declared"
    assert "models" in declared and all(any(v.startswith("models:") for v in s["volumes"])
                                        for s in baton_services(compose).values())
    router = compose["services"]["router"]
    assert set(router["ports"]) == {f"{flag(router['command'], '--http-port')}:8000",
                                    f"{flag(router['command'], '--grpc-port')}:50052"}


def test_cpu_is_the_default_profile_and_gpu_workers_reserve_a_gpu():
    compose = spec()
    env_file = (REPO / ".env").read_text()
    assert "COMPOSE_PROFILES=cpu" in env_file.splitlines()
    for role in ("prefill", "decode"):
        cpu, gpu = compose["services"][role], compose["services"][f"{role}-gpu"]
        assert cpu["profiles"] == ["cpu"] and cpu["image"] == "baton:cpu"
        assert gpu["profiles"] == ["gpu"] and gpu["image"] == "baton:gpu"
        assert gpu["command"] == cpu["command"]
        assert gpu["build"]["args"]["VLLM_PACKAGE"].startswith("vllm==")
        devices = gpu["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
        assert gpu["networks"]["default"]["aliases"] == [role]


def test_the_dockerfile_is_multi_stage_pinned_and_runs_as_a_user():
    dockerfile = (REPO / "Dockerfile").read_text()
    stages = [line for line in dockerfile.splitlines() if line.startswith("FROM ")]
    assert len(stages) >= 2 and stages[-1].endswith("AS runtime")
    base = next(line for line in dockerfile.splitlines() if line.startswith("ARG PYTHON_IMAGE="))
    assert base.count(".") >= 2, f"{base}: pin the base image's full version"
    runtime = dockerfile[dockerfile.index("AS runtime"):]
    assert "\nUSER baton" in runtime and "python -m baton.model_store" in runtime
    assert runtime.index("\nUSER baton") < runtime.index("python -m baton.model_store")  # the user's own cache
    for service in baton_services(spec()).values():
        assert service["build"]["target"] == "runtime"
