"""Scheduler half of the Baton connector: decides what to push and what to
load; never touches KV bytes. Lives in the engine-core process."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from baton.logs import get_logger
from kv_transfer.connector.metadata import (
    BatonConnectorMetadata,
    BatonWorkerMetadata,
    LoadSpec,
    RestoreSpec,
    SaveSpec,
)
from kv_transfer.handoff import take_note
from kv_transfer.params import ConsumerParams, LoadReport, ProducerParams, parse
from kv_transfer.transport import PULL_BACKENDS
from kv_transfer.wire import blocks_for_tokens

log = get_logger(__name__)

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request


@dataclass
class _PendingPush:
    params: ProducerParams
    prompt_len: int
    block_ids: list[int]


class BatonSchedulerSide:
    def __init__(self, block_size: int, handoff_dir: str = ""):
        self.block_size = block_size
        self._handoff_dir = Path(handoff_dir) if handoff_dir else None
        self._moves: list[SaveSpec] = []  # requests handed off, for the next step
        self._pushes: dict[str, _PendingPush] = {}  # producer requests not yet pushed
        self._loads: list[LoadSpec] = []  # consumer loads for the next step
        self._loading: dict[str, int] = {}  # req_id → external tokens
        self._loaded_bytes: dict[str, int] = {}  # req_id → bytes its load moved, as the workers reported
        self._load_seconds: dict[str, float] = {}  # req_id → how long its load took
        self._claimed: set[str] = set()  # consumer requests whose transfer was claimed
        self._failed: set[str] = set()
        self._restores: dict[str, int] = {}  # req_id → request block to restore once loaded
        self._armed: set[str] = set()  # loaded: restore when next scheduled
        self._saved: dict[str, str] = {}  # producer req_id → backend, once its save was issued
        self._held: set[str] = set()  # pull: finished, blocks kept for the consumer (next step's news)
        self._released: set[str] = set()  # pull: finished, blocks freed at once (next step's news)
        self._declined: list[tuple[str, str, str]] = []  # consumer: transfers it will never load

    @staticmethod
    def _remote_tokens(request: Request, params: ConsumerParams) -> int:
        # At least the prompt's last token is computed locally, to yield
        # logits: the prefill prompt's last position when decode samples the
        # first token itself, or the first token when it continues after it.
        return min(params.remote_tokens, request.num_prompt_tokens - 1)

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int, bool]:
        params = parse(request.kv_transfer_params)
        if not isinstance(params, ConsumerParams) or request.request_id in self._claimed:
            return 0, False
        count = self._remote_tokens(request, params) - num_computed_tokens
        return (count, True) if count > 0 else (0, False)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        params = parse(request.kv_transfer_params)
        if isinstance(params, ProducerParams) and request.request_id not in self._pushes:
            self._pushes[request.request_id] = _PendingPush(params, request.num_prompt_tokens, [])
        elif isinstance(params, ConsumerParams) and num_external_tokens > 0:
            self._claimed.add(request.request_id)
            remote = self._remote_tokens(request, params)
            local_tokens = remote - num_external_tokens  # prefix-cache hit, whole blocks
            first_block = local_tokens // self.block_size
            last_block = blocks_for_tokens(remote, self.block_size)
            block_ids = blocks.get_block_ids()[0][first_block:last_block]
            keep_block = -1
            if remote < params.remote_tokens:  # a transferred position gets recomputed
                keep_block = remote // self.block_size
                self._restores[request.request_id] = keep_block
            self._loads.append(LoadSpec(request.request_id, params.transfer_id, tuple(block_ids),
                                        first_block, params.remote_tokens, keep_block, params.backend,
                                        params.source, params.traceparent))
            self._loading[request.request_id] = num_external_tokens

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> BatonConnectorMetadata:
        meta = BatonConnectorMetadata(loads=self._loads, held=self._held, released=self._released,
                                      declined=self._declined, moves=self._moves)
        self._loads, self._held, self._released, self._declined, self._moves = [], set(), set(), [], []
        scheduled = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            if new.req_id in self._armed:
                self._armed.discard(new.req_id)
                restore = self._restores.pop(new.req_id)
                if restore < len(new.block_ids[0]):
                    meta.restores.append(RestoreSpec(new.req_id, new.block_ids[0][restore]))
            pending = self._pushes.get(new.req_id)
            if pending is not None:
                pending.block_ids = list(new.block_ids[0])
                self._maybe_save(meta, new.req_id, new.num_computed_tokens + scheduled.get(new.req_id, 0))
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            pending = self._pushes.get(req_id)
            if pending is None:
                continue
            new_ids = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                # Resumed after preemption: vLLM sends the full new block list.
                pending.block_ids = list(new_ids[0]) if new_ids is not None else []
            elif new_ids is not None:
                pending.block_ids.extend(new_ids[0])
            self._maybe_save(meta, req_id, cached.num_computed_tokens[i] + scheduled.get(req_id, 0))
        return meta

    def _maybe_save(self, meta: BatonConnectorMetadata, req_id: str, computed_after_step: int) -> None:
        pending = self._pushes[req_id]
        if computed_after_step < pending.prompt_len:
            return  # chunked prefill: push once the whole prompt is in the cache
        n_blocks = blocks_for_tokens(pending.prompt_len, self.block_size)
        meta.saves.append(SaveSpec(req_id, pending.params.transfer_id, pending.params.kv_target,
                                   tuple(pending.block_ids[:n_blocks]), pending.prompt_len,
                                   pending.params.traceparent, pending.params.backend))
        self._saved[req_id] = pending.params.backend
        del self._pushes[req_id]

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        # Only requests still loading: one aborted meanwhile is already finished.
        failed = getattr(connector_output, "failed_recving", None) or ()
        self._failed.update(req_id for req_id in failed if req_id in self._loading)
        reported = getattr(connector_output, "kv_connector_worker_meta", None)
        if isinstance(reported, BatonWorkerMetadata):
            for req_id, nbytes in reported.loaded_bytes.items():
                if req_id in self._loading:
                    self._loaded_bytes[req_id] = self._loaded_bytes.get(req_id, 0) + nbytes
                    self._load_seconds[req_id] = reported.load_seconds.get(req_id, 0.0)
        for req_id in getattr(connector_output, "finished_recving", None) or ():
            if req_id in self._restores and req_id not in self._failed:
                self._armed.add(req_id)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        delay_free, params = self._finished(request)
        return self._hand_off(request, block_ids) or delay_free, params

    def _hand_off(self, request: Request, block_ids: list[int]) -> bool:
        """An aborted request the worker service handed to another engine:
        its first tokens' KV goes out next step (the blocks are kept until
        read on a pull backend). Returns whether the blocks are kept."""
        from vllm.v1.request import RequestStatus

        if self._handoff_dir is None or request.status != RequestStatus.FINISHED_ABORTED:
            return False
        note = take_note(self._handoff_dir, request.request_id)
        if note is None:
            return False
        blocks = blocks_for_tokens(note.num_tokens, self.block_size)
        if note.num_tokens > request.num_computed_tokens or blocks > len(block_ids):
            # Not computed (yet): nothing goes; the receiver recomputes.
            log.warning("hand-off covers tokens not computed here; not sent", transfer_id=note.transfer_id,
                        tokens=note.num_tokens, computed=request.num_computed_tokens)
            return False
        self._moves.append(SaveSpec(request.request_id, note.transfer_id, note.kv_target, tuple(block_ids[:blocks]),
                                    note.num_tokens, note.traceparent, note.backend))
        if note.backend not in PULL_BACKENDS:
            return False  # copied out next step, before any forward can reuse the blocks
        self._held.add(request.request_id)
        return True

    def _finished(self, request: Request) -> tuple[bool, dict[str, Any] | None]:
        req_id = request.request_id
        self._pushes.pop(req_id, None)
        params = parse(request.kv_transfer_params)
        if isinstance(params, ConsumerParams) and req_id not in self._claimed:
            # Never loaded (the prompt was cached here, or it was aborted
            # first): a pull producer holds its blocks, a push consumer its
            # received bytes, until told.
            self._declined.append((params.backend, params.transfer_id, params.source))
        self._claimed.discard(req_id)
        self._restores.pop(req_id, None)
        self._armed.discard(req_id)
        backend = self._saved.pop(req_id, None)
        if backend in PULL_BACKENDS:
            from vllm.v1.request import RequestStatus

            # Its one token made, the prompt's blocks wait for the consumer to
            # read them. An abort or a final first token frees them now.
            if request.status == RequestStatus.FINISHED_LENGTH_CAPPED:
                self._held.add(req_id)
                return True, None
            self._released.add(req_id)
        if not isinstance(params, ConsumerParams):
            return False, None
        external = self._loading.pop(req_id, 0)
        nbytes = self._loaded_bytes.pop(req_id, 0)
        seconds = self._load_seconds.pop(req_id, 0.0)
        failed = req_id in self._failed
        self._failed.discard(req_id)
        report = LoadReport(params.transfer_id, 0 if failed else external, failed, 0 if failed else nbytes,
                            0.0 if failed else seconds)
        return False, report.to_dict()
