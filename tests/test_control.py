"""The control endpoint and ``watcherd status`` against the real daemon process."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time

import pytest
from daemon_fixture import (  # noqa: F401 (watcherd is a fixture)
    free_port,
    holds_for,
    run_cli,
    watcherd,
    write_config,
)
from helpers import wait_for

from watcherd.config import ControlConfig
from watcherd.control import ControlClient, DaemonNotRunning
from watcherd.errors import WatcherdError

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify is Linux-only")

TOKEN = "0123456789abcdef-test-token"


def test_status_and_metrics_report_unsaved_changes_then_the_saved_generation(watcherd) -> None:
    d = watcherd().start()
    d.settle()
    mark = d.log.mark()
    (d.workspace / "src" / "app.py").write_text("print('unsaved')\n")
    s = wait_for(lambda: (s := d.status())["state"] in ("changing", "dirty") and s,
                 message="the edit to show in /status")
    assert s["dirty_since"] and s["oldest_unsaved_change_age_ms"] >= 0 and not s["idle"]
    assert d.metrics()["watcherd_idle"] == 0

    saved = d.log.wait("generation.saved", after=mark, timeout=10)
    s = d.settle()
    m = d.manifest()
    assert s["last_upload"]["generation"] == m["generation"] == saved["generation"] == 2
    assert s["last_upload"]["snapshot"] == m["snapshot"] == s["last_snapshot"]["commit"]
    assert s["dirty_since"] is None and s["oldest_unsaved_change_age_ms"] is None
    assert s["pid"] == d.pid and s["store"]["key"] == d.key

    metrics = d.metrics()
    assert metrics["watcherd_uploads_total"] == s["counters"]["uploads"] == 2
    assert metrics["watcherd_generation"] == m["generation"]
    assert metrics["watcherd_snapshots_total"] == len(d.snapshots()) == 2
    assert metrics["watcherd_uploaded_bytes_total"] == s["counters"]["uploaded_bytes"] > 0
    assert metrics["watcherd_watches"] == d.watches() == s["watches"]
    assert metrics["watcherd_idle"] == 1 and metrics["watcherd_unsaved_change_age_seconds"] == 0
    assert abs(metrics["watcherd_last_upload_timestamp_seconds"] - time.time()) < 30


def test_status_is_never_idle_with_nothing_unread_between_a_write_and_its_upload(
        watcherd) -> None:
    # What a caller that must know a write was saved waits for (the suite's settle() does):
    # "idle" with no event unread. Asked any time after a write returned, it is never said before
    # that write is in the store. The watcher's read is held here (a FIFO .gitignore stalls git
    # check-ignore for seconds): the window in which the events were queued but not acted on.
    d = watcherd().start()
    d.settle()
    (d.workspace / "sub").mkdir()
    os.mkfifo(d.workspace / "sub" / ".gitignore")
    (d.workspace / "sub" / "held.txt").write_text("classified slowly\n")
    (d.workspace / "important.txt").write_text("the user's edit\n")
    samples = []

    def uploaded() -> bool:
        # The manifest read after the status: a status given after the upload finds it there.
        s = d.status()
        m = d.manifest()
        samples.append((s["state"], s["events_unread"],
                        bool(m and d.shown("important.txt", m["snapshot"]))))
        return samples[-1][2]

    wait_for(uploaded, timeout=20, interval=0.02, message="the edit uploaded")
    assert len(samples) > 5
    assert any(unread for _, unread, _ in samples)
    assert [s for s in samples if s[0] == "idle" and not s[1] and not s[2]] == []
    assert d.settle()["state"] == "idle"
    assert d.stop() == 0


def test_writes_to_an_ignored_file_are_no_activity_to_the_status(watcherd) -> None:
    # A dev server logging into an ignored file: its writes never turn the state or idle, which
    # a platform reads to recycle idle pods; only events_unread tells they are being judged.
    d = watcherd().start()
    before = d.settle()
    stop = threading.Event()

    def log() -> None:
        with open(d.workspace / "dev-server.log", "a") as f:
            while not stop.is_set():
                f.write("GET / 200\n")
                f.flush()
                time.sleep(0.005)

    writer = threading.Thread(target=log)
    writer.start()
    try:
        holds_for(lambda: (s := d.status())["state"] == "idle" and s["idle"]
                  and s["last_activity_at"] == before["last_activity_at"], 2.0,
                  "writes to an ignored log turned the status", interval=0.01)
    finally:
        stop.set()
        writer.join()
    assert d.stop() == 0


def test_status_command_prints_the_daemon_state_then_exits_1_when_none_answers(watcherd) -> None:
    d = watcherd().start()
    d.settle()
    human = run_cli(d.config, "status")
    assert human.returncode == 0, human.stderr
    assert f"pid {d.pid}" in human.stdout and "state:          idle\n" in human.stdout
    assert "generation 1" in human.stdout
    raw = run_cli(d.config, "status", "--json")
    assert raw.returncode == 0, raw.stderr
    assert json.loads(raw.stdout)["pid"] == d.pid

    assert d.stop() == 0
    gone = run_cli(d.config, "status")
    assert gone.returncode == 1
    assert gone.stdout == ""
    assert len(gone.stderr.strip().splitlines()) == 1
    assert f"no watcherd answers on http://127.0.0.1:{d.port}" in gone.stderr


def test_post_activity_postpones_idle(watcherd) -> None:
    # idle_timeout 2s: a signal every 300ms keeps it away even on a loaded machine, where one
    # round trip (POST, then GET /status) can take several hundred milliseconds.
    d = watcherd(watch={"idle_timeout": "2s"}).start()
    d.settle()
    mark = d.log.mark()
    (d.workspace / "src" / "app.py").write_text("print('the user is still here')\n")
    d.log.wait("snapshot.committed", after=mark, timeout=5)
    last = [0.0]

    def still_active() -> bool:
        code, _ = d.post("/activity")
        last[0] = time.monotonic()
        s = d.status()
        return code == 204 and not s["idle"] and s["state"] == "dirty" \
            and not d.log.events("generation.saved", after=mark)

    # Signals every 300ms for twice idle_timeout: without them the upload would come after 2s.
    holds_for(still_active, 4.0, "uploaded while the user was active", interval=0.3)
    saved = d.log.wait("generation.saved", after=mark, timeout=8)
    assert saved["_t"] - last[0] >= 1.9


def test_post_snapshot_returns_the_new_generation_then_unchanged(watcherd) -> None:
    d = watcherd().start()
    d.settle()
    (d.workspace / "src" / "app.py").write_text("print('save me now')\n")
    code, result = d.post("/snapshot")
    assert code == 200, result
    assert result["status"] == "saved" and result["generation"] == d.generation() == 2
    assert result["snapshot"] == d.snapshots()[0] == d.manifest()["snapshot"]
    assert d.show("src/app.py", result["snapshot"]) == "print('save me now')"

    code, again = d.post("/snapshot")
    assert (code, again["status"], again["generation"]) == (200, "unchanged", 2)
    assert d.generation() == 2


def test_post_snapshot_during_continuous_edits_saves_everything_written_before_it(
        watcherd) -> None:
    # Snapshots of the ongoing edits end while each save runs; every answer is still its save's.
    d = watcherd()
    # Editors' swap files are ignored, as templates do (a swap file vanishing under `git add` is
    # a separate matter, see snapshot._add_all).
    with (d.workspace / ".gitignore").open("a") as f:
        f.write("*.swp\n")
    d.start()
    d.settle()
    target = d.workspace / "src" / "app.py"
    written = [0]
    stop = threading.Event()

    def editor() -> None:  # saves like an editor does: a temp file renamed over the old one
        while not stop.is_set():
            temp = target.with_name(".app.py.swp")
            temp.write_text(f"version {written[0] + 1}\n")
            os.replace(temp, target)
            written[0] += 1
            stop.wait(0.05)

    thread = threading.Thread(target=editor)
    thread.start()
    try:
        for _ in range(8):
            before = written[0]
            code, result = d.post("/snapshot")
            # "unchanged": the editor had written nothing since the previous save.
            assert code == 200 and result["status"] in ("saved", "unchanged"), result
            m = d.manifest()
            stored = {g["generation"]: g["snapshot"] for g in [m, *m["history"]]}
            snapshot = stored[result["generation"]]
            assert result.get("snapshot", snapshot) == snapshot
            assert int(d.show("src/app.py", snapshot).split()[1]) >= before
    finally:
        stop.set()
        thread.join()


def test_unknown_endpoint_is_404_and_healthz_is_ok(watcherd) -> None:
    d = watcherd().start()
    assert d.request("GET", "/healthz") == (200, b"ok\n")
    code, body = d.request("GET", "/nope")
    assert code == 404 and "no such endpoint" in json.loads(body)["error"]
    assert d.request("POST", "/nope")[0] == 404


def test_a_non_loopback_listen_requires_the_bearer_token(watcherd) -> None:
    port = free_port()
    d = watcherd(listen=f"0.0.0.0:{port}", token=TOKEN).start()
    for method, path in (("GET", "/status"), ("GET", "/metrics"), ("POST", "/activity"),
                         ("POST", "/snapshot")):
        assert d.request(method, path, token="")[0] == 401, path
        assert d.request(method, path, token="wrong-token-0123456789")[0] == 401, path
    assert d.request("GET", "/healthz", token="")[0] == 200
    assert d.request("GET", "/status")[0] == 200
    assert d.request("GET", "/metrics")[0] == 200
    assert d.request("POST", "/activity")[0] == 204
    status = run_cli(d.config, "status")  # the CLI sends the configured token
    assert status.returncode == 0, status.stderr
    wrong = write_config(d.base / "wrong-token.toml", workspace=d.workspace, store=d.store,
                         key=d.key, listen=d.listen, token="not-the-token-0123456789")
    refused = run_cli(wrong, "status")
    assert refused.returncode == 2 and refused.stdout == ""
    assert len(refused.stderr.strip().splitlines()) == 1
    assert "HTTP 401" in refused.stderr and "control.token" in refused.stderr
    assert d.stop() == 0
    assert all(TOKEN not in json.dumps(line) for line in d.log.lines)


def test_a_port_in_use_is_a_one_line_error_and_exit_1(watcherd) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        d = watcherd(listen=f"127.0.0.1:{taken.getsockname()[1]}")
        d.start(wait_ready=False)
        assert d.wait_exit(timeout=20) == 1
    stderr = d.runs[-1][1].read_text()
    assert len(stderr.strip().splitlines()) == 1 and "cannot listen" in stderr
    assert not d.log.events("daemon.ready")


def test_a_daemon_that_takes_the_request_but_does_not_answer_is_not_reported_as_absent(
        watcherd) -> None:
    # `watcherd snapshot` goes standalone only when no daemon runs: a stuck one must not count.
    d = watcherd().start()
    client = ControlClient(ControlConfig(listen=d.listen), timeout=0.5)
    assert client.status()["pid"] == d.pid
    d.signal(signal.SIGSTOP)  # the kernel still accepts connections; nobody answers them
    try:
        with pytest.raises(WatcherdError, match="did not answer within 0.5s") as info:
            client.status()
        assert not isinstance(info.value, DaemonNotRunning)
    finally:
        d.signal(signal.SIGCONT)
    assert d.stop() == 0
    with pytest.raises(DaemonNotRunning, match="no watcherd answers"):
        client.status()


def test_status_text_shows_an_upload_whose_size_is_unknown() -> None:
    # After a lost answer the daemon learns of its generation from the store, without its size.
    from watcherd.cli.status_cmd import render

    text = render({"state": "idle", "idle": True, "watches": 3,
                   "last_upload": {"at": "2026-11-26T10:00:00Z", "generation": 4, "bytes": None}})
    assert "last upload:    generation 4 at 2026-11-26T10:00:00Z" in text
