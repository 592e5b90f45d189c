"""Which edits happened in the workspace, told by inotify, judged by git.

Event-driven, no polling: the daemon waits for :meth:`Watcher.fileno` to become readable
(``await anyio.wait_readable(watcher.fileno())``) and calls :meth:`Watcher.read`, which never blocks
waiting for events and returns one :class:`Batch`. An idle workspace costs no wakeups at all.

Why inotify directly instead of a recursive watcher library: the directories worth watching are the
ones ``git add -A`` would look into. A workspace of 20,000 directories is usually ~50 of those plus a
``node_modules/``; putting a watch on every directory (watchdog, gitwatch) costs seconds, the watch
limit, and CPU on every ``npm install``, and a recursive rebuild after a queue overflow can livelock.
Here ignored directories never get a watch; git's own rules decide (:mod:`watcherd.ignore`).

What the kernel does not say, and how it is covered:

* Files created in a new directory before its watch exists are never reported, so every new (or
  renamed-in) directory is walked: watched, and its files reported as changed.
* A queue overflow, the watch limit (ENOSPC), or a watch the kernel dropped on its own lose events.
  They come back as :attr:`Batch.rescan` reasons ("something may be missed: snapshot with a full
  scan") and, while the condition lasts, as :attr:`Watcher.degraded`.

Inside ``.git`` only the refs matter (a user's commit, a branch switch): ``HEAD``, ``packed-refs``,
``refs/heads/**`` and ``refs/tags/**``. Objects, the index, logs and lock files are not activity. The
index and ``info/exclude`` are watched anyway because they change what git would snapshot: a change of
``info/exclude`` re-reads the rules and re-walks; a change of the index only looks at the tracked
paths the rules ignore (``git add -f``), and watches or unwatches the directories that hold them, so
a ``git add`` costs what it changed, not a walk of the tree.

The git directory is found and read as data (:mod:`watcherd.workspace`); git itself only answers
questions about ignore rules, in watcherd's own repository.
"""

from __future__ import annotations

import errno
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import structlog

from watcherd import ignore
from watcherd import workspace as ws
from watcherd.errors import GitError, WorkspaceError
from watcherd.ignore import IgnoreOracle
from watcherd.repo import Repo

try:  # only installed on Linux
    from inotify_simple import INotify
    from inotify_simple import flags as _f
except ImportError:  # pragma: no cover - exercised on non-Linux only
    INotify = None  # type: ignore[assignment,misc]

log = structlog.get_logger(__name__)

# A batch carries at most this many path hints (for logs and commit messages); a `cp -r` of a large
# tree is still one relevant batch, it just does not list every file.
MAX_PATHS = 1000

if INotify is not None:
    _WORK_MASK = (_f.MODIFY | _f.ATTRIB | _f.CLOSE_WRITE | _f.MOVED_FROM | _f.MOVED_TO | _f.CREATE
                  | _f.DELETE | _f.DELETE_SELF | _f.MOVE_SELF
                  | _f.ONLYDIR | _f.DONT_FOLLOW | _f.EXCL_UNLINK)
    # Refs are written as `<ref>.lock`, then renamed: MOVED_TO (or CLOSE_WRITE for a direct write).
    _GIT_MASK = (_f.CLOSE_WRITE | _f.MOVED_FROM | _f.MOVED_TO | _f.CREATE | _f.DELETE
                 | _f.DELETE_SELF | _f.ONLYDIR | _f.DONT_FOLLOW | _f.EXCL_UNLINK)
    _CHANGED = (_f.MODIFY | _f.ATTRIB | _f.CLOSE_WRITE | _f.MOVED_FROM | _f.MOVED_TO | _f.CREATE
                | _f.DELETE)
    _GONE = _f.DELETE | _f.MOVED_FROM
    _CAME = _f.CREATE | _f.MOVED_TO
    _REF_WRITTEN = _f.CLOSE_WRITE | _f.MOVED_TO | _f.DELETE | _f.MOVED_FROM


@dataclass(frozen=True)
class Batch:
    """What one :meth:`Watcher.read` found.

    ``paths`` are hints (relative to the workspace root, at most :data:`MAX_PATHS`), not the truth:
    the snapshot looks at the whole tree anyway. ``rescan`` reasons mean events may have been lost;
    the batch then counts as a change even without paths.
    """

    paths: tuple[str, ...] = ()
    refs_changed: bool = False
    rescan: tuple[str, ...] = ()
    refs: tuple[str, ...] = ()
    """Which refs moved (``HEAD``, ``packed-refs``, ``refs/heads/main``...), for logs."""

    @property
    def relevant(self) -> bool:
        """True when this is activity: a path git cares about, a ref, or a possible miss."""
        return bool(self.paths or self.refs_changed or self.rescan)


class _Watch(NamedTuple):
    kind: str  # "work": path relative to the root ("" is the root); "git": absolute path
    path: str


@dataclass
class _Found:
    """What one read() has found so far."""

    paths: dict[str, None] = field(default_factory=dict)
    refs: dict[str, None] = field(default_factory=dict)
    rescan: dict[str, None] = field(default_factory=dict)
    resync: dict[str, None] = field(default_factory=dict)  # why the watches must be re-walked
    rules_changed: bool = False

    def path(self, rel: str) -> None:
        if len(self.paths) < MAX_PATHS:
            self.paths[rel] = None

    def batch(self) -> Batch:
        return Batch(tuple(self.paths), bool(self.refs), tuple(self.rescan), tuple(self.refs))


class Watcher:
    """inotify watches on the directories of a git workspace that git would not ignore.

    Use: ``start()`` once, then ``read()`` whenever ``fileno()`` is readable, ``close()`` at the end.
    ``read()`` can take a few milliseconds (it walks new directories and asks git about new names);
    it is synchronous and not thread-safe, call it from one task or thread at a time.

    ``max_watches`` is a test seam: it makes adding a watch fail with ENOSPC once that many are in
    place, exactly as the kernel does at ``fs.inotify.max_user_watches``, so the degraded path can be
    tested without changing a sysctl. Leave it None in production.
    """

    def __init__(self, root: Path, repo: Repo, *, max_watches: int | None = None) -> None:
        if INotify is None or not sys.platform.startswith("linux"):
            raise WorkspaceError(
                f"watching {root} needs Linux inotify (this is {sys.platform}); "
                "run watcherd on Linux, e.g. as a sidecar container in the pod")
        root = Path(root)
        if not root.is_dir():
            raise WorkspaceError(f"workspace {root} is not a directory; check workspace.path")
        # Watches are added with DONT_FOLLOW, so a symlinked root must be resolved first.
        self.root = root.resolve()
        self._repo = repo
        self._max_watches = max_watches
        self._oracle = IgnoreOracle(repo.git)
        self._layout = ws.Layout(self.root)
        # Tracked paths the rules ignore (git add -f), and the directories that lead to them.
        self._forced: frozenset[str] = frozenset()
        self._forced_dirs: frozenset[str] = frozenset()
        self._tracked = ignore.TrackedIgnored()
        self._inotify: INotify | None = None
        self._by_wd: dict[int, _Watch] = {}
        self._wd_of: dict[_Watch, int] = {}
        self._deleted: set[int] = set()  # wds whose directory reported DELETE_SELF
        self._unwatched: set[str] = set()  # work dirs that should be watched but hit the limit
        self._limit_hits = 0  # ENOSPC answers so far
        self._degraded: dict[str, str] = {}
        self._git_dir = ""
        self._common_dir = ""

    # -- public ----------------------------------------------------------------------------------

    def start(self) -> None:
        """Place the watches: the work tree minus what git ignores, and the few refs directories."""
        if self._inotify is not None:
            raise RuntimeError("watcher already started")
        t0 = time.perf_counter()
        try:
            self._inotify = INotify(nonblocking=True)
        except OSError as exc:
            if exc.errno == errno.EMFILE:
                raise WorkspaceError(
                    "cannot create an inotify instance: limit reached; raise "
                    "fs.inotify.max_user_instances (sysctl -w fs.inotify.max_user_instances=512)"
                ) from exc
            raise WorkspaceError(f"cannot create an inotify instance: {exc}") from exc
        self._resync_all(_Found())
        if "ignore" in self._degraded:
            # Without git's answers the choice is watching node_modules or missing edits: refuse.
            message = self._degraded["ignore"]
            self.close()
            raise WorkspaceError(f"cannot tell which files git ignores in {self.root}: {message}")
        if _Watch("work", "") not in self._wd_of and not self._limit_hits:
            self.close()
            raise WorkspaceError(f"cannot watch workspace {self.root}: it vanished or is unreadable")
        log.info("watch.ready", watches=self.watch_count, unwatched=len(self._unwatched),
                 duration_ms=_ms(t0), root=str(self.root), git_dir=self._git_dir)

    def fileno(self) -> int:
        """The inotify descriptor: readable when :meth:`read` has something to return."""
        return self._require().fileno()

    def read(self) -> Batch:
        """Drain the events queued now and say what they mean. Never waits for new events."""
        inotify = self._require()
        events = inotify.read(timeout=0)
        if not events:
            return Batch()
        found = _Found()
        hits = self._limit_hits
        self._prefetch(events)
        for ev in events:
            self._dispatch(ev, found)
        if found.rules_changed:
            self._oracle.invalidate()
        if found.resync:
            self._resync_all(found)
        elif self._limit_hits > hits:
            self._note_limit(found, rescan=True)  # a new directory could not be watched
        return found.batch()

    def resync(self) -> Batch:
        """Re-walk everything: re-read ignore rules, add missing watches, drop stale ones.

        The watcher does this on its own after an overflow or an ignore-rule change. The daemon calls
        it from its safety timer while :attr:`degraded` (the limit may have been raised since).
        """
        self._require()
        found = _Found()
        self._oracle.invalidate()
        found.resync["requested"] = None
        self._resync_all(found)
        return found.batch()

    @property
    def watch_count(self) -> int:
        """inotify watches in place (the kernel's count: one per watched directory)."""
        return len(self._by_wd)

    @property
    def degraded(self) -> tuple[str, ...]:
        """Why some edits may go unseen right now; empty when every relevant directory is watched."""
        return tuple(self._degraded.values())

    def close(self) -> None:
        """Drop every watch (closing the descriptor does) and stop git check-ignore."""
        if self._inotify is not None:
            self._inotify.close()
            self._inotify = None
        self._by_wd.clear()
        self._wd_of.clear()
        self._oracle.close()

    def __enter__(self) -> Watcher:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- setup -----------------------------------------------------------------------------------

    def _require(self) -> INotify:
        if self._inotify is None:
            raise RuntimeError("watcher is not started (or already closed)")
        return self._inotify

    def _locate(self) -> None:
        """Where HEAD/index live, and where refs/packed-refs/info live (differ in a linked
        worktree); "" when the workspace is not a repository (yet). Also the rules: watcherd's copy
        of ``info/exclude``, and the tracked paths the rules ignore."""
        self._layout = ws.locate(self.root)
        lay = self._layout
        self._git_dir = str(lay.git_dir) if lay.git_dir else ""
        self._common_dir = str(lay.common_dir) if lay.common_dir else ""
        if lay.problem:
            log.warning("watch.git_dir_refused", problem=ws.printable(lay.problem),
                        note="the git state is not watched; the working tree still is")
        ignore.sync_rules(self._repo, lay)
        self._set_forced(self._tracked.full(self._repo, lay))

    def _set_forced(self, forced: frozenset[str]) -> tuple[set[str], set[str]]:
        """Take a new set of force-added paths; the directories that start and stop leading to
        one (to watch and to unwatch)."""
        dirs = frozenset(str(parent) for p in forced for parent in Path(p).parents
                         if str(parent) != ".")
        added, gone = set(dirs - self._forced_dirs), set(self._forced_dirs - dirs)
        self._forced, self._forced_dirs = forced, dirs
        return added, gone

    # -- events ----------------------------------------------------------------------------------

    def _prefetch(self, events: list) -> None:
        """Ask git about every new name in this read at once: one round trip, not one per event."""
        asks: list[tuple[str, bool]] = []
        for ev in events:
            w = self._by_wd.get(ev.wd)
            if w is not None and w.kind == "work" and ev.name and ev.name != ".git":
                asks.append((_join(w.path, ev.name), bool(ev.mask & _f.ISDIR)))
        if asks:
            try:
                self._oracle.ignored_many(asks)
            except GitError:
                pass  # handled per event, where it can be turned into a rescan

    def _dispatch(self, ev, found: _Found) -> None:
        if ev.mask & _f.Q_OVERFLOW:
            reason = "queue overflow"
            if reason not in found.rescan:
                log.warning("watch.overflow", watches=self.watch_count)
            found.rescan[reason] = None
            found.resync[reason] = None
            found.rules_changed = True  # a lost event may have been a .gitignore edit
            return
        w = self._by_wd.get(ev.wd)
        if w is None:
            return  # a watch we already dropped (its IN_IGNORED, or events queued before the drop)
        if ev.mask & _f.IGNORED:
            self._on_watch_gone(ev.wd, w, found)
        elif ev.mask & _f.DELETE_SELF:
            self._deleted.add(ev.wd)
        elif ev.mask & _f.UNMOUNT:
            found.rescan[f"file system unmounted under {w.path or '/'}"] = None
        elif ev.mask & _f.MOVE_SELF:
            if w == _Watch("work", ""):
                self._degraded["root"] = (f"workspace {self.root} was moved away; "
                                          "restart watcherd to watch the new tree")
                found.rescan["workspace directory moved"] = None
        elif w.kind == "work":
            self._on_work_event(w, ev, found)
        else:
            self._on_git_event(w, ev, found)

    def _on_watch_gone(self, wd: int, w: _Watch, found: _Found) -> None:
        """The kernel removed a watch we did not remove: its directory is gone (or unmounted)."""
        deleted = wd in self._deleted
        self._deleted.discard(wd)
        self._forget(wd)
        if w == _Watch("work", ""):
            self._degraded["root"] = f"workspace {self.root} was removed; restart watcherd to " \
                                     "watch again"
            log.error("watch.vanished", path=str(self.root))
            found.rescan["workspace removed"] = None
        elif w in (_Watch("git", self._git_dir), _Watch("git", self._common_dir)):
            # `rm -rf .git`: the working tree is still watched and snapshotted; a new .git is
            # found by the walk.
            found.rescan["git directory removed"] = None
            found.resync["git directory removed"] = None
        elif not deleted:
            # Not a deletion its parent reported: unmount or the like. Re-walk to be sure.
            found.rescan[f"watch on {w.path} dropped by the kernel"] = None
            found.resync["watch dropped"] = None
        # A deleted directory needs nothing more: its parent's watch reported the deletion.

    def _on_work_event(self, w: _Watch, ev, found: _Found) -> None:
        name = ev.name
        if not name:
            return
        rel = _join(w.path, name)
        is_dir = bool(ev.mask & _f.ISDIR)
        if name == ".git":
            if not w.path and ev.mask & (_CAME | _GONE):
                # `git init` (or a restore, or `rm -rf .git`) at the top: the git directory moved.
                found.resync["git directory appeared or went"] = None
                found.refs[".git"] = None
                return
            if w.path and ev.mask & _CAME:
                # `git init`/`git clone` made this directory a nested repository: git records it
                # as one gitlink and never looks inside, and check-ignore dies on paths in it.
                self._drop_work(w.path, include_self=True)
                found.path(w.path)
            return
        if name == ".gitignore":
            found.rules_changed = True
            found.resync["ignore rules changed"] = None
        if is_dir:
            if ev.mask & _GONE:
                self._drop_work(rel, include_self=True)
                # Its own IN_IGNORED may come first, so ask git rather than the watch table.
                if not self._ignored(rel, True, found):
                    found.path(rel)
            if ev.mask & _CAME and not self._ignored(rel, True, found):
                # Anything created inside before the watch existed was never reported: walk it.
                self._walk_work(rel, found, collect=True)
            return
        if ev.mask & _CHANGED and not self._ignored(rel, False, found):
            found.path(rel)

    def _ignored_many(self, asks: list[tuple[str, bool]]) -> list[bool]:
        """git's answers, except that a force-added path, and a directory leading to one, are
        never ignored (a tracked file is never ignored)."""
        answers = self._oracle.ignored_many(asks)
        if not self._forced:
            return answers
        return [False if (path in self._forced_dirs if is_dir else path in self._forced) else a
                for (path, is_dir), a in zip(asks, answers)]

    def _ignored(self, rel: str, is_dir: bool, found: _Found) -> bool:
        try:
            return self._ignored_many([(rel, is_dir)])[0]
        except GitError as exc:
            # No answer from git: count it as a change (a snapshot sorts it out) but do not descend
            # into a directory that may well be node_modules.
            self._oracle_failed(exc, found)
            found.path(rel)
            return True

    def _oracle_failed(self, exc: GitError, found: _Found) -> None:
        reason = "cannot evaluate ignore rules"
        if reason not in found.rescan:
            log.warning("watch.ignore_failed", error=str(exc))
        found.rescan[reason] = None
        self._degraded["ignore"] = f"{reason} (new directories are not watched): {exc}"

    def _on_git_event(self, w: _Watch, ev, found: _Found) -> None:
        name, d, mask = ev.name, w.path, ev.mask
        if not name or name.endswith(".lock"):
            return
        is_dir = bool(mask & _f.ISDIR)
        common = self._common_dir
        if d == self._git_dir and not is_dir:
            if name == "HEAD" and mask & _REF_WRITTEN:
                found.refs["HEAD"] = None
            elif name == "index" and mask & _REF_WRITTEN:
                # A tracked file is never ignored: `git add -f` can make an ignored path relevant.
                self._on_index_changed(found)
        if d == common:
            if name == "packed-refs" and not is_dir and mask & _REF_WRITTEN:
                found.refs["packed-refs"] = None
            elif name in ("info", "refs") and is_dir and mask & _CAME:
                found.resync[f"{name}/ appeared"] = None
        elif d == os.path.join(common, "info"):
            if name == "exclude":
                ignore.sync_rules(self._repo, self._layout)
                found.rules_changed = True
                found.resync["ignore rules changed"] = None
                found.rescan["ignore rules changed (info/exclude)"] = None
        elif d == os.path.join(common, "refs"):
            if name in ("heads", "tags") and is_dir and mask & _CAME:
                self._walk_refs(os.path.join(d, name), found)
        elif any(_under(d, os.path.join(common, "refs", ns)) for ns in ("heads", "tags")):
            path = os.path.join(d, name)
            if is_dir:
                if mask & _GONE:
                    self._drop_git_tree(path)
                elif mask & _CAME:
                    # A new `feature/` namespace: refs may be in it before its watch is.
                    self._walk_refs(path, found)
            elif mask & _REF_WRITTEN:
                found.refs[os.path.relpath(path, common)] = None

    def _on_index_changed(self, found: _Found) -> None:
        """Watch the directories that now lead to a force-added path, drop the ones that no
        longer do; the rest of the tree is not looked at."""
        added, gone = self._set_forced(self._tracked.index_changed(self._repo, self._layout))
        for rel in sorted(gone, key=len, reverse=True):
            if self._ignored(rel, True, found):
                self._drop_work(rel, include_self=True)
        for rel in sorted(added, key=len):
            parent = str(Path(rel).parent) if "/" in rel else ""
            if _Watch("work", parent) in self._wd_of:
                self._walk_work(rel, found, collect=True)

    # -- walking ---------------------------------------------------------------------------------

    def _resync_all(self, found: _Found) -> None:
        """Walk the whole tree again, keep what is still wanted, add what is missing, drop the rest.

        Cheap by construction (ignored trees are never entered), so it is the answer to every "the
        watches may be wrong" situation rather than trying to patch them up.
        """
        t0 = time.perf_counter()
        self._locate()  # the git directory may have appeared, gone or moved; the rules changed
        seen: set[_Watch] = set()
        hits = self._limit_hits
        unwatched_before, self._unwatched = self._unwatched, set()
        self._degraded.pop("ignore", None)
        # The few git directories first: if the limit bites, missing a user's commit is worse.
        self._walk_git(found, seen)
        self._walk_work("", found, collect=False, seen=seen)
        for w in [w for w in self._wd_of if w not in seen]:
            self._unwatch(w)
        if self._limit_hits > hits:
            # Only a directory that newly went unwatched may hide an edit; the same misses as
            # before are the degraded state, already reported, not a new reason to snapshot.
            self._note_limit(found, rescan=bool(self._unwatched - unwatched_before)
                             or "limit" not in self._degraded)
        elif self._degraded.pop("limit", None) is not None:
            log.info("watch.recovered", watches=self.watch_count)
        if found.resync:  # empty at start: watch.ready says it
            # The user's `git status`/`git add` rewrite the index often; that re-walk is routine.
            emit = log.debug if set(found.resync) == {"index changed"} else log.info
            emit("watch.rescan", reason=", ".join(found.resync), watches=self.watch_count,
                 duration_ms=_ms(t0))

    def _walk_work(self, start: str, found: _Found, *, collect: bool,
                   seen: set[_Watch] | None = None) -> None:
        """Watch ``start`` (judged not ignored by the caller) and every non-ignored directory below.

        Each directory is watched *before* it is listed: whatever appears after the watch is an
        event, whatever was there before is in the listing. ``collect`` reports the files found
        (for a directory that just appeared, whose files were never reported).
        """
        stack = [start]
        while stack:
            rel = stack.pop()
            if seen is not None:
                seen.add(_Watch("work", rel))
            full = os.path.join(self.root, rel) if rel else str(self.root)
            if not self._watch_dir(_Watch("work", rel), full, _WORK_MASK):
                continue
            try:
                with os.scandir(full) as it:
                    entries = list(it)
            except (FileNotFoundError, NotADirectoryError):
                # Gone already; the event on its parent tells the rest.
                self._drop_work(rel, include_self=True)
                continue
            except OSError as exc:
                log.warning("watch.unreadable", path=rel or ".", error=exc.strerror)
                continue
            if rel and any(e.name == ".git" for e in entries):
                # A nested repository: one gitlink to git, never its files (see _on_work_event).
                self._drop_work(rel, include_self=True)
                if seen is not None:
                    seen.discard(_Watch("work", rel))
                if collect:
                    found.path(rel)
                continue
            asks: list[tuple[str, bool]] = []
            for e in entries:
                if e.name == ".git":
                    continue
                try:
                    is_dir = e.is_dir(follow_symlinks=False)  # a symlink is a file to git
                except OSError:
                    continue
                if is_dir or collect:
                    asks.append((_join(rel, e.name), is_dir))
            if not asks:
                continue
            try:
                answers = self._ignored_many(asks)
            except GitError as exc:
                if collect:
                    for path, is_dir in asks:
                        if not is_dir:
                            found.path(path)
                self._oracle_failed(exc, found)
                continue
            for (path, is_dir), ignored in zip(asks, answers):
                if ignored:
                    continue
                if is_dir:
                    stack.append(path)
                else:
                    found.path(path)

    def _walk_git(self, found: _Found, seen: set[_Watch]) -> None:
        """Watch the git dir(s), ``info/``, and the refs directories that can hold branches/tags."""
        common = self._common_dir
        if not common:
            return
        for d in dict.fromkeys((self._git_dir, common)):
            seen.add(_Watch("git", d))
            self._watch_dir(_Watch("git", d), d, _GIT_MASK)
        for sub in ("info", "refs"):
            d = os.path.join(common, sub)
            if os.path.isdir(d):
                seen.add(_Watch("git", d))
                self._watch_dir(_Watch("git", d), d, _GIT_MASK)
        for sub in ("heads", "tags"):
            d = os.path.join(common, "refs", sub)
            if os.path.isdir(d):
                self._walk_refs(d, found, seen=seen, report=False)

    def _walk_refs(self, start: str, found: _Found, *, seen: set[_Watch] | None = None,
                   report: bool = True) -> None:
        stack = [start]
        while stack:
            d = stack.pop()
            if seen is not None:
                seen.add(_Watch("git", d))
            if not self._watch_dir(_Watch("git", d), d, _GIT_MASK):
                continue
            try:
                with os.scandir(d) as it:
                    entries = list(it)
            except OSError:
                continue
            for e in entries:
                if e.is_dir(follow_symlinks=False):
                    stack.append(e.path)
                elif report and not e.name.endswith(".lock"):
                    found.refs[os.path.relpath(e.path, self._common_dir)] = None

    # -- the watch table -------------------------------------------------------------------------

    def _watch_dir(self, w: _Watch, full: str, mask: int) -> bool:
        """Add (or refresh) one watch; False when the directory cannot be watched."""
        inotify = self._require()
        try:
            if (self._max_watches is not None and w not in self._wd_of
                    and len(self._by_wd) >= self._max_watches):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            wd = inotify.add_watch(full, mask)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                self._limit_hits += 1
                if w.kind == "work":
                    self._unwatched.add(w.path)
                # Keep walking the work tree: its files still get reported, and counted.
                return w.kind == "work"
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                # Gone or replaced by a file/symlink since it was listed: its parent's watch reports
                # that, so nothing is lost.
                self._unwatch(w)
                return False
            log.warning("watch.unwatchable", path=w.path or ".", error=exc.strerror)
            self._unwatch(w)
            return False
        old_w = self._by_wd.get(wd)
        if old_w is not None and old_w != w:
            # The same inode under a new path (a move we have not processed yet): the path moved.
            self._wd_of.pop(old_w, None)
        old_wd = self._wd_of.get(w)
        if old_wd is not None and old_wd != wd:
            # A different directory now has this name; the old one is gone or elsewhere.
            self._by_wd.pop(old_wd, None)
            self._rm_watch(old_wd)
        self._by_wd[wd] = w
        self._wd_of[w] = wd
        self._deleted.discard(wd)
        return True

    def _unwatch(self, w: _Watch) -> None:
        wd = self._wd_of.pop(w, None)
        if wd is not None:
            self._by_wd.pop(wd, None)
            self._deleted.discard(wd)
            self._rm_watch(wd)

    def _forget(self, wd: int) -> None:
        w = self._by_wd.pop(wd, None)
        if w is not None and self._wd_of.get(w) == wd:
            del self._wd_of[w]

    def _rm_watch(self, wd: int) -> None:
        if self._inotify is None:
            return
        try:
            self._inotify.rm_watch(wd)
        except OSError:
            pass  # EINVAL: the kernel dropped it already (directory deleted)

    def _drop_work(self, rel: str, *, include_self: bool) -> None:
        """Drop the watches of ``rel`` and everything below it (moved away, deleted, nested repo).

        On a move inside the tree the kernel would keep watching under the new name; dropping and
        re-walking the destination is simpler than patching paths, and just as cheap.
        """
        for w in list(self._subtree("work", rel, include_self)):
            self._unwatch(w)
        prefix = rel + "/"
        self._unwatched = {p for p in self._unwatched
                           if not (p.startswith(prefix) or (include_self and p == rel))}

    def _drop_git_tree(self, path: str) -> None:
        for w in list(self._subtree("git", path, True)):
            self._unwatch(w)

    def _subtree(self, kind: str, path: str, include_self: bool) -> Iterator[_Watch]:
        prefix = path + ("/" if kind == "work" else os.sep)
        for w in self._wd_of:
            if w.kind == kind and (w.path.startswith(prefix) or (include_self and w.path == path)):
                yield w

    def _note_limit(self, found: _Found, *, rescan: bool) -> None:
        """Some directory could not be watched: say so once in the log, always in the status."""
        limit = self._max_watches if self._max_watches is not None else _kernel_watch_limit()
        message = (f"watch limit reached: {self.watch_count} watches placed, "
                   f"{len(self._unwatched)} directories unwatched; raise "
                   f"fs.inotify.max_user_watches (now {limit}), e.g. "
                   f"sysctl -w fs.inotify.max_user_watches={_suggest(limit)}")
        if "limit" not in self._degraded:
            log.warning("watch.limit_reached", watches=self.watch_count,
                        unwatched=len(self._unwatched), limit=limit)
        self._degraded["limit"] = message
        if rescan:
            found.rescan["watch limit reached"] = None

def _join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top + os.sep)


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000, 2)


def _kernel_watch_limit() -> int | None:
    try:
        return int(Path("/proc/sys/fs/inotify/max_user_watches").read_text())
    except (OSError, ValueError):
        return None


def _suggest(limit: int | None) -> int:
    return max(524_288, (limit or 0) * 4)
