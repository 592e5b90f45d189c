"""``watcherd list``: the generations kept in the store."""

from __future__ import annotations

import argparse

from watcherd.cli.common import say, say_json
from watcherd.cli.restore_cmd import generations_for
from watcherd.config import Config
from watcherd.store import open_store
from watcherd.units import format_size


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("list", help="list the generations in the store")
    p.add_argument("--json", action="store_true", help="machine-readable output")
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
        say(f"{g.generation:>4}  {g.created_at:<24}  {format_size(g.size):>9}  {g.snapshot[:12]:<12}  "
            f"{(g.head or '-')[:12]:<12}  {branch:<16}  {g.writer.host}:{g.writer.pid}")
    return 0
