"""Transport contract used by the connector's worker side.

Both calls are blocking and run on the connector's own threads, never on
vLLM's model-execution thread.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Protocol

from baton.v1 import kv_transfer_pb2 as pb


class KVSender(Protocol):
    def push(
        self,
        target: str,
        header: pb.KVHeader,
        layers: Iterable[tuple[int, memoryview]],
        metadata: list[tuple[str, str]],
    ) -> int:
        """Send the header, then each (layer_index, payload) as it becomes
        available. Returns bytes sent; raises on failure."""


class KVReceiver(Protocol):
    def fetch(self, transfer_id: str, wait_timeout_ms: int,
              start_timeout_ms: int = 0) -> tuple[pb.KVHeader, Iterator[pb.KVData]]:
        """Block until the transfer is staged; return its header and chunks.
        Raise at once if its push has not begun within ``start_timeout_ms``."""
