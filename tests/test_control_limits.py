"""The control endpoint under abuse: thousands of idle connections, requests that never finish,
large or malformed bodies, a process out of file descriptors. Over real sockets, against a real
:class:`ControlServer` (with a stand-in for the daemon) and against the real daemon, whose
snapshots and uploads must go on whatever the endpoint is sent."""

from __future__ import annotations

import inspect
import os
import re
import resource
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from daemon_fixture import free_port, watcherd  # noqa: F401 (watcherd is a fixture)
from helpers import read_until, wait_for

from watcherd import control
from watcherd.config import ControlConfig
from watcherd.control import MAX_BODY, MAX_CONNECTIONS, ControlServer

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux /proc, inotify")


class FakeDaemon:
    """What the endpoint calls (:class:`watcherd.control.DaemonAPI`), without a daemon."""

    def __init__(self) -> None:
        self.activities = 0

    def healthy(self) -> tuple[bool, str]:
        return True, "ok"

    def status(self) -> dict[str, Any]:
        return {"state": "idle", "detail": "x" * 8_000_000}  # more than socket buffers hold

    def activity(self) -> None:
        self.activities += 1

    async def snapshot_now(self) -> dict[str, Any]:
        return {"status": "unchanged", "generation": 1}


def call(fn: Any, *args: Any) -> Any:
    """The daemon's portal.call: here, a plain call (or an event loop for the async one)."""
    return anyio.run(fn, *args) if inspect.iscoroutinefunction(fn) else fn(*args)


@pytest.fixture
def server(monkeypatch) -> Iterator[ControlServer]:
    monkeypatch.setattr(control, "READ_TIMEOUT", 0.5)  # the tests wait for it to pass
    srv = ControlServer(ControlConfig(listen=f"127.0.0.1:{free_port()}"), FakeDaemon(), call)
    srv.start()
    yield srv
    srv.close()


def connect(srv: ControlServer) -> socket.socket:
    return socket.create_connection(("127.0.0.1", srv.port), timeout=10)


def exchange(srv: ControlServer, request: bytes) -> bytes:
    """Send ``request`` and read until the server closes the connection."""
    with connect(srv) as sock:
        sock.sendall(request)
        return read_all(sock)


def read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def get(srv: ControlServer, path: str) -> int:
    return code(exchange(srv, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                              .encode()))


def post(length: str, body: bytes = b"", *, extra: str = "") -> bytes:
    return (f"POST /activity HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n{extra}\r\n"
            .encode() + body)


def code(answer: bytes) -> int:
    """The status code of an HTTP answer (0 for none)."""
    return int(answer.split(b" ", 2)[1]) if answer else 0


def closes_connection(answer: bytes) -> bool:
    return b"\r\nConnection: close\r\n" in answer.split(b"\r\n\r\n", 1)[0] + b"\r\n"


# -- connections -------------------------------------------------------------------------------------


def test_connections_beyond_the_limit_get_a_503_at_once_and_threads_stay_bounded(server):
    before = threading.active_count()
    held = [connect(server) for _ in range(MAX_CONNECTIONS)]
    try:
        wait_for(lambda: threading.active_count() >= before + MAX_CONNECTIONS,
                 message="a thread for each connection within the limit")
        for _ in range(200):
            with connect(server) as extra:
                answer = read_all(extra)  # answered and closed at once, without a request
            assert code(answer) == 503
            assert closes_connection(answer)
        assert threading.active_count() <= before + MAX_CONNECTIONS
    finally:
        for sock in held:
            sock.close()
    # The idle ones time out and give their places back.
    wait_for(lambda: get(server, "/healthz") == 200, message="the endpoint to serve again")


@pytest.mark.parametrize("sent", [b"", b"GET /status HTTP/1.1\r\nHost: x\r\n"],
                         ids=["nothing", "half the headers"])
def test_a_client_that_stops_sending_is_dropped_after_the_read_timeout(server, sent):
    with connect(server) as sock:
        sock.sendall(sent)
        started = time.monotonic()
        assert read_all(sock) == b""  # closed by the server, within the socket's 10s
        assert time.monotonic() - started >= control.READ_TIMEOUT * 0.8


def test_a_client_that_does_not_read_its_answer_is_dropped(server):
    before = threading.active_count()
    with connect(server) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n")
        wait_for(lambda: threading.active_count() > before, message="a thread serving it")
        assert get(server, "/healthz") == 200  # others are served meanwhile
        # The answer (8 MB) does not fit in the socket buffers: the writer gives up.
        wait_for(lambda: threading.active_count() == before, timeout=10,
                 message="the stuck writer's thread to end")


# -- bodies ------------------------------------------------------------------------------------------


def test_a_body_above_64_KiB_is_refused_with_413_and_the_connection_closed(server):
    answer = exchange(server, post(str(MAX_BODY + 1)))
    assert code(answer) == 413
    assert closes_connection(answer)
    assert server.api.activities == 0


def test_a_body_of_64_KiB_is_read_and_the_request_served(server):
    answer = exchange(server, post(str(MAX_BODY), b"x" * MAX_BODY, extra="Connection: close\r\n"))
    assert code(answer) == 204
    assert server.api.activities == 1


@pytest.mark.parametrize("length", ["-1", "abc", "1e3", "0x10", "12 12", "", "9" * 30])
def test_a_negative_or_non_numeric_content_length_is_400_and_the_connection_closed(server, length):
    answer = exchange(server, post(length))
    assert code(answer) == 400
    assert closes_connection(answer)
    assert server.api.activities == 0


def test_two_content_lengths_or_a_chunked_body_are_refused_and_the_connection_closed(server):
    two = exchange(server, post("0", extra="Content-Length: 5\r\n"))
    assert code(two) == 400 and closes_connection(two)
    chunked = exchange(server, b"POST /activity HTTP/1.1\r\nHost: x\r\n"
                               b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    assert code(chunked) == 411 and closes_connection(chunked)
    assert server.api.activities == 0


def test_malformed_requests_print_no_traceback_and_the_endpoint_keeps_serving(server, capfd):
    for request in (post("abc"), post("-5"), b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
                    b"GET / HTTP/1.1\r\nX: " + b"y" * 70_000 + b"\r\n\r\n",
                    b"GET /status HTTP/1.1\r\n" + b"X: y\r\n" * 200 + b"\r\n",
                    b"BREW /pot HTTP/1.1\r\n\r\n", b"GET\r\n\r\n"):
        exchange(server, request)
    with connect(server) as sock:  # a client that resets while its (large) answer is written
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.sendall(b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n")
    assert get(server, "/healthz") == 200
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err and "Exception" not in out + err, out + err


# -- file descriptors --------------------------------------------------------------------------------

# A process at its descriptor limit: the endpoint's accept() fails with EMFILE until the test
# lets the filler descriptors go.
_OUT_OF_FILES = """
import os, resource, sys
from watcherd import log
from watcherd.config import ControlConfig
from watcherd.control import ControlServer

class Api:
    def healthy(self):
        return True, "ok"

log.configure("info", "json", stream=sys.stdout)
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
server = ControlServer(ControlConfig(listen=sys.argv[1]), Api(), lambda fn, *args: fn(*args))
server.start()
filler = []
try:
    while True:
        filler.append(os.open(os.devnull, os.O_RDONLY))
except OSError:
    pass
print('{"event": "test.full"}', flush=True)
sys.stdin.readline()
for fd in filler:
    os.close(fd)
sys.stdin.readline()
server.close()
"""


def test_running_out_of_descriptors_on_accept_is_logged_once_and_serving_resumes(tmp_path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", _OUT_OF_FILES, f"127.0.0.1:{port}"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = proc.stdout.fileno()
    try:
        seen = read_until(out, b'"test.full"', timeout=20)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            seen += read_until(out, b'"control.out_of_files"')
            proc.stdin.write(b"free them\n")
            proc.stdin.flush()
            answer = read_all(sock)
        seen += read_until(out, b'"control.accepting_again"')
        proc.stdin.write(b"stop\n")
        proc.stdin.close()
        assert proc.wait(timeout=20) == 0
        seen += proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        proc.stdout.close()
        err = proc.stderr.read().decode()
        proc.stderr.close()
    assert answer.startswith(b"HTTP/1.1 200 OK") and answer.endswith(b"ok\n")
    assert seen.count(b'"control.out_of_files"') == 1, seen
    assert "Traceback" not in err, err


def test_the_daemon_under_a_1024_descriptor_limit_keeps_saving_with_3000_idle_connections(
        watcherd):
    connections = 3000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < connections + 200:
        pytest.skip(f"this test needs {connections + 200} descriptors; the hard limit is {hard}")

    def limited() -> None:  # in the daemon's process, before watcherd starts
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))

    d = watcherd().start(popen={"preexec_fn": limited})
    d.settle()
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, connections + 200), hard))
    idle: list[socket.socket] = []
    try:
        for _ in range(connections):
            idle.append(socket.create_connection(("127.0.0.1", d.port), timeout=10))
        status = Path(f"/proc/{d.pid}/status").read_text()
        assert int(re.search(r"^Threads:\s+(\d+)", status, re.MULTILINE).group(1)) \
            < MAX_CONNECTIONS + 30
        assert len(os.listdir(f"/proc/{d.pid}/fd")) < MAX_CONNECTIONS + 100
        mark = d.log.mark()
        (d.workspace / "src" / "app.py").write_text("print('saved under a flood')\n")
        saved = d.log.wait("generation.saved", after=mark, timeout=30)
    finally:
        for sock in idle:
            sock.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert d.stop() == 0
    assert d.manifest()["generation"] == saved["generation"]
    assert d.show("src/app.py", d.manifest()["snapshot"]) == "print('saved under a flood')"
    assert not d.log.events("snapshot.failed") and not d.log.events("daemon.crashed")
