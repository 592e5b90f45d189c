"""Would git leave this path out of a snapshot? Asked of git itself.

The snapshot is ``git add -A``, so the only honest answer to "is this path part of the workspace?" is
git's own: nested ``.gitignore`` files, the workspace's ``info/exclude``, negations, and the index
(a tracked file is never ignored, and neither is a directory that holds one). Re-implementing those
rules would drift from git; spawning ``git check-ignore`` per question would cost a fork per event.
So one long-lived ``git check-ignore --no-index --stdin -z -v -n``, run in watcherd's own repository
with the workspace as its work tree, answers every question from the rules alone, one record per
path; the few tracked paths that the rules ignore (``git add -f``) are found once per change of the
user's index (:func:`tracked_ignored`) and the caller treats them as not ignored. Answers are cached
until the rules change and the caller calls :meth:`IgnoreOracle.invalidate`.

The workspace's ``info/exclude`` reaches git as watcherd's copy (:func:`write_rules`): git reads
no file of the workspace's git directory.

Protocol (``-z -v -n``): each path goes in NUL-terminated; each answer is four NUL-terminated
fields, ``source``, ``linenum``, ``pattern``, ``path``. An empty pattern means no rule matched; a
pattern that starts with ``!`` is a negation that matched, i.e. the path is *not* ignored.
``GIT_FLUSH=1`` makes git answer each path as soon as it is read instead of when its stdout buffer
fills.

check-ignore dies (exit 128) on a path inside a submodule, beyond a symbolic link, outside the
repository or with pathspec magic. The caller avoids those, but the tree changes under our feet, so a
death is survived: the path that killed it counts as *not ignored* (watching or snapshotting a little
too much is safe; missing an edit is not) and a fresh process answers the rest.
"""

from __future__ import annotations

import os
import select
import subprocess
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import structlog

from watcherd import dirfd
from watcherd import workspace as ws
from watcherd.errors import GitError
from watcherd.git import Git
from watcherd.repo import Repo, write_private

log = structlog.get_logger(__name__)

# Bounded so that a tool spraying uniquely named temp files into a watched directory cannot grow the
# cache without limit; dropping it all is crude but the refill costs microseconds per path.
_CACHE_LIMIT = 65_536
# git answers in microseconds; this only guards against a wedged child.
_ANSWER_TIMEOUT_S = 10.0
_RELEASE_AFTER_S = 1.0  # no answer this long: a FIFO as a .gitignore may hold git (_release)
# A process that dies this many times in a row without answering anything is not going to get better
# by restarting it again (repository gone, git broken): say so instead of forking in a loop.
_MAX_CONSECUTIVE_DEATHS = 3
_CHUNK = 65_536


class _Died(Exception):
    """The check-ignore process stopped answering; ``answers`` holds what it did answer."""

    def __init__(self, answers: list[bool], reason: str) -> None:
        super().__init__(reason)
        self.answers = answers
        self.reason = reason


class IgnoreOracle:
    """git's answer to "would ``git add -A`` skip this path?", from one long-lived process.

    Paths are relative to the work tree root (the :class:`Git` path), with ``/`` separators. Never
    blocks for long: a question is a write and a read on a pipe to a process that is already running.
    Not thread-safe; one owner (the watcher) asks.
    """

    def __init__(self, git: Git) -> None:
        self._git = git
        self._proc: subprocess.Popen | None = None
        self._buf = bytearray()
        self._stderr_tail = b""
        self._cache: dict[str, bool] = {}
        self._deaths = 0
        self.restarts = 0
        """How many times a check-ignore process was started (for tests and status)."""

    # -- questions -------------------------------------------------------------------------------

    def is_ignored(self, rel_path: str, is_dir: bool = False) -> bool:
        """True when git would leave ``rel_path`` out of ``git add -A``."""
        return self.ignored_many([(rel_path, is_dir)])[0]

    def ignored_many(self, items: Iterable[tuple[str, bool]]) -> list[bool]:
        """Answer many ``(rel_path, is_dir)`` questions with one pipelined exchange.

        A directory walk asks about all entries of a directory at once; sending them together costs
        one round trip instead of one per entry. Raises :class:`GitError` only when check-ignore
        cannot be kept alive at all.
        """
        keys = [_key(path, is_dir) for path, is_dir in items]
        known: dict[str, bool] = {}
        missing: list[str] = []
        for k in keys:
            if k in known:
                continue
            cached = self._cache.get(k)
            if cached is not None:
                known[k] = cached
            elif _inside_git_dir(k):
                # `.git` and its insides are never part of a snapshot, and asking would kill git.
                known[k] = True
            else:
                known[k] = False  # placeholder, answered below
                missing.append(k)
        if missing:
            for k, ignored in zip(missing, self._exchange(missing)):
                known[k] = ignored
                self._remember(k, ignored)
        return [known[k] for k in keys]

    def invalidate(self) -> None:
        """Forget every answer and restart git on the next question.

        Needed after an ignore file or the index changed: the running process read them when it
        started and would keep answering from the old rules.
        """
        self._cache.clear()
        self._deaths = 0
        self._stop()

    def close(self) -> None:
        self._cache.clear()
        self._stop()

    def __enter__(self) -> IgnoreOracle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the process -----------------------------------------------------------------------------

    def _remember(self, key: str, ignored: bool) -> None:
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[key] = ignored

    def _exchange(self, keys: Sequence[str]) -> list[bool]:
        wire = [_wire(k) for k in keys]
        answers: list[bool] = []
        while len(answers) < len(wire):
            self._check_alive()
            try:
                answers.extend(self._ask(wire[len(answers):]))
            except _Died as died:
                answers.extend(died.answers)
                self._stop()
                if died.answers:
                    self._deaths = 0
                self._deaths += 1
                self._check_alive()
                if len(answers) < len(wire):
                    # The next path is the one git choked on (or was being asked when it died).
                    culprit = keys[len(answers)]
                    log.warning("ignore.failed", path=culprit, reason=died.reason,
                                stderr=self._stderr_tail.decode("utf-8", "replace").strip()[-300:])
                    answers.append(False)
            else:
                self._deaths = 0
        return answers

    def _check_alive(self) -> None:
        if self._deaths >= _MAX_CONSECUTIVE_DEATHS:
            lines = self._stderr_tail.decode("utf-8", "replace").splitlines()
            # git's reasons only ("fatal:", "error:"), printable and short: this reaches the status.
            said = "; ".join(w.strip() for w in lines if w.startswith(("fatal:", "error:")))[:300]
            raise GitError(f"git check-ignore keeps failing in {self._git.git_dir}: "
                           f"{ws.printable(said) or 'no reason given'}")

    def _start(self) -> subprocess.Popen:
        proc = self._git.popen("check-ignore", "--no-index", "--stdin", "-z", "-v", "-n",
                               env={"GIT_FLUSH": "1"})
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            assert pipe is not None
            os.set_blocking(pipe.fileno(), False)
        self._proc = proc
        self._buf.clear()
        self._stderr_tail = b""
        self.restarts += 1
        return proc

    def _stop(self) -> None:
        proc, self._proc = self._proc, None
        self._buf.clear()
        if proc is None:
            return
        try:
            assert proc.stdin is not None
            proc.stdin.close()  # EOF: git finishes and exits on its own
        except OSError:
            pass
        try:
            proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        while tail := _read(proc.stderr.fileno()):  # git's last words, for the log
            self._stderr_tail = (self._stderr_tail + tail)[-4096:]
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()

    def _ask(self, paths: list[bytes]) -> list[bool]:
        """Send ``paths`` and collect one answer per path.

        Writing everything before reading could deadlock once both pipe buffers are full (git blocks
        writing answers we are not reading while we block writing questions it is not reading), so
        writes and reads are interleaved with poll(), both ends non-blocking.
        """
        proc = self._proc or self._start()
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        in_fd, out_fd, err_fd = proc.stdin.fileno(), proc.stdout.fileno(), proc.stderr.fileno()
        payload = memoryview(b"".join(p + b"\0" for p in paths))
        sent = 0
        answers: list[bool] = []
        poller = select.poll()
        poller.register(in_fd, select.POLLOUT)
        poller.register(out_fd, select.POLLIN)
        poller.register(err_fd, select.POLLIN)
        progress = time.monotonic()
        while len(answers) < len(paths):
            ready = poller.poll(_RELEASE_AFTER_S * 1000)
            if not ready:
                if time.monotonic() - progress >= _ANSWER_TIMEOUT_S:
                    proc.kill()
                    raise _Died(answers, f"no answer within {_ANSWER_TIMEOUT_S:g}s")
                self._release(paths[len(answers)])
                continue
            progress = time.monotonic()
            for fd, ev in ready:
                if fd == in_fd:
                    if ev & (select.POLLERR | select.POLLHUP):
                        raise _Died(answers, "check-ignore closed its input")
                    try:
                        sent += os.write(in_fd, payload[sent:sent + _CHUNK])
                    except BlockingIOError:
                        continue
                    except BrokenPipeError as exc:
                        raise _Died(answers, "check-ignore closed its input") from exc
                    if sent >= len(payload):
                        poller.unregister(in_fd)
                elif fd == err_fd:
                    data = _read(err_fd)
                    if data:
                        self._stderr_tail = (self._stderr_tail + data)[-4096:]
                    elif data is not None:
                        poller.unregister(err_fd)
                else:
                    data = _read(out_fd)
                    if data is None:
                        continue
                    if not data:
                        raise _Died(answers, f"check-ignore exited (status {proc.poll()})")
                    self._buf += data
                    self._parse(paths, answers)
        return answers

    def _release(self, path: bytes) -> None:
        """git has not answered for a while: it may be blocked opening a ``.gitignore`` on the
        way to ``path`` (a wire path) that the agent made a FIFO; let it read that as empty
        (:func:`dirfd.release_fifos`)."""
        root = self._git.work_tree
        if root is None:
            return
        parts = path.rstrip(b"/").split(b"/")  # a directory's own too: git may look in it
        ignores = [os.fsdecode(b"/".join(parts[:i] + [b".gitignore"]))
                   for i in range(len(parts) + 1)]
        try:
            dirfd.release_fifos(root, ignores, for_s=0.1)
        except OSError:
            pass  # the workspace gone: git's own answer, or none, says the rest

    def _parse(self, paths: list[bytes], answers: list[bool]) -> None:
        while len(answers) < len(paths):
            fields = self._buf.split(b"\0", 4)
            if len(fields) < 5:
                return  # the fourth field is not terminated yet
            _source, _line, pattern, echoed, rest = fields
            expected = paths[len(answers)]
            if bytes(echoed) != expected:
                raise _Died(answers, f"answer out of step: asked {expected!r}, "
                                     f"got {bytes(echoed)!r}")
            answers.append(bool(pattern) and not pattern.startswith(b"!"))
            self._buf = bytearray(rest)


# What a rollback builds in the workspace root for a moment (watcherd.rollback names them).
ROLLBACK_PREFIX = ".watcherd-rollback-"
ROLLBACK_ENTRIES = b"/" + ROLLBACK_PREFIX.encode() + b"*"


def write_rules(repo: Repo, exclude: bytes, internal: tuple[str, ...]) -> bool:
    """Make watcherd's ``info/exclude`` the workspace's rules, plus the git directories that live
    in the work tree under another name than ``.git`` and the git directory a rollback builds
    beside ``.git`` (never part of a snapshot). True when it changed (cached answers are stale
    then)."""
    text = exclude + b"".join(b"\n/" + os.fsencode(p) + b"/" for p in internal) + \
        b"\n" + ROLLBACK_ENTRIES + b"\n"
    path = repo.git_dir / "info" / "exclude"
    try:
        if path.read_bytes() == text:
            return False
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    # Replaced whole, never truncated in place: the watcher's thread and a snapshot's both write
    # it while git children read it, and a git reading an empty file would ignore nothing. And
    # group-writable: the restore and the daemon may be two uids.
    write_private(path, text)
    return True


def sync_rules(repo: Repo, layout: ws.Layout) -> bool:
    """Copy the workspace's ``info/exclude`` (read as data) into watcherd's repository."""
    exclude = b""
    if layout.common_dir is not None:
        try:
            exclude = ws.read_file(layout.top, layout.common_dir / "info" / "exclude",
                                   ws.MAX_EXCLUDE)
        except (FileNotFoundError, ws.Unsafe):
            pass
    return write_rules(repo, exclude, layout.internal)


def tracked_ignored(repo: Repo, layout: ws.Layout) -> frozenset[str]:
    """Paths of the user's index that the ignore rules match (force-added with ``git add -f``):
    git snapshots them although the rules say otherwise. Read from a copy of the index."""
    tracked = TrackedIgnored()
    try:
        return tracked.full(repo, layout)
    finally:
        tracked.close()


class TrackedIgnored:
    """:func:`tracked_ignored`, remembered between calls, so that a change of the user's index
    alone costs what it changed.

    Matching every path of the index against the rules is what costs: ~90 ms at 50,000 tracked
    files (``ls-files --ignored``, which stats every tracked file), for each ``git add`` or
    ``git status`` of the user's. Their paths (``ls-files --cached``, ~8 ms) mostly stay the
    same; then the answer does too, and only paths that came into the index are asked about.
    Only valid while the rules stay the same: the caller calls :meth:`full` whenever they may
    have changed (a ``.gitignore``, the exclude file), :meth:`index_changed` when only the index
    did.

    The paths a change is compared with are listed when the first change comes, from the copy
    of the index :meth:`full` read (kept in the state directory until then): a start-up pays
    for the match only. :meth:`close` removes that copy.
    """

    # More new paths than this: one pass over the whole index is cheaper than asking each.
    MAX_ASKED = 2000

    def __init__(self) -> None:
        self._paths: frozenset[bytes] | None = None
        self._base: Path | None = None  # the index full() read, until its paths are listed
        self._result: frozenset[str] = frozenset()
        self._rules: bytes | None = None

    def full(self, repo: Repo, layout: ws.Layout) -> frozenset[str]:
        """Match every path of the user's index against the rules."""
        self.close()
        self._result = frozenset()
        self._rules = _rules(repo)
        with _index_copy(repo, layout) as copy:
            if copy is None:
                return self._result
            r = repo.git.run("ls-files", "-z", "--cached", "--ignored", "--exclude-standard",
                             env={"GIT_INDEX_FILE": str(copy)}, check=False)
            if r.returncode != 0:
                return self._result
            self._result = frozenset(_decode(p) for p in r.stdout.split(b"\0") if p)
            self._base = repo.dir / "watch-index-base"
            os.replace(copy, self._base)
        return self._result

    def index_changed(self, repo: Repo, layout: ws.Layout) -> frozenset[str]:
        """The same answer after a change of the user's index, the rules unchanged: paths that
        left the index leave it, paths that came in are asked about (``check-ignore
        --no-index``, which also says so of a path under an ignored directory)."""
        before = self._baseline(repo)
        if before is None or self._rules != _rules(repo):
            return self.full(repo, layout)
        with _index_copy(repo, layout) as copy:
            paths = _paths(repo, copy) if copy is not None else frozenset()
        if paths is None:
            return self.full(repo, layout)
        came = paths - before
        if len(came) > self.MAX_ASKED:
            return self.full(repo, layout)
        result = self._result
        if before - paths:
            gone = {_decode(p) for p in before - paths}
            result = frozenset(p for p in result if p not in gone)
        if came:
            # As the oracle asks (_wire): check-ignore refuses GIT_LITERAL_PATHSPECS, and only a
            # leading ':' is magic to it; it answers with each path as it was asked.
            asked = {_wire(_decode(p)): p for p in came}
            r = repo.git.run("check-ignore", "--no-index", "--stdin", "-z",
                             input=b"".join(w + b"\0" for w in sorted(asked)), check=False)
            if r.returncode not in (0, 1):  # a path in a submodule, beyond a symlink...
                return self.full(repo, layout)
            result = result | {_decode(asked[w]) for w in r.stdout.split(b"\0") if w in asked}
        self._paths, self._result = paths, result
        return result

    def close(self) -> None:
        """Forget the paths, and remove the copy of the index kept for listing them."""
        base, self._base, self._paths = self._base, None, None
        if base is not None:
            base.unlink(missing_ok=True)

    def _baseline(self, repo: Repo) -> frozenset[bytes] | None:
        """The paths of the index the answer is for (None: not known, a full pass is due)."""
        if self._paths is None and self._base is not None:
            base, self._base = self._base, None
            try:
                self._paths = _paths(repo, base) if base.exists() else None
            finally:
                base.unlink(missing_ok=True)
        return self._paths


@contextmanager
def _index_copy(repo: Repo, layout: ws.Layout) -> Iterator[Path | None]:
    """A copy of the user's index for git to read (git never reads the workspace's file), or
    None when there is none. A scratch file: not fsynced, removed after use."""
    if layout.git_dir is None:
        yield None
        return
    try:
        index = ws.read_file(layout.top, layout.git_dir / "index", ws.MAX_INDEX)
    except (FileNotFoundError, ws.Unsafe):
        yield None
        return
    copy = repo.dir / "watch-index"
    fd = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW,
                 0o660)
    try:
        os.write(fd, index)
    finally:
        os.close(fd)
    try:
        yield copy
    finally:
        copy.unlink(missing_ok=True)


def _paths(repo: Repo, index: Path) -> frozenset[bytes] | None:
    # Without the work tree: listing an index needs none, and this runs in the state directory
    # even while the workspace is being removed (a git cannot start in a vanished directory).
    r = repo.bare.run("ls-files", "-z", "--cached", env={"GIT_INDEX_FILE": str(index)},
                      check=False)
    return frozenset(p for p in r.stdout.split(b"\0") if p) if r.returncode == 0 else None


def _rules(repo: Repo) -> bytes | None:
    """watcherd's copy of the exclude file (the .gitignore files are the caller's to watch)."""
    try:
        return (repo.git_dir / "info" / "exclude").read_bytes()
    except OSError:
        return None


def _decode(path: bytes) -> str:
    return path.decode("utf-8", "surrogateescape")


def _read(fd: int) -> bytes | None:
    """Read what is there: None when nothing is (yet), b"" at end of file."""
    try:
        return os.read(fd, _CHUNK)
    except BlockingIOError:
        return None


def _key(rel_path: str, is_dir: bool) -> str:
    path = rel_path.strip("/")
    if not path:
        raise ValueError("the work tree root is not a question for check-ignore")
    # (Asked for every entry a walk meets: the substring tests spare most paths the split.)
    if rel_path.startswith("/") or (".." in path and ".." in path.split("/")):
        raise ValueError(f"{rel_path!r} is not a path inside the work tree")
    # A trailing slash tells git it is a directory, so `dir/` patterns match even if it is gone.
    return path + "/" if is_dir else path


def _inside_git_dir(key: str) -> bool:
    return ".git" in key and ".git" in key.rstrip("/").split("/")


def _wire(key: str) -> bytes:
    raw = os.fsencode(key)
    # A leading ':' is pathspec magic (":(glob)x" makes check-ignore die, ":x" means "x"); "./" makes
    # it literal. Only the first character matters: later components are never parsed for magic.
    return b"./" + raw if raw.startswith(b":") else raw
