"""The ``watcherd`` command line: one module per subcommand, each a thin shell over the library.

Errors a person can act on (:class:`~watcherd.errors.WatcherdError`) become one line on stderr and
the command's exit status; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
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


def main(argv: Sequence[str] | None = None) -> int:
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
