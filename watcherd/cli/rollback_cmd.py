"""``watcherd rollback TARGET``: put the workspace back, in place, to a recorded state.

Through the running daemon when one answers (it pauses, saves, rolls back, saves), else in this
process. Exit 0 rolled back, 1 failed, 2 refused (no such target, the user's git is busy, a
read-only workspace) or a usage error, 3 the state before could not be saved (a conflict).
"""

from __future__ import annotations

import argparse

from watcherd import rollback, snapshot
from watcherd.cli.common import check_workspace, command_parser, daemon_for, note, say, say_json
from watcherd.cli.restore_cmd import generations_for
from watcherd.cli.snapshot_cmd import DAEMON_SAVE_TIMEOUT
from watcherd.config import Config
from watcherd.control import DaemonNotRunning
from watcherd.errors import ConflictError, UsageError, WatcherdError
from watcherd.repo import open_repo
from watcherd.store import open_store
from watcherd.workspace import locate


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = command_parser(
        sub, "rollback", summary="put the workspace back to a checkpoint, generation or snapshot",
        description="""\
Puts the workspace back, in place and while the daemon runs, to the state TARGET recorded:
its files, and the user's HEAD, index, branches, tags and stash. TARGET is a checkpoint's
name, a generation number, or a snapshot id (watcherd log); or use --before TIME, or --undo
to return to where the last rollback started. The current state is snapshotted and saved
first, so every rollback can be undone. Files no snapshot ever held (ignored ones) are left
alone; the user's git config, hooks and info/ stay as they are. Refused while the user's git
holds a lock or is in the middle of a rebase or merge.""",
        exit_statuses={0: "rolled back",
                       1: "failed; retrying may help",
                       2: "refused (no such target, the user's git is busy, the workspace is "
                          "read-only here) or a usage error",
                       3: "the current state could not be saved first (a conflict): nothing "
                          "was changed"})
    p.add_argument("target", nargs="?", metavar="TARGET",
                   help="a checkpoint name, a generation number, or a snapshot id")
    p.add_argument("--before", metavar="TIME",
                   help='the newest snapshot older than TIME (RFC 3339, or an age like "2h")')
    p.add_argument("--undo", action="store_true",
                   help="return to the state the last rollback started from")
    p.add_argument("--standalone", action="store_true",
                   help="do it in this process even if a daemon is running")
    p.add_argument("--json", action="store_true", help="print the outcome as one JSON document")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace, cfg: Config) -> int:
    request: dict = {}
    if args.target is not None:
        request["target"] = args.target
    if args.before is not None:
        request["before"] = args.before  # checked by parse_request below, before anything
    if args.undo:
        request["undo"] = True
    if not request or len(request) > 1:
        raise UsageError("give one of: TARGET (a checkpoint, a generation, a snapshot id), "
                         "--before TIME, --undo")
    name, before, undo = rollback.parse_request(request)
    result = None
    if not args.standalone and cfg.control.address is not None:
        try:
            code, result = daemon_for(cfg).rollback(request, timeout=DAEMON_SAVE_TIMEOUT)
        except DaemonNotRunning as exc:
            note(f"{exc}; rolling back in this process instead")
        else:
            _check_daemon(code, result)
    if result is None:
        result = _standalone(cfg, name, before, undo)
    if args.json:
        say_json(result)
    else:
        gen = f", saved as generation {result['generation']}" if result.get("generation") else ""
        say(f"rollback: the workspace is back to {result['said']} (snapshot "
            f"{result['target'][:12]}){gen}; `watcherd rollback --undo` returns to "
            f"{result['undo'][:12]}")
    return 0


def _check_daemon(code: int, result: dict) -> None:
    status = (result or {}).get("status")
    error = (result or {}).get("error") or status
    if status == "rolled_back":
        if result.get("error"):
            note(str(error))  # rolled back; the save of it is still owed (the daemon retries)
        return
    if status in ("invalid", "refused"):
        raise rollback.RollbackRefused(str(error))
    if status == "conflict":
        raise ConflictError(str(error))
    raise WatcherdError(f"the daemon did not roll back (HTTP {code}): {error}")


def _standalone(cfg: Config, name, before, undo) -> dict:
    ws = cfg.workspace
    check_workspace(ws.path)
    rollback.refuse_read_only(ws.path)
    store = open_store(cfg.store)
    try:
        repo = open_repo(cfg)
        generations = generations_for(cfg, store)
        rollback.recover(repo)
        snapshot.prepare(repo)
        manifest, _ = generations.read_manifest()
        target = rollback.resolve(repo, manifest, name, before=before, undo=undo)
        rollback.fetch_target(repo, generations, manifest, target)
        rollback.check_quiet(locate(ws.path))
        saved = {}

        def save() -> None:
            snapshot.take(repo, ws.mode)
            saved["result"] = generations.save(repo, template_url=cfg.restore.template_url)

        came_from = rollback.run(repo, target, save, mode=ws.mode)
        repo.maintain()
    finally:
        store.close()
    return {"status": "rolled_back", "target": target.snapshot, "said": target.said,
            "undo": came_from, "generation": saved["result"].generation,
            "saved": saved["result"].status}
