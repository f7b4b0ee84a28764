"""``kv_transfer_params``: vLLM passes them as ``dict[str, Any]``; this module
is the only place that builds or reads them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

_KEY = "baton"


@dataclass(frozen=True)
class ProducerParams:
    """On a prefill request: push the prompt's KV to ``kv_target``."""

    transfer_id: str
    kv_target: str  # host:port of the decode worker's KVTransfer endpoint
    traceparent: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {_KEY: {"role": "producer", "transfer_id": self.transfer_id,
                       "kv_target": self.kv_target, "traceparent": self.traceparent}}


@dataclass(frozen=True)
class ConsumerParams:
    """On a decode request: the first ``remote_tokens`` prompt tokens' KV
    arrives through transfer ``transfer_id``."""

    transfer_id: str
    remote_tokens: int

    def to_dict(self) -> dict[str, Any]:
        return {_KEY: {"role": "consumer", "transfer_id": self.transfer_id,
                       "remote_tokens": self.remote_tokens}}


@dataclass(frozen=True)
class LoadReport:
    """Returned by the decode engine on the finished request's output."""

    transfer_id: str
    external_tokens: int  # prompt tokens the scheduler took from the transfer
    failed: bool  # the load failed and the prompt was recomputed

    def to_dict(self) -> dict[str, Any]:
        return {_KEY: {"role": "load_report", "transfer_id": self.transfer_id,
                       "external_tokens": self.external_tokens, "failed": self.failed}}


def parse(params: dict[str, Any] | None) -> ProducerParams | ConsumerParams | LoadReport | None:
    body = (params or {}).get(_KEY)
    if not isinstance(body, dict):
        return None
    role = body.get("role")
    if role == "producer":
        return ProducerParams(str(body["transfer_id"]), str(body["kv_target"]), str(body.get("traceparent", "")))
    if role == "consumer":
        return ConsumerParams(str(body["transfer_id"]), int(body["remote_tokens"]))
    if role == "load_report":
        return LoadReport(str(body["transfer_id"]), int(body["external_tokens"]), bool(body["failed"]))
    return None
