"""``watcherd run``: the sidecar daemon. Exit 0 after a clean shutdown with everything saved."""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time

import anyio

from watcherd import git, log
from watcherd.cli.common import check_workspace, command_parser
from watcherd.config import Config
from watcherd.daemon import Daemon
from watcherd.errors import WatcherdError

# Idle worker threads are told to stop when the event loop ends; give them this long to go.
_THREAD_GRACE = 1.0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = command_parser(
        sub, "run", summary="watch the workspace, snapshot and upload (the sidecar)",
        description="""\
The sidecar daemon. Watches workspace.path, records a snapshot commit after each quiet
period, uploads a git bundle to the store when the workspace goes idle, and saves once
more on SIGTERM or SIGINT. Its logs go to stdout.""",
        exit_statuses={0: "stopped cleanly with everything saved",
                       1: "the final save did not finish, or the daemon failed (a supervisor "
                          "restarts it)",
                       2: "fix the config: a bad key, no such workspace.path, s3:// without the "
                          "S3 extra, watch.backend = \"watchdog\" without the watchdog extra",
                       3: "the store refused this workspace's history: its final state is kept "
                          "as a conflict copy, not as the stored generation"})
    p.set_defaults(handler=run)


def run(args: argparse.Namespace, cfg: Config) -> int:
    check_workspace(cfg.workspace.path)
    try:
        code = anyio.run(Daemon(cfg).run)
    except BaseExceptionGroup as group:
        # A task group wraps what went wrong; a lone user-facing error keeps its one-line message.
        mistakes = group.subgroup(lambda e: isinstance(e, WatcherdError))
        if mistakes and len(mistakes.exceptions) == len(group.exceptions) == 1:
            raise mistakes.exceptions[0] from None
        log.get(__name__).error("daemon.crashed", error=str(group), exc_info=group)
        code = 1
    except WatcherdError:
        raise
    except Exception as exc:
        log.get(__name__).error("daemon.crashed", error=f"{type(exc).__name__}: {exc}", exc_info=exc)
        code = 1
    _exit_past_abandoned_threads(code)
    return code


def _exit_past_abandoned_threads(code: int) -> None:
    """Exit now if a worker thread is still busy: a git or store call that never returned.

    The daemon abandons such calls when shutdown_timeout runs out (or when it crashes), but the
    interpreter would wait for their threads before exiting, for ever if the store hangs: the
    exit the shutdown_timeout promised would never come.
    """
    git.kill_all()  # a git the daemon gave up on must not outlive it (nor hold the workspace)
    deadline = time.monotonic() + _THREAD_GRACE
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join(max(deadline - time.monotonic(), 0))
    stuck = [t.name for t in threading.enumerate()
             if t is not threading.current_thread() and not t.daemon and t.is_alive()]
    if stuck:
        log.get(__name__).warning("daemon.abandoned_threads", threads=stuck, exit_status=code,
                                  note="a git or store call did not return; not waiting for it")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
