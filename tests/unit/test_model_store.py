import json

import pytest

from baton.model_store import (
    DEFAULT_MODEL_NAME,
    _ensure_sampling_defaults,
    resolve_model,
)


def test_any_hf_directory_is_accepted(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path)) == tmp_path


def test_a_directory_without_config_is_refused_with_the_reason(tmp_path):
    with pytest.raises(RuntimeError, match="config.json"):
        resolve_model(str(tmp_path))


def test_the_default_name_means_the_embedded_model():
    path = resolve_model(DEFAULT_MODEL_NAME)
    assert (path / "config.json").exists() and (path / "model.safetensors").exists()


def test_sampling_defaults_keep_what_the_model_sets(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.7, "eos_token_id": 2}))
    _ensure_sampling_defaults(tmp_path)
    config = json.loads((tmp_path / "generation_config.json").read_text())
    assert (config["temperature"], config["top_p"], config["eos_token_id"]) == (0.7, 0.9, 2)
