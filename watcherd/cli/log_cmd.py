"""``watcherd log``: the snapshot timeline, newest first."""

from __future__ import annotations

import argparse

from watcherd import timeline
from watcherd.cli.common import command_parser, daemon_for, say, say_json
from watcherd.cli.restore_cmd import generations_for, parse_before
from watcherd.config import Config
from watcherd.control import DaemonNotRunning
from watcherd.errors import UsageError, WatcherdError
from watcherd.repo import open_repo
from watcherd.store import open_store
from watcherd.workspace import printable


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = command_parser(
        sub, "log", summary="show the snapshot timeline",
        description="""\
Every snapshot of the workspace's history, newest first: when it was taken, how many files
it changed and the first of them, the oldest kept generation that holds it (none yet: not in the
store), and the checkpoints that name it. From the running daemon when one answers, else
from watcherd's state directory and the store.""",
        exit_statuses={0: "listed",
                       1: "watcherd's state could not be read",
                       2: "fix the config or the command line"})
    p.add_argument("--since", metavar="TIME",
                   help='only snapshots since TIME (RFC 3339, or an age like "2h")')
    p.add_argument("--json", action="store_true",
                   help="print one JSON document (the same as GET /snapshots)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace, cfg: Config) -> int:
    since = parse_before(args.since, "--since") if args.since else None
    doc = None
    if cfg.control.address is not None:
        try:
            code, doc = daemon_for(cfg).snapshots(args.since and since.isoformat())
        except DaemonNotRunning:
            doc = None
        else:
            if code == 400:
                raise UsageError(str(doc.get("error")))
            if code != 200:
                raise WatcherdError(f"the daemon did not list (HTTP {code}): {doc.get('error')}")
    if doc is None:
        store = open_store(cfg.store)
        try:
            doc = timeline.report(open_repo(cfg), generations_for(cfg, store), since=since)
        except OSError as exc:
            raise WatcherdError(f"workspace.state_dir {cfg.workspace.state_dir}: watcherd's "
                                f"history cannot be read: {exc.strerror or exc}") from None
        finally:
            store.close()
    if args.json:
        say_json(doc)
        return 0
    if doc.get("store_error"):
        say(f"(the store could not be read: {doc['store_error']}; generations unknown)")
    if not doc["snapshots"]:
        say(f"no snapshots of {cfg.workspace.path} since {args.since}" if args.since else
            f"no snapshots of {cfg.workspace.path} yet")
        return 0
    say(f"{'SNAPSHOT':<12}  {'TIME':<25}  {'GEN':>4}  {'FILES':>5}  CHANGED")
    for e in doc["snapshots"]:
        labels = "".join(f" [{printable(c)}]" for c in e["checkpoints"])
        paths = ", ".join(printable(p) for p in e["paths"][:3])
        more = f" +{e['files'] - 3}" if e["files"] > 3 else ""
        gen = str(e["generation"]) if e["generation"] is not None else "-"
        say(f"{e['snapshot'][:12]:<12}  {printable(e['at']):<25}  {gen:>4}  {e['files']:>5}  "
            f"{paths}{more}{labels}")
    fork = doc.get("forked_from")
    if fork:
        say(f"(this history was forked from {printable(str(fork.get('key')))} generation "
            f"{fork.get('generation')}: the snapshots before it are that key's)")
    return 0
