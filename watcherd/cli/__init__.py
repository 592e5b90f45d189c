"""The ``watcherd`` command line: one module per subcommand, each a thin shell over the library.

Errors a person can act on (:class:`~watcherd.errors.WatcherdError`) become one line on stderr and
the command's exit status; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
from collections.abc import Sequence

from watcherd import __version__, config, log
from watcherd.cli import (
    config_cmd,
    list_cmd,
    restore_cmd,
    run_cmd,
    snapshot_cmd,
    status_cmd,
    verify_cmd,
)
from watcherd.errors import WatcherdError

_COMMANDS = (run_cmd, restore_cmd, snapshot_cmd, status_cmd, list_cmd, verify_cmd, config_cmd)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="watcherd",
        description="Keep a workspace alive across pod restarts: git snapshots, bundles in a "
                    "blob store, verified restore.",
    )
    p.add_argument("--config", metavar="PATH",
                   help="TOML config file (default: $WATCHERD_CONFIG, else /etc/watcherd/watcherd.toml)")
    p.add_argument("--version", action="version", version=f"watcherd {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in _COMMANDS:
        command.add_parser(sub)
    return p


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
    args = parser().parse_args(argv)
    try:
        cfg = config.load(args.config)
    except WatcherdError as exc:
        print(f"watcherd: {log.redact(str(exc))}", file=sys.stderr)
        return exc.exit_status
    log.configure(cfg.log.level, cfg.log.format, secrets=[cfg.control.token])
    try:
        return args.handler(args, cfg)
    except WatcherdError as exc:
        print(f"watcherd: {log.redact(str(exc))}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `watcherd status | head`: the reader left; say nothing more (Python docs' recipe).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
