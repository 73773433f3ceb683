"""deploy/docker: the CPU serving image, built with buildah and run for real.

The image is built by ``deploy/docker/build.sh`` (the command the README documents) from the local
Debian base (``--base debootstrap``: no registry needed; the base and the layers are cached, so a
rebuild takes seconds). Then, inside the image: the numeric user is 10001, torch cannot be
imported, ``vaegan serve`` (the image's entrypoint) serves the tiny bundle mounted read-only,
reports SERVING over grpc.health.v1 and scores an image for ``OutlierClient`` in this process;
it writes nothing but its --ready-file, neither under /tmp nor anywhere else in the container;
with podman, the same runs with a read-only root filesystem. The README states the image size.

Needs root, ``buildah`` and ``debootstrap`` (Debian: apt-get install buildah debootstrap), and
network access to the Debian mirror and PyPI for the first build; skipped without buildah.
The read-only test also needs ``podman`` (and uses ``runc`` where installed). Environment:
VAEGAN_TEST_IMAGE_BASE=official builds from the Dockerfile's pinned python:3.11-slim instead.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / "deploy" / "docker" / "build.sh"
BASE = os.environ.get("VAEGAN_TEST_IMAGE_BASE", "debootstrap")
TAG = "localhost/vaegan-serve:test"
USER = 10001
# the README's sentence, and how far the measured size may be from it
README_SIZE = re.compile(r"the\s+CPU\s+serving\s+image\s+is\s+(\d+(?:\.\d+)?)\s+MB")
SIZE_TOLERANCE_MB = 5.0


def _why_skip() -> str | None:
    if shutil.which("buildah") is None:
        return "buildah is not installed (apt-get install buildah debootstrap): the image is not built"
    if os.geteuid() != 0:
        return "the image is built with buildah as root (chroot isolation); this is not root"
    if BASE == "debootstrap" and shutil.which("debootstrap") is None:
        return "debootstrap is not installed (apt-get install debootstrap): no local base image"
    return None


_SKIP = _why_skip()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(_SKIP is not None, reason=_SKIP or ""),
    pytest.mark.timeout(1800),  # the first build: debootstrap + pip, a few minutes
]


def _buildah(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(["buildah", *args], capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"buildah {' '.join(args)} -> {out.returncode}\n{out.stderr[-3000:]}")
    return out


def _size_mb(text: str) -> float:
    """``buildah images`` sizes ("317 MB", "1.2 GB", decimal units) in MB."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([kMG]?B)\s*", text)
    assert m, f"unexpected size {text!r}"
    return float(m[1]) * {"B": 1e-6, "kB": 1e-3, "MB": 1.0, "GB": 1e3}[m[2]]


@pytest.fixture(scope="module")
def image() -> dict[str, Any]:
    """Build the image with the script; its tag, size (MB), build time and OCI config."""
    t0 = time.monotonic()
    out = subprocess.run(
        [str(BUILD), "--base", BASE, "-t", TAG], cwd=REPO, capture_output=True, text=True, timeout=1700
    )
    seconds = time.monotonic() - t0
    assert out.returncode == 0, f"build.sh failed ({out.returncode}):\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith(f"image {TAG}: "), last
    size = _size_mb(_buildah("images", "--format", "{{.Size}}", TAG).stdout.strip().splitlines()[0])
    print(f"\n{last} (test: {seconds:.0f} s)")
    info = json.loads(_buildah("inspect", "--type", "image", TAG).stdout)
    return {"tag": TAG, "size_mb": size, "seconds": seconds, "config": info["OCIv1"]["config"],
            "docker_config": info["Docker"]["config"]}


@contextmanager
def _container(tag: str) -> Iterator[str]:
    """A fresh working container of the image (its own writable layer)."""
    name = _buildah("from", "--pull=never", tag).stdout.strip().splitlines()[-1]
    try:
        yield name
    finally:
        _buildah("rm", name, check=False)


def _run_in(container: str, *cmd: str, mounts: tuple[str, ...] = (), timeout: float = 120) -> subprocess.CompletedProcess[str]:
    vols = [a for m in mounts for a in ("-v", m)]
    return _buildah("run", "--isolation", "chroot", "--network", "host", *vols, container, "--", *cmd,
                    check=False, timeout=timeout)


def _readable_copy(src: Path, dst: Path) -> Path:
    """The bundle where uid 10001 can read it (pytest's temporary directories are 0700)."""
    shutil.copytree(src, dst)
    for p in [dst, *dst.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    return dst


def _scratch(path: Path) -> Path:
    """A host directory mounted as the container's /tmp (the emptyDir): writable by anyone."""
    path.mkdir()
    path.chmod(0o1777)
    return path


def _wait_ready(proc: subprocess.Popen[str], ready: Path, seconds: float = 120) -> dict[str, int]:
    deadline = time.monotonic() + seconds
    while not ready.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the server exited {proc.returncode} before it was ready:\n{proc.communicate()[1][-4000:]}")
        assert time.monotonic() < deadline, "the server in the image did not get ready"
        time.sleep(0.1)
    return json.loads(ready.read_text())


def _serving_and_score(port: int, metrics_port: int) -> None:
    """grpc.health.v1 says SERVING, and one real Score through the client library."""
    from vaegan.service.client import OutlierClient

    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        deadline = time.monotonic() + 60
        while True:
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
            except grpc.RpcError:
                status = None
            if status == health_pb2.HealthCheckResponse.SERVING:
                break
            assert time.monotonic() < deadline, f"health never SERVING (last {status})"
            time.sleep(0.2)
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    with OutlierClient(f"127.0.0.1:{port}", timeout=30) as client:
        (result,) = client.score([image], ids=["in-the-image"])
        info = client.model_info()
    assert result.id == "in-the-image" and np.isfinite(result.score) and 0.0 <= result.tail_probability <= 1.0
    assert info.providers == ["CPUExecutionProvider"]
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        assert r.status == 200 and b"vaegan_" in r.read()


def test_image_config_non_root_entrypoint_labels_no_healthcheck(image) -> None:
    cfg = image["config"]
    assert cfg["User"] == f"{USER}:{USER}"
    assert cfg["Entrypoint"] == ["vaegan", "serve"] and not cfg.get("Cmd")
    env = dict(e.split("=", 1) for e in cfg["Env"])
    assert env["HOME"] == "/tmp" and env["TMPDIR"] == "/tmp" and env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["PATH"].startswith("/opt/vaegan/bin:")
    labels = cfg.get("Labels") or {}
    for key in ("title", "version", "revision", "created", "licenses", "base.name"):
        assert labels.get(f"org.opencontainers.image.{key}"), f"label org.opencontainers.image.{key}"
    assert not image["docker_config"].get("Healthcheck"), "no HEALTHCHECK: Kubernetes probes gRPC health"
    assert {"50051/tcp", "9090/tcp"} <= set(cfg.get("ExposedPorts") or {})


def test_runs_as_10001_and_torch_is_not_installed(image) -> None:
    with _container(image["tag"]) as ctr:
        uid = _run_in(ctr, "id", "-u")
        assert uid.returncode == 0 and uid.stdout.strip() == str(USER), uid.stderr
        torch = _run_in(ctr, "python", "-c", "import torch")
        assert torch.returncode != 0 and "No module named 'torch'" in torch.stderr, torch.stderr
        assert _run_in(ctr, "python", "-c", "import onnxruntime, grpc, vaegan.service.server.app").returncode == 0
        # one import name: no generic top-level packages installed
        generic = _run_in(ctr, "python", "-c", "import service")
        assert generic.returncode != 0 and "No module named 'service'" in generic.stderr, generic.stderr


def test_serve_in_the_image_health_score_sigterm_and_no_writes(image, tiny_bundle: Path, tmp_path: Path) -> None:
    bundle = _readable_copy(tiny_bundle, tmp_path / "bundle")
    scratch = _scratch(tmp_path / "scratch")
    with _container(image["tag"]) as ctr:
        entrypoint = image["config"]["Entrypoint"]
        cmd = ["buildah", "run", "--isolation", "chroot", "--network", "host",  # host network: 127.0.0.1
               "-v", f"{bundle}:/models/bundle:ro", "-v", f"{scratch}:/tmp", ctr, "--", *entrypoint,
               "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", "--ready-file", "/tmp/ready.json"]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            ready = _wait_ready(proc, scratch / "ready.json")
            # chroot isolation shares the host's PID namespace: the pid is the host's
            status = Path(f"/proc/{ready['pid']}/status").read_text()
            uids = re.search(r"^Uid:\s+(\d+)\s+(\d+)", status, re.M)
            assert uids and uids.groups() == (str(USER), str(USER)), status
            _serving_and_score(ready["port"], ready["metrics_port"])
            os.kill(ready["pid"], signal.SIGTERM)  # what the kubelet sends: drain, exit 0
            assert proc.wait(timeout=60) == 0
            log = proc.stderr.read() if proc.stderr else ""
            assert "SERVING" in log and "stopped" in log, log
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        # nothing written but the ready file: not in /tmp (no ONNX Runtime telemetry, no .pyc,
        # no caches) ...
        assert sorted(p.name for p in scratch.iterdir()) == ["ready.json"]
        # ... and nothing in the container's own layer (buildah leaves only the empty mount-point
        # directories it made); the overlay driver keeps that layer in .../diff next to .../merged
        merged = Path(_buildah("mount", ctr).stdout.strip())
        try:
            if merged.name == "merged" and (merged.parent / "diff").is_dir():
                written = [str(p.relative_to(merged.parent / "diff")) for p in (merged.parent / "diff").rglob("*")
                           if not p.is_dir()]
                assert written == [], f"files written outside /tmp: {written}"
        finally:
            _buildah("umount", ctr, check=False)


def test_serve_with_a_read_only_root_filesystem(image, tiny_bundle: Path, tmp_path: Path) -> None:
    """`buildah run` has no read-only root; podman (same image store) does: --read-only with
    only the mounted /tmp writable, as readOnlyRootFilesystem + an emptyDir in Kubernetes."""
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed (apt-get install podman runc): no read-only root run")
    bundle = _readable_copy(tiny_bundle, tmp_path / "bundle")
    scratch = _scratch(tmp_path / "scratch")
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    nproc = min(resource.getrlimit(resource.RLIMIT_NPROC)[0], 32768)
    podman = ["podman", *(["--runtime", "runc"] if shutil.which("runc") else [])]
    cmd = [*podman, "run", "--rm", "--read-only", "--read-only-tmpfs=false", "--network", "host",
           # podman's default limits may exceed what this process may set (no CAP_SYS_RESOURCE)
           "--ulimit", f"nofile={nofile}:{nofile}", "--ulimit", f"nproc={nproc}:{nproc}",
           "-v", f"{bundle}:/models/bundle:ro", "-v", f"{scratch}:/tmp", image["tag"],
           "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", "--ready-file", "/tmp/ready.json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (scratch / "ready.json").exists():
            if proc.poll() is not None:
                err = proc.communicate()[1]
                if proc.returncode in (125, 126, 127):  # podman or the OCI runtime, not the server
                    pytest.skip(f"podman cannot start a container here: {err.strip()[-300:]}")
                raise AssertionError(f"the server exited {proc.returncode} with a read-only root:\n{err[-4000:]}")
            assert time.monotonic() < deadline, "the server did not get ready with a read-only root"
            time.sleep(0.1)
        ready = json.loads((scratch / "ready.json").read_text())
        _serving_and_score(ready["port"], ready["metrics_port"])
        proc.send_signal(signal.SIGTERM)  # podman forwards it to the server (PID 1 in its namespace)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert sorted(p.name for p in scratch.iterdir()) == ["ready.json"]


def test_readme_states_the_measured_image_size(image) -> None:
    if BASE != "debootstrap":
        pytest.skip("the README states the size of the image built from the debootstrap base")
    m = README_SIZE.search((REPO / "README.md").read_text())
    assert m, f"README.md lacks the sentence 'the CPU serving image is N MB' (measured {image['size_mb']:.0f} MB)"
    stated = float(m[1])
    assert abs(stated - image["size_mb"]) <= SIZE_TOLERANCE_MB, (
        f"README says {stated:g} MB, the image built now is {image['size_mb']:.0f} MB"
    )
