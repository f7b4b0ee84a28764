"""deploy/kubernetes, rendered as Kustomize would (namespace, labels,
images: the only transformers it uses) and every object validated against
the Kubernetes 1.37 schemas (kubernetes-validate's bundled copy, strict:
unknown fields refused). Then what a schema cannot see: probes on the ports
the commands serve, one ConfigMap every Baton container reads whose
variables are settings Baton accepts (loaded as a pod would, with test
certificates at the Secrets' paths), workers that request a GPU, Services
that select pods and reach their ports, Secrets named in the README."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from baton.cli import build_parser
from baton.config import load_settings
from tests.e2e.certificates import CertificateAuthority

REPO = Path(__file__).resolve().parents[2]
KUBERNETES = REPO / "deploy" / "kubernetes"
VERSION = "1.37.0"
CLUSTER_SCOPED = {"Namespace"}


def render() -> list[dict]:
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    used = set(kustomization) - {"apiVersion", "kind"}
    assert used <= {"namespace", "labels", "images", "resources"}, f"the test renders only these, not {used}"
    images = {i["name"]: i for i in kustomization.get("images", [])}
    objects = []
    for resource in kustomization["resources"]:
        for obj in yaml.safe_load_all((KUBERNETES / resource).read_text()):
            obj = copy.deepcopy(obj)
            if obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = kustomization["namespace"]
            for group in kustomization.get("labels", []):
                obj["metadata"].setdefault("labels", {}).update(group["pairs"])
            for container in containers(obj):
                name, _, tag = container["image"].partition(":")
                if name in images:
                    container["image"] = f"{images[name].get('newName', name)}:{images[name].get('newTag', tag)}"
            objects.append(obj)
    return objects


def pod_spec(obj: dict) -> dict | None:
    return obj["spec"]["template"]["spec"] if obj["kind"] in ("Deployment", "StatefulSet") else None


def containers(obj: dict) -> list[dict]:
    spec = pod_spec(obj)
    return spec["containers"] if spec else []


def by_name(objects, kind) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def baton_containers(objects) -> list[tuple[dict, dict]]:
    return [(o, c) for o in objects for c in containers(o) if c["image"].startswith("baton:")]


def test_every_object_is_valid_against_the_kubernetes_schemas():
    objects = render()
    assert {o["kind"] for o in objects} >= {"Namespace", "ConfigMap", "Service", "Deployment", "StatefulSet",
                                            "NetworkPolicy"}
    for obj in objects:
        kubernetes_validate.validate(obj, VERSION, strict=True)  # raises, naming the field


def test_a_broken_object_is_caught():
    deployment = copy.deepcopy(by_name(render(), "Deployment")["baton-router"])
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["periodSecond"] = 5
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, VERSION, strict=True)


def test_the_topology_multi_host():
    objects = render()
    deployments, stateful = by_name(objects, "Deployment"), by_name(objects, "StatefulSet")
    assert set(deployments) == {"baton-control-plane", "baton-router", "baton-prefill", "baton-decode"}
    assert set(stateful) == {"baton-etcd"}
    parser = build_parser()
    commands = {parser.parse_args(c["args"]).command for _, c in baton_containers(objects)}
    assert commands == {"control-plane", "router", "prefill-worker", "decode-worker"}
    for role in ("prefill", "decode"):
        resources = deployments[f"baton-{role}"]["spec"]["template"]["spec"]["containers"][0]["resources"]
        assert resources["limits"]["nvidia.com/gpu"] == "1", role
    assert by_name(objects, "Service")["baton-router"]["spec"]["type"] == "LoadBalancer"


def test_probes_run_baton_health_on_the_port_each_command_serves():
    parser = build_parser()
    for obj, container in baton_containers(render()):
        args = container["args"]
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            command = container[probe]["exec"]["command"]
            assert command[:2] == ["baton", "health"] and parser.parse_args(command[1:]).command == "health"
            target = command[2]
            if args[0] == "router":
                assert target == f"https://127.0.0.1:{args[args.index('--http-port') + 1]}/health"
            elif args[0] == "control-plane":
                assert target == "127.0.0.1:" + args[args.index("--control-plane") + 1].rpartition(":")[2]
            else:
                assert target == f"127.0.0.1:{args[args.index('--grpc-port') + 1]}", obj["metadata"]["name"]
            served = {p["containerPort"] for p in container["ports"]}
            assert int(target.split(":")[-1].split("/")[0]) in served


def test_services_select_pods_and_reach_their_ports():
    objects = render()
    pods = {o["metadata"]["name"]: o["spec"]["template"] for o in objects if pod_spec(o)}
    for name, service in by_name(objects, "Service").items():
        selected = [t for t in pods.values()
                    if service["spec"]["selector"].items() <= t["metadata"]["labels"].items()]
        assert selected, f"{name} selects no pod"
        served = {p["containerPort"] for t in selected for c in t["spec"]["containers"] for p in c["ports"]}
        for port in service["spec"]["ports"]:
            assert port.get("targetPort", port["port"]) in served, (name, port)


def test_one_configmap_configures_every_baton_container_as_baton_accepts(tmp_path):
    """The pod's environment (ConfigMap + its own), with test certificates
    and a keys file at the Secrets' paths: Baton's settings load."""
    objects = render()
    config = by_name(objects, "ConfigMap")["baton-config"]["data"]
    ca = CertificateAuthority(tmp_path, "baton")
    issued = ca.issue("service", names=(config["BATON_TLS_SERVER_NAME"],))
    (tmp_path / "keys.toml").write_text(f'[keys.team-a]\nsha256 = "{"0" * 64}"\n')
    files = {"/etc/baton/tls/tls.crt": issued.cert, "/etc/baton/tls/tls.key": issued.key,
             "/etc/baton/tls/ca.crt": ca.cert, "/etc/baton/keys/keys.toml": tmp_path / "keys.toml",
             "/etc/baton/public-tls/tls.crt": issued.cert, "/etc/baton/public-tls/tls.key": issued.key}
    secrets = set()
    for obj, container in baton_containers(objects):
        assert container["envFrom"] == [{"configMapRef": {"name": "baton-config"}}]
        env = {**config, **{e["name"]: e["value"] for e in container.get("env", [])}}
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod_spec(obj)["volumes"]}
        for value in env.values():
            if value.startswith("/etc/baton/"):
                mounted = [n for n, path in mounts.items() if value.startswith(path + "/")]
                assert mounted and "secret" in volumes[mounted[0]], f"{obj['metadata']['name']}: {value} unmounted"
                secrets.add(volumes[mounted[0]]["secret"]["secretName"])
        baton_env = {k: str(files.get(v, v)) for k, v in env.items() if k.startswith("BATON_")}
        settings = load_settings(env=baton_env)  # raises, naming the field
        assert settings.tls_mutual and settings.kv_backend == "grpc"
    readme = (REPO / "README.md").read_text()
    assert secrets == {"baton-tls", "baton-api-keys", "baton-public-tls"}
    for secret in secrets:
        assert re.search(rf"kubectl (-n baton )?create secret (generic|tls) {secret} ", readme), secret


def test_pods_run_restricted():
    for obj in render():
        spec = pod_spec(obj)
        if spec is None:
            continue
        assert spec["securityContext"]["runAsNonRoot"] is True
        for container in spec["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False and context["capabilities"]["drop"] == ["ALL"]
