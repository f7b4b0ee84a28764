"""What producer and consumer engines must agree on before any KV byte is
used: the layout of the paged cache. Peers compare ``layout_hash`` first,
so a prefill and a decode engine that disagree on model, dtype, block size
or layout refuse each other instead of loading garbage.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

WIRE_VERSION = 4  # 3: a prompt's last block moves only its filled slots; 4: slot layouts named
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "uint8": 1,
               "float8_e4m3fn": 1, "float8_e5m2": 1}


@dataclass(frozen=True)
class KVLayout:
    """What must match between a producer and a consumer engine."""

    model_signature: str  # architecture and sizes of the model
    layer_names: tuple[str, ...]
    dtype: str  # torch dtype name without "torch."
    block_size: int  # tokens per block
    block_shape: tuple[int, ...]  # one block of one layer (of this rank's shard)
    tp_size: int = 1  # tensor-parallel ranks the cache is split over (heads)
    pp_size: int = 1  # pipeline-parallel ranks (layers)
    slot_layout: str = ""  # where a block's token slots lie (``TokenSlots.name``): kernels differ per CPU

    @property
    def block_bytes(self) -> int:
        n = DTYPE_BYTES[self.dtype]
        for dim in self.block_shape:
            n *= dim
        return n

    def layout_hash(self) -> str:
        text = "|".join([
            f"v{WIRE_VERSION}", self.model_signature, ",".join(self.layer_names), self.dtype,
            str(self.block_size), "x".join(map(str, self.block_shape)), f"tp{self.tp_size}", f"pp{self.pp_size}",
            self.slot_layout,
        ])
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def blocks_for_tokens(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class WireError(ValueError):
    """A peer sent something that does not fit its header or fails its checksum."""
