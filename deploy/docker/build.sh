#!/usr/bin/env bash
# Build a vaegan container image with buildah (no Docker daemon needed), print its size.
#
#   deploy/docker/build.sh                                  # CPU serving image, official python slim base
#   deploy/docker/build.sh --base debootstrap               # ... from a local Debian base (no registry needed)
#   deploy/docker/build.sh --bundle runs/demo/bundle -t vaegan-serve:demo   # bundle baked in /models/bundle
#   deploy/docker/build.sh --image train -t vaegan-train                    # torch training image
#   deploy/docker/build.sh --image serve-gpu -t vaegan-serve-gpu            # CUDA base (must be pullable)
#
# --base official     BASE_IMAGE is the Dockerfile's default (pinned by digest), or --base-image REF.
# --base debootstrap  no registry: debootstrap --variant=minbase a Debian root (this machine's Debian
#                     release, else bookworm) with python3 + python3-venv + ca-certificates, tar it,
#                     import it as localhost/vaegan-base:<suite>-<hash> and build FROM it. The tarball
#                     and the image are cached (cache dir below): only the first build pays for it.
#
# Layers are cached (--layers): a rebuild after a source change reinstalls only the project, not
# its dependencies. Isolation is chroot (works inside containers and VMs without user namespaces);
# RUN steps share the host network, so pip reaches PyPI as the host does.
#
# Needs root (or a rootless buildah setup) and: buildah; for --base debootstrap also debootstrap
# (Debian/Ubuntu: apt-get install buildah debootstrap).
#
# --image serve|serve-gpu|train   which deploy/docker/<image>.Dockerfile (default serve)
# -t, --tag TAG       default vaegan-<image>:latest
# --bundle DIR        bake a bundle (inside the repository, e.g. runs/NAME/bundle): --target baked
# --target STAGE      a Dockerfile stage (serve images: serve, the default, or baked)
# --no-layers         do not reuse cached layers
# --ca-file FILE      CA bundle that pip inside the build must trust (a TLS-intercepting proxy),
#                     passed as the build secret "ca" (no layer keeps it). Default: $PIP_CERT,
#                     else $SSL_CERT_FILE, else $REQUESTS_CA_BUNDLE when set; --ca-file "" = none.
# --build-arg K=V     passed through (e.g. EXTRAS=batch, PIP_INDEX_URL=https://mirror/simple,
#                     TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu for --image train).
#
# Environment: VAEGAN_BUILD_CACHE (default ${XDG_CACHE_HOME:-~/.cache}/vaegan-build),
# DEBIAN_MIRROR (default http://deb.debian.org/debian), DEBIAN_SUITE (default: this machine's).
# Last line of output on success: "image TAG: SIZE (N bytes), built in S s".
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
BASE=official
IMAGE=serve
TAG=""
BASE_IMAGE=""
BUNDLE=""
TARGET=""
LAYERS=1
EXTRA_ARGS=()
# a CA bundle for pip inside the build (TLS-intercepting proxy): passed as the build secret "ca"
CA_FILE="${PIP_CERT:-${SSL_CERT_FILE:-${REQUESTS_CA_BUNDLE:-}}}"

usage() { sed -n '2,36p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --base) BASE="$2"; shift 2 ;;
    --base-image) BASE_IMAGE="$2"; shift 2 ;;
    --image) IMAGE="$2"; shift 2 ;;
    -t|--tag) TAG="$2"; shift 2 ;;
    --bundle) BUNDLE="$2"; shift 2 ;;
    --target) TARGET="$2"; shift 2 ;;
    --no-layers) LAYERS=0; shift ;;
    --ca-file) CA_FILE="$2"; shift 2 ;;
    --build-arg) EXTRA_ARGS+=(--build-arg "$2"); shift 2 ;;
    -h|--help) usage 0 ;;
    *) echo "build.sh: unknown argument $1" >&2; usage 2 ;;
  esac
done

case "$IMAGE" in serve|serve-gpu|train) ;; *) echo "build.sh: --image serve|serve-gpu|train" >&2; exit 2 ;; esac
case "$BASE" in official|debootstrap) ;; *) echo "build.sh: --base official|debootstrap" >&2; exit 2 ;; esac
DOCKERFILE="$REPO/deploy/docker/$IMAGE.Dockerfile"
TAG="${TAG:-vaegan-$IMAGE:latest}"
command -v buildah >/dev/null || { echo "build.sh: buildah not found (apt-get install buildah)" >&2; exit 3; }

CACHE="${VAEGAN_BUILD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vaegan-build}"
mkdir -p "$CACHE"

log() { echo "build.sh: $*" >&2; }

# ---- local Debian base -------------------------------------------------------------------------
debootstrap_base() {
  local suite mirror pkgs key tarball ref tmp ctr mnt
  suite="${DEBIAN_SUITE:-}"
  if [[ -z "$suite" && -r /etc/os-release ]]; then
    # shellcheck disable=SC1091
    suite="$(. /etc/os-release; [[ "${ID:-}" == debian ]] && echo "${VERSION_CODENAME:-}")" || true
  fi
  suite="${suite:-bookworm}"
  mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
  pkgs="python3,python3-venv,ca-certificates"
  key="$(printf '%s\n' "$suite" "$pkgs" "v1" | sha256sum | cut -c1-12)"
  tarball="$CACHE/debian-$suite-python3-$key.tar"
  ref="localhost/vaegan-base:$suite-$key"
  if buildah inspect --type image "$ref" >/dev/null 2>&1; then
    log "base $ref (cached image)"
    echo "$ref"; return
  fi
  if [[ ! -s "$tarball" ]]; then
    command -v debootstrap >/dev/null || { log "debootstrap not found (apt-get install debootstrap)"; exit 3; }
    tmp="$(mktemp -d "$CACHE/rootfs.XXXXXX")"
    log "debootstrap --variant=minbase $suite ($pkgs) from $mirror"
    debootstrap --variant=minbase --include="$pkgs" "$suite" "$tmp" "$mirror" >"$CACHE/debootstrap.log" 2>&1 \
      || { tail -20 "$CACHE/debootstrap.log" >&2; rm -rf "$tmp"; exit 4; }
    # what a base image does not need: package lists, caches, docs, manuals, translations
    rm -rf "$tmp"/var/lib/apt/lists/* "$tmp"/var/cache/apt/* "$tmp"/var/cache/debconf/*-old \
           "$tmp"/usr/share/doc/* "$tmp"/usr/share/man/* "$tmp"/usr/share/info/* \
           "$tmp"/usr/share/locale/* "$tmp"/var/log/* "$tmp"/tmp/* "$tmp"/root/.cache
    printf 'deb %s %s main\n' "$mirror" "$suite" >"$tmp/etc/apt/sources.list"
    tar --numeric-owner --xattrs -C "$tmp" -cf "$tarball.part" .
    mv "$tarball.part" "$tarball"
    rm -rf "$tmp"
  else
    log "base rootfs $tarball (cached tarball)"
  fi
  log "importing $tarball as $ref"
  ctr="$(buildah from scratch)"
  mnt="$(buildah mount "$ctr")"
  tar --numeric-owner --xattrs -xpf "$tarball" -C "$mnt"
  buildah umount "$ctr" >/dev/null
  buildah config \
    --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --env LANG=C.UTF-8 \
    --cmd /bin/bash --os linux --arch "$(buildah info --format '{{.host.arch}}' 2>/dev/null || echo amd64)" \
    --label "org.opencontainers.image.description=debootstrap $suite minbase + $pkgs (vaegan build.sh)" \
    "$ctr"
  buildah commit --quiet --rm "$ctr" "$ref" >/dev/null
  echo "$ref"
}

# ---- build -------------------------------------------------------------------------------------
T0=$(date +%s)
if [[ "$BASE" == debootstrap ]]; then
  [[ "$IMAGE" == serve-gpu ]] && { log "serve-gpu needs a CUDA base image: use --base official / --base-image"; exit 2; }
  BASE_IMAGE="$(debootstrap_base)"
fi
T1=$(date +%s)

ARGS=(bud --isolation chroot --network host -f "$DOCKERFILE" -t "$TAG")
[[ "$LAYERS" == 1 ]] && ARGS+=(--layers)
[[ -n "$BASE_IMAGE" ]] && ARGS+=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
if [[ -n "$BUNDLE" ]]; then
  # the bundle is COPYed from the build context (the repository): it must be inside it, and not
  # excluded by .dockerignore (runs/**/bundle is allowed)
  abs="$(cd "$BUNDLE" && pwd)" || { log "no bundle directory $BUNDLE"; exit 2; }
  [[ "$abs" == "$REPO"/* ]] || { log "--bundle must be inside $REPO (copy it under runs/NAME/bundle)"; exit 2; }
  [[ -f "$abs/manifest.json" ]] || { log "$BUNDLE has no manifest.json: not a bundle"; exit 2; }
  ARGS+=(--build-arg "BUNDLE=${abs#"$REPO"/}")
  TARGET="${TARGET:-baked}"
fi
[[ -n "$TARGET" ]] && ARGS+=(--target "$TARGET")
VERSION="$(sed -n 's/^version *= *"\(.*\)"/\1/p' "$REPO/pyproject.toml" | head -1)"
REVISION="$(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown)"
# the commit time, not the build time: a rebuild of the same commit reuses every cached layer
CREATED="$(git -C "$REPO" log -1 --format=%cI 2>/dev/null || date -u +%Y-%m-%dT%H:%M:%SZ)"
ARGS+=(--build-arg "VERSION=$VERSION" --build-arg "REVISION=$REVISION" --build-arg "CREATED=$CREATED")
SOURCE="$(git -C "$REPO" remote get-url origin 2>/dev/null || true)"
[[ -n "$SOURCE" ]] && ARGS+=(--build-arg "SOURCE=$SOURCE")
# the secret is mounted for the pip steps only: it is in no layer and in no cache key
[[ -n "$CA_FILE" && -s "$CA_FILE" ]] && ARGS+=(--secret "id=ca,src=$CA_FILE")
ARGS+=("${EXTRA_ARGS[@]}")

log "buildah ${ARGS[*]} $REPO"
buildah "${ARGS[@]}" "$REPO"
T2=$(date +%s)

BYTES="?"
command -v podman >/dev/null && BYTES="$(podman image inspect --format '{{.Size}}' "$TAG" 2>/dev/null || echo "?")"
SIZE="$(buildah images --format '{{.Size}}' "$TAG" | head -1)"
log "base $((T1 - T0)) s, build $((T2 - T1)) s"
echo "image $TAG: $SIZE ($BYTES bytes), built in $((T2 - T0)) s"
