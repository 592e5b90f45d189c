"""A local S3 for tests: a moto server on a loopback port, and a fault-injecting proxy in front.

Import it as a plain module (``tests/`` is on ``sys.path``, see ``conftest.py``)::

    from s3server import FaultProxy, MotoS3, drop_response, respond, reset_request_after, stall

    moto = MotoS3().start()                  # http://127.0.0.1:<free port>, in this process
    bucket = moto.new_bucket()               # a fresh bucket: tests do not see each other's objects
    proxy = FaultProxy(moto.address).start() # http://127.0.0.1:<another port> -> moto
    proxy.fail(respond(503, "SlowDown"), method="PUT", path="/bundles/", times=2)
    ...                                      # point the code under test at proxy.url
    proxy.stop(); moto.stop()

``python tests/s3server.py`` runs the server alone (another process), printing its endpoint.
``moto_s3_config(endpoint)`` gives the :class:`~watcherd.config.S3Config` that talks to it, and
``aws_env()`` the environment (fake keys, no IMDS) for a subprocess such as a daemon.

Two things differ from a bare ``ThreadedMotoServer``:

- moto checks ``If-Match``/``If-None-Match`` and then writes, without a lock in between, so two
  racing conditional writers can both win. Real S3 is atomic there; the server here serialises
  conditional writes (bodies are read before the lock is taken) so the race tests test our code,
  not moto's.
- auth can be switched on and off (:meth:`MotoS3.auth`): moto then checks signatures and IAM
  policies, which is what the wrong-credentials tests need. It is process-wide moto state, so
  always use it as a context manager.
"""

from __future__ import annotations

import io
import json
import socket
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

FAKE_KEY_ID = "AKIAWATCHERDTEST0001"
FAKE_SECRET = "watcherd-test-secret-key-do-not-use"
REGION = "us-east-1"


def aws_env(endpoint: str | None = None, **extra: str) -> dict[str, str]:
    """Environment variables for a process that talks to the local server with fake keys.

    Keeps the process away from real credentials: no shared config, no instance metadata.
    """
    env = {
        "AWS_ACCESS_KEY_ID": FAKE_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": FAKE_SECRET,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_CONFIG_FILE": "/nonexistent/aws-config",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    if endpoint:
        env["WATCHERD_STORE_S3_ENDPOINT_URL"] = endpoint
        env["WATCHERD_STORE_S3_FORCE_PATH_STYLE"] = "true"
    env.update(extra)
    return env


def moto_s3_config(endpoint: str, **overrides: Any) -> Any:
    """An :class:`~watcherd.config.S3Config` for the local server (path style, our region)."""
    from watcherd.config import S3Config

    values: dict[str, Any] = {"endpoint_url": endpoint, "force_path_style": True,
                              "region": REGION, "max_attempts": 3}
    values.update(overrides)
    return S3Config(**values)


# -- the moto server --------------------------------------------------------------------------------


class _AtomicConditionalWrites:
    """WSGI middleware: one conditional write at a time, like S3's own atomic check-and-put."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        conditional = environ.get("HTTP_IF_MATCH") or environ.get("HTTP_IF_NONE_MATCH")
        if environ["REQUEST_METHOD"] not in ("PUT", "POST") or not conditional:
            return self.app(environ, start_response)
        from werkzeug.wsgi import get_input_stream

        body = get_input_stream(environ).read()
        environ["wsgi.input"] = io.BytesIO(body)
        environ["CONTENT_LENGTH"] = str(len(body))
        environ.pop("HTTP_TRANSFER_ENCODING", None)
        with self.lock:
            result = self.app(environ, start_response)
            try:
                return [b"".join(result)]
            finally:
                if hasattr(result, "close"):
                    result.close()


class MotoS3:
    """moto's server (every AWS service, S3 and STS and IAM included) in a thread of this process."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._host, self._port = host, port
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._clients: dict[tuple[str, str, str], Any] = {}

    def start(self) -> MotoS3:
        from moto.moto_server.werkzeug_app import (
            DomainDispatcherApplication,
            MotoRequestHandler,
            create_backend_app,
        )
        from werkzeug.serving import make_server

        class QuietHandler(MotoRequestHandler):  # type: ignore[misc,valid-type]
            def log_request(self, *args: Any, **kwargs: Any) -> None:
                pass

        app = _AtomicConditionalWrites(DomainDispatcherApplication(create_backend_app))
        self._server = make_server(self._host, self._port, app, threaded=True,
                                   request_handler=QuietHandler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="moto",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> MotoS3:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    @property
    def endpoint(self) -> str:
        host, port = self.address
        return f"http://{host}:{port}"

    def client(self, service: str = "s3", key_id: str = FAKE_KEY_ID,
               secret: str = FAKE_SECRET) -> Any:
        """A plain boto3 client for test setup and inspection (never the code under test)."""
        cache_key = (service, key_id, secret)
        if cache_key not in self._clients:
            import boto3
            from botocore.config import Config

            self._clients[cache_key] = boto3.session.Session().client(
                service, endpoint_url=self.endpoint, region_name=REGION,
                aws_access_key_id=key_id, aws_secret_access_key=secret,
                config=Config(s3={"addressing_style": "path"}, retries={"total_max_attempts": 1}))
        return self._clients[cache_key]

    def new_bucket(self, prefix: str = "t") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:16]}"
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every key in ``bucket`` under ``prefix`` (raw keys, probe objects included)."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                        Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", ()))

    def multipart_uploads(self, bucket: str) -> list[str]:
        resp = self.client().list_multipart_uploads(Bucket=bucket)
        return [u["Key"] for u in resp.get("Uploads", ())]

    # -- auth ------------------------------------------------------------------------------------

    @contextmanager
    def auth(self, free_requests: int = 0) -> Iterator[None]:
        """moto checks signatures and IAM policies inside the block (after ``free_requests``
        unauthenticated ones). Create users and roles before entering it."""
        self._reset_auth(str(free_requests))
        try:
            yield
        finally:
            self._reset_auth("inf")

    def _reset_auth(self, value: str) -> None:
        import urllib.request

        req = urllib.request.Request(f"{self.endpoint}/moto-api/reset-auth",
                                     data=value.encode(), method="POST",
                                     headers={"Content-Type": "text/plain"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            resp.read()

    def iam_user(self, actions: tuple[str, ...] = ("s3:*",), resource: str = "*") -> tuple[str, str]:
        """A new IAM user allowed ``actions``; returns (access key id, secret)."""
        iam = self.client("iam")
        name = f"u-{uuid.uuid4().hex[:12]}"
        iam.create_user(UserName=name)
        iam.put_user_policy(UserName=name, PolicyName="p", PolicyDocument=_policy(actions, resource))
        key = iam.create_access_key(UserName=name)["AccessKey"]
        return key["AccessKeyId"], key["SecretAccessKey"]

    def iam_role(self, actions: tuple[str, ...] = ("s3:*",), resource: str = "*") -> str:
        """A new IAM role allowed ``actions`` that web identities may assume; returns its ARN."""
        iam = self.client("iam")
        name = f"r-{uuid.uuid4().hex[:12]}"
        trust = json.dumps({"Version": "2012-10-17", "Statement": [{
            "Effect": "Allow", "Principal": {"Federated": "oidc"},
            "Action": "sts:AssumeRoleWithWebIdentity"}]})
        arn = iam.create_role(RoleName=name, AssumeRolePolicyDocument=trust)["Role"]["Arn"]
        iam.put_role_policy(RoleName=name, PolicyName="p", PolicyDocument=_policy(actions, resource))
        return str(arn)


def _policy(actions: tuple[str, ...], resource: str) -> str:
    return json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": list(actions), "Resource": resource}]})


# -- the fault proxy --------------------------------------------------------------------------------

#: An action receives the proxy, the client connection and the parsed request, and handles it.
Action = Callable[["FaultProxy", "_Conn", "_Request"], None]


@dataclass
class _Request:
    method: str
    path: str
    head: bytes  # request line + headers, as received
    headers: dict[str, str]  # lower-cased names
    body: bytes = b""


@dataclass
class Rule:
    action: Action
    name: str
    method: str | None
    path: str | None
    times: int
    header: str | None = None
    used: int = 0

    def matches(self, req: _Request) -> bool:
        return (self.used < self.times
                and (self.method is None or req.method == self.method)
                and (self.path is None or self.path in req.path)
                and (self.header is None or self.header.lower() in req.headers))


@dataclass
class Seen:
    method: str
    path: str
    action: str


class _Conn:
    """The client side of one proxied connection, with a byte budget for mid-request resets."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.budget: int | None = None  # reset once this many more bytes were read

    def _fill(self) -> bool:
        data = self.sock.recv(1 << 16)
        if not data:
            return False
        self.buf += data
        return True

    def read_until(self, marker: bytes) -> bytes | None:
        while marker not in self.buf:
            if not self._fill():
                return None
        head, _, self.buf = self.buf.partition(marker)
        return head + marker

    def read_exact(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            if not self.buf and not self._fill():
                raise ConnectionError("client closed mid-body")
            take = min(n - len(out), len(self.buf))
            if self.budget is not None and take >= self.budget:
                raise _Reset
            out += self.buf[:take]
            self.buf = self.buf[take:]
            if self.budget is not None:
                self.budget -= take
        return bytes(out)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reset(self) -> None:
        """Close with a TCP RST, like a middlebox dropping the connection."""
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self.sock.close()


class _Reset(Exception):
    pass


class _Close(Exception):
    pass


class FaultProxy:
    """A threaded loopback HTTP proxy whose behaviour is chosen per request.

    Requests are read whole (answering ``Expect: 100-continue`` itself), matched against the
    rules added with :meth:`fail` in order, and either passed to the upstream server on a fresh
    connection or handed to the first matching rule's action. Every request is recorded in
    :attr:`seen`.
    """

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self._rules: list[Rule] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self.seen: list[Seen] = []

    # -- control ---------------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        self._listener = socket.create_server(("127.0.0.1", 0))
        threading.Thread(target=self._accept, name="fault-proxy", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            for s in list(self._conns):
                try:
                    s.close()
                except OSError:
                    pass

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._listener is not None
        return f"http://127.0.0.1:{self._listener.getsockname()[1]}"

    def fail(self, action: Action, *, method: str | None = None, path: str | None = None,
             header: str | None = None, times: int = 1) -> Rule:
        """Apply ``action`` to the next ``times`` requests with this method whose path contains
        ``path`` (a substring of the path and query, e.g. ``"/bundles/"`` or ``"uploadId="``)
        and that carry the header ``header`` (e.g. ``"If-None-Match"``)."""
        rule = Rule(action, getattr(action, "fault_name", "fault"), method, path, times, header)
        with self._lock:
            self._rules.append(rule)
        return rule

    def clear(self) -> None:
        """Drop all rules (not the record of what was seen)."""
        with self._lock:
            self._rules.clear()

    def faults_applied(self) -> list[Seen]:
        with self._lock:
            return [s for s in self.seen if s.action != "pass"]

    # -- serving ---------------------------------------------------------------------------------

    def _accept(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self._conns.add(sock)
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        conn = _Conn(sock)
        try:
            while not self._stopping.is_set():
                head = conn.read_until(b"\r\n\r\n")
                if head is None:
                    return
                req = _parse_request(head)
                rule = self._match(req)
                with self._lock:
                    self.seen.append(Seen(req.method, req.path, rule.name if rule else "pass"))
                if req.headers.get("expect", "").lower() == "100-continue":
                    conn.send(b"HTTP/1.1 100 Continue\r\n\r\n")
                if rule is not None and getattr(rule.action, "before_body", False):
                    rule.action(self, conn, req)
                    continue
                req.body = _read_body(conn, req.headers)
                if rule is None:
                    self.forward(conn, req)
                else:
                    rule.action(self, conn, req)
        except _Reset:
            conn.reset()
        except (_Close, ConnectionError, OSError):
            pass
        finally:
            with self._lock:
                self._conns.discard(sock)
            try:
                sock.close()
            except OSError:
                pass

    def _match(self, req: _Request) -> Rule | None:
        with self._lock:
            for rule in self._rules:
                if rule.matches(req):
                    rule.used += 1
                    return rule
        return None

    def exchange(self, req: _Request) -> bytes:
        """Send ``req`` upstream on a fresh connection; the whole response, re-framed for a
        keep-alive client."""
        lines = req.head.split(b"\r\n")
        kept = [lines[0]] + [ln for ln in lines[1:] if ln and not ln.lower().startswith(
            (b"expect:", b"connection:", b"transfer-encoding:", b"content-length:"))]
        kept.append(b"Content-Length: " + str(len(req.body)).encode())
        kept.append(b"Connection: close")
        with socket.create_connection(self.upstream, timeout=60) as up:
            up.sendall(b"\r\n".join(kept) + b"\r\n\r\n" + req.body)
            chunks = []
            while data := up.recv(1 << 16):
                chunks.append(data)
        raw = b"".join(chunks)
        head, _, body = raw.partition(b"\r\n\r\n")
        status_line, *header_lines = head.split(b"\r\n")
        status = int(status_line.split()[1])
        headers = [h for h in header_lines if not h.lower().startswith(b"connection:")]
        names = {h.split(b":", 1)[0].strip().lower() for h in headers}
        no_body = req.method == "HEAD" or status in (204, 304) or 100 <= status < 200
        if not no_body and b"content-length" not in names and b"transfer-encoding" not in names:
            headers.append(b"Content-Length: " + str(len(body)).encode())
        return b"\r\n".join([status_line, *headers]) + b"\r\n\r\n" + body

    def forward(self, conn: _Conn, req: _Request) -> None:
        conn.send(self.exchange(req))

    def sleep(self, seconds: float) -> None:
        """Wait, but not past :meth:`stop` (so a test's teardown is never held up)."""
        self._stopping.wait(seconds)


def _parse_request(head: bytes) -> _Request:
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return _Request(method, path, head, headers)


def _read_body(conn: _Conn, headers: dict[str, str]) -> bytes:
    if headers.get("transfer-encoding", "").lower() == "chunked":
        out = bytearray()
        while True:
            size_line = conn.read_until(b"\r\n")
            if size_line is None:
                raise _Close
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                while conn.read_until(b"\r\n") not in (b"\r\n", None):
                    pass  # trailer lines
                return bytes(out)
            out += conn.read_exact(size)
            conn.read_exact(2)
    return conn.read_exact(int(headers.get("content-length", "0") or 0))


# -- fault actions ----------------------------------------------------------------------------------


def _named(name: str, before_body: bool = False) -> Callable[[Action], Action]:
    def deco(fn: Action) -> Action:
        fn.fault_name = name  # type: ignore[attr-defined]
        fn.before_body = before_body  # type: ignore[attr-defined]
        return fn

    return deco


def respond(status: int, code: str, message: str = "injected by the test proxy") -> Action:
    """Answer with an S3 error document (e.g. 503 SlowDown, 500 InternalError) without
    forwarding: the server never sees the request."""

    @_named(f"respond {status} {code}")
    def action(proxy: FaultProxy, conn: _Conn, req: _Request) -> None:
        body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                f"<Message>{message}</Message><RequestId>proxy</RequestId></Error>").encode()
        reason = {500: "Internal Server Error", 503: "Slow Down", 403: "Forbidden"}.get(status, "Error")
        if req.method == "HEAD":
            body = b""
        conn.send(f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\n"
                  f"Content-Length: {len(body)}\r\nx-amz-request-id: proxy\r\n\r\n".encode() + body)

    return action


def reset_request_after(nbytes: int) -> Action:
    """Reset the connection after ``nbytes`` of the request body arrived (mid-upload): the
    server never sees the request."""

    @_named(f"reset request after {nbytes}", before_body=True)
    def action(proxy: FaultProxy, conn: _Conn, req: _Request) -> None:
        conn.budget = nbytes
        _read_body(conn, req.headers)
        raise _Reset  # the body was shorter than the budget

    return action


def reset_response_after(nbytes: int) -> Action:
    """Forward, then send only the first ``nbytes`` of the response and reset (mid-download)."""

    @_named(f"reset response after {nbytes}")
    def action(proxy: FaultProxy, conn: _Conn, req: _Request) -> None:
        response = proxy.exchange(req)
        conn.send(response[:nbytes])
        raise _Reset

    return action


def drop_response() -> Action:
    """Forward (the server acts on the request) but reset instead of answering: a write that
    landed although the client never heard so."""

    @_named("drop response")
    def action(proxy: FaultProxy, conn: _Conn, req: _Request) -> None:
        proxy.exchange(req)
        raise _Reset

    return action


def stall(seconds: float, *, forward: bool = False) -> Action:
    """Hold the request for ``seconds`` (past the client's read timeout), then close. With
    ``forward`` the server acts on it first (the write lands, the answer never comes)."""

    @_named(f"stall {seconds}s" + (" after forwarding" if forward else ""))
    def action(proxy: FaultProxy, conn: _Conn, req: _Request) -> None:
        if forward:
            proxy.exchange(req)
        proxy.sleep(seconds)
        raise _Close

    return action


def strip_conditions() -> Action:
    """Forward without ``If-Match``/``If-None-Match``: a server that ignores them."""

    @_named("strip conditions")
    def action(proxy: FaultProxy, conn: _Conn, req: _Request) -> None:
        lines = req.head.split(b"\r\n")
        req.head = b"\r\n".join(ln for ln in lines
                                 if not ln.lower().startswith((b"if-match:", b"if-none-match:")))
        proxy.forward(conn, req)

    return action


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll ``predicate`` until it holds, or fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


__all__ = ["FAKE_KEY_ID", "FAKE_SECRET", "REGION", "FaultProxy", "MotoS3", "Rule", "Seen",
           "aws_env", "drop_response", "moto_s3_config", "reset_request_after",
           "reset_response_after", "respond", "stall", "strip_conditions", "wait_for"]


def main(argv: list[str] | None = None) -> None:
    """``python tests/s3server.py [--port N]``: serve until killed; prints the endpoint first."""
    import argparse
    import signal

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    server = MotoS3(port=args.port).start()
    print(server.endpoint, flush=True)
    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    assert server._thread is not None
    server._thread.join()


if __name__ == "__main__":
    main()
