"""``watcherd verify``: prove that the newest generation restores, without touching the workspace."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from watcherd.cli.common import command_parser, say, say_json
from watcherd.cli.restore_cmd import generations_for
from watcherd.config import Config
from watcherd.errors import IntegrityError
from watcherd.restore import build_tree
from watcherd.store import open_store


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = command_parser(
        sub, "verify", summary="prove the newest generation restores (exit 0 good, 1 not)",
        description="""\
Downloads the newest generation of store.key, checks its size and sha256, proves the bundle
with git and builds its tree in a temporary directory, as a restore would. The workspace is
not touched.""",
        exit_statuses={0: "the newest generation restores",
                       1: "it does not, nothing is stored, or the store could not be read",
                       2: "fix the config or the command line"})
    p.add_argument("--json", action="store_true",
                   help="print the verdict as one JSON document (ok, generation, files, ...)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace, cfg: Config) -> int:
    store = open_store(cfg.store)
    try:
        gens = generations_for(cfg, store)
        manifest, _ = gens.read_manifest()
        if manifest is None:
            return _verdict(args, {"ok": False, "generation": None, "key": cfg.store.key,
                                   "error": f"nothing stored for {cfg.store.key} in {store.url}"},
                            f"verify: nothing stored for {cfg.store.key} in {store.url}")
        gen = manifest.current
        with tempfile.TemporaryDirectory(prefix="watcherd-verify-") as tmp:
            try:
                chain = gens.fetch(gen, Path(tmp))
                tree = Path(tmp) / "tree"
                tree.mkdir()
                files = build_tree(tree, chain, gen, cfg, home=Path(tmp))
            except IntegrityError as exc:
                return _verdict(args, {"ok": False, "generation": gen.generation,
                                       "key": cfg.store.key, "error": str(exc)},
                                f"verify: generation {gen.generation} does NOT restore: {exc}")
    finally:
        store.close()
    return _verdict(args, {"ok": True, "generation": gen.generation, "key": cfg.store.key,
                           "files": files, "size": gen.size, "sha256": gen.sha256,
                           "snapshot": gen.snapshot, "head": gen.head, "head_ref": gen.head_ref},
                    f"verify: generation {gen.generation} restores: {files} files, {gen.size} "
                    f"bytes, sha256 ok, snapshot {gen.snapshot[:12]}, HEAD {(gen.head or '-')[:12]} "
                    f"on {(gen.head_ref or '(detached)').removeprefix('refs/heads/')}")


def _verdict(args: argparse.Namespace, doc: dict[str, Any], line: str) -> int:
    """Print the verdict as asked (a JSON document or one line); 0 if the generation restores."""
    if args.json:
        say_json(doc)
    else:
        say(line)
    return 0 if doc["ok"] else 1
