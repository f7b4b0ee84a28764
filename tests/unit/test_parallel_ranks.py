"""Tensor-parallel engines on every backend, for real (two ranks on CPU,
each with its own connector worker side and backend, as vLLM runs them):
the same step metadata reaches both ranks, each rank's shard of the prompt's
KV goes to the consumer's same rank and nowhere else, and a shard that
reaches the wrong rank is refused."""

from __future__ import annotations

import time

import pytest
import torch

from kv_transfer.connector.metadata import BatonConnectorMetadata, LoadSpec, SaveSpec
from kv_transfer.connector.worker_side import BatonWorkerSide
from kv_transfer.transport import available_backends
from kv_transfer.transport.base import ParallelRank, endpoint_for, per_rank
from kv_transfer.transport.inbox import Inbox

BLOCK = 4
NUM_BLOCKS = 8
LAYERS = 3
TP = 2
KINDS = available_backends()  # nixl only where installed; `make setup` installs it


def make_backend(kind: str, name: str, consumer: bool):
    if kind == "nixl":
        from kv_transfer.transport.nixl import NixlBackend

        return NixlBackend(name, fetch_timeout_ms=5_000, start_timeout_ms=500, offer_ttl_s=30)
    if kind == "collective":
        from kv_transfer.transport.collective import CollectiveBackend

        return CollectiveBackend(name, "127.0.0.1", consumer, 5_000, 500, Inbox(1 << 20, 30))
    from kv_transfer.transport.grpc_stream import GrpcBackend

    return GrpcBackend("127.0.0.1", 0, consumer, Inbox(1 << 20, 30), fetch_timeout_ms=5_000, start_timeout_ms=500)


def shard(seed: int) -> dict[str, torch.Tensor]:
    """One rank's KV: one of the model's two KV heads (CPU layout, heads of 32)."""
    generator = torch.Generator().manual_seed(seed)
    return {f"model.layers.{i}.attn": torch.randn((NUM_BLOCKS, 1, BLOCK, 64), generator=generator).to(
        torch.bfloat16) for i in range(LAYERS)}


class Engine:
    """The worker sides of one engine's ranks."""

    def __init__(self, kind: str, name: str, consumer: bool, seed: int):
        self.ranks = []
        for tp_rank in range(TP):
            side = BatonWorkerSide("test-model", BLOCK, NUM_BLOCKS,
                                   {kind: make_backend(kind, f"{name}-{seed}-r{tp_rank}", consumer)},
                                   cpu_attention_isa="vec")
            side.register_kv_caches(shard(seed * 10 + tp_rank), ParallelRank(tp_rank, TP))
            self.ranks.append(side)

    def endpoint(self, kind: str) -> str:
        """What the worker would publish in the registry ("" for a push
        backend's producer, which peers need not reach)."""
        endpoints = [side.endpoints().get(kind, "") for side in self.ranks]
        return per_rank(endpoints) if all(endpoints) else ""

    def close(self) -> None:
        for side in self.ranks:
            side.shutdown()


@pytest.fixture(scope="module", params=KINDS)
def engines(request):
    kind = request.param
    producer, consumer = Engine(kind, "prefill", False, 1), Engine(kind, "decode", True, 2)
    yield kind, producer, consumer
    producer.close()
    consumer.close()


def run_prefill_step(producer: Engine, spec: SaveSpec) -> None:
    meta = BatonConnectorMetadata(saves=[spec])
    for side in producer.ranks:  # every rank gets the same metadata and runs the same layers
        side.start_step(meta)
        for name, layer in zip(side.cache.names, side.cache.layers, strict=True):
            side.save_kv_layer(name, layer)
        side.end_step()


def run_load(consumer: Engine, spec: LoadSpec) -> list[bool]:
    """Per rank: did its load succeed."""
    meta = BatonConnectorMetadata(loads=[spec])
    outcome: list[bool | None] = [None] * TP
    for side in consumer.ranks:
        side.start_load(meta)
    deadline = time.monotonic() + 20
    while None in outcome:
        assert time.monotonic() < deadline, "a rank's load never finished"
        for index, side in enumerate(consumer.ranks):
            results = side.transfer_results(set())
            if spec.req_id in results.finished_recving:
                outcome[index] = spec.req_id not in results.failed_recving
        time.sleep(0.01)
    return outcome


def block(side: BatonWorkerSide, layer: int, block_id: int, tokens: int = BLOCK) -> torch.Tensor:
    """A block's first ``tokens`` slots, flat (CPU attention layout)."""
    return side.cache.slots.copy_first(side.cache.layers[layer][block_id], tokens)


def test_each_rank_moves_its_own_shard(engines):
    kind, producer, consumer = engines
    tid = f"tp-{kind}"
    run_prefill_step(producer, SaveSpec("p-req", tid, consumer.endpoint(kind), (2, 5), 2 * BLOCK - 1, "", kind))
    outcome = run_load(consumer, LoadSpec("d-req", tid, (6, 1), 0, 2 * BLOCK - 1, -1, kind,
                                          producer.endpoint(kind)))
    assert outcome == [True, True]
    for rank in range(TP):
        for layer in range(LAYERS):
            # The prompt fills block 5 but its last slot: that slot stays.
            for src, dst, tokens in ((2, 6, BLOCK), (5, 1, BLOCK - 1)):
                got = block(consumer.ranks[rank], layer, dst, tokens)
                assert torch.equal(got, block(producer.ranks[rank], layer, src, tokens))
                assert not torch.equal(got, block(producer.ranks[1 - rank], layer, src, tokens))


def test_a_shard_sent_to_the_wrong_rank_is_refused(engines):
    kind, producer, consumer = engines
    tid = f"crossed-{kind}"
    # Producer rank 1's shard, addressed to consumer rank 0.
    wrong = producer.ranks[1]._backends[kind]
    right_consumer = consumer.ranks[0]._backends[kind]
    outbound = wrong.send(SaveSpec("p-crossed", tid, consumer.ranks[0].endpoints()[kind], (3,), BLOCK, "", kind))
    for index, layer in enumerate(producer.ranks[1].cache.layers):
        outbound.layer_saved(index, layer)
    outbound.step_done()
    load = LoadSpec("d-crossed", tid, (4,), 0, BLOCK, -1, kind, producer.ranks[1].endpoints().get(kind, ""))
    with pytest.raises(Exception, match="rank mismatch"):
        right_consumer.receive(load)


def test_engines_split_differently_refuse_each_other():
    two = per_rank(["a:1", "b:2"])
    assert endpoint_for(two, ParallelRank(1, 2)) == "b:2"
    assert endpoint_for("a:1", ParallelRank()) == "a:1"
    with pytest.raises(ValueError, match="same tensor and pipeline parallel sizes"):
        endpoint_for(two, ParallelRank(0, 4))
    whole = BatonWorkerSide("m", BLOCK, NUM_BLOCKS, {})
    whole.register_kv_caches({"l": torch.zeros((NUM_BLOCKS, 2, BLOCK, 16))})
    half = BatonWorkerSide("m", BLOCK, NUM_BLOCKS, {})
    half.register_kv_caches({"l": torch.zeros((NUM_BLOCKS, 2, BLOCK, 16))}, ParallelRank(0, 2))
    assert whole.layout.layout_hash() != half.layout.layout_hash()
