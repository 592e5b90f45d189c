"""Watchers: real events on real git repositories, no fixed sleeps, the same behaviour from
every backend.

Each behaviour test runs against the inotify backend, the watchdog backend on watchdog's inotify
observer, on its polling observer (the stand-in for a platform without events) and with one
recursive schedule at the root (what FSEvents and Windows get). The watchdog variants skip only
when watchdog is not installed.

A negative ("this was not reported") is proven with a barrier: after the write under test, a tracked
marker file in each directory concerned is touched, twice, and the test reads until each touch has
shown up. Events of one directory arrive in order (inotify's one queue; one watchdog emitter per
directory, or per poll), and the second touch is only seen after everything before the first one
was read and judged.

The watcher asks git about ignore rules in watcherd's own repository (``helpers.state_repo``, a state
directory beside the workspace), and reads the workspace's git directory only as data.
"""

from __future__ import annotations

import itertools
import os
import re
import select
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import pytest
import structlog

from helpers import git, state_repo, wait_for

from watcherd import ignore, snapshot
from watcherd.errors import GitError, WorkspaceError
from watcherd.watch import Batch, Judge
from watcherd.watch_inotify import InotifyWatcher

try:
    import watchdog  # noqa: F401
except ImportError:
    watchdog = None

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"),
                       reason="the inotify backend and the kernel's view are Linux-only"),
    # watchdog 7.1's recursive inotify observer re-registers a new directory's watch, and warns.
    pytest.mark.filterwarnings("ignore:Callback with id .* already exists:RuntimeWarning"),
]

NO_WATCHDOG = pytest.mark.skipif(watchdog is None, reason="watchdog is not installed: "
                                  "pip install 'watcherd[watchdog]' (the test extra has it)")
# Polled often, so that a test waits milliseconds, not watchdog's default second.
POLL = 0.02
BACKENDS = ["inotify",
            pytest.param("watchdog", marks=NO_WATCHDOG),
            pytest.param("watchdog-polling", marks=NO_WATCHDOG),
            pytest.param("watchdog-recursive", marks=NO_WATCHDOG)]
EVENT_BACKENDS = BACKENDS[:2] + BACKENDS[3:]  # the ones with an OS event queue to overflow


# -- helpers ---------------------------------------------------------------------------------------

def read_until(w: Judge, done: Callable[[list[Batch]], bool], timeout: float = 5.0) -> list[Batch]:
    """Read batches as the daemon would (wait for readable, read) until ``done`` says so."""
    batches: list[Batch] = []
    poller = select.poll()
    poller.register(w.fileno(), select.POLLIN)
    deadline = time.monotonic() + timeout
    while True:
        batch = w.read()
        if batch != Batch():
            batches.append(batch)
        if done(batches):
            return batches
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"not seen within {timeout}s; got {batches}")
        poller.poll(left * 1000)


def paths(batches: list[Batch]) -> set[str]:
    return {p for b in batches for p in b.paths}


def reported(w: Judge, *expected: str) -> list[Batch]:
    return read_until(w, lambda bs: set(expected) <= paths(bs))


_touches = itertools.count(1)


def barrier(w: Judge, root: Path, *dirs: str) -> list[Batch]:
    """Everything up to now in the root and in ``dirs``, read and judged (see the module
    docstring). Each directory needs a tracked ``marker.txt``."""
    return touched(w, root, *(f"{d}/marker.txt" for d in dirs), "marker.txt")


def touched(w: Judge, root: Path, *files: str) -> list[Batch]:
    """Touch ``files`` (relative, reported when touched) twice, reading until each touch is
    seen: what came before in their directories has been read by then."""
    got: list[Batch] = []
    for _ in range(2):
        for rel in files:
            t = 1_600_000_000_000_000_000 + next(_touches) * 1_000_000_000
            os.utime(root / rel, ns=(t, t))
        got += read_until(w, lambda bs: set(files) <= paths(bs))
    return got


def git_barrier(w: Judge, root: Path) -> list[Batch]:
    """Everything up to now in ``.git`` and ``refs/heads`` read and judged: a branch created and
    HEAD switched to it, then both undone, each round seen (git writes a ref only when it
    changes)."""
    main = git(root, "symbolic-ref", "HEAD")
    got: list[Batch] = []
    for head in ("refs/heads/barrier", main):
        if head != main:
            git(root, "update-ref", "refs/heads/barrier", "HEAD")
        git(root, "symbolic-ref", "HEAD", head)
        if head == main:
            git(root, "update-ref", "-d", "refs/heads/barrier")
        got += read_until(w, lambda bs: {"HEAD", "refs/heads/barrier"} <= refs(bs))
    return got


def refs(batches: list[Batch]) -> set[str]:
    return {r for b in batches for r in b.refs}


def news(batches: list[Batch]) -> set[str]:
    """The paths reported, but the barriers' markers."""
    return {p for p in paths(batches) if p != "marker.txt" and not p.endswith("/marker.txt")}


def inotify_inodes() -> list[int]:
    """The inodes the kernel holds watches on for this process, from /proc/self/fdinfo of every
    inotify descriptor (the inotify backend's, or watchdog's)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") != "anon_inode:inotify":
                continue
            text = Path(f"/proc/self/fdinfo/{fd}").read_text()
        except OSError:
            continue
        found += [int(m, 16) for m in re.findall(r"^inotify wd:\S+ ino:([0-9a-f]+)", text, re.M)]
    return found


def watched_inodes(w: Judge) -> list[int]:
    """The inodes of the directories watched, as the OS (or watchdog's poller) sees them: the
    kernel's inotify watches; the polling emitters' directories; for the recursive schedule,
    which watches everything below the root by design, the directories whose events count."""
    variant = getattr(w, "variant", "inotify")
    if variant in ("inotify", "watchdog"):
        return inotify_inodes()
    if variant == "watchdog-polling":
        return [os.stat(e.watch.path).st_ino for e in w._observer.emitters]
    return [os.stat(p).st_ino for p in w._dirs]


def write(path: Path, text: str = "x") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def watcher_of(root: Path, backend: str = "inotify", **kwargs) -> Judge:
    """A watcher of ``root`` with watcherd's own repository beside it (the daemon creates it
    before it watches: ``snapshot.prepare``)."""
    repo = state_repo(root)
    repo.ensure()
    if backend == "inotify":
        return InotifyWatcher(root, repo, **kwargs)
    from watcherd.watch_watchdog import WatchdogWatcher

    if backend == "watchdog-polling":
        kwargs.update(observer="polling", polling_interval=POLL)
    elif backend == "watchdog-recursive":
        kwargs.update(recursive=True)
    w = WatchdogWatcher(root, repo, **kwargs)
    w.variant = backend
    return w


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "ws"
    root.mkdir()
    git(root, "init", "-q")
    write(root / ".gitignore", "node_modules/\n*.log\n")
    write(root / "src" / "app.js", "app")
    write(root / "src" / "lib" / "util.js", "util")
    write(root / "marker.txt", "0")
    write(root / "src" / "marker.txt", "0")
    for i in range(30):
        (root / "node_modules" / f"pkg{i}" / "dist").mkdir(parents=True)
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "template")
    return root


@pytest.fixture
def watcher(root: Path, backend: str) -> Iterator[Judge]:
    w = watcher_of(root, backend)
    w.start()
    yield w
    w.close()


# -- the work tree ---------------------------------------------------------------------------------

def test_edit_to_a_tracked_file_is_reported(root: Path, watcher: Judge) -> None:
    write(root / "src" / "app.js", "changed")
    batches = reported(watcher, "src/app.js")
    assert all(b.relevant and not b.rescan and not b.refs_changed for b in batches)


@pytest.mark.parametrize("backend", BACKENDS)
def test_closing_leaves_nothing_of_the_watcher_in_the_state_directory(root: Path,
                                                                      backend: str) -> None:
    # Every backend: the copy of the user's index kept for the next change goes with it.
    w = watcher_of(root, backend)
    w.start()
    base = state_repo(root).dir / "watch-index-base"
    wait_for(base.exists, timeout=5)  # written by the first walk's pass over the index
    w.close()
    assert not base.exists()


def test_an_idle_watcher_has_nothing_to_read(root: Path, watcher: Judge) -> None:
    barrier(watcher, root)
    assert select.select([watcher.fileno()], [], [], 0)[0] == []
    assert watcher.read() == Batch()
    assert not Batch().relevant


def test_ignored_tree_gets_no_watch_and_its_writes_are_not_reported(root: Path,
                                                                   watcher: Judge) -> None:
    inodes = watched_inodes(watcher)
    assert len(inodes) == watcher.watch_count
    assert (root / "node_modules").stat().st_ino not in inodes
    assert (root / "node_modules" / "pkg0").stat().st_ino not in inodes
    assert (root / "src" / "lib").stat().st_ino in inodes
    # root, src, src/lib + .git, .git/info, .git/refs, refs/heads, refs/tags
    assert watcher.watch_count == 8

    write(root / "node_modules" / "pkg0" / "dist" / "index.js")
    write(root / "src" / "debug.log")
    assert news(barrier(watcher, root, "src")) == set()


def test_the_walk_asks_git_once_per_depth_not_once_per_directory(
        root: Path, backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Each question to check-ignore is a round trip to another process: a tree of many
    # directories costs as many round trips as it is deep. Every directory is still judged.
    for i in range(20):
        (root / "src" / f"m{i}" / "deep").mkdir(parents=True)
        (root / "src" / f"m{i}" / "node_modules").mkdir()
    write(root / "src" / ".gitignore", "node_modules/\n")
    w = watcher_of(root, backend)
    exchanges: list[int] = []
    real = w._oracle._exchange

    def counting(keys):
        exchanges.append(len(keys))
        return real(keys)

    monkeypatch.setattr(w._oracle, "_exchange", counting)
    with w:
        inodes = watched_inodes(w)
        assert len(exchanges) <= 4, exchanges  # root, src/, src/m*/, src/m*/deep: 4 levels
        assert all((root / "src" / f"m{i}" / "deep").stat().st_ino in inodes for i in range(20))
        assert not any((root / "src" / f"m{i}" / "node_modules").stat().st_ino in inodes
                       for i in range(20))


def test_nested_gitignore_is_respected(root: Path, watcher: Judge) -> None:
    write(root / "src" / ".gitignore", ".cache/\n*.tmp\n")
    reported(watcher, "src/.gitignore")
    (root / "src" / ".cache").mkdir()
    write(root / "src" / ".cache" / "blob")
    write(root / "src" / "x.tmp")
    write(root / "x.tmp")  # the nested rule does not apply above its directory
    assert news(barrier(watcher, root, "src")) - {"src/.gitignore"} == {"x.tmp"}
    assert (root / "src" / ".cache").stat().st_ino not in watched_inodes(watcher)


def test_info_exclude_is_respected(root: Path, backend: str) -> None:
    write(root / ".git" / "info" / "exclude", "scratch/\n")
    (root / "scratch").mkdir()
    with watcher_of(root, backend) as w:
        assert (root / "scratch").stat().st_ino not in watched_inodes(w)
        write(root / "scratch" / "notes.txt")
        assert news(barrier(w, root, "src")) == set()

        # Changed while watching: watcherd's copy of the rules follows (git reads only the copy).
        write(root / ".git" / "info" / "exclude", "build/\n")
        read_until(w, lambda bs: any("ignore rules changed (info/exclude)" in b.rescan
                                     for b in bs))
        assert (root / "scratch").stat().st_ino in watched_inodes(w)
        write(root / "scratch" / "notes.txt", "seen now")
        reported(w, "scratch/notes.txt")
        write(root / "build" / "out.o")
        # (watchdog may tell the write above in two events, a second batch)
        assert news(barrier(w, root, "src")) - {"scratch/notes.txt"} == set()
        assert (root / "build").stat().st_ino not in watched_inodes(w)


def test_a_new_directory_is_walked_and_its_early_files_reported(root: Path,
                                                               watcher: Judge) -> None:
    # Created in one go, long before the watcher reads the event for `feature`: inotify never
    # reports these files, only the walk of the new directory can.
    write(root / "feature" / "deep" / "er" / "early.js")
    write(root / "feature" / "top.js")
    (root / "feature" / "empty").mkdir()
    reported(watcher, "feature/deep/er/early.js", "feature/top.js")
    assert (root / "feature" / "deep" / "er").stat().st_ino in watched_inodes(watcher)

    write(root / "feature" / "deep" / "er" / "later.js")
    reported(watcher, "feature/deep/er/later.js")


def test_an_ignored_new_directory_is_neither_watched_nor_reported(root: Path,
                                                                 watcher: Judge) -> None:
    write(root / "app" / "node_modules" / "x" / "index.js")
    write(root / "app" / "main.js")
    assert news(barrier(watcher, root)) == {"app/main.js"}
    assert (root / "app" / "node_modules").stat().st_ino not in watched_inodes(watcher)


def test_directory_renamed_in_out_and_within(root: Path, watcher: Judge, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    write(outside / "sub" / "a.js")
    count = watcher.watch_count

    os.rename(outside, root / "incoming")
    reported(watcher, "incoming/sub/a.js")
    assert watcher.watch_count == count + 2

    os.rename(root / "incoming", root / "src" / "moved")
    reported(watcher, "incoming", "src/moved/sub/a.js")
    write(root / "src" / "moved" / "sub" / "b.js")
    batches = reported(watcher, "src/moved/sub/b.js")
    assert not any(p.startswith("incoming") for p in paths(batches))  # no stale path names

    os.rename(root / "src" / "moved", tmp_path / "gone")
    reported(watcher, "src/moved")
    assert watcher.watch_count == count
    assert len(watched_inodes(watcher)) == count
    write(tmp_path / "gone" / "sub" / "c.js")
    assert news(barrier(watcher, root, "src")) == set()


def test_deleted_directory_is_reported_and_unwatched(root: Path, watcher: Judge,
                                                    backend: str) -> None:
    count = watcher.watch_count
    shutil.rmtree(root / "src" / "lib")
    if backend == "inotify":
        reported(watcher, "src/lib/util.js", "src/lib")
    else:
        # A poll sees the directory gone, not each of its files. watchdog runs one emitter
        # thread per watched directory: src/'s may say "src/lib deleted" before lib/'s thread
        # has handed over util.js's event, and that watch is dropped with the directory. The
        # directory's path covers its files either way (the snapshot records them gone).
        reported(watcher, "src/lib")
    barrier(watcher, root)
    assert watcher.watch_count == count - 1
    assert len(watched_inodes(watcher)) == count - 1
    assert not any(b.rescan for b in barrier(watcher, root))


def test_symlinked_directory_is_a_file_and_is_not_followed(root: Path, watcher: Judge,
                                                          tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    write(target / "big" / "file.txt")
    os.symlink(target, root / "link")
    reported(watcher, "link")
    assert target.stat().st_ino not in watched_inodes(watcher)
    write(target / "big" / "other.txt")
    assert news(barrier(watcher, root, "src")) == set()


def test_a_change_inside_a_nested_repository_reports_the_repository(
        root: Path, watcher: Judge) -> None:
    """A nested repository is saved by its own rules (its own ignore rules, which the watcher
    does not ask git for): a change inside it is reported as the repository, whose snapshot
    follows, never as its own paths (git's check-ignore would die on them), in directories made
    after the walk too. Its commit moving is seen, and once it is no repository any more its
    files are the workspace's: every one of them reported (none ever was as the workspace's),
    and each change after that as its own path."""
    nested = root / "vendor" / "lib"
    nested.mkdir(parents=True)
    git(nested, "init", "-q")
    barrier(watcher, root)
    write(nested / "src" / "inner.c")
    got = reported(watcher, "vendor/lib")
    assert not [p for p in paths(got) if p.startswith("vendor/lib/")]
    write(nested / "src" / "deeper" / "more.c")  # in a directory made after the walk
    reported(watcher, "vendor/lib")
    git(nested, "add", "-A")
    git(nested, "commit", "-qm", "inside")  # rewrites its index
    reported(watcher, "vendor/lib")
    shutil.rmtree(nested / ".git")
    # Written at once: whether its event is read with the removal's, before it or after it,
    # the file is reported as the work tree's.
    write(nested / "src" / "deeper" / "more.c", "saved now")
    reported(watcher, "vendor/lib/src/inner.c", "vendor/lib/src/deeper/more.c")
    barrier(watcher, root)
    write(nested / "src" / "inner.c", "changed since")
    reported(watcher, "vendor/lib/src/inner.c")


def test_changed_gitignore_takes_effect(root: Path, watcher: Judge) -> None:
    write(root / "build" / "out" / "a.o")
    reported(watcher, "build/out/a.o")
    build_ino = (root / "build").stat().st_ino
    assert build_ino in watched_inodes(watcher)

    with open(root / ".gitignore", "a") as f:
        f.write("build/\n")
    reported(watcher, ".gitignore")
    barrier(watcher, root)  # the rest of the write's events (watchdog: one per batch)
    write(root / "build" / "out" / "b.o")
    assert news(barrier(watcher, root, "src")) == set()
    assert build_ino not in watched_inodes(watcher)

    (root / ".gitignore").write_text("node_modules/\n*.log\n")
    reported(watcher, ".gitignore")
    write(root / "build" / "out" / "c.o")
    reported(watcher, "build/out/c.o")


def test_a_tracked_file_a_new_rule_matches_stays_watched(root: Path, watcher: Judge) -> None:
    # git add -A keeps snapshotting a tracked file whatever .gitignore says later: its edits
    # stay relevant, while the untracked files the new rule matches stop being so.
    with open(root / ".gitignore", "a") as f:
        f.write("src/\n")
    reported(watcher, ".gitignore")
    write(root / "src" / "app.js", "still tracked")
    write(root / "src" / "scratch.js", "untracked, ignored now")
    got = reported(watcher, "src/app.js")
    got += barrier(watcher, root, "src")
    assert "src/scratch.js" not in paths(got)
    assert (root / "src").stat().st_ino in watched_inodes(watcher)


def test_force_added_files_found_at_start_are_watched_and_their_edits_reported(
        root: Path, backend: str) -> None:
    # The index is matched against the rules while the tree is walked (the inotify backend is
    # ready before that is done): what it finds is watched as if the walk had known it, under
    # an ignored directory as beside watched files, and edits made meanwhile are reported.
    patched = root / "node_modules" / "pkg0" / "dist" / "patched.js"
    write(patched, "v1")
    write(root / "src" / "trace.log", "v1")
    git(root, "add", "-f", "node_modules/pkg0/dist/patched.js", "src/trace.log")
    with watcher_of(root, backend) as w:
        write(patched, "v2")
        write(root / "src" / "trace.log", "v2")
        reported(w, "node_modules/pkg0/dist/patched.js", "src/trace.log")
        inodes = watched_inodes(w)
        assert patched.parent.stat().st_ino in inodes
        assert (root / "node_modules" / "pkg1").stat().st_ino not in inodes
        write(root / "node_modules" / "pkg0" / "dist" / "other.js", "ignored")
        got = touched(w, root, "node_modules/pkg0/dist/patched.js", "src/trace.log")
        got += barrier(w, root, "src")
        assert news(got) == {"node_modules/pkg0/dist/patched.js", "src/trace.log"}


def test_an_edit_to_a_force_added_file_before_the_index_is_matched_is_reported(
        root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The inotify backend is ready before the force-added paths are known (READY does not wait
    # for the pass over the user's index), so the directory of one under node_modules/ is not
    # watched yet: what is edited there meanwhile must be reported once they are known, with no
    # other event to wake the reader.
    patched = root / "node_modules" / "pkg0" / "dist" / "patched.js"
    write(patched, "v1")
    git(root, "add", "-f", "node_modules/pkg0/dist/patched.js")
    known = threading.Event()
    real = ignore.TrackedIgnored.full

    def held_back(self, repo, layout):
        assert known.wait(10), "the test never let the pass finish"
        return real(self, repo, layout)

    monkeypatch.setattr(ignore.TrackedIgnored, "full", held_back)
    with watcher_of(root) as w:
        write(patched, "v2")  # the pass is not done: no watch on its directory yet
        known.set()
        assert select.select([w.fileno()], [], [], 5)[0], "never woken"
        batch = w.read()
        assert "node_modules/pkg0/dist/patched.js" in batch.paths and batch.relevant
        assert patched.parent.stat().st_ino in watched_inodes(w)
        write(patched, "v3")  # and from now on through its directory's watch
        reported(w, "node_modules/pkg0/dist/patched.js")


def test_force_added_paths_that_cannot_be_listed_ask_for_a_full_scan_and_a_rewalk(
        root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The pass the inotify backend finishes after start can fail (git timed out, the user's
    # index unreadable, the workspace going): a snapshot with a full scan, and degraded (the
    # daemon's safety re-walk looks again), not the end of the daemon.
    real = ignore.TrackedIgnored.full
    calls: list[int] = []

    def failing_once(self, repo, layout):
        calls.append(1)
        if len(calls) == 1:
            raise GitError("git ls-files timed out after 60s")
        return real(self, repo, layout)

    monkeypatch.setattr(ignore.TrackedIgnored, "full", failing_once)
    with watcher_of(root) as w:
        assert select.select([w.fileno()], [], [], 5)[0], "never woken"
        batch = w.read()
        assert batch.relevant and batch.rescan
        assert any("force-added" in d for d in w.degraded)
        w.resync()
        assert w.degraded == ()


def test_a_force_added_file_under_an_ignored_directory_is_watched_alone_without_a_rewalk(
        root: Path, watcher: Judge, monkeypatch: pytest.MonkeyPatch) -> None:
    # `git add -f` makes a file under node_modules/ part of every snapshot (a tracked file is
    # never ignored): its edits must be seen. Its ignored siblings stay ignored, and a change of
    # the user's index (which `git status` and `git add` rewrite all the time) costs a look at
    # the force-added paths, not a walk of the whole tree.
    patched = root / "node_modules" / "pkg0" / "dist" / "patched.js"
    write(patched, "v1")
    write(root / "node_modules" / "pkg0" / "dist" / "other.js", "v1")
    assert news(barrier(watcher, root, "src")) == set()

    asked: list[tuple[str, bool]] = []
    real = watcher._oracle.ignored_many

    def counting(items):
        items = list(items)
        asked.extend(items)
        return real(items)

    monkeypatch.setattr(watcher._oracle, "ignored_many", counting)
    with structlog.testing.capture_logs() as logs:
        git(root, "add", "-f", "node_modules/pkg0/dist/patched.js")
        reported(watcher, "node_modules/pkg0/dist/patched.js")
    assert "watch.rescan" not in [e["event"] for e in logs]
    # Only the directories leading to the new path were looked at: not src/, not src/lib/.
    assert {p.split("/")[0] for p, _ in asked} == {"node_modules"}, asked
    assert not any(p.startswith("node_modules/pkg1/") for p, _ in asked)
    inodes = watched_inodes(watcher)
    assert patched.parent.stat().st_ino in inodes
    assert (root / "node_modules" / "pkg1").stat().st_ino not in inodes
    assert watcher.watch_count == 8 + 3  # node_modules, pkg0, pkg0/dist

    write(patched, "v2")
    reported(watcher, "node_modules/pkg0/dist/patched.js")
    write(root / "node_modules" / "pkg0" / "dist" / "other.js", "v2")
    write(root / "node_modules" / "pkg1" / "dist" / "index.js", "v2")
    got = touched(watcher, root, "node_modules/pkg0/dist/patched.js") + barrier(watcher, root)
    assert news(got) == {"node_modules/pkg0/dist/patched.js"}

    # Untracked again: back to ignored, its watches dropped, still without a re-walk.
    with structlog.testing.capture_logs() as logs:
        git(root, "rm", "-q", "--cached", "-f", "node_modules/pkg0/dist/patched.js")
        read_until(watcher, lambda bs: watcher.watch_count == 8)
    assert "watch.rescan" not in [e["event"] for e in logs]
    write(patched, "v3")
    assert news(barrier(watcher, root, "src")) == set()
    assert watcher.watch_count == len(watched_inodes(watcher)) == 8
    assert (root / "node_modules").stat().st_ino not in watched_inodes(watcher)


# -- .git ------------------------------------------------------------------------------------------

def test_user_commit_changes_refs(root: Path, watcher: Judge) -> None:
    write(root / "src" / "app.js", "v2")
    git(root, "commit", "-qam", "by the user")
    batches = read_until(watcher, lambda bs: any(b.refs_changed for b in bs))
    assert "refs/heads/main" in {r for b in batches for r in b.refs}

    git(root, "branch", "feature/login")  # a new directory under refs/heads
    batches = read_until(watcher, lambda bs: any("refs/heads/feature/login" in b.refs for b in bs))
    git(root, "tag", "v1")
    read_until(watcher, lambda bs: any("refs/tags/v1" in b.refs for b in bs))
    git(root, "checkout", "-q", "feature/login")
    read_until(watcher, lambda bs: any("HEAD" in b.refs for b in bs))
    git(root, "branch", "feature/signup")  # the namespace is watched by now
    read_until(watcher, lambda bs: any("refs/heads/feature/signup" in b.refs for b in bs))


def test_git_internals_and_watcherd_refs_are_not_relevant(root: Path, watcher: Judge) -> None:
    head = git(root, "rev-parse", "HEAD")
    # An older watcherd's ref in the workspace is the user's data now, and not activity.
    git(root, "update-ref", "refs/watcherd/snapshots", head)
    git(root, "update-ref", "refs/watcherd/snapshots", head, head)
    blob = git(root, "hash-object", "-w", "--stdin", input=b"new object")
    git(root, "update-index", "--add", "--cacheinfo", f"100644,{blob},notes.txt")  # .git/index
    write(root / ".git" / "FETCH_HEAD", f"{head}\n")
    write(root / ".git" / "ORIG_HEAD", f"{head}\n")
    write(root / ".git" / "refs" / "heads" / "main.lock", "junk")
    os.unlink(root / ".git" / "refs" / "heads" / "main.lock")
    got = git_barrier(watcher, root) + barrier(watcher, root)
    assert refs(got) == {"HEAD", "refs/heads/barrier"}
    assert not any(b.rescan for b in got)
    assert news(got) == set()


def test_watcherds_own_snapshot_is_not_activity(root: Path, watcher: Judge) -> None:
    # A snapshot writes only watcherd's state directory (its repository, private index, copies
    # of the user's index and rules): nothing of it may wake the watcher, or every snapshot
    # would be followed by another.
    write(root / "src" / "app.js", "to be saved")
    reported(watcher, "src/app.js")
    barrier(watcher, root, "src")  # the rest of the write's events (watchdog: one per batch)
    repo = state_repo(root)
    snapshot.prepare(repo)
    assert snapshot.take(repo).commit
    got = git_barrier(watcher, root) + barrier(watcher, root, "src")
    assert refs(got) == {"HEAD", "refs/heads/barrier"}
    assert not any(b.rescan for b in got)
    assert news(got) == set()
    assert not (root / ".git" / "watcherd").exists()


def test_workspace_whose_git_is_a_file_naming_a_directory_inside_it(tmp_path: Path,
                                                                    backend: str) -> None:
    # `git init --separate-git-dir` (or a tool's own layout): `.git` is a `gitdir:` file. The git
    # directory is inside the workspace, so its refs are watched and its files are not edits.
    root = tmp_path / "ws"
    root.mkdir()
    git(root, "init", "-q", f"--separate-git-dir={root / '.repo'}")
    assert (root / ".git").is_file()
    write(root / "src" / "app.js", "app")
    write(root / "marker.txt", "0")
    git(root, "add", "src", "marker.txt")  # not -A: git would add its own directory's files
    git(root, "commit", "-qm", "first")
    with watcher_of(root, backend) as w:
        assert (root / ".repo").stat().st_ino in watched_inodes(w)  # as a git directory
        write(root / "src" / "app.js", "edited")
        assert paths(reported(w, "src/app.js")) == {"src/app.js"}
        git(root, "commit", "-qam", "second")
        batches = read_until(w, lambda bs: any("refs/heads/main" in b.refs for b in bs))
        batches += barrier(w, root)
        assert not any(p.startswith((".repo", ".git")) for p in paths(batches))


def test_a_git_directory_outside_the_workspace_is_not_followed_but_edits_are_still_seen(
        root: Path, tmp_path: Path, backend: str) -> None:
    # A linked worktree's git directory lives in another repository: following it would read
    # (and watch) outside the workspace, which a planted `.git` file could point anywhere. The
    # git state is refused, loudly; the working tree is watched all the same.
    linked = tmp_path / "linked"
    git(root, "worktree", "add", "-q", "-b", "side", str(linked))
    assert (linked / ".git").is_file()
    outside = root / ".git" / "worktrees" / "linked"
    with structlog.testing.capture_logs() as logs, watcher_of(linked, backend) as w:
        refused = [e for e in logs if e["event"] == "watch.git_dir_refused"]
        assert refused and "outside the workspace" in refused[0]["problem"]
        assert outside.stat().st_ino not in watched_inodes(w)
        assert (root / ".git").stat().st_ino not in watched_inodes(w)
        write(linked / "src" / "app.js", "in the worktree")
        write(linked / "src" / "new.js", "new")
        assert paths(reported(w, "src/app.js", "src/new.js")) == {"src/app.js", "src/new.js"}
        got = barrier(w, linked)
        assert not any(b.rescan for b in got)


def test_a_workspace_without_git_is_watched_and_a_later_git_init_is_picked_up(
        tmp_path: Path, backend: str) -> None:
    # A fresh sandbox (or one whose `.git` was removed) is still work to protect.
    root = tmp_path / "plain"
    write(root / "app.py", "print('hi')")
    write(root / "marker.txt", "0")
    write(root / "node_modules" / "pkg" / "index.js")  # no rules yet: watched like the rest
    with watcher_of(root, backend) as w:
        write(root / "app.py", "print('edited')")
        reported(w, "app.py")
        write(root / "lib" / "util.py", "util")
        reported(w, "lib/util.py")

        write(root / ".gitignore", "node_modules/\n")
        git(root, "init", "-q")
        batches = read_until(w, lambda bs: any(".git" in b.refs for b in bs))
        assert not any(p.startswith(".git/") for p in paths(batches))
        barrier(w, root)
        assert (root / ".git").stat().st_ino in watched_inodes(w)
        assert (root / "node_modules").stat().st_ino not in watched_inodes(w)

        # The new repository's refs are watched: the user's first commit is activity.
        git(root, "add", "-A")
        git(root, "commit", "-qm", "first")
        read_until(w, lambda bs: any("refs/heads/main" in b.refs for b in bs))
        write(root / "node_modules" / "pkg" / "index.js", "ignored now")
        write(root / "app.py", "print('after git init')")
        assert paths(reported(w, "app.py")) <= {"app.py", "marker.txt"}
        assert w.degraded == ()


def test_a_git_directory_seen_half_created_is_picked_up_when_git_finishes_it(
        root: Path, watcher: Judge) -> None:
    # A re-walk can look while `git init` is still writing .git (no HEAD, no objects/ yet): it is
    # no repository then, but the next step of git's must re-walk, or its refs go unwatched.
    shutil.rmtree(root / ".git")
    barrier(watcher, root)
    (root / ".git").mkdir()
    barrier(watcher, root)
    git(root, "init", "-q")
    read_until(watcher, lambda bs: any(b.refs_changed for b in bs))
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "a fresh start")
    read_until(watcher, lambda bs: any(b.refs_changed for b in bs))


def test_a_removed_git_directory_leaves_the_work_tree_watched(root: Path,
                                                             watcher: Judge) -> None:
    # `rm -rf .git` is an edit like any other: the files are still the work to protect.
    count = watcher.watch_count
    shutil.rmtree(root / ".git")
    batches = read_until(watcher, lambda bs: any("git directory removed" in b.rescan for b in bs))
    assert all(b.relevant for b in batches)
    barrier(watcher, root)
    assert watcher.degraded == ()
    assert watcher.watch_count == len(watched_inodes(watcher)) == count - 5  # git's 5
    write(root / "src" / "app.js", "after rm -rf .git")
    reported(watcher, "src/app.js")
    barrier(watcher, root, "src")  # the rest of the write's events (watchdog: one per batch)
    write(root / "node_modules" / "pkg0" / "x.js")  # .gitignore still says so
    assert news(barrier(watcher, root, "src")) == set()


# -- losing events, loudly -------------------------------------------------------------------------

# One ATTRIB event per call; alternating names so the kernel cannot merge them.
_UTIMES = "import os, sys\nfor i in range(int(sys.argv[3])): os.utime(sys.argv[1 + i % 2])"


@pytest.mark.parametrize("backend", EVENT_BACKENDS)
def test_queue_overflow_reports_a_rescan(root: Path, backend: str) -> None:
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    if limit > 200_000:
        pytest.skip(f"max_queued_events is {limit}; overflowing it would be slow")
    # The bridge's own bound out of the way: only the kernel's queue can overflow here.
    options = {} if backend == "inotify" else {"queue_limit": 10**8}
    with watcher_of(root, backend, **options) as w:
        # From another process, four times the queue: watchdog reads on a thread of this one.
        subprocess.run([sys.executable, "-c", _UTIMES, str(root / "src" / "app.js"),
                        str(root / "src" / "lib" / "util.js"), str(4 * limit)], check=True)
        (root / "src" / "after").mkdir()  # lost in the overflow; the rescan must watch it
        with structlog.testing.capture_logs() as logs:
            batches = read_until(w, lambda bs: any("queue overflow" in b.rescan for b in bs))
        assert all(b.relevant for b in batches)
        assert "watch.overflow" in [e["event"] for e in logs]
        assert (root / "src" / "after").stat().st_ino in watched_inodes(w)
        write(root / "src" / "app.js", "after the storm")
        reported(w, "src/app.js")


def test_watch_limit_degrades_loudly_and_never_silently(root: Path, backend: str) -> None:
    with watcher_of(root, backend) as full:
        needed = full.watch_count
    with structlog.testing.capture_logs() as logs, \
            watcher_of(root, backend, max_watches=needed - 1) as w:
        assert w.watch_count == needed - 1
        assert len(w.degraded) == 1
        assert "1 directories unwatched" in w.degraded[0]
        if backend != "watchdog-polling":
            assert "fs.inotify.max_user_watches" in w.degraded[0]

        # A new directory cannot be watched either: its files are still reported, and the batch
        # says that more may be missed.
        write(root / "more" / "a.js")
        write(root / "more2" / "b.js")
        batches = reported(w, "more/a.js", "more2/b.js")
        assert any("watch limit reached" in b.rescan for b in batches)
        assert [e["event"] for e in logs].count("watch.limit_reached") == 1

        # The user's `git add` rewrites the index: not activity, degraded or not.
        git(root, "add", "more")
        got = git_barrier(w, root) + barrier(w, root)
        assert not any(b.rescan for b in got)
        assert news(got) - {"more/a.js", "more2/b.js"} == set()  # (the rest of their writes)

        shutil.rmtree(root / "more")
        shutil.rmtree(root / "more2")
        shutil.rmtree(root / "src" / "lib")
        barrier(w, root)
        w.resync()  # what the daemon's degraded-mode timer does
        assert w.degraded == ()
        assert "watch.recovered" in [e["event"] for e in logs]


def test_watch_count_matches_the_kernel_after_churn(root: Path, watcher: Judge) -> None:
    for i in range(5):
        write(root / f"d{i}" / "x" / "f.js")
    reported(watcher, *(f"d{i}/x/f.js" for i in range(5)))
    for i in range(0, 5, 2):
        shutil.rmtree(root / f"d{i}")
    os.rename(root / "d1", root / "src" / "d1")
    barrier(watcher, root)
    assert watcher.watch_count == len(watched_inodes(watcher)) == 8 + 2 * 2


# -- the daemon's way of waiting -------------------------------------------------------------------

def test_anyio_wait_readable_wakes_on_an_edit(root: Path, watcher: Judge) -> None:
    barrier(watcher, root)

    async def main() -> Batch:
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(anyio.to_thread.run_sync, write, root / "src" / "app.js", "async")
                while True:
                    await anyio.wait_readable(watcher.fileno())
                    batch = watcher.read()
                    if batch.relevant:
                        return batch

    assert anyio.run(main).paths == ("src/app.js",)


# -- setup errors ----------------------------------------------------------------------------------

def test_non_linux_is_refused_clearly(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "darwin")
    with pytest.raises(WorkspaceError, match="inotify"):
        watcher_of(root)


def test_a_workspace_that_is_not_a_directory_is_refused(tmp_path: Path, backend: str) -> None:
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(WorkspaceError, match="not a directory"):
        watcher_of(tmp_path / "file", backend)
