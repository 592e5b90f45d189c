"""The portable backend: watchdog's observers, behind the same interface as inotify's.

For host runners on a laptop (macOS: FSEvents) and anywhere without inotify; on Linux the
inotify backend stays the default (``watch.backend = "auto"``). The judgement is the shared one
(:class:`watcherd.watch.Judge`): the same ignore rules, git-directory events, walks of new
directories and rescan reasons. This module only places watches with watchdog and carries its
events over.

**The bridge.** watchdog delivers events on its own threads (one emitter per scheduled watch,
one dispatcher). The handler, on the dispatcher's thread, only drops events of directories not
watched and puts the rest in a bounded queue, writing one byte to a pipe when the queue goes
from empty to not empty: :meth:`WatchdogWatcher.fileno` is that pipe's read end, readable
exactly when :meth:`WatchdogWatcher.read` has something, like inotify's descriptor. When the
queue is full, what it holds is dropped and the next read reports a "queue overflow" rescan
(a re-walk, and a snapshot with a full scan); events keep being dropped until then. The
observer's thread never blocks on the daemon and memory never grows with a storm.

**Where watches go.** Two ways to use watchdog's schedules, chosen per observer:

* *pruned* — one non-recursive schedule per directory git would not ignore, exactly the
  inotify backend's watch list: ignored trees cost nothing. For inotify (Linux), kqueue (BSD:
  a descriptor per file, so watching ``node_modules/`` would exhaust them) and polling (a
  recursive poll would stat all of ``node_modules/`` every interval). Each schedule is one
  emitter thread of watchdog's.
* *recursive* — one recursive schedule at the root, events of ignored directories dropped by
  the handler (they are not in the watched set the walk keeps). For FSEvents (macOS) and
  ReadDirectoryChangesW (Windows), which watch a tree with one OS handle: a schedule per
  directory there would be one stream per directory, each receiving everything below it.

**Losses.** A full bridge queue and an inotify ``IN_Q_OVERFLOW`` are rescans (watchdog's own
inotify observer discards the events of a non-recursive watch on overflow without telling its
handlers, so this backend registers its own callback on watchdog's inotify instance); a limit
(ENOSPC, EMFILE) degrades loudly, as in the inotify backend. watchdog's FSEvents and Windows
emitters do not pass on their OS's "events were dropped" flags (FSEvents' MustScanSubDirs,
ReadDirectoryChangesW's overflow): those losses cannot be seen through watchdog.

**Idle.** The inotify observer's threads block without timeouts, as do FSEvents' and Windows':
no wakeups. The polling observer wakes each emitter every ``polling_interval`` by
construction: an idle daemon on it is not wakeup-free.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileAttribEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.api import BaseObserver, ObservedWatch
from watchdog.observers.polling import PollingObserverVFS

from watcherd.repo import Repo
from watcherd.watch import (
    ATTRIB,
    CLOSE_WRITE,
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

# Events the bridge holds before it gives up on them and asks for a rescan: a few seconds of an
# editor's or a `git checkout`'s writes in watched directories, ~1 MiB.
QUEUE_LIMIT = 10_000

# What a directory's schedule asks for. Not opened/closed-without-writing (reads: a snapshot's
# own `git add -A` opens every file) nor a directory's "modified" (one per entry event).
_EVENTS = [FileCreatedEvent, DirCreatedEvent, FileDeletedEvent, DirDeletedEvent, FileModifiedEvent,
           FileMovedEvent, DirMovedEvent, FileClosedEvent, FileAttribEvent]
# watchdog's event types say less than inotify's masks (FSEvents has no close-after-write; a poll
# sees only results), so a created or modified file also counts as written: a ref written in
# place is reported, at worst twice.
_MASKS = {"created": CREATE | CLOSE_WRITE, "modified": MODIFY | CLOSE_WRITE,
          "closed": CLOSE_WRITE, "attrib": ATTRIB, "deleted": DELETE}
_ROOT_GONE = "root gone"
_RECURSIVE_OBSERVERS = ("FSEventsObserver", "WindowsApiObserver")


def plan(observer: str = "native") -> tuple[str, bool]:
    """Which of watchdog's observers runs here, and whether it gets one recursive schedule."""
    if observer == "polling":
        return "PollingObserver", False
    if sys.platform.startswith("linux"):
        return "InotifyObserver", False
    from watchdog.observers import Observer

    return Observer.__name__, Observer.__name__ in _RECURSIVE_OBSERVERS


def describe(observer: str = "native", recursive: bool | None = None) -> str:
    """The observer and its schedule, as logs and ``config check`` say it."""
    name, default = plan(observer)
    how = "one recursive schedule at the root" if (default if recursive is None else recursive) \
        else "a schedule per directory git would not ignore"
    return f"{name}, {how}"


@dataclass(frozen=True)
class _Scheduled:
    """One watched directory: its identity when it was scheduled, and watchdog's watch (None
    when the recursive schedule at the root covers it)."""

    path: str
    identity: tuple[int, int]
    watch: ObservedWatch | None


class _Bridge:
    """Events from watchdog's threads to the daemon's loop: a bounded queue and a pipe."""

    def __init__(self, limit: int) -> None:
        self._r, self._w = os.pipe()
        for fd in (self._r, self._w):
            os.set_blocking(fd, False)
        self._lock = threading.Lock()
        self._limit = limit
        self._items: list[tuple[str, str, str, bool]] = []
        self._lost: dict[str, None] = {}
        self._signalled = False

    def fileno(self) -> int:
        return self._r

    def put(self, item: tuple[str, str, str, bool]) -> None:
        with self._lock:
            if self._lost:
                return  # a rescan is coming; it covers this event too
            if len(self._items) >= self._limit:
                self._items.clear()
                self._lost["queue overflow"] = None
            else:
                self._items.append(item)
            self._signal()

    def lost(self, reason: str) -> None:
        with self._lock:
            self._items.clear()
            self._lost[reason] = None
            self._signal()

    def take(self) -> tuple[list[tuple[str, str, str, bool]], tuple[str, ...]]:
        with self._lock:
            try:
                while os.read(self._r, 64):
                    pass
            except BlockingIOError:
                pass
            self._signalled = False
            items, self._items = self._items, []
            lost, self._lost = tuple(self._lost), {}
        return items, lost

    def close(self) -> None:
        os.close(self._r)
        os.close(self._w)

    def _signal(self) -> None:
        # One byte while anything is pending: the pipe never fills, the write never blocks.
        if not self._signalled:
            self._signalled = True
            os.write(self._w, b"\0")


class _Handler(FileSystemEventHandler):
    """Runs on watchdog's dispatcher thread: keep what concerns a watched directory, and nothing
    of the watched directory itself (its deletion comes from its parent's watch, in order with
    a new directory of the same name; the root's own deletion is the exception)."""

    def __init__(self, bridge: _Bridge, own: str, root: str, dirs: dict[str, Watch]) -> None:
        self._bridge, self._own, self._root, self._dirs = bridge, own, root, dirs

    def dispatch(self, event: FileSystemEvent) -> None:
        src = os.fsdecode(event.src_path)
        if src == self._own:
            if src == self._root and event.event_type == "deleted":
                self._bridge.put((_ROOT_GONE, src, "", True))
            return
        dest = os.fsdecode(event.dest_path)
        # `dirs` is written by the daemon's thread; a membership test is atomic.
        if os.path.dirname(src) in self._dirs or (dest and os.path.dirname(dest) in self._dirs):
            self._bridge.put((event.event_type, src, dest, event.is_directory))


class _Overflow:
    """A callback on watchdog's inotify instance, for the one thing its emitters keep to
    themselves: the kernel's queue overflowed (``watchdog.observers.inotify_c.WatchCallback``)."""

    def __init__(self, bridge: _Bridge) -> None:
        self._bridge = bridge

    def on_event(self, event: Any) -> None:
        """Events are the emitters' business."""

    def on_watch_deleted(self, wd: int) -> None:
        """The root's removal reaches the bridge through its emitter."""

    def on_queue_overflow(self) -> None:
        self._bridge.lost("queue overflow")


class WatchdogWatcher(Judge):
    """watchdog watches on the directories of a git workspace that git would not ignore.

    ``observer``: ``"native"`` (watchdog's observer for this platform) or ``"polling"`` (the
    fallback where there is none; every ``polling_interval`` seconds). ``recursive``: the
    schedule (see the module docstring); None picks it from the observer. ``queue_limit``: the
    bridge's bound. The last three are there for tests and benchmarks.
    """

    backend = "watchdog"

    def __init__(self, root: Path, repo: Repo, *, observer: str = "native",
                 polling_interval: float = 1.0, recursive: bool | None = None,
                 queue_limit: int = QUEUE_LIMIT, max_watches: int | None = None) -> None:
        if observer not in ("native", "polling"):
            raise ValueError(f"observer {observer!r} is not 'native' or 'polling'")
        super().__init__(root, repo, max_watches=max_watches)
        self._observer_kind = observer
        self._polling_interval = polling_interval
        self._recursive = recursive
        self._queue_limit = queue_limit
        self._bridge: _Bridge | None = None
        self._observer: BaseObserver | None = None
        self._inotify_fd: Any = None  # watchdog's InotifyFD, on Linux
        self._dirs: dict[str, Watch] = {}  # absolute path of each watched directory

    # -- public ----------------------------------------------------------------------------------

    def start(self) -> None:
        """Start watchdog's observer, then place the watches as the inotify backend would."""
        if self._bridge is not None:
            raise RuntimeError("watcher already started")
        self._bridge = _Bridge(self._queue_limit)
        observer = self._observer = self._make_observer()
        if self._recursive is None:
            self._recursive = plan(self._observer_kind)[1]
        # Started empty: a schedule on a running observer places its watch now, in this thread,
        # and says so when the OS refuses (a limit, a vanished directory).
        observer.start()
        root = str(self.root)
        if self._recursive:
            observer.schedule(_Handler(self._bridge, root, root, self._dirs), root,
                              recursive=True, event_filter=_EVENTS)
        self._place_all(observer=describe(self._observer_kind, self._recursive))

    def fileno(self) -> int:
        """The bridge's pipe: readable when :meth:`read` has something to return."""
        return self._require().fileno()

    def read(self) -> Batch:
        """Take what the bridge holds now and say what it means. Never waits for new events."""
        items, lost = self._require().take()
        if not items and not lost:
            return Batch()
        found = Found()
        hits = self._limit_hits
        for reason in lost:
            self._lost(reason, found)
        events = []
        for kind, src, dest, is_dir in items:
            if kind == _ROOT_GONE:
                self._root_gone(found)
                continue
            isdir = ISDIR if is_dir else 0
            if kind == "moved":
                events += self._at(src, MOVED_FROM | isdir)
                events += self._at(dest, MOVED_TO | isdir)
            else:
                events += self._at(src, _MASKS[kind] | isdir)
        self._prefetch([(child_path(w.path, name), bool(mask & ISDIR))
                        for w, name, mask in events if w.kind == "work" and name != ".git"])
        for w, name, mask in events:
            self._on_event(w, name, mask, found)
        return self._finish(found, hits)

    def _close_backend(self) -> None:
        """Stop watchdog's threads (their watches go with them)."""
        if self._observer is not None:
            self._observer.stop()
            self._observer.join()
            self._observer = None
        if self._inotify_fd is not None:
            self._inotify_fd.stop()
            self._inotify_fd.join()
            self._inotify_fd = None
        if self._bridge is not None:
            self._bridge.close()
            self._bridge = None
        self._dirs.clear()

    # -- setup -----------------------------------------------------------------------------------

    def _require(self) -> _Bridge:
        if self._bridge is None:
            raise RuntimeError("watcher is not started (or already closed)")
        return self._bridge

    def _make_observer(self) -> BaseObserver:
        if self._observer_kind == "polling":
            # lstat: a symlink is a file to git, and where it points is none of our business.
            return PollingObserverVFS(os.lstat, os.scandir,
                                      polling_interval=self._polling_interval)
        if not sys.platform.startswith("linux"):
            from watchdog.observers import Observer

            return Observer()
        # watchdog's InotifyObserver, but with an inotify instance of ours, to hear its overflows.
        from watchdog.observers.inotify import InotifyEmitter
        from watchdog.observers.inotify_c import CallbackId, InotifyConstants, InotifyFD

        fd = self._inotify_fd = InotifyFD()
        fd.start()
        overflow = _Overflow(self._require())
        fd.add_callback(os.fsencode(self.root),
                        InotifyConstants.IN_MASK_ADD | InotifyConstants.IN_DELETE_SELF
                        | InotifyConstants.IN_DONT_FOLLOW, overflow, CallbackId(id(overflow)))
        return BaseObserver(InotifyEmitter, inotify_fd=fd)

    # -- events ----------------------------------------------------------------------------------

    def _at(self, path: str, mask: int) -> list[tuple[Watch, str, int]]:
        """``path``'s event as (its watched directory, its name, mask); [] when that directory is
        not (or no longer) watched."""
        parent, name = os.path.split(path)
        w = self._dirs.get(parent)
        return [(w, name, mask)] if w is not None and name else []

    # -- the watch table -------------------------------------------------------------------------

    def _add(self, w: Watch, full: str, old: _Scheduled | None) -> _Scheduled:
        st = os.lstat(full)
        if not stat.S_ISDIR(st.st_mode):
            raise OSError(errno.ENOTDIR, f"{full} is not a directory")
        identity = (st.st_dev, st.st_ino)
        if old is not None:
            if old.identity == identity:
                return old  # a re-walk: keep the schedule, no gap in events
            # Another directory under this name (moved over it): its own schedule.
            self._remove(old)
        # Known before it is scheduled: the handler keeps its events from the first one on.
        self._dirs[full] = w
        watch = None
        if not self._recursive:
            observer = self._observer
            assert observer is not None and self._bridge is not None
            try:
                watch = observer.schedule(_Handler(self._bridge, full, str(self.root), self._dirs),
                                          full, recursive=False, event_filter=_EVENTS)
            except OSError:
                del self._dirs[full]
                raise
        return _Scheduled(full, identity, watch)

    def _remove(self, handle: _Scheduled) -> None:
        self._dirs.pop(handle.path, None)
        if handle.watch is not None and self._observer is not None:
            try:
                self._observer.unschedule(handle.watch)
            except KeyError:
                pass  # already gone with its emitter

    def _limit_advice(self) -> str:
        if self._inotify_fd is not None:
            return inotify_limit_advice(self._max_watches)
        return "raise the open-file limit (ulimit -n, launchctl limit maxfiles)"
