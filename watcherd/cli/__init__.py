"""The ``watcherd`` command line: one module per subcommand, each a thin shell over the library.

Errors a person can act on (:class:`~watcherd.errors.WatcherdError`) become one line on stderr and
the command's exit status; anything else is a bug and keeps its traceback.

``run`` logs to stdout (what ``kubectl logs`` shows); every other command prints its result on
stdout and logs to stderr, so that its output can be read by a program.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import resource
import sys
from collections.abc import Sequence

from watcherd import __version__, config, log
from watcherd.cli import (
    checkpoint_cmd,
    config_cmd,
    export_cmd,
    list_cmd,
    log_cmd,
    restore_cmd,
    rollback_cmd,
    run_cmd,
    snapshot_cmd,
    status_cmd,
    verify_cmd,
)
from watcherd.cli.common import CONFIG_OPTION, note
from watcherd.errors import WatcherdError

_COMMANDS = (run_cmd, restore_cmd, snapshot_cmd, status_cmd, list_cmd, verify_cmd, checkpoint_cmd,
             log_cmd, rollback_cmd, export_cmd, config_cmd)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="watcherd", parents=[CONFIG_OPTION],
        description="Keep a workspace alive across pod restarts: git snapshots, bundles in a "
                    "blob store, verified restore.",
        epilog="exit status, for every command: 2 means the config or the command line must be "
               "fixed (retrying will not help); 1 means it failed and retrying may help. "
               "'watcherd COMMAND --help' says the rest.",
    )
    p.add_argument("--version", action="version", version=f"watcherd {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in _COMMANDS:
        command.add_parser(sub)
    return p


def _more_descriptors() -> None:
    """Raise the soft limit of open files to the hard one (setrlimit(2)): systemd's default
    soft limit is 1,024, and watcherd holds the workspace's pack files open for its git
    children (:meth:`watcherd.repo.Repo.attach`)."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or hard > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY
                                                         else max(soft, 65536), hard))
    except (ValueError, OSError):
        pass


def _not_dumpable() -> None:
    """Make this process's memory and ``/proc/<pid>/environ`` unreadable to other processes of the
    same uid (``prctl(PR_SET_DUMPABLE, 0)``, prctl(2)): watcherd holds the store's credentials,
    and a workspace's code may run under the same uid in a careless deployment. Best effort: a
    kernel without it changes nothing."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE = 4
    except (OSError, AttributeError):
        pass


def main(argv: Sequence[str] | None = None) -> int:
    _not_dumpable()
    _more_descriptors()
    try:
        args = parser().parse_args(argv)
    except BrokenPipeError:  # `watcherd --help | head -1`: the reader had what it wanted
        log.silence(sys.stdout)
        return 0
    try:
        cfg = config.load(getattr(args, "config", None))
    except WatcherdError as exc:
        return _report(exc)
    logs = sys.stdout if args.command == "run" else sys.stderr
    # Started with that descriptor closed (`watcherd run >&-`), Python gives no stream for it.
    log.configure(cfg.log.level, cfg.log.format, stream=logs or open(os.devnull, "w"),
                  secrets=[cfg.control.token])
    try:
        return args.handler(args, cfg)
    except WatcherdError as exc:
        return _report(exc)
    except KeyboardInterrupt:
        return 130


def _report(exc: WatcherdError) -> int:
    """The one line a person reads, and the exit status a supervisor acts on."""
    note(str(exc))
    return exc.exit_status
