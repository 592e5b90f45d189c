"""The systemd notify protocol, as systemd sees it: datagrams on ``NOTIFY_SOCKET``.

The unit tests check the Notifier alone; the end-to-end ones run the real daemon with
``NOTIFY_SOCKET`` pointing at a datagram socket the test holds (a path, and an abstract name).
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_fixture import SNAPSHOT_REF, inotify_watches, watcherd  # noqa: F401 (fixture)
from helpers import wait_for
from structlog.testing import capture_logs

from watcherd.notify import Notifier

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="systemd is Linux-only")


class FakeSystemd:
    """A datagram socket that records what arrives, with the time and the sender's watches."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, list[str]]] = []
        self.watches_at_ready: int | None = None
        self.pid: int | None = None  # set when the daemon starts, for the READY check
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = data.decode().split("\n")
            if "READY=1" in fields and self.pid is not None:
                self.watches_at_ready = inotify_watches(self.pid)
            self.messages.append((time.monotonic(), fields))

    def with_field(self, field: str) -> list[float]:
        return [t for t, fields in list(self.messages) if field in fields]

    def fields(self) -> list[str]:
        return [f for _, fields in list(self.messages) for f in fields]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def systemd_socket(tmp_path: Path) -> Iterator[tuple[str, FakeSystemd]]:
    path = tmp_path / "notify.sock"
    fake = FakeSystemd(str(path))
    yield str(path), fake
    fake.close()


@pytest.fixture
def abstract_systemd_socket() -> Iterator[tuple[str, FakeSystemd]]:
    name = f"watcherd-test-{uuid.uuid4().hex}"
    fake = FakeSystemd("\0" + name)
    yield "@" + name, fake
    fake.close()


# -- the Notifier alone ------------------------------------------------------------------------------


def test_without_notify_socket_nothing_is_sent_and_no_watchdog_is_asked() -> None:
    n = Notifier({})
    assert not n.enabled and n.watchdog_interval is None
    n.ready("watching")  # must not fail
    n.close()


def test_watchdog_interval_is_half_of_watchdog_usec_and_only_for_this_pid() -> None:
    assert Notifier({"WATCHDOG_USEC": "400000"}).watchdog_interval == pytest.approx(0.2)
    mine = {"WATCHDOG_USEC": "400000", "WATCHDOG_PID": str(os.getpid())}
    assert Notifier(mine).watchdog_interval == pytest.approx(0.2)
    assert Notifier({"WATCHDOG_USEC": "400000", "WATCHDOG_PID": "1"}).watchdog_interval is None
    assert Notifier({"WATCHDOG_USEC": "0"}).watchdog_interval is None
    assert Notifier({"WATCHDOG_USEC": "soon"}).watchdog_interval is None


def test_notifier_sends_one_datagram_per_call_to_a_path_and_an_abstract_name(
        systemd_socket, abstract_systemd_socket) -> None:
    for address, fake in (systemd_socket, abstract_systemd_socket):
        n = Notifier({"NOTIFY_SOCKET": address})
        n.ready("watching 3 directories")
        n.stopping("final save")
        n.extend_timeout(25)
        wait_for(lambda f=fake: len(f.messages) == 3, timeout=5, message=f"3 datagrams on {address}")
        n.close()
        assert [fields for _, fields in fake.messages] == [
            ["READY=1", "STATUS=watching 3 directories"],
            ["STOPPING=1", "STATUS=final save"],
            ["EXTEND_TIMEOUT_USEC=25000000"],
        ]


def test_a_vanished_notify_socket_is_logged_not_fatal(tmp_path: Path) -> None:
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    with capture_logs() as logs:
        n.watchdog()  # ENOENT: warned about, never raised
    n.close()
    assert [(e["event"], e["fields"]) for e in logs] == [("notify.failed", ["WATCHDOG=1"])]


# -- the daemon under a fake systemd -----------------------------------------------------------------


def _run_under(watcherd, address: str, fake: FakeSystemd):
    d = watcherd()
    env = {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "400000"}
    d.start(env=env, wait_ready=False)
    fake.pid = d.pid
    return d


def test_daemon_is_ready_only_once_watching_pings_the_watchdog_and_says_stopping(
        watcherd, systemd_socket) -> None:
    address, fake = systemd_socket
    d = _run_under(watcherd, address, fake)
    wait_for(lambda: fake.with_field("READY=1"), timeout=20, message="READY=1")
    assert fake.watches_at_ready and fake.watches_at_ready > 0
    d.log.wait("daemon.ready", timeout=5)
    assert len(fake.with_field("READY=1")) == 1
    # WATCHDOG_USEC=400000: a ping at least every 200ms, for as long as it runs.
    ready_at = fake.with_field("READY=1")[0]
    pings = wait_for(lambda: len(p := [t for t in fake.with_field("WATCHDOG=1") if t > ready_at])
                     >= 5 and p, timeout=5, message="5 watchdog pings")
    assert max(b - a for a, b in zip(pings, pings[1:])) < 0.4

    d.signal(signal.SIGTERM)
    assert d.wait_exit(timeout=10) == 0
    fields = fake.fields()
    assert "STOPPING=1" in fields
    assert any(f.startswith("EXTEND_TIMEOUT_USEC=") for f in fields)
    assert fields.index("STOPPING=1") > fields.index("READY=1")


def test_daemon_notifies_an_abstract_socket(watcherd, abstract_systemd_socket) -> None:
    address, fake = abstract_systemd_socket
    d = _run_under(watcherd, address, fake)
    wait_for(lambda: fake.with_field("READY=1"), timeout=20, message="READY=1")
    wait_for(lambda: fake.with_field("WATCHDOG=1"), timeout=5, message="a watchdog ping")
    assert d.stop() == 0
    assert "STOPPING=1" in fake.fields()
    assert not d.log.events("notify.failed")


def test_sigterm_the_moment_ready_arrives_still_gets_the_final_save(watcherd, tmp_path) -> None:
    # Edits made while no daemon ran are only saved by the startup snapshot; a stop right after
    # READY (a pod deleted just after a restart) must not skip it.
    fake_address = str(tmp_path / "notify.sock")
    fake = FakeSystemd(fake_address)
    try:
        d = watcherd()
        (d.workspace / "made-while-down.txt").write_text("not yet saved\n")
        d.start(env={"NOTIFY_SOCKET": fake_address}, wait_ready=False)
        fake.pid = d.pid
        wait_for(lambda: fake.with_field("READY=1"), timeout=20, message="READY=1")
        d.signal(signal.SIGTERM)
        assert d.wait_exit(timeout=15) == 0
    finally:
        fake.close()
    assert d.log.events("daemon.stopping")
    assert d.show("made-while-down.txt") == "not yet saved"
    assert d.manifest()["snapshot"] == d.git("rev-parse", SNAPSHOT_REF)
