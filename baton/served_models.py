"""Which models a deployment serves, and under which names.

One model by default (``model`` named ``served_model_name``); several with
``models = "NAME=DIRECTORY,..."``. Each worker serves one of them and
registers its name; the router runs one vLLM frontend per name and sends a
request to the frontend of the model it names.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from baton.config import Settings
from baton.model_store import DEFAULT_MODEL_NAME


@dataclass(frozen=True)
class ServedModel:
    name: str  # what clients put in `model`
    model: str  # HF directory; empty: the embedded model


def worker_model(settings: Settings) -> ServedModel:
    """The one model a worker serves: ``model``, named ``served_model_name``
    or after its directory."""
    name = settings.served_model_name or (Path(settings.model).name if settings.model else DEFAULT_MODEL_NAME)
    return ServedModel(name, settings.model)


def served_models(settings: Settings) -> list[ServedModel]:
    """What the router serves, the first being the default for requests that
    name none. Raises ValueError naming the problem with ``models``."""
    if not settings.models.strip():
        return [worker_model(settings)]
    served: list[ServedModel] = []
    for item in settings.models.split(","):
        name, sep, model = (part.strip() for part in item.partition("="))
        if not sep or not name:
            raise ValueError(f"models: {item.strip()!r} is not NAME=DIRECTORY (DIRECTORY may be empty: "
                             "the embedded model)")
        if any(s.name == name for s in served):
            raise ValueError(f"models: {name!r} is named twice")
        served.append(ServedModel(name, model))
    return served
