"""The scheduling pipeline, piece by piece and as the named policies."""

import pytest

from control_plane.scheduling import (
    DEFAULT_POLICY,
    POLICIES,
    Candidate,
    EngineReport,
    NoWorker,
    Scheduler,
    SchedulingRequest,
    make_scheduler,
)
from control_plane.scheduling.disaggregation import (
    DISAGGREGATED,
    NO_PREFILL_WORKER,
    PREFILL_BACKLOG,
    SHORT_UNCACHED,
    Disaggregation,
)
from control_plane.scheduling.filters.labels import HasLabels
from control_plane.scheduling.filters.load_gap import LoadGapCap
from control_plane.scheduling.filters.model import ServesModel
from control_plane.scheduling.filters.saturation import NotSaturated
from control_plane.scheduling.pickers.best_score import BestScore
from control_plane.scheduling.pickers.rotation import Rotation
from control_plane.scheduling.scorers.decode_cost import DecodeCost
from control_plane.scheduling.scorers.load import LeastInFlight
from control_plane.scheduling.scorers.prefill_cost import PrefillCost

ANY = SchedulingRequest()


def keeps(f, request, candidate, pool=()) -> bool:
    return f.keep(request, candidate, list(pool) or [candidate])


def test_serves_model_keeps_the_models_workers():
    f = ServesModel()
    assert keeps(f, SchedulingRequest("m"), Candidate("a", "m")) and not keeps(f, SchedulingRequest("m"),
                                                                                Candidate("a", "x"))
    assert keeps(f, ANY, Candidate("a", "x")), "no model asked: any"
    assert "'m'" in f.why_none(SchedulingRequest("m")) and not f.client_error


def test_has_labels_keeps_workers_carrying_every_required_label():
    f = HasLabels()
    eu = SchedulingRequest(required_labels={"region": "eu"})
    assert keeps(f, eu, Candidate("a", labels={"region": "eu", "zone": "b"}))
    assert not keeps(f, eu, Candidate("b", labels={"region": "us"}))
    assert not keeps(f, eu, Candidate("c"))
    assert keeps(f, ANY, Candidate("c")), "nothing required: any"
    assert not keeps(f, SchedulingRequest(required_labels={"region": "eu", "zone": "a"}),
                     Candidate("a", labels={"region": "eu", "zone": "b"}))
    assert "region=eu" in f.why_none(eu) and f.client_error


def test_least_in_flight_scores_the_idlest_highest():
    scores = LeastInFlight().score(ANY, [Candidate("a", in_flight=3), Candidate("b", in_flight=1),
                                         Candidate("c", in_flight=1)])
    assert scores["b"] == scores["c"] == 1.0 and scores["a"] == pytest.approx(0.5)


def test_best_score_rotates_over_ties():
    picker = BestScore()
    scored = [(Candidate("a"), 1.0), (Candidate("b"), 1.0), (Candidate("c"), 0.2)]
    assert [picker.pick(scored).worker_id for _ in range(4)] == ["a", "b", "a", "b"]


def test_rotation_ignores_scores():
    picker = Rotation()
    scored = [(Candidate("a"), 0.0), (Candidate("b"), 1.0)]
    assert [picker.pick(scored).worker_id for _ in range(3)] == ["a", "b", "a"]


def test_scores_are_weighted_and_summed():
    class Prefers:
        name = "prefers"

        def __init__(self, worker_id):
            self.worker_id = worker_id

        def score(self, request, candidates):
            return {c.worker_id: 1.0 if c.worker_id == self.worker_id else 0.0 for c in candidates}

    pool = [Candidate("a"), Candidate("b")]
    assert Scheduler("t", [], [(Prefers("a"), 1.0), (Prefers("b"), 2.0)], BestScore()).pick(ANY, pool).worker_id == "b"
    assert Scheduler("t", [], [(Prefers("a"), 3.0), (Prefers("b"), 2.0)], BestScore()).pick(ANY, pool).worker_id == "a"


def test_least_loaded_picks_the_idlest_and_breaks_ties_round_robin():
    policy = make_scheduler("least-loaded")
    assert policy.pick(ANY, [Candidate("a", in_flight=3), Candidate("b", in_flight=1)]).worker_id == "b"
    policy = make_scheduler("least-loaded")
    pool = [Candidate("b"), Candidate("a"), Candidate("c", in_flight=5)]
    assert [policy.pick(ANY, pool).worker_id for _ in range(4)] == ["a", "b", "a", "b"]


def test_round_robin_rotates_regardless_of_load():
    policy = make_scheduler("round-robin")
    pool = [Candidate("a", in_flight=9), Candidate("b")]
    assert [policy.pick(ANY, pool).worker_id for _ in range(3)] == ["a", "b", "a"]


@pytest.mark.parametrize("role", ["prefill", "decode"])
@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_places_only_inside_the_required_labels(name, role):
    policy = make_scheduler(name, role)
    pool = [Candidate("a", "m", {"region": "us"}), Candidate("b", "m", {"region": "eu"}, in_flight=7),
            Candidate("c", "x", {"region": "eu"})]
    eu = SchedulingRequest("m", required_labels={"region": "eu"})
    assert {policy.pick(eu, pool).worker_id for _ in range(5)} == {"b"}
    with pytest.raises(NoWorker, match="region=mars") as refused:
        policy.pick(SchedulingRequest("m", required_labels={"region": "mars"}), pool)
    assert refused.value.client_error


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_no_worker_for_the_model_is_a_capacity_error_that_names_it(name):
    with pytest.raises(NoWorker, match="'m'") as refused:
        make_scheduler(name).pick(SchedulingRequest("m"), [Candidate("a", "x")])
    assert not refused.value.client_error
    with pytest.raises(NoWorker):
        make_scheduler("least-loaded").pick(ANY, [])


def test_unknown_policy_names_the_choices():
    with pytest.raises(ValueError, match="least-loaded"):
        make_scheduler("fastest")


def test_not_saturated_passes_over_full_or_queued_engines_unless_all_are():
    f = NotSaturated(max_kv_cache_usage=0.9, max_waiting=2)
    full, queued = Candidate("a", engine=EngineReport(kv_cache_usage=0.95)), Candidate("b", engine=EngineReport(waiting=3))
    fine, unknown = Candidate("c", engine=EngineReport(kv_cache_usage=0.5, waiting=2)), Candidate("d")
    assert [keeps(f, ANY, c) for c in (full, queued, fine, unknown)] == [False, False, True, True]
    assert f.soft and not f.client_error
    # A soft filter never leaves the pipeline without workers.
    only_full = Scheduler("t", [f], [], BestScore())
    assert only_full.pick(ANY, [full]).worker_id == "a"
    assert Scheduler("t", [f], [], BestScore()).pick(ANY, [full, fine]).worker_id == "c"


def test_load_gap_cap_keeps_workers_near_the_shortest_queue():
    f = LoadGapCap(max_gap_tokens=100)
    pool = [Candidate("a", queued_prefill_tokens=50), Candidate("b", queued_prefill_tokens=150),
            Candidate("c", queued_prefill_tokens=151)]
    assert [keeps(f, ANY, c, pool) for c in pool] == [True, True, False]


def test_prefill_cost_counts_queue_and_uncached_tokens_in_one_unit():
    request = SchedulingRequest(prompt_tokens=1000)
    pool = [Candidate("cached", cached_tokens=768, queued_prefill_tokens=300),  # 300 + 232
            Candidate("idle"),  # 0 + 1000
            Candidate("busy", cached_tokens=768, queued_prefill_tokens=900)]  # 900 + 232
    scores = PrefillCost().score(request, pool)
    assert scores["cached"] == 1.0 and scores["cached"] > scores["idle"] > scores["busy"]


def test_decode_cost_counts_held_kv_and_missing_prompt():
    request = SchedulingRequest(prompt_tokens=500)
    pool = [Candidate("holds-prefix", cached_tokens=384, decode_tokens=600),  # 600 + 116
            Candidate("empty", decode_tokens=0),  # 0 + 500
            Candidate("full", decode_tokens=5000)]
    scores = DecodeCost().score(request, pool)
    assert scores["empty"] == 1.0 and scores["empty"] > scores["holds-prefix"] > scores["full"]


def test_kv_aware_sends_a_shared_prefix_where_it_is_cached():
    policy = make_scheduler("kv-aware", "prefill")
    request = SchedulingRequest(prompt_tokens=700)
    pool = [Candidate("a"), Candidate("b", cached_tokens=640), Candidate("c")]
    assert {policy.pick(request, pool).worker_id for _ in range(4)} == {"b"}


def test_kv_aware_does_not_herd_a_hot_prefix_onto_a_busy_worker():
    """Placements add to the holder's queue: once it owes more than the
    prefix saves, another worker takes the request (and then holds the
    prefix too, as the index says after a placement)."""
    policy = make_scheduler("kv-aware", "prefill")
    request = SchedulingRequest(prompt_tokens=700)
    queued = {"a": 0, "b": 0, "c": 0}
    cached = {"b": 640}
    chosen = []
    for _ in range(40):  # none finishes meanwhile: a burst
        pool = [Candidate(w, cached_tokens=cached.get(w, 0), queued_prefill_tokens=q) for w, q in queued.items()]
        pick = policy.pick(request, pool)
        queued[pick.worker_id] += request.prompt_tokens - pick.cached_tokens
        cached[pick.worker_id] = 640
        chosen.append(pick.worker_id)
    assert chosen[:3] == ["b", "b", "b"]  # the prefix saves 640 tokens: worth a short queue
    assert set(chosen) == {"a", "b", "c"}
    # No worker owes more than another by more than the prefix saves.
    assert max(queued.values()) - min(queued.values()) <= 640 + 60


def test_the_default_policy_is_kv_aware():
    assert DEFAULT_POLICY == "kv-aware"


def test_a_short_uncached_prompt_skips_the_prefill_worker():
    decide = Disaggregation().decide
    idle_prefill = Candidate("p")
    # 1000 tokens, 900 of them already cached on the decode worker.
    request = SchedulingRequest(prompt_tokens=1000)
    assert decide(request, idle_prefill, Candidate("d", cached_tokens=896)) == SHORT_UNCACHED
    assert decide(SchedulingRequest(prompt_tokens=60), idle_prefill, Candidate("d")) == SHORT_UNCACHED
    assert decide(request, idle_prefill, Candidate("d")) == DISAGGREGATED


def test_a_backed_up_prefill_pool_sends_prompts_to_a_decode_worker_with_room():
    decide = Disaggregation().decide
    request = SchedulingRequest(prompt_tokens=512)
    busy = Candidate("p", queued_prefill_tokens=2048)
    assert decide(request, busy, Candidate("d", running=2, decoding=2)) == PREFILL_BACKLOG  # 1024 < 2048 + 640
    # Prefilling here would hold up the twelve sequences decoding here ...
    assert decide(request, busy, Candidate("d", running=12, decoding=12)) == DISAGGREGATED
    # ... but not those still waiting for their prefill.
    assert decide(request, busy, Candidate("d", running=12, decoding=2)) == PREFILL_BACKLOG
    assert decide(request, Candidate("p"), Candidate("d", running=2, decoding=2)) == DISAGGREGATED


def test_without_a_prefill_worker_decode_serves_alone_and_always_means_always():
    request = SchedulingRequest(prompt_tokens=10)
    assert Disaggregation().decide(request, None, Candidate("d")) == NO_PREFILL_WORKER
    always = Disaggregation(enabled=False)
    assert always.decide(request, Candidate("p"), Candidate("d")) == DISAGGREGATED
    assert always.decide(request, None, Candidate("d")) == NO_PREFILL_WORKER


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_passes_over_draining_and_suspect_workers(name):
    scheduler = make_scheduler(name)
    pool = [Candidate("a", "m", state="draining"), Candidate("b", "m"), Candidate("c", "m", state="suspect")]
    assert {scheduler.pick(SchedulingRequest("m"), pool).worker_id for _ in range(4)} == {"b"}
    with pytest.raises(NoWorker, match="draining or suspect") as none:
        scheduler.pick(SchedulingRequest("m"), [pool[0], pool[2]])
    assert not none.value.client_error
