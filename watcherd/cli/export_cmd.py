"""``watcherd export``: one self-contained bundle of a generation that ``git clone`` accepts."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from watcherd import export
from watcherd.cli.common import command_parser, say
from watcherd.cli.restore_cmd import generations_for
from watcherd.config import Config
from watcherd.errors import RestoreError, UsageError
from watcherd.store import open_store


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = command_parser(
        sub, "export", summary="write a generation as one bundle plain git can clone",
        description="""\
Consolidates a stored generation (the newest, or --generation / --checkpoint) into one
verified bundle file: every branch, tag and the stash as the snapshot recorded them, HEAD,
and, when the working tree held changes no commit has, one commit on top of HEAD with
exactly those files ("watcherd: working state"). `git clone FILE` checks out the files as
they were. The bundle is proven by a clone before it is written. --output - streams it to
stdout; a FILE is written whole or not at all.""",
        exit_statuses={0: "exported",
                       1: "the store could not be read, or the generation does not export "
                          "(corrupt); or FILE could not be written",
                       2: "fix the config or the command line (no such generation)"})
    which = p.add_mutually_exclusive_group()
    which.add_argument("--generation", type=int, metavar="N", help="export generation N")
    which.add_argument("--checkpoint", metavar="NAME",
                       help="export the generation checkpoint NAME labels")
    p.add_argument("--output", "-o", required=True, metavar="FILE",
                   help="where to write the bundle; - for stdout")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace, cfg: Config) -> int:
    if args.output != "-" and Path(args.output).is_dir():
        raise UsageError(f"--output {args.output} is a directory; name the bundle file "
                         f"({Path(args.output) / 'workspace.bundle'})")
    if args.output != "-" and not Path(args.output).parent.is_dir():
        raise UsageError(f"--output {args.output}: its directory does not exist")
    if args.output == "-" and sys.stdout is None:
        raise UsageError("--output -: stdout is closed")
    store = open_store(cfg.store)
    try:
        generations = generations_for(cfg, store)
        manifest, _ = generations.read_manifest()
        if manifest is None:
            raise RestoreError(f"{generations.where(cfg.store.key)}: nothing stored to export")
        gen = manifest.current
        if args.generation is not None:
            gen = manifest.find(args.generation)
            if gen is None:
                have = ", ".join(str(g.generation) for g in manifest.generations)
                raise UsageError(f"--generation {args.generation} is not in the store "
                                 f"(kept: {have})")
        elif args.checkpoint is not None:
            gen = manifest.labelled(args.checkpoint)
        with tempfile.TemporaryDirectory(prefix="watcherd-export-") as scratch:
            if args.output == "-":
                done = export.export(generations, gen, sys.stdout.buffer, Path(scratch))
            else:
                done = _to_file(generations, gen, Path(args.output), Path(scratch))
    finally:
        store.close()
    if args.output != "-":
        working = f", uncommitted work as commit {done.working_state[:12]}" \
            if done.working_state else ""
        say(f"export: generation {done.generation} -> {args.output} ({done.bytes} bytes"
            f"{working}); `git clone {args.output}` checks it out")
    return 0


def _to_file(generations, gen, dest: Path, scratch: Path) -> export.Exported:
    """Write the bundle beside ``dest`` and rename it into place: whole or not at all."""
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            done = export.export(generations, gen, out, scratch)
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return done
