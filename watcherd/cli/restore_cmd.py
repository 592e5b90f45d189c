"""``watcherd restore``: the startup hook. Exit 0 ready, 1 could not restore, 2 usage/config."""

from __future__ import annotations

import argparse
from datetime import datetime

from watcherd import timeline
from watcherd.cli.common import check_workspace, command_parser, say, say_json
from watcherd.config import Config
from watcherd.config import validate_store_key
from watcherd.errors import UsageError
from watcherd.generations import Generations, Limits
from watcherd.protocol import ChainPolicy
from watcherd.restore import Request, restore
from watcherd.store import open_store


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = command_parser(
        sub, "restore", summary="restore the newest good generation into the workspace",
        description="""\
The startup hook (an init container, or a systemd oneshot before the app). Puts the newest
good generation of store.key into workspace.path: nothing to do if the workspace already
holds that history; a non-empty workspace that is not this history is moved aside, never
deleted. Nothing stored: restore.on_missing says what to start from.""",
        exit_statuses={0: "the workspace is ready",
                       1: "could not restore (store unreachable, an unreadable manifest, "
                          "everything corrupt with on_missing = fail, a local I/O error); "
                          "retrying may help",
                       2: "fix the config or the command line, or a running daemon watches the "
                          "workspace (stop it, or --force)"})
    p.add_argument("--generation", type=int, metavar="N", help="restore generation N (time travel)")
    p.add_argument("--before", metavar="TIME",
                   help='restore the newest generation older than TIME (RFC 3339, or an age like "2h")')
    p.add_argument("--checkpoint", metavar="NAME",
                   help="restore the generation checkpoint NAME labels")
    p.add_argument("--from-key", metavar="KEY",
                   help="fork: restore another key's state (newest, or --generation/--checkpoint "
                        "of that key); store.key, which must hold nothing yet, then starts its "
                        "own line of history from it. KEY is only read")
    p.add_argument("--force", action="store_true",
                   help="restore even while a running daemon watches the workspace")
    p.add_argument("--json", action="store_true",
                   help="print what was done as one JSON document (action, generation, "
                        "workspace, moved_aside)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace, cfg: Config) -> int:
    chosen = [o for o, v in (("--generation", args.generation), ("--before", args.before),
                             ("--checkpoint", args.checkpoint)) if v is not None]
    if len(chosen) > 1:
        raise UsageError(f"use {' or '.join(chosen)}, not both" if len(chosen) == 2 else
                         f"use one of {', '.join(chosen)}, not several")
    if args.generation is not None and args.generation < 1:
        raise UsageError("--generation must be 1 or more")
    source_key = None
    if args.from_key is not None:
        try:
            source_key = validate_store_key(args.from_key)
        except ValueError as exc:
            raise UsageError(f"--from-key: {exc}") from None
        if source_key == cfg.store.key:
            raise UsageError("--from-key names store.key itself: a fork reads another key")
    request = Request(args.generation, parse_before(args.before) if args.before else None,
                      force=args.force, checkpoint=args.checkpoint)
    check_workspace(cfg.workspace.path, may_be_missing=True)
    store = open_store(cfg.store)
    try:
        source = generations_for(cfg, store, source_key) if source_key else None
        outcome = restore(cfg, generations_for(cfg, store), request, source=source)
    finally:
        store.close()
    if args.json:
        say_json({"action": outcome.action, "generation": outcome.generation,
                  "workspace": str(cfg.workspace.path),
                  "moved_aside": str(outcome.moved_aside) if outcome.moved_aside else None,
                  "key": cfg.store.key, "store": store.url, "from_key": source_key})
        return 0
    where = f" generation {outcome.generation}" if outcome.generation else ""
    if source_key:
        where += f" of {source_key}"
    aside = f"; the previous contents were moved to {outcome.moved_aside}" if outcome.moved_aside else ""
    say(f"restore: {outcome.action}{where} into {cfg.workspace.path}{aside}")
    return 0


def generations_for(cfg: Config, store, key: str | None = None) -> Generations:
    """The generations of ``key`` (default ``store.key``) under the config's limits."""
    s = cfg.store
    return Generations(store, key or s.key, Limits(s.keep, s.warn_bundle_size, s.max_bundle_size,
                                            ChainPolicy(s.max_increments, s.max_increment_ratio),
                                            s.keep_checkpoints))


def parse_before(text: str, option: str = "--before") -> datetime:
    try:
        return timeline.parse_moment(text)
    except ValueError:
        raise UsageError(f"{option} {text!r}: not a time (2026-11-26T10:00:00Z) or an age "
                         '("2h")') from None
