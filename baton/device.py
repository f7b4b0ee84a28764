"""Everything that differs between vLLM's CPU build and its CUDA build.

Kept to this one small module: the rest of Baton runs unchanged on both.
"""

from __future__ import annotations

import os
from functools import cache


@cache
def is_cpu_build() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def engine_dtype(setting: str = "auto") -> str:
    """The dtype engines run in: ``setting`` unless it is "auto"; then the
    model's own, except on an x86 CPU that computes bfloat16 only by
    emulation (no AVX-512 BF16, no AMX), where float32 runs several times
    faster (a 1.2k-token prompt on one core of an AVX2 EPYC: 7.0 s against
    29.7 s in bfloat16) at twice the KV bytes per token."""
    if setting != "auto" or not is_cpu_build():
        return setting
    import platform

    import torch

    if platform.machine() not in ("x86_64", "AMD64"):
        return setting
    native_bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return setting if native_bf16 else "float32"


def engine_environment(cpu_cores: str, kv_cache_gib: int) -> dict[str, str]:
    """Variables the engine's processes need, set before the engine starts.

    CPU: the KV cache is sized in GiB, OpenMP threads are pinned to cores
    (two engines on one core set would fight for it), and the engine's
    queues busy-poll briefly (see below). CUDA needs none.
    """
    if not is_cpu_build():
        return {}
    env = {"VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib), BUSY_POLL_VARIABLE: str(CPU_ENGINE_BUSY_POLL_S)}
    if cpu_cores:
        env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_cores
    return env


# vLLM's shared-memory queues between an engine's scheduler process and its
# model process busy-poll (sched_yield) for 1 s after every message: cheap
# beside a GPU, costly where engines and services share a few cores. On the
# 2-core CPU build an idle prefill engine polled ~60 % of a core while the
# decode engine streamed, the router waited up to 0.9 s for a CPU and
# tokens reached clients in bursts (1 stream in 5). Polling for 50 ms covers
# the gap between an engine's steps; after it a queue waits on its
# notification socket, as vLLM's does after its second.
CPU_ENGINE_BUSY_POLL_S = 0.05
# vLLM starts an engine's processes with spawn on CPU: they learn the cap
# from their environment, and apply it from the vLLM plugin below.
BUSY_POLL_VARIABLE = "BATON_ENGINE_BUSY_POLL_S"


def apply_engine_environment(cpu_cores: str, kv_cache_gib: int) -> None:
    os.environ.update(engine_environment(cpu_cores, kv_cache_gib))


def tune_engine_process() -> None:
    """vLLM general plugin (entry point ``vllm.general_plugins``), run by
    vLLM in each of its processes before it builds their queues. Acts only
    in a Baton engine's processes, which carry the variable; a plain
    ``vllm serve`` in the same environment keeps vLLM's behaviour."""
    cap = os.environ.get(BUSY_POLL_VARIABLE)
    if cap:
        cap_queue_busy_poll(float(cap))


def cap_queue_busy_poll(seconds: float) -> None:
    """Readers of vLLM's shared-memory queues created from now on in this
    process busy-poll at most ``seconds`` after a message."""
    from vllm.distributed.device_communicators.shm_broadcast import SpinCondition

    original = SpinCondition.__init__
    if getattr(original, "baton_cap_s", None) == seconds:
        return

    def capped_init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if self.is_reader:
            self.busy_loop_s = min(self.busy_loop_s, seconds)

    capped_init.baton_cap_s = seconds
    SpinCondition.__init__ = capped_init


def engine_memory_args(gpu_memory_utilization: float) -> dict:
    return {} if is_cpu_build() else {"gpu_memory_utilization": gpu_memory_utilization}
