"""The ``baton`` command: ``up`` runs the whole local stack; the other
subcommands run one service each (as docker compose does) or inspect it."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys
import time
from typing import Any

from baton.config import Settings, load_settings

# flag → Settings field, for flags shared by several subcommands
_COMMON_FLAGS: list[tuple[str, str, type, str]] = [
    ("--etcd", "etcd_endpoint", str, "etcd host:port"),
    ("--etcd-prefix", "etcd_prefix", str, "registry key prefix"),
    ("--model", "model", str, "HF model directory (default: embedded SmolLM2-135M-Instruct)"),
    ("--served-model-name", "served_model_name", str, "model name clients use"),
    ("--host", "host", str, "interface to bind"),
    ("--advertise-host", "advertise_host", str, "host others use to reach this service"),
    ("--log-level", "log_level", str, "debug, info, warning, error"),
    ("--max-model-len", "max_model_len", int, "context length"),
    ("--control-plane", "control_plane_address", str, "control plane host:port"),
]
_WORKER_FLAGS: list[tuple[str, str, type, str]] = [
    ("--worker-id", "worker_id", str, "registry id (default: generated)"),
    ("--labels", "labels", str, "labels requests can require, e.g. region=eu,zone=a"),
    ("--grpc-port", "grpc_port", int, "gRPC port (0: any free port)"),
    ("--kv-port", "kv_port", int, "decode: port of the engine's grpc KV server (0: any free port)"),
    ("--cpu-cores", "cpu_cores", str, "CPU build: cores to pin the engine to, e.g. 0 or 0-1"),
    ("--kv-cache-gib", "kv_cache_gib", int, "CPU build: KV cache space in GiB"),
    ("--kv-cache-blocks", "kv_cache_blocks", int, "cap the engine's KV cache at this many blocks (0: no cap)"),
    ("--gpu-memory-utilization", "gpu_memory_utilization", float, "CUDA build: GPU memory fraction"),
    ("--kv-fetch-timeout-ms", "kv_fetch_timeout_ms", int, "decode: wait this long for KV, then recompute"),
    ("--kv-push-start-timeout-ms", "kv_push_start_timeout_ms", int,
     "decode: recompute at once if the KV push has not begun by then"),
]
_METRICS_FLAG = ("--metrics-port", "metrics_port", int, "Prometheus /metrics port (0: any free port)")
_MODELS_FLAG = ("--models", "models", str,
                "several models at once: NAME=DIRECTORY,... (empty DIRECTORY: the embedded model)")
_ROUTER_FLAGS: list[tuple[str, str, type, str]] = [
    _MODELS_FLAG,
    ("--http-port", "http_port", int, "OpenAI-compatible HTTP port"),
    ("--grpc-port", "router_grpc_port", int, "public gRPC Inference port"),
    ("--api-keys-file", "api_keys_file", str, "TOML file of API key digests and limits (see `baton api-key`)"),
]
_CONTROL_PLANE_FLAGS: list[tuple[str, str, type, str]] = [
    ("--policy", "policy", str, "placement policy: kv-aware (default), least-loaded, round-robin"),
    ("--kv-backend", "kv_backend", str, "how KV moves: nixl (default), collective, grpc"),
    ("--disaggregation", "disaggregation", str,
     "auto (default: the decode worker prefills when predicted faster) or always"),
]
_UP_FLAGS = _COMMON_FLAGS + _CONTROL_PLANE_FLAGS + [
    _MODELS_FLAG,
    ("--http-port", "http_port", int, "OpenAI-compatible HTTP port"),
    ("--router-grpc-port", "router_grpc_port", int, "public gRPC Inference port"),
    ("--kv-cache-gib", "kv_cache_gib", int, "CPU build: KV cache space of each engine in GiB"),
    ("--kv-cache-blocks", "kv_cache_blocks", int, "cap each engine's KV cache at this many blocks (0: no cap)"),
    ("--api-keys-file", "api_keys_file", str, "router: TOML file of API key digests and limits"),
]


def _add(parser: argparse.ArgumentParser, flags) -> None:
    for flag, dest, kind, help_text in flags:
        parser.add_argument(flag, dest=dest, type=kind, default=None, help=help_text)


def _settings(args: argparse.Namespace, flags) -> Settings:
    overrides: dict[str, Any] = {dest: getattr(args, dest, None) for _, dest, _, _ in flags}
    return load_settings(overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="baton", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run etcd, control plane, router and workers locally")
    _add(up, _UP_FLAGS)
    up.add_argument("--prefill", type=int, default=1, help="number of prefill workers")
    up.add_argument("--decode", type=int, default=1, help="number of decode workers")
    up.add_argument("--log-dir", default=None, help="where service logs go (default: a new run folder)")

    # The control plane binds the port of --control-plane host:port.
    for name, flags in (("control-plane", [*_CONTROL_PLANE_FLAGS, _METRICS_FLAG]),
                        ("router", _ROUTER_FLAGS),
                        ("prefill-worker", [*_WORKER_FLAGS, _METRICS_FLAG]),
                        ("decode-worker", [*_WORKER_FLAGS, _METRICS_FLAG])):
        p = sub.add_parser(name, help=f"run one {name}")
        _add(p, _COMMON_FLAGS + flags)

    scale = sub.add_parser("scale", help="add workers to, or drain workers of, a running `baton up`")
    scale.add_argument("--prefill", type=int, default=None, help="prefill workers per model (default: as now)")
    scale.add_argument("--decode", type=int, default=None, help="decode workers per model (default: as now)")
    scale.add_argument("--run", default=None, help="that `baton up`'s log folder (default: the latest started)")
    scale.add_argument("--wait-s", type=float, default=600,
                       help="wait until the registry shows the new counts (0: return at once)")

    health = sub.add_parser("health", help="health check of a Baton service (exit 0 when it serves): for "
                                           "container and Kubernetes probes")
    health.add_argument("address", help="host:port of a worker's or the control plane's gRPC server (gRPC health, "
                                         "over the service TLS settings), or the router's http(s)://HOST:PORT/health")
    health.add_argument("--timeout-s", type=float, default=3.0)

    api_key = sub.add_parser("api-key", help="make a new API key: prints it once, and its entry for a keys file")
    api_key.add_argument("name", help="what metrics and logs call the key, e.g. team-a")
    api_key.add_argument("--append-to", default=None, metavar="FILE",
                         help="append the entry (the key's SHA-256, never the key) to this keys file")

    status = sub.add_parser("status", help="workers from etcd with transfer counters")
    _add(status, [f for f in _COMMON_FLAGS if f[1] in ("etcd_endpoint", "etcd_prefix", "control_plane_address")])
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument("--watch", type=float, nargs="?", const=2.0, default=None, metavar="SECONDS",
                        help="redraw every SECONDS (default 2) until Ctrl-C")
    status.add_argument("--run", default=None,
                        help="a `baton up` log folder to read endpoints from (default, when no --etcd or "
                             "--control-plane is given: the latest `baton up` still running)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, RuntimeError) as exc:
        print(f"baton {args.command}: {exc}", file=sys.stderr)
        return 2


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "up":
        from baton.local_stack import run_up

        return run_up(args, _settings(args, _UP_FLAGS))
    if args.command == "control-plane":
        from control_plane.main import serve

        asyncio.run(serve(_settings(args, _COMMON_FLAGS + _CONTROL_PLANE_FLAGS + [_METRICS_FLAG])))
        return 0
    if args.command == "router":
        from router.main import serve

        asyncio.run(serve(_settings(args, _COMMON_FLAGS + _ROUTER_FLAGS)))
        return 0
    if args.command == "prefill-worker":
        from prefill_worker.main import serve

        asyncio.run(serve(_settings(args, _COMMON_FLAGS + _WORKER_FLAGS + [_METRICS_FLAG])))
        return 0
    if args.command == "decode-worker":
        from decode_worker.main import serve

        asyncio.run(serve(_settings(args, _COMMON_FLAGS + _WORKER_FLAGS + [_METRICS_FLAG])))
        return 0
    if args.command == "scale":
        from baton import tls
        from baton.up_control import scale

        tls.use(tls.Tls.internal(load_settings()))
        print(json.dumps(scale(args.run, args.prefill, args.decode, args.wait_s)))
        return 0
    if args.command == "health":
        return _health(args.address, args.timeout_s)
    if args.command == "api-key":
        return _new_api_key(args.name, args.append_to)
    if args.command == "status":
        from baton import tls
        from baton.status import collect_status, render_table

        settings = _settings(args, _COMMON_FLAGS)
        tls.use(tls.Tls.internal(settings))
        given = args.etcd_endpoint or args.control_plane_address or any(
            f"BATON_{name}" in os.environ for name in ("ETCD_ENDPOINT", "CONTROL_PLANE_ADDRESS"))
        if args.run or not given:
            from baton.up_control import read_run_file

            try:
                run = read_run_file(args.run)
            except RuntimeError:
                if args.run:
                    raise
                run = None  # none running: the defaults
            if run is not None:
                settings = dataclasses.replace(settings, etcd_endpoint=run["etcd"], etcd_prefix=run["etcd_prefix"],
                                               control_plane_address=run["control_plane"])
        while True:
            status = asyncio.run(collect_status(settings))
            shown = json.dumps(status, indent=2) if args.json else render_table(status)
            if args.watch is None:
                print(shown)
                return 0
            # Home and clear, then the table: a terminal redraws in place.
            print(f"\x1b[H\x1b[2J{time.strftime('%H:%M:%S')}  every {args.watch:g} s, Ctrl-C to stop\n{shown}",
                  flush=True)
            time.sleep(args.watch)
    raise ValueError(f"unknown command {args.command}")



def _health(address: str, timeout_s: float) -> int:
    if address.startswith(("http://", "https://")):
        import ssl
        import urllib.request

        try:
            # A probe of the service's own liveness, not of its certificate's name.
            with urllib.request.urlopen(address, timeout=timeout_s,
                                        context=ssl._create_unverified_context()) as response:
                print(f"{address}: {response.status}")
                return 0 if response.status == 200 else 1
        except OSError as exc:
            print(f"{address}: {exc}", file=sys.stderr)
            return 1
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from baton import tls
    from baton.rpc import sync_channel

    tls.use(tls.Tls.internal(load_settings()))
    with sync_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
        except grpc.RpcError as exc:
            print(f"{address}: {exc.code().name} {exc.details() or ''}".rstrip(), file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{address}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1

def _new_api_key(name: str, append_to: str | None) -> int:
    from router.api_keys import new_key

    if not name.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"key name {name!r}: letters, digits, - and _ only")
    key, sha256 = new_key()
    entry = f'[keys.{name}]\nsha256 = "{sha256}"\n'
    if append_to:
        with open(append_to, "a") as keys_file:
            keys_file.write("\n" + entry)
        os.chmod(append_to, 0o600)
    print(f"API key for {name} (shown once; Baton keeps only its SHA-256):\n{key}\n", file=sys.stderr)
    print(key if append_to else entry, end="\n" if append_to else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())

