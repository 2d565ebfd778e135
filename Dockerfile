# syntax=docker/dockerfile:1
# piggyback-server for GPU nodes.
#
#   docker build -t piggyback-server --build-arg BACKBONE=resnet50 --build-arg WEIGHTS=IMAGENET1K_V2 .
#   docker run --gpus all -p 8000:8000 -v piggyback-store:/store -e PIGGYBACK_TOKEN=... piggyback-server
#
# The backbone's weights are downloaded at build time into the image (TORCH_HOME), so the container
# starts without network. WEIGHTS=random builds an image for offline smoke tests.
#
# Base: CUDA 13.0, the toolkit the pinned torch 2.14.1 wheel is built against. The "base" flavour
# carries the CUDA runtime and the NVIDIA container settings; cuBLAS/cuDNN come with the torch
# wheel itself, so the larger "runtime" flavour would ship them twice.
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-base-ubuntu24.04
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.9.7

FROM ${UV_IMAGE} AS uv

FROM ${CUDA_IMAGE} AS build
# s3,ray for the Ray Serve image of deploy/ray/rayservice.yaml
ARG EXTRAS=s3
COPY --from=uv /uv /usr/local/bin/uv
ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_LINK_MODE=copy \
    UV_COMPILE_BYTECODE=1
# Python 3.11 as a standalone build (Ubuntu 24.04 ships 3.12); the venv then lives in /opt/venv.
RUN uv python install 3.11 && uv venv --python 3.11 /opt/venv
WORKDIR /src
# Dependencies first, in their own layer: code changes do not re-download 3 GB of wheels.
COPY pyproject.toml README.md ./
RUN mkdir -p piggyback_core server \
    && touch piggyback_core/__init__.py server/__init__.py \
    && VIRTUAL_ENV=/opt/venv uv pip install --no-cache ".[${EXTRAS}]" \
    && VIRTUAL_ENV=/opt/venv uv pip uninstall piggyback-server
COPY piggyback_core ./piggyback_core
COPY server ./server
RUN VIRTUAL_ENV=/opt/venv uv pip install --no-cache --no-deps ".[${EXTRAS}]"

FROM ${CUDA_IMAGE}
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ARG BACKBONE=resnet50
ARG WEIGHTS=IMAGENET1K_V2
LABEL org.opencontainers.image.title="piggyback-server" \
      org.opencontainers.image.description="Many image classifiers from one frozen backbone (Piggyback masks)" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 piggyback \
    && useradd --system --uid 10001 --gid piggyback --home-dir /home/piggyback --create-home piggyback \
    && mkdir -p /store /opt/torch \
    && chown piggyback:piggyback /store
COPY --from=build /opt/python /opt/python
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    TORCH_HOME=/opt/torch \
    PIGGYBACK_BACKBONE=${BACKBONE} \
    PIGGYBACK_WEIGHTS=${WEIGHTS} \
    PIGGYBACK_STORE=/store \
    PIGGYBACK_HOST=0.0.0.0 \
    PIGGYBACK_PORT=8000
# Fetch the weights now (and fail the build if they cannot be loaded); print the fingerprint that
# task files must carry to be served by this image.
RUN piggyback fingerprint --backbone "${BACKBONE}" --weights "${WEIGHTS}" --json | tee /opt/torch/fingerprint.json
USER 10001:10001
WORKDIR /home/piggyback
VOLUME ["/store"]
EXPOSE 8000
# Liveness of the process; readiness (/readyz) belongs to the orchestrator's probe.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(f\"http://127.0.0.1:{os.environ.get('PIGGYBACK_PORT', '8000')}/healthz\", timeout=4)"]
ENTRYPOINT ["piggyback"]
CMD ["serve"]
