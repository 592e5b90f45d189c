"""``watcherd run``: the sidecar daemon. Exit 0 after a clean shutdown with everything saved."""

from __future__ import annotations

import argparse

import anyio

from watcherd import log
from watcherd.config import Config
from watcherd.daemon import Daemon
from watcherd.errors import WatcherdError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="watch the workspace, snapshot and upload (the sidecar)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace, cfg: Config) -> int:
    try:
        return anyio.run(Daemon(cfg).run)
    except BaseExceptionGroup as group:
        # A task group wraps what went wrong; a lone user-facing error keeps its one-line message.
        mistakes = group.subgroup(lambda e: isinstance(e, WatcherdError))
        if mistakes and len(mistakes.exceptions) == len(group.exceptions) == 1:
            raise mistakes.exceptions[0] from None
        log.get(__name__).error("daemon.crashed", error=str(group), exc_info=group)
        return 1
    except WatcherdError:
        raise
    except Exception as exc:
        log.get(__name__).error("daemon.crashed", error=f"{type(exc).__name__}: {exc}", exc_info=exc)
        return 1
