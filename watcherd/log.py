"""Logging: structlog, one JSON object per line when not a TTY, readable lines on a TTY.

Secrets never reach a line: every known secret value (the control token, AWS keys from the
environment) is masked wherever it appears, and fields whose name says "secret", "token",
"password" or "credential" are masked whatever they hold.

Records of other libraries (botocore, urllib3, ...) at WARNING and above go through the same
processors and renderer, with their logger's name. A stream that cannot be written (a reader that
left, a full disk) ends the logging, never the program: a log line is not worth a lost save.
"""

from __future__ import annotations

import logging
import os
import re
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

# "scheme://user:password@host": the password goes, the user stays (it says which account).
# The password runs to the last "@" before the path: people do paste passwords holding a raw "@".
_URL_CREDENTIALS = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^/@:\s]*):[^/\s]*@")
# "https://<token>@github.com/...": over HTTP a user name alone is how tokens are passed (GitHub,
# Azure DevOps); it goes whole. ssh://git@host keeps its (conventional, harmless) user.
_URL_TOKEN_USER = re.compile(r"((?<![A-Za-z0-9+.-])(?:https?|ftps?)://)[^/@:\s]+@", re.IGNORECASE)

_secrets: set[str] = set()
_secrets_lock = threading.Lock()


def add_secret(value: str | None) -> None:
    """Mask ``value`` in every log line from now on (short values are too ambiguous to mask)."""
    if value and len(value) >= 4:
        with _secrets_lock:
            _secrets.add(value)


def mask_url_credentials(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@`` in it masked, and the
    user of ``http(s)://user@``, where a lone user name is usually a token."""
    return _URL_TOKEN_USER.sub(rf"\1{_MASK}@", _URL_CREDENTIALS.sub(rf"\1:{_MASK}@", text))


def redact(text: str) -> str:
    """``text`` with every known secret masked; also for error messages and status output.

    The secrets from the environment are looked up here too, not only in :func:`configure`: the
    CLI prints a configuration error before logging is configured.
    """
    with _secrets_lock:
        known = set(_secrets)
    known.update(v for v in (os.environ.get(name) for name in _SECRET_ENV) if v and len(v) >= 4)
    for secret in sorted(known, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, _MASK)
    return mask_url_credentials(text)


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, dict):
        return {k: _MASK if _is_secret_name(k) and v else _redact_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact_value(v) for v in value]
    if isinstance(value, tuple):
        items = [_redact_value(v) for v in value]
        return value._make(items) if hasattr(value, "_make") else tuple(items)  # namedtuples
    if isinstance(value, BaseException):
        return redact(str(value))
    # Anything else is rendered later through str() (JSON) or repr() (console), after this
    # processor has run: check both spellings now and keep the object only when both are clean.
    for text in (str(value), repr(value)):
        if redact(text) != text:
            return redact(str(value))
    return value


def _is_secret_name(name: Any) -> bool:
    n = str(name).lower()
    return any(h in n for h in _SECRET_FIELD_HINTS) and n not in ("token_file", "tokens")


def _redact_processor(_logger: Any, _name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    return _redact_value(event_dict)


class _Sink:
    """One stream of log lines whose failure never reaches the code that logged.

    ``watcherd run | head`` or a ``tee`` killed by Ctrl-C closes the pipe under the daemon; a
    raised BrokenPipeError would end the snapshot or upload that happened to log, and at exit
    Python's own flush of the stream would turn a clean shutdown into status 120. So the first
    failed write says so once on stderr, points the stream's descriptor at /dev/null (what is
    still buffered drains there) and drops every later line.
    """

    _lock = threading.Lock()  # one for all sinks: a reconfigured process writes whole lines too

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.broken = False

    def write(self, line: str) -> None:
        with self._lock:
            if self.broken:
                return
            try:
                self.stream.write(line + "\n")
                self.stream.flush()
            except (OSError, ValueError) as exc:  # ValueError: the stream was closed
                self.broken = True
                self._give_up(exc)

    # structlog calls the method named after the level; every level is one line.
    msg = log = debug = info = warn = warning = write
    fatal = failure = err = error = critical = exception = write

    def _give_up(self, exc: Exception) -> None:
        silence(self.stream)
        if self.stream is sys.stderr:
            return
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        name = getattr(self.stream, "name", "the log stream")
        try:
            print(f"watcherd: cannot write log lines to {name} ({why}); logging stops there, "
                  "watching and saving go on", file=sys.stderr, flush=True)
        except (OSError, ValueError):
            pass


def silence(stream: TextIO) -> None:
    """Point ``stream``'s descriptor at /dev/null, so that writing to it (and Python's flush of
    it at exit) succeeds from now on, and nothing of it is seen."""
    try:
        fd = stream.fileno()
    except (OSError, ValueError):
        return  # not a file (a test's StringIO): nothing will flush it at exit
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


class _SinkHandler(logging.Handler):
    """The stdlib side: other libraries' records, rendered by structlog, into the same sink."""

    def __init__(self, sink: _Sink, level: int) -> None:
        super().__init__(level)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:  # a library's bad format string: logging's own report, as usual
            self.handleError(record)
            return
        self.sink.write(line)


_handler: _SinkHandler | None = None


def configure(level: str = "info", fmt: str = "auto", stream: TextIO | None = None,
              secrets: Iterable[str] = ()) -> None:
    """Set up structlog for the whole process. Safe to call again (tests, config reload)."""
    global _handler
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
    ]
    renderer: Any
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer(default=str)
    else:
        # plain_traceback, never rich's: a rich traceback would show local variables, and only
        # the already redacted "exception" string may reach the renderer.
        renderer = structlog.dev.ConsoleRenderer(colors=stream.isatty(),
                                                 exception_formatter=structlog.dev.plain_traceback)
    sink = _Sink(stream)
    structlog.configure(
        processors=[*shared, _redact_processor, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=lambda *_: sink,
        cache_logger_on_first_use=False,
    )
    # Records of other libraries: their own debug and info chatter stays out (botocore's is
    # per request), their warnings and errors are lines like ours. The redaction runs after
    # remove_processors_meta, on the event alone, not on the LogRecord it came from.
    foreign = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    _redact_processor, renderer],
    )
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
    _handler = _SinkHandler(sink, max(_LEVELS[level], logging.WARNING))
    _handler.setFormatter(foreign)
    root.addHandler(_handler)
    root.setLevel(_handler.level)


def get(name: str) -> Any:
    """The logger for module ``name``."""
    return structlog.get_logger(name)
