import pytest
import torch

from kv_transfer.blocks import (
    PromptBlocks,
    TokenSlots,
    as_bytes,
    find_block_dim,
    scatter_blocks,
    write_block,
)
from kv_transfer.wire import KVLayout, blocks_for_tokens

# The CPU attention kernels this CPU runs: "vec" everywhere, "amx" (tiles,
# bf16 only) where the CPU has AMX; each lays a block out its own way.
KERNELS = [("vec", torch.float32), ("vec", torch.bfloat16)] + (
    [("amx", torch.bfloat16)] if torch.cpu._is_amx_tile_supported() else [])


def prompt_of(layer: torch.Tensor, num_blocks: int, block_size: int, num_tokens: int,
              cpu_attention_isa: str = "") -> tuple[int, PromptBlocks]:
    block_dim = find_block_dim(layer, num_blocks)
    shape = tuple(s for i, s in enumerate(layer.shape) if i != block_dim)
    return block_dim, PromptBlocks(num_tokens, TokenSlots.of(shape, block_size, cpu_attention_isa, layer.dtype))


def write_tokens(cache: torch.Tensor, block: int, keys: torch.Tensor, values: torch.Tensor, isa: str) -> None:
    """vLLM's own CPU attention kernel writes tokens 0.. of ``block``."""
    from vllm import _custom_ops as ops

    blocks, heads, size, both = cache.shape
    halves = cache.view(blocks, heads, size * 2, both // 2)
    key_cache, value_cache = halves.chunk(2, dim=2)
    slots = torch.arange(block * size, block * size + keys.shape[0])
    ops.cpu_attn_reshape_and_cache(keys.to(cache.dtype), values.to(cache.dtype), key_cache, value_cache, slots, isa)


@pytest.mark.parametrize("isa,dtype", KERNELS)
@pytest.mark.parametrize("tail", [5, 0])  # ends inside a block; fills its last block
def test_a_prompt_moves_as_vllms_cpu_attention_wrote_it(tail, isa, dtype):
    blocks, heads, size, head_size = 12, 3, 32, 32
    src = torch.randn(blocks, heads, size, 2 * head_size).to(dtype)
    dst = torch.randn(blocks, heads, size, 2 * head_size).to(dtype)
    expected = dst.clone()
    # The prompt's last block: written by the kernel, token by token.
    keys, values = torch.randn(size, heads, head_size), torch.randn(size, heads, head_size)
    filled = tail or size
    write_tokens(src, 2, keys[:filled], values[:filled], isa)
    expected[0], expected[1] = src[7], src[3]
    write_tokens(expected, 9, keys[:filled], values[:filled], isa)
    if not tail:
        expected[9] = src[2]

    block_dim, prompt = prompt_of(src, blocks, size, 2 * size + filled, cpu_attention_isa=isa)
    payload = prompt.gather(src, block_dim, [7, 3, 2])
    assert payload.numel() == (2 * size + filled) * heads * 2 * head_size, "only the filled slots move"
    back = torch.frombuffer(bytearray(as_bytes(payload)), dtype=torch.uint8).view(dtype)
    prompt.scatter(back, dst, block_dim, 0, [0, 1, 9])
    # The keys and values the kernel wrote, and nothing else: the slots
    # after the prompt keep what they had.
    assert torch.equal(dst, expected)


def test_a_prompt_on_a_gpu_style_layout():
    # FlashAttention layout: (2, num_blocks, block_size, kv_heads, head_dim)
    src = torch.randn(2, 12, 4, 3, 8)
    dst = torch.zeros_like(src)
    block_dim, prompt = prompt_of(src, 12, 4, 6)
    assert (block_dim, prompt.slots.dim) == (1, 1)
    payload = prompt.gather(src, block_dim, [11, 3])
    # Blocks 1.. of the prompt only (block 0 was a prefix-cache hit).
    prompt.scatter(payload, dst, block_dim, 1, [4])
    assert torch.equal(dst[:, 4, :2], src[:, 3, :2]) and not dst[:, 4, 2:].any()
    assert torch.equal(prompt.block(payload, 0).view(2, 4, 3, 8), src[:, 11])
    scatter_blocks(dst, block_dim, [5], prompt.block(payload, 0).view(1, 2, 4, 3, 8))
    assert torch.equal(dst[:, 5], src[:, 11])


@pytest.mark.parametrize("isa,dtype", KERNELS)
def test_a_kept_tail_is_restored_without_touching_the_slots_after_it(isa, dtype):
    heads, size, head_size = 2, 32, 32
    layer = torch.randn(4, heads, size, 2 * head_size).to(dtype)
    expected = layer.clone()
    keys, values = torch.randn(3, heads, head_size), torch.randn(3, heads, head_size)
    write_tokens(expected, 2, keys, values, isa)
    source = torch.randn(4, heads, size, 2 * head_size).to(dtype)
    write_tokens(source, 1, keys, values, isa)
    slots = TokenSlots.of((heads, size, 2 * head_size), size, isa, dtype)
    write_block(layer, 0, slots, 2, slots.copy_first(source[1], 3))
    assert torch.equal(layer, expected)


def test_runs_cover_exactly_the_first_slots():
    slots = TokenSlots.of((3, 32, 64), 32, "vec", torch.float32)
    runs = slots.runs(5)
    # Per head: its 32 key rows of 5 slots (keys are stored transposed), then 5 value rows.
    assert len(runs) == 3 * (32 + 1) and sum(n for _, n in runs) == 5 * 3 * 64
    flash = TokenSlots.of((2, 16, 4, 8), 16)
    assert flash.runs(5) == [(0, 5 * 32), (16 * 32, 5 * 32)]


def test_a_layout_without_a_token_dimension_is_refused():
    with pytest.raises(ValueError, match="not supported"):
        TokenSlots.of((3, 64, 64), 16)


def test_layout_hash_changes_with_anything_that_matters():
    base = KVLayout("llama", ("l0", "l1"), "bfloat16", 128, (3, 128, 128), slot_layout="cpu-vec")
    assert base.layout_hash() == KVLayout("llama", ("l0", "l1"), "bfloat16", 128, (3, 128, 128),
                                          slot_layout="cpu-vec").layout_hash()
    for other in (KVLayout("qwen", ("l0", "l1"), "bfloat16", 128, (3, 128, 128), slot_layout="cpu-vec"),
                  KVLayout("llama", ("l0", "l1"), "float16", 128, (3, 128, 128), slot_layout="cpu-vec"),
                  KVLayout("llama", ("l0", "l1"), "bfloat16", 16, (3, 16, 128), slot_layout="cpu-vec"),
                  # An AMX CPU's engine and another CPU's lay a block out differently.
                  KVLayout("llama", ("l0", "l1"), "bfloat16", 128, (3, 128, 128), slot_layout="cpu-amx")):
        assert other.layout_hash() != base.layout_hash()


def test_block_sizes():
    layout = KVLayout("m", ("a", "b"), "bfloat16", 128, (3, 128, 128))
    assert blocks_for_tokens(300, 128) == 3 and blocks_for_tokens(256, 128) == 2
    assert layout.block_bytes == 3 * 128 * 128 * 2
