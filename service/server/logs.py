"""Structured logging with a per-request id carried in :mod:`contextvars`.

The interceptor sets :data:`request_id` for each call (the caller's ``x-request-id`` metadata,
else a fresh id); every log record made while serving that call, in any module, carries it as
``record.request_id`` through :class:`RequestIdFilter`. :func:`configure_logging` is called once,
by the entry point.
"""

from __future__ import annotations

import contextvars
import json
import logging
import random
import sys
from typing import Any

__all__ = [
    "JsonFormatter",
    "RequestIdFilter",
    "configure_logging",
    "new_request_id",
    "request_id",
]

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "request_id"}


def new_request_id() -> str:
    """A fresh request id: 16 hex characters (random, not secret; no system call per id)."""
    return f"{random.getrandbits(64):016x}"


class RequestIdFilter(logging.Filter):
    """Adds ``record.request_id`` from the context (``-`` outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, request_id, message, extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "request_id": getattr(record, "request_id", request_id.get()),
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Configure the root logger once: stderr, ``text`` or ``json`` lines, with request ids."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
