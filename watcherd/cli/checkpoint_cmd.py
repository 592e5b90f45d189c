"""``watcherd checkpoint NAME``: snapshot, save, and label that generation.

Through the running daemon when one answers, else standalone (like ``watcherd snapshot``).
Exit 0 labelled, 1 failed, 2 a bad name or config, 3 the save was refused as a conflict.
"""

from __future__ import annotations

import argparse

from watcherd import manifest as mf
from watcherd import rollback, snapshot
from watcherd.cli.common import check_workspace, command_parser, daemon_for, note, say, say_json
from watcherd.cli.restore_cmd import generations_for
from watcherd.cli.snapshot_cmd import DAEMON_SAVE_TIMEOUT
from watcherd.config import Config
from watcherd.control import DaemonNotRunning
from watcherd.errors import ConflictError, UsageError, WatcherdError
from watcherd.repo import open_repo
from watcherd.store import open_store


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = command_parser(
        sub, "checkpoint", summary="snapshot + save now, and name that state",
        description="""\
Snapshots the workspace, saves a generation, and labels it NAME in the store's manifest.
A labelled generation is pinned: store.keep never prunes it (store.keep_checkpoints bounds
how many labels there are, the oldest going first). A name used before moves to the new
state. `watcherd rollback NAME` returns to it; `watcherd restore --checkpoint NAME` and
`watcherd export --checkpoint NAME` read it. Through the running daemon when one answers.""",
        exit_statuses={0: "saved and labelled",
                       1: "failed; retrying may help",
                       2: "fix the name, the config or the command line",
                       3: "the save was refused as a conflict: nothing labelled"})
    p.add_argument("name", metavar="NAME",
                   help="1 to 128 letters, digits, '.', '_' or '-', starting with a letter or "
                        "digit; not all digits or hex (those name generations and snapshots)")
    p.add_argument("--note", default="", metavar="TEXT", help="what this state is, for people")
    p.add_argument("--standalone", action="store_true",
                   help="do it in this process even if a daemon is running")
    p.add_argument("--json", action="store_true", help="print the checkpoint as one JSON document")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace, cfg: Config) -> int:
    problem = mf.checkpoint_name_problem(args.name, args.note)
    if problem:
        raise UsageError(problem)
    result = None
    if not args.standalone and cfg.control.address is not None:
        try:
            code, result = daemon_for(cfg).checkpoint(args.name, args.note,
                                                                 timeout=DAEMON_SAVE_TIMEOUT)
        except DaemonNotRunning as exc:
            note(f"{exc}; checkpointing in this process instead")
        else:
            _check_daemon(code, result)
    if result is None:
        result = _standalone(cfg, args.name, args.note)
    if args.json:
        say_json(result)
    else:
        say(f"checkpoint {result['checkpoint']}: generation {result['generation']} "
            f"(snapshot {result['snapshot'][:12]})")
    return 0


def _check_daemon(code: int, result: dict) -> None:
    status = (result or {}).get("status")
    if status == "ok":
        return
    error = (result or {}).get("error") or status
    if status == "conflict":
        raise ConflictError(str(error))
    if status in ("invalid", "refused"):  # as the standalone checkpoint says the same: exit 2
        raise UsageError(str(error))
    raise WatcherdError(f"the daemon did not checkpoint (HTTP {code}): {error}")


def _standalone(cfg: Config, name: str, text: str) -> dict:
    check_workspace(cfg.workspace.path)
    store = open_store(cfg.store)
    try:
        repo = open_repo(cfg)
        rollback.recover(repo)  # a rollback killed half-way: finished, not saved half-done
        snapshot.prepare(repo)
        snapshot.take(repo, cfg.workspace.mode)
        generations = generations_for(cfg, store)
        saved = generations.save(repo, template_url=cfg.restore.template_url)
        repo.maintain()
        if saved.generation is None:
            raise UsageError("nothing to label: the workspace is empty and nothing is stored")
        label = generations.label(saved.generation, name, text)
    finally:
        store.close()
    return {"status": "ok", "checkpoint": label.name, "generation": label.generation,
            "snapshot": label.snapshot, "created_at": label.created_at, "note": label.note}
