"""How `baton up` pins engines to cores."""

from baton.local_stack import _cpu_plan


def test_one_core_per_engine_when_there_are_enough():
    assert _cpu_plan(2, 2, [0, 1, 2, 3]) == (["0", "1"], ["3", "2"])


def test_prefill_and_decode_split_two_cores():
    assert _cpu_plan(1, 1, [0, 1]) == (["0"], ["1"])


def test_prefill_engines_share_a_core_rather_than_the_decode_engines():
    # 2 prefill + 1 decode on 2 cores: a NIXL producer on the decode engine's
    # core stalled its reads (README, "How KV moves").
    prefill, decode = _cpu_plan(2, 1, [0, 1])
    assert decode == ["1"]
    assert prefill == ["0", "0"]


def test_more_decode_engines_than_cores_wrap_and_prefill_takes_any():
    prefill, decode = _cpu_plan(1, 3, [0, 1])
    assert decode == ["1", "0", "1"]
    assert prefill == ["0"]


def test_a_single_core_hosts_everything():
    assert _cpu_plan(2, 1, [5]) == (["5", "5"], ["5"])
