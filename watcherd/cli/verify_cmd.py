"""``watcherd verify``: prove that the newest generation restores, without touching the workspace."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from watcherd import bundle as bundles
from watcherd.cli.restore_cmd import generations_for
from watcherd.config import Config
from watcherd.errors import IntegrityError
from watcherd.restore import build_tree
from watcherd.store import open_store


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="prove the newest generation restores (exit 0 good, 1 not)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace, cfg: Config) -> int:
    store = open_store(cfg.store)
    try:
        gens = generations_for(cfg, store)
        manifest, _ = gens.read_manifest()
        if manifest is None:
            print(f"verify: nothing stored for {cfg.store.key} in {store.url}")
            return 1
        gen = manifest.current
        with tempfile.TemporaryDirectory(prefix="watcherd-verify-") as tmp:
            try:
                path = gens.fetch(gen, Path(tmp))
                bundles.prove(path, Path(tmp))
                tree = Path(tmp) / "tree"
                tree.mkdir()
                files = build_tree(tree, path, gen, cfg, home=Path(tmp))
            except IntegrityError as exc:
                print(f"verify: generation {gen.generation} does NOT restore: {exc}")
                return 1
    finally:
        store.close()
    print(f"verify: generation {gen.generation} restores: {files} files, {gen.size} bytes, "
          f"sha256 ok, snapshot {gen.snapshot[:12]}, HEAD {(gen.head or '-')[:12]} "
          f"on {(gen.head_ref or '(detached)').removeprefix('refs/heads/')}")
    return 0
