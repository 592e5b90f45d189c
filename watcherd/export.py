"""``watcherd export``: one self-contained bundle of a generation that plain ``git clone`` accepts.

A stored generation is a chain of bundles of watcherd's snapshot history, which plain git cannot
turn into the user's repository. The export consolidates the chain into one bundle holding what
the snapshot recorded — every branch and tag, the stash, HEAD — and, when the working tree held
changes no commit has, one commit on top of HEAD with exactly that tree ("watcherd: working
state"), so that ``git clone`` of the file checks out the files as they were. The user's own
commits are untouched: that commit is a child of HEAD. watcherd's snapshot history stays out
(its state commits hold the recorded config, remote URLs with their credentials included: an
export is made to be handed over). The bundle is proven by a real clone before it is handed
over.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from watcherd import bundle as bundles
from watcherd import log, state
from watcherd import manifest as mf
from watcherd.errors import GitError, IntegrityError
from watcherd.generations import Generations
from watcherd.git import Git, Identity
from watcherd.repo import SNAPSHOT_REF

_log = log.get(__name__)
WORKING_STATE = "watcherd: working state"


@dataclass(frozen=True)
class Exported:
    generation: int
    bytes: int
    head_ref: str | None
    working_state: str | None  # the commit holding uncommitted work, None when there was none


def export(generations: Generations, gen: mf.Generation, out: BinaryIO, scratch: Path,
           identity: Identity | None = None) -> Exported:
    """Write generation ``gen`` as one clonable bundle to ``out``; ``scratch`` is an empty
    directory for the work. Raises :class:`IntegrityError` when the generation does not restore
    or the bundle written does not clone to the snapshot's tree."""
    chain = generations.fetch(gen, scratch)
    repo = scratch / "export.git"
    git = Git(repo, home=scratch, identity=identity or Identity())
    git.run("init", "--bare", "--quiet", "--template=",
            f"--object-format={bundles.object_format(chain[0])}", str(repo))
    try:
        for path in chain:
            bundles.fetch_bundle(git, path, refspec="+refs/*:refs/*")
        recorded = state.load(git, gen.snapshot).recorded
        if recorded is not None:
            state.apply_refs(git, recorded)  # every other ref goes
        else:  # an older watcherd's generation: its refs are the user's, the history is not
            git.run("update-ref", "-d", SNAPSHOT_REF, check=False)
        working = _working_state(git, gen)
        dest = scratch / "export.bundle"
        git.run("bundle", "create", "--quiet", str(dest), "--all", timeout=bundles.BUNDLE_TIMEOUT)
        _prove(dest, scratch, git.out("rev-parse", f"{gen.snapshot}^{{tree}}"))
    except GitError as exc:
        raise IntegrityError(f"generation {gen.generation} does not export: {exc}") from None
    with open(dest, "rb") as f:
        shutil.copyfileobj(f, out, 1 << 20)
    out.flush()
    size = dest.stat().st_size
    head_ref = git.run("symbolic-ref", "-q", "HEAD", check=False).text or None
    _log.info("export.done", generation=gen.generation, bytes=size, working_state=working)
    return Exported(gen.generation, size, head_ref, working)


def _working_state(git: Git, gen: mf.Generation) -> str | None:
    """A commit on top of HEAD whose tree is the snapshot's, when the two differ; HEAD (its
    branch, or detached) then points at it."""
    tree = git.out("rev-parse", f"{gen.snapshot}^{{tree}}")
    head = git.rev("HEAD")
    if head and git.out("rev-parse", f"{head}^{{tree}}") == tree:
        return None
    message = (f"{WORKING_STATE}\n\nThe files as they were at generation {gen.generation} "
               f"({gen.created_at}), uncommitted changes and untracked files included.\n")
    args = ["commit-tree", tree, "-m", message, *(["-p", head] if head else [])]
    # Dated as the generation: exporting it twice gives the same commit, and the same bundle.
    commit = git.out(*args, env={"GIT_AUTHOR_DATE": gen.created_at,
                                 "GIT_COMMITTER_DATE": gen.created_at})
    branch = git.run("symbolic-ref", "-q", "HEAD", check=False).text
    if branch:
        git.run("update-ref", branch, commit)
    else:
        git.run("update-ref", "--no-deref", "HEAD", commit)
    return commit


def _prove(bundle: Path, scratch: Path, tree: str) -> None:
    """Clone the bundle as a person would; its checkout must be the snapshot's tree."""
    clone = scratch / "clone"
    git = Git(clone / ".git", home=scratch)
    git.run("-c", "protocol.file.allow=always", "clone", "--quiet", "--no-checkout", "--",
            str(bundle), str(clone), timeout=bundles.BUNDLE_TIMEOUT)
    got = git.out("rev-parse", "HEAD^{tree}")
    if got != tree:
        raise IntegrityError(f"the exported bundle clones to tree {got[:12]}, not the snapshot's "
                             f"{tree[:12]}")
    shutil.rmtree(clone, ignore_errors=True)
