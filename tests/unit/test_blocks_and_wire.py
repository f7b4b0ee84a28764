import torch

from kv_transfer.blocks import as_bytes, find_block_dim, from_bytes, gather_blocks, scatter_blocks
from kv_transfer.wire import KVLayout, blocks_for_tokens


def test_blocks_round_trip_through_bytes_cpu_layout():
    # CPU backend layout: (num_blocks, kv_heads, block_size, 2 * head_dim)
    src = torch.randn(10, 3, 4, 16).to(torch.bfloat16)
    dst = torch.zeros_like(src)
    dim = find_block_dim(src, 10)
    assert dim == 0
    payload = as_bytes(gather_blocks(src, dim, [7, 2, 5]))
    blocks = from_bytes(bytearray(payload), torch.bfloat16, (3, 3, 4, 16))
    scatter_blocks(dst, dim, [0, 1, 9], blocks)
    assert torch.equal(dst[0], src[7]) and torch.equal(dst[1], src[2]) and torch.equal(dst[9], src[5])
    assert not dst[3].any()


def test_blocks_on_a_gpu_style_layout():
    # FlashAttention layout: (2, num_blocks, block_size, kv_heads, head_dim)
    src = torch.randn(2, 12, 4, 3, 8)
    dst = torch.zeros_like(src)
    dim = find_block_dim(src, 12)
    assert dim == 1
    scatter_blocks(dst, dim, [4], gather_blocks(src, dim, [11]))
    assert torch.equal(dst[:, 4], src[:, 11])


def test_layout_hash_changes_with_anything_that_matters():
    base = KVLayout("llama", ("l0", "l1"), "bfloat16", 128, (3, 128, 128))
    assert base.layout_hash() == KVLayout("llama", ("l0", "l1"), "bfloat16", 128, (3, 128, 128)).layout_hash()
    for other in (KVLayout("qwen", ("l0", "l1"), "bfloat16", 128, (3, 128, 128)),
                  KVLayout("llama", ("l0", "l1"), "float16", 128, (3, 128, 128)),
                  KVLayout("llama", ("l0", "l1"), "bfloat16", 16, (3, 16, 128))):
        assert other.layout_hash() != base.layout_hash()


def test_block_sizes():
    layout = KVLayout("m", ("a", "b"), "bfloat16", 128, (3, 128, 128))
    assert blocks_for_tokens(300, 128) == 3 and blocks_for_tokens(256, 128) == 2
    assert layout.block_bytes == 3 * 128 * 128 * 2
