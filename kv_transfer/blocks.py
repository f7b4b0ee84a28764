"""Moving whole blocks between vLLM's paged KV tensors and flat byte payloads.

Device-agnostic torch only: the same code serves the CPU backend (blocks on
dim 0) and CUDA backends (e.g. FlashAttention's ``(2, num_blocks, ...)``).
The block dimension is found, once per layer, as the one dimension whose size
is the engine's number of blocks.
"""

from __future__ import annotations

import torch


def find_block_dim(kv_layer: torch.Tensor, num_blocks: int) -> int:
    dims = [i for i, size in enumerate(kv_layer.shape) if size == num_blocks]
    if len(dims) != 1:
        raise ValueError(
            f"cannot tell the block dimension of a KV tensor of shape {tuple(kv_layer.shape)} "
            f"with {num_blocks} blocks; this attention backend's layout is not supported"
        )
    return dims[0]


def block_shape(kv_layer: torch.Tensor, block_dim: int) -> tuple[int, ...]:
    return tuple(s for i, s in enumerate(kv_layer.shape) if i != block_dim)


def gather_blocks(kv_layer: torch.Tensor, block_dim: int, block_ids: list[int],
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """Copy the given blocks to a contiguous tensor on ``device`` (host
    memory unless said otherwise), blocks first."""
    index = torch.as_tensor(block_ids, dtype=torch.long, device=kv_layer.device)
    picked = kv_layer.index_select(block_dim, index).movedim(block_dim, 0)
    return picked.to(device).contiguous()


def scatter_blocks(
    kv_layer: torch.Tensor, block_dim: int, block_ids: list[int], blocks: torch.Tensor
) -> None:
    """Write ``blocks`` (blocks first, as from ``gather_blocks``) into the
    given block ids of ``kv_layer``."""
    index = torch.as_tensor(block_ids, dtype=torch.long, device=kv_layer.device)
    source = blocks.to(kv_layer.device).movedim(0, block_dim)
    kv_layer.index_copy_(block_dim, index, source)


def as_bytes(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.contiguous().view(torch.uint8).numpy()).cast("B")


def from_bytes(payload: bytes | bytearray | memoryview, dtype: torch.dtype,
               shape: tuple[int, ...]) -> torch.Tensor:
    return torch.frombuffer(payload, dtype=torch.uint8).view(dtype).reshape(shape)
