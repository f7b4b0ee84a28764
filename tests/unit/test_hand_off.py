"""A draining decode engine hands a running request, with its KV, to
another engine: the worker service's note turns the request's abort into a
transfer of its first tokens' KV (scheduler half), which the worker half
sends (push backends) or offers (NIXL, blocks held until read) at once,
outside any forward. The worker half runs on real backends here."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest
import torch
from vllm.v1.request import RequestStatus

from kv_transfer.connector.metadata import BatonConnectorMetadata, LoadSpec, SaveSpec
from kv_transfer.connector.scheduler_side import BatonSchedulerSide
from kv_transfer.connector.worker_side import BatonWorkerSide
from kv_transfer.handoff import HandOffNote, mark_sent, take_note, until_sent, write_note
from kv_transfer.params import ConsumerParams, LoadReport, parse

BLOCK = 4
NUM_BLOCKS = 16


def decoding(request_id: str, computed: int, status=RequestStatus.FINISHED_ABORTED):
    """A decode request as vLLM's scheduler sees it when it finishes (its
    id carries vLLM's suffix)."""
    return SimpleNamespace(request_id=f"{request_id}-0a1b2c3d", status=status, num_computed_tokens=computed,
                           num_prompt_tokens=9, kv_transfer_params=None)


@pytest.mark.parametrize("backend, held", [("nixl", True), ("grpc", False), ("collective", False)])
def test_an_aborted_request_with_a_note_sends_its_first_tokens_kv(tmp_path, backend, held):
    side = BatonSchedulerSide(block_size=BLOCK, handoff_dir=str(tmp_path))
    write_note(tmp_path, "req", HandOffNote("t-move", "decode-b:1", backend, num_tokens=10))
    # 13 tokens computed in 4 blocks; the note asks for the first 10 (3 blocks).
    assert side.request_finished(decoding("req", 13), [5, 6, 7, 8]) == (held, None)
    meta = side.build_connector_meta(SimpleNamespace(scheduled_new_reqs=[], num_scheduled_tokens={},
                                                     scheduled_cached_reqs=SimpleNamespace(req_ids=[])))
    assert meta.moves == [SaveSpec("req-0a1b2c3d", "t-move", "decode-b:1", (5, 6, 7), 10, "", backend)]
    # On a pull backend vLLM keeps the blocks until the receiver read them.
    assert meta.held == ({"req-0a1b2c3d"} if held else set())
    assert take_note(tmp_path, "req-0a1b2c3d") is None, "a note is used once"


def test_without_a_note_or_with_tokens_not_computed_nothing_moves(tmp_path):
    side = BatonSchedulerSide(block_size=BLOCK, handoff_dir=str(tmp_path))
    # A consumer request aborted by its client: its load report, no move.
    client_gone = decoding("gone", 13)
    client_gone.kv_transfer_params = ConsumerParams("t-in", remote_tokens=8).to_dict()
    delay, params = side.request_finished(client_gone, [5, 6, 7, 8])
    assert delay is False and isinstance(parse(params), LoadReport)
    write_note(tmp_path, "early", HandOffNote("t-early", "decode-b:1", "nixl", num_tokens=10))
    assert side.request_finished(decoding("early", 6), [5, 6]) == (False, None)
    write_note(tmp_path, "done", HandOffNote("t-done", "decode-b:1", "nixl", num_tokens=10))
    # It finished by itself before the abort: no hand-off.
    assert side.request_finished(decoding("done", 13, RequestStatus.FINISHED_LENGTH_CAPPED), [5, 6, 7, 8]) == (
        False, None)
    meta = side.build_connector_meta(SimpleNamespace(scheduled_new_reqs=[], num_scheduled_tokens={},
                                                     scheduled_cached_reqs=SimpleNamespace(req_ids=[])))
    assert meta.moves == [] and meta.held == set()


def make_cache(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {f"model.layers.{i}.attn": torch.randn((2, NUM_BLOCKS, 3, BLOCK, 8), generator=generator).to(
        torch.bfloat16) for i in range(3)}


def block(layers: dict[str, torch.Tensor], name: str, block_id: int) -> torch.Tensor:
    return layers[name][:, block_id]


def make_backend(kind: str, name: str, consumer: bool):
    if kind == "nixl":
        from kv_transfer.transport.nixl import NixlBackend

        return NixlBackend(name, fetch_timeout_ms=5_000, start_timeout_ms=2_000, offer_ttl_s=30)
    from kv_transfer.transport.grpc_stream import GrpcBackend
    from kv_transfer.transport.inbox import Inbox

    return GrpcBackend("127.0.0.1", 0, consumer, Inbox(1 << 20, 30), fetch_timeout_ms=5_000, start_timeout_ms=2_000)


@pytest.mark.parametrize("kind", ["nixl", "grpc"])
def test_the_worker_half_sends_a_handed_off_requests_blocks_at_once(kind, tmp_path):
    if kind == "nixl":
        pytest.importorskip("nixl._api", reason="NIXL is installed by `make setup`")
    source = BatonWorkerSide("test-model", BLOCK, NUM_BLOCKS, {kind: make_backend(kind, f"handoff-src-{kind}", True)},
                             handoff_dir=str(tmp_path))
    source_layers = make_cache(1)
    source.register_kv_caches(source_layers)
    receiver_backend = make_backend(kind, f"handoff-dst-{kind}", True)
    receiver = BatonWorkerSide("test-model", BLOCK, NUM_BLOCKS, {kind: receiver_backend})
    receiver_layers = make_cache(2)
    receiver.register_kv_caches(receiver_layers)
    try:
        spec = SaveSpec("req-a-1234abcd", "t-handoff", receiver.endpoints()[kind], (5, 6, 7), 3 * BLOCK, "", kind)
        # The move and vLLM's hold on its blocks come in one step's news.
        held = {spec.req_id} if kind == "nixl" else set()
        source.start_step(BatonConnectorMetadata(moves=[spec], held=held))
        source.end_step()
        # The worker service hears that the KV is on its way (by the
        # caller's request id, without the engine's suffix).
        assert asyncio.run(until_sent(tmp_path, "req-a", 1)) == ""
        if kind == "nixl":
            assert source._backends["nixl"].finished_sending() == set(), "freed before it was read"
        load = LoadSpec("req-b", "t-handoff", (10, 11, 12), 0, 3 * BLOCK, -1, kind,
                        source.endpoints().get(kind, ""))
        received = receiver_backend.receive(load)
        assert received.bytes > 0
        for name in source_layers:
            for src, dst in zip((5, 6, 7), (10, 11, 12), strict=True):
                assert torch.equal(block(source_layers, name, src), block(receiver_layers, name, dst))
        if kind == "nixl":  # read: the source engine may free the blocks now
            deadline, freed = time.monotonic() + 5, set()
            while spec.req_id not in freed and time.monotonic() < deadline:
                freed |= source._backends["nixl"].finished_sending()
                time.sleep(0.01)
            assert spec.req_id in freed
    finally:
        source.shutdown()
        receiver.shutdown()


async def test_the_worker_service_hears_the_engines_word_or_times_out(tmp_path):
    assert await until_sent(tmp_path, "r", 0.05) is None, "no word yet"
    mark_sent(tmp_path, "r-0123abcd", "no route to the receiver")
    assert await until_sent(tmp_path, "r", 1) == "no route to the receiver"
    assert await until_sent(tmp_path, "r", 0.05) is None, "a word is heard once"


async def test_the_control_plane_places_a_hand_off_from_the_draining_worker_to_another():
    import dataclasses

    from baton.registry import WorkerRecord
    from baton.v1 import control_plane_pb2
    from control_plane.scheduling import make_scheduler
    from control_plane.service import ControlPlaneServicer
    from control_plane.suspects import Suspects
    from control_plane.transfers import TransferTable
    from tests.unit.test_suspects import Context, FakeRegistry, Health

    def worker(worker_id: str, role: str, **fields) -> WorkerRecord:
        return WorkerRecord(worker_id, role, f"{worker_id}:1", "m", kv_address=f"{worker_id}:2",
                            kv_endpoints={"nixl": f"nixl-of-{worker_id}", "grpc": f"{worker_id}:2"}, **fields)

    registry = FakeRegistry([worker("p1", "prefill"), worker("d1", "decode", state="draining"),
                             worker("d2", "decode")])
    servicer = ControlPlaneServicer(registry, {r: make_scheduler("round-robin", r) for r in ("prefill", "decode")},
                                    TransferTable(60), "nixl", suspects=Suspects(Health()))
    placement = await servicer.Schedule(control_plane_pb2.ScheduleRequest(
        request_id="r-handoff1", model="m", prompt_tokens=20, max_tokens=8, move_from="d1"), Context())
    # Its KV comes from the draining decode worker, over the deployment's backend.
    assert placement.prefill.worker_id == "d1" and placement.prefill.kv_endpoint == "nixl-of-d1"
    assert placement.decode.worker_id == "d2" and placement.decode.kv_endpoint == "nixl-of-d2"
    assert placement.kv_backend == "nixl" and placement.decision == "moved" and placement.transfer_id
    listed = await servicer.ListWorkers(None, Context())
    assert listed.decisions["moved"] == 1

    class Refusal(Exception):
        pass

    class Refused:
        async def abort(self, code, details):
            raise Refusal(code)

    registry.workers["d2"] = dataclasses.replace(registry.workers["d2"], state="draining")
    with pytest.raises(Refusal):  # no other decode worker: nowhere to hand it to
        await servicer.Schedule(control_plane_pb2.ScheduleRequest(
            request_id="r-handoff2", model="m", prompt_tokens=20, move_from="d1"), Refused())
