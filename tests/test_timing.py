"""The timing state machine, driven by a fake clock: no sleeps, no threads, no git.

Two kinds of tests: small scripted scenarios, one rule each, and a simulation (:class:`Sim`) that
plays event schedules against the scheduler, runs the operations it asks for with made-up durations
and outcomes, and checks the rules against a ground truth of what the tree, the snapshots and the
store really hold.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Callable

import pytest

from watcherd.errors import ConfigError
from watcherd.timing import Action, Backoff, Scheduler, State, Timing

T = Timing(quiet_period=2, max_commit_delay=30, idle_timeout=60, max_upload_interval=600)


def make(now: float = 0.0, timing: Timing = T, **kwargs) -> Scheduler:
    """A scheduler whose jitter is always 0: retries wait exactly base * factor**n (capped)."""
    kwargs.setdefault("jitter", lambda: 0.0)
    return Scheduler(timing, now, **kwargs)


def snapshot(s: Scheduler, now: float, committed: bool = True) -> None:
    assert s.due(now) is Action.SNAPSHOT
    s.snapshot_started(now)
    s.snapshot_done(now, committed)


def upload(s: Scheduler, now: float, ok: bool = True) -> None:
    assert s.due(now) is Action.UPLOAD
    s.upload_started(now)
    if ok:
        s.upload_succeeded(now)
    else:
        s.upload_failed(now)


def dirty(now: float = 0.0, timing: Timing = T, **kwargs) -> Scheduler:
    """A scheduler with one change at 0 already snapshotted, not uploaded."""
    s = make(timing=timing, **kwargs)
    s.change(0.0)
    snapshot(s, timing.quiet_period)
    return s


# -- configuration -------------------------------------------------------------------------------


def test_timing_defaults_match_the_design():
    assert Timing() == Timing(
        quiet_period=2, max_commit_delay=30, idle_timeout=60, max_upload_interval=600
    )


@pytest.mark.parametrize(
    "field", ["quiet_period", "max_commit_delay", "idle_timeout", "max_upload_interval"]
)
@pytest.mark.parametrize("value", [0, -1, 0.0, math.nan, math.inf, True, "2s", None])
def test_timing_rejects_durations_that_are_not_positive_numbers(field, value):
    with pytest.raises(ConfigError, match=f"watch.{field}"):
        Timing(**{field: value})


# -- backoff -------------------------------------------------------------------------------------


def test_backoff_doubles_from_base_up_to_the_cap():
    b = Backoff(base=1, factor=2, cap=300, jitter=0)
    assert [b.delay(n, 0.0) for n in range(1, 12)] == [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]


@pytest.mark.parametrize("failures", [1, 3, 9, 10, 60, 5000, 10**9])
@pytest.mark.parametrize("u", [0.0, 0.25, 0.5, 0.999999, -3.0, 7.0])
def test_backoff_jitter_only_shortens_and_stays_positive(failures, u):
    b = Backoff(base=1, factor=2, cap=300, jitter=0.5)
    ceiling = min(300, 2.0 ** min(failures - 1, 100))
    assert ceiling / 2 <= b.delay(failures, u) <= ceiling
    assert 0 < b.delay(failures, u) <= 300


@pytest.mark.parametrize(
    "kwargs",
    [
        {"base": 0},
        {"base": -1},
        {"base": math.nan},
        {"factor": 0.5},
        {"cap": 0.5},
        {"jitter": 1.0},
        {"jitter": -0.1},
    ],
)
def test_backoff_rejects_parameters_that_could_loop_or_never_grow(kwargs):
    with pytest.raises(ValueError):
        Backoff(**kwargs)


# -- a fresh scheduler ---------------------------------------------------------------------------


def test_restored_workspace_starts_clean_with_nothing_to_do_and_no_wakeup():
    s = make(now=100.0)
    assert s.due(100.0) is None
    assert s.next_deadline(100.0) is None
    st = s.status(100.0)
    assert st.state is State.CLEAN
    assert st.dirty_since is st.last_snapshot_at is st.last_upload_at is st.last_activity_at is None
    assert s.next_deadline(10_000.0) is None
    assert s.status(160.0).state is State.IDLE


def test_local_history_ahead_of_the_store_is_uploaded_at_the_first_idle():
    s = make(now=5.0, unsaved_history=True)
    assert s.status(5.0).state is State.DIRTY
    assert s.status(5.0).dirty_since == 5.0
    assert s.next_deadline(5.0) == 65.0
    upload(s, 65.0)
    assert s.next_deadline(65.0) is None


# -- snapshots -----------------------------------------------------------------------------------


def test_snapshot_waits_for_quiet_period_after_last_change():
    s = make()
    for t in (0.0, 1.0, 1.5):
        s.change(t)
        assert s.next_deadline(t) == t + 2
    assert s.due(3.49) is None
    assert s.status(3.0).state is State.CHANGING
    assert s.due(3.5) is Action.SNAPSHOT


def test_snapshot_under_continuous_change_comes_after_max_commit_delay_from_first_change():
    s = make()
    t = 0.0
    while t < 30:
        s.change(t)
        assert s.due(t) is None
        t += 1.0
    assert s.next_deadline(29.0) == 30.0
    assert s.due(30.0) is Action.SNAPSHOT


def test_changes_during_a_snapshot_are_not_cleared_by_it():
    s = make()
    s.change(0.0)
    s.snapshot_started(2.0)
    s.change(2.0)  # same timestamp, but reported after the snapshot started: not in it
    s.change(2.5)
    s.snapshot_done(3.0, committed=True)
    st = s.status(3.0)
    assert st.state is State.CHANGING
    assert st.dirty_since == 0.0
    assert s.next_deadline(3.0) == 4.5  # quiet period after the change at 2.5
    assert s.due(4.5) is Action.SNAPSHOT


def test_change_during_snapshot_keeps_its_max_commit_delay_from_its_own_time():
    s = make()
    s.change(0.0)
    s.snapshot_started(2.0)
    s.change(2.1)
    s.snapshot_done(2.2, committed=True)
    for t in range(3, 33):
        s.change(float(t))
    assert s.next_deadline(32.0) == pytest.approx(32.1)  # 30 s after 2.1, not after 0 or 3
    assert s.due(32.0) is None
    assert s.due(32.1) is Action.SNAPSHOT


def test_snapshot_that_found_nothing_is_not_new_history():
    s = make()
    s.change(0.0)  # e.g. a file saved unchanged, or an edit reverted
    snapshot(s, 2.0, committed=False)
    st = s.status(2.0)
    assert st.state is State.CLEAN
    assert st.dirty_since is None and st.last_snapshot_at is None
    assert s.next_deadline(2.0) is None
    assert s.due(10_000.0) is None


def test_snapshot_that_found_nothing_keeps_older_unuploaded_history():
    s = dirty()
    s.change(10.0)
    snapshot(s, 12.0, committed=False)
    st = s.status(12.0)
    assert st.state is State.DIRTY and st.dirty_since == 0.0
    assert s.next_deadline(12.0) == 70.0  # idle after the last change at 10


def test_failed_snapshot_keeps_its_changes_and_retries_with_backoff():
    s = make()
    s.change(0.0)
    s.snapshot_started(2.0)
    s.snapshot_failed(2.0)
    st = s.status(2.0)
    assert st.state is State.CHANGING and st.dirty_since == 0.0
    assert (st.snapshot_failures, st.next_snapshot_retry_at) == (1, 3.0)
    assert s.due(2.9) is None and s.due(3.0) is Action.SNAPSHOT
    s.snapshot_started(3.0)
    s.snapshot_failed(3.0)
    assert s.next_deadline(3.0) == 5.0
    s.snapshot_started(5.0)
    s.snapshot_done(5.0, committed=True)
    st = s.status(5.0)
    assert (st.state, st.snapshot_failures, st.next_snapshot_retry_at) == (State.DIRTY, 0, None)


def test_failing_snapshots_do_not_hold_back_the_upload_of_older_history():
    s = dirty()
    s.change(10.0)
    for now in (12.0, 13.0, 15.0, 19.0, 27.0, 43.0):  # git keeps failing; next retry at 75
        assert s.due(now) is Action.SNAPSHOT
        s.snapshot_started(now)
        s.snapshot_failed(now)
    assert s.next_deadline(43.0) == 70.0  # idle: upload what is committed, not wait for git
    assert s.due(70.0) is Action.UPLOAD
    s.upload_started(70.0)
    assert s.due(75.0) is Action.SNAPSHOT  # and snapshots keep retrying meanwhile


# -- idle and uploads ----------------------------------------------------------------------------


def test_idle_after_last_change_uploads_new_history():
    s = dirty()
    assert s.status(2.0).state is State.DIRTY
    assert s.next_deadline(2.0) == 60.0
    assert s.due(59.99) is None
    assert s.status(59.99).idle is False
    upload(s, 60.0)
    st = s.status(60.0)
    assert (st.state, st.idle, st.last_upload_at, st.dirty_since) == (State.IDLE, True, 60.0, None)
    assert s.next_deadline(60.0) is None


def test_idle_with_unsnapshotted_changes_snapshots_first_then_uploads():
    timing = Timing(
        quiet_period=120, max_commit_delay=300, idle_timeout=60, max_upload_interval=600
    )
    s = make(timing=timing)
    s.change(0.0)
    assert s.next_deadline(0.0) == 60.0
    assert s.due(60.0) is Action.SNAPSHOT  # not UPLOAD: the upload must carry the change
    s.snapshot_started(60.0)
    assert s.due(60.0) is None  # the upload waits for the snapshot in flight
    assert s.next_deadline(60.0) is None  # woken by the snapshot ending, not by a timer
    s.snapshot_done(61.0, committed=True)
    assert s.due(61.0) is Action.UPLOAD


def test_idle_with_nothing_new_does_not_upload():
    s = make()
    s.change(0.0)
    snapshot(s, 2.0, committed=False)
    assert s.due(60.0) is None and s.due(1e6) is None
    assert s.status(60.0).state is State.IDLE


def test_outside_activity_postpones_idle_but_never_snapshots():
    s = dirty()
    for t in range(10, 300, 10):
        s.activity(float(t))
        assert s.due(float(t)) is None
        assert s.next_deadline(float(t)) == t + 60
    st = s.status(290.0)
    assert (st.idle, st.last_activity_at, st.last_change_at) == (False, 290.0, 0.0)
    assert s.due(350.0) is Action.UPLOAD


def test_activity_alone_on_a_clean_workspace_never_wakes_the_daemon():
    s = make()
    for t in range(0, 1000, 7):
        s.activity(float(t))
        assert s.due(float(t)) is None
        assert s.next_deadline(float(t)) is None
    assert s.status(999.0).state is State.CLEAN


def test_upload_happens_within_max_upload_interval_even_when_never_idle():
    s = dirty()
    t = 10.0
    while s.due(t) is not Action.UPLOAD:
        s.activity(t)
        t += 10
    assert t == 600.0  # 0 (oldest unsaved change) + max_upload_interval


def test_change_during_upload_stays_unsaved_after_it_succeeds():
    s = dirty()
    s.upload_started(60.0)
    s.change(61.0)
    assert s.due(63.0) is Action.SNAPSHOT  # snapshots continue during a long upload
    s.snapshot_started(63.0)
    s.snapshot_done(63.5, committed=True)
    assert s.due(64.0) is None  # one upload at a time
    s.upload_succeeded(90.0)
    st = s.status(90.0)
    assert (st.state, st.dirty_since, st.last_upload_at) == (State.DIRTY, 61.0, 90.0)
    assert s.next_deadline(90.0) == 121.0  # idle after the change at 61


def test_change_not_yet_snapshotted_when_upload_succeeds_stays_changing():
    s = dirty()
    s.upload_started(60.0)
    s.change(61.0)
    s.upload_succeeded(62.0)
    st = s.status(62.0)
    assert (st.state, st.dirty_since) == (State.CHANGING, 61.0)
    assert s.next_deadline(62.0) == 63.0


def test_upload_failure_keeps_history_and_snapshots_made_during_it():
    s = dirty()
    s.upload_started(60.0)
    s.change(61.0)
    s.snapshot_started(63.0)
    s.snapshot_done(63.0, committed=True)
    s.upload_failed(70.0)
    st = s.status(70.0)
    assert (st.state, st.dirty_since) == (State.DIRTY, 0.0)
    assert (st.upload_failures, st.next_upload_retry_at) == (1, 71.0)
    assert s.due(70.5) is None
    upload(s, 121.0)  # retry due at 71, but idle was only reached at 121 and 600 is far
    assert s.status(121.0).state is State.IDLE


def test_failed_upload_keeps_snapshots_made_during_it_even_when_it_carried_nothing():
    s = make()
    s.upload_started(0.0)  # started by the shell on its own, nothing to carry
    s.change(1.0)
    snapshot(s, 3.0)
    s.upload_failed(4.0)
    st = s.status(4.0)
    assert (st.state, st.dirty_since) == (State.DIRTY, 1.0)
    assert s.due(61.0) is Action.UPLOAD


def test_failed_uploads_retry_with_exponential_backoff_capped_and_never_give_up():
    s = dirty()
    now, waits = 60.0, []
    for _ in range(40):
        upload(s, now, ok=False)
        nxt = s.next_deadline(now)
        waits.append(nxt - now)
        now = nxt
    assert waits[:10] == [1, 2, 4, 8, 16, 32, 64, 128, 256, 300]
    assert set(waits[9:]) == {300}
    assert s.status(now).upload_failures == 40


@pytest.mark.parametrize("u", [0.0, 0.3, 0.999999])
@pytest.mark.parametrize("failures", [1, 2, 8, 30])
def test_upload_retry_deadline_is_never_earlier_than_now(u, failures):
    s = dirty(jitter=lambda: u)
    now = 60.0
    for _ in range(failures):
        upload(s, now, ok=False)
        retry = s.status(now).next_upload_retry_at
        assert retry > now
        assert s.next_deadline(now) == retry
        assert s.due(math.nextafter(retry, -math.inf)) is None
        now = retry
    assert s.next_deadline(now + 1000) == now + 1000  # overdue: "now", never in the past


def test_successful_upload_resets_the_retry_counter():
    s = dirty()
    for now in (60.0, 61.0, 63.0):
        upload(s, now, ok=False)
    upload(s, 67.0)
    st = s.status(67.0)
    assert (st.upload_failures, st.next_upload_retry_at) == (0, None)
    s.change(100.0)
    snapshot(s, 102.0)
    upload(s, 160.0)
    s.change(200.0)
    snapshot(s, 202.0)
    upload(s, 260.0, ok=False)
    assert s.next_deadline(260.0) == 261.0  # back to the base delay


def test_new_changes_during_backoff_are_uploaded_with_the_retry():
    s = dirty()
    upload(s, 60.0, ok=False)
    upload(s, 61.0, ok=False)  # retry at 65
    s.change(62.0)
    snapshot(s, 64.0)
    assert s.next_deadline(64.0) == 122.0  # the user is active again: idle from 62
    s.upload_started(122.0)
    s.upload_succeeded(123.0)
    assert s.status(123.0).state is State.IDLE
    assert s.next_deadline(123.0) is None


# -- protocol misuse is a bug in the shell ---------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        lambda s: s.snapshot_done(1.0, True),
        lambda s: s.snapshot_failed(1.0),
        lambda s: s.upload_succeeded(1.0),
        lambda s: s.upload_failed(1.0),
        lambda s: (s.snapshot_started(1.0), s.snapshot_started(1.0)),
        lambda s: (s.upload_started(1.0), s.upload_started(1.0)),
    ],
)
def test_outcome_without_matching_start_is_refused(call):
    with pytest.raises(RuntimeError):
        call(make())


# -- forced saves and shutdown -------------------------------------------------------------------


def test_save_request_snapshots_and_uploads_at_once_ignoring_timers():
    s = make()
    s.change(10.0)
    s.request_save(10.5)
    assert s.save_pending
    assert s.due(10.5) is Action.SNAPSHOT
    s.snapshot_started(10.5)
    s.snapshot_done(11.0, committed=True)
    assert s.save_pending
    assert s.due(11.0) is Action.UPLOAD
    s.upload_started(11.0)
    s.upload_succeeded(12.0)
    assert not s.save_pending
    assert s.status(12.0).state is State.CLEAN
    assert s.next_deadline(12.0) is None


def test_save_request_with_nothing_changed_snapshots_and_ends_without_upload():
    s = make()
    s.request_save(5.0)
    snapshot(s, 5.0, committed=False)
    assert not s.save_pending
    assert s.due(5.0) is None and s.next_deadline(5.0) is None


def test_save_request_snapshot_that_finds_missed_changes_is_uploaded():
    s = make()
    s.request_save(5.0)  # no event seen: inotify may have lost it
    snapshot(s, 5.0, committed=True)
    assert s.status(5.0).dirty_since == 5.0
    upload(s, 5.0)
    assert not s.save_pending


def test_save_request_ignores_upload_backoff():
    s = dirty()
    for now in (60.0, 61.0, 63.0, 67.0, 75.0):
        upload(s, now, ok=False)  # next retry at 91
    s.request_save(80.0)
    snapshot(s, 80.0, committed=False)
    assert s.due(80.0) is Action.UPLOAD
    s.upload_started(80.0)
    s.upload_failed(81.0)
    assert not s.save_pending  # the save is over (failed); the normal schedule goes on
    assert s.status(81.0).upload_failures == 6
    assert s.next_deadline(81.0) == 81.0 + 32


def test_save_request_during_a_snapshot_waits_for_a_fresh_snapshot():
    s = make()
    s.change(0.0)
    s.snapshot_started(2.0)
    s.request_save(2.5)  # the running snapshot may have read the tree before the last write
    assert s.due(2.5) is None
    s.snapshot_done(3.0, committed=True)
    assert s.due(3.0) is Action.SNAPSHOT
    s.snapshot_started(3.0)
    s.snapshot_done(3.2, committed=False)
    assert s.due(3.2) is Action.UPLOAD


def test_save_request_during_an_upload_uploads_again_only_if_the_snapshot_adds_history():
    s = dirty()
    s.upload_started(60.0)
    s.request_save(61.0)
    snapshot(s, 61.0, committed=False)
    assert s.save_pending and s.due(61.5) is None
    s.upload_succeeded(62.0)
    assert not s.save_pending  # the running upload carried everything
    assert s.next_deadline(62.0) is None

    s.change(70.0)
    snapshot(s, 72.0)
    s.upload_started(132.0)
    s.request_save(133.0)
    s.change(133.5)
    snapshot(s, 134.0, committed=True)
    s.upload_succeeded(135.0)
    assert s.save_pending
    assert s.due(135.0) is Action.UPLOAD
    upload(s, 135.0)
    assert not s.save_pending


def test_repeated_save_requests_before_the_snapshot_are_one_save():
    s = make()
    s.request_save(1.0)
    s.request_save(1.1)
    s.request_save(1.2)
    snapshot(s, 1.2, committed=False)
    assert not s.save_pending


def test_shutdown_snapshots_and_uploads_at_once_and_completes():
    s = dirty()
    s.change(10.0)
    s.shutdown(10.5)
    assert s.status(10.5).shutting_down
    assert s.due(10.5) is Action.SNAPSHOT
    s.snapshot_started(10.5)
    assert not s.shutdown_complete
    s.snapshot_done(10.6, committed=True)
    assert s.due(10.6) is Action.UPLOAD
    s.upload_started(10.6)
    s.upload_succeeded(11.0)
    assert s.shutdown_complete
    assert s.next_deadline(11.0) is None


def test_shutdown_of_a_clean_workspace_still_takes_a_final_snapshot():
    s = make()
    s.shutdown(3.0)
    assert not s.shutdown_complete
    snapshot(s, 3.0, committed=False)
    assert s.shutdown_complete


def test_shutdown_restarts_backoff_so_retries_fit_in_the_grace_period():
    s = dirty()
    for now in (60.0, 61.0, 63.0, 67.0, 75.0, 91.0, 123.0):
        upload(s, now, ok=False)  # next retry would be 128 s away
    s.shutdown(130.0)
    snapshot(s, 130.0, committed=False)
    upload(s, 130.0, ok=False)
    assert s.next_deadline(130.0) == 131.0
    upload(s, 131.0, ok=False)
    assert s.next_deadline(131.0) == 133.0
    assert not s.shutdown_complete
    upload(s, 133.0)
    assert s.shutdown_complete


def test_shutdown_saves_changes_that_keep_coming_without_waiting_for_quiet():
    s = make()
    s.change(0.0)
    s.shutdown(0.0)
    s.snapshot_started(0.0)
    s.change(0.1)  # the app is still writing
    s.snapshot_done(0.2, committed=True)
    assert s.due(0.2) is Action.UPLOAD  # the final upload is not starved by newer changes
    s.upload_started(0.2)
    assert s.due(0.2) is Action.SNAPSHOT  # which are snapshotted meanwhile, with no quiet period
    s.snapshot_started(0.2)
    s.snapshot_done(0.3, committed=True)
    s.upload_succeeded(1.0)
    assert not s.shutdown_complete
    assert s.due(1.0) is Action.UPLOAD
    upload(s, 1.0)
    assert s.shutdown_complete


def test_second_shutdown_signal_changes_nothing():
    s = dirty()
    s.shutdown(10.0)
    snapshot(s, 10.0, committed=False)
    s.upload_started(10.0)
    s.upload_failed(10.5)
    s.shutdown(10.6)
    assert s.status(10.6).upload_failures == 1
    assert s.due(10.6) is None


# -- status --------------------------------------------------------------------------------------


def test_status_follows_a_change_from_edit_to_store():
    s = make()
    seen = []
    s.change(0.0)
    seen.append(s.status(0.0).state)
    s.snapshot_started(2.0)
    seen.append(s.status(2.0).state)
    s.snapshot_done(2.5, committed=True)
    seen.append(s.status(2.5).state)
    s.upload_started(60.0)
    st = s.status(60.0)
    seen.append(st.state)
    assert st.uploading and st.idle
    s.upload_succeeded(61.0)
    seen.append(s.status(61.0).state)
    s.activity(61.0)
    seen.append(s.status(61.0).state)
    seen.append(s.status(121.0).state)
    assert seen == ["changing", "changing", "dirty", "dirty", "idle", "clean", "idle"]
    st = s.status(121.0)
    assert (st.last_change_at, st.last_activity_at, st.last_snapshot_at, st.last_upload_at) == (
        0.0, 61.0, 2.5, 61.0,
    )


def test_status_dirty_since_is_the_oldest_change_not_in_the_store():
    s = make()
    s.change(5.0)
    s.change(6.0)
    assert s.status(6.0).dirty_since == 5.0
    snapshot(s, 8.0)
    s.change(9.0)
    assert s.status(9.0).dirty_since == 5.0
    s.upload_started(10.0)
    s.upload_succeeded(11.0)
    assert s.status(11.0).dirty_since == 9.0


# -- simulation ----------------------------------------------------------------------------------


class Sim:
    """Plays events against a scheduler, runs what it asks for, and checks it against the truth.

    The truth: ``tree`` is the working tree's content version (a "touch" event is a change event
    without new content), ``committed`` the newest snapshot's, ``uploaded`` the store's.
    Operations take fixed durations; their outcomes come from ``snapshot_ok``/``upload_ok``.
    """

    def __init__(
        self,
        sched: Scheduler,
        timing: Timing,
        *,
        snapshot_s: float = 0.1,
        upload_s: float = 1.0,
        snapshot_ok: Callable[[], bool] = lambda: True,
        upload_ok: Callable[[], bool] = lambda: True,
    ) -> None:
        self.s, self.timing = sched, timing
        self.snapshot_s, self.upload_s = snapshot_s, upload_s
        self.snapshot_ok, self.upload_ok = snapshot_ok, upload_ok
        self.now = 0.0
        self._events: list[tuple[float, int, str]] = []
        self._seq = 0
        self.tree = self.committed = self.uploaded = 0
        self.changed_at: dict[int, float] = {}  # content version -> time of the change
        self.committed_at: dict[int, float] = {}
        self.uploaded_at: dict[int, float] = {}
        self.snapshot_end: float | None = None
        self.upload_end: float | None = None
        self._snapshot_reads = self._upload_reads = 0
        self.snapshot_starts: list[float] = []
        self.upload_starts: list[float] = []
        self.failures = 0
        self.save_wants: int | None = None  # content version a pending save must reach
        self.max_dirty_age = 0.0

    def at(self, t: float, kind: str) -> None:
        heapq.heappush(self._events, (t, self._seq, kind))
        self._seq += 1

    def run(self, until: float) -> None:
        while True:
            self._start_due()
            deadline = self.s.next_deadline(self.now)
            assert deadline is None or deadline > self.now, "due() is None but the deadline is now"
            pending = [self._events[0][0]] if self._events else []
            pending += [t for t in (self.snapshot_end, self.upload_end) if t is not None]
            nxt = min(pending, default=None)
            if deadline is not None and (nxt is None or deadline <= nxt):
                if deadline > until:
                    break
                mid = (self.now + deadline) / 2
                if mid < deadline:
                    assert self.s.due(mid) is None, "something due before the deadline"
                self.now = deadline
                assert self.s.due(self.now) is not None, "woken up for nothing"
                continue
            if nxt is None or nxt > until:
                break
            if nxt > self.now:
                assert self.s.due((self.now + nxt) / 2) is None
            self.now = nxt
            self._step()
            self._check()
        self.now = max(self.now, until)

    def _start_due(self) -> None:
        while (action := self.s.due(self.now)) is not None:
            if action is Action.SNAPSHOT:
                assert self.snapshot_end is None
                self.s.snapshot_started(self.now)
                self._snapshot_reads = self.tree
                self.snapshot_end = self.now + self.snapshot_s
                self.snapshot_starts.append(self.now)
            else:
                assert self.upload_end is None
                assert self.committed > self.uploaded, "uploads only when there is new history"
                self.s.upload_started(self.now)
                self._upload_reads = self.committed
                self.upload_end = self.now + self.upload_s
                self.upload_starts.append(self.now)

    def _step(self) -> None:
        was_saving = self.s.save_pending
        now = self.now
        if self.snapshot_end == now:
            self.snapshot_end = None
            if self.snapshot_ok():
                changed = self._snapshot_reads != self.committed
                if changed:
                    for v in range(self.committed + 1, self._snapshot_reads + 1):
                        self.committed_at[v] = now
                    self.committed = self._snapshot_reads
                self.s.snapshot_done(now, committed=changed)
            else:
                self.failures += 1
                self.s.snapshot_failed(now)
                assert self.s.status(now).next_snapshot_retry_at > now
        elif self.upload_end == now:
            self.upload_end = None
            if self.upload_ok():
                for v in range(self.uploaded + 1, self._upload_reads + 1):
                    self.uploaded_at[v] = now
                self.uploaded = max(self.uploaded, self._upload_reads)
                self.s.upload_succeeded(now)
            else:
                self.failures += 1
                self.s.upload_failed(now)
                assert self.s.status(now).next_upload_retry_at > now
        else:
            _, _, kind = heapq.heappop(self._events)
            if kind == "change":
                self.tree += 1
                self.changed_at[self.tree] = now
                self.s.change(now)
            elif kind == "touch":
                self.s.change(now)
            elif kind == "activity":
                self.s.activity(now)
            elif kind == "save":
                self.s.request_save(now)
                self.save_wants = self.tree
            elif kind == "shutdown":
                self.s.shutdown(now)
                self.save_wants = self.tree
            else:
                raise AssertionError(kind)
        if was_saving and not self.s.save_pending and self.failures == 0:
            assert self.uploaded >= self.save_wants, "a finished save left older edits unsaved"

    def _check(self) -> None:
        st = self.s.status(self.now)
        if st.state in (State.CLEAN, State.IDLE):
            assert self.uploaded == self.tree, f"{st.state} but edits are not in the store"
        if self.uploaded < self.tree:
            oldest = self.changed_at[self.uploaded + 1]
            assert st.dirty_since is not None and st.dirty_since <= oldest
            self.max_dirty_age = max(self.max_dirty_age, self.now - oldest)


def churn(sim: Sim, start: float, stop: float, every: float) -> None:
    k = 0
    while start + k * every < stop:
        sim.at(start + k * every, "change")
        k += 1


def test_continuous_churn_snapshots_about_every_max_commit_delay():
    sim = Sim(make(), T)
    churn(sim, 0.0, 100.0, 0.5)
    sim.run(until=1000.0)
    assert sim.snapshot_starts == [30.0, 60.0, 90.0, 101.5]  # the last one: quiet after 99.5
    assert sim.upload_starts == [159.5]  # idle 60 s after the last change
    assert sim.uploaded == sim.tree
    assert sim.s.next_deadline(sim.now) is None


def test_continuous_churn_still_uploads_every_max_upload_interval():
    sim = Sim(make(), T, snapshot_s=0.1, upload_s=1.0)
    churn(sim, 0.0, 2000.0, 0.5)
    sim.run(until=1999.0)
    assert not sim.s.status(sim.now).idle
    assert sim.upload_starts == [pytest.approx(t) for t in (600.1, 1200.1, 1800.1)]
    # each upload carries a snapshot taken when it became due, not one up to 30 s old
    for start in sim.upload_starts:
        assert any(start - 0.2 <= s < start for s in sim.snapshot_starts)
    assert sim.max_dirty_age <= 600 + 0.1 + 1.0


def test_long_uploads_do_not_stop_snapshots():
    sim = Sim(dirty(), T, upload_s=200.0)
    sim.tree = sim.committed = 1  # what dirty() already snapshotted
    sim.changed_at[1] = 0.0
    churn(sim, 61.0, 250.0, 1.0)  # while the upload that started at idle (60) runs until 260
    sim.run(until=2000.0)
    assert sim.upload_starts[0] == 60.0
    during = [t for t in sim.snapshot_starts if t < 260.0]
    assert during == [91.0, 121.0, 151.0, 181.0, 211.0, 241.0, 251.0]  # 251: quiet after 249
    assert sim.uploaded == sim.tree


def random_timing(rng: random.Random) -> Timing:
    return Timing(
        quiet_period=rng.choice([0.2, 1.0, 2.0, 10.0]),
        max_commit_delay=rng.choice([1.0, 5.0, 30.0, 60.0]),
        idle_timeout=rng.choice([1.0, 10.0, 60.0, 300.0]),
        max_upload_interval=rng.choice([5.0, 60.0, 600.0]),
    )


def random_events(rng: random.Random, sim: Sim, horizon: float, *, shutdown: bool) -> None:
    t = 0.0
    while t < horizon:
        kinds, weights = ["burst", "gap", "activity", "touch", "save"], [5, 4, 2, 1, 0.3]
        kind = rng.choices(kinds, weights=weights)[0]
        if kind == "burst":
            for _ in range(rng.randint(1, 40)):
                sim.at(t, "change")
                t += rng.choice([0.0, 0.01, 0.1, 0.5, 1.0, 3.0])
        elif kind == "gap":
            t += rng.expovariate(1 / rng.choice([1.0, 10.0, 100.0, 1000.0]))
        else:
            sim.at(t, kind)
            t += rng.uniform(0, 5)
    if shutdown:
        sim.at(rng.uniform(0, horizon), "shutdown")


@pytest.mark.parametrize("seed", range(40))
def test_random_schedules_lose_nothing_and_respect_the_bounds(seed):
    rng = random.Random(seed)
    timing = random_timing(rng)
    ds, du = rng.choice([0.01, 0.1, 0.5]), rng.choice([0.1, 1.0, 20.0])
    sim = Sim(Scheduler(timing, 0.0, jitter=rng.random), timing, snapshot_s=ds, upload_s=du)
    random_events(rng, sim, horizon=3000.0, shutdown=rng.random() < 0.2)
    sim.run(until=20_000.0)

    assert sim.uploaded == sim.tree
    assert sim.s.next_deadline(sim.now) is None, "a settled daemon must sleep"
    for v, t in sim.changed_at.items():
        assert sim.committed_at[v] <= t + max(timing.max_commit_delay, ds) + ds
        assert sim.uploaded_at[v] <= t + timing.max_upload_interval + 3 * ds + 2 * du
    if sim.s.status(sim.now).shutting_down:
        assert sim.s.shutdown_complete


@pytest.mark.parametrize("seed", range(40))
def test_random_failures_are_retried_until_everything_is_saved(seed):
    rng = random.Random(1000 + seed)
    timing = random_timing(rng)
    failing = {"on": True}
    snapshot_fail, upload_fail = rng.choice([0.0, 0.2, 0.5]), rng.choice([0.2, 0.5, 0.9])
    sim = Sim(
        Scheduler(timing, 0.0, jitter=rng.random, unsaved_history=rng.random() < 0.3),
        timing,
        snapshot_s=rng.choice([0.01, 0.5]),
        upload_s=rng.choice([0.1, 5.0]),
        snapshot_ok=lambda: not (failing["on"] and rng.random() < snapshot_fail),
        upload_ok=lambda: not (failing["on"] and rng.random() < upload_fail),
    )
    if sim.s.status(0.0).state is State.DIRTY:
        sim.committed = 1  # the local history the store does not have
        sim.changed_at[1] = 0.0
        sim.tree = 1
    random_events(rng, sim, horizon=2000.0, shutdown=rng.random() < 0.2)
    sim.run(until=2000.0)
    failing["on"] = False  # the store comes back: within one capped backoff, all is saved
    sim.run(until=2000.0 + 300.0 + timing.idle_timeout + timing.max_upload_interval + 100.0)

    assert sim.uploaded == sim.tree
    st = sim.s.status(sim.now)
    assert st.state in (State.CLEAN, State.IDLE)
    assert (st.upload_failures, st.next_upload_retry_at) == (0, None) or sim.tree == 0
    assert sim.s.next_deadline(sim.now) is None


@pytest.mark.parametrize("seed", range(10))
def test_random_activity_alone_never_snapshots_or_uploads(seed):
    rng = random.Random(seed)
    timing = random_timing(rng)
    sim = Sim(Scheduler(timing, 0.0), timing)
    for _ in range(200):
        sim.at(rng.uniform(0, 5000), "activity")
    sim.run(until=6000.0)
    assert sim.snapshot_starts == [] and sim.upload_starts == []
