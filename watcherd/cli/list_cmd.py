"""``watcherd list``: the generations kept in the store."""

from __future__ import annotations

import argparse

from watcherd.cli.common import command_parser, say, say_json
from watcherd.cli.restore_cmd import generations_for
from watcherd.config import Config
from watcherd.store import open_store
from watcherd.units import format_size
from watcherd.workspace import printable


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = command_parser(
        sub, "list", summary="list the generations in the store",
        description="""\
The generations kept in the store for store.key, newest first: when each was saved, its
size, snapshot and HEAD commits, branch, and the host and pid that wrote it.""",
        exit_statuses={0: "listed (an empty store lists nothing)",
                       1: "the store could not be read",
                       2: "fix the config or the command line"})
    p.add_argument("--json", action="store_true",
                   help="print one JSON document (key, store, generations)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace, cfg: Config) -> int:
    store = open_store(cfg.store)
    try:
        manifest, _ = generations_for(cfg, store).read_manifest()
    finally:
        store.close()
    gens = manifest.generations if manifest else ()
    if args.json:
        say_json({"key": cfg.store.key, "store": store.url,
                  "generations": [g.to_dict() for g in gens]})
        return 0
    if not gens:
        say(f"no generations stored for {cfg.store.key} in {store.url}")
        return 0
    say(f"{'GEN':>4}  {'CREATED (UTC)':<24}  {'SIZE':>9}  {'SNAPSHOT':<12}  {'HEAD':<12}  "
        f"{'BRANCH':<16}  WRITER")
    for g in gens:
        branch = (g.head_ref or "(detached)").removeprefix("refs/heads/")
        # Stored strings come from a store anyone with its credentials could write.
        say(f"{g.generation:>4}  {printable(g.created_at):<24}  {format_size(g.size):>9}  "
            f"{g.snapshot[:12]:<12}  {(g.head or '-')[:12]:<12}  {printable(branch):<16}  "
            f"{printable(g.writer.host)}:{g.writer.pid}")
    return 0
