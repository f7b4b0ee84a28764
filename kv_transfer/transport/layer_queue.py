"""The producer half of a push backend's transfer: the model thread copies
each layer's blocks out of the paged cache as soon as the layer has run,
and the backend's push thread sends them, in the order they came, while
later layers still compute. What the copies may hold at once is bounded per
engine (``CopyBudget``): a transfer that does not fit is not opened, and its
consumer recomputes."""

from __future__ import annotations

import queue
import threading
import time

import torch

from kv_transfer.connector.metadata import SaveSpec
from kv_transfer.transport.base import KVCache
from kv_transfer.wire import WireError

_END = object()


class CopyBudgetExceeded(Exception):
    """The producer's layer copies in flight would pass their bound."""


class CopyBudget:
    """Bytes the producer's layer copies may hold at once, per engine."""

    def __init__(self, capacity_bytes: int):
        self.capacity = capacity_bytes
        self.bytes = 0
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> bool:
        with self._lock:
            if self.bytes + nbytes > self.capacity:
                return False
            self.bytes += nbytes
            return True

    def give(self, nbytes: int) -> None:
        with self._lock:
            self.bytes -= nbytes


class LayerQueue:
    """An ``Outbound``: ``layer_saved``/``step_done`` on the model thread
    (never blocking), ``layers`` on the push thread, ``finish`` once the
    push is over, however it ended."""

    def __init__(self, spec: SaveSpec, cache: KVCache, device: torch.device | str, budget: CopyBudget | None = None):
        self.spec = spec
        self.started_s = time.monotonic()
        self._cache = cache
        self._device = device  # where the copies go: host memory, or the GPU for NCCL
        self._queue: queue.Queue = queue.Queue()
        self._prompt = cache.prompt(spec.num_tokens)
        # The whole transfer is reserved at once: the model thread cannot wait.
        self._nbytes = self._prompt.elements * cache.layers[0].element_size() * len(cache.layers)
        if budget is not None and not budget.take(self._nbytes):
            raise CopyBudgetExceeded(f"{budget.bytes + self._nbytes} B of layer copies needed, "
                                     f"{budget.capacity} B allowed (STAGING_CAPACITY_MIB)")
        self._budget = budget
        self._finished = False
        self._on_finish: list = []

    def layer_saved(self, index: int, kv_layer: torch.Tensor) -> None:
        if self._finished:
            return  # the push already ended (refused, failed): copy nothing more
        payload = self._prompt.gather(kv_layer, self._cache.block_dims[index], list(self.spec.block_ids),
                                      self._device)
        self._queue.put((index, payload))

    def step_done(self) -> None:
        self._queue.put(_END)

    def layers(self, expected: int):
        """(layer index, flat payload) as they come; raises, after the last one,
        if the step ended with layers missing (the transfer must fail)."""
        seen = 0
        while True:
            item = self._queue.get()
            if item is _END:
                break
            seen += 1
            yield item
        if seen != expected:
            raise WireError(f"only {seen} of {expected} layers were saved")

    def has_ready(self) -> bool:
        """A layer (or the end) is waiting to be taken."""
        return not self._queue.empty()

    def when_finished(self, callback) -> None:
        """``callback(sent_bytes, error)`` once the push is over."""
        self._on_finish.append(callback)

    def finish(self, sent_bytes: int = 0, error: str = "") -> None:
        """The push is over (``error``: how it failed): let the copies go
        and give their bytes back."""
        if self._finished:
            return
        self._finished = True
        for callback in self._on_finish:
            callback(sent_bytes, error)
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        if self._budget is not None:
            self._budget.give(self._nbytes)
