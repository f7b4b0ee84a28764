"""``kv_transfer_params``: vLLM passes them as ``dict[str, Any]``; this module
is the only place that builds or reads them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kv_transfer.transport import FALLBACK_BACKEND

_KEY = "baton"


@dataclass(frozen=True)
class ProducerParams:
    """On a prefill request: hand the prompt's KV to ``kv_target``, the
    decode engine's endpoint for ``backend``."""

    transfer_id: str
    kv_target: str
    traceparent: str = ""
    backend: str = FALLBACK_BACKEND

    def to_dict(self) -> dict[str, Any]:
        return {_KEY: {"role": "producer", "transfer_id": self.transfer_id, "kv_target": self.kv_target,
                       "traceparent": self.traceparent, "backend": self.backend}}


@dataclass(frozen=True)
class ConsumerParams:
    """On a decode request: the first ``remote_tokens`` prompt tokens' KV
    arrives through transfer ``transfer_id``."""

    transfer_id: str
    remote_tokens: int
    backend: str = FALLBACK_BACKEND
    source: str = ""  # the prefill engine's endpoint for ``backend`` (pull backends)
    traceparent: str = ""  # the decode call's: the engine's load joins the request's trace

    def to_dict(self) -> dict[str, Any]:
        return {_KEY: {"role": "consumer", "transfer_id": self.transfer_id, "remote_tokens": self.remote_tokens,
                       "backend": self.backend, "source": self.source, "traceparent": self.traceparent}}


@dataclass(frozen=True)
class LoadReport:
    """Returned by the decode engine on the finished request's output."""

    transfer_id: str
    external_tokens: int  # prompt tokens the scheduler took from the transfer
    failed: bool  # the load failed and the prompt was recomputed
    bytes: int = 0  # KV bytes the load moved (a restored block included)
    seconds: float = 0.0  # from the load's start (waiting for the bytes included) until they were in the cache

    def to_dict(self) -> dict[str, Any]:
        return {_KEY: {"role": "load_report", "transfer_id": self.transfer_id,
                       "external_tokens": self.external_tokens, "failed": self.failed, "bytes": self.bytes,
                       "seconds": self.seconds}}


def parse(params: dict[str, Any] | None) -> ProducerParams | ConsumerParams | LoadReport | None:
    body = (params or {}).get(_KEY)
    if not isinstance(body, dict):
        return None
    role = body.get("role")
    if role == "producer":
        return ProducerParams(str(body["transfer_id"]), str(body["kv_target"]), str(body.get("traceparent", "")),
                              str(body.get("backend", FALLBACK_BACKEND)))
    if role == "consumer":
        return ConsumerParams(str(body["transfer_id"]), int(body["remote_tokens"]), str(body.get("backend", FALLBACK_BACKEND)),
                              str(body.get("source", "")), str(body.get("traceparent", "")))
    if role == "load_report":
        return LoadReport(str(body["transfer_id"]), int(body["external_tokens"]), bool(body["failed"]),
                          int(body.get("bytes", 0)), float(body.get("seconds", 0.0)))
    return None
