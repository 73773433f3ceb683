# syntax=docker/dockerfile:1
#
# vaegan training image: torch + torchvision (the `train` extra), `vaegan train/export/calibrate/
# evaluate/demo`, and torchrun (installed with torch) for multi-process launches.
#
#   docker build -f deploy/docker/train.Dockerfile -t vaegan-train .                 # torch from PyPI (CUDA 13 wheels)
#   docker build -f deploy/docker/train.Dockerfile -t vaegan-train:cpu \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .           # CPU-only torch, much smaller
#   docker run --rm --gpus all --shm-size 2g -v "$PWD/runs:/runs" -v /data:/data:ro vaegan-train \
#       train --dataset mnist --data-root /data/mnist --normal-class 0 --out /runs/mnist0
#   docker run --rm --entrypoint torchrun vaegan-train --nproc-per-node 2 ...
#
# PyPI's torch wheels bring NVIDIA's CUDA libraries, so a plain Python base trains on GPUs too
# (the driver comes from the host); TORCH_INDEX_URL picks another wheel index (CPU, other CUDA).
# DataLoader workers share memory through /dev/shm: give the container enough (--shm-size, or an
# emptyDir with medium: Memory at /dev/shm in Kubernetes).
#
# Same base as serve.Dockerfile (pinned by digest; refresh it, see there); works with the local
# Debian base of build.sh too (--image train --base debootstrap).
ARG BASE_IMAGE=docker.io/library/python:3.11-slim-bookworm@sha256:a36c24f9cbdf4fd0f52d67f0823eeac19c2028c637cecc392d97f980d4fec56b

FROM ${BASE_IMAGE} AS builder
ARG PIP_INDEX_URL=https://pypi.org/simple
ARG TORCH_INDEX_URL=""
ENV LANG=C.UTF-8 \
    PATH=/opt/vaegan/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_INPUT=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN python3 -m venv /opt/vaegan
# dependencies first, cached while pyproject.toml is unchanged (see serve.Dockerfile)
COPY pyproject.toml /src/deps/pyproject.toml
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=secret,id=ca,target=/run/secrets/ca \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
    && if [ -n "$TORCH_INDEX_URL" ]; then export PIP_EXTRA_INDEX_URL="$TORCH_INDEX_URL"; fi \
    && python3 -c 'import sys, tomllib; p = tomllib.load(open("/src/deps/pyproject.toml", "rb"))["project"]; print("\n".join(p["dependencies"] + [d for e in sys.argv[1].split(",") if e for d in p["optional-dependencies"][e]]))' "train" > /src/deps/requirements.txt \
    && pip install -r /src/deps/requirements.txt
COPY pyproject.toml README.md /src/app/
COPY vaegan /src/app/vaegan
COPY service /src/app/service
COPY protos /src/app/protos
COPY models /src/app/models
COPY trainer /src/app/trainer
COPY export /src/app/export
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=secret,id=ca,target=/run/secrets/ca \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
    && pip install --no-deps /src/app \
    && pip uninstall -y pip setuptools wheel
RUN python3 -c "import torch, torchvision, onnx, vaegan.trainer.pipeline, vaegan.export" \
    && command -v torchrun >/dev/null \
    && vaegan train --help >/dev/null

FROM ${BASE_IMAGE} AS runtime
RUN echo "vaegan:x:10001:10001:vaegan:/tmp:/usr/sbin/nologin" >> /etc/passwd \
    && echo "vaegan:x:10001:" >> /etc/group \
    && mkdir -p /runs /data
COPY --from=builder /opt/vaegan /opt/vaegan
# Training writes its run directory (--out, e.g. a volume at /runs); everything else (HOME,
# caches, matplotlib and torch homes) goes to /tmp, so the root filesystem can stay read-only.
ENV LANG=C.UTF-8 \
    PATH=/opt/vaegan/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    VIRTUAL_ENV=/opt/vaegan \
    HOME=/tmp \
    TMPDIR=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    XDG_CONFIG_HOME=/tmp/.config \
    MPLCONFIGDIR=/tmp/matplotlib \
    TORCH_HOME=/tmp/torch \
    CUDA_CACHE_PATH=/tmp/.nv/ComputeCache \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONFAULTHANDLER=1 \
    ORT_DISABLE_TELEMETRY=1
USER 10001:10001
WORKDIR /tmp
ENTRYPOINT ["vaegan"]
CMD ["--help"]

ARG BASE_IMAGE
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
ARG SOURCE=""
LABEL org.opencontainers.image.title="vaegan-train" \
      org.opencontainers.image.description="VAE-GAN image anomaly detection: training, export and calibration (torch)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"
