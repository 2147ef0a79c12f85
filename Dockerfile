# syntax=docker/dockerfile:1
# DenseNet-121 predictor image: one image per variant, every layer shared but the last.
#
#   docker build --build-arg VARIANT=<slug> -t localhost:5001/<slug>:dev .   (deploy-knative.sh does this)
#   docker build --target benchmark -t densenet121-benchmark:local .        (compose.yaml does this)
#
# Stages: uv (the uv binary) -> builder (locked deps with the `serve` extra, then the project)
# -> benchmark-builder / benchmark (adds the `optimize` extra, for the offline benchmark)
# -> artifact (checks and stages artifacts/<VARIANT>) -> runtime (the default, last target).
# Torch comes from PyPI's default Linux x86_64 wheels, which bundle CUDA; the host driver is
# injected at run time by the NVIDIA Container Toolkit, so no CUDA base image is needed.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.10.2

FROM ${UV_IMAGE} AS uv

# ---- builder: the virtual environment, from uv.lock only (fails if the lock is stale) ----------
FROM ${PYTHON_IMAGE} AS builder
COPY --from=uv /uv /uvx /bin/
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=0 \
    UV_PROJECT_ENVIRONMENT=/app/.venv
WORKDIR /app
# Dependencies first: this layer is rebuilt only when pyproject.toml or uv.lock change.
RUN --mount=type=cache,target=/root/.cache/uv \
    --mount=type=bind,source=uv.lock,target=uv.lock \
    --mount=type=bind,source=pyproject.toml,target=pyproject.toml \
    uv sync --frozen --no-install-project --no-dev --extra serve
# Then the project itself (README.md only if pyproject.toml names it as the readme).
COPY pyproject.toml uv.lock README.m[d] ./
COPY optimize/ optimize/
COPY model_server/ model_server/
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-editable --extra serve
# The fused crop's kernel (--crop_kernel, default auto), compiled for the usual GPUs (no GPU needed; about
# 3 s each): the server launches it through the CUDA driver, without Triton's JIT or a C compiler (the
# slim image has none). A GPU not listed gets one compiled at its first start.
RUN TRITON_CACHE_DIR=/tmp/triton /app/.venv/bin/python -m model_server.crop_kernel \
      --arch 80 --arch 86 --arch 89 --arch 90 --arch 100 --arch 120 --out /app/crop-kernels \
 && rm -rf /tmp/triton

# ---- benchmark: the offline benchmark (python -m optimize), for compose.yaml -------------------
FROM builder AS benchmark-builder
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-editable --extra serve --extra optimize

FROM ${PYTHON_IMAGE} AS benchmark
RUN groupadd --system --gid 10001 densenet \
 && useradd --system --uid 10001 --gid 10001 --home-dir /tmp/home --no-create-home \
      --shell /usr/sbin/nologin densenet
COPY --from=benchmark-builder /app /app
WORKDIR /app
ENV PATH=/app/.venv/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp/home \
    XDG_CACHE_HOME=/tmp/cache \
    MPLCONFIGDIR=/tmp/cache/matplotlib \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001:10001
ENTRYPOINT ["python", "-m", "optimize"]
CMD ["--help"]

# ---- artifact: stage artifacts/<VARIANT>, refusing to build without one -----------------------
FROM ${PYTHON_IMAGE} AS artifact
ARG VARIANT
COPY artifacts/ /artifacts/
RUN test -n "${VARIANT}" \
      || { echo "build with --build-arg VARIANT=<slug> (see: python -m optimize list)" >&2; exit 1; } \
 && test -f "/artifacts/${VARIANT}/variant.json" \
      || { echo "artifacts/${VARIANT}/variant.json missing: python -m optimize build --variant ${VARIANT} --output-dir artifacts" >&2; exit 1; } \
 && mkdir -p /models \
 && cp -a "/artifacts/${VARIANT}" "/models/${VARIANT}"

# ---- runtime: the predictor (default target) ---------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 densenet \
 && useradd --system --uid 10001 --gid 10001 --home-dir /tmp/home --no-create-home \
      --shell /usr/sbin/nologin densenet
# Owned by root and not writable by the server: with a read-only root filesystem in the cluster,
# the only writable place is the /tmp volume, which every cache below points at.
COPY --from=builder /app /app
WORKDIR /app
ENV PATH=/app/.venv/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp/home \
    XDG_CACHE_HOME=/tmp/cache \
    TORCH_HOME=/tmp/cache/torch \
    TORCHINDUCTOR_CACHE_DIR=/tmp/cache/torchinductor \
    TRITON_CACHE_DIR=/tmp/cache/triton \
    CUDA_CACHE_PATH=/tmp/cache/nv \
    MPLCONFIGDIR=/tmp/cache/matplotlib \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    DENSENET_CROP_KERNEL_DIR=/app/crop-kernels \
    DENSENET_MODEL_NAME=densenet121 \
    DENSENET_HTTP_PORT=8080 \
    DENSENET_GRPC_PORT=8081
USER 10001:10001
EXPOSE 8080 8081
# Ready only after load and warm-up; a GPU cold start gets five minutes. urllib: no curl in slim.
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('DENSENET_HTTP_PORT', '8080') + '/v2/health/ready', timeout=4)"]
ENTRYPOINT ["python", "-m", "model_server"]
# The variant goes last, so all variants share every layer above and a registry stores them once.
ARG VARIANT
LABEL org.opencontainers.image.title="densenet121-predictor" \
      org.opencontainers.image.source="https://github.com/densenet-knative/densenet-knative" \
      io.densenet.variant="${VARIANT}"
ENV DENSENET_MODEL_DIR=/models/${VARIANT}
COPY --from=artifact /models/ /models/
