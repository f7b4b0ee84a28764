"""The prefix index: fed by engine events, or learned from placements."""

from control_plane.prefix_index import (
    PROVISIONAL_S,
    Cleared,
    PrefixIndex,
    Removed,
    Stored,
    block_keys,
)

BS = 4


def tokens(n: int, start: int = 0) -> list[int]:
    return list(range(start, start + n))


def indexed(events: bool = True, capacity: int = 100) -> PrefixIndex:
    index = PrefixIndex()
    index.track("w", events=events, block_size=BS, capacity_blocks=capacity)
    return index


def test_keys_chain_whole_blocks_only():
    keys = block_keys(tokens(10), BS)
    assert len(keys) == 2  # the last 2 tokens are no block
    assert block_keys(tokens(8), BS) == keys
    # A block's key depends on everything before it, not only its tokens.
    other = block_keys([99] + tokens(7, 1), BS)
    assert other[0] != keys[0] and other[1] != keys[1]


def test_events_give_the_engines_cached_prefix_with_its_own_hashes():
    index = indexed()
    prompt = tokens(12)
    keys = block_keys(prompt, BS)
    # The engine stores the first two blocks, then a third chained on the second.
    index.apply("w", Stored([101, 102], None, prompt[:8], BS))
    index.apply("w", Stored([103], 102, prompt[8:12], BS))
    assert index.matched_blocks("w", keys, 0) == 3
    assert index.matched_blocks("w", block_keys(prompt[:4] + [7, 7, 7, 7], BS), 0) == 1
    # Evicting the middle block cuts the usable prefix there.
    index.apply("w", Removed([102]))
    assert index.matched_blocks("w", keys, 0) == 1
    index.apply("w", Cleared())
    assert index.matched_blocks("w", keys, 0) == 0


def test_a_block_whose_parent_was_never_seen_is_counted_not_guessed():
    index = indexed()
    index.apply("w", Stored([103], 555, tokens(4, 8), BS))
    assert index.orphans("w") == 1 and index.cached_blocks("w") == 0
    index.apply("w", Stored([1], None, tokens(3), BS))  # not a whole block
    assert index.orphans("w") == 2


def test_placements_count_until_the_events_come_or_for_a_few_seconds():
    index = indexed()
    keys = block_keys(tokens(8), BS)
    index.placed("w", keys, now_s=100.0)
    assert index.matched_blocks("w", keys, 101.0) == 2
    assert index.matched_blocks("w", keys, 100.0 + PROVISIONAL_S + 0.1) == 0
    index.placed("w", keys, now_s=200.0)
    index.apply("w", Stored([1, 2], None, tokens(8), BS))
    assert index.matched_blocks("w", keys, 300.0) == 2  # confirmed: no longer provisional


def test_without_events_history_is_the_index_bounded_by_capacity():
    index = indexed(events=False, capacity=3)
    first, second = block_keys(tokens(8), BS), block_keys(tokens(8, 50), BS)
    index.placed("w", first, 0)
    assert index.matched_blocks("w", first, 10_000) == 2
    index.placed("w", second, 1)
    assert index.cached_blocks("w") == 3  # the oldest block went
    assert index.matched_blocks("w", second, 2) == 2 and index.matched_blocks("w", first, 2) == 0
    index.apply("w", Stored([1], None, tokens(4), BS))  # events ignored in history mode
    assert index.source("w") == "history"


def test_a_worker_seen_anew_or_reset_starts_empty():
    index = indexed()
    index.apply("w", Stored([1], None, tokens(4), BS))
    index.track("w", events=True, block_size=BS, capacity_blocks=100)  # the same worker: kept
    assert index.cached_blocks("w") == 1
    index.reset("w")
    assert index.cached_blocks("w") == 0
    index.apply("w", Stored([1], None, tokens(4), BS))
    index.track("w", events=False, block_size=BS, capacity_blocks=100)
    assert index.cached_blocks("w") == 0 and index.source("w") == "history"
    index.forget("w")
    assert index.matched_blocks("w", block_keys(tokens(4), BS), 0) == 0 and index.source("w") == ""
