"""``watcherd status``: the running daemon's state. Exit 0, or 1 when no daemon answers."""

from __future__ import annotations

import argparse
from typing import Any

from watcherd.cli.common import command_parser, elsewhere, note, say, say_json
from watcherd.config import Config
from watcherd.control import ControlClient
from watcherd.errors import ConfigError
from watcherd.units import format_size


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = command_parser(
        sub, "status", summary="show the running daemon's state",
        description="""\
Asks the running daemon (on control.listen) what it is doing: its state, the age of the
oldest change not yet in the store, the last snapshot and upload, retries, errors and
degraded watching. Also what the Kubernetes example's probes run.""",
        exit_statuses={0: "the daemon answered",
                       1: "no daemon answers (or it answered with an error)",
                       2: "fix the config: control.listen is off, or the daemon refuses "
                          "control.token"})
    p.add_argument("--json", action="store_true", help="the raw /status document")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace, cfg: Config) -> int:
    if cfg.control.address is None:
        # No daemon of this config can answer: only a change of the config mends that.
        raise ConfigError('control.listen = "": the control endpoint is off, and status asks '
                          "the running daemon through it; set control.listen (the default is "
                          "127.0.0.1:7781) in the daemon's config and this one")
    status = ControlClient(cfg.control).status()
    other = elsewhere(status, cfg)
    if other:
        note(f"{other}; its status follows")
    if args.json:
        say_json(status)
    else:
        say(render(status))
    return 0


def render(s: dict[str, Any]) -> str:
    """The status for people: the facts that answer "is my work safe?" first."""
    up = s.get("last_upload") or {}
    snap = s.get("last_snapshot") or {}
    retries = s.get("pending_retries") or {}
    unsaved = s.get("oldest_unsaved_change_age_ms")
    lines = [
        f"watcherd {s.get('version')} (pid {s.get('pid')}) watching {s.get('workspace')} "
        f"[{s.get('mode')}], {s.get('watches')} directories",
        # "(idle)" adds news only to another state: "dirty (idle)" is an upload still owed.
        f"state:          {s.get('state')}"
        + (" (idle)" if s.get("idle") and s.get("state") != "idle" else ""),
        f"unsaved:        {'nothing' if unsaved is None else f'oldest change {_age(unsaved)} ago'}"
        + (" (REFUSED by the store: kept only as a conflict copy)" if s.get("refused") else ""),
        f"last snapshot:  {snap.get('at', 'none this run')}"
        + (f" {snap['commit'][:12]} ({snap.get('files')} files)" if snap.get("commit") else ""),
        "last upload:    "
        + (f"generation {up['generation']} at {up['at']}"
           + (f" ({format_size(up['bytes'])})" if up.get("bytes") is not None else "")
           if up else "none"),
        f"store:          {(s.get('store') or {}).get('url')} key {(s.get('store') or {}).get('key')}",
    ]
    if retries.get("upload"):
        lines.append(f"upload retries: {retries['upload']} failed, next at {retries.get('next_upload_retry_at')}")
    if s.get("last_error"):
        e = s["last_error"]
        lines.append(f"last error:     {e.get('op')} at {e.get('at')}: {e.get('error')}")
    if s.get("conflict"):
        c = s["conflict"]
        copies = f" ({c['copies']} conflict copies under this key)" if c.get("copies") else ""
        lines.append(f"CONFLICT:       {c.get('reason')}{copies}")
    if s.get("store_vanished"):
        v = s["store_vanished"]
        lines.append(f"STORE LOST:     at {v.get('at')} the store no longer held this "
                     f"workspace's generations; saved again as generation {v.get('generation')}")
    for reason in s.get("degraded") or []:
        lines.append(f"DEGRADED:       {reason}")
    return "\n".join(lines)


def _age(ms: int) -> str:
    seconds = ms / 1000
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"
