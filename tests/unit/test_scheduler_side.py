"""The connector's scheduler half, driven step by step with stand-ins for
vLLM's request and scheduler-output objects."""

from dataclasses import dataclass
from types import SimpleNamespace

from kv_transfer.connector.metadata import BatonWorkerMetadata
from kv_transfer.connector.scheduler_side import BatonSchedulerSide
from kv_transfer.params import ConsumerParams, LoadReport, ProducerParams, parse


@dataclass
class FakeRequest:
    request_id: str
    num_prompt_tokens: int
    kv_transfer_params: dict | None


@dataclass
class FakeBlocks:
    ids: list[int]

    def get_block_ids(self):
        return (self.ids,)


def cached_reqs(req_ids=(), new_block_ids=(), num_computed_tokens=(), resumed=()):
    return SimpleNamespace(req_ids=list(req_ids), new_block_ids=list(new_block_ids),
                           num_computed_tokens=list(num_computed_tokens), resumed_req_ids=set(resumed))


def output(new=(), cached=None, scheduled=None):
    cached = cached or cached_reqs()
    return SimpleNamespace(scheduled_new_reqs=list(new), scheduled_cached_reqs=cached,
                           num_scheduled_tokens=scheduled or {})


def test_producer_pushes_once_the_whole_prompt_is_computed():
    side = BatonSchedulerSide(block_size=4)
    req = FakeRequest("r", 10, ProducerParams("t1", "decode:1").to_dict())
    side.update_state_after_alloc(req, FakeBlocks([7, 8]), 0)
    # chunked prefill: first 8 tokens in step 1, the last 2 in step 2
    meta = side.build_connector_meta(output(
        new=[SimpleNamespace(req_id="r", block_ids=([7, 8],), num_computed_tokens=0)], scheduled={"r": 8}))
    assert meta.saves == []
    meta = side.build_connector_meta(output(
        cached=cached_reqs(["r"], [([9],)], [8]), scheduled={"r": 2}))
    (save,) = meta.saves
    assert save.block_ids == (7, 8, 9) and save.num_tokens == 10 and save.transfer_id == "t1"
    assert side.build_connector_meta(output()).saves == []


def test_producer_pushes_the_new_blocks_of_a_resumed_request():
    side = BatonSchedulerSide(block_size=4)
    req = FakeRequest("r", 10, ProducerParams("t1", "decode:1").to_dict())
    side.update_state_after_alloc(req, FakeBlocks([7, 8]), 0)
    side.build_connector_meta(output(
        new=[SimpleNamespace(req_id="r", block_ids=([7, 8],), num_computed_tokens=0)], scheduled={"r": 8}))
    # preempted, then resumed from scratch on other blocks
    meta = side.build_connector_meta(output(
        cached=cached_reqs(["r"], [([4, 5, 6],)], [0], resumed=["r"]), scheduled={"r": 10}))
    assert meta.saves[0].block_ids == (4, 5, 6)


def test_consumer_loads_all_prompt_blocks_but_computes_the_first_token():
    side = BatonSchedulerSide(block_size=4)
    # decode prompt = 10 prefill tokens + the first token
    req = FakeRequest("r", 11, ConsumerParams("t1", remote_tokens=10).to_dict())
    assert side.get_num_new_matched_tokens(req, 0) == (10, True)
    side.update_state_after_alloc(req, FakeBlocks([3, 4, 5]), 10)
    assert side.get_num_new_matched_tokens(req, 10) == (0, False), "a transfer is claimed only once"
    (load,) = side.build_connector_meta(output()).loads
    assert load.block_ids == (3, 4, 5) and load.first_block == 0
    _, params = side.request_finished(req, [3, 4, 5])
    assert parse(params) == LoadReport("t1", external_tokens=10, failed=False)


def test_consumer_skips_blocks_found_in_the_local_prefix_cache():
    side = BatonSchedulerSide(block_size=4)
    req = FakeRequest("r", 11, ConsumerParams("t1", remote_tokens=10).to_dict())
    assert side.get_num_new_matched_tokens(req, 8) == (2, True)
    side.update_state_after_alloc(req, FakeBlocks([1, 2, 6]), 2)
    (load,) = side.build_connector_meta(output()).loads
    assert load.block_ids == (6,) and load.first_block == 2


def test_a_failed_load_is_reported_as_recomputed():
    side = BatonSchedulerSide(block_size=4)
    req = FakeRequest("r", 5, ConsumerParams("t1", remote_tokens=4).to_dict())
    side.update_state_after_alloc(req, FakeBlocks([1, 2]), 4)
    side.update_connector_output(SimpleNamespace(failed_recving={"r", "aborted-earlier"}))
    _, params = side.request_finished(req, [1, 2])
    assert parse(params) == LoadReport("t1", external_tokens=0, failed=True)
    assert side._failed == set(), "failures of requests no longer tracked must not accumulate"


def test_requests_without_baton_params_are_left_alone():
    side = BatonSchedulerSide(block_size=4)
    req = FakeRequest("r", 5, None)
    assert side.get_num_new_matched_tokens(req, 0) == (0, False)
    side.update_state_after_alloc(req, FakeBlocks([1]), 0)
    assert side.request_finished(req, [1]) == (False, None)




def test_consumer_that_samples_the_first_token_restores_the_recomputed_position():
    side = BatonSchedulerSide(block_size=4)
    # decode prompt = the 9 prefill tokens: positions 0..7 load, position 8
    # (request block 2) is recomputed to sample the first token.
    req = FakeRequest("r", 9, ConsumerParams("t1", remote_tokens=9).to_dict())
    assert side.get_num_new_matched_tokens(req, 0) == (8, True)
    side.update_state_after_alloc(req, FakeBlocks([3, 4]), 8)
    (load,) = side.build_connector_meta(output()).loads
    assert load.block_ids == (3, 4) and load.keep_block == 2
    # Not before the load finished...
    scheduled = SimpleNamespace(req_id="r", block_ids=([3, 4, 9],), num_computed_tokens=8)
    assert side.build_connector_meta(output(new=[scheduled], scheduled={"r": 1})).restores == []
    side.update_connector_output(SimpleNamespace(finished_recving={"r"}, failed_recving=set()))
    # ...then in the step that computes position 8, into the block holding it.
    (restore,) = side.build_connector_meta(output(new=[scheduled], scheduled={"r": 1})).restores
    assert restore.req_id == "r" and restore.block_id == 9
    assert side.build_connector_meta(output(new=[scheduled])).restores == [], "restored once"


def test_a_failed_load_restores_nothing():
    side = BatonSchedulerSide(block_size=4)
    req = FakeRequest("r", 9, ConsumerParams("t1", remote_tokens=9).to_dict())
    side.update_state_after_alloc(req, FakeBlocks([3, 4]), 8)
    side.update_connector_output(SimpleNamespace(finished_recving={"r"}, failed_recving={"r"}))
    scheduled = SimpleNamespace(req_id="r", block_ids=([3, 4, 9],), num_computed_tokens=0)
    assert side.build_connector_meta(output(new=[scheduled])).restores == []


def _saved_producer(side, req_id: str, backend: str):
    from vllm.v1.request import RequestStatus

    req = FakeRequest(req_id, 4, ProducerParams(f"t-{req_id}", "decode:1", backend=backend).to_dict())
    req.status = RequestStatus.FINISHED_LENGTH_CAPPED
    side.update_state_after_alloc(req, FakeBlocks([7]), 0)
    (save,) = side.build_connector_meta(output(
        new=[SimpleNamespace(req_id=req_id, block_ids=([7],), num_computed_tokens=0)], scheduled={req_id: 4})).saves
    assert save.backend == backend
    return req


def test_a_pull_producer_keeps_its_blocks_until_the_consumer_read_them():
    from vllm.v1.request import RequestStatus

    side = BatonSchedulerSide(block_size=4)
    kept = _saved_producer(side, "kept", "nixl")
    stopped = _saved_producer(side, "stopped", "nixl")
    assert side.request_finished(kept, [7]) == (True, None)  # its first token made: decode will read
    stopped.status = RequestStatus.FINISHED_STOPPED  # the answer ended at the first token: nobody reads
    assert side.request_finished(stopped, [7]) == (False, None)
    meta = side.build_connector_meta(output())
    assert meta.held == {"kept"} and meta.released == {"stopped"}
    assert side.build_connector_meta(output()).held == set(), "news are told once"


def test_a_push_producer_frees_its_blocks_at_once():
    side = BatonSchedulerSide(block_size=4)
    req = _saved_producer(side, "pushed", "grpc")
    assert side.request_finished(req, [7]) == (False, None)
    meta = side.build_connector_meta(output())
    assert meta.held == set() and meta.released == set()


def test_the_load_report_counts_the_bytes_the_workers_loaded():
    side = BatonSchedulerSide(block_size=4)
    # 9 remote tokens of a 10-token prompt: blocks 0-2 loaded, and block 2
    # (where the recomputed last position lands) kept for its restore.
    req = FakeRequest("r", 10, ConsumerParams("t1", remote_tokens=10, backend="nixl", source="p").to_dict())
    assert side.get_num_new_matched_tokens(req, 0) == (9, True)
    side.update_state_after_alloc(req, FakeBlocks([3, 4, 5]), 9)
    (load,) = side.build_connector_meta(output()).loads
    assert (load.block_ids, load.keep_block, load.backend, load.source) == ((3, 4, 5), 2, "nixl", "p")
    # Two ranks, each loading its shard, report in the step the load ends.
    moved = BatonWorkerMetadata({"r": 1200}).aggregate(BatonWorkerMetadata({"r": 1200, "gone": 5}))
    side.update_connector_output(SimpleNamespace(finished_recving={"r"}, failed_recving=set(),
                                                 kv_connector_worker_meta=moved))
    _, params = side.request_finished(req, [3, 4, 5])
    assert parse(params).bytes == 2400 and parse(params).external_tokens == 9
    # Continuing after the first token: all 10 prompt tokens loaded, no restore.
    req = FakeRequest("c", 11, ConsumerParams("t3", remote_tokens=10, backend="grpc").to_dict())
    assert side.get_num_new_matched_tokens(req, 0) == (10, True)
    side.update_state_after_alloc(req, FakeBlocks([1, 2, 3]), 10)
    (load,) = side.build_connector_meta(output()).loads
    assert (load.block_ids, load.keep_block) == ((1, 2, 3), -1)
    # A failed load reports no bytes, whatever arrived.
    side.update_connector_output(SimpleNamespace(finished_recving={"c"}, failed_recving={"c"},
                                                 kv_connector_worker_meta=BatonWorkerMetadata({"c": 99})))
    report = parse(side.request_finished(req, [1, 2, 3])[1])
    assert report.failed and report.bytes == 0


def test_a_pull_consumer_that_never_loads_declines_the_offer():
    side = BatonSchedulerSide(block_size=4)
    # The whole prompt was in the local prefix cache: nothing to load.
    req = FakeRequest("r", 9, ConsumerParams("t1", remote_tokens=9, backend="nixl", source="prefill-ep").to_dict())
    assert side.get_num_new_matched_tokens(req, 8) == (0, False)
    side.request_finished(req, [1, 2, 3])
    assert side.build_connector_meta(output()).declined == [("nixl", "t1", "prefill-ep")]
    loaded = FakeRequest("l", 9, ConsumerParams("t2", remote_tokens=9, backend="nixl", source="p").to_dict())
    side.update_state_after_alloc(loaded, FakeBlocks([1, 2]), 8)
    side.request_finished(loaded, [1, 2])
    assert side.build_connector_meta(output()).declined == [], "a load tells the producer itself"
