"""What every subcommand shares: the shape of its parser, how it prints its result, and the
checks a person must fix before anything starts.

Results go to stdout (logs go elsewhere: stderr, or stdout for ``run`` alone), so that
``watcherd list --json | jq`` reads one JSON document and nothing else. A reader that leaves
early (``watcherd status | head -1``) ends the output, not the command: what the command did
stands and its exit status says so.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from watcherd import log
from watcherd.errors import UsageError, WatcherdError, WorkspaceNotFound

if TYPE_CHECKING:
    from watcherd.config import Config
    from watcherd.control import ControlClient

# --config is accepted before the command (``watcherd --config x run``) and after it
# (``watcherd run --config x``). SUPPRESS: a subcommand that was not given it must not reset what
# the main parser read.
CONFIG_OPTION = argparse.ArgumentParser(add_help=False)
CONFIG_OPTION.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS,
                           help="TOML config file (default: $WATCHERD_CONFIG, else "
                                "/etc/watcherd/watcherd.toml)")


def command_parser(sub: argparse._SubParsersAction, name: str, *, summary: str,
                   description: str, exit_statuses: dict[int, str]) -> argparse.ArgumentParser:
    """A subcommand's parser: ``--config``, what it does, and its exit statuses in ``--help``.

    Supervisors and scripts act on the exit status (2 means "fix the config, retrying will not
    help"), so each command's help says what each of its statuses means.
    """
    epilog = "exit status:\n" + "\n".join(f"  {code}  {meaning}"
                                          for code, meaning in sorted(exit_statuses.items()))
    return sub.add_parser(name, help=summary, description=description, epilog=epilog,
                          parents=[CONFIG_OPTION],
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def say(text: str) -> None:
    """Print a result line on stdout; quietly nothing more once its reader has gone."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        log.silence(sys.stdout)
    except OSError as exc:  # a full disk or an I/O error: the result did not get out
        raise WatcherdError(f"cannot write the result to stdout: {exc.strerror or exc}") from None


def note(text: str) -> None:
    """Tell the person something on stderr, in one line, secrets masked; never raises."""
    if sys.stderr is None:  # started with stderr closed: not on stdout instead
        return
    try:
        print(f"watcherd: {log.redact(text)}", file=sys.stderr, flush=True)
    except OSError:
        log.silence(sys.stderr)  # nobody reads stderr either; the exit status still tells


def say_json(doc: Any) -> None:
    """Print ``doc`` as the one JSON document of a ``--json`` result."""
    say(json.dumps(doc, indent=2))


def check_workspace(path: Path, *, may_be_missing: bool = False) -> None:
    """Refuse, with exit status 2, a ``workspace.path`` that cannot be the workspace.

    A path that does not exist (or is a file) is a mistake in the config or the mounts:
    restarting will not make it appear, so a supervisor must stop, not loop. ``restore`` may
    create the workspace, so for it only the parent must exist.
    """
    if path.is_dir():
        return
    if path.exists():
        raise WorkspaceNotFound(f"workspace.path {path} is not a directory; fix workspace.path")
    if not may_be_missing:
        raise WorkspaceNotFound(f"workspace.path {path} does not exist; create it, or fix "
                                "workspace.path")
    if not path.parent.is_dir():
        raise WorkspaceNotFound(f"workspace.path {path}: its parent directory {path.parent} "
                                "does not exist; create it (or mount the volume), or fix "
                                "workspace.path")


def daemon_for(cfg: Config) -> ControlClient:
    """A client of the daemon on ``control.listen``, once that daemon said (``GET /status``)
    that it watches this config's ``workspace.path`` with its ``store.key``.

    Raises :class:`~watcherd.control.DaemonNotRunning` when none answers, and
    :class:`UsageError` (exit 2) when the one that answers watches another workspace or key: a
    checkpoint or a rollback must never land on a workspace the person did not name.
    """
    from watcherd.control import ControlClient

    client = ControlClient(cfg.control)  # imported here: most commands never talk to a daemon
    other = elsewhere(client.status(), cfg)
    if other:
        raise UsageError(f"{other}: set control.listen to this workspace's daemon, or stop "
                         "that one (or pass --standalone where the command has it)")
    return client


def elsewhere(status: dict, cfg: Config) -> str | None:
    """What differs between the daemon that gave ``status`` and ``cfg``, None when nothing."""
    ws, key = status.get("workspace"), (status.get("store") or {}).get("key")
    mine = os.path.realpath(cfg.workspace.path)
    if isinstance(ws, str) and os.path.realpath(ws) == mine and key == cfg.store.key:
        return None
    return (f"the daemon on {cfg.control.listen} watches {log.redact(str(ws))} (store.key "
            f"{log.redact(str(key))}), not {cfg.workspace.path} (store.key {cfg.store.key})")
