# wanrender GPU worker: one CUDA 12.8 base, one target per GPU family.
#   docker build -f docker/worker.Dockerfile --target ada -t wanrender-worker:ada .
# Targets: ampere (sm80: A100), ada (sm89: RTX 4090), hopper (sm90: H100/H200),
# blackwell (sm120: RTX 5090). They differ in TORCH_CUDA_ARCH_LIST (what kernels
# compiled at run time are built for) and in extras: hopper and blackwell add the
# cuDNN frontend (attention backend cudnn-fp8). Models are read from the /models
# volume, jobs from the shared /data volume; the image holds no weights.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

FROM ${CUDA_IMAGE} AS base
ARG UID=10001
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    WANRENDER_HOME=/data/home \
    WANRENDER_HEALTH_FILE=/tmp/wanrender-worker.alive
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Ubuntu's own python3 of the base release; its point versions follow the base image.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && useradd --create-home --uid "${UID}" wanrender \
    && mkdir -p /models /data \
    && chown wanrender /models /data
WORKDIR /opt/wanrender
COPY pyproject.toml README.md ./
COPY src ./src
VOLUME ["/models", "/data"]
# The worker touches WANRENDER_HEALTH_FILE at each heartbeat it delivers to NATS (every 5 s).
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD ["/bin/bash", "-c", "test $(( $(date +%s) - $(stat -c %Y \"$WANRENDER_HEALTH_FILE\") )) -lt 60"]
ENTRYPOINT ["wanrender"]
CMD ["worker", "--nats", "nats://nats:4222", "--creds", "/fleet/worker.creds", "--data", "/data", "--models", "/models", "--device", "cuda"]

FROM base AS ampere
ARG UID=10001
ENV TORCH_CUDA_ARCH_LIST="8.0" WANRENDER_GPU_FAMILY=ampere
# Versions are pinned by pyproject.toml (the project's own constraints).
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[serve]"
USER ${UID}

FROM base AS ada
ARG UID=10001
ENV TORCH_CUDA_ARCH_LIST="8.9" WANRENDER_GPU_FAMILY=ada
# Versions are pinned by pyproject.toml (the project's own constraints).
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[serve]"
USER ${UID}

FROM base AS hopper
ARG UID=10001
ENV TORCH_CUDA_ARCH_LIST="9.0" WANRENDER_GPU_FAMILY=hopper
# Versions are pinned by pyproject.toml (the project's own constraints).
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[serve,cudnn]"
USER ${UID}

FROM base AS blackwell
ARG UID=10001
ENV TORCH_CUDA_ARCH_LIST="12.0" WANRENDER_GPU_FAMILY=blackwell
# Versions are pinned by pyproject.toml (the project's own constraints).
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[serve,cudnn]"
USER ${UID}
