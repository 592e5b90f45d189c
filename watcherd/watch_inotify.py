"""The Linux default: inotify directly, on the directories git would not ignore.

Why inotify directly instead of a recursive watcher library: the directories worth watching are the
ones ``git add -A`` would look into. A workspace of 20,000 directories is usually ~50 of those plus a
``node_modules/``; putting a watch on every directory (watchdog, gitwatch) costs seconds, the watch
limit, and CPU on every ``npm install``, and a recursive rebuild after a queue overflow can livelock.
Here ignored directories never get a watch; git's own rules decide (:class:`watcherd.watch.Judge`).

The descriptor the daemon waits on is an epoll set of inotify's own descriptor and of an
eventfd that says "the force-added paths are known" once after start (the first walk does not
wait for them: :attr:`~watcherd.watch.Judge.defer_forced`); an idle workspace costs no wakeups
at all. The kernel's masks go to the shared judgement as they are; this module handles only what
is inotify's: the watch descriptors, ``IN_Q_OVERFLOW``, ``IN_IGNORED`` (a watch the kernel
dropped), a moved or removed root, and ENOSPC at ``fs.inotify.max_user_watches``.
"""

from __future__ import annotations

import errno
import os
import select
import sys
from pathlib import Path

from watcherd.errors import WorkspaceError
from watcherd.repo import Repo
from watcherd.watch import (
    CREATE,
    DELETE,
    ISDIR,
    MODIFY,
    MOVED_FROM,
    MOVED_TO,
    Batch,
    Found,
    Judge,
    Watch,
    child_path,
    inotify_limit_advice,
)

try:  # only installed on Linux
    from inotify_simple import INotify
    from inotify_simple import flags as _f
except ImportError:  # pragma: no cover - exercised on non-Linux only
    INotify = None  # type: ignore[assignment,misc]

if INotify is not None:
    _WORK_MASK = (_f.MODIFY | _f.ATTRIB | _f.CLOSE_WRITE | _f.MOVED_FROM | _f.MOVED_TO | _f.CREATE
                  | _f.DELETE | _f.DELETE_SELF | _f.MOVE_SELF
                  | _f.ONLYDIR | _f.DONT_FOLLOW | _f.EXCL_UNLINK)
    # Refs are written as `<ref>.lock`, then renamed: MOVED_TO (or CLOSE_WRITE for a direct write).
    _GIT_MASK = (_f.CLOSE_WRITE | _f.MOVED_FROM | _f.MOVED_TO | _f.CREATE | _f.DELETE
                 | _f.DELETE_SELF | _f.ONLYDIR | _f.DONT_FOLLOW | _f.EXCL_UNLINK)
    # The judgement reads inotify's masks as they are: its constants are inotify's bit values.
    assert (_f.MODIFY, _f.MOVED_FROM, _f.MOVED_TO, _f.CREATE, _f.DELETE, _f.ISDIR) == \
        (MODIFY, MOVED_FROM, MOVED_TO, CREATE, DELETE, ISDIR)


class InotifyWatcher(Judge):
    """inotify watches on the directories of a git workspace that git would not ignore.

    Use: ``start()`` once, then ``read()`` whenever ``fileno()`` is readable, ``close()`` at the end.
    """

    backend = "inotify"
    defer_forced = True

    def __init__(self, root: Path, repo: Repo, *, max_watches: int | None = None) -> None:
        if INotify is None or not sys.platform.startswith("linux"):
            raise WorkspaceError(
                f"watching {root} with inotify needs Linux (this is {sys.platform}); "
                "set watch.backend = \"auto\" or \"watchdog\" (pip install 'watcherd[watchdog]')")
        super().__init__(root, repo, max_watches=max_watches)
        self._inotify: INotify | None = None
        self._ready: select.epoll | None = None  # what fileno() is: inotify's fd and _known
        self._known = -1  # an eventfd: the force-added paths are known (Judge._wake)
        self._by_wd: dict[int, Watch] = {}
        self._deleted: set[int] = set()  # wds whose directory reported DELETE_SELF

    # -- public ----------------------------------------------------------------------------------

    def start(self) -> None:
        """Place the watches: the work tree minus what git ignores, and the few refs directories."""
        if self._inotify is not None:
            raise RuntimeError("watcher already started")
        try:
            self._inotify = INotify(nonblocking=True)
        except OSError as exc:
            if exc.errno == errno.EMFILE:
                raise WorkspaceError(
                    "cannot create an inotify instance: limit reached; raise "
                    "fs.inotify.max_user_instances (sysctl -w fs.inotify.max_user_instances=512)"
                ) from exc
            raise WorkspaceError(f"cannot create an inotify instance: {exc}") from exc
        self._known = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._ready = select.epoll()
        self._ready.register(self._inotify.fileno(), select.EPOLLIN)
        self._ready.register(self._known, select.EPOLLIN)
        self._place_all()

    def fileno(self) -> int:
        """Readable when :meth:`read` has something to return (an epoll descriptor)."""
        self._require()
        assert self._ready is not None
        return self._ready.fileno()

    def read(self) -> Batch:
        """Drain the events queued now and say what they mean. Never waits for new events
        (but for the force-added paths, right after start, while they are still looked for)."""
        inotify = self._require()
        found = Found()
        hits = self._limit_hits
        settling = self._pending is not None
        self._settle(found)
        events = inotify.read(timeout=0)
        if not events:
            return self._finish(found, hits) if settling else Batch()
        by_wd = self._by_wd
        asks = []
        for ev in events:
            w = by_wd.get(ev.wd)
            if w is not None and w.kind == "work" and ev.name and ev.name != ".git":
                asks.append((child_path(w.path, ev.name), bool(ev.mask & _f.ISDIR)))
        self._prefetch(asks)
        for ev in events:
            self._dispatch(ev, found)
        return self._finish(found, hits)

    @property
    def watch_count(self) -> int:
        """inotify watches in place (the kernel's count: one per watched directory)."""
        return len(self._by_wd)

    def _close_backend(self) -> None:
        """Drop every watch (closing the descriptor does)."""
        if self._ready is not None:
            self._ready.close()
            self._ready = None
        if self._known >= 0:
            os.close(self._known)
            self._known = -1
        if self._inotify is not None:
            self._inotify.close()
            self._inotify = None
        self._by_wd.clear()

    # -- events ----------------------------------------------------------------------------------

    def _require(self) -> INotify:
        if self._inotify is None:
            raise RuntimeError("watcher is not started (or already closed)")
        return self._inotify

    def _dispatch(self, ev, found: Found) -> None:
        if ev.mask & _f.Q_OVERFLOW:
            self._lost("queue overflow", found)
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
            if w == Watch("work", ""):
                self._degraded["root"] = (f"workspace {self.root} was moved away; "
                                          "restart watcherd to watch the new tree")
                found.rescan["workspace directory moved"] = None
        else:
            self._on_event(w, ev.name, ev.mask, found)

    def _on_watch_gone(self, wd: int, w: Watch, found: Found) -> None:
        """The kernel removed a watch we did not remove: its directory is gone (or unmounted)."""
        deleted = wd in self._deleted
        self._deleted.discard(wd)
        self._forget(wd)
        if w == Watch("work", ""):
            self._root_gone(found)
        elif w in (Watch("git", self._git_dir), Watch("git", self._common_dir)):
            # `rm -rf .git`: the working tree is still watched and snapshotted; a new .git is
            # found by the walk.
            found.rescan["git directory removed"] = None
            found.resync["git directory removed"] = None
        elif not deleted:
            # Not a deletion its parent reported: unmount or the like. Re-walk to be sure.
            found.rescan[f"watch on {w.path} dropped by the kernel"] = None
            found.resync["watch dropped"] = None
        # A deleted directory needs nothing more: its parent's watch reported the deletion.

    # -- the watch table -------------------------------------------------------------------------

    def _add(self, w: Watch, full: str, old: int | None) -> int:
        wd = self._require().add_watch(full, _GIT_MASK if w.kind == "git" else _WORK_MASK)
        old_w = self._by_wd.get(wd)
        if old_w is not None and old_w != w:
            # The same inode under a new path (a move we have not processed yet): the path moved.
            self._watches.pop(old_w, None)
        if old is not None and old != wd:
            # A different directory now has this name; the old one is gone or elsewhere.
            self._remove(old)
        self._by_wd[wd] = w
        self._deleted.discard(wd)
        return wd

    def _remove(self, wd: int) -> None:
        self._by_wd.pop(wd, None)
        self._deleted.discard(wd)
        if self._inotify is None:
            return
        try:
            self._inotify.rm_watch(wd)
        except OSError:
            pass  # EINVAL: the kernel dropped it already (directory deleted)

    def _forget(self, wd: int) -> None:
        w = self._by_wd.pop(wd, None)
        if w is not None and self._watches.get(w) == wd:
            del self._watches[w]

    def _limit_advice(self) -> str:
        return inotify_limit_advice(self._max_watches)

    def _wake(self) -> None:
        os.eventfd_write(self._known, 1)

    def _unwake(self) -> None:
        try:
            os.eventfd_read(self._known)
        except BlockingIOError:
            pass  # not woken
