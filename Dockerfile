# syntax=docker/dockerfile:1.7
# Two images from one source tree, pinned by constraints.txt (the project's one list of pins):
#   docker build --target operator -t finetune-operator:0.1.0 .
#   docker build --target trainer  -t finetune-trainer:0.1.0 .

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-devel-ubuntu22.04

# --- the operator: slim Python, the operator extra only (no torch), non-root -----------------------
FROM ${PYTHON_IMAGE} AS operator
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY operator ./operator
COPY trainer ./trainer
RUN pip install --constraint constraints.txt ".[operator]" \
    && rm -rf /src
RUN useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin finetune
USER 10001:10001
WORKDIR /tmp
EXPOSE 8080 9090
ENTRYPOINT ["finetune-operator"]

# --- the trainer: CUDA, PyTorch, the trainer extra, DeepSpeed's prebuildable ops, non-root --------
FROM ${CUDA_IMAGE} AS trainer
ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
    && apt-get install --yes --no-install-recommends python3.11 python3.11-dev python3.11-venv ninja-build \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY operator ./operator
COPY trainer ./trainer
# torch first (its CUDA build from PyPI, pinned by constraints.txt), then DeepSpeed's fused Adam,
# CPU Adam (ZeRO-Offload) and utility ops compiled for Ampere and Hopper, so that no pod compiles them.
RUN pip install --constraint constraints.txt torch \
    && DS_BUILD_FUSED_ADAM=1 DS_BUILD_CPU_ADAM=1 DS_BUILD_UTILS=1 TORCH_CUDA_ARCH_LIST="8.0;8.6;9.0" \
       pip install --constraint constraints.txt --no-build-isolation ".[trainer]" \
    && rm -rf /src
# Worker pods run as 1000 (manifests.py) with a read-only root; everything written goes to /workspace.
RUN groupadd --gid 1000 finetune && useradd --uid 1000 --gid 1000 --no-create-home --shell /usr/sbin/nologin finetune \
    && mkdir -p /workspace && chown 1000:1000 /workspace
ENV HOME=/workspace/home HF_HOME=/workspace/hf TMPDIR=/workspace/tmp
USER 1000:1000
WORKDIR /workspace
ENTRYPOINT ["python", "-m", "finetune_trainer.launch"]
