"""Moving a prompt's blocks between vLLM's paged KV tensors and flat payloads.

Device-agnostic torch only: the same code serves the CPU backend (blocks on
dim 0) and CUDA backends (e.g. FlashAttention's ``(2, num_blocks, ...)``).
The block dimension is found, once per layer, as the one dimension whose size
is the engine's number of blocks. Within a block, ``TokenSlots`` says where
each token's slot is.

A prompt moves as its whole blocks and, of a last block it fills only in
part, just the filled slots: a 37-token prompt moves 37 tokens' worth, not a
block of 128.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def find_block_dim(kv_layer: torch.Tensor, num_blocks: int) -> int:
    dims = [i for i, size in enumerate(kv_layer.shape) if size == num_blocks]
    if len(dims) != 1:
        raise ValueError(
            f"cannot tell the block dimension of a KV tensor of shape {tuple(kv_layer.shape)} "
            f"with {num_blocks} blocks; this attention backend's layout is not supported"
        )
    return dims[0]


@dataclass(frozen=True)
class TokenSlots:
    """Where a block's token slots are. The tensor's shape may not say:
    vLLM's CPU attention names a block ``[heads, block_size, 2 * head_size]``
    but stores, per head, its keys transposed ``[head_size, block_size]``,
    then its values ``[block_size, head_size]``. Other vLLM layouts have a
    token dimension ``dim`` in the block, before the head dimension (which
    may be as large)."""

    shape: tuple[int, ...]  # of a block, as the tensor has it
    block_size: int
    dim: int = -1  # the token dimension; -1: vLLM's CPU attention layout

    @classmethod
    def of(cls, shape: tuple[int, ...], block_size: int, cpu_attention: bool = False) -> TokenSlots:
        if cpu_attention:
            if len(shape) != 3 or shape[1] != block_size or shape[2] % 2:
                raise ValueError(f"a KV block of shape {shape} is not [heads, {block_size}, 2 * head_size]")
            return cls(shape, block_size)
        for i, size in enumerate(shape):
            if size == block_size:
                return cls(shape, block_size, i)
        raise ValueError(f"no dimension of size {block_size} (the block size) in a KV block of shape {shape}; "
                         "this attention backend's layout is not supported")

    @property
    def elements(self) -> int:
        """Of one block."""
        return math.prod(self.shape)

    def first(self, block: torch.Tensor, tokens: int) -> list[torch.Tensor]:
        """Views of the first ``tokens`` slots of ``block``, part by part."""
        if self.dim >= 0:
            return [block.narrow(self.dim, 0, tokens)]
        heads, size, both = self.shape
        halves = block.view(heads, 2, size * both // 2)
        keys = halves[:, 0].view(heads, both // 2, size).narrow(2, 0, tokens)
        values = halves[:, 1].view(heads, size, both // 2).narrow(1, 0, tokens)
        return [keys, values]

    def copy_first(self, block: torch.Tensor, tokens: int, device: torch.device | str | None = None) -> torch.Tensor:
        """The first ``tokens`` slots of ``block``, copied out flat."""
        parts = self.first(block, tokens)
        out = torch.empty(sum(p.numel() for p in parts), dtype=block.dtype, device=device or block.device)
        offset = 0
        for part in parts:
            out[offset:offset + part.numel()].view(part.shape).copy_(part)
            offset += part.numel()
        return out

    def runs(self, tokens: int) -> list[tuple[int, int]]:
        """(element offset, length) of the first ``tokens`` slots within a
        block laid out as ``shape``, contiguous pieces in ``first`` order."""
        index = torch.arange(self.elements, dtype=torch.int64).view(self.shape)
        flat = torch.cat([part.reshape(-1) for part in self.first(index, tokens)]).tolist()
        runs: list[tuple[int, int]] = []
        for offset in flat:
            if runs and runs[-1][0] + runs[-1][1] == offset:
                runs[-1] = (runs[-1][0], runs[-1][1] + 1)
            else:
                runs.append((offset, 1))
        return runs


def block_shape(kv_layer: torch.Tensor, block_dim: int) -> tuple[int, ...]:
    return tuple(s for i, s in enumerate(kv_layer.shape) if i != block_dim)


def scatter_blocks(
    kv_layer: torch.Tensor, block_dim: int, block_ids: list[int], blocks: torch.Tensor
) -> None:
    """Write ``blocks`` (blocks first) into the given block ids of ``kv_layer``."""
    index = torch.as_tensor(block_ids, dtype=torch.long, device=kv_layer.device)
    source = blocks.to(kv_layer.device).movedim(0, block_dim)
    kv_layer.index_copy_(block_dim, index, source)


def as_bytes(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.contiguous().view(torch.uint8).numpy()).cast("B")


def write_block(kv_layer: torch.Tensor, block_dim: int, slots: TokenSlots, block_id: int,
                part: torch.Tensor) -> None:
    """Write ``part`` (a block's first slots, flat, as ``PromptBlocks.block``
    gives it) into block ``block_id`` of ``kv_layer``; the slots after it
    stay as they are."""
    tokens = part.numel() * slots.block_size // slots.elements
    offset = 0
    for target in slots.first(kv_layer.select(block_dim, block_id), tokens):
        target.copy_(part[offset:offset + target.numel()].view(target.shape).to(kv_layer.device))
        offset += target.numel()


class PromptBlocks:
    """Where a prompt's first ``num_tokens`` tokens lie in one layer's
    payload: its whole blocks (blocks first), then the filled slots of a
    last block it does not fill."""

    def __init__(self, num_tokens: int, slots: TokenSlots):
        self.num_tokens = num_tokens
        self.slots = slots
        self.num_blocks = -(-num_tokens // slots.block_size)
        self.tail_tokens = num_tokens % slots.block_size  # 0: the last block is full
        self.whole_blocks = self.num_blocks - (1 if self.tail_tokens else 0)
        self.block_elements = slots.elements
        self.token_elements = self.block_elements // slots.block_size

    @property
    def elements(self) -> int:
        """Of one layer's payload."""
        return self.whole_blocks * self.block_elements + self.tail_tokens * self.token_elements

    def gather(self, kv_layer: torch.Tensor, block_dim: int, block_ids: list[int],
               device: torch.device | str = "cpu") -> torch.Tensor:
        """One layer's payload, flat, from engine blocks ``block_ids``."""
        out = torch.empty(self.elements, dtype=kv_layer.dtype, device=device)
        whole = out[:self.whole_blocks * self.block_elements].view(self.whole_blocks, *self.slots.shape)
        index = torch.as_tensor(block_ids[:self.whole_blocks], dtype=torch.long, device=kv_layer.device)
        if block_dim == 0 and whole.device == kv_layer.device:
            torch.index_select(kv_layer, 0, index, out=whole)  # no intermediate copy
        else:
            whole.copy_(kv_layer.index_select(block_dim, index).movedim(block_dim, 0))
        if self.tail_tokens:
            offset = whole.numel()
            for part in self.slots.first(kv_layer.select(block_dim, block_ids[-1]), self.tail_tokens):
                out[offset:offset + part.numel()].view(part.shape).copy_(part)
                offset += part.numel()
        return out

    def block(self, payload: torch.Tensor, i: int) -> torch.Tensor:
        """Block ``i`` of a layer's payload, flat: a partial one if it is the tail."""
        start = i * self.block_elements
        end = start + (self.block_elements if i < self.whole_blocks else self.tail_tokens * self.token_elements)
        return payload[start:end]

    def scatter(self, payload: torch.Tensor, kv_layer: torch.Tensor, block_dim: int, first: int,
                block_ids: list[int]) -> None:
        """Write blocks ``first ..`` of a layer's payload into engine blocks
        ``block_ids``."""
        if first + len(block_ids) > self.num_blocks:
            raise ValueError(f"blocks {first}..{first + len(block_ids) - 1} asked of a {self.num_blocks}-block prompt")
        wanted_whole = max(0, min(self.whole_blocks - first, len(block_ids)))
        if wanted_whole:
            start = first * self.block_elements
            whole = payload[start:start + wanted_whole * self.block_elements].view(wanted_whole, *self.slots.shape)
            scatter_blocks(kv_layer, block_dim, block_ids[:wanted_whole], whole)
        for i, block_id in enumerate(block_ids[wanted_whole:], start=first + wanted_whole):
            write_block(kv_layer, block_dim, self.slots, block_id, self.block(payload, i))
