"""Typed configuration, read in this module only.

Precedence, lowest first: field defaults, the TOML file named by
``BATON_CONFIG`` (keys are field names), environment variables
``BATON_<FIELD>`` (upper case), then explicit overrides (command-line flags).
Every service takes the one ``Settings`` object and reads the fields it needs.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, get_type_hints


@dataclass(frozen=True)
class Settings:
    # --- shared by every service ---------------------------------------
    etcd_endpoint: str = "127.0.0.1:2379"
    """host:port of etcd; `baton up` starts an embedded one when unset."""
    etcd_prefix: str = "/baton/v1"
    """Key prefix of the registry; workers live under <prefix>/workers/<role>/<id>."""
    model: str = ""
    """HF model directory; empty means the embedded SmolLM2-135M-Instruct."""
    served_model_name: str = ""
    """Name clients use in requests; defaults to the model directory's name."""
    models: str = ""
    """Router and `baton up`: serve several models at once, "NAME=DIRECTORY,..."
    (an empty DIRECTORY is the embedded model); requests route by their
    `model`. Empty: the one `model`, named `served_model_name`."""
    host: str = "127.0.0.1"
    """Interface every service binds to."""
    advertise_host: str = ""
    """Host other services use to reach this one; defaults to `host`. "auto":
    this machine's address on the route to etcd (a container's or pod's own
    IP), so replicas of one service need no configuration of their own."""
    log_level: str = "info"
    tls_cert_file: str = ""
    """TLS between Baton's services (every gRPC hop: router, control plane,
    workers, etcd, the `grpc` KV data plane): this service's certificate
    (PEM; its names must match the address peers dial)."""
    tls_key_file: str = ""
    """The private key of `tls_cert_file` (PEM)."""
    tls_ca_file: str = ""
    """The CA that signed the services' certificates; clients check servers
    against it (set alone: TLS clients only, e.g. `baton status`)."""
    tls_server_name: str = ""
    """The name clients check servers' certificates for, instead of the
    address they dial: worker addresses are container or pod IPs no
    certificate can list ahead of time ("" : the dialed host)."""
    tls_mutual: bool = False
    """Servers also demand a client certificate from `tls_ca_file`: only Baton's
    own services can call them."""
    tls_allow_plaintext_kv: bool = False
    """With TLS on, allow `kv_backend` nixl or collective, whose KV moves
    unencrypted (UCX / Gloo / NCCL): for a fabric you trust."""
    https_cert_file: str = ""
    """Router: serve HTTPS and TLS gRPC on its public ports with this
    certificate (clients authenticate with API keys)."""
    https_key_file: str = ""
    """Router: the private key of `https_cert_file`."""

    # --- workers ----------------------------------------------------------
    worker_id: str = ""
    """Unique id in the registry; generated when empty."""
    grpc_port: int = 0
    """Port of a worker's or the control plane's gRPC server; 0 picks a free one."""
    kv_port: int = 0
    """Decode worker: port of the KVTransfer endpoint; 0 picks a free one."""
    metrics_port: int = 0
    """Control plane and workers: port of their Prometheus /metrics; 0 picks a
    free one (a worker publishes its own in the registry). The router serves
    /metrics on its HTTP port."""
    labels: str = ""
    """Worker: labels placement can require, "key=value,key=value" (e.g. "region=eu")."""
    lease_ttl_s: int = 5
    """Registry lease; a worker that stops refreshing vanishes after this."""
    drain_timeout_s: float = 20.0
    """Worker: on SIGTERM it leaves the registry at once and lets running
    requests finish for up to this long; the router moves those still
    running then to other workers."""
    cpu_cores: str = ""
    """CPU build: cores to pin the engine's threads to, e.g. "0" or "0-1"."""
    kv_cache_gib: int = 1
    """CPU build: KV cache space of one engine in GiB."""
    kv_cache_blocks: int = 0
    """Cap an engine's KV cache at this many blocks (0: what its space allows);
    benchmarks shrink caches with it to put prefix caching under pressure."""
    kv_events: bool = True
    """Worker: publish the engine's KV cache events to the control plane's
    prefix index (off: the index learns this worker's prefixes from routing)."""
    gpu_memory_utilization: float = 0.5
    """CUDA build: fraction of GPU memory one engine may use."""
    max_model_len: int = 2048
    dtype: str = "auto"
    """Engines' dtype: "auto" (the model's; float32 on an x86 CPU without
    native bfloat16, where it runs ~4x faster), "float32", "bfloat16" or
    "float16"."""
    enforce_eager: bool = True
    """Skip torch.compile: start in ~45 s instead of ~4 min on this CPU."""
    kv_fetch_timeout_ms: int = 15_000
    """Decode: how long to wait for a prompt's KV before recomputing it."""
    kv_push_start_timeout_ms: int = 3_000
    """Decode: recompute at once when a prompt's KV push has not even begun
    by then (the prefill worker opens it before answering its first token)."""
    staging_capacity_mib: int = 1024
    """Decode: bound on KV bytes staged and not yet loaded."""
    staging_ttl_s: float = 60.0
    """Decode: staged KV nobody fetched is dropped after this."""
    kv_chunk_bytes: int = 1 << 20
    """Size of one KV chunk on the wire; well under gRPC's 4 MiB message limit."""

    # --- control plane ----------------------------------------------------
    control_plane_address: str = "127.0.0.1:50051"
    kv_backend: str = "nixl"
    """How KV moves from prefill to decode: "nixl" (one-sided reads between the
    engines' caches; the fastest measured), "collective" (torch.distributed
    send/recv: Gloo on CPU, NCCL on GPU) or "grpc" (needs nothing else).
    A pair that cannot use it falls back to grpc, logged at warning."""
    policy: str = "kv-aware"
    """Placement: "kv-aware" (prefix cache and per-phase load), "least-loaded" or "round-robin"."""
    disaggregation: str = "auto"
    """"auto": a decode worker prefills a prompt itself when that is predicted
    faster (little of it uncached there, or the prefill pool backed up);
    "always": every prompt runs on a prefill worker while one is live."""
    transfer_ttl_s: float = 330.0
    """Transfers not reported consumed or failed within this are expired;
    longer than request_timeout_s, so a running decode never counts as gone."""

    # --- router -----------------------------------------------------------
    http_port: int = 8000
    router_grpc_port: int = 50052
    frontend_args: str = ""
    """Extra `vllm serve` flags for the router's OpenAI frontend (vLLM's own),
    e.g. "--chat-template t.jinja --tool-call-parser hermes --enable-auto-tool-choice"."""
    request_timeout_s: float = 300.0
    decode_moves: int = 2
    """Router: how often one request may move to another decode worker when
    its decode worker fails or drains mid-answer (0: the client gets the error)."""
    decode_handoffs: bool = True
    """Router: a draining decode worker's running answers move with their KV
    (sent over the KV data plane); off, they move as after a failure (the
    receiving worker recomputes the prompt and the tokens streamed)."""
    api_keys_file: str = ""
    """Router: a TOML file of API keys, stored as SHA-256 digests, with optional
    per-key limits (see README "Security"; `baton api-key NAME` makes one).
    With any key configured, every request but /health, /version and /metrics
    needs one (HTTP 401, gRPC UNAUTHENTICATED otherwise)."""
    api_keys: str = ""
    """Router: more API keys, "NAME:SHA256,...", with the default limits below."""
    key_requests_per_minute: int = 0
    """Router: default requests per minute of an API key (0: no limit)."""
    key_tokens_per_minute: int = 0
    """Router: default tokens (prompt + generated) per minute of an API key (0: no limit)."""
    key_concurrent_streams: int = 0
    """Router: default generation requests an API key may have in progress at once (0: no limit)."""
    max_request_body_bytes: int = 4 << 20
    """Router: larger HTTP request bodies are refused (413) before they are read whole (0: no limit)."""
    max_tokens_cap: int = 0
    """Router: a request may ask to generate at most this many tokens (400 if it
    asks more; requests that ask none get at most this). 0: the model's limit."""
    stream_write_timeout_s: float = 30.0
    """Router: a client that stops reading its answer is dropped, and its request
    aborted on the engines, once a write has waited this long (0: never)."""
    max_requests_per_decode_worker: int = 256
    """Router: generation requests it admits at once, per live decode worker
    of the model (streaming or queued); beyond that it answers HTTP 429 /
    gRPC RESOURCE_EXHAUSTED with Retry-After at once instead of queueing
    without bound. Each router counts its own. 0: no bound."""


_ENV_PREFIX = "BATON_"


def _coerce(value: Any, kind: type) -> Any:
    if kind is bool and isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"not a boolean: {value!r}")
    return kind(value)


def load_settings(overrides: dict[str, Any] | None = None, env: dict[str, str] | None = None) -> Settings:
    """Build Settings from defaults, file, environment and overrides.

    Unknown keys in the file or overrides are an error naming the key, so a
    typo never silently falls back to a default.
    """
    env = os.environ if env is None else env
    hints = get_type_hints(Settings)
    known = {f.name for f in fields(Settings)}
    values: dict[str, Any] = {}

    config_path = env.get("BATON_CONFIG")
    if config_path:
        data = tomllib.loads(Path(config_path).read_text())
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"{config_path}: unknown settings {sorted(unknown)}; known: {sorted(known)}")
        values.update(data)
    for name in known:
        raw = env.get(_ENV_PREFIX + name.upper())
        if raw is not None:
            values[name] = raw
    for name, value in (overrides or {}).items():
        if name not in known:
            raise ValueError(f"unknown setting {name!r}")
        if value is not None:
            values[name] = value

    coerced = {}
    for name, value in values.items():
        try:
            coerced[name] = _coerce(value, hints[name])
        except (TypeError, ValueError) as exc:
            raise ValueError(f"setting {name}={value!r}: expected {hints[name].__name__}") from exc
    settings = Settings(**coerced)
    _validate(settings)
    return settings


def _validate(s: Settings) -> None:
    if s.lease_ttl_s < 2:
        raise ValueError("lease_ttl_s must be >= 2 (the lease is refreshed every ttl/3 s)")
    if not 0 < s.kv_chunk_bytes <= 3 << 20:
        raise ValueError("kv_chunk_bytes must be in (0, 3 MiB]: gRPC refuses messages over 4 MiB")
    from kv_transfer.transport import check_backend

    check_backend(s.kv_backend)
    if s.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, not {s.dtype!r}")
    if s.disaggregation not in ("auto", "always"):
        raise ValueError(f"disaggregation must be 'auto' or 'always', not {s.disaggregation!r}")
    for name in ("key_requests_per_minute", "key_tokens_per_minute", "key_concurrent_streams",
                 "max_request_body_bytes", "max_tokens_cap", "stream_write_timeout_s"):
        if getattr(s, name) < 0:
            raise ValueError(f"{name} must be >= 0, not {getattr(s, name)!r}")
    from baton.tls import check as check_tls

    check_tls(s)
    if s.api_keys_file or s.api_keys:
        from router.api_keys import KeyRing

        KeyRing.load(s.api_keys_file, s.api_keys, key_limits(s))  # errors name the file, key and field
    if s.transfer_ttl_s <= s.request_timeout_s:
        raise ValueError("transfer_ttl_s must exceed request_timeout_s, or running requests expire")


def key_limits(s: Settings):
    """The limits of an API key that sets none of its own."""
    from router.api_keys import KeyLimits

    return KeyLimits(s.key_requests_per_minute, s.key_tokens_per_minute, s.key_concurrent_streams)


def advertise_host(settings: Settings) -> str:
    """The host other services reach this one at."""
    if settings.advertise_host == "auto":
        return _address_towards(settings.etcd_endpoint.rpartition(":")[0] or "127.0.0.1")
    return settings.advertise_host or settings.host


def _address_towards(host: str) -> str:
    import socket

    # A UDP "connect" sends nothing: it only asks the kernel which local
    # address routes to ``host``.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((socket.gethostbyname(host), 9))
        return probe.getsockname()[0]


def advertised(settings: Settings, port: int) -> str:
    return f"{advertise_host(settings)}:{port}"


def replace(settings: Settings, **changes: Any) -> Settings:
    return dataclasses.replace(settings, **changes)
