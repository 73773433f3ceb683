"""``vaegan serve``: flags, logging, signals and exit codes around :class:`OutlierServer`.

Exit codes: 0 after a clean shutdown (SIGTERM/SIGINT: NOT_SERVING, in-flight calls finish
within ``--grace-seconds``), 2 for a bad bundle or bad settings (one log line says why).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
from pathlib import Path

from service.runtime import ServiceError
from service.server.app import BoundPorts, OutlierServer
from service.server.config import ServiceConfig, add_serve_arguments, config_from_args
from service.server.logs import configure_logging

__all__ = ["add_serve_arguments", "main", "run_serve"]

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_BAD_SETUP = 2


def _write_ready_file(path: Path, ports: BoundPorts) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"port": ports.grpc, "metrics_port": ports.metrics, "pid": os.getpid()}))
    tmp.replace(path)


async def serve_until_signal(config: ServiceConfig) -> int:
    """Serve until SIGTERM or SIGINT, then drain; returns the process exit code."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = OutlierServer(config)
    try:
        ports = await server.start()
        await server.load()
    except (ServiceError, ValueError, RuntimeError, OSError) as e:
        logger.error("cannot serve %s: %s", config.model, e)
        await server.stop(0)
        return EXIT_BAD_SETUP
    if config.ready_file is not None:
        _write_ready_file(config.ready_file, ports)
    await stop.wait()
    logger.info("shutting down: NOT_SERVING, draining in-flight calls for up to %.1f s", config.grace_seconds)
    for sig in (signal.SIGTERM, signal.SIGINT):  # a second signal ends the process at once
        loop.remove_signal_handler(sig)
    await server.stop(config.grace_seconds)
    return EXIT_OK


def run_serve(args: argparse.Namespace) -> int:
    """Run the server for parsed ``vaegan serve`` arguments; returns the exit code."""
    configure_logging(getattr(args, "log_level", "INFO"), getattr(args, "log_format", "text"))
    try:
        config = config_from_args(args)
    except ValueError as e:
        logger.error("bad settings: %s", e)
        return EXIT_BAD_SETUP
    return asyncio.run(serve_until_signal(config))


def main(argv: list[str] | None = None) -> int:
    """``python -m service.server``: the same flags as ``vaegan serve``."""
    parser = argparse.ArgumentParser(
        prog="python -m service.server",
        description="Serve a vaegan bundle over gRPC (vaegan.v1.OutlierService) with /metrics.",
    )
    add_serve_arguments(parser)
    return run_serve(parser.parse_args(argv))
