"""The Baton vLLM v1 KV connector.

Load it with::

    KVTransferConfig(kv_connector="BatonConnector",
                     kv_connector_module_path="kv_transfer.connector",
                     kv_role="kv_producer" | "kv_consumer",
                     kv_load_failure_policy="recompute",
                     kv_connector_extra_config={...see ConnectorOptions})

vLLM needs one class; it builds one instance per role, and each instance
delegates to exactly one half: ``BatonSchedulerSide`` or ``BatonWorkerSide``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorRole,
    KVConnectorTransferResults,
)

from baton.logs import ensure_logging
from kv_transfer.connector.metadata import BatonConnectorMetadata, BatonWorkerMetadata
from kv_transfer.connector.scheduler_side import BatonSchedulerSide
from kv_transfer.connector.transfer_spans import TransferSpans
from kv_transfer.connector.worker_side import BatonWorkerSide
from kv_transfer.transport.base import SINGLE_RANK, ParallelRank, per_rank

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig

__all__ = ["BatonConnector", "ConnectorOptions", "read_endpoints"]


@dataclass(frozen=True)
class ConnectorOptions:
    """``kv_connector_extra_config`` keys."""

    backends: tuple[str, ...] = ("grpc",)  # transfer backends this engine offers
    endpoint_file: str = ""  # where to write this engine's endpoints (JSON, per backend) once its cache is up
    agent_name: str = ""  # nixl: this engine's agent name, unique in the cluster
    fetch_timeout_ms: int = 15_000  # consumer: wait for the KV this long, then recompute
    push_start_timeout_ms: int = 3_000  # consumer: recompute at once if the transfer has not begun by then
    offer_ttl_s: float = 60.0  # producer, pull backends: free blocks nobody read after this;
    # consumer, push backends: drop received KV nobody loaded after this
    kv_host: str = "127.0.0.1"  # consumer, push backends: the address peers reach this engine at
    kv_port: int = 0  # consumer, grpc: port of this engine's KV server (0: any free port)
    # Push backends: bound on KV on its way in host memory, received and not
    # yet loaded (consumer) or copied out and not yet sent (producer).
    staging_capacity_bytes: int = 1 << 30
    chunk_bytes: int = 1 << 20  # producer, grpc: bytes per wire message
    handoff_dir: str = ""  # where the worker service leaves notes of requests it hands off (``kv_transfer.handoff``)
    # TLS of the grpc backend (its KV server and pushes), as ``baton.tls.Tls``.
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_ca_file: str = ""
    tls_mutual: bool = False
    tls_server_name: str = ""

    @classmethod
    def from_extra(cls, extra: dict[str, Any] | None) -> ConnectorOptions:
        extra = extra or {}
        unknown = set(extra) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"BatonConnector: unknown kv_connector_extra_config keys {sorted(unknown)}")
        if "backends" in extra:
            extra = {**extra, "backends": tuple(extra["backends"])}
        return cls(**extra)


def _rank_file(endpoint_file: str, index: int) -> Path:
    return Path(f"{endpoint_file}.rank{index}")


def read_endpoints(endpoint_file: str) -> dict[str, str]:
    """Per backend, how peers reach an engine whose connector wrote
    ``endpoint_file`` (each of its ranks wrote its own part)."""
    first = json.loads(_rank_file(endpoint_file, 0).read_text())
    ranks = [first] + [json.loads(_rank_file(endpoint_file, i).read_text()) for i in range(1, first["world"])]
    return {name: per_rank([r["endpoints"][name] for r in ranks])
            for name in first["endpoints"] if all(name in r["endpoints"] for r in ranks)}


def _parallel_rank() -> ParallelRank:
    from vllm.distributed import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return SINGLE_RANK
    tp, pp = parallel_state.get_tp_group(), parallel_state.get_pp_group()
    return ParallelRank(tp.rank_in_group, tp.world_size, pp.rank_in_group, pp.world_size)


def _model_signature(vllm_config: VllmConfig) -> str:
    hf = vllm_config.model_config.hf_config
    parts = [",".join(getattr(hf, "architectures", None) or ["?"])]
    for attr in ("num_hidden_layers", "hidden_size", "num_key_value_heads", "vocab_size"):
        parts.append(f"{attr}={getattr(hf, attr, '?')}")
    return ";".join(parts)


def _cpu_attention_isa(vllm_config: VllmConfig) -> str:
    """The instruction set of vLLM's CPU attention kernels, which the CPU
    platform picks for every model without MLA (their block layout depends
    on it, see ``TokenSlots``); "" for every other attention."""
    from vllm.platforms import current_platform

    model = vllm_config.model_config
    if not current_platform.is_cpu() or model.use_mla:
        return ""
    from kv_transfer.blocks import cpu_attention_isa

    return cpu_attention_isa(model.dtype, vllm_config.cache_config.block_size, model.get_head_size(),
                             vllm_config.cache_config.cache_dtype)


def _make_backends(options: ConnectorOptions, consumer: bool) -> dict:
    from kv_transfer.transport import check_backend
    from kv_transfer.transport.inbox import Inbox
    from kv_transfer.transport.layer_queue import CopyBudget

    # One bound each for what the push backends received and the engine has
    # not loaded yet, and for what they copied out and have not sent yet,
    # whichever backend holds it.
    inbox = Inbox(options.staging_capacity_bytes, options.offer_ttl_s)
    copies = CopyBudget(options.staging_capacity_bytes)
    backends = {}
    for name in options.backends:
        check_backend(name)
        if name == "grpc":
            from kv_transfer.transport.grpc_stream import GrpcBackend

            backends[name] = GrpcBackend(options.kv_host, options.kv_port, consumer, inbox, options.chunk_bytes,
                                         options.fetch_timeout_ms, options.push_start_timeout_ms, copies=copies)
        elif name == "collective":
            from kv_transfer.transport.collective import CollectiveBackend

            backends[name] = CollectiveBackend(options.agent_name or "engine", options.kv_host, consumer,
                                               options.fetch_timeout_ms, options.push_start_timeout_ms, inbox,
                                               copies)
        elif name == "nixl":
            from kv_transfer.transport.nixl import NixlBackend

            if not options.agent_name:
                raise ValueError("BatonConnector: the nixl backend needs kv_connector_extra_config.agent_name")
            backends[name] = NixlBackend(options.agent_name, options.fetch_timeout_ms,
                                         options.push_start_timeout_ms, options.offer_ttl_s)
    return backends


class BatonConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig):
        super().__init__(vllm_config, role, kv_cache_config)
        ensure_logging(f"kv-connector-{role.name.lower()}")
        transfer = vllm_config.kv_transfer_config
        options = ConnectorOptions.from_extra(transfer.kv_connector_extra_config)
        from baton import tls

        tls.use(tls.Tls(options.tls_cert_file, options.tls_key_file, options.tls_ca_file, options.tls_mutual,
                        options.tls_server_name))
        block_size = vllm_config.cache_config.block_size
        self._scheduler_side: BatonSchedulerSide | None = None
        self._worker_side: BatonWorkerSide | None = None
        self._options = options
        if role == KVConnectorRole.SCHEDULER:
            self._scheduler_side = BatonSchedulerSide(block_size, options.handoff_dir)
            return
        self._worker_side = BatonWorkerSide(_model_signature(vllm_config), block_size, kv_cache_config.num_blocks,
                                            _make_backends(options, transfer.is_kv_consumer),
                                            _cpu_attention_isa(vllm_config), options.handoff_dir,
                                            TransferSpans("decode-engine" if transfer.is_kv_consumer
                                                          else "prefill-engine"))

    @property
    def _worker(self) -> BatonWorkerSide:
        if self._worker_side is None:
            raise RuntimeError("BatonConnector: worker-side call on the scheduler-side instance")
        return self._worker_side

    @property
    def _scheduler(self) -> BatonSchedulerSide:
        if self._scheduler_side is None:
            raise RuntimeError("BatonConnector: scheduler-side call on a worker-side instance")
        return self._scheduler_side

    # --- worker side ------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        rank = _parallel_rank()
        self._worker.register_kv_caches(kv_caches, rank)
        if self._options.endpoint_file:
            # The worker service publishes these in the registry; written
            # whole, then renamed, so it never reads half a file.
            path = _rank_file(self._options.endpoint_file, rank.index)
            partial = path.with_name(path.name + ".partial")
            partial.write_text(json.dumps({"rank": rank.index, "world": rank.world,
                                           "endpoints": self._worker.endpoints()}))
            partial.replace(path)

    def bind_connector_metadata(self, connector_metadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        # vLLM starts asynchronous loads after the forward, but saves happen
        # during it: open this step's pushes as soon as the metadata is bound.
        self._worker.start_step(connector_metadata)

    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        self._worker.start_load(self._get_connector_metadata())

    def wait_for_layer_load(self, layer_name: str) -> None:
        # Loads are asynchronous: a request runs only after its load finished.
        return

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata, **kwargs: Any) -> None:
        self._worker.save_kv_layer(layer_name, kv_layer)

    def wait_for_save(self) -> None:
        # Blocks were copied out in save_kv_layer; only close this step's pushes.
        self._worker.end_step()

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        return self._worker.transfer_results(finished_req_ids)

    def build_connector_worker_meta(self) -> BatonWorkerMetadata | None:
        return self._worker.worker_meta()

    def shutdown(self) -> None:
        if self._worker_side is not None:
            self._worker_side.shutdown()

    # --- scheduler side ---------------------------------------------------
    def get_num_new_matched_tokens(self, request, num_computed_tokens: int):
        return self._scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        self._scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output) -> BatonConnectorMetadata:
        return self._scheduler.build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output) -> None:
        self._scheduler.update_connector_output(connector_output)

    def request_finished(self, request, block_ids: list[int]):
        return self._scheduler.request_finished(request, block_ids)
