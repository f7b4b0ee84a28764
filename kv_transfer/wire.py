"""The KV wire format: header, layer payloads cut into checksummed chunks.

A layer's payload is the request's blocks in order, each ``block_shape``, C
order. Peers compare ``layout_hash`` before any byte is used, so a prefill and
a decode engine that disagree on model, dtype, block size or layout refuse
each other instead of loading garbage.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

from baton.v1 import kv_transfer_pb2 as pb

WIRE_VERSION = 1
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "uint8": 1,
               "float8_e4m3fn": 1, "float8_e5m2": 1}


@dataclass(frozen=True)
class KVLayout:
    """What must match between a producer and a consumer engine."""

    model_signature: str  # architecture and sizes of the model
    layer_names: tuple[str, ...]
    dtype: str  # torch dtype name without "torch."
    block_size: int  # tokens per block
    block_shape: tuple[int, ...]  # one block of one layer

    @property
    def block_bytes(self) -> int:
        n = DTYPE_BYTES[self.dtype]
        for dim in self.block_shape:
            n *= dim
        return n

    def layout_hash(self) -> str:
        text = "|".join([
            f"v{WIRE_VERSION}", self.model_signature, ",".join(self.layer_names), self.dtype,
            str(self.block_size), "x".join(map(str, self.block_shape)),
        ])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def header(self, transfer_id: str, num_tokens: int, num_blocks: int) -> pb.KVHeader:
        return pb.KVHeader(
            transfer_id=transfer_id,
            num_tokens=num_tokens,
            block_size=self.block_size,
            num_blocks=num_blocks,
            layer_names=list(self.layer_names),
            dtype=self.dtype,
            block_shape=list(self.block_shape),
            layout_hash=self.layout_hash(),
            wire_version=WIRE_VERSION,
        )


def blocks_for_tokens(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


def layer_payload_bytes(header: pb.KVHeader) -> int:
    itemsize = DTYPE_BYTES.get(header.dtype)
    if itemsize is None:
        raise WireError(f"unsupported KV dtype {header.dtype!r}")
    n = itemsize * header.num_blocks
    for dim in header.block_shape:
        n *= dim
    return n


def chunk_layer(layer_index: int, payload: memoryview, chunk_bytes: int) -> Iterator[pb.KVChunk]:
    for offset in range(0, len(payload), chunk_bytes):
        piece = bytes(payload[offset: offset + chunk_bytes])
        yield pb.KVChunk(data=pb.KVData(
            layer_index=layer_index, offset=offset, data=piece, crc32=zlib.crc32(piece)))


class WireError(ValueError):
    """A peer sent something that does not fit the header or fails its checksum."""


def check_chunk(header: pb.KVHeader, data: pb.KVData, expected_offset: int) -> None:
    if data.layer_index >= len(header.layer_names):
        raise WireError(f"layer index {data.layer_index} out of range ({len(header.layer_names)} layers)")
    if data.offset != expected_offset:
        raise WireError(f"layer {data.layer_index}: chunk at offset {data.offset}, expected {expected_offset}")
    if data.offset + len(data.data) > layer_payload_bytes(header):
        raise WireError(f"layer {data.layer_index}: chunk runs past the layer's payload")
    if zlib.crc32(data.data) != data.crc32:
        raise WireError(f"layer {data.layer_index} offset {data.offset}: checksum mismatch")
