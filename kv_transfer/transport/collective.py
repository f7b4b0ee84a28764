"""Collective backend: torch.distributed point-to-point over one small
two-rank process group per prefill/decode pair: Gloo on CPU, NCCL on GPU,
from the same code.

"Many small worlds" (MultiWorld, arXiv 2407.08980): no global
``init_process_group``. Each pair's group is built on a ``PrefixStore`` of
the consumer's ``TCPStore`` the first time the producer sends to it, so a
pair that fails (a peer died, a stream broke) is torn down alone while every
other pair goes on. The consumer engine hosts the store (its endpoint in the
registry); a producer registers a new pair key there and both sides build
the group.

On a pair, one transfer at a time, in order: header (length, then JSON),
the consumer's accept (1) or refusal (0: no room, or a transfer it declined),
then each layer's blocks as the producer's forward computes them (in the
model's execution order), then which layer each was and its xxh3 digest.
The consumer keeps complete transfers in the engine's inbox until it loads
them.
"""

from __future__ import annotations

import datetime
import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import torch

from baton.logs import get_logger
from kv_transfer.connector.metadata import SaveSpec
from kv_transfer.transport.base import KVCache
from kv_transfer.transport.inbox import (
    Inbox,
    InboxBackend,
    TransferHeader,
    check_layer,
    digest,
    payload_bytes,
)
from kv_transfer.transport.layer_queue import CopyBudget, LayerQueue
from kv_transfer.wire import WireError

log = get_logger(__name__)

_RENDEZVOUS_S = 30  # both sides of a new pair must show up within this
_IDLE = datetime.timedelta(days=1)  # a pair waits this long for its next transfer


def _make_group(store, key: str, rank: int, device: torch.device, host: str):
    from torch.distributed import PrefixStore, ProcessGroupGloo

    prefixed = PrefixStore(key, store)
    if device.type == "cuda":
        from torch.distributed import ProcessGroupNCCL

        return ProcessGroupNCCL(prefixed, rank, 2)
    options = ProcessGroupGloo._Options()
    options._timeout = _IDLE
    options._devices = [ProcessGroupGloo.create_device(hostname=host)]
    return ProcessGroupGloo(prefixed, rank, 2, options)


def _close_group(group) -> None:
    try:
        group.abort()
    except Exception:  # already broken: nothing left to release
        pass


class CollectiveBackend(InboxBackend):
    name = "collective"

    def __init__(self, name: str, host: str, consumer: bool, fetch_timeout_ms: int = 15_000,
                 start_timeout_ms: int = 3_000, inbox: Inbox | None = None, copies: CopyBudget | None = None):
        super().__init__(inbox, fetch_timeout_ms, start_timeout_ms, copies)
        self._name = name
        self._host = host
        self._consumer = consumer
        self._closed = threading.Event()
        # producer: one group per consumer endpoint, one transfer at a time on each
        self._pairs: dict[str, object] = {}
        self._pair_locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        self._pushes = ThreadPoolExecutor(max_workers=8, thread_name_prefix="baton-collective-push")
        # consumer
        self._store = None
        self._groups: list = []

    # --- set-up -----------------------------------------------------------
    def attach(self, cache: KVCache) -> None:
        self._cache = cache
        if not self._consumer:
            return
        from torch.distributed import TCPStore

        self._store = TCPStore(self._host, 0, is_master=True, wait_for_workers=False,
                               timeout=datetime.timedelta(seconds=_RENDEZVOUS_S))
        threading.Thread(target=self._accept_pairs, name="baton-collective-accept", daemon=True).start()
        log.info("collective kv endpoint ready", endpoint=self.endpoint(), device=str(cache.device))

    def endpoint(self) -> str:
        return f"{self._host}:{self._store.port}" if self._store is not None else ""

    # --- producer ---------------------------------------------------------
    def send(self, spec: SaveSpec) -> LayerQueue:
        push = LayerQueue(spec, self._cache, self._cache.device, self._copies)
        self._pushes.submit(self._run_push, push)
        return push

    def _pair(self, target: str):
        with self._lock:
            group = self._pairs.get(target)
        if group is not None:
            return group
        from torch.distributed import TCPStore

        host, _, port = target.rpartition(":")
        store = TCPStore(host, int(port), is_master=False, timeout=datetime.timedelta(seconds=_RENDEZVOUS_S))
        key = f"pair/{self._name}/{uuid.uuid4().hex[:8]}"
        store.set(f"pairs/{store.add('pairs', 1)}", key)
        group = _make_group(store, key, 0, self._cache.device, self._host)
        log.info("collective pair up", target=target, pair=key)
        with self._lock:
            self._pairs[target] = group
        return group

    def _teardown(self, target: str, group, error: Exception) -> None:
        with self._lock:
            if self._pairs.get(target) is group:
                del self._pairs[target]
        _close_group(group)
        log.warning("collective pair torn down", target=target, error=str(error))

    def _run_push(self, push: LayerQueue) -> None:
        spec = push.spec
        cache = self._cache
        with self._lock:
            pair_lock = self._pair_locks.setdefault(spec.kv_target, threading.Lock())
        with pair_lock:
            group, sent, error = None, 0, ""
            try:
                group = self._pair(spec.kv_target)
                device = cache.device
                header = json.dumps(TransferHeader.of(spec.transfer_id, spec.num_tokens, len(spec.block_ids),
                                                      cache).to_dict()).encode()
                raw = torch.frombuffer(bytearray(header), dtype=torch.uint8).to(device)
                group.send([torch.tensor([len(header)], dtype=torch.int64, device=device)], 1, 0).wait()
                group.send([raw], 1, 0).wait()
                answer = torch.zeros(1, dtype=torch.int64, device=device)
                group.recv([answer], 1, 0).wait()
                if not int(answer.item()):
                    log.warning("collective kv refused by the consumer", transfer_id=spec.transfer_id,
                                target=spec.kv_target)
                    error = "refused by the consumer"
                    return
                # Layers go out as soon as computed, without waiting for one
                # another: the i-th layer sent carries tag i + 1.
                order, digests, sending = [], [], []
                for index, layer in push.layers(len(cache.layers)):
                    sending.append((group.send([layer], 1, len(order) + 1), layer))
                    order.append(index)
                    digests.append(digest(layer))
                    sent += layer.numel() * layer.element_size()
                for work, _layer in sending:
                    work.wait()
                trailer = torch.tensor([order, digests], dtype=torch.int64, device=device)
                group.send([trailer], 1, len(order) + 1).wait()
                log.info("kv pushed", transfer_id=spec.transfer_id, bytes=sent, target=spec.kv_target,
                         backend=self.name, ms=round((time.monotonic() - push.started_s) * 1000, 1))
            except Exception as exc:
                sent, error = 0, str(exc) or type(exc).__name__
                # A pair broken mid-transfer cannot be trusted for the next:
                # rebuilt on the next send; the consumer recomputes this one.
                if group is not None:
                    self._teardown(spec.kv_target, group, exc)
                else:
                    log.warning("collective pair could not be built", target=spec.kv_target, error=str(exc))
            finally:
                push.finish(sent, error)

    # --- consumer ---------------------------------------------------------
    def _accept_pairs(self) -> None:
        seen = 0
        pending: set[int] = set()
        while not self._closed.is_set():
            try:
                count = self._store.add("pairs", 0)
                pending.update(range(seen + 1, count + 1))
                seen = max(seen, count)
                for n in sorted(pending):
                    if self._store.check([f"pairs/{n}"]):
                        pending.discard(n)
                        key = self._store.get(f"pairs/{n}").decode()
                        threading.Thread(target=self._serve_pair, args=(key,), name="baton-collective-pair",
                                         daemon=True).start()
            except Exception as exc:
                log.warning("collective rendezvous error", error=str(exc))
            self._closed.wait(0.05)

    def _serve_pair(self, key: str) -> None:
        cache = self._cache
        device = cache.device
        try:
            group = _make_group(self._store, key, 1, device, self._host)
        except Exception as exc:
            log.warning("collective pair could not be built", pair=key, error=str(exc))
            return
        with self._lock:
            self._groups.append(group)
        log.info("collective pair up", pair=key)
        tid = ""
        try:
            while not self._closed.is_set():
                tid = ""
                length = torch.zeros(1, dtype=torch.int64, device=device)
                group.recv([length], 0, 0).wait()
                raw = torch.empty(int(length.item()), dtype=torch.uint8, device=device)
                group.recv([raw], 0, 0).wait()
                header = TransferHeader.from_dict(json.loads(bytes(raw.cpu().numpy())))
                tid = header.transfer_id
                elements = cache.prompt(header.num_tokens).elements
                refusal = self._inbox.reserve(header, payload_bytes(cache, header.num_tokens) * len(cache.layers),
                                              self._inbox.check(cache, header))
                group.send([torch.tensor([0 if refusal else 1], dtype=torch.int64, device=device)], 0, 0).wait()
                if refusal:
                    log.warning("collective kv refused", transfer_id=tid, pair=key, reason=refusal)
                    continue
                arrived = [torch.empty(elements, dtype=cache.layers[0].dtype, device=device) for _ in cache.layers]
                receiving = [group.recv([layer], 0, i + 1) for i, layer in enumerate(arrived)]
                for work in receiving:
                    work.wait()
                trailer = torch.empty((2, len(cache.layers)), dtype=torch.int64, device=device)
                group.recv([trailer], 0, len(arrived) + 1).wait()
                order, digests = trailer.tolist()
                if sorted(order) != list(range(len(cache.layers))):
                    raise WireError(f"transfer {tid} named layers {order}")
                layers = [None] * len(order)
                try:
                    for position, index in enumerate(order):
                        check_layer(index, arrived[position], digests[position])
                        layers[index] = arrived[position]
                except WireError as exc:  # the pair itself is fine
                    self._inbox.finish(tid, None, str(exc))
                    log.warning("collective kv refused", transfer_id=tid, pair=key, reason=str(exc))
                    continue
                self._inbox.finish(tid, layers)
        except Exception as exc:
            if tid:
                self._inbox.finish(tid, None, f"pair broke mid-transfer: {exc}")
            if not self._closed.is_set():
                log.warning("collective pair torn down", pair=key, error=str(exc))
        finally:
            with self._lock:
                self._groups.remove(group)
            _close_group(group)

    def close(self) -> None:
        self._closed.set()
        self._pushes.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            groups = list(self._pairs.values()) + self._groups
            self._pairs.clear()
        for group in groups:
            _close_group(group)
