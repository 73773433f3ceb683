# syntax=docker/dockerfile:1
#
# vaegan GPU serving image: `vaegan serve` on ONNX Runtime with CUDA (onnxruntime-gpu, the `gpu`
# extra). Same layout and rules as serve.Dockerfile (venv in /opt/vaegan, non-root 10001, every
# write under /tmp, no HEALTHCHECK), on an NVIDIA CUDA base.
#
#   docker build -f deploy/docker/serve-gpu.Dockerfile -t vaegan-serve-gpu .
#   docker run --rm --gpus all --read-only --tmpfs /tmp -p 50051:50051 -p 9090:9090 \
#       -v "$PWD/runs/demo/bundle:/models/bundle:ro" vaegan-serve-gpu
#
# CUDA and cuDNN come from NVIDIA's wheels (onnxruntime-gpu[cuda,cudnn], loaded with
# onnxruntime.preload_dlls()), so the base needs no CUDA libraries of its own: the small `base`
# flavour (cudart + the NVIDIA container runtime's env) is enough, and the driver comes from
# the host (NVIDIA container toolkit / GPU operator). onnxruntime-gpu 1.31 is built for CUDA 13:
# the host driver must support CUDA 13 (>= 580). A `*-cudnn-runtime-*` base works too (bigger,
# and its cuDNN is not the one loaded).
# --providers auto (the default here) uses CUDA when the driver loads, else the CPU;
# --providers cuda fails with one line if CUDA cannot start; --providers tensorrt also needs the
# TensorRT libraries: --build-arg EXTRA_PIP="tensorrt-cu13-libs" (not verified here).
#
# Pin BASE_IMAGE by digest in CI (docker buildx imagetools inspect nvidia/cuda:<tag>); no digest
# could be looked up where this file was written, so the default is a tag.
ARG BASE_IMAGE=docker.io/nvidia/cuda:13.0.2-base-ubuntu24.04

FROM ${BASE_IMAGE} AS builder
ARG PIP_INDEX_URL=https://pypi.org/simple
ARG EXTRA_PIP=""
ENV LANG=C.UTF-8 \
    DEBIAN_FRONTEND=noninteractive \
    PATH=/opt/vaegan/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_INPUT=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/vaegan \
    && ln -s "$(/opt/vaegan/bin/python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" /opt/vaegan/site-packages
# Dependencies first (cached while pyproject.toml is unchanged). onnxruntime and onnxruntime-gpu
# install the same module and pip does not remove one for the other: install the extra, drop
# both builds, reinstall the GPU one alone (the README's GPU install, in one layer).
COPY pyproject.toml /src/deps/pyproject.toml
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=secret,id=ca,target=/run/secrets/ca \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
    && python3 -c 'import sys, tomllib; p = tomllib.load(open("/src/deps/pyproject.toml", "rb"))["project"]; print("\n".join(p["dependencies"] + [d for e in sys.argv[1].split(",") if e for d in p["optional-dependencies"][e]]))' "gpu" > /src/deps/requirements.txt \
    && pip install -r /src/deps/requirements.txt \
    && GPU_REQS="$(python3 -c 'import tomllib; print(" ".join(tomllib.load(open("/src/deps/pyproject.toml", "rb"))["project"]["optional-dependencies"]["gpu"]))')" \
    && pip uninstall -y onnxruntime onnxruntime-gpu \
    && pip install $GPU_REQS $EXTRA_PIP
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
# the GPU build is the one installed (no GPU needed to check that), and torch is not
RUN python3 -c "import importlib.util as u, sys, onnxruntime as ort; import vaegan.service.server.app; \
sys.exit(u.find_spec('torch') is not None or 'CUDAExecutionProvider' not in ort.get_available_providers())" \
    && vaegan serve --help >/dev/null

FROM ${BASE_IMAGE} AS runtime
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/* /var/log/* \
    && echo "vaegan:x:10001:10001:vaegan:/tmp:/usr/sbin/nologin" >> /etc/passwd \
    && echo "vaegan:x:10001:" >> /etc/group \
    && mkdir -p /models
COPY --from=builder /opt/vaegan /opt/vaegan
# Every write under /tmp (read-only root). CUDA_CACHE_PATH: CUDA's JIT cache (PTX compiled for a
# newer GPU) goes there instead of ~/.nv. LD_LIBRARY_PATH: the TensorRT libraries, if EXTRA_PIP
# installed them (a missing directory is harmless).
ENV LANG=C.UTF-8 \
    PATH=/opt/vaegan/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    VIRTUAL_ENV=/opt/vaegan \
    HOME=/tmp \
    TMPDIR=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    XDG_CONFIG_HOME=/tmp/.config \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONFAULTHANDLER=1 \
    ORT_DISABLE_TELEMETRY=1 \
    CUDA_CACHE_PATH=/tmp/.nv/ComputeCache \
    LD_LIBRARY_PATH=/opt/vaegan/site-packages/tensorrt_libs \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    VAEGAN_MODEL=/models/bundle \
    VAEGAN_HOST=0.0.0.0 \
    VAEGAN_PORT=50051 \
    VAEGAN_METRICS_PORT=9090 \
    VAEGAN_PROVIDERS=auto
USER 10001:10001
WORKDIR /tmp
EXPOSE 50051 9090
# No HEALTHCHECK: Kubernetes probes grpc.health.v1 (see serve.Dockerfile).
ENTRYPOINT ["vaegan", "serve"]

ARG BASE_IMAGE
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
ARG SOURCE=""
LABEL org.opencontainers.image.title="vaegan-serve-gpu" \
      org.opencontainers.image.description="VAE-GAN image anomaly detection: gRPC service on ONNX Runtime (CUDA)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"

FROM runtime AS baked
ARG BUNDLE=BUNDLE-build-arg-not-set
COPY --chown=0:0 ${BUNDLE} /models/bundle

# the default target (one instruction: buildah 1.28 leaves a container behind for an empty stage)
FROM runtime AS serve
LABEL org.opencontainers.image.ref.name="vaegan-serve-gpu"
