"""The whole-state promise against the real daemon: the workspace model's rules (files, ignore
rules, the user's git) drive a workspace that ``watcherd run`` watches, and watcherd's part is the
daemon's own: a save asked of it over its control endpoint, SIGTERM (its final save, then a new
process), SIGKILL (no final save, then a new process). Invariant, as in
``test_model_workspace``: a restore of the last saved generation equals the state recorded, with
plain git, at that save.

The daemon's timers are set far off so that it saves only when asked or stopped: which
generation holds which state is then known to the test, whatever the sequence.
"""

from __future__ import annotations

import signal
import sys
import tempfile
from pathlib import Path

import pytest
from daemon_fixture import Daemon
from hypothesis import HealthCheck, settings
from hypothesis.stateful import initialize, rule
from test_model_workspace import KEY, WorkspaceModel, recorded_state

from helpers import make_repo

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify is Linux-only")

# Nothing happens on a timer: quiet periods, idle and upload intervals all an hour away.
NEVER = {"quiet_period": "1h", "max_commit_delay": "1h", "idle_timeout": "1h",
         "max_upload_interval": "1h", "shutdown_timeout": "20s"}


class DaemonModel(WorkspaceModel):
    """The workspace model, saved by a real ``watcherd run`` that receives real signals."""

    @initialize()
    def start(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="watcherd-model-daemon-"))
        self.ws = make_repo(self.base / "ws")
        self.store = self.base / "store"
        self.daemon = Daemon(self.base, workspace=self.ws, store=self.store, key=KEY, watch=NEVER)
        self.daemon.start()
        self.saved = None
        self.restores = 0

    def teardown(self) -> None:
        if getattr(self, "daemon", None) is not None:
            self.daemon.kill()
        super().teardown()

    # -- watcherd: the daemon's own ways ---------------------------------------------------------

    @rule()
    def save(self) -> None:
        expected = recorded_state(self.ws)
        code, answer = self.daemon.post("/snapshot")
        assert code == 200 and answer["status"] in ("saved", "unchanged"), answer
        self.saved = (self.daemon.generation(), expected)
        self.check_restore()

    @rule()
    def snapshot_only(self) -> None:
        """SIGTERM: the daemon saves what the workspace holds, exits 0; then a new process."""
        expected = recorded_state(self.ws)
        self.daemon.signal(signal.SIGTERM)
        assert self.daemon.wait_exit(30) == 0
        if self.daemon.generation():
            self.saved = (self.daemon.generation(), expected)
        self.daemon.start()

    @rule()
    def restart(self) -> None:
        """SIGKILL: no last save; what the store held stays what it was; then a new process."""
        before = self.daemon.generation()
        self.daemon.kill()
        assert self.daemon.generation() == before
        self.daemon.start()


DaemonModel.TestCase.settings = settings(
    max_examples=10, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
test_every_sequence_with_signals_restores_the_state_recorded_at_the_last_save = \
    pytest.mark.timeout(600)(DaemonModel.TestCase)


class LongDaemonModel(DaemonModel):
    pass


LongDaemonModel.TestCase.settings = settings(
    max_examples=60, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
test_long_profile = pytest.mark.slow(pytest.mark.timeout(3600)(LongDaemonModel.TestCase))
