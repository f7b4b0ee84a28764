"""Which KV backend the control plane gives a prefill/decode pair."""

from baton.registry import WorkerRecord
from control_plane.kv_backend import choose_backend


def worker(role: str, *backends: str) -> WorkerRecord:
    return WorkerRecord(f"{role}-0", role, "h:1", "m", kv_endpoints={b: f"{b}-endpoint" for b in backends})


def test_the_backend_asked_for_when_both_offer_it():
    assert choose_backend("nixl", worker("prefill", "nixl"), worker("decode", "nixl", "grpc")) == "nixl"


def test_a_pull_backend_needs_the_producer_reachable_too():
    assert choose_backend("nixl", worker("prefill"), worker("decode", "nixl", "grpc")) == "grpc"


def test_a_push_backend_needs_only_the_consumer():
    assert choose_backend("grpc", worker("prefill"), worker("decode", "grpc")) == "grpc"


def test_a_decode_worker_without_the_backend_falls_back_to_grpc():
    assert choose_backend("nixl", worker("prefill", "nixl"), worker("decode", "grpc")) == "grpc"
