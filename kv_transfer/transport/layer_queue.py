"""The producer half of a push backend's transfer: the model thread copies
each layer's blocks out of the paged cache as soon as the layer has run,
and the backend's push thread sends them, in the order they came, while
later layers still compute."""

from __future__ import annotations

import queue
import time

import torch

from kv_transfer.connector.metadata import SaveSpec
from kv_transfer.transport.base import KVCache
from kv_transfer.wire import WireError

_END = object()


class LayerQueue:
    """An ``Outbound``: ``layer_saved``/``step_done`` on the model thread
    (never blocking), ``layers`` on the push thread."""

    def __init__(self, spec: SaveSpec, cache: KVCache, device: torch.device | str):
        self.spec = spec
        self.started_s = time.monotonic()
        self._cache = cache
        self._device = device  # where the copies go: host memory, or the GPU for NCCL
        self._queue: queue.Queue = queue.Queue()
        self._prompt = cache.prompt(spec.num_tokens)

    def layer_saved(self, index: int, kv_layer: torch.Tensor) -> None:
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

    def drain(self) -> None:
        """Nothing more will be sent: let the copies already made go."""
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                return
