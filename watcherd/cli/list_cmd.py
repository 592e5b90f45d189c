"""``watcherd list``: the generations kept in the store."""

from __future__ import annotations

import argparse
import json

from watcherd.cli.restore_cmd import generations_for
from watcherd.config import Config
from watcherd.store import open_store
from watcherd.units import format_size
from watcherd.workspace import printable


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
        print(json.dumps({"key": cfg.store.key, "store": store.url,
                          "generations": [g.to_dict() for g in gens]}, indent=2))
        return 0
    if not gens:
        print(f"no generations stored for {cfg.store.key} in {store.url}")
        return 0
    print(f"{'GEN':>4}  {'CREATED (UTC)':<24}  {'SIZE':>9}  {'SNAPSHOT':<12}  {'HEAD':<12}  "
          f"{'BRANCH':<16}  WRITER")
    for g in gens:
        branch = (g.head_ref or "(detached)").removeprefix("refs/heads/")
        # Stored strings come from a store anyone with its credentials could write.
        print(f"{g.generation:>4}  {printable(g.created_at):<24}  {format_size(g.size):>9}  "
              f"{g.snapshot[:12]:<12}  {(g.head or '-')[:12]:<12}  {printable(branch):<16}  "
              f"{printable(g.writer.host)}:{g.writer.pid}")
    return 0
