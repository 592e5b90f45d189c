"""Which edits happened in the workspace, told by the OS, judged by git.

The daemon sees one small interface, :class:`Watcher`: ``start()`` once; then, whenever
``fileno()`` is readable (``await anyio.wait_readable(watcher.fileno())``), ``read()``, which
never waits for events and returns one :class:`Batch`; ``resync()`` from its safety timer while
``degraded``; ``watch_count`` for the status; ``close()``. Two backends implement it:

* ``inotify`` (:mod:`watcherd.watch_inotify`), the Linux default: inotify directly, a watch on
  each directory git would not ignore and nowhere else.
* ``watchdog`` (:mod:`watcherd.watch_watchdog`), the portable one, for host runners on a laptop
  (macOS: FSEvents) or anywhere without inotify; it bridges watchdog's observer threads to the
  same descriptor-and-read interface.

:func:`choose` picks one from ``watch.backend`` (``auto``: inotify on Linux, watchdog
elsewhere) and says why; :func:`open_watcher` builds it.

What both share is the judgement, in :class:`Judge`: which directories are worth watching (the
ones ``git add -A`` would look into: ignore rules asked of git through
:class:`~watcherd.ignore.IgnoreOracle`, plus the tracked paths the rules ignore,
:func:`~watcherd.ignore.tracked_ignored`), what an event means, and when to rescan. A backend
only places and removes watches (:meth:`Judge._add`, :meth:`Judge._remove`) and turns what its
OS says into ``(directory, name, mask)`` events for :meth:`Judge._on_work_event` and
:meth:`Judge._on_git_event`. The masks use inotify's bit values (:data:`CREATE`...), so the
default backend hands the kernel's masks on untranslated, at no cost per event.

What the OS does not say, and how it is covered:

* Files created in a new directory before its watch exists are never reported, so every new (or
  renamed-in) directory is walked: watched, and its files reported as changed.
* A queue overflow, a watch limit, or a watch the OS dropped on its own lose events. They come
  back as :attr:`Batch.rescan` reasons ("something may be missed: snapshot with a full scan")
  and, while the condition lasts, as :attr:`Watcher.degraded`.
* The inotify backend is ready before the force-added paths are known (matching the user's
  index against the rules costs more than the walk on a large tree). When they are, the
  directories that lead to them are watched and every one of them is reported as changed, so
  an edit made to one in between is in the next snapshot (:meth:`Judge._settle`).

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
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import structlog

from watcherd import ignore
from watcherd import workspace as ws
from watcherd.errors import ConfigError, GitError, WorkspaceError
from watcherd.ignore import IgnoreOracle
from watcherd.repo import Repo

log = structlog.get_logger(__name__)

# A batch carries at most this many path hints (for logs and commit messages); a `cp -r` of a large
# tree is still one relevant batch, it just does not list every file.
MAX_PATHS = 1000
#: Directories watched inside one nested repository (whose own ignore rules git does not give
#: watcherd: a `node_modules/` in it would be walked whole); past it, changes deeper are unseen.
NESTED_MAX_WATCHES = 2000
# What of a nested repository's git directory says its commit may have moved.
_NESTED_GIT_NAMES = frozenset({"HEAD", "index", "packed-refs"})

# Event masks: inotify's bit values (see inotify(7)), whatever the backend.
MODIFY = 0x2
ATTRIB = 0x4
CLOSE_WRITE = 0x8
MOVED_FROM = 0x40
MOVED_TO = 0x80
CREATE = 0x100
DELETE = 0x200
ISDIR = 0x40000000

_CHANGED = MODIFY | ATTRIB | CLOSE_WRITE | MOVED_FROM | MOVED_TO | CREATE | DELETE
_GONE = DELETE | MOVED_FROM
_CAME = CREATE | MOVED_TO
_REF_WRITTEN = CLOSE_WRITE | MOVED_TO | DELETE | MOVED_FROM

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


class Watcher(Protocol):
    """What the daemon uses of a backend.

    ``read()`` can take a few milliseconds (it walks new directories and asks git about new
    names; the first one after start may wait for the rest of the pass over the user's index,
    see :attr:`Judge.defer_forced`); it is synchronous and not thread-safe: call it, and
    ``resync()``, from one task or thread at a time.
    """

    root: Path

    def start(self) -> None: ...

    def fileno(self) -> int: ...

    def read(self) -> Batch: ...

    def resync(self) -> Batch: ...

    @property
    def degraded(self) -> tuple[str, ...]: ...

    @property
    def watch_count(self) -> int: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Choice:
    """Which backend runs, and why (what ``config check`` prints)."""

    backend: str
    why: str


def choose(setting: str, platform: str = sys.platform) -> Choice:
    """The backend ``watch.backend = setting`` means on ``platform``."""
    if setting == "auto":
        if platform.startswith("linux"):
            return Choice("inotify", "auto: Linux")
        return Choice("watchdog", f"auto: no inotify on {platform}")
    return Choice(setting, f"watch.backend = {setting!r}")


def open_watcher(root: Path, repo: Repo, setting: str = "auto") -> Watcher:
    """The backend ``watch.backend`` asks for, not started yet."""
    if choose(setting).backend == "inotify":
        from watcherd.watch_inotify import InotifyWatcher

        return InotifyWatcher(root, repo)
    return watchdog_backend().WatchdogWatcher(root, repo)


def watchdog_backend():
    """:mod:`watcherd.watch_watchdog`, or a ConfigError saying which extra to install.

    A missing optional dependency is a mistake of the installation that no restart repairs:
    exit status 2 and one line, never an ImportError's traceback.
    """
    try:
        from watcherd import watch_watchdog
    except ImportError as exc:
        if exc.name is None or exc.name.partition(".")[0] == "watcherd":
            raise  # watcherd's own module is broken: a bug, keep the traceback
        raise ConfigError("watch.backend = \"watchdog\" needs the watchdog extra: pip install "
                          f"'watcherd[watchdog]' (module {exc.name} is not installed)") from None
    return watch_watchdog


class Watch(NamedTuple):
    """One watched directory."""

    # "work": path relative to the root ("" is the root); "git": absolute path; "nested": a
    # directory of a repository nested in the work tree (relative, like "work")
    kind: str
    path: str


@dataclass
class Found:
    """What one read() has found so far."""

    paths: dict[str, None] = field(default_factory=dict)
    refs: dict[str, None] = field(default_factory=dict)
    rescan: dict[str, None] = field(default_factory=dict)
    resync: dict[str, None] = field(default_factory=dict)  # why the watches must be re-walked
    rules_changed: bool = False
    index_read: bool = False  # the user's index was looked at during this read already

    def path(self, rel: str) -> None:
        if len(self.paths) < MAX_PATHS:
            self.paths[rel] = None

    def batch(self) -> Batch:
        return Batch(tuple(self.paths), bool(self.refs), tuple(self.rescan), tuple(self.refs))


class Judge:
    """The judgement every backend shares: where to watch, what an event means, when to rescan.

    A backend subclasses it and provides :meth:`_add` and :meth:`_remove` (place and drop one
    directory's watch), :meth:`_limit_advice` (what to raise when the OS refuses more watches),
    ``start``/``fileno``/``read``, :meth:`_close_backend` and :meth:`_require`. Its ``read`` turns the OS's
    events into calls of :meth:`_on_work_event` / :meth:`_on_git_event` (``_lost`` for an
    overflow, ``_root_gone`` for a removed workspace) and ends with :meth:`_finish`.

    ``max_watches`` is a test seam: it makes placing a watch fail with ENOSPC once that many are
    in place, exactly as the OS does at its limit, so the degraded path can be tested without
    changing a sysctl. Leave it None in production.
    """

    backend = ""
    #: Whether :meth:`start` may return before the force-added paths are known (the first
    #: walk's pass over the user's index then goes on in its thread; see :meth:`_settle`). A
    #: backend that sets it makes ``fileno()`` readable when :meth:`_wake` is called, from any
    #: thread, and calls :meth:`_settle` first in ``read``.
    defer_forced = False

    def __init__(self, root: Path, repo: Repo, *, max_watches: int | None = None) -> None:
        root = Path(root)
        if not root.is_dir():
            raise WorkspaceError(f"workspace {root} is not a directory; check workspace.path")
        # Watches are placed without following links, so a symlinked root must be resolved first.
        self.root = root.resolve()
        self._repo = repo
        self._max_watches = max_watches
        self._oracle = IgnoreOracle(repo.git)
        self._layout = ws.Layout(self.root)
        # Tracked paths the rules ignore (git add -f), and the directories that lead to them.
        self._forced: frozenset[str] = frozenset()
        self._forced_dirs: frozenset[str] = frozenset()
        self._tracked = ignore.TrackedIgnored()
        self._pending: _Pending | None = None  # the first walk's pass, until settled
        self._watches: dict[Watch, Any] = {}  # what the backend's _add returned for each
        self._unwatched: set[str] = set()  # work dirs that should be watched but hit the limit
        self._limit_hits = 0  # "too many watches" answers so far
        self._degraded: dict[str, str] = {}
        self._git_dir = ""
        self._common_dir = ""
        self._unborn_git = ""  # a .git directory git has not finished creating, when there is one
        self._nested: dict[str, int] = {}  # each nested repository's root: directories watched

    # -- public ----------------------------------------------------------------------------------

    def resync(self) -> Batch:
        """Re-walk everything: re-read ignore rules, add missing watches, drop stale ones.

        The watcher does this on its own after an overflow or an ignore-rule change. The daemon calls
        it from its safety timer while :attr:`degraded` (the limit may have been raised since).
        """
        self._require()
        found = Found()
        self._oracle.invalidate()
        found.resync["requested"] = None
        self._resync_all(found)
        return found.batch()

    @property
    def watch_count(self) -> int:
        """Directories watched: git's directories plus the work tree's that git would not
        ignore."""
        return len(self._watches)

    @property
    def degraded(self) -> tuple[str, ...]:
        """Why some edits may go unseen right now; empty when every relevant directory is watched."""
        return tuple(self._degraded.values())

    def __enter__(self) -> Judge:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- what a backend provides -----------------------------------------------------------------

    def start(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Stop watching: the backend's own handles, then what every backend holds (the first
        walk's pass, git check-ignore, the copy of the user's index kept for the next change)."""
        self._forget_pending()
        self._close_backend()
        self._watches.clear()
        self._oracle.close()
        self._tracked.close()

    def _close_backend(self) -> None:
        """Release the backend's descriptors and threads (its watches go with them)."""
        raise NotImplementedError

    def _require(self) -> Any:
        """The backend's live handle; RuntimeError when not started (or closed)."""
        raise NotImplementedError

    def _add(self, w: Watch, full: str, old: Any) -> Any:
        """Watch directory ``full`` (or keep ``old``, its current watch, when that still holds);
        the handle to remember. Raises OSError as the OS refused."""
        raise NotImplementedError

    def _remove(self, handle: Any) -> None:
        """Drop a watch :meth:`_add` placed."""
        raise NotImplementedError

    def _limit_advice(self) -> str:
        """What to raise when the OS refuses more watches."""
        raise NotImplementedError

    def _wake(self) -> None:
        """Make ``fileno()`` readable (called from the pass's thread; see
        :attr:`defer_forced`)."""

    def _unwake(self) -> None:
        """Undo :meth:`_wake` (called once the pass is settled)."""

    # -- the first walk, the end of a read --------------------------------------------------------

    def _place_all(self, **facts: Any) -> None:
        """The first walk, at start: refuse to run blind, then say what is watched."""
        t0 = time.perf_counter()
        self._resync_all(Found(), first=True)
        if "ignore" in self._degraded:
            # Without git's answers the choice is watching node_modules or missing edits: refuse.
            message = self._degraded["ignore"]
            self.close()
            raise WorkspaceError(f"cannot tell which files git ignores in {self.root}: {message}")
        if Watch("work", "") not in self._watches and not self._limit_hits:
            self.close()
            raise WorkspaceError(f"cannot watch workspace {self.root}: it vanished or is unreadable")
        log.info("watch.ready", backend=self.backend, watches=self.watch_count,
                 unwatched=len(self._unwatched), duration_ms=_ms(t0), root=str(self.root),
                 git_dir=self._git_dir, **facts)

    def _finish(self, found: Found, hits: int) -> Batch:
        """After a read's events: re-walk when they asked for it, say what they meant."""
        if found.rules_changed:
            self._oracle.invalidate()
        if found.resync:
            self._resync_all(found)
        elif self._limit_hits > hits:
            self._note_limit(found, rescan=True)  # a new directory could not be watched
        return found.batch()

    def _lost(self, reason: str, found: Found) -> None:
        """Events were dropped (a queue overflowed): re-walk, and snapshot with a full scan."""
        if reason not in found.rescan:
            log.warning("watch.overflow", reason=reason, watches=self.watch_count)
        found.rescan[reason] = None
        found.resync[reason] = None
        found.rules_changed = True  # a lost event may have been a .gitignore edit

    def _root_gone(self, found: Found) -> None:
        self._degraded["root"] = f"workspace {self.root} was removed; restart watcherd to " \
                                 "watch again"
        log.error("watch.vanished", path=str(self.root))
        found.rescan["workspace removed"] = None

    # -- setup -----------------------------------------------------------------------------------

    def _locate(self) -> None:
        """Where HEAD/index live, and where refs/packed-refs/info live (differ in a linked
        worktree); "" when the workspace is not a repository (yet). Also the rules: watcherd's copy
        of ``info/exclude`` (the tracked paths the rules ignore are the caller's:
        :meth:`_resync_all`)."""
        self._layout = ws.locate(self.root)
        lay = self._layout
        self._git_dir = str(lay.git_dir) if lay.git_dir else ""
        self._common_dir = str(lay.common_dir) if lay.common_dir else ""
        if lay.problem:
            log.warning("watch.git_dir_refused", problem=ws.printable(lay.problem),
                        note="the git state is not watched; the working tree still is")
        ignore.sync_rules(self._repo, lay)

    def _set_forced(self, forced: frozenset[str]) -> tuple[set[str], set[str]]:
        """Take a new set of force-added paths; the directories that start and stop leading to
        one (to watch and to unwatch)."""
        dirs = frozenset(str(parent) for p in forced for parent in Path(p).parents
                         if str(parent) != ".")
        added, gone = set(dirs - self._forced_dirs), set(self._forced_dirs - dirs)
        self._forced, self._forced_dirs = forced, dirs
        return added, gone

    # -- events ----------------------------------------------------------------------------------

    def _prefetch(self, asks: list[tuple[str, bool]]) -> None:
        """Ask git about every new name of a read at once: one round trip, not one per event."""
        if asks:
            try:
                self._oracle.ignored_many(asks)
            except GitError:
                pass  # handled per event, where it can be turned into a rescan

    def _on_event(self, w: Watch, name: str, mask: int, found: Found) -> None:
        """One event of watched directory ``w``: ``name`` in it changed as ``mask`` says."""
        if w.kind == "work":
            self._on_work_event(w.path, name, mask, found)
        elif w.kind == "nested":
            self._on_nested_event(w.path, name, mask, found)
        else:
            self._on_git_event(w.path, name, mask, found)

    def _on_work_event(self, d: str, name: str, mask: int, found: Found) -> None:
        """``name`` in the watched work-tree directory ``d`` (relative) changed as ``mask`` says."""
        if not name:
            return
        rel = child_path(d, name)
        is_dir = bool(mask & ISDIR)
        if name == ".git":
            if not d and mask & (_CAME | _GONE):
                # `git init` (or a restore, or `rm -rf .git`) at the top: the git directory moved.
                found.resync["git directory appeared or went"] = None
                found.refs[".git"] = None
                if mask & _GONE:
                    found.rescan["git directory removed"] = None
                return
            if d and mask & _CAME:
                # `git init`/`git clone` made this directory a nested repository: git records it
                # as one gitlink and never looks inside, and check-ignore dies on paths in it.
                self._drop_work(d, include_self=True)
                self._walk_nested(d)
                found.path(d)
            return
        if name == ".gitignore":
            if not mask & (_CAME | _GONE) and ws.is_fifo(self.root / rel):
                # A FIFO written to: watcherd letting a git go (dirfd.release_fifos), which reads
                # it as empty; no change of the rules (its coming or going is one).
                return
            found.rules_changed = True
            found.resync["ignore rules changed"] = None
        if is_dir:
            if mask & _GONE:
                self._drop_work(rel, include_self=True)
                # Its own removal may be told first, so ask git rather than the watch table.
                if not self._ignored(rel, True, found):
                    found.path(rel)
            if mask & _CAME and not self._ignored(rel, True, found):
                # Anything created inside before the watch existed was never reported: walk it.
                self._walk_work(rel, found, collect=True)
            return
        if mask & _CHANGED and not self._ignored(rel, False, found):
            found.path(rel)

    def _on_nested_event(self, d: str, name: str, mask: int, found: Found) -> None:
        """``name`` in ``d``, a directory of a nested repository, changed: the snapshot this
        starts saves the repository by its own rules (its ignore rules are its own, so the
        change is reported as the repository, never as its paths: git's check-ignore would die
        on them)."""
        root = self._nested_root(d)
        if root is None or not name:
            return
        if d == f"{root}/.git":
            if name in _NESTED_GIT_NAMES:
                found.path(root)  # a commit, checkout or reset in it
            return
        rel = child_path(d, name)
        if name == ".git":
            if d == root and mask & _GONE:
                # No longer a repository: its files are the workspace's now, none of them ever
                # reported as such (an event of this read in it was the repository's): walked
                # as a directory that just appeared.
                self._drop_nested(root)
                if not self._ignored(root, True, found):
                    self._walk_work(root, found, collect=True)
            return
        if mask & ISDIR:
            if mask & _GONE:
                self._drop_subtree("nested", rel, include_self=True)
            if mask & _CAME:
                self._walk_nested(root, start=rel)
        found.path(root)

    def _nested_root(self, d: str) -> str | None:
        for root in self._nested:
            if d == root or d.startswith(root + "/"):
                return root
        return None

    def _walk_nested(self, root: str, seen: set[Watch] | None = None, *,
                     start: str | None = None) -> None:
        """Watch nested repository ``root`` (relative): its directories, not ignored ones (its
        rules are not git's to tell here) up to :data:`NESTED_MAX_WATCHES`, and its git
        directory's top (a commit there rewrites the index). ``start``: only that new directory
        of it."""
        count = self._nested.get(root, 0) if start is not None else 0
        self._nested[root] = count
        prefix = os.path.join(str(self.root), "")
        stack = [start if start is not None else root]
        if start is None and os.path.isdir(prefix + root + "/.git") and \
                not os.path.islink(prefix + root + "/.git"):
            stack.append(f"{root}/.git")
        while stack:
            rel = stack.pop()
            if count >= NESTED_MAX_WATCHES:
                if "nested" not in self._degraded:
                    log.warning("watch.nested_partial", path=ws.printable(root),
                                watches=NESTED_MAX_WATCHES,
                                note="changes deeper in this nested repository are not seen")
                self._degraded["nested"] = (f"nested repository {root}: more than "
                                            f"{NESTED_MAX_WATCHES} directories, not all watched")
                break
            w = Watch("nested", rel)
            if seen is not None:
                seen.add(w)
            if not self._watch_dir(w, prefix + rel):
                continue
            count += 1
            if rel.endswith("/.git"):
                continue  # its top only
            try:
                with os.scandir(prefix + rel) as it:
                    stack += [child_path(rel, e.name) for e in it
                              if e.name != ".git" and e.is_dir(follow_symlinks=False)]
            except OSError:
                continue
        self._nested[root] = count

    def _drop_nested(self, root: str) -> None:
        self._drop_subtree("nested", root, include_self=True)
        self._nested.pop(root, None)

    def _ignored_many(self, asks: list[tuple[str, bool]]) -> list[bool]:
        """git's answers, except that a force-added path, and a directory leading to one, are
        never ignored (a tracked file is never ignored)."""
        answers = self._oracle.ignored_many(asks)
        if not self._forced:
            return answers
        return [False if (path in self._forced_dirs if is_dir else path in self._forced) else a
                for (path, is_dir), a in zip(asks, answers)]

    def _ignored(self, rel: str, is_dir: bool, found: Found) -> bool:
        try:
            return self._ignored_many([(rel, is_dir)])[0]
        except GitError as exc:
            # No answer from git: count it as a change (a snapshot sorts it out) but do not descend
            # into a directory that may well be node_modules.
            self._oracle_failed(exc, found)
            found.path(rel)
            return True

    def _oracle_failed(self, exc: GitError, found: Found) -> None:
        reason = "cannot evaluate ignore rules"
        if reason not in found.rescan:
            log.warning("watch.ignore_failed", error=str(exc))
        found.rescan[reason] = None
        self._degraded["ignore"] = f"{reason} (new directories are not watched): {exc}"

    def _on_git_event(self, d: str, name: str, mask: int, found: Found) -> None:
        """``name`` in the watched git directory ``d`` (absolute) changed as ``mask`` says."""
        if not name or name.endswith(".lock"):
            return
        is_dir = bool(mask & ISDIR)
        common = self._common_dir
        if d == self._unborn_git:
            if name in ("HEAD", "objects") and mask & (_CAME | _REF_WRITTEN):
                found.resync["git directory completed"] = None
                found.refs[".git"] = None
            return
        if d == self._git_dir and not is_dir:
            if name == "HEAD" and mask & _REF_WRITTEN:
                found.refs["HEAD"] = None
            elif name == "index" and mask & _REF_WRITTEN and not found.index_read \
                    and not found.resync:
                # A tracked file is never ignored: `git add -f` can make an ignored path relevant.
                # Once per read: the index is read as it is now, after every write queued so far
                # (and a re-walk, when one is due, looks at it anyway).
                found.index_read = True
                self._on_index_changed(found)
        if d == common:
            if name == "packed-refs" and not is_dir and mask & _REF_WRITTEN:
                found.refs["packed-refs"] = None
            elif name in ("info", "refs") and is_dir and mask & _CAME:
                found.resync[f"{name}/ appeared"] = None
        elif d == os.path.join(common, "info"):
            if name == "exclude":
                # The re-walk copies the new rules (_locate) before it asks about anything.
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

    def _forced_known(self, forced: frozenset[str] | None) -> None:
        """In the pass's thread, as it ends: wake the reader when there is something to settle
        (a failure, or force-added paths other than the ones judged with so far)."""
        if forced is None or forced != self._forced:
            self._wake()

    def _apply_forced(self, forced: frozenset[str], found: Found, seen: set[Watch]) -> None:
        """Take the force-added paths looked for while a re-walk walked (with the ones known
        before): watch the ignored directories that lead to one now, as the walk would have if it
        had known them, and drop those that led to one before and no longer do."""
        added, gone = self._set_forced(forced)
        for rel in sorted(gone, key=len, reverse=True):
            if Watch("work", rel) in self._watches and self._ignored(rel, True, found):
                self._drop_work(rel, include_self=True)
        for rel in sorted(added, key=len):
            parent = str(Path(rel).parent) if "/" in rel else ""
            if (Watch("work", rel) not in seen and Watch("work", parent) in seen
                    and Watch("work", parent) in self._watches):
                self._walk_work(rel, found, collect=False, seen=seen)

    def _settle(self, found: Found) -> None:
        """Apply the force-added paths the first walk left to its thread, once they are known
        (waiting for them if need be).

        Until then the judgement went by the rules alone: an ignored directory that leads to a
        force-added path was not watched, and the events of a force-added file beside watched
        ones were judged ignored. So, besides watching those directories now, every force-added
        path is reported as changed: an edit made to one meanwhile is in the snapshot this asks
        for (which finds nothing new when there was none)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        try:
            forced = pending.result()
        except (GitError, OSError) as exc:
            # Not known: snapshot with a full scan, and stay degraded (the daemon's safety
            # re-walk looks again) rather than end the daemon, whose workspace may be going.
            reason = "cannot list the force-added paths"
            log.warning("watch.force_added_unknown", error=str(exc))
            found.rescan[reason] = None
            self._degraded["ignore"] = f"{reason} (their directories are not watched): {exc}"
            return
        finally:
            self._unwake()
        self._apply_forced(forced, found, set(self._watches))
        for path in sorted(forced):
            found.path(path)
        log.debug("watch.force_added", paths=len(forced), watches=self.watch_count)

    def _forget_pending(self) -> None:
        """Closing: wait for the pass's thread (it may still wake us), keep nothing of it."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.join()
            self._unwake()

    def _on_index_changed(self, found: Found) -> None:
        """Watch the directories that now lead to a force-added path, drop the ones that no
        longer do; the rest of the tree is not looked at."""
        self._settle(found)  # the pass of the first walk uses what this would change
        added, gone = self._set_forced(self._tracked.index_changed(self._repo, self._layout))
        for rel in sorted(gone, key=len, reverse=True):
            if self._ignored(rel, True, found):
                self._drop_work(rel, include_self=True)
        for rel in sorted(added, key=len):
            parent = str(Path(rel).parent) if "/" in rel else ""
            if Watch("work", parent) in self._watches:
                self._walk_work(rel, found, collect=True)

    # -- walking ---------------------------------------------------------------------------------

    def _resync_all(self, found: Found, *, first: bool = False) -> None:
        """Walk the whole tree again, keep what is still wanted, add what is missing, drop the rest.

        Cheap by construction (ignored trees are never entered), so it is the answer to every "the
        watches may be wrong" situation rather than trying to patch them up.
        """
        self._settle(found)
        t0 = time.perf_counter()
        self._locate()  # the git directory may have appeared, gone or moved; the rules changed
        # Matching the user's index against the rules is git's work, for the other CPU (at 50,000
        # tracked files it costs more than the walk): it runs while the walk does, and its answer
        # is applied after it, as a change of the user's index is. The first walk need not wait
        # for it where the backend can be woken (defer_forced): READY does not wait for it.
        defer = first and self.defer_forced
        forced = _Pending(self._tracked.full, self._repo, self._layout,
                          done=self._forced_known if defer else None)
        seen: set[Watch] = set()
        hits = self._limit_hits
        unwatched_before, self._unwatched = self._unwatched, set()
        self._degraded.pop("ignore", None)
        self._degraded.pop("nested", None)
        self._nested = {}
        try:
            # The few git directories first: if the limit bites, missing a user's commit is worse.
            self._walk_git(found, seen)
            self._walk_work("", found, collect=False, seen=seen)
        except BaseException:
            forced.join()
            raise
        if defer:
            self._pending = forced
        else:
            self._apply_forced(forced.result(), found, seen)
        for w in [w for w in self._watches if w not in seen]:
            self._unwatch(w)
        if self._limit_hits > hits:
            # Only a directory that newly went unwatched may hide an edit; the same misses as
            # before are the degraded state, already reported, not a new reason to snapshot.
            self._note_limit(found, rescan=bool(self._unwatched - unwatched_before)
                             or "limit" not in self._degraded)
        elif self._degraded.pop("limit", None) is not None:
            log.info("watch.recovered", watches=self.watch_count)
        if found.resync:  # empty at start: watch.ready says it
            log.info("watch.rescan", reason=", ".join(found.resync), watches=self.watch_count,
                     duration_ms=_ms(t0))

    def _walk_work(self, start: str, found: Found, *, collect: bool,
                   seen: set[Watch] | None = None) -> None:
        """Watch ``start`` (judged not ignored by the caller) and every non-ignored directory below.

        Each directory is watched *before* it is listed: whatever appears after the watch is an
        event, whatever was there before is in the listing. ``collect`` reports the files found
        (for a directory that just appeared, whose files were never reported).

        Level by level: git is asked about the entries of all the directories of one depth at
        once, one round trip to ``check-ignore`` per level instead of one per directory.
        """
        root = str(self.root)
        prefix = os.path.join(root, "")
        level = [start]
        while level:
            asks: list[tuple[str, bool]] = []
            for rel in level:
                w = Watch("work", rel)
                if seen is not None:
                    seen.add(w)
                full = prefix + rel if rel else root
                if not self._watch_dir(w, full):
                    continue
                listed = self._list(rel, full, collect)
                if listed is None:
                    continue
                entries, nested = listed
                if nested:
                    # A nested repository: one gitlink to git, never its files (see
                    # _on_work_event); watched only to say when its files change.
                    self._drop_work(rel, include_self=True)
                    if seen is not None:
                        seen.discard(w)
                    self._walk_nested(rel, seen)
                    if collect:
                        found.path(rel)
                    continue
                asks += entries
            if not asks:
                return
            try:
                answers = self._ignored_many(asks)
            except GitError as exc:
                if collect:
                    for path, is_dir in asks:
                        if not is_dir:
                            found.path(path)
                self._oracle_failed(exc, found)
                return
            level = []
            for (path, is_dir), ignored in zip(asks, answers):
                if ignored:
                    continue
                if is_dir:
                    level.append(path)
                else:
                    found.path(path)

    def _list(self, rel: str, full: str, collect: bool
              ) -> tuple[list[tuple[str, bool]], bool] | None:
        """What to ask git about in the work-tree directory ``rel`` (at ``full``): its
        directories, and its files too when ``collect``; and whether it is a nested repository
        (it holds a ``.git``). None when it cannot be listed."""
        asks: list[tuple[str, bool]] = []
        try:
            with os.scandir(full) as it:
                for e in it:
                    name = e.name
                    if name == ".git":
                        if rel:
                            return [], True
                        continue
                    try:
                        is_dir = e.is_dir(follow_symlinks=False)  # a symlink is a file to git
                    except OSError:
                        continue
                    if is_dir or collect:
                        asks.append((f"{rel}/{name}" if rel else name, is_dir))
        except (FileNotFoundError, NotADirectoryError):
            # Gone already; the event on its parent tells the rest.
            self._drop_work(rel, include_self=True)
            return None
        except OSError as exc:
            log.warning("watch.unreadable", path=rel or ".", error=exc.strerror)
            return None
        return asks, False

    def _walk_git(self, found: Found, seen: set[Watch]) -> None:
        """Watch the git dir(s), ``info/``, and the refs directories that can hold branches/tags.

        A ``.git`` directory that is not a repository yet (``git init`` half-way, when a re-walk
        looked) is watched itself, so that its ``HEAD`` or ``objects/`` appearing re-walks."""
        common = self._common_dir
        dotgit = os.path.join(self.root, ".git")
        self._unborn_git = dotgit if not common and os.path.isdir(dotgit) \
            and not os.path.islink(dotgit) else ""
        if self._unborn_git:
            seen.add(Watch("git", dotgit))
            self._watch_dir(Watch("git", dotgit), dotgit)
        if not common:
            return
        for d in dict.fromkeys((self._git_dir, common)):
            seen.add(Watch("git", d))
            self._watch_dir(Watch("git", d), d)
        for sub in ("info", "refs"):
            d = os.path.join(common, sub)
            if os.path.isdir(d):
                seen.add(Watch("git", d))
                self._watch_dir(Watch("git", d), d)
        for sub in ("heads", "tags"):
            d = os.path.join(common, "refs", sub)
            if os.path.isdir(d):
                self._walk_refs(d, found, seen=seen, report=False)

    def _walk_refs(self, start: str, found: Found, *, seen: set[Watch] | None = None,
                   report: bool = True) -> None:
        stack = [start]
        while stack:
            d = stack.pop()
            if seen is not None:
                seen.add(Watch("git", d))
            if not self._watch_dir(Watch("git", d), d):
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

    def _watch_dir(self, w: Watch, full: str) -> bool:
        """Add (or refresh) one watch; False when the directory cannot be watched."""
        old = self._watches.get(w)
        try:
            if (self._max_watches is not None and old is None
                    and len(self._watches) >= self._max_watches):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            handle = self._add(w, full, old)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EMFILE):
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
        self._watches[w] = handle
        return True

    def _unwatch(self, w: Watch) -> None:
        handle = self._watches.pop(w, None)
        if handle is not None:
            self._remove(handle)

    def _drop_work(self, rel: str, *, include_self: bool) -> None:
        """Drop the watches of ``rel`` and everything below it (moved away, deleted, nested repo).

        On a move inside the tree the OS may keep watching under the new name; dropping and
        re-walking the destination is simpler than patching paths, and just as cheap.
        """
        for w in list(self._subtree("work", rel, include_self)):
            self._unwatch(w)
        self._drop_subtree("nested", rel, include_self=include_self)
        for root in [r for r in self._nested if r.startswith(rel + "/") or
                     (include_self and r == rel) or not rel]:
            self._nested.pop(root, None)
        prefix = rel + "/"
        self._unwatched = {p for p in self._unwatched
                           if not (p.startswith(prefix) or (include_self and p == rel))}

    def _drop_subtree(self, kind: str, rel: str, *, include_self: bool) -> None:
        for w in list(self._subtree(kind, rel, include_self)):
            self._unwatch(w)

    def _drop_git_tree(self, path: str) -> None:
        for w in list(self._subtree("git", path, True)):
            self._unwatch(w)

    def _subtree(self, kind: str, path: str, include_self: bool) -> Iterator[Watch]:
        prefix = path + (os.sep if kind == "git" else "/")
        everything = kind == "nested" and not path  # under the root: every nested repository
        for w in self._watches:
            if w.kind == kind and (everything or w.path.startswith(prefix)
                                   or (include_self and w.path == path)):
                yield w

    def _note_limit(self, found: Found, *, rescan: bool) -> None:
        """Some directory could not be watched: say so once in the log, always in the status."""
        message = (f"watch limit reached: {self.watch_count} watches placed, "
                   f"{len(self._unwatched)} directories unwatched; {self._limit_advice()}")
        if "limit" not in self._degraded:
            log.warning("watch.limit_reached", watches=self.watch_count,
                        unwatched=len(self._unwatched), advice=self._limit_advice())
        self._degraded["limit"] = message
        if rescan:
            found.rescan["watch limit reached"] = None


class _Pending:
    """``call(*args)`` running in a thread from now on; :meth:`result` waits for it (and raises
    what it raised). ``done``, if given, is called in that thread as it ends, with the result
    (None when the call raised)."""

    def __init__(self, call, *args: Any, done=None) -> None:
        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(call, args, done),
                                        name="watcherd-watch", daemon=True)
        self._thread.start()

    def _run(self, call, args: tuple, done) -> None:
        try:
            self._value = call(*args)
        except BaseException as exc:  # handed to the caller by result()
            self._error = exc
        if done is not None:
            done(None if self._error is not None else self._value)

    def join(self) -> None:
        self._thread.join()

    def result(self) -> Any:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


def inotify_limit_advice(max_watches: int | None) -> str:
    """What to raise when inotify refuses a watch (``max_watches``: the test seam, if set)."""
    limit = max_watches if max_watches is not None else _kernel_watch_limit()
    return (f"raise fs.inotify.max_user_watches (now {limit}), e.g. "
            f"sysctl -w fs.inotify.max_user_watches={_suggest(limit)}")


def child_path(parent: str, name: str) -> str:
    """``name`` in the work-tree directory ``parent`` (relative, "" for the root)."""
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
