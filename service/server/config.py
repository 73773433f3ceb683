"""Server configuration: one frozen dataclass, and its CLI flags with ``VAEGAN_*`` env defaults.

Every flag ``--some-flag`` takes its default from the environment variable
``VAEGAN_SOME_FLAG`` when set (12-factor: the same image runs in Kubernetes with a ConfigMap),
else from the :class:`ServiceConfig` default. The environment is read when the parser is built,
never at import time.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

__all__ = ["MIB", "ServiceConfig", "add_serve_arguments", "config_from_args", "env_name"]

MIB = 1 << 20


@dataclass(frozen=True)
class ServiceConfig:
    """Everything ``vaegan serve`` needs to know; built once in the entry point."""

    model: Path | None = None  # bundle directory, or one model's folder of versions (the highest is served)
    host: str = "[::]"  # gRPC bind address
    port: int = 50051  # gRPC port; 0 = ephemeral (the bound port is reported)
    # Prometheus /metrics bind address: loopback unless asked (a pod sets 0.0.0.0 for its scraper)
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9090  # 0 = ephemeral, < 0 = no metrics endpoint
    http_port: int = -1  # Open Inference Protocol over HTTP/REST on --host; 0 = ephemeral, -1 = off
    providers: str = "auto"  # ONNX Runtime providers: auto | cpu | cuda | tensorrt
    intra_op_threads: int = 0  # threads per ONNX Runtime run; 0 = all cores but one (min 1)
    ort_spin: bool = False  # idle ONNX Runtime threads busy-wait: lower latency on dedicated cores
    fuse_graphs: bool = True  # score with E -> G -> D composed into one graph (one run per batch)
    switch_interval_ms: float = 0.2  # the process's GIL switch interval; 0 = Python's own (5 ms)
    max_batch_size: int = 64  # images per merged model run
    max_delay_ms: float = 2.0  # longest wait for more images before a partial batch runs
    model_instances: int = 1  # merged batches that may run at once (executor threads for ORT)
    decode_workers: int = 0  # threads for decoding and inpainting; 0 = cores (2..8)
    respond_workers: int = 0  # threads for re-scoring and response pictures (PNG); 0 = half the decode threads
    max_message_bytes: int = 64 * MIB  # gRPC receive and send limit
    max_concurrent_rpcs: int = 256  # 0 = unlimited; above it new RPCs get RESOURCE_EXHAUSTED
    max_images_per_request: int = 1024  # RESOURCE_EXHAUSTED above it
    max_image_pixels: int = 4096 * 4096  # height * width per image; RESOURCE_EXHAUSTED above
    # height * width of all images (and masks) of one request, from their headers before decoding:
    # bounds a request's decoded originals (64 Mpx of RGB: 192 MiB)
    max_request_pixels: int = 64 << 20
    # height * width decoded by all calls in progress together; a request that does not fit waits
    # for earlier calls to finish: bounds the server's decoded originals (128 Mpx of RGB: 384 MiB)
    max_inflight_pixels: int = 128 << 20
    stream_window: int = 4  # ScoreStream requests processed concurrently per stream
    grace_seconds: float = 10.0  # on SIGTERM: time for in-flight requests to finish
    log_level: str = "INFO"
    log_format: str = "text"  # text | json
    # Pillow format names accepted in encoded images, comma-separated; "all": every format Pillow has
    image_formats: str = "png,jpeg,bmp,tiff,webp"
    ready_file: Path | None = None  # once SERVING, write {"port": .., "metrics_port": ..} here
    tls_cert_file: Path | None = None  # PEM certificate chain: serve TLS (with tls_key_file)
    tls_key_file: Path | None = None  # PEM private key
    tls_client_ca_file: Path | None = None  # PEM CA: mutual TLS, every client must present a cert it signed
    auth_tokens_file: Path | None = None  # SHA-256 digests of accepted bearer tokens (service.server.auth)
    allow_overrides: bool = True  # requests may set their own weights and threshold
    # a model repository DIR/<name>/<version>/ (Triton's layout): several models and versions
    model_repository: Path | None = None
    model_control_mode: str = "none"  # none (load at start) | poll (rescan) | explicit (load/unload calls)
    repository_poll_secs: float = 15.0
    version_policy: str = "latest:1"  # latest[:N] | all | specific:V1,V2
    load_models: str = ""  # explicit mode: models to load at start, comma-separated
    metrics_tls_cert_file: Path | None = None  # PEM chain: serve /metrics over HTTPS (with the key)
    metrics_tls_key_file: Path | None = None
    metrics_tls_client_ca_file: Path | None = None  # PEM CA: scrapers must present a cert it signed
    metrics_basic_auth_file: Path | None = None  # "user:sha256-hex-of-password" lines: /metrics needs them

    def __post_init__(self) -> None:
        positive = (
            "max_batch_size", "model_instances", "max_message_bytes", "max_images_per_request",
            "max_image_pixels", "max_request_pixels", "max_inflight_pixels", "stream_window",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        non_negative = (
            "port", "intra_op_threads", "decode_workers", "respond_workers", "max_concurrent_rpcs",
            "switch_interval_ms",
        )
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535 (0 = ephemeral), got {self.port}")
        if not -1 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port must be in -1..65535 (0 = ephemeral, -1 = off), got {self.metrics_port}")
        if not -1 <= self.http_port <= 65535:
            raise ValueError(f"http_port must be in -1..65535 (0 = ephemeral, -1 = off), got {self.http_port}")
        bounded = {"max_delay_ms": 60_000.0, "grace_seconds": 3600.0, "switch_interval_ms": 1000.0}
        for name, top in bounded.items():
            value = getattr(self, name)
            if not (math.isfinite(value) and 0 <= value <= top):  # NaN hung every Score; inf killed the batcher
                raise ValueError(f"{name} must be a number in 0..{top:g}, got {value}")
        if self.ready_file is not None:
            _check_writable(Path(self.ready_file), "ready_file")
        if (self.model is None) == (self.model_repository is None):
            raise ValueError("give either model (one bundle) or model_repository (DIR/<name>/<version>/), not both or neither")
        if self.model_repository is not None and not Path(self.model_repository).is_dir():
            raise ValueError(f"model_repository {self.model_repository}: no such directory")
        if self.model_control_mode not in ("none", "poll", "explicit"):
            raise ValueError(f"model_control_mode must be none, poll or explicit, got {self.model_control_mode!r}")
        if not (math.isfinite(self.repository_poll_secs) and 0.1 <= self.repository_poll_secs <= 86400):
            raise ValueError(f"repository_poll_secs must be in 0.1..86400, got {self.repository_poll_secs}")
        from vaegan.service.server.repository import VersionPolicy

        VersionPolicy.parse(self.version_policy)  # refuse a bad policy now
        if self.providers not in ("auto", "cpu", "cuda", "tensorrt"):
            raise ValueError(f"providers must be auto, cpu, cuda or tensorrt, got {self.providers!r}")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file (mutual TLS) needs tls_cert_file and tls_key_file")
        if self.max_inflight_pixels < self.max_request_pixels:
            raise ValueError(
                f"max_inflight_pixels ({self.max_inflight_pixels}) must be >= max_request_pixels "
                f"({self.max_request_pixels}): a request of the allowed size could never run"
            )
        if (self.metrics_tls_cert_file is None) != (self.metrics_tls_key_file is None):
            raise ValueError("metrics_tls_cert_file and metrics_tls_key_file go together")
        if self.metrics_tls_client_ca_file is not None and self.metrics_tls_cert_file is None:
            raise ValueError("metrics_tls_client_ca_file needs metrics_tls_cert_file and metrics_tls_key_file")
        files = (
            "tls_cert_file", "tls_key_file", "tls_client_ca_file", "auth_tokens_file",
            "metrics_tls_cert_file", "metrics_tls_key_file", "metrics_tls_client_ca_file", "metrics_basic_auth_file",
        )
        for name in files:
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{name} {path}: no such file")
        if self.tls_cert_file is not None and self.tls_key_file is not None:
            _check_key_pair(Path(self.tls_cert_file), Path(self.tls_key_file))
        if self.metrics_tls_cert_file is not None and self.metrics_tls_key_file is not None:
            _check_key_pair(Path(self.metrics_tls_cert_file), Path(self.metrics_tls_key_file), "metrics_")
        if self.log_format not in ("text", "json"):
            raise ValueError(f"log_format must be text or json, got {self.log_format!r}")
        _ = self.formats  # refuse unknown names now

    @property
    def formats(self) -> tuple[str, ...] | None:
        """``image_formats`` as Pillow format names (None: all)."""
        text = self.image_formats.strip().lower()
        if text == "all":
            return None
        from PIL import Image

        Image.init()
        known = {name.lower(): name for name in Image.OPEN}
        names = [n.strip() for n in text.split(",") if n.strip()]
        unknown = [n for n in names if n not in known and n != "jpg"]
        if unknown or not names:
            raise ValueError(
                f"image_formats: {', '.join(unknown) or 'none given'} not known to Pillow "
                f"(known: {', '.join(sorted(known))}, or all)"
            )
        return tuple(known["jpeg" if n == "jpg" else n] for n in names)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def ort_threads(self) -> int:
        """Threads per ONNX Runtime run. The default leaves one core to the event loop and
        decoding: on small machines, ONNX Runtime threads spinning on every core starve gRPC."""
        return self.intra_op_threads or max(1, (os.cpu_count() or 2) - 1)

    @property
    def decode_threads(self) -> int:
        """Worker threads for CPU work other than ONNX Runtime."""
        return self.decode_workers or max(2, min(8, os.cpu_count() or 2))

    @property
    def respond_threads(self) -> int:
        """Worker threads for re-scoring and encoding response pictures: a separate pool, so
        a flood of large decodes never delays the answers of calls already scored."""
        return self.respond_workers or max(1, self.decode_threads // 2)


def _check_writable(path: Path, what: str) -> None:
    """``path`` can be created or replaced: its folder exists and is writable, and it is not a
    folder itself."""
    folder = path.parent
    if path.is_dir():
        raise ValueError(f"{what} {path} is a directory")
    if not folder.is_dir():
        raise ValueError(f"{what} {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {path}: the folder {folder} is not writable")


def _check_key_pair(cert: Path, key: Path, prefix: str = "") -> None:
    """The TLS key belongs to the certificate (gRPC would only say it cannot bind the port)."""
    import ssl

    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key)
    except ssl.SSLError as e:
        raise ValueError(
            f"{prefix}tls_key_file {key} does not match {prefix}tls_cert_file {cert}, or one is not PEM ({e.reason})"
        ) from e


def env_name(flag: str) -> str:
    """``--max-batch-size`` -> ``VAEGAN_MAX_BATCH_SIZE``."""
    return "VAEGAN_" + flag.lstrip("-").replace("-", "_").upper()


def _bool(text: str) -> bool:
    return text.strip().lower() in ("1", "true", "yes", "on")


def add_serve_arguments(
    parser: argparse.ArgumentParser, environ: Mapping[str, str] | None = None
) -> argparse.ArgumentParser:
    """Add the ``vaegan serve`` flags to ``parser``; defaults come from ``environ`` (os.environ).

    String defaults go through each flag's ``type``, so a bad ``VAEGAN_*`` value is reported by
    argparse as one line naming the flag.
    """
    env = os.environ if environ is None else environ
    d = ServiceConfig(model=Path())

    def add(flag: str, typ: Callable[[str], Any], default: Any, help_: str, **kw: Any) -> None:
        name = env_name(flag)
        value = env.get(name, None if default is None else str(default))
        parser.add_argument(flag, type=typ, default=value, help=f"{help_} (env {name})", **kw)

    model = env.get(env_name("--model"))
    parser.add_argument(
        "--model", type=Path, default=model,
        help="bundle directory, or one model's folder of numbered versions (env VAEGAN_MODEL); "
        "or --model-repository",
    )
    add("--host", str, d.host, "gRPC bind address; default %(default)s")
    add("--port", int, d.port, "gRPC port, 0 = ephemeral; default %(default)s")
    add("--metrics-host", str, d.metrics_host, "/metrics bind address; default %(default)s")
    add("--metrics-port", int, d.metrics_port, "/metrics port, 0 = ephemeral, -1 = off; default %(default)s")
    add("--http-port", int, d.http_port,
        "Open Inference Protocol (KServe v2) over HTTP/REST on this port, 0 = ephemeral, -1 = off; default %(default)s")
    add("--providers", str, d.providers, "ONNX Runtime providers; default %(default)s",
        choices=["auto", "cpu", "cuda", "tensorrt"])
    add("--intra-op-threads", int, d.intra_op_threads, "threads per ONNX Runtime run, 0 = cores - 1")
    add("--ort-spin", _bool, d.ort_spin, "idle ONNX Runtime threads busy-wait (true/false); default %(default)s")
    add("--fuse-graphs", _bool, d.fuse_graphs,
        "run E -> G -> D as one composed graph, one ONNX Runtime call per batch (true/false); "
        "default %(default)s")
    add("--switch-interval-ms", float, d.switch_interval_ms,
        "GIL switch interval of the serving process: how soon the model thread gets the GIL back "
        "from a busy event loop after each ONNX Runtime run, 0 = Python's 5 ms; default %(default)s")
    add("--max-batch-size", int, d.max_batch_size, "images per merged model run; default %(default)s")
    add("--max-delay-ms", float, d.max_delay_ms, "max wait to fill a batch; default %(default)s")
    add("--model-instances", int, d.model_instances, "merged batches run at once; default %(default)s")
    add("--decode-workers", int, d.decode_workers, "decoding and inpainting threads, 0 = cores (2..8)")
    add("--respond-workers", int, d.respond_workers,
        "threads for re-scoring and response pictures, 0 = half the decode threads")
    add("--max-message-bytes", int, d.max_message_bytes, "gRPC message limit both ways; default %(default)s")
    add("--max-concurrent-rpcs", int, d.max_concurrent_rpcs, "0 = unlimited; default %(default)s")
    add("--max-images-per-request", int, d.max_images_per_request, "default %(default)s")
    add("--max-image-pixels", int, d.max_image_pixels, "height*width per image; default %(default)s")
    add("--max-request-pixels", int, d.max_request_pixels,
        "height*width of all images of one request, checked from headers before decoding; default %(default)s")
    add("--max-inflight-pixels", int, d.max_inflight_pixels,
        "height*width being decoded or held by all calls together; a request that does not fit "
        "waits for earlier calls; default %(default)s")
    add("--stream-window", int, d.stream_window, "ScoreStream requests in progress per stream")
    add("--grace-seconds", float, d.grace_seconds, "drain time on SIGTERM; default %(default)s")
    add("--log-level", str, d.log_level, "default %(default)s",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    add("--log-format", str, d.log_format, "default %(default)s", choices=["text", "json"])
    add("--image-formats", str, d.image_formats,
        "formats accepted in encoded images, comma-separated Pillow names, or all; default %(default)s")
    add("--ready-file", Path, None, "write the bound ports as JSON here once SERVING")
    add("--tls-cert-file", Path, None, "PEM certificate chain; with --tls-key-file serves TLS")
    add("--tls-key-file", Path, None, "PEM private key for --tls-cert-file")
    add("--tls-client-ca-file", Path, None, "PEM CA certificates: require client certificates signed by them (mTLS)")
    add("--auth-tokens-file", Path, None,
        "SHA-256 hex digests of accepted bearer tokens, one per line: vaegan.v1 calls need "
        "'authorization: Bearer <token>' (health and reflection stay open)")
    add("--allow-overrides", _bool, d.allow_overrides,
        "requests may set their own weights and threshold (true/false); default %(default)s")
    add("--metrics-tls-cert-file", Path, None, "PEM certificate chain: serve /metrics over HTTPS")
    add("--metrics-tls-key-file", Path, None, "PEM private key for --metrics-tls-cert-file")
    add("--metrics-tls-client-ca-file", Path, None, "PEM CA: scrapers must present a certificate it signed")
    add("--metrics-basic-auth-file", Path, None,
        "'user:<sha256 hex of the password>' lines: /metrics asks for HTTP basic auth")
    add("--model-repository", Path, None,
        "serve every model of DIR/<name>/<version>/ (Triton's layout) instead of one --model")
    add("--model-control-mode", str, d.model_control_mode,
        "none: load the repository at start; poll: also rescan it every --repository-poll-secs and roll "
        "versions forward; explicit: load/unload only through the repository API; default %(default)s",
        choices=["none", "poll", "explicit"])
    add("--repository-poll-secs", float, d.repository_poll_secs, "default %(default)s")
    add("--version-policy", str, d.version_policy, "latest[:N], all or specific:V1,V2; default %(default)s")
    add("--load-models", str, d.load_models, "explicit mode: models to load at start, comma-separated")
    return parser


def config_from_args(args: argparse.Namespace) -> ServiceConfig:
    """The :class:`ServiceConfig` of parsed ``vaegan serve`` arguments (extra args ignored)."""
    values = {f.name: getattr(args, f.name) for f in fields(ServiceConfig) if hasattr(args, f.name)}
    return ServiceConfig(**values)
