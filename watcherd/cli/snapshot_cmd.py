"""``watcherd snapshot``: snapshot and upload now.

Through the running daemon when one answers (so two processes never race on one workspace),
else standalone. Exit 0 saved or nothing new, 1 failed, 3 refused as a conflict.
"""

from __future__ import annotations

import argparse

from watcherd import rollback, snapshot
from watcherd.cli.common import check_workspace, command_parser, daemon_for, note, say
from watcherd.cli.restore_cmd import generations_for
from watcherd.config import Config
from watcherd.control import DaemonNotRunning
from watcherd.errors import ConflictError, WatcherdError
from watcherd.repo import open_repo
from watcherd.store import open_store


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = command_parser(
        sub, "snapshot", summary="snapshot + upload now (through the daemon if one runs)",
        description="""\
Snapshots the workspace and saves a generation now. Through the running daemon when one
answers on control.listen, so that two processes never race on one workspace; in this
process when none answers (it says so on stderr) or with --standalone.""",
        exit_statuses={0: "saved, or nothing new to save",
                       1: "failed; retrying may help",
                       2: "fix the config: a bad key, no such workspace.path, a control.token "
                          "the daemon refuses",
                       3: "refused as a conflict: kept under conflicts/ in the store"})
    p.add_argument("--standalone", action="store_true",
                   help="do it in this process even if a daemon is running")
    p.set_defaults(handler=run)


# A save through the daemon may wait for a running upload and then bundle a large history.
DAEMON_SAVE_TIMEOUT = 900.0


def run(args: argparse.Namespace, cfg: Config) -> int:
    if not args.standalone and cfg.control.address is not None:
        try:
            code, result = daemon_for(cfg).snapshot(timeout=DAEMON_SAVE_TIMEOUT)
        except DaemonNotRunning as exc:
            # Said, because a daemon that should be running is news, and the save happens
            # here instead, with this process's permissions and environment.
            note(f"{exc}; snapshotting in this process instead")
        else:
            return _report_daemon(code, result)
    return _standalone(cfg)


def _report_daemon(code: int, result: dict) -> int:
    status = (result or {}).get("status")
    if status == "saved":
        say(f"snapshot: the daemon saved generation {result.get('generation')} "
            f"({result.get('bytes')} bytes, snapshot {(result.get('snapshot') or '')[:12]})")
        return 0
    if status == "unchanged":
        say(f"snapshot: nothing new; generation {result.get('generation')} already holds the "
            "workspace")
        return 0
    if status == "conflict":
        raise ConflictError(str(result.get("error")))
    raise WatcherdError(f"the daemon could not save (HTTP {code}): "
                        f"{(result or {}).get('error') or status}")


def _standalone(cfg: Config) -> int:
    ws = cfg.workspace
    check_workspace(ws.path)
    store = open_store(cfg.store)  # first: a store that cannot be opened is a config error
    try:
        repo = open_repo(cfg)
        rollback.recover(repo)  # a rollback killed half-way: finished, not saved half-done
        snapshot.prepare(repo)
        snap = snapshot.take(repo, ws.mode)
        result = generations_for(cfg, store).save(repo, template_url=cfg.restore.template_url)
        repo.maintain()
    finally:
        store.close()
    if result.status == "saved":
        say(f"snapshot: saved generation {result.generation} ({result.bytes} bytes, "
            f"snapshot {result.snapshot[:12]})")
    elif result.generation:
        say(f"snapshot: nothing new; generation {result.generation} already holds "
            f"{'this change' if snap.commit else 'the workspace'}")
    else:
        say("snapshot: nothing to save (the workspace is empty)")
    return 0
