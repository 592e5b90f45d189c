"""``watcherd run`` end to end: the real process, real files, real git, real signals, a local store.

Timings are short (quiet 200ms, max commit delay 1s, idle 1s; see ``daemon_fixture.FAST``). Tests
wait for a log line, a status or a file with a deadline; a negative ("nothing happened") is held for
a window and then closed by a barrier the daemon must see.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from daemon_fixture import SNAPSHOT_REF, Daemon, holds_for, watcherd  # noqa: F401 (fixture)
from helpers import git, tree_state, wait_for

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify is Linux-only")


def snapshot_files(d: Daemon, commit: str = SNAPSHOT_REF) -> set[str]:
    """The files in a snapshot; empty before the first one."""
    if commit == SNAPSHOT_REF and not d.snapshots():
        return set()
    return set(d.git("ls-tree", "-r", "--name-only", commit).splitlines())


def parents(d: Daemon, commit: str) -> list[str]:
    return d.git("rev-list", "--parents", "-n", "1", commit).split()[1:]


def restored_equals_workspace(d: Daemon, target: Path) -> None:
    target.mkdir()
    d.restore_into(target)
    assert tree_state(target) == tree_state(d.workspace)
    assert git(target, "rev-parse", "HEAD") == git(d.workspace, "rev-parse", "HEAD")


# -- snapshots ---------------------------------------------------------------------------------------


def test_an_edit_is_snapshotted_one_quiet_period_after_it(watcherd) -> None:
    d = watcherd().start()
    d.log.wait("snapshot.committed")  # the start-up snapshot of the template
    mark = d.log.mark()
    t0 = time.monotonic()
    (d.workspace / "src" / "app.py").write_text("print('edited')\n")
    line = d.log.wait("snapshot.committed", after=mark, timeout=5)
    assert 0.2 <= line["_t"] - t0 < 0.2 + 1.5
    assert line["commit"] == d.snapshots()[0]
    assert line["paths"] == ["src/app.py"]
    assert d.show("src/app.py") == "print('edited')"


def test_the_log_says_what_the_daemon_starts_from_and_when_each_upload_is_due(watcherd) -> None:
    # "Why no upload yet?" is answered by the log alone: the start names the stored generation,
    # the config and the timings; every snapshot says when its upload is due.
    first = watcherd().start()
    first.settle()
    stored = first.generation()
    assert first.stop() == 0
    d = first.start()
    ready = d.log.wait("daemon.ready")
    assert ready["generation"] == stored and ready["config"] == str(d.config)
    assert ready["timings"]["quiet_period_s"] > 0 and ready["timings"]["idle_timeout_s"] > 0
    mark = d.log.mark()
    (d.workspace / "src" / "app.py").write_text("print('edited')\n")
    committed = d.log.wait("snapshot.committed", after=mark, timeout=5)
    scheduled = d.log.wait("upload.scheduled", after=mark, timeout=5)
    due = datetime.fromisoformat(scheduled["due_at"].replace("Z", "+00:00"))
    at = datetime.fromisoformat(committed["timestamp"].replace("Z", "+00:00"))
    idle = ready["timings"]["idle_timeout_s"]
    assert scheduled["commit"] == committed["commit"]
    assert timedelta(0) < due - at <= timedelta(seconds=idle + 1)
    saved = d.log.wait("generation.saved", after=mark, timeout=idle + 10)
    assert datetime.fromisoformat(saved["timestamp"].replace("Z", "+00:00")) >= due


def test_a_burst_of_200_edits_makes_few_snapshots_with_every_edit_in_the_last(watcherd) -> None:
    d = watcherd().start()
    d.log.wait("snapshot.committed")
    before = len(d.snapshots())
    burst = d.workspace / "burst"
    burst.mkdir()
    for i in range(200):
        (burst / f"{i % 20:02}.txt").write_text(f"edit {i}\n")
    d.settle()
    made = len(d.snapshots()) - before
    assert 1 <= made <= 3, f"{made} snapshots for one burst"
    for n in range(20):
        assert d.show(f"burst/{n:02}.txt") == f"edit {180 + n}"
    assert d.manifest()["snapshot"] == d.snapshots()[0]


def test_continuous_edits_are_snapshotted_every_max_commit_delay(watcherd) -> None:
    d = watcherd().start()
    d.log.wait("snapshot.committed")
    mark = d.log.mark()
    target = d.workspace / "src" / "app.py"
    last = [0]
    began = time.monotonic()

    def editor() -> None:  # an agent typing: a write every ~100ms for 4 seconds
        n, stop = 0, threading.Event()
        while time.monotonic() - began < 4.0:
            n += 1
            target.write_text(f"version {n}\n")
            last[0] = n
            stop.wait(0.1)

    thread = threading.Thread(target=editor)
    thread.start()
    thread.join()
    ended = time.monotonic()
    d.settle()
    during = [line["_t"] for line in d.log.events("snapshot.committed", after=mark)
              if line["_t"] <= ended + 0.3]
    # 4s of edits closer together than the quiet period: only max_commit_delay (1s) commits.
    assert 3 <= len(during) <= 7, f"{len(during)} snapshots during 4s of continuous edits"
    gaps = [b - a for a, b in zip([began, *during], during)]
    assert max(gaps) < 1.0 + 0.8, f"snapshot gaps {gaps}"
    assert d.show("src/app.py") == f"version {last[0]}"


def test_a_user_commit_makes_a_snapshot_whose_second_parent_is_the_new_head(watcherd) -> None:
    d = watcherd().start()
    (d.workspace / "src" / "util.py").write_text("def f(): pass\n")
    wait_for(lambda: "src/util.py" in snapshot_files(d), message="util.py in a snapshot")
    tree = d.git("rev-parse", f"{SNAPSHOT_REF}^{{tree}}")
    mark = d.log.mark()
    git(d.workspace, "add", "-A")
    git(d.workspace, "commit", "--quiet", "-m", "user: add util")
    head = git(d.workspace, "rev-parse", "HEAD")
    line = d.log.wait("snapshot.committed", after=mark, head=head, timeout=5)
    assert parents(d, line["commit"])[1] == head
    # The tree did not change (util.py was already in a snapshot): the commit is for the HEAD.
    assert d.git("rev-parse", f"{line['commit']}^{{tree}}") == tree


# -- what is watched ---------------------------------------------------------------------------------


def test_writes_under_an_ignored_tree_are_no_activity_no_snapshot_and_no_watch(watcherd) -> None:
    d = watcherd(log_level="debug").start()
    before = d.settle()
    watches = d.watches()
    assert watches == before["watches"] > 0
    mark = d.log.mark()
    for pkg in range(10):  # an `npm install`
        lib = d.workspace / "node_modules" / f"pkg{pkg}" / "lib"
        lib.mkdir(parents=True)
        for n in range(20):
            (lib / f"m{n}.js").write_text("module.exports = 1\n")
    (d.workspace / "dev-server.log").write_text("listening\n")

    def unchanged() -> bool:
        s = d.status()
        return (s["last_activity_at"] == before["last_activity_at"] and s["state"] == "idle"
                and not d.log.events("snapshot.committed", after=mark)
                and not d.log.events("watch.change", after=mark))

    holds_for(unchanged, 1.0, "writes under node_modules/ counted as activity")
    assert d.status()["idle_ms"] > before["idle_ms"] + 900
    # Barrier: inotify keeps order, so once this edit is seen every earlier event was judged.
    (d.workspace / "marker.txt").write_text("seen\n")
    change = d.log.wait("watch.change", after=mark, timeout=5)
    assert change["paths"] == ["marker.txt"]
    assert d.watches() == watches
    assert d.status()["watches"] == watches


def test_new_and_renamed_in_directories_are_watched_and_renamed_out_ones_dropped(
        watcherd, tmp_path: Path) -> None:
    d = watcherd().start()
    d.log.wait("snapshot.committed")
    base = d.watches()
    deep = d.workspace / "src" / "feature" / "deep"
    deep.mkdir(parents=True)
    wait_for(lambda: d.watches() == base + 2, message="watches on src/feature and its child")
    (deep / "mod.py").write_text("x = 1\n")
    wait_for(lambda: "src/feature/deep/mod.py" in snapshot_files(d), message="mod.py snapshotted")

    outside = tmp_path / "outside"
    (outside / "vendored" / "inner").mkdir(parents=True)
    (outside / "vendored" / "inner" / "lib.py").write_text("y = 2\n")
    os.rename(outside / "vendored", d.workspace / "vendored")
    wait_for(lambda: d.watches() == base + 4, message="watches on the renamed-in tree")
    # Its file was never written inside the workspace: only the walk of the new tree finds it.
    wait_for(lambda: "vendored/inner/lib.py" in snapshot_files(d), message="lib.py snapshotted")

    os.rename(d.workspace / "vendored", outside / "vendored-back")
    wait_for(lambda: d.watches() == base + 2, message="the renamed-out tree unwatched")
    wait_for(lambda: "vendored/inner/lib.py" not in snapshot_files(d),
             message="a snapshot without the renamed-out tree")
    assert d.status()["watches"] == base + 2


def test_an_edit_right_after_ready_is_snapshotted_while_the_index_is_still_being_matched(
        watcherd, tmp_path: Path) -> None:
    # READY does not wait for the pass over the user's index that finds force-added files (git
    # add -f): until it is done, the directory of one under node_modules/ is not watched. An
    # edit made there right after READY must be snapshotted all the same. A git that holds that
    # pass's answer back until the test opens a gate keeps the window open.
    d = watcherd()
    patched = d.workspace / "node_modules" / "pkg" / "patched.js"
    patched.parent.mkdir(parents=True)
    patched.write_text("v1\n")
    git(d.workspace, "add", "-f", "node_modules/pkg/patched.js")
    git(d.workspace, "commit", "-q", "-m", "a patched dependency")
    gate, done, held = tmp_path / "gate", tmp_path / "pass-done", tmp_path / "held"
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "git").write_text(f"""#!/bin/sh
# The watcher's pass reads a copy of the user's index named watch-index: hold its answer back.
case "$GIT_INDEX_FILE:$*" in
*/watch-index:*--ignored*)
    "{shutil.which('git')}" "$@" > "{held}"; status=$?
    n=0; while [ ! -e "{gate}" ] && [ $n -lt 300 ]; do sleep 0.1; n=$((n + 1)); done
    cat "{held}"; : > "{done}"; exit $status;;
esac
exec "{shutil.which('git')}" "$@"
""")
    (fake / "git").chmod(0o755)
    d.start(env={"PATH": f"{fake}{os.pathsep}{os.environ['PATH']}"})
    d.log.wait("snapshot.committed")  # the start-up snapshot: patched.js as committed
    mark = d.log.mark()
    assert not done.exists()  # READY came before the pass's answer, and it is not in yet

    patched.write_text("v2\n")
    gate.touch()

    line = d.log.wait("snapshot.committed", after=mark, timeout=15)
    assert "node_modules/pkg/patched.js" in line["paths"]
    assert d.show("node_modules/pkg/patched.js") == "v2"
    assert done.exists()


def test_a_queue_overflow_is_rescanned_and_loses_no_edit(watcherd) -> None:
    d = watcherd(watch={"shutdown_timeout": "20s"}).start()
    d.settle()
    mark = d.log.mark()
    src = d.workspace / "src"
    d.signal(signal.SIGSTOP)
    try:
        # More events than fs.inotify.max_queued_events (16384 by default) while nobody reads.
        for n in range(20_000):
            fd = os.open(src / f"gen{n:05}.txt", os.O_WRONLY | os.O_CREAT, 0o644)
            os.write(fd, b"x")
            os.close(fd)
        (d.workspace / "README.md").write_text("# edited after the flood\n")  # lost in the queue
    finally:
        d.signal(signal.SIGCONT)
    d.log.wait("watch.overflow", after=mark, timeout=20)
    saved = d.log.wait("generation.saved", after=mark, timeout=60)
    commit = d.manifest()["snapshot"]
    assert saved["snapshot"] == commit
    assert d.show("README.md", commit) == "# edited after the flood"
    files = snapshot_files(d, commit)
    assert all(f"src/gen{n:05}.txt" in files for n in range(20_000))
    s = d.status()
    assert s["counters"]["rescans"] >= 1
    assert "queue overflow" in s["last_rescan_reasons"]


# -- generations -------------------------------------------------------------------------------------


def test_idle_uploads_a_generation_that_restores_to_the_same_tree(watcherd, tmp_path: Path) -> None:
    d = watcherd().start()
    ws = d.workspace
    (ws / "src" / "new.py").write_text("new = True\n")
    (ws / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (ws / "run.sh").chmod(0o755)
    os.symlink("src/app.py", ws / "app-link")
    (ws / "README.md").unlink()
    d.settle()
    m = d.manifest()
    assert m["generation"] == 1
    assert m["snapshot"] == d.snapshots()[0]
    bundle = d.store / d.key / "bundles" / m["bundle"]
    assert bundle.is_file() and bundle.stat().st_size == m["size"]
    d.log.wait("generation.saved", generation=1, timeout=1)
    restored_equals_workspace(d, tmp_path / "restored")


def test_sigterm_mid_burst_exits_0_with_every_edit_in_the_final_generation(
        watcherd, tmp_path: Path) -> None:
    d = watcherd().start()
    d.log.wait("snapshot.committed")
    burst = d.workspace / "burst"
    burst.mkdir()
    for i in range(100):
        (burst / f"{i % 10}.txt").write_text(f"edit {i}\n")
    (d.workspace / "src" / "app.py").unlink()
    t0 = time.monotonic()
    d.signal(signal.SIGTERM)  # well inside the quiet period of the last edit
    assert d.wait_exit(timeout=5 + 2) == 0
    assert time.monotonic() - t0 < 5
    stopped = d.log.wait("daemon.stopped", timeout=0)
    assert stopped["saved"] is True and stopped["generation"] == d.generation()
    restored_equals_workspace(d, tmp_path / "restored")


def test_store_down_is_retried_until_it_returns_and_the_daemon_keeps_running(watcherd) -> None:
    d = watcherd().start()
    d.settle()
    aside = d.store.with_name("store-aside")
    os.rename(d.store, aside)
    d.store.write_text("the store's disk is gone\n")  # root ignores permissions; a file does not
    mark = d.log.mark()
    (d.workspace / "src" / "app.py").write_text("print('while the store is down')\n")
    failed = d.log.wait("upload.failed", after=mark, timeout=10)
    assert failed["attempt"] == 1 and failed["retry_in_s"] > 0 and failed["kind"] == "StoreError"
    s = d.status()
    assert s["pending_retries"]["upload"] >= 1 and s["pending_retries"]["next_upload_retry_at"]
    assert s["last_error"]["op"] == "upload" and s["state"] == "dirty"
    assert d.metrics()["watcherd_pending_upload_retries"] >= 1

    d.store.unlink()
    os.rename(aside, d.store)
    saved = d.log.wait("generation.saved", after=mark, timeout=15)
    assert saved["generation"] == d.generation() == 2
    s = d.settle()
    assert s["pending_retries"]["upload"] == 0 and s["last_error"] is None
    assert d.proc.poll() is None
    assert d.stop() == 0


def test_after_a_restore_the_daemon_starts_from_the_restored_generation(
        watcherd, tmp_path: Path) -> None:
    first = watcherd().start()
    (first.workspace / "src" / "app.py").write_text("print('saved once')\n")
    first.settle()
    assert first.stop() == 0
    target = tmp_path / "restored"
    target.mkdir()
    d = watcherd(name="after", workspace=target, store=first.store, key=first.key)
    first.restore_into(target, state_dir=d.state_dir)  # the init container of d's pod
    d.start()
    s = d.settle()
    assert s["last_upload"]["generation"] == 1 and s["last_upload"]["by"] == "store"
    assert first.generation() == 1
    assert not d.log.events("snapshot.committed")
    assert not d.log.events("generation.saved")
    # And it carries on from there: the next save is generation 2, a fast-forward.
    (target / "src" / "app.py").write_text("print('after restore')\n")
    code, result = d.post("/snapshot")
    assert (code, result["status"], result["generation"]) == (200, "saved", 2)


def test_edits_made_while_no_daemon_ran_are_saved_at_start(watcherd) -> None:
    d = watcherd().start()
    d.settle()
    assert d.stop() == 0
    (d.workspace / "src" / "offline.py").write_text("written while nobody watched\n")
    (d.workspace / "README.md").write_text("# changed offline\n")
    d.start()
    saved = d.log.wait("generation.saved", timeout=15)
    assert saved["generation"] == 2
    assert d.show("src/offline.py", saved["snapshot"]) == "written while nobody watched"
    assert d.show("README.md", saved["snapshot"]) == "# changed offline"


# -- ending ------------------------------------------------------------------------------------------


def test_a_removed_workspace_ends_the_daemon_with_a_non_zero_status(watcherd) -> None:
    # Nothing is left to protect: a daemon retrying for ever would only look alive.
    d = watcherd().start()
    d.settle()
    shutil.rmtree(d.workspace)
    assert d.wait_exit(timeout=10) == 1
    failed = d.log.wait("daemon.failed", timeout=0)
    assert str(d.workspace) in failed["error"] and "was removed" in failed["error"]
    assert not d.log.events("daemon.crashed")


def test_a_removed_git_directory_still_leaves_the_files_protected(watcherd) -> None:
    # The history watcherd saved is in its state directory, not in .git: `rm -rf .git` is an
    # edit like any other, and the files keep being saved.
    d = watcherd().start()
    d.settle()
    mark = d.log.mark()
    shutil.rmtree(d.workspace / ".git")
    (d.workspace / "src" / "app.py").write_text("print('after rm -rf .git')\n")
    saved = d.log.wait("generation.saved", after=mark, timeout=15)
    assert d.show("src/app.py", saved["snapshot"]) == "print('after rm -rf .git')"
    assert d.proc.poll() is None
    # A new repository there is picked up too.
    git(d.workspace, "init", "-q")
    git(d.workspace, "add", "-A")
    git(d.workspace, "commit", "-q", "-m", "a fresh start")
    head = git(d.workspace, "rev-parse", "HEAD")
    d.log.wait("snapshot.committed", after=mark, head=head, timeout=10)
    assert d.stop() == 0


def _hang_the_store(d: Daemon) -> None:
    """Replace the manifest by a FIFO: reading it blocks, like a store that never answers."""
    manifest = d.store / d.key / "manifest.json"
    manifest.unlink()
    os.mkfifo(manifest)


def test_a_second_sigterm_during_the_final_save_exits_at_once(watcherd) -> None:
    d = watcherd(watch={"shutdown_timeout": "30s"}).start()
    d.settle()
    _hang_the_store(d)
    (d.workspace / "src" / "app.py").write_text("print('unsaved')\n")
    d.signal(signal.SIGTERM)
    d.log.wait("daemon.stopping")
    s = wait_for(lambda: (s := d.status())["uploading"] and s, message="the final upload")
    assert s["state"] == "stopping"
    assert d.post("/snapshot") == (503, {"status": "shutting_down"})
    t0 = time.monotonic()
    d.signal(signal.SIGTERM)
    assert d.wait_exit(timeout=5) == 1
    assert time.monotonic() - t0 < 3
    incomplete = d.log.wait("shutdown.incomplete", timeout=0)
    assert "second SIGTERM" in incomplete["reason"]
    assert incomplete["local_snapshot"] == d.snapshots()[0] != incomplete["stored_snapshot"]


def test_shutdown_timeout_ends_the_process_even_while_an_upload_hangs(watcherd) -> None:
    d = watcherd(watch={"shutdown_timeout": "1s"}).start()
    d.settle()
    _hang_the_store(d)
    (d.workspace / "src" / "app.py").write_text("print('unsaved')\n")
    answer: list[tuple[int, object]] = []
    caller = threading.Thread(target=lambda: answer.append(d.post("/snapshot")), daemon=True)
    caller.start()  # a save that never finishes, waited for by a client
    wait_for(lambda: d.status()["uploading"], message="the upload to start")
    t0 = time.monotonic()
    d.signal(signal.SIGTERM)
    assert d.wait_exit(timeout=10) == 1
    assert time.monotonic() - t0 < 1 + 3
    caller.join(5)
    assert answer and answer[0][0] == 503 and answer[0][1]["status"] == "shutting_down"
    incomplete = d.log.wait("shutdown.incomplete", timeout=0)
    assert "shutdown_timeout" in incomplete["reason"]
    assert incomplete["stored_generation"] == 1
    assert incomplete["local_snapshot"] == d.snapshots()[0]
