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

import torch


def find_block_dim(kv_layer: torch.Tensor, num_blocks: int) -> int:
    dims = [i for i, size in enumerate(kv_layer.shape) if size == num_blocks]
    if len(dims) != 1:
        raise ValueError(
            f"cannot tell the block dimension of a KV tensor of shape {tuple(kv_layer.shape)} "
            f"with {num_blocks} blocks; this attention backend's layout is not supported"
        )
    return dims[0]


class TokenSlots:
    """Where a block's token slots are. The tensor's shape may not say:
    vLLM's CPU attention names a block ``[heads, block_size, 2 * head_size]``
    but its kernels lay the slots out per instruction set (``vec``: per
    head, keys transposed, then values; ``amx``: keys and values packed in
    tiles, two tokens interleaved). Those layouts are read off the kernel
    itself: it writes each token's index into a probe block, and a token's
    slots are where its index landed. Other vLLM layouts have a token
    dimension ``dim`` in the block, before the head dimension (which may be
    as large)."""

    def __init__(self, shape: tuple[int, ...], block_size: int, dim: int = -1,
                 offsets: torch.Tensor | None = None, name: str = ""):
        self.shape = shape
        self.block_size = block_size
        self.dim = dim  # the token dimension, or -1 with ``offsets``
        # [block_size, slot elements]: each token's element offsets in a flat block
        self._offsets = offsets
        self.name = name or f"dim{dim}"  # peers must share it: part of the layout hash

    @classmethod
    def of(cls, shape: tuple[int, ...], block_size: int, cpu_attention_isa: str = "",
           dtype: torch.dtype = torch.bfloat16) -> TokenSlots:
        if cpu_attention_isa:
            if len(shape) != 3 or shape[1] != block_size or shape[2] % 2:
                raise ValueError(f"a KV block of shape {shape} is not [heads, {block_size}, 2 * head_size]")
            offsets = _probe_cpu_attention(shape, block_size, cpu_attention_isa, dtype)
            return cls(shape, block_size, offsets=offsets, name=f"cpu-{cpu_attention_isa}")
        for i, size in enumerate(shape):
            if size == block_size:
                return cls(shape, block_size, i)
        raise ValueError(f"no dimension of size {block_size} (the block size) in a KV block of shape {shape}; "
                         "this attention backend's layout is not supported")

    @property
    def elements(self) -> int:
        """Of one block."""
        return math.prod(self.shape)

    def offsets(self, tokens: int) -> torch.Tensor:
        """Element offsets, ascending, of the first ``tokens`` slots in a flat block."""
        if self._offsets is not None:
            return self._offsets[:tokens].reshape(-1).sort().values
        index = torch.arange(self.elements, dtype=torch.int64).view(self.shape)
        return index.narrow(self.dim, 0, tokens).reshape(-1)

    def copy_first(self, block: torch.Tensor, tokens: int, device: torch.device | str | None = None) -> torch.Tensor:
        """The first ``tokens`` slots of ``block``, copied out flat (in ``offsets`` order)."""
        device = device or block.device
        if self._offsets is None:
            return block.narrow(self.dim, 0, tokens).reshape(-1).to(device)
        return block.reshape(-1).index_select(0, self.offsets(tokens).to(block.device)).to(device)

    def write_first(self, block: torch.Tensor, part: torch.Tensor) -> None:
        """Write ``part`` (as ``copy_first`` gives it) into the first slots of
        ``block``, a view into the cache; the slots after it stay as they are."""
        tokens = part.numel() * self.block_size // self.elements
        if self._offsets is None:
            target = block.narrow(self.dim, 0, tokens)
            target.copy_(part.view(target.shape).to(block.device))
        else:
            block.view(-1).index_copy_(0, self.offsets(tokens).to(block.device), part.to(block.device))

    def runs(self, tokens: int) -> list[tuple[int, int]]:
        """(element offset, length) of the first ``tokens`` slots within a
        block, contiguous pieces in ``copy_first`` order."""
        runs: list[tuple[int, int]] = []
        for offset in self.offsets(tokens).tolist():
            if runs and runs[-1][0] + runs[-1][1] == offset:
                runs[-1] = (runs[-1][0], runs[-1][1] + 1)
            else:
                runs.append((offset, 1))
        return runs


def cpu_attention_isa(dtype: torch.dtype, block_size: int, head_size: int, cache_dtype: str = "auto") -> str:
    """The instruction set vLLM's CPU attention picks for these sizes on
    this CPU ("amx", "vec", "vec16", ...), which decides its block layout."""
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    return _get_attn_isa(dtype, block_size, head_size, cache_dtype)


def _probe_cpu_attention(shape: tuple[int, ...], block_size: int, isa: str, dtype: torch.dtype) -> torch.Tensor:
    """Each token's element offsets in a block as vLLM's CPU attention
    kernel for ``isa`` writes it: the kernel writes a code of every token
    into a probe block (two passes, so every code is exact in bf16)."""
    from vllm import _custom_ops as ops

    heads, _, both = shape
    head_size = both // 2
    base = 128  # codes 1..base are exact in every KV dtype
    tokens = torch.arange(block_size)
    found = torch.zeros(heads * block_size * both, dtype=torch.int64)
    for digit, scale in ((tokens % base, 1), (tokens // base, base)):
        cache = torch.zeros(1, *shape, dtype=dtype)
        key_cache, value_cache = cache.view(1, heads, block_size * 2, head_size).chunk(2, dim=2)
        codes = (digit + 1).to(torch.float32).view(-1, 1, 1).expand(block_size, heads, head_size)
        codes = codes.to(dtype).contiguous()
        ops.cpu_attn_reshape_and_cache(codes, codes.clone(), key_cache, value_cache, tokens, isa)
        written = cache.reshape(-1).to(torch.float32).round().to(torch.int64)
        if (written < 1).any():
            raise ValueError(f"vLLM's CPU attention kernel ({isa}) left slots of a full block unwritten")
        found += (written - 1) * scale
    order = torch.argsort(found, stable=True)  # offsets grouped by token, ascending within
    per_token = found.numel() // block_size
    if not torch.equal(torch.bincount(found, minlength=block_size), torch.full((block_size,), per_token)):
        raise ValueError(f"vLLM's CPU attention kernel ({isa}) gives tokens slots of unequal size")
    return order.view(block_size, per_token)


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
    slots.write_first(kv_layer.select(block_dim, block_id), part)


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
            tail = kv_layer.select(block_dim, block_ids[-1])
            out[whole.numel():] = self.slots.copy_first(tail, self.tail_tokens, device)
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
