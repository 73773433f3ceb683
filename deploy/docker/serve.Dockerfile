# syntax=docker/dockerfile:1
#
# vaegan CPU serving image: `vaegan serve` (gRPC + /metrics) on ONNX Runtime, no torch.
#
#   docker build -f deploy/docker/serve.Dockerfile -t vaegan-serve .          # bundle mounted at run time
#   docker run --rm --read-only --tmpfs /tmp -p 50051:50051 -p 9090:9090 \
#       -v "$PWD/runs/demo/bundle:/models/bundle:ro" vaegan-serve
#   # bundle baked into the image instead (path relative to the build context):
#   docker build -f deploy/docker/serve.Dockerfile --target baked \
#       --build-arg BUNDLE=runs/demo/bundle -t vaegan-serve:demo .
#
# deploy/docker/build.sh builds it with buildah, also from a local debootstrap base when no
# registry can be reached (--base debootstrap).
#
# Works on two kinds of base: the official python:*-slim image (python in /usr/local/bin) and a
# plain Debian root with python3 + python3-venv (python in /usr/bin): the venv is made with
# `python3 -m venv` and /opt/vaegan/bin comes first on PATH, so nothing depends on where the
# base keeps its interpreter. Builder and runtime stages MUST use the same base (the venv's
# python is a symlink to the base's interpreter).
#
# BASE_IMAGE is pinned by digest (tag kept for readers). The digest below is one that public
# Dockerfiles pin for this tag; it could not be pulled or checked where this file was written (no
# registry reachable) and an old digest misses security updates: refresh it,
#   docker buildx imagetools inspect python:3.11-slim-bookworm   (or: skopeo inspect --raw ...)
# and pass --build-arg BASE_IMAGE=python:3.11-slim-bookworm@sha256:<index digest> in CI.
ARG BASE_IMAGE=docker.io/library/python:3.11-slim-bookworm@sha256:a36c24f9cbdf4fd0f52d67f0823eeac19c2028c637cecc392d97f980d4fec56b

# ---------------------------------------------------------------------------------------------
# builder: a venv at /opt/vaegan with the runtime dependencies and the project (no extras)
# ---------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS builder
# The package index for the build only (a mirror or proxy: --build-arg PIP_INDEX_URL=...);
# build args of a stage that is not the final one never reach the image.
ARG PIP_INDEX_URL=https://pypi.org/simple
# Extras on top of the runtime, comma-separated: "" (the default: `pip install .`) or e.g.
# "batch" (pyarrow, for `vaegan score ... .parquet` jobs run from this image).
ARG EXTRAS=""
ENV LANG=C.UTF-8 \
    PATH=/opt/vaegan/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_INPUT=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN python3 -m venv /opt/vaegan
# 1) dependencies only, keyed on pyproject.toml alone: this layer (the slow one, all the
#    downloads) is reused as long as the dependencies do not change: exactly the dependencies
#    pyproject.toml declares (and those of $EXTRAS), read from it with tomllib.
#    A TLS-intercepting proxy's CA bundle, if the build needs one, comes as the build secret
#    "ca" (build.sh: --ca-file; docker build --secret id=ca,src=FILE): used by pip, never stored.
COPY pyproject.toml /src/deps/pyproject.toml
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=secret,id=ca,target=/run/secrets/ca \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
    && python3 -c 'import sys, tomllib; p = tomllib.load(open("/src/deps/pyproject.toml", "rb"))["project"]; print("\n".join(p["dependencies"] + [d for e in sys.argv[1].split(",") if e for d in p["optional-dependencies"][e]]))' "$EXTRAS" > /src/deps/requirements.txt \
    && pip install -r /src/deps/requirements.txt
# 2) the project itself, without touching the dependencies: only what pyproject.toml packages
#    (tool.setuptools: package-dir, packages), so that nothing else in the context (bundles under runs/,
#    which .dockerignore lets through for the baked target) invalidates this layer
COPY pyproject.toml README.md /src/app/
COPY vaegan /src/app/vaegan
COPY service /src/app/service
COPY protos /src/app/protos
COPY models /src/app/models
COPY trainer /src/app/trainer
COPY export /src/app/export
# (then pip and setuptools go: the runtime image installs nothing)
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=secret,id=ca,target=/run/secrets/ca \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
    && pip install --no-deps /src/app \
    && pip uninstall -y pip setuptools wheel
# fail the build, not the first request, if something is missing or torch slipped in
RUN python3 -c "import importlib.util as u, sys; import vaegan.service.server.app, vaegan.service.client; sys.exit(u.find_spec('torch') is not None)" \
    && vaegan serve --help >/dev/null

# ---------------------------------------------------------------------------------------------
# runtime: the base + the venv, non-root, nothing written outside /tmp
# ---------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS runtime
# A named entry for uid/gid 10001 (some libraries look the user up); no home, no shell.
RUN echo "vaegan:x:10001:10001:vaegan:/tmp:/usr/sbin/nologin" >> /etc/passwd \
    && echo "vaegan:x:10001:" >> /etc/group \
    && mkdir -p /models

COPY --from=builder /opt/vaegan /opt/vaegan

# Read-only root filesystem: the only writable place is /tmp (an emptyDir / tmpfs mounted there).
# HOME and every cache/temp location point into it; Python writes no .pyc (they were compiled
# at install time). ORT_DISABLE_TELEMETRY: otherwise ONNX Runtime writes a device id and an
# SQLite file under $XDG_CACHE_HOME/Microsoft/DeveloperTools/.onnxruntime/ and $TMPDIR/.ses at
# every session start (measured: with it, a serving run writes nothing at all). `vaegan serve`
# itself writes nothing but the optional --ready-file.
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
    VAEGAN_MODEL=/models/bundle \
    VAEGAN_HOST=0.0.0.0 \
    VAEGAN_PORT=50051 \
    VAEGAN_METRICS_PORT=9090 \
    VAEGAN_PROVIDERS=cpu

# Numeric user (runAsNonRoot can check it without /etc/passwd).
USER 10001:10001
WORKDIR /tmp
EXPOSE 50051 9090
# No HEALTHCHECK on purpose: Kubernetes probes the gRPC health service (grpc.health.v1,
# NOT_SERVING until the bundle is verified and warmed up) with its native gRPC probes; a Docker
# HEALTHCHECK would need a client binary in the image and is ignored by Kubernetes anyway.
ENTRYPOINT ["vaegan", "serve"]

# Labels last: the build date and revision change every build, the layers above do not.
ARG BASE_IMAGE
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
ARG SOURCE=""
LABEL org.opencontainers.image.title="vaegan-serve" \
      org.opencontainers.image.description="VAE-GAN image anomaly detection: gRPC service on ONNX Runtime (CPU)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"

# ---------------------------------------------------------------------------------------------
# baked: the same image with a bundle inside (--target baked --build-arg BUNDLE=path/in/context)
# ---------------------------------------------------------------------------------------------
FROM runtime AS baked
ARG BUNDLE=BUNDLE-build-arg-not-set
COPY --chown=0:0 ${BUNDLE} /models/bundle

# the default target: the image without a bundle (mount one at /models/bundle, or --model).
# (One instruction: buildah 1.28 leaves a working container behind for an empty stage.)
FROM runtime AS serve
LABEL org.opencontainers.image.ref.name="vaegan-serve"
