"""Logging: structlog, one JSON object per line when not a TTY, readable lines on a TTY.

Secrets never reach a line: every known secret value (the control token, AWS keys from the
environment) is masked wherever it appears, and fields whose name says "secret", "token",
"password" or "credential" are masked whatever they hold.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Iterable
from typing import Any, TextIO

import structlog

_MASK = "********"
_SECRET_FIELD_HINTS = ("secret", "token", "password", "credential", "authorization")
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
               "WATCHERD_CONTROL_TOKEN")
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}

_secrets: set[str] = set()
_secrets_lock = threading.Lock()


def add_secret(value: str | None) -> None:
    """Mask ``value`` in every log line from now on (short values are too ambiguous to mask)."""
    if value and len(value) >= 4:
        with _secrets_lock:
            _secrets.add(value)


def redact(text: str) -> str:
    """``text`` with every registered secret masked; also for error messages and status output."""
    for secret in sorted(_secrets, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, _MASK)
    return text


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: _MASK if _is_secret_name(k) and v else _redact_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_redact_value(v) for v in value)
    if isinstance(value, BaseException):
        return redact(str(value))
    return value


def _is_secret_name(name: Any) -> bool:
    n = str(name).lower()
    return any(h in n for h in _SECRET_FIELD_HINTS) and n not in ("token_file", "tokens")


def _redact_processor(_logger: Any, _name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    return _redact_value(event_dict)


def configure(level: str = "info", fmt: str = "auto", stream: TextIO | None = None,
              secrets: Iterable[str] = ()) -> None:
    """Set up structlog for the whole process. Safe to call again (tests, config reload)."""
    stream = stream or sys.stdout
    for name in _SECRET_ENV:
        add_secret(os.environ.get(name))
    for s in secrets:
        add_secret(s)
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        _redact_processor,
    ]
    renderer: Any
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer(default=str)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=stream.isatty())
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )


def get(name: str) -> Any:
    """The logger for module ``name``."""
    return structlog.get_logger(name)
