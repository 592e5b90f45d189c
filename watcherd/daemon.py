"""``watcherd run``: the sidecar that turns edits into snapshots and snapshots into generations.

The imperative shell around :class:`watcherd.timing.Scheduler`: the watcher's batches, the control
endpoint and signals become scheduler events; the scheduler says when to snapshot and upload; git
and the store run in worker threads so the event loop stays responsive. Nothing wakes an idle
daemon but an event, except the systemd watchdog ping when systemd asks for one and a slow safety
rescan while watching is degraded.

Failures of git or the store are retried with backoff, forever; a workspace (or ``.git``) that
vanished, or anything else (a bug), ends the process with a non-zero status so systemd or
Kubernetes restarts it, never a half-alive daemon.
"""

from __future__ import annotations

import functools
import math
import os
import select
import signal
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import anyio
import anyio.from_thread
import anyio.to_thread

from watcherd import __version__, log, rollback, snapshot, timeline
from watcherd import manifest as mf
from watcherd import workspace as wsp
from watcherd.config import Config
from watcherd.control import ControlServer
from watcherd.errors import (
    BundleTooLarge,
    ConflictError,
    PreconditionFailed,
    StoreUnavailable,
    UsageError,
    WatcherdError,
    WorkspaceError,
)
from watcherd.generations import Generations, Limits
from watcherd.protocol import ChainPolicy
from watcherd.notify import Notifier
from watcherd.repo import Repo, open_repo
from watcherd.store import Store, open_store
from watcherd.timing import Action, Scheduler, Timing
from watcherd.watch import MAX_PATHS, Batch, Watcher, open_watcher

_log = log.get(__name__)
# While watching is degraded (watch limit, lost watches) events may be missing: snapshot this often
# anyway. A full `git add -A` finds what inotify did not say.
DEGRADED_RESCAN_INTERVAL = 60.0


@dataclass
class _Counters:
    snapshots: int = 0
    snapshot_failures: int = 0
    uploads: int = 0
    upload_failures: int = 0
    conflicts: int = 0
    uploaded_bytes: int = 0
    rescans: int = 0
    store_vanished: int = 0


class Daemon:
    """One workspace, one store key, one event loop."""

    def __init__(self, config: Config, *, notifier: Notifier | None = None) -> None:
        self.cfg = config
        self.repo: Repo = open_repo(config)
        self.cache = snapshot.Cache()
        self.mode = config.workspace.mode
        self.notifier = notifier or Notifier()
        w = config.watch
        self.timing = Timing(w.quiet_period, w.max_commit_delay, w.idle_timeout,
                             w.max_upload_interval)
        self.counters = _Counters()
        self.started_wall = time.time()
        self.watcher: Watcher | None = None
        self.store: Store | None = None
        self.generations: Generations | None = None
        self.sched: Scheduler | None = None
        self.last_snapshot: dict[str, Any] | None = None
        self.last_upload: dict[str, Any] | None = None
        self.last_error: dict[str, Any] | None = None
        self.conflict: dict[str, Any] | None = None
        self.store_vanished: dict[str, Any] | None = None
        self.too_large: str | None = None
        self.rescan_reasons: list[str] = []
        self._last_result: dict[str, Any] = {}
        self._try_unshallow = True
        self._signals = 0
        self._shutdown_deadline: float | None = None
        self._busy_since: dict[str, float] = {}
        # Each POST /snapshot waiting for its save: the event, and the outcome it will be given.
        self._save_waiters: list[tuple[anyio.Event, dict[str, Any]]] = []
        self._over = False  # the loop has ended: no new save can be waited for
        self._local_head: str | None = None  # the newest snapshot, as the last one reported it
        self._final_failure: str | None = None  # why the final save cannot succeed, if so
        self._rolling_back = False
        self._reading = False  # the watch loop has events in hand it has not acted on yet

    # -- life ------------------------------------------------------------------------------------

    async def run(self) -> int:
        """Run until a signal; 0 after a clean shutdown with everything saved."""
        self._wake = anyio.Event()
        self._watch_scope = anyio.CancelScope()
        self._watch_lock = anyio.Lock()
        # Handlers first: a SIGTERM during the setup or right after READY is queued here and
        # answered with the final save, not with the default action (death, nothing saved).
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            self._signal_source = signals
            try:
                await anyio.to_thread.run_sync(self._setup)
                async with anyio.from_thread.BlockingPortal() as portal:
                    control = self._start_control(portal)
                    try:
                        return await self._main()
                    finally:
                        if control:
                            control.close()
            finally:
                if self.watcher:
                    self.watcher.close()
                if self.store:
                    self.store.close()
                self.notifier.close()

    def _setup(self) -> None:
        ws = self.cfg.workspace.path
        if not ws.is_dir():
            raise WorkspaceError(f"workspace.path {ws} does not exist or is not a directory "
                                 "(create it, run watcherd restore, or fix workspace.path)")
        s = self.cfg.store
        self.store = open_store(s)  # first: a store that cannot be opened is a config error
        self._daemon_lock = self.repo.hold_daemon_lock()
        rollback.recover(self.repo)  # a rollback killed half-way: finished (or discarded) first
        snapshot.prepare(self.repo)
        self._abort_stale_uploads()
        self.generations = Generations(self.store, s.key,
                                       Limits(s.keep, s.warn_bundle_size, s.max_bundle_size,
                                              ChainPolicy(s.max_increments,
                                                          s.max_increment_ratio),
                                              s.keep_checkpoints))
        unsaved = self._unsaved_at_start()
        self.watcher = open_watcher(ws, self.repo, self.cfg.watch.backend)
        self.watcher.start()
        now = time.monotonic()
        self.sched = Scheduler(self.timing, now, unsaved_history=unsaved)
        # Edits made while no daemon watched (a crash, a restart) are found by one snapshot.
        self.sched.change(now)

    def _abort_stale_uploads(self) -> None:
        """Multipart uploads a killed daemon left behind are billed and never complete: abort this
        key's ones that are older than any upload could still be running (a racing pod's upload
        in flight is younger)."""
        abort = getattr(self.store, "abort_stale_uploads", None)
        if abort is None:
            return
        # A bundle of max_bundle_size at 1 MiB/s, and never less than an hour.
        older_than = max(3600.0, self.cfg.store.max_bundle_size / 2**20)
        try:
            aborted = abort(f"{self.cfg.store.key}/", older_than)
        except WatcherdError as exc:
            _log.warning("store.stale_uploads_not_checked", error=str(exc))
            return
        if aborted:
            _log.warning("store.stale_uploads_aborted", key=self.cfg.store.key, uploads=aborted,
                         note="multipart uploads left by a killed daemon")

    def _unsaved_at_start(self) -> bool:
        """Whether local snapshots are ahead of the store (a crash before the last upload)."""
        local = self._local_head = self.repo.snapshot_head()
        if local is None:
            return False
        try:
            manifest, _ = self.generations.read_manifest()
        except WatcherdError as exc:
            _log.warning("daemon.store_unreadable_at_start", error=str(exc),
                         note="will upload when the store answers")
            return True
        if manifest is None:
            return True
        stored = manifest.current
        # Only a workspace that carries the stored history was saved by it: one that came up from
        # the template (a restore that failed or never ran) must not say it is.
        if self.repo.bare.has_commit(stored.snapshot) and \
                self.repo.bare.is_ancestor(stored.snapshot, local):
            self.last_upload = {"at": stored.created_at, "generation": stored.generation,
                                "bytes": stored.size, "snapshot": stored.snapshot, "by": "store"}
        return stored.snapshot != local

    def _start_control(self, portal: anyio.from_thread.BlockingPortal) -> ControlServer | None:
        if not self.cfg.control.listen:
            return None
        server = ControlServer(self.cfg.control, self, portal.call)
        server.start()
        return server

    async def _main(self) -> int:
        assert self.watcher and self.sched
        self.notifier.ready(f"watching {self.watcher.watch_count} directories")
        w = self.cfg.watch
        _log.info("daemon.ready", workspace=str(self.cfg.workspace.path), mode=self.mode,
                  key=self.cfg.store.key, store=self.store.url, watches=self.watcher.watch_count,
                  generation=(self.last_upload or {}).get("generation"),
                  state_dir=str(self.repo.dir), config=str(self.cfg.file) if self.cfg.file else None,
                  timings={"quiet_period_s": w.quiet_period, "max_commit_delay_s": w.max_commit_delay,
                           "idle_timeout_s": w.idle_timeout,
                           "max_upload_interval_s": w.max_upload_interval,
                           "shutdown_timeout_s": w.shutdown_timeout},
                  pid=os.getpid(), version=__version__)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._watch_loop)
                tg.start_soon(self._signal_loop)
                if self.notifier.watchdog_interval:
                    tg.start_soon(self._watchdog_loop, self.notifier.watchdog_interval)
                code = await self._schedule_loop(tg)
                tg.cancel_scope.cancel()
            return code
        except BaseExceptionGroup as group:
            for exc in _leaves(group):
                if isinstance(exc, WatcherdError):
                    # A condition the daemon cannot get out of (the workspace is gone): say it in
                    # one line; the supervisor restarts us, or the operator reads why.
                    _log.error("daemon.failed", error=str(exc), kind=type(exc).__name__)
                else:
                    _log.error("daemon.crashed", error=f"{type(exc).__name__}: {exc}",
                               exc_info=exc)
            return 1
        finally:
            self._over = True
            # A POST /snapshot still waiting would keep the portal, and so the process, alive.
            self._release_waiters({"status": "shutting_down",
                                   "error": "watcherd stopped before this save finished"})

    # -- scheduling ------------------------------------------------------------------------------

    async def _schedule_loop(self, tg: anyio.abc.TaskGroup) -> int:
        sched = self.sched
        safety_at = 0.0
        while True:
            now = time.monotonic()
            stopping = self._shutdown_deadline is not None
            watch_degraded = bool(self.watcher.degraded) and not stopping
            if watch_degraded and now >= safety_at:
                tg.start_soon(self._safety_rescan)
                safety_at = now + DEGRADED_RESCAN_INTERVAL
            while (action := sched.due(now)) is not None:
                if action is Action.SNAPSHOT:
                    sched.snapshot_started(now)
                    self._busy_since["snapshot"] = now
                    tg.start_soon(self._snapshot)
                else:
                    sched.upload_started(now)
                    self._busy_since["upload"] = now
                    tg.start_soon(self._upload)
            if stopping and sched.shutdown_complete:
                if sched.status(now).refused:
                    # The final state is safe, but only beside the store's history: say where,
                    # and exit non-zero (a refused save is never reported as saved).
                    _log.error("daemon.stopped", saved=False,
                               conflict=(self.conflict or {}).get("saved_as"),
                               stored_generation=(self.last_upload or {}).get("generation"),
                               note="the store refused this workspace's history; its final state "
                                    "is kept under conflicts/")
                    return ConflictError.exit_status
                _log.info("daemon.stopped", saved=True,
                          generation=(self.last_upload or {}).get("generation"))
                return 0
            if stopping and self._final_failure is not None:
                self._report_unsaved(f"the final save cannot succeed: {self._final_failure}")
                return 1
            if stopping and now >= self._shutdown_deadline:
                self._report_unsaved("shutdown_timeout elapsed before the final save finished")
                return 1
            wake_at = [t for t in (sched.next_deadline(now), safety_at if watch_degraded else None,
                                   self._shutdown_deadline) if t is not None]
            with anyio.move_on_after(max(min(wake_at) - now, 0) if wake_at else math.inf):
                await self._wake.wait()
            self._wake = anyio.Event()

    def _kick(self) -> None:
        self._wake.set()
        if self._save_waiters and not self.sched.save_pending:
            self._release_waiters(self._last_result)

    def _release_waiters(self, outcome: dict[str, Any]) -> None:
        # The outcome is copied now: by the time a waiter runs, another operation may have ended.
        for done, result in self._save_waiters:
            result.update(outcome)
            done.set()
        self._save_waiters.clear()

    async def _snapshot(self) -> None:
        started = time.monotonic()
        try:
            snap = await anyio.to_thread.run_sync(snapshot.take, self.repo, self.mode, self.cache,
                                                  abandon_on_cancel=True)
        except (WatcherdError, OSError) as exc:  # OSError: a full or read-only disk, retried
            self.counters.snapshot_failures += 1
            self._record_error("snapshot", exc)
            self.sched.snapshot_failed(time.monotonic())
            self._last_result = {"status": "failed", "error": log.redact(str(exc))}
        else:
            self.sched.snapshot_done(time.monotonic(), committed=bool(snap.commit))
            self._local_head = snap.snapshot_head
            if snap.commit:
                due = self.sched.status(time.monotonic()).next_upload_at
                if due is not None:
                    _log.info("upload.scheduled", commit=snap.commit,
                              due_at=_iso(time.time() + max(due - time.monotonic(), 0)),
                              because="idle_timeout after the last change, at the latest "
                                      "max_upload_interval after the oldest unsaved one")
                self.counters.snapshots += 1
                self.last_snapshot = {"at": _iso(time.time()), "commit": snap.commit,
                                      "files": snap.files, "head": snap.head,
                                      "duration_ms": round((time.monotonic() - started) * 1000, 1)}
                self._last_result = {"status": "snapshotted", "commit": snap.commit}
            elif self.sched.status(time.monotonic()).refused and self.conflict:
                # Nothing new, and the newest state is only in a conflict copy: not saved.
                self._last_result = {"status": "conflict", "saved_as": self.conflict["saved_as"],
                                     "error": self.conflict["reason"]}
            else:
                self._last_result = {"status": "unchanged",
                                     "generation": (self.last_upload or {}).get("generation")}
        finally:
            self._busy_since.pop("snapshot", None)
            self._kick()

    async def _upload(self) -> None:
        try:
            result = await anyio.to_thread.run_sync(self._save, abandon_on_cancel=True)
        except ConflictError as exc:
            # The workspace's state is safe under conflicts/ (once per divergence), but it is not
            # in the store's history: it stays unsaved, and says so, until an upload succeeds.
            self.counters.conflicts += 1
            self.conflict = {"at": _iso(time.time()), "saved_as": exc.conflict_name,
                             "snapshot": exc.snapshot, "reason": log.redact(str(exc)),
                             "copies": getattr(exc, "copies", None)}
            self.sched.upload_refused(time.monotonic())
            self._last_result = {"status": "conflict", "saved_as": exc.conflict_name,
                                 "error": log.redact(str(exc))}
        except BundleTooLarge as exc:
            self.too_large = str(exc)
            self._upload_failed(exc)
        except (WatcherdError, OSError) as exc:
            self._upload_failed(exc)
        else:
            self.sched.upload_succeeded(time.monotonic())
            self.too_large = None
            self.last_error = None
            self.conflict = None
            if result.store_vanished:
                self.counters.store_vanished += 1
                self.store_vanished = {"at": _iso(time.time()),
                                       "generation": result.generation}
            if result.status == "saved":
                self.counters.uploads += 1
                self.counters.uploaded_bytes += result.bytes
                self.last_upload = {"at": _iso(time.time()), "generation": result.generation,
                                    "bytes": result.bytes, "snapshot": result.snapshot,
                                    "by": "this daemon"}
            elif result.generation is not None and \
                    (self.last_upload or {}).get("snapshot") != result.snapshot:
                # The store already has this history: an earlier attempt's write landed but its
                # answer was lost. Without this, status and metrics would say the last upload is
                # older than it is (and alert on it) until the next edit.
                _log.info("generation.already_saved", key=self.cfg.store.key,
                          generation=result.generation, snapshot=result.snapshot)
                self.last_upload = {"at": _iso(time.time()), "generation": result.generation,
                                    "bytes": None, "snapshot": result.snapshot, "by": "store"}
            self._last_result = {"status": result.status, "generation": result.generation,
                                 "bytes": result.bytes, "snapshot": result.snapshot}
        finally:
            self._busy_since.pop("upload", None)
            self._kick()

    def _save(self):
        try_unshallow, self._try_unshallow = self._try_unshallow, False  # ask the origin once
        try:
            # Compaction (a new full bundle) only while idle: the final save is an increment.
            result = self.generations.save(self.repo, template_url=self.cfg.restore.template_url,
                                           try_unshallow=try_unshallow,
                                           compact=self._shutdown_deadline is None)
        except ConflictError as exc:
            try:
                exc.copies = len(self.generations.conflicts())
            except WatcherdError:
                exc.copies = None
            raise
        self.repo.maintain()
        return result

    def _upload_failed(self, exc: WatcherdError | OSError) -> None:
        if self._shutdown_deadline is not None and \
                not isinstance(exc, (StoreUnavailable, PreconditionFailed)):
            # Shutting down, and retrying cannot help (a bundle too large, access denied, a full
            # disk): stop now with the real reason, rather than blame the timeout later.
            self._final_failure = log.redact(str(exc))
        self.counters.upload_failures += 1
        now = time.monotonic()
        self.sched.upload_failed(now)
        status = self.sched.status(now)
        retry_in = (status.next_upload_retry_at - now) if status.next_upload_retry_at else None
        self._record_error("upload", exc, attempt=status.upload_failures,
                           retry_in_s=round(retry_in, 1) if retry_in is not None else None)
        self._last_result = {"status": "failed", "error": log.redact(str(exc))}

    def _record_error(self, op: str, exc: WatcherdError | OSError, **facts: Any) -> None:
        transient = isinstance(exc, StoreUnavailable)  # the store said "later"; others need a fix
        # One bounded line for the status: what a person reads, never a tool's raw output.
        said = " ".join(log.redact(str(exc)).split())[:500]
        self.last_error = {"at": _iso(time.time()), "op": op, "error": said, **facts}
        _log.warning(f"{op}.failed", error=str(exc), kind=type(exc).__name__,
                     transient=transient, key=self.cfg.store.key, **facts)

    # -- event sources ---------------------------------------------------------------------------

    async def _watch_loop(self) -> None:
        watcher = self.watcher
        with self._watch_scope:
            await self._watch(watcher)

    async def _watch(self, watcher: Watcher) -> None:
        while True:
            await anyio.wait_readable(watcher.fileno())
            self._reading = True
            try:
                async with self._watch_lock:
                    try:
                        # Abandoned, not awaited, when the daemon ends: a read can wait on git's
                        # check-ignore (10 s per question where the agent made a .gitignore a
                        # FIFO), and the exit shutdown_timeout promised must not.
                        batch = await anyio.to_thread.run_sync(watcher.read,
                                                               abandon_on_cancel=True)
                    except (OSError, WorkspaceError):
                        self._check_workspace()  # a vanished workspace explains it in one line
                        raise
                self._on_batch(batch)
            finally:
                self._reading = False
            self._check_workspace()

    def _events_unread(self) -> bool:
        """Whether the watcher holds events the scheduler has not acted on yet: queued (the
        kernel queues an inotify event before the write that caused it returns) or being read.
        False means every write made before the question has been judged."""
        if self._reading:
            return True
        if self.watcher is None:
            return False
        poller = select.poll()  # not select(): it cannot take a descriptor past 1023
        try:
            poller.register(self.watcher.fileno(), select.POLLIN)
        except (OSError, ValueError):  # closed: nothing more will be read
            return False
        return any(mask & select.POLLIN for _, mask in poller.poll(0))

    def _check_workspace(self) -> None:
        """End the daemon when the workspace directory is gone.

        Nothing is left to watch or snapshot: retrying for ever would be a daemon that looks
        alive and protects nothing. Exiting non-zero lets systemd or Kubernetes restart it, after
        a restore, with a workspace to protect. (A removed ``.git`` is not such a case: the
        working tree is still snapshotted.)
        """
        root = self.watcher.root
        if not root.is_dir():
            raise WorkspaceError(f"the workspace {root} was removed while watcherd ran; nothing "
                                 "is left to watch or snapshot. Restore the workspace "
                                 "(watcherd restore) and start watcherd again")

    async def _safety_rescan(self) -> None:
        """While degraded: re-walk (the limit may have been raised) and snapshot whatever changed."""
        async with self._watch_lock:
            batch = await anyio.to_thread.run_sync(self.watcher.resync)
        self._on_batch(batch)
        self.cache.changed(None)
        self.sched.change(time.monotonic())  # events may be missing: a full snapshot finds them
        self._kick()

    def _on_batch(self, batch: Batch) -> None:
        if batch.rescan:
            self.counters.rescans += 1
            self.rescan_reasons = list(batch.rescan)
        if batch.relevant:
            # Where to look for a repository that appeared in a directory saved as files: what
            # the batch names, unless it may have missed something.
            self.cache.changed(None if batch.rescan or len(batch.paths) >= MAX_PATHS
                               else batch.paths)
            self.sched.change(time.monotonic())
            _log.debug("watch.change", paths=list(batch.paths[:10]), files=len(batch.paths),
                       refs=list(batch.refs), rescan=list(batch.rescan))
            self._kick()

    async def _signal_loop(self) -> None:
        async for signum in self._signal_source:
            self._signals += 1
            name = signal.Signals(signum).name
            if self._signals > 1:
                self._report_unsaved(f"second {name}: exiting at once")
                os._exit(1)
            timeout = self.cfg.watch.shutdown_timeout
            _log.info("daemon.stopping", signal=name, shutdown_timeout_s=timeout)
            self.notifier.stopping("final save")
            self.notifier.extend_timeout(timeout + 5)
            self._shutdown_deadline = time.monotonic() + timeout
            # A git add still running by half of it gives way to the last resort (the saved
            # files that changed, read by watcherd itself: snapshot._save_changed); the upload
            # needs the rest.
            self.cache.hurry_by[0] = time.monotonic() + timeout / 2
            self._watch_scope.cancel()  # the final snapshot sees everything up to now
            self.sched.shutdown(time.monotonic())
            self._kick()

    async def _watchdog_loop(self, interval: float) -> None:
        while True:
            ok, _ = self.healthy()
            if ok:
                self.notifier.watchdog()
            await anyio.sleep(interval)

    # -- what the control endpoint calls (on the event loop) --------------------------------------

    def healthy(self) -> tuple[bool, str]:
        now = time.monotonic()
        for op, since in self._busy_since.items():
            if now - since > 3600:
                return False, f"{op} running for {round(now - since)}s"
        if self._signals:
            return True, "stopping"
        return True, "ok"

    def activity(self) -> None:
        self.sched.activity(time.monotonic())
        self._kick()

    async def snapshot_now(self) -> dict[str, Any]:
        if self._signals or self._over:
            return {"status": "shutting_down"}
        done, result = anyio.Event(), {}
        self._save_waiters.append((done, result))
        self.sched.request_save(time.monotonic())
        self._kick()
        await done.wait()
        return result

    async def checkpoint_now(self, name: str, note: str) -> dict[str, Any]:
        """Snapshot and save now, then label the generation that holds it ``name``."""
        problem = mf.checkpoint_name_problem(name, note)
        if problem:
            return {"status": "invalid", "error": problem}
        saved = await self.snapshot_now()
        if saved.get("status") not in ("saved", "unchanged"):
            return {**saved, "error": "not labelled: the state could not be saved: "
                    f"{saved.get('error') or saved.get('status')}"}
        if saved.get("generation") is None:
            return {"status": "refused", "error": "nothing to label: the workspace is empty "
                    "and nothing is stored"}
        try:
            label = await anyio.to_thread.run_sync(self.generations.label, saved["generation"],
                                                   name, note)
        except UsageError as exc:  # pruned meanwhile: a race with another writer
            return {"status": "refused", "error": str(exc)}
        except WatcherdError as exc:
            return {"status": "failed", "error": log.redact(str(exc))}
        return {"status": "ok", "checkpoint": label.name, "generation": label.generation,
                "snapshot": label.snapshot, "created_at": label.created_at, "note": label.note}

    async def snapshots(self, since: str | None) -> dict[str, Any]:
        """The snapshot timeline (``watcherd log``): ``{"status", "key", "snapshots": [...],
        "checkpoints": [...]}``, newest first; ``store_error`` when the store could not say which
        generation holds what."""
        try:
            when = timeline.parse_moment(since) if since else None
        except ValueError:
            return {"status": "invalid", "error": f"since {wsp.printable(since or '')[:60]!r}: "
                    "not a time (2026-11-26T10:00:00Z) or an age (\"2h\")"}
        return await anyio.to_thread.run_sync(
            functools.partial(timeline.report, self.repo, self.generations, since=when))

    async def rollback_now(self, request: dict[str, Any]) -> dict[str, Any]:
        """Save the current state, put the workspace back to the state ``request`` names (see
        :func:`watcherd.rollback.parse_request`), save that. One at a time."""
        if self._signals or self._over:
            return {"status": "shutting_down"}
        try:
            name, before, undo = rollback.parse_request(request)
        except UsageError as exc:
            return {"status": "invalid", "error": str(exc)}
        if self._rolling_back:
            return {"status": "refused", "error": "a rollback is already running"}
        self._rolling_back = True
        try:
            return await self._rollback(name, before, undo)
        except rollback.RollbackRefused as exc:
            return {"status": "refused", "error": str(exc)}
        except UsageError as exc:
            return {"status": "invalid", "error": str(exc)}
        except (WatcherdError, OSError) as exc:
            _log.warning("rollback.failed", error=str(exc), kind=type(exc).__name__)
            return {"status": "failed", "error": log.redact(str(exc))}
        finally:
            self._rolling_back = False

    async def _rollback(self, name: str | None, before: Any, undo: bool) -> dict[str, Any]:
        ws = self.cfg.workspace.path
        rollback.refuse_read_only(ws)
        manifest, _ = await anyio.to_thread.run_sync(self.generations.read_manifest)
        target = await anyio.to_thread.run_sync(functools.partial(
            rollback.resolve, self.repo, manifest, name, before=before, undo=undo))
        await anyio.to_thread.run_sync(rollback.fetch_target, self.repo, self.generations,
                                       manifest, target)
        await anyio.to_thread.run_sync(lambda: rollback.check_quiet(wsp.locate(ws)))
        saved = await self.snapshot_now()
        if saved.get("status") not in ("saved", "unchanged"):
            return {**saved, "error": "the rollback did not start: the current state could not be "
                    f"saved first ({saved.get('error') or saved.get('status')})"}
        # The watcher waits meanwhile; the events of the rollback's own writes are read and
        # dropped before it goes on: they are not activity.
        async with self._watch_lock:
            try:
                came_from = await anyio.to_thread.run_sync(self._apply_rollback, target)
            finally:
                await anyio.to_thread.run_sync(self._drop_own_events)
        saved = await self.snapshot_now()
        result = {"status": "rolled_back", "target": target.snapshot, "said": target.said,
                  "undo": came_from, "generation": saved.get("generation"),
                  "saved": saved.get("status")}
        if saved.get("status") not in ("saved", "unchanged"):
            result["error"] = f"rolled back, but not saved yet: {saved.get('error')}"
        return result

    def _apply_rollback(self, target: rollback.Target) -> str:
        with self.repo.lock():
            return rollback.apply(self.repo, target, mode=self.mode, cache=self.cache)

    def _drop_own_events(self) -> None:
        """Read what the watcher queued (the rollback's writes) without acting on it, then
        re-walk: the git directory is a new one, its watches must be too."""
        fd = self.watcher.fileno()
        for _ in range(10_000):  # bounded: edits racing the rollback are found by the next save
            if not select.select([fd], [], [], 0)[0]:
                break
            self.watcher.read()
        self.watcher.resync()

    def status(self) -> dict[str, Any]:
        now_m, now_w = time.monotonic(), time.time()
        s = self.sched.status(now_m)

        def wall(t: float | None) -> str | None:
            return None if t is None else _iso(now_w - (now_m - t))

        def age_ms(t: float | None) -> int | None:
            return None if t is None else round((now_m - t) * 1000)

        last_up_unix = _unix(self.last_upload["at"]) if self.last_upload else None
        last_snap_unix = _unix(self.last_snapshot["at"]) if self.last_snapshot else None
        return {
            "state": "stopping" if s.shutting_down else str(s.state),
            "idle": s.idle,
            # Not in state nor idle: most events are writes the rules ignore (a dev server's
            # log), which are no activity; a caller that must know a write was judged asks this.
            "events_unread": self._events_unread(),
            "idle_ms": age_ms(s.last_activity_at),
            "last_activity_at": wall(s.last_activity_at),
            "dirty_since": wall(s.dirty_since),
            "oldest_unsaved_change_age_ms": age_ms(s.dirty_since),
            "snapshotting": s.snapshotting,
            "uploading": s.uploading,
            "rolling_back": self._rolling_back,
            "last_snapshot": self.last_snapshot,
            "last_upload": self.last_upload,
            "pending_retries": {"upload": s.upload_failures, "snapshot": s.snapshot_failures,
                                "next_upload_retry_at": wall(s.next_upload_retry_at),
                                "next_snapshot_retry_at": wall(s.next_snapshot_retry_at)},
            "last_error": self.last_error,
            "conflict": self.conflict,
            "refused": s.refused,
            "store_vanished": self.store_vanished,
            "watches": self.watcher.watch_count if self.watcher else 0,
            "degraded": self._degraded(),
            "last_rescan_reasons": self.rescan_reasons,
            "workspace": str(self.cfg.workspace.path),
            "mode": self.mode,
            "store": {"url": self.store.url, "key": self.cfg.store.key,
                      "conditional_writes": self.store.conditional_writes},
            "pid": os.getpid(),
            "version": __version__,
            "started_at": _iso(self.started_wall),
            "counters": {**self.counters.__dict__,
                        "last_upload_unix": last_up_unix,
                        "last_upload_age_s": None if last_up_unix is None else now_w - last_up_unix,
                        "last_snapshot_unix": last_snap_unix},
        }

    def _degraded(self) -> list[str]:
        reasons = list(self.watcher.degraded) if self.watcher else []
        reasons += [log.redact(p) for p in self.cache.problems_all()]
        reasons += [f"nested repository {p} is not saved: {log.redact(why)}"
                    for p, why in sorted(self.cache.not_saved().items())]
        if self.too_large:
            reasons.append(self.too_large)
        if self.store is not None and self.store.conditional_writes is False:
            reasons.append("the store ignores conditional writes: split-brain protection is "
                           "best-effort")
        return reasons

    def _report_unsaved(self, why: str) -> None:
        """Say exactly what did not reach the store."""
        s = self.sched.status(time.monotonic())
        local = self._local_head  # no git on the event loop: what the last snapshot said
        stored = (self.last_upload or {}).get("snapshot")
        _log.error("shutdown.incomplete", reason=why, state=str(s.state),
                   unsaved_since=_iso(time.time() - (time.monotonic() - s.dirty_since))
                   if s.dirty_since is not None else None,
                   local_snapshot=local, stored_snapshot=stored,
                   stored_generation=(self.last_upload or {}).get("generation"),
                   snapshotting=s.snapshotting, uploading=s.uploading,
                   state_dir=str(self.repo.dir),
                   lost="the snapshots above stay in watcherd's state directory only: they reach "
                        "the store if that directory survives to the next run (systemd's "
                        "StateDirectory=, a persistent volume); with an emptyDir they go with "
                        "the pod")


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


def _iso(unix: float) -> str:
    return datetime.fromtimestamp(unix, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _unix(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
