"""The CPU build's engine process settings."""

import zmq
from vllm.distributed.device_communicators.shm_broadcast import SpinCondition

from baton import device


def test_engine_processes_carry_the_cap_and_the_plugin_applies_only_there(monkeypatch):
    from importlib.metadata import entry_points

    plugins = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert plugins.get("baton_engine_process") == "baton.device:tune_engine_process"
    env = device.engine_environment("0", 1)
    assert float(env[device.BUSY_POLL_VARIABLE]) == device.CPU_ENGINE_BUSY_POLL_S
    applied = []
    monkeypatch.setattr(device, "cap_queue_busy_poll", applied.append)
    monkeypatch.delenv(device.BUSY_POLL_VARIABLE, raising=False)
    device.tune_engine_process()  # a plain `vllm serve`: untouched
    assert applied == []
    monkeypatch.setenv(device.BUSY_POLL_VARIABLE, env[device.BUSY_POLL_VARIABLE])
    device.tune_engine_process()
    assert applied == [device.CPU_ENGINE_BUSY_POLL_S]


def test_capped_busy_poll_applies_to_queue_readers_created_afterwards(tmp_path):
    address = f"ipc://{tmp_path}/notify"
    context = zmq.Context()
    original = SpinCondition.__init__
    try:
        writer = SpinCondition(is_reader=False, context=context, notify_address=address)
        before = SpinCondition(is_reader=True, context=context, notify_address=address)
        assert before.busy_loop_s == 1  # vLLM's own: a second of polling after each message
        device.cap_queue_busy_poll(device.CPU_ENGINE_BUSY_POLL_S)
        device.cap_queue_busy_poll(device.CPU_ENGINE_BUSY_POLL_S)  # idempotent: wrapped once
        after = SpinCondition(is_reader=True, context=context, notify_address=address)
        assert after.busy_loop_s == device.CPU_ENGINE_BUSY_POLL_S == 0.05
        assert writer.busy_loop_s == 0  # writers never poll
    finally:
        SpinCondition.__init__ = original
        context.destroy(linger=0)


def test_engines_run_in_float32_where_the_cpu_only_emulates_bfloat16(monkeypatch):
    import platform

    import torch

    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    assert device.engine_dtype("auto") == "float32"  # AVX2 only: ~4x faster
    assert device.engine_dtype("bfloat16") == "bfloat16"  # asked for: kept
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert device.engine_dtype("auto") == "auto"  # native bf16: the model's own
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert device.engine_dtype("auto") == "auto"  # vLLM's own choice there
