"""How KV bytes move between engines. ``base`` holds the contract; each
backend lives in its own module and is imported only when an engine uses it:

- ``nixl``: one-sided reads straight between the engines' paged caches (UCX:
  shared memory, TCP, RDMA, VRAM). The default: fastest where measured.
- ``collective``: torch.distributed send/recv (Gloo on CPU, NCCL on GPU)
  over one two-rank process group per prefill/decode pair.
- ``grpc``: each layer streamed over gRPC straight into the decode engine;
  needs nothing but gRPC.

The push backends (``collective``, ``grpc``) share ``layer_queue`` (the
producer half) and ``inbox`` (the consumer half).
"""

from __future__ import annotations

BACKENDS = ("nixl", "collective", "grpc")
# Needs nothing but gRPC: what a pair falls back to, and what an empty
# backend field on the wire means.
FALLBACK_BACKEND = "grpc"
# The producer keeps the prompt's blocks until the consumer has read them.
PULL_BACKENDS = frozenset({"nixl"})


def available_backends() -> tuple[str, ...]:
    """Backends this machine can run (NIXL is an optional install)."""
    names = []
    for name in BACKENDS:
        if name == "nixl":
            try:
                import nixl._api  # noqa: F401
            except ImportError:
                continue
        if name == "collective":
            import torch.distributed

            if not torch.distributed.is_available():
                continue
        names.append(name)
    return tuple(names)


def check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown KV backend {name!r}; choose from {', '.join(BACKENDS)}")
    return name
