"""The watch backends as the daemon uses them: which one runs, the watchdog bridge's bound, and
an `npm install`-like storm under node_modules/ against each, in the library and in the real
``watcherd run``.

The behaviour of each backend, event by event, is ``test_watch.py``'s; its helpers serve here too.
"""

from __future__ import annotations

import select
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import structlog
import test_watch as tw
from daemon_fixture import make_workspace, run_cli, watcherd  # noqa: F401  (a fixture)
from helpers import wait_for

import watcherd as watcherd_package
from watcherd import watch
from watcherd.errors import ConfigError
from watcherd.watch import Batch, Choice

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="the inotify backend, the default here, is Linux-only")

# An `npm install`: files created in many directories under node_modules/, a fifth removed.
_STORM = """
import os, sys, time
root, n = sys.argv[1], int(sys.argv[2])
for i in range(n):
    d = os.path.join(root, "node_modules", f"pkg{i % 200}", "lib")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"m{i}.js"), "w") as f:
        f.write("module.exports = 1\\n")
    if i % 5 == 4:
        os.unlink(os.path.join(root, "node_modules", f"pkg{(i - 2) % 200}", "lib", f"m{i - 2}.js"))
"""


def storm(root: Path, files: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _STORM, str(root), str(files)])


# -- which backend ---------------------------------------------------------------------------------

def test_auto_is_inotify_on_linux_and_watchdog_elsewhere() -> None:
    assert watch.choose("auto", "linux") == Choice("inotify", "auto: Linux")
    assert watch.choose("auto", "darwin") == Choice("watchdog", "auto: no inotify on darwin")
    assert watch.choose("watchdog", "linux") == Choice("watchdog", "watch.backend = 'watchdog'")
    assert watch.choose("inotify", "linux") == Choice("inotify", "watch.backend = 'inotify'")


def test_the_watchdog_backend_without_its_extra_is_a_config_error_saying_what_to_install(
        monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "watchdog" or m.startswith("watchdog.")]:
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed (imported earlier)
    monkeypatch.setitem(sys.modules, "watchdog", None)
    monkeypatch.delitem(sys.modules, "watcherd.watch_watchdog", raising=False)
    monkeypatch.delattr(watcherd_package, "watch_watchdog", raising=False)  # imported earlier
    with pytest.raises(ConfigError, match=r"pip install 'watcherd\[watchdog\]'") as info:
        watch.watchdog_backend()
    assert ConfigError.exit_status == 2 and "watch.backend" in str(info.value)


@pytest.mark.parametrize(("setting", "line"), [
    ("auto", "# watching: inotify (auto: Linux)"),
    pytest.param("watchdog", "# watching: watchdog (watch.backend = 'watchdog'; InotifyObserver, "
                             "a schedule per directory git would not ignore)", marks=tw.NO_WATCHDOG),
])
def test_config_check_says_which_backend_runs_and_why(watcherd, setting: str,  # noqa: F811
                                                      line: str) -> None:
    d = watcherd(watch={"backend": setting})
    proc = run_cli(d.config, "config", "check")
    assert proc.returncode == 0, proc.stderr
    assert line in proc.stdout.splitlines()
    assert f'backend = "{setting}"' in proc.stdout


# -- the watchdog bridge ---------------------------------------------------------------------------

@pytest.mark.parametrize("backend", tw.BACKENDS[1:])
def test_a_full_bridge_drops_what_it_holds_and_the_next_read_is_a_rescan(
        tmp_path: Path, backend: str) -> None:
    root = make_workspace(tmp_path / "ws")
    with tw.watcher_of(root, backend, queue_limit=20) as w:
        for i in range(100):  # a burst in a watched directory, more than the bridge holds
            (root / "src" / f"f{i}.js").write_text("x")
        with structlog.testing.capture_logs() as logs:
            batches = tw.read_until(w, lambda bs: any("queue overflow" in b.rescan for b in bs))
        assert all(b.relevant for b in batches)
        events = [e["event"] for e in logs]
        assert "watch.overflow" in events and "watch.rescan" in events  # a re-walk followed
        # Once the burst has passed (its rest may overflow the bridge again), events get through.
        for attempt in range(50):
            (root / "src" / "after.js").write_text(str(attempt))
            if "src/after.js" in tw.paths(tw.read_until(w, bool)):
                break
        else:
            raise AssertionError("src/after.js never reported after the overflow")


# -- storms under an ignored tree ------------------------------------------------------------------

@pytest.mark.parametrize("backend", tw.BACKENDS[:3])
def test_a_storm_under_node_modules_is_not_seen_and_an_edit_during_it_is(
        tmp_path: Path, backend: str) -> None:
    root = make_workspace(tmp_path / "ws")
    (root / "marker.txt").write_text("0")
    with tw.watcher_of(root, backend) as w:
        count = w.watch_count
        longest = 0.0
        got: list[Batch] = []
        proc = storm(root, 20_000)
        try:
            wait_for(lambda: (root / "node_modules" / "pkg199").exists(), message="the storm")
            (root / "src" / "app.py").write_text("edited during the storm\n")
            deadline = time.monotonic() + 60
            while proc.poll() is None or "src/app.py" not in tw.paths(got):
                assert time.monotonic() < deadline, f"the edit not seen; got {got}"
                select.select([w.fileno()], [], [], 0.1)  # as the daemon waits
                t0 = time.perf_counter()
                batch = w.read()
                longest = max(longest, time.perf_counter() - t0)
                if batch != Batch():
                    got.append(batch)
        finally:
            proc.wait(60)
        got += tw.barrier(w, root)
        assert tw.news(got) == {"src/app.py"}
        assert not any(b.rescan for b in got)
        assert w.watch_count == count
        assert longest < 1.0, f"a read took {longest:.2f}s"


@pytest.mark.parametrize("backend", tw.BACKENDS[:2])
def test_a_storm_neither_wakes_nor_slows_the_daemon_and_an_edit_during_it_is_saved(
        watcherd, backend: str) -> None:  # noqa: F811
    d = watcherd(watch={"backend": backend}).start()
    ready = d.log.wait("watch.ready")
    assert ready["backend"] == backend
    d.settle()
    mark = d.log.mark()
    proc = storm(d.workspace, 30_000)
    answers: list[float] = []

    def ask_while_it_storms() -> None:
        while proc.poll() is None:
            t0 = time.perf_counter()
            d.status()
            answers.append(time.perf_counter() - t0)

    asker = threading.Thread(target=ask_while_it_storms)
    asker.start()
    try:
        wait_for(lambda: (d.workspace / "node_modules" / "pkg199").exists(), message="the storm")
        (d.workspace / "src" / "app.py").write_text("print('edited during the storm')\n")
        edited = time.monotonic()
        d.log.wait("snapshot.committed", after=mark, timeout=20)
        saved_after = time.monotonic() - edited
    finally:
        proc.wait(120)
        asker.join()
    assert d.show("src/app.py") == "print('edited during the storm')"
    assert saved_after < 5.0, f"snapshotted {saved_after:.1f}s after the edit"
    assert answers and max(answers) < 2.0, f"status took up to {max(answers):.1f}s"
    # Nothing of the storm was activity: one snapshot, for the edit; no rescan, no change event
    # naming node_modules/.
    d.settle()
    assert len(d.log.events("snapshot.committed", after=mark)) == 1
    assert d.status()["counters"]["rescans"] == 0
    assert not any(p.startswith("node_modules/") for e in d.log.events("watch.change", after=mark)
                   for p in e.get("paths", []))
