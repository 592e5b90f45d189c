"""The control endpoint: a small HTTP server beside the daemon, and the client the CLI uses.

``GET /healthz``, ``GET /status`` (JSON), ``POST /snapshot``, ``POST /activity``, ``GET /metrics``
(Prometheus text); checkpoints and rollback: ``POST /checkpoint``, ``GET /snapshots``,
``POST /rollback`` (JSON in and out, see docs/operations.md). The server runs in its own threads and reaches the daemon's event loop only
through an anyio blocking portal, so a slow scrape never stalls the watcher.

Loopback by default; any other address requires ``control.token``, sent as
``Authorization: Bearer <token>`` on everything but ``/healthz``.

The endpoint must never cost the daemon its job: it serves at most :data:`MAX_CONNECTIONS`
connections at once (the rest get a 503 at once), drops a client that sends nothing for
:data:`READ_TIMEOUT`, refuses bodies above :data:`MAX_BODY`, and rides out a process that ran out
of file descriptors. Whatever a client sends, nothing is printed but log lines.
"""

from __future__ import annotations

import errno
import hmac
import json
import re
import socket
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from watcherd import log
from watcherd.config import ControlConfig
from watcherd.errors import ConfigError, WatcherdError

_log = log.get(__name__)

# Each connection being served holds a thread and a file descriptor. Unbounded, 3,000 idle
# connections would be 3,000 threads, and under `ulimit -n 1024` would leave the next snapshot's
# git no descriptor to start with. Probes, scrapes and `watcherd status` need a handful.
MAX_CONNECTIONS = 32
# A client that sends nothing (or reads nothing) for this long gives its connection up.
READ_TIMEOUT = 5.0
# The endpoints take no body; a client may send a small one, never a large one.
MAX_BODY = 64 * 1024
# After accept() fails for want of file descriptors: wait, rather than spin on the listening
# socket, which stays readable while the connection waits in the backlog.
ACCEPT_BACKOFF = 0.5


class DaemonAPI(Protocol):
    """What the endpoint needs from the daemon; each call is made on the daemon's loop."""

    def healthy(self) -> tuple[bool, str]: ...

    def status(self) -> dict[str, Any]: ...

    def activity(self) -> None: ...

    async def snapshot_now(self) -> dict[str, Any]: ...

    async def checkpoint_now(self, name: str, note: str) -> dict[str, Any]: ...

    async def snapshots(self, since: str | None) -> dict[str, Any]: ...

    async def rollback_now(self, request: dict[str, Any]) -> dict[str, Any]: ...


class DaemonNotRunning(WatcherdError):
    """No daemon answers on ``control.listen``."""


# -- server ------------------------------------------------------------------------------------------


class ControlServer:
    """The HTTP endpoint. ``call(fn, *args)`` runs ``fn`` on the daemon's event loop."""

    def __init__(self, config: ControlConfig, api: DaemonAPI, call: Callable[..., Any]) -> None:
        assert config.address is not None
        self.api = api
        self.call = call
        self.token = config.token
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_Metrics(lambda: self.call(self.api.status)))
        self.httpd = _Server(config.address, _handler(self))
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="control",
                                        kwargs={"poll_interval": 3600}, daemon=True)

    def start(self) -> None:
        self._thread.start()
        _log.info("control.listening", address=f"{self.httpd.server_address[0]}:{self.port}",
                  auth=bool(self.token))

    def close(self) -> None:
        # serve_forever only notices shutdown() when its select wakes; a connection wakes it
        # without giving the server a polling interval (an idle daemon makes no wakeups).
        stopper = threading.Thread(target=self.httpd.shutdown, daemon=True)
        stopper.start()
        try:
            with socket.create_connection(self.httpd.server_address[:2], timeout=1):
                pass
        except OSError:
            pass
        stopper.join(timeout=5)
        self.httpd.server_close()


class _Server(ThreadingHTTPServer):
    """A threading HTTP server with a bounded number of connections being served.

    A connection beyond :data:`MAX_CONNECTIONS` is accepted and answered ``503`` at once rather
    than left in the listen backlog: in the backlog it would hang its client with no answer (a
    probe could not tell busy from dead) and fill the kernel's queue, so that new connections
    are dropped unseen; accepted, it costs one descriptor for one non-blocking write.
    """

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._out_of_files = False
        self._busy = False
        try:
            super().__init__(address, handler)
        except OSError as exc:
            raise WatcherdError(f"control.listen {address[0]}:{address[1]}: cannot listen "
                                f"({exc.strerror}); is another watcherd running? Set "
                                'control.listen to another port, or "" to turn it off') from None

    def get_request(self) -> tuple[socket.socket, Any]:
        try:
            conn = super().get_request()
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                if not self._out_of_files:
                    self._out_of_files = True
                    _log.warning("control.out_of_files", error=exc.strerror,
                                 note="connections wait until descriptors are free; snapshots "
                                      "and uploads go on")
                time.sleep(ACCEPT_BACKOFF)
            raise  # socketserver drops this attempt and selects again
        if self._out_of_files:
            self._out_of_files = False
            _log.info("control.accepting_again")
        return conn

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            if not self._busy:
                self._busy = True
                _log.warning("control.busy", connections=MAX_CONNECTIONS,
                             note="further connections are answered 503 until one ends")
            _answer_busy(request)
            self.shutdown_request(request)
            return
        self._busy = False
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # socketserver would print a traceback on stderr for a client that reset, timed out or
        # sent garbage; that is the client's business, worth a debug line at most.
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):
            _log.debug("control.connection_failed", client=str(client_address[0]),
                       error=f"{type(exc).__name__}: {exc}")
        else:
            _log.error("control.request_failed", client=str(client_address[0]),
                       error=f"{type(exc).__name__}: {exc}", exc_info=exc)


def _answer_busy(sock: socket.socket) -> None:
    """Answer 503 without waiting on the client, and read what it sent (closing on unread bytes
    would reset the connection, and could lose the answer)."""
    body = b'{"error": "too many connections to the control endpoint; retry"}\n'
    try:
        sock.setblocking(False)
        sock.send(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\nConnection: close\r\nRetry-After: 1\r\n\r\n%s"
                  % (len(body), body))
        sock.recv(MAX_BODY)
    except OSError:
        pass  # the client left, or sent nothing yet: nothing more is owed to it


def _handler(server: ControlServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "watcherd"
        timeout = READ_TIMEOUT  # socketserver applies it to every read and write

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            if self._read_body() is None:
                return None
            if self.path == "/healthz":
                ok, why = server.call(server.api.healthy)
                return self._send(200 if ok else 503, (why + "\n").encode(), "text/plain")
            if not self._authorised():
                return None
            if self.path == "/status":
                return self._json(200, server.call(server.api.status))
            if self.path == "/metrics":
                return self._send(200, generate_latest(server.registry), CONTENT_TYPE_LATEST)
            path, _, query = self.path.partition("?")
            if path == "/snapshots":
                since = urllib.parse.parse_qs(query).get("since", [None])[0]
                return self._answer(server.call(server.api.snapshots, since))
            return self._json(404, {"error": f"no such endpoint: GET {self.path}"})

        def do_POST(self) -> None:  # noqa: N802
            body = self._read_body()
            if body is None:
                return None
            if not self._authorised():
                return None
            if self.path in ("/checkpoint", "/rollback"):
                try:
                    doc = json.loads(body or b"{}")
                    if not isinstance(doc, dict):
                        raise ValueError("not an object")
                except ValueError as exc:
                    return self._json(400, {"status": "invalid",
                                            "error": f"the body must be a JSON object ({exc})"})
                if self.path == "/checkpoint":
                    name, note = doc.get("name"), doc.get("note", "")
                    if not isinstance(name, str) or not isinstance(note, str) or \
                            set(doc) - {"name", "note"}:
                        return self._json(400, {"status": "invalid",
                                                "error": 'send {"name": "...", "note": "..."}'})
                    return self._answer(server.call(server.api.checkpoint_now, name, note))
                return self._answer(server.call(server.api.rollback_now, doc))
            if self.path == "/activity":
                server.call(server.api.activity)
                return self._send(204, b"", "text/plain")
            if self.path == "/snapshot":
                return self._answer(server.call(server.api.snapshot_now))
            return self._json(404, {"error": f"no such endpoint: POST {self.path}"})

        def _authorised(self) -> bool:
            if not server.token:
                return True
            sent = self.headers.get("Authorization", "")
            if hmac.compare_digest(sent.encode(), f"Bearer {server.token}".encode()):
                return True
            self._json(401, {"error": "missing or wrong bearer token (control.token)"})
            return False

        def _read_body(self) -> bytes | None:
            """Read the request's body, so the next request on the connection starts where it
            should; None after refusing one that cannot be read safely."""
            if self.headers.get("Transfer-Encoding") is not None:
                return self._refuse(411, "send the body with a Content-Length, not chunked")
            lengths = self.headers.get_all("Content-Length") or []
            if not lengths:
                return b""
            if len(lengths) > 1 or not re.fullmatch(r"[0-9]{1,20}", lengths[0].strip()):
                return self._refuse(400, "Content-Length must be one byte count")
            length = int(lengths[0])
            if length > MAX_BODY:
                return self._refuse(413, f"request body of {length} bytes; at most {MAX_BODY}")
            return self.rfile.read(length) if length else b""

        def _refuse(self, code: int, why: str) -> None:
            self._json(code, {"error": why}, close=True)
            return None

        def _answer(self, result: dict[str, Any]) -> None:
            """A daemon operation's outcome, with the HTTP status its ``status`` field means."""
            code = {"saved": 200, "unchanged": 200, "ok": 200, "rolled_back": 200,
                    "invalid": 400, "conflict": 409, "refused": 409,
                    "shutting_down": 503}.get(
                result.get("status"), 500)
            return self._json(code, result)

        def _json(self, code: int, doc: Any, close: bool = False) -> None:
            self._send(code, (json.dumps(doc, indent=2) + "\n").encode(), "application/json",
                       close=close)

        def _send(self, code: int, body: bytes, content_type: str, close: bool = False) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            if close:
                self.send_header("Connection", "close")  # also ends this connection here
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            _log.debug("control.request", request=format % args)

    return Handler


class _Metrics:
    """Prometheus metrics computed from the daemon's status at scrape time (one source of truth)."""

    def __init__(self, status: Callable[[], dict[str, Any]]) -> None:
        self.status = status

    def describe(self) -> Iterable[Any]:
        return []

    def collect(self) -> Iterable[Any]:
        s = self.status()
        m = s["counters"]

        def gauge(name: str, doc: str, value: float | None) -> GaugeMetricFamily:
            g = GaugeMetricFamily(f"watcherd_{name}", doc)
            if value is not None:
                g.add_metric([], value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(f"watcherd_{name}", doc, value=value)

        yield counter("snapshots", "Snapshot commits recorded.", m["snapshots"])
        yield counter("snapshot_failures", "Snapshots that failed.", m["snapshot_failures"])
        yield counter("uploads", "Generations saved to the store.", m["uploads"])
        yield counter("upload_failures", "Uploads that failed (retried with backoff).",
                      m["upload_failures"])
        yield counter("conflicts", "Saves refused as non-fast-forward, kept under conflicts/.",
                      m["conflicts"])
        yield counter("uploaded_bytes", "Bundle bytes uploaded.", m["uploaded_bytes"])
        yield counter("store_vanished", "Saves that found the store had lost this workspace's "
                      "generations (saved again from generation 1).", m["store_vanished"])
        yield gauge("unsaved_conflict", "1 while the newest state is only in a conflict copy "
                    "(refused by the store).", 1 if s.get("refused") else 0)
        yield gauge("conflict_copies", "Conflict copies under this key (as of the last refusal).",
                    (s.get("conflict") or {}).get("copies"))
        yield counter("rescans", "Full rescans after an inotify overflow or a lost watch.",
                      m["rescans"])
        yield gauge("watches", "inotify watches in place.", s["watches"])
        yield gauge("idle", "1 when the workspace is idle.", 1 if s["idle"] else 0)
        yield gauge("degraded", "1 when watching is degraded (see /status).",
                    1 if s["degraded"] else 0)
        yield gauge("unsaved_change_age_seconds",
                    "Age of the oldest change not yet in the store (0 when all is saved).",
                    (s["oldest_unsaved_change_age_ms"] or 0) / 1000)
        yield gauge("last_upload_age_seconds", "Seconds since the last successful upload.",
                    m["last_upload_age_s"])
        yield gauge("last_upload_timestamp_seconds", "Unix time of the last successful upload.",
                    m["last_upload_unix"])
        yield gauge("last_snapshot_timestamp_seconds", "Unix time of the last snapshot commit.",
                    m["last_snapshot_unix"])
        yield gauge("generation", "The newest generation this daemon saved or started from.",
                    (s["last_upload"] or {}).get("generation"))
        yield gauge("pending_upload_retries", "Consecutive failed uploads.",
                    s["pending_retries"]["upload"])


# -- client ------------------------------------------------------------------------------------------


class ControlClient:
    """The CLI's side: ``watcherd status`` and ``watcherd snapshot`` talk to the daemon through it."""

    def __init__(self, config: ControlConfig, timeout: float = 5.0) -> None:
        self.config = config
        self.timeout = timeout
        address = config.address
        if address is None:
            self.base = None
        else:
            host = address[0] if address[0] not in ("0.0.0.0", "::", "") else "127.0.0.1"
            host = f"[{host}]" if ":" in host else host
            self.base = f"http://{host}:{address[1]}"

    def status(self) -> dict[str, Any]:
        code, doc = self._request("GET", "/status")
        if code != 200:
            said = doc.get("error") if isinstance(doc, dict) else None
            raise WatcherdError(f"{self.base}/status answered HTTP {code}"
                                + (f": {said}" if said else ""))
        return doc

    def snapshot(self, timeout: float) -> tuple[int, dict[str, Any]]:
        return self._request("POST", "/snapshot", timeout=timeout)

    def checkpoint(self, name: str, note: str, timeout: float) -> tuple[int, dict[str, Any]]:
        return self._request("POST", "/checkpoint", timeout=timeout,
                             body={"name": name, "note": note})

    def snapshots(self, since: str | None) -> tuple[int, dict[str, Any]]:
        query = f"?{urllib.parse.urlencode({'since': since})}" if since else ""
        return self._request("GET", f"/snapshots{query}")

    def rollback(self, request: dict[str, Any], timeout: float) -> tuple[int, dict[str, Any]]:
        return self._request("POST", "/rollback", timeout=timeout, body=request)

    def _request(self, method: str, path: str, timeout: float | None = None,
                 body: dict[str, Any] | None = None) -> tuple[int, Any]:
        if self.base is None:
            raise DaemonNotRunning('the control endpoint is off (control.listen = "")')
        data = json.dumps(body).encode() if body is not None else \
            (b"" if method == "POST" else None)
        req = urllib.request.Request(self.base + path, method=method, data=data)
        if body is not None:
            req.add_header("Content-Type", "application/json")
        if self.config.token:
            req.add_header("Authorization", f"Bearer {self.config.token}")
        timeout = timeout or self.timeout
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                try:
                    return resp.status, json.loads(resp.read() or b"null")
                except ValueError:
                    raise WatcherdError(f"{self.base}{path} answered, but not in JSON: is "
                                        "control.listen the address of a watcherd?") from None
        except urllib.error.HTTPError as exc:
            if exc.code == 401:
                # A daemon that answers, but not to this token: a config to fix, not to retry.
                raise ConfigError(f"{self.base}{path} answered HTTP 401: the daemon refuses "
                                  "this control.token; set the token it was started with") from None
            try:
                return exc.code, json.loads(exc.read() or b"null")
            except ValueError:
                raise WatcherdError(f"{self.base}{path}: HTTP {exc.code}") from None
        except urllib.error.URLError as exc:  # could not connect (or send): nobody listens
            raise DaemonNotRunning(f"no watcherd answers on {self.base} ({exc.reason})") from None
        except TimeoutError:
            # Connected, then no answer: a daemon is there, only busy or stuck. Not "none runs":
            # `watcherd snapshot` must not go standalone beside it.
            raise WatcherdError(f"{self.base}{path}: the daemon took the request but did not "
                                f"answer within {timeout:g}s") from None
        except ConnectionError as exc:
            raise DaemonNotRunning(f"no watcherd answers on {self.base} ({exc})") from None
