"""Two models behind one `baton up`: the embedded model, and a variant of
it whose chat template gives another system prompt (as a fine-tune would
ship its own). Each has its own prefill and decode worker; requests route by
`model` through the OpenAI SDK and gRPC, each to its model's frontend (its
template) and workers."""

from __future__ import annotations

import grpc
import openai
import pytest
from openai import OpenAI

from baton.v1 import inference_pb2, inference_pb2_grpc
from tests.e2e.conftest import baton_stack
from tests.e2e.prompts import CAPITAL_QUESTION
from tests.e2e.test_registry_and_status import status

pytestmark = pytest.mark.own_stack

PREFIX = "/baton/models"
VARIANT = "smol-terse"
VARIANT_SYSTEM = "You are Terse, an assistant that answers in as few words as it can."


@pytest.fixture(scope="module")
def variant_dir(model_path, tmp_path_factory):
    """The embedded model's weights and tokenizer, another chat template."""
    directory = tmp_path_factory.mktemp("models") / VARIANT
    directory.mkdir()
    for item in model_path.iterdir():
        if item.name != "chat_template.jinja":
            (directory / item.name).symlink_to(item)
    template = (model_path / "chat_template.jinja").read_text()
    default_system = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert default_system in template
    (directory / "chat_template.jinja").write_text(template.replace(default_system, VARIANT_SYSTEM))
    return directory


@pytest.fixture(scope="module")
def two_models(etcd, model_path, variant_dir, tmp_path_factory):
    models = f"{model_path.name}=,{VARIANT}={variant_dir}"
    with baton_stack(etcd, tmp_path_factory.mktemp("models-logs"), {}, "--models", models,
                     prefix=PREFIX) as stack:
        yield stack


def client(stack) -> OpenAI:
    return OpenAI(base_url=stack.http_base, api_key="unused", timeout=120)


def placements(stack) -> dict[str, int]:
    return {worker_id: row["transfers"]["total"] for worker_id, row in status(stack).items()}


def chat_prompt_tokens(directory) -> int:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    text = tokenizer.apply_chat_template([{"role": "user", "content": CAPITAL_QUESTION}],
                                         add_generation_prompt=True, tokenize=False)
    return len(tokenizer(text, add_special_tokens=False).input_ids)


def test_every_model_with_live_workers_is_listed(two_models):
    listed = {m.id for m in client(two_models).models.list().data}
    assert listed == {two_models.model_name, VARIANT}
    with grpc.insecure_channel(two_models.grpc_address) as channel:
        reply = inference_pb2_grpc.InferenceStub(channel).ListModels(inference_pb2.ListModelsRequest(), timeout=30)
    assert set(reply.models) == listed


def test_requests_route_by_model_to_its_template_and_workers(two_models, model_path, variant_dir):
    workers = {worker_id: row["model"] for worker_id, row in status(two_models).items()}
    assert sorted(workers.values()) == sorted([two_models.model_name] * 2 + [VARIANT] * 2)
    expected_tokens = {two_models.model_name: chat_prompt_tokens(model_path), VARIANT: chat_prompt_tokens(variant_dir)}
    assert expected_tokens[VARIANT] != expected_tokens[two_models.model_name]
    for model in (VARIANT, two_models.model_name):
        before = placements(two_models)
        reply = client(two_models).chat.completions.create(
            model=model, messages=[{"role": "user", "content": CAPITAL_QUESTION}], max_tokens=8, temperature=0,
            extra_body={"kv_transfer_params": {"do_remote_prefill": True}})
        assert reply.model == model
        assert reply.usage.prompt_tokens == expected_tokens[model]  # rendered with that model's template
        assert "Paris" in reply.choices[0].message.content
        after = placements(two_models)
        moved = {w: after[w] - before.get(w, 0) for w in after if after[w] != before.get(w, 0)}
        # Its own prefill and decode worker, nobody else's.
        assert set(moved) == {w for w, m in workers.items() if m == model}, moved
        assert set(moved.values()) == {1}


def test_grpc_routes_by_model(two_models):
    with grpc.insecure_channel(two_models.grpc_address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        before = placements(two_models)
        replies = list(stub.Generate(inference_pb2.GenerateRequest(
            model=VARIANT, prompt="The capital of France is", remote_prefill=True,
            sampling=inference_pb2.SamplingParams(max_tokens=4, temperature=0)), timeout=120))
        assert "Paris" in "".join(r.text for r in replies)
        after = placements(two_models)
        moved = {w: after[w] - before.get(w, 0) for w in after if after[w] != before.get(w, 0)}
        assert moved == {w: 1 for w, row in status(two_models).items() if row["model"] == VARIANT}, moved
        with pytest.raises(grpc.RpcError) as failed:
            list(stub.Generate(inference_pb2.GenerateRequest(model="no-such-model", prompt="hi"), timeout=30))
    assert failed.value.code() == grpc.StatusCode.NOT_FOUND
    assert VARIANT in failed.value.details() and two_models.model_name in failed.value.details()


def test_an_unknown_model_gets_a_404_naming_the_served_ones(two_models):
    with pytest.raises(openai.NotFoundError) as failed:
        client(two_models).chat.completions.create(model="no-such-model", max_tokens=4,
                                                   messages=[{"role": "user", "content": "hi"}])
    message = failed.value.body["message"]
    assert "no-such-model" in message and VARIANT in message and two_models.model_name in message
    # Still serving.
    assert client(two_models).completions.create(model=VARIANT, prompt="Hello", max_tokens=2).usage.completion_tokens
