"""``vaegan serve``: flags, logging, signals and exit codes around :class:`OutlierServer`.

Exit codes: 0 after a clean shutdown (SIGTERM/SIGINT: NOT_SERVING, in-flight calls finish
within ``--grace-seconds``), 2 for a bad bundle or bad settings (one log line says why), 1 when
the model stopped serving while running (the dynamic batcher died: health went NOT_SERVING;
exiting lets Kubernetes restart the pod).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from pathlib import Path

from vaegan.service.runtime import ServiceError
from vaegan.service.server.app import BoundPorts, OutlierServer
from vaegan.service.server.config import ServiceConfig, add_serve_arguments, config_from_args
from vaegan.service.server.logs import configure_logging

__all__ = ["add_serve_arguments", "main", "run_serve", "set_switch_interval"]

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FATAL = 1
EXIT_BAD_SETUP = 2


def _write_ready_file(path: Path, ports: BoundPorts) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"port": ports.grpc, "metrics_port": ports.metrics, "http_port": ports.http, "pid": os.getpid()}))
    tmp.replace(path)


async def serve_until_signal(config: ServiceConfig) -> int:
    """Serve until SIGTERM or SIGINT, then drain; returns the process exit code."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # SIGHUP (a closed terminal, a config-reload habit) must never kill a serving process
    loop.add_signal_handler(signal.SIGHUP, lambda: logger.info("SIGHUP: ignored (send SIGTERM to stop)"))
    server = OutlierServer(config)
    try:
        ports = await server.start()
        await server.load()
    except (ServiceError, ValueError, RuntimeError, OSError) as e:
        logger.error("cannot serve %s: %s", config.model or config.model_repository, e)
        await server.stop(0)
        return EXIT_BAD_SETUP
    if config.ready_file is not None:
        try:
            _write_ready_file(config.ready_file, ports)
        except OSError as e:
            logger.error("cannot write --ready-file %s: %s", config.ready_file, e)
            await server.stop(0)
            return EXIT_BAD_SETUP
    signalled, fatal = asyncio.ensure_future(stop.wait()), asyncio.ensure_future(server.fatal.wait())
    await asyncio.wait((signalled, fatal), return_when=asyncio.FIRST_COMPLETED)
    signalled.cancel()
    fatal.cancel()
    for sig in (signal.SIGTERM, signal.SIGINT):  # a second signal ends the process at once
        loop.remove_signal_handler(sig)
    if server.fatal.is_set():
        logger.error("exiting: %s", server.fatal_reason)
        await server.stop(0)
        return EXIT_FATAL
    logger.info("shutting down: NOT_SERVING, draining in-flight calls for up to %.1f s", config.grace_seconds)
    await server.stop(config.grace_seconds)
    return EXIT_OK


def set_switch_interval(config: ServiceConfig) -> None:
    """Apply ``--switch-interval-ms`` to this process (the serving process owns the interpreter).

    A thread that returns from ONNX Runtime must retake the GIL; while the event loop is busy
    it waits up to the switch interval (Python's default 5 ms) for it. 0.2 ms took 7% off the
    model thread's time per batch under many single-image requests (``benchmarks/serving.py``).
    """
    if config.switch_interval_ms > 0:
        sys.setswitchinterval(config.switch_interval_ms / 1e3)


def run_serve(args: argparse.Namespace) -> int:
    """Run the server for parsed ``vaegan serve`` arguments; returns the exit code."""
    configure_logging(getattr(args, "log_level", "INFO"), getattr(args, "log_format", "text"))
    try:
        config = config_from_args(args)
    except ValueError as e:
        logger.error("bad settings: %s", e)
        return EXIT_BAD_SETUP
    set_switch_interval(config)
    return asyncio.run(serve_until_signal(config))


def main(argv: list[str] | None = None) -> int:
    """``python -m vaegan.service.server``: the same flags as ``vaegan serve``."""
    parser = argparse.ArgumentParser(
        prog="python -m vaegan.service.server",
        description="Serve a vaegan bundle over gRPC (vaegan.v1.OutlierService) with /metrics.",
    )
    add_serve_arguments(parser)
    return run_serve(parser.parse_args(argv))
