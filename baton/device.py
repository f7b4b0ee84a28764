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


def engine_environment(cpu_cores: str, kv_cache_gib: int) -> dict[str, str]:
    """Variables the engine's processes need, set before the engine starts.

    CPU: the KV cache is sized in GiB and OpenMP threads are pinned to cores
    (two engines on one core set would fight for it). CUDA needs none.
    """
    if not is_cpu_build():
        return {}
    env = {"VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib)}
    if cpu_cores:
        env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_cores
    return env


def apply_engine_environment(cpu_cores: str, kv_cache_gib: int) -> None:
    os.environ.update(engine_environment(cpu_cores, kv_cache_gib))


def engine_memory_args(gpu_memory_utilization: float) -> dict:
    return {} if is_cpu_build() else {"gpu_memory_utilization": gpu_memory_utilization}
