"""When to snapshot and when to upload: the daemon's timing as a pure state machine.

Every decision about time lives here, in a :class:`Scheduler` that is told what happened and asked
what to do. It never reads a clock, sleeps, starts a thread or touches git: each method takes
``now`` (monotonic seconds, as floats) from the caller. That keeps the rules that bound data loss
testable exhaustively, with a fake clock, in milliseconds; the daemon around it stays a thin loop.

The rules (``DESIGN.md``, "Timing" and invariants 5 and 6):

* snapshot ``quiet_period`` after the last relevant change, and under continuous change at least
  ``max_commit_delay`` after the first change not yet in a snapshot;
* no relevant change or outside activity for ``idle_timeout`` → idle → upload if there is
  committed history the store does not have (after snapshotting any changes still pending);
* whatever the idle timer says, upload at least ``max_upload_interval`` after the oldest unsaved
  change; failed uploads (and snapshots) are retried with capped exponential backoff and jitter, for
  ever;
* nothing pending → no deadline: an idle daemon sleeps until an event.

Two lanes, snapshot and upload, each with at most one operation in flight. A snapshot may run while
a (possibly long) upload is in flight, so commits keep coming under continuous editing; an upload is
not *proposed* while a snapshot is in flight, so that it carries that snapshot.

Driving it (the imperative shell)::

    sched = Scheduler(timing, now=monotonic())
    while True:
        now = monotonic()
        while (action := sched.due(now)) is not None:
            if action is Action.SNAPSHOT:
                sched.snapshot_started(now)     # BEFORE git reads the tree
                ...run the snapshot; later snapshot_done(now, committed) or snapshot_failed(now)
            else:
                sched.upload_started(now)       # BEFORE the bundle reads the refs
                ...run the upload; later upload_succeeded(now) or upload_failed(now)
        wait for an event (change, activity, request, an operation ending, a signal)
              or until sched.next_deadline(now); None means: no timeout at all

What a snapshot or an upload covers is decided by *call order*, not by timestamps: a change reported
before ``snapshot_started`` is covered by that snapshot, one reported after it is not (even with the
same timestamp), so a snapshot can never swallow a change it did not see. A change whose event is
processed late only costs one extra snapshot that finds nothing. The same holds for snapshots
finishing after ``upload_started``: they count as not uploaded.
"""

from __future__ import annotations

import enum
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, fields

from watcherd.errors import ConfigError

__all__ = ["Action", "Backoff", "Scheduler", "SchedulerStatus", "State", "Timing"]


@dataclass(frozen=True)
class Timing:
    """The four durations (seconds) that decide when to snapshot and upload (config ``[watch]``).

    Validated here, not only in the config loader, because a zero or negative period would turn the
    event-driven daemon into a busy loop.
    """

    quiet_period: float = 2.0
    max_commit_delay: float = 30.0
    idle_timeout: float = 60.0
    max_upload_interval: float = 600.0

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
                or value <= 0
            ):
                raise ConfigError(
                    f"watch.{field.name} must be a positive, finite duration, got {value!r}"
                )


@dataclass(frozen=True)
class Backoff:
    """Capped exponential backoff with jitter, for retrying failed uploads and snapshots.

    The n-th consecutive failure waits ``min(cap, base * factor**(n-1))``, shortened by a random
    fraction of up to ``jitter`` of itself. Jitter only ever shortens the wait, so the cap is a hard
    ceiling and the wait is always positive (a retry is never scheduled in the past); it spreads the
    retries of many pods that lost the same store at the same moment.
    """

    base: float = 1.0
    factor: float = 2.0
    cap: float = 300.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if not (math.isfinite(self.base) and self.base > 0):
            raise ValueError(f"backoff base must be positive, got {self.base!r}")
        if not (math.isfinite(self.factor) and self.factor >= 1):
            raise ValueError(f"backoff factor must be >= 1, got {self.factor!r}")
        if not (math.isfinite(self.cap) and self.cap >= self.base):
            raise ValueError(f"backoff cap must be >= base, got {self.cap!r}")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"backoff jitter must be in [0, 1), got {self.jitter!r}")

    def delay(self, failures: int, u: float) -> float:
        """Seconds to wait after ``failures`` consecutive failures (1 = the first); u in [0, 1)."""
        try:
            raw = self.base * float(self.factor) ** max(failures - 1, 0)
        except OverflowError:  # a store down for days: the exponent alone overflows a float
            raw = math.inf
        u = min(max(u, 0.0), 1.0)  # a misbehaving random source must not break the guarantees
        return min(raw, self.cap) * (1.0 - self.jitter * u)


class Action(enum.Enum):
    """What :meth:`Scheduler.due` asks the daemon to start now."""

    SNAPSHOT = "snapshot"
    UPLOAD = "upload"


class State(enum.StrEnum):
    """One word for the status endpoint, about the data (what is in flight is reported separately).

    Ordered by what matters most: unsnapshotted edits hide un-uploaded history, which hides idle.
    """

    CHANGING = "changing"
    """Relevant changes seen that no finished snapshot holds yet (a snapshot may be running)."""
    DIRTY = "dirty"
    """Every change is in a snapshot, but some snapshots are not in the store yet."""
    CONFLICT = "conflict"
    """The store refused the newest snapshots (kept under ``conflicts/``, not in its history)."""
    CLEAN = "clean"
    """Nothing unsaved: the store has everything (or the workspace is as restored); user active."""
    IDLE = "idle"
    """Clean, and no change or activity for ``idle_timeout``: the daemon sleeps until an event."""


@dataclass(frozen=True)
class SchedulerStatus:
    """A snapshot of the scheduler for ``GET /status`` and the metrics.

    Times are the scheduler's monotonic seconds; the shell converts them to wall-clock time. The age
    of the oldest unsaved change is ``now - dirty_since``.
    """

    state: State
    idle: bool
    """No relevant change or outside activity for ``idle_timeout`` (independent of ``state``)."""
    snapshotting: bool
    uploading: bool
    save_requested: bool
    """A "snapshot now" (or the shutdown's final save) has not finished yet."""
    shutting_down: bool
    last_activity_at: float | None
    """Last relevant change or outside "user is active" signal; None if none since start."""
    last_change_at: float | None
    dirty_since: float | None
    """Time of the oldest change the store does not have; None when nothing is unsaved."""
    refused: bool
    """The store refused a save and nothing since was accepted: those changes are only in a
    conflict copy."""
    last_snapshot_at: float | None
    """When the last snapshot that committed something finished."""
    last_upload_at: float | None
    """When the last successful upload finished."""
    upload_failures: int
    """Consecutive failed uploads; 0 after a success."""
    next_upload_retry_at: float | None
    snapshot_failures: int
    next_snapshot_retry_at: float | None
    next_deadline: float | None
    next_upload_at: float | None
    """When an upload is due, as things stand (None: nothing to upload, or a snapshot first)."""


def _earliest(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)


def _latest(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return max(a, b)


class Scheduler:
    """The timing state machine: told events and outcomes, asked :meth:`due`/:meth:`next_deadline`.

    ``now`` is a monotonic clock in seconds; it only has to be consistent, not real. The scheduler
    starts "clean, nothing unsaved": right after a restore the workspace *is* the stored generation.
    Pass ``unsaved_history=True`` when the shell knows the local snapshots are ahead of the store
    (a previous daemon died before uploading); they are then uploaded at the next idle.

    ``jitter`` returns floats in [0, 1); inject ``random.Random(seed).random`` to make retries
    deterministic in tests.
    """

    def __init__(
        self,
        timing: Timing,
        now: float,
        *,
        backoff: Backoff | None = None,
        jitter: Callable[[], float] = random.random,
        unsaved_history: bool = False,
    ) -> None:
        self._timing = timing
        self._backoff = backoff if backoff is not None else Backoff()
        self._jitter = jitter
        self._started_at = now

        self._last_activity_at: float | None = None
        self._last_change_at: float | None = None
        # Changes reported since the last snapshot_started: first one (max_commit_delay), last one
        # (quiet_period).
        self._pending_since: float | None = None
        self._pending_last: float | None = None

        # The snapshot in flight and the changes it covers (put back as pending if it fails).
        self._snapshotting = False
        self._snapshot_started_at = 0.0
        self._snapshot_forced = False
        self._covered_since: float | None = None
        self._covered_last: float | None = None
        self._last_snapshot_at: float | None = None
        self._snapshot_failures = 0
        self._snapshot_retry_at: float | None = None

        # Committed history the store does not have, as the time of its oldest change. While an
        # upload is in flight, _history_since is what that upload carries and _later_history_since
        # what was committed after it started (and so is not in it).
        self._history_since: float | None = now if unsaved_history else None
        self._later_history_since: float | None = None

        self._uploading = False
        self._upload_forced = False
        # The oldest change of a save the store refused (kept under conflicts/): unsaved, but not
        # a reason to upload again until there is something new.
        self._refused_since: float | None = None
        self._last_upload_at: float | None = None
        self._upload_failures = 0
        self._upload_retry_at: float | None = None

        # "Save now": first a snapshot started after the request, then an upload, both ignoring
        # timers and backoff.
        self._save_snapshot_at: float | None = None
        self._save_upload_at: float | None = None
        self._shutdown_at: float | None = None

    # -- events ----------------------------------------------------------------------------------

    def change(self, now: float) -> None:
        """A relevant change (a non-ignored path, or a ref) was seen: it needs a snapshot."""
        self._last_change_at = _latest(self._last_change_at, now)
        self._last_activity_at = _latest(self._last_activity_at, now)
        self._pending_since = _earliest(self._pending_since, now)
        self._pending_last = _latest(self._pending_last, now)

    def activity(self, now: float) -> None:
        """An outside "user is active" signal: postpones idle, but is no change to snapshot."""
        self._last_activity_at = _latest(self._last_activity_at, now)

    def request_save(self, now: float) -> None:
        """A "snapshot now" (``POST /snapshot``, the CLI): snapshot, then upload if anything new.

        Ignores the quiet period, the idle timer and any backoff; the snapshot is forced even with
        no change seen, since an event may have been lost. Repeated requests before the snapshot
        starts are one save. :attr:`save_pending` turns False when the save is over; its outcome is
        that of the last operation the shell ran (a snapshot that found nothing: "nothing new").
        """
        if self._save_snapshot_at is None:
            self._save_snapshot_at = now

    def shutdown(self, now: float) -> None:
        """SIGTERM: final snapshot and upload now, then everything new immediately, until clean.

        Backoff restarts from its base so a few retries fit in the grace period. The shell stops
        when :attr:`shutdown_complete` or when its ``shutdown_timeout`` runs out, whichever first.
        """
        if self._shutdown_at is not None:
            return
        self._shutdown_at = now
        self._snapshot_failures = self._upload_failures = 0
        self._snapshot_retry_at = self._upload_retry_at = None
        self.request_save(now)

    # -- outcomes of the operations the shell runs -------------------------------------------------

    def snapshot_started(self, now: float) -> None:
        """A snapshot starts; call it before git reads the working tree."""
        if self._snapshotting:
            raise RuntimeError("snapshot_started while a snapshot is already in flight")
        self._snapshotting = True
        self._snapshot_started_at = now
        self._snapshot_forced = self._save_snapshot_at is not None
        self._save_snapshot_at = None
        self._covered_since, self._covered_last = self._pending_since, self._pending_last
        self._pending_since = self._pending_last = None

    def snapshot_done(self, now: float, committed: bool) -> None:
        """The snapshot finished; ``committed`` is False when it found nothing changed.

        A snapshot that committed nothing adds no history: the changes it covered are simply gone
        (a revert, a touch). Changes reported after :meth:`snapshot_started` stay pending.
        """
        self._end_snapshot("snapshot_done")
        self._snapshot_failures = 0
        self._snapshot_retry_at = None
        if committed:
            self._last_snapshot_at = now
            # No change seen (a forced snapshot that found something inotify missed): its age is
            # only known to be at least this old.
            oldest = self._covered_since
            if oldest is None:
                oldest = self._snapshot_started_at
            if self._uploading:
                self._later_history_since = _earliest(self._later_history_since, oldest)
            else:
                self._history_since = _earliest(self._history_since, oldest)
        self._after_snapshot(now)

    def snapshot_failed(self, now: float) -> None:
        """The snapshot failed (git error, lock): its changes are pending again, retried later."""
        self._end_snapshot("snapshot_failed")
        self._pending_since = _earliest(self._pending_since, self._covered_since)
        self._pending_last = _latest(self._pending_last, self._covered_last)
        self._snapshot_failures += 1
        self._snapshot_retry_at = now + self._backoff.delay(self._snapshot_failures, self._jitter())
        self._after_snapshot(now)

    def upload_started(self, now: float) -> None:
        """An upload starts; call it before the bundle reads the refs."""
        if self._uploading:
            raise RuntimeError("upload_started while an upload is already in flight")
        self._uploading = True
        self._upload_forced = self._save_upload_at is not None
        self._save_upload_at = None

    def upload_succeeded(self, now: float) -> None:
        """The store has the history committed before :meth:`upload_started`; retries reset."""
        self._end_upload("upload_succeeded")
        self._history_since, self._later_history_since = self._later_history_since, None
        self._refused_since = None
        self._last_upload_at = now
        self._upload_failures = 0
        self._upload_retry_at = None
        self._settle_save()

    def upload_refused(self, now: float) -> None:
        """The store refused the history (not a fast-forward; kept under ``conflicts/``).

        Retrying would be refused the same way, so nothing is retried until a new snapshot; but
        the changes stay unsaved (:attr:`SchedulerStatus.refused`, ``dirty_since``) until an
        upload succeeds.
        """
        self._end_upload("upload_refused")
        carried = _earliest(self._history_since, self._refused_since)
        self._refused_since = carried if carried is not None else now
        self._history_since, self._later_history_since = self._later_history_since, None
        self._upload_failures = 0
        self._upload_retry_at = None
        self._settle_save()

    def upload_failed(self, now: float) -> None:
        """The upload failed: everything stays unsaved; retry after backoff, never giving up."""
        self._end_upload("upload_failed")
        self._history_since = _earliest(self._history_since, self._later_history_since)
        self._later_history_since = None
        self._upload_failures += 1
        self._upload_retry_at = now + self._backoff.delay(self._upload_failures, self._jitter())
        self._settle_save()

    # -- questions -------------------------------------------------------------------------------

    def due(self, now: float) -> Action | None:
        """The operation to start now, if any; ask again after starting one (both lanes may be due).

        An upload comes first: when both are due, the snapshot waiting is newer than what the
        upload must carry, and the upload would otherwise wait behind it.
        """
        upload_at = self._upload_at()
        if upload_at is not None and upload_at <= now:
            return Action.UPLOAD
        snapshot_at = self._snapshot_at()
        if snapshot_at is not None and snapshot_at <= now:
            return Action.SNAPSHOT
        return None

    def next_deadline(self, now: float) -> float | None:
        """When to wake up if no event comes first; never earlier than ``now``; None: sleep.

        Exactly the earliest time at which :meth:`due` stops returning None, so the daemon never
        wakes for nothing.
        """
        deadline = _earliest(self._upload_at(), self._snapshot_at())
        return None if deadline is None else max(deadline, now)

    @property
    def save_pending(self) -> bool:
        """A requested save (or the shutdown's) is not over yet."""
        return (
            self._save_snapshot_at is not None
            or (self._snapshotting and self._snapshot_forced)
            or self._save_upload_at is not None
            or (self._uploading and self._upload_forced)
        )

    @property
    def shutdown_complete(self) -> bool:
        """Shutting down, and everything seen is in the store: the daemon may exit."""
        return (
            self._shutdown_at is not None
            and not self.save_pending
            and not self._snapshotting
            and not self._uploading
            and self._pending_since is None
            and self._history_since is None
        )

    def status(self, now: float) -> SchedulerStatus:
        """What the scheduler knows, for ``GET /status`` and the metrics."""
        unsnapshotted = self._pending_since is not None or (
            self._snapshotting and self._covered_since is not None
        )
        idle = now >= self._idle_at()
        if unsnapshotted:
            state = State.CHANGING
        elif self._history_since is not None or self._later_history_since is not None:
            state = State.DIRTY
        elif self._refused_since is not None:
            state = State.CONFLICT
        else:
            state = State.IDLE if idle else State.CLEAN
        return SchedulerStatus(
            state=state,
            idle=idle,
            snapshotting=self._snapshotting,
            uploading=self._uploading,
            save_requested=self.save_pending,
            shutting_down=self._shutdown_at is not None,
            last_activity_at=self._last_activity_at,
            last_change_at=self._last_change_at,
            dirty_since=_earliest(self._dirty_since(), self._refused_since),
            refused=self._refused_since is not None,
            last_snapshot_at=self._last_snapshot_at,
            last_upload_at=self._last_upload_at,
            upload_failures=self._upload_failures,
            next_upload_retry_at=self._upload_retry_at,
            snapshot_failures=self._snapshot_failures,
            next_snapshot_retry_at=self._snapshot_retry_at,
            next_deadline=self.next_deadline(now),
            next_upload_at=self._upload_at(),
        )

    # -- internals -------------------------------------------------------------------------------

    def _end_snapshot(self, what: str) -> None:
        if not self._snapshotting:
            raise RuntimeError(f"{what} without snapshot_started")
        self._snapshotting = False

    def _end_upload(self, what: str) -> None:
        if not self._uploading:
            raise RuntimeError(f"{what} without upload_started")
        self._uploading = False
        self._upload_forced = False

    def _after_snapshot(self, now: float) -> None:
        # The forced snapshot of a save is over: its upload comes next, unless a newer request
        # already asks for another snapshot (its own upload will follow that one).
        if self._snapshot_forced and self._save_snapshot_at is None:
            self._save_upload_at = now
        self._snapshot_forced = False
        self._covered_since = self._covered_last = None
        self._settle_save()

    def _settle_save(self) -> None:
        # A save with nothing left to upload is over; while an upload is in flight its outcome
        # decides (success: nothing left; failure: the save's own upload goes next).
        if self._save_upload_at is not None and not self._uploading and self._history_since is None:
            self._save_upload_at = None

    def _idle_at(self) -> float:
        last = _latest(self._last_activity_at, self._started_at)
        assert last is not None
        return last + self._timing.idle_timeout

    def _dirty_since(self) -> float | None:
        since = _earliest(self._pending_since, self._history_since)
        since = _earliest(since, self._later_history_since)
        if self._snapshotting:
            since = _earliest(since, self._covered_since)
        return since

    def _upload_wanted_at(self) -> float | None:
        """When the timers want whatever is unsaved in the store; None when nothing is unsaved."""
        since = self._dirty_since()
        if since is None:
            return None
        if self._shutdown_at is not None:
            return self._shutdown_at
        return min(self._idle_at(), since + self._timing.max_upload_interval)

    def _snapshot_first(self, wanted: float) -> bool:
        # Changes older than the moment an upload is wanted go into a snapshot first, so the upload
        # carries them. Changes after it do not hold the upload back: under continuous editing
        # that would postpone it for ever. Nor does a failing snapshot: upload what is committed.
        return (
            self._pending_since is not None
            and self._pending_since < wanted
            and self._snapshot_failures == 0
        )

    def _snapshot_at(self) -> float | None:
        """When the snapshot lane becomes due (possibly in the past); None: nothing to snapshot."""
        if self._snapshotting:
            return None
        if self._save_snapshot_at is not None:
            return self._save_snapshot_at
        if self._pending_since is None or self._pending_last is None:
            return None
        if self._shutdown_at is not None:
            at = self._pending_since  # leaving: no quiet period
        else:
            at = min(
                self._pending_last + self._timing.quiet_period,
                self._pending_since + self._timing.max_commit_delay,
            )
            wanted = self._upload_wanted_at()
            if wanted is not None and self._snapshot_first(wanted):
                at = min(at, wanted)
        if self._snapshot_retry_at is not None:
            at = max(at, self._snapshot_retry_at)
        return at

    def _upload_at(self) -> float | None:
        """When the upload lane becomes due (possibly in the past); None: nothing to upload yet."""
        if self._uploading or self._snapshotting or self._save_snapshot_at is not None:
            return None  # the running snapshot, or the requested one, should be in the bundle
        if self._history_since is None:
            return None
        if self._save_upload_at is not None:
            return self._save_upload_at
        wanted = self._upload_wanted_at()
        assert wanted is not None  # there is history
        if self._snapshot_first(wanted):
            return None  # the snapshot lane is due by `wanted`; the upload follows it
        if self._upload_retry_at is not None:
            return max(wanted, self._upload_retry_at)
        return wanted
