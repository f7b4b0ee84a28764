import pytest

from baton.config import load_settings
from baton.errors import ClientError, NotFoundError
from router.requests import Limits, build, check_model

LIMITS = Limits("m", max_model_len=100, max_tokens_limit=50, default_max_tokens=20, vocab_size=1000)


def test_settings_precedence(tmp_path):
    path = tmp_path / "baton.toml"
    path.write_text('http_port = 9000\npolicy = "round-robin"\n')
    s = load_settings({"policy": "least-loaded"}, env={"BATON_CONFIG": str(path), "BATON_HTTP_PORT": "9100",
                                                        "BATON_ENFORCE_EAGER": "false"})
    assert s.http_port == 9100 and s.policy == "least-loaded" and s.enforce_eager is False


def test_settings_reject_typos_and_bad_values(tmp_path):
    path = tmp_path / "baton.toml"
    path.write_text("htp_port = 1\n")
    with pytest.raises(ValueError, match="htp_port"):
        load_settings(env={"BATON_CONFIG": str(path)})
    with pytest.raises(ValueError, match="http_port"):
        load_settings(env={"BATON_HTTP_PORT": "eighty"})
    with pytest.raises(ValueError, match="4 MiB"):
        load_settings({"kv_chunk_bytes": 8 << 20}, env={})
    with pytest.raises(ValueError, match="transfer_ttl_s"):
        load_settings({"transfer_ttl_s": 10}, env={})


def test_default_max_tokens_fits_the_context():
    req = build(LIMITS, "id", list(range(90)), max_tokens=None, temperature=None, top_p=None, seed=None, stop=[])
    assert req.sampling.max_tokens == 10
    assert not req.sampling.HasField("temperature")


@pytest.mark.parametrize("kwargs,param", [
    ({"stop": [""]}, "stop"), ({"seed": 2**63}, "seed"),
    ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": 51}, "max_tokens"), ({"max_tokens": 30}, "max_tokens"),
    ({"temperature": 3.0}, "temperature"), ({"top_p": 0.0}, "top_p"),
])
def test_invalid_sampling(kwargs, param):
    args = {"max_tokens": 5, "temperature": None, "top_p": None, "seed": None, "stop": []} | kwargs
    with pytest.raises(ClientError) as info:
        build(LIMITS, "id", list(range(80)), **args)
    assert info.value.param == param


def test_prompt_checks():
    args = {"max_tokens": 5, "temperature": None, "top_p": None, "seed": None, "stop": []}
    with pytest.raises(ClientError, match="empty"):
        build(LIMITS, "id", [], **args)
    with pytest.raises(ClientError, match="context length"):
        build(LIMITS, "id", list(range(100)), **args)
    with pytest.raises(ClientError, match="token ids"):
        build(LIMITS, "id", [5, 1000], **args)
    with pytest.raises(NotFoundError):
        check_model(LIMITS, "other")


def test_model_sampling_defaults_apply_only_when_the_request_gives_none():
    from dataclasses import replace

    limits = replace(LIMITS, default_temperature=0.2, default_top_p=0.9)
    args = {"max_tokens": 5, "seed": None, "stop": []}
    req = build(limits, "id", [1, 2], temperature=None, top_p=None, **args)
    assert abs(req.sampling.temperature - 0.2) < 1e-6 and abs(req.sampling.top_p - 0.9) < 1e-6
    req = build(limits, "id", [1, 2], temperature=0.0, top_p=1.0, **args)
    assert req.sampling.temperature == 0.0 and req.sampling.top_p == 1.0
