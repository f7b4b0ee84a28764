from __future__ import annotations

import pytest

from baton.config import Settings
from baton.model_store import DEFAULT_MODEL_NAME
from baton.served_models import ServedModel, served_models, worker_model


def test_one_model_by_default_named_after_its_directory_or_as_told():
    assert served_models(Settings()) == [ServedModel(DEFAULT_MODEL_NAME, "")]
    assert served_models(Settings(model="/m/llama-3")) == [ServedModel("llama-3", "/m/llama-3")]
    assert worker_model(Settings(model="/m/llama-3", served_model_name="llama")) == ServedModel("llama", "/m/llama-3")


def test_several_models_in_order_the_first_being_the_default():
    settings = Settings(models=f"{DEFAULT_MODEL_NAME}=, llama = /m/llama-3")
    assert served_models(settings) == [ServedModel(DEFAULT_MODEL_NAME, ""), ServedModel("llama", "/m/llama-3")]


@pytest.mark.parametrize("models, problem", [("llama", "NAME=DIRECTORY"), ("=/m/x", "NAME=DIRECTORY"),
                                             ("a=,a=/m/x", "named twice")])
def test_a_malformed_models_setting_is_refused_naming_the_problem(models, problem):
    with pytest.raises(ValueError, match=problem):
        served_models(Settings(models=models))
