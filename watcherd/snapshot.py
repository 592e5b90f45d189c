"""Snapshots: record the workspace's current state as a git commit.

``shadow`` mode (default) never touches the user's HEAD, index, branches or working tree: the whole
tree as git sees it is staged into a private index and committed with ``git commit-tree`` onto
``refs/watcherd/snapshots``, with parents ``[previous snapshot, HEAD]``. ``branch`` mode commits on
the current branch like a person would, retrying while the user's own git holds ``index.lock``.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from watcherd import log
from watcherd.errors import GitError, WorkspaceError
from watcherd.git import Git, retrying

SNAPSHOT_REF = "refs/watcherd/snapshots"
_MESSAGE_PATHS = 50
# A lock file left by a git process that died blocks every later commit. One that nobody holds
# open and that is older than this is removed (branch mode; shadow mode owns its own locks).
STALE_LOCK_AGE = 60.0

_log = log.get(__name__)


@dataclass(frozen=True)
class Snapshot:
    """The outcome of one snapshot attempt. ``commit`` is None when nothing had changed."""

    commit: str | None
    snapshot_head: str | None  # the snapshot history's head after this attempt
    head: str | None  # the user's HEAD commit (None in an empty repository)
    head_ref: str | None  # the branch HEAD points at, None when detached
    files: int = 0
    paths: tuple[str, ...] = ()


def ensure_workspace(path: Path, git: Git) -> None:
    """Make ``path`` a git work tree if it is not one; refuse a missing path or a file."""
    if not path.exists():
        raise WorkspaceError(f"workspace.path {path} does not exist (create it, or fix workspace.path)")
    if not path.is_dir():
        raise WorkspaceError(f"workspace.path {path} is not a directory")
    if not git.is_repo():
        git.run("init", "--quiet")
        _log.info("workspace.initialised", path=str(path))


def take(git: Git, mode: str = "shadow") -> Snapshot:
    """Snapshot the work tree in ``mode``; a no-op (commit None) when nothing changed."""
    started = time.monotonic()
    with workspace_lock(git):
        snap = _take_shadow(git) if mode == "shadow" else _take_branch(git)
    if snap.commit:
        _log.info("snapshot.committed", commit=snap.commit, files=snap.files, mode=mode,
                  head=snap.head, paths=list(snap.paths[:10]),
                  duration_ms=round((time.monotonic() - started) * 1000, 1))
    else:
        _log.debug("snapshot.unchanged", mode=mode,
                   duration_ms=round((time.monotonic() - started) * 1000, 1))
    return snap


def snapshot_head(git: Git, mode: str) -> str | None:
    """The commit that stands for the workspace's saved state in ``mode``."""
    return git.rev(SNAPSHOT_REF) if mode == "shadow" else git.rev("HEAD")


@contextmanager
def workspace_lock(git: Git) -> Iterator[Path]:
    """Serialise watcherd processes on one repository (the daemon and a standalone snapshot).

    Under this lock any lock file in watcherd's own namespace is stale by definition: only a
    watcherd process that was killed can have left it, so it is removed.
    """
    state = git.git_dir() / "watcherd"
    state.mkdir(exist_ok=True)
    fd = os.open(state / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        for stale in (state / "index.lock", git.git_dir() / f"{SNAPSHOT_REF}.lock"):
            if stale.exists():
                stale.unlink(missing_ok=True)
                _log.warning("snapshot.stale_lock_removed", lock=str(stale),
                             reason="left by a watcherd process that did not finish")
        yield state
    finally:
        os.close(fd)


# -- shadow ------------------------------------------------------------------------------------------


def _take_shadow(git: Git) -> Snapshot:
    git_dir = git.git_dir()
    env = {"GIT_INDEX_FILE": str(git_dir / "watcherd" / "index")}
    head = git.rev("HEAD")
    head_ref = git.head_ref()
    prev = git.rev(SNAPSHOT_REF)

    _add_all(git, env)
    tree = git.out("write-tree", env=env)

    prev_tree = git.out("rev-parse", f"{prev}^{{tree}}") if prev else None
    prev_head = _recorded_head(git, prev, head) if prev else None
    if prev and tree == prev_tree and head == prev_head:
        return Snapshot(None, prev, head, head_ref)
    if not prev and not head and tree == _empty_tree(git):
        return Snapshot(None, None, None, head_ref)  # an empty repository with nothing in it

    base_tree = prev_tree or (git.out("rev-parse", f"{head}^{{tree}}") if head else None)
    paths = _changed(git, base_tree, tree)
    message = _message(paths, head if head != prev_head else None)
    args = ["commit-tree", tree, "-m", message]
    for parent in (prev, head):
        if parent:
            args += ["-p", parent]
    commit = git.out(*args)
    git.update_ref(SNAPSHOT_REF, commit, prev, "watcherd: snapshot")
    return Snapshot(commit, commit, head, head_ref, len(paths), tuple(paths))


def _add_all(git: Git, env: dict[str, str]) -> None:
    # --ignore-errors: an unreadable file must not stop every other edit from being saved.
    r = git.run("add", "--all", "--ignore-errors", "--", ".", env=env, check=False)
    if r.returncode != 0:
        said = r.stderr.decode("utf-8", "replace").strip()
        if "unable to index" not in said and "Permission denied" not in said:
            raise GitError(f"git add failed in {git.path}: {said}")
        _log.warning("snapshot.unreadable_files", detail=said.splitlines()[:5],
                     hint="files git could not read are left out of this snapshot")


def _recorded_head(git: Git, commit: str, head: str | None) -> str | None:
    """The HEAD that snapshot ``commit`` recorded: its second parent, or its only parent when it
    was the first snapshot (no previous one) and that parent is ``head``."""
    parents = git.out("rev-list", "--parents", "-n", "1", commit).split()[1:]
    if len(parents) > 1:
        return parents[1]
    # A single parent is either HEAD (first snapshot) or the previous snapshot (empty repository).
    return head if parents == [head] else None


def _empty_tree(git: Git) -> str:
    return git.out("hash-object", "-t", "tree", "--stdin", input=b"")


def _changed(git: Git, old_tree: str | None, new_tree: str) -> list[str]:
    if old_tree:
        r = git.run("diff-tree", "-r", "-z", "--no-renames", "--name-only", old_tree, new_tree)
    else:
        r = git.run("ls-tree", "-r", "-z", "--name-only", new_tree)
    return [p.decode("utf-8", "surrogateescape") for p in r.stdout.split(b"\0") if p]


def _message(paths: list[str], moved_head: str | None) -> str:
    lines = [f"watcherd: snapshot ({len(paths)} files)", ""]
    lines += paths[:_MESSAGE_PATHS]
    if len(paths) > _MESSAGE_PATHS:
        lines.append(f"... and {len(paths) - _MESSAGE_PATHS} more")
    if moved_head:
        lines += ["", f"HEAD: {moved_head}"]
    return "\n".join(lines).rstrip("\n") + "\n"


# -- branch ------------------------------------------------------------------------------------------


def _take_branch(git: Git) -> Snapshot:
    lock = git.git_dir() / "index.lock"

    def attempt() -> Snapshot:
        remove_stale_lock(lock)
        git.run("add", "--all", "--ignore-errors", "--", ".", ok=(0, 1))
        staged = _staged(git)
        head_ref = git.head_ref()
        if not staged:
            head = git.rev("HEAD")
            return Snapshot(None, head, head, head_ref)
        git.run("commit", "--quiet", "--no-verify", "--no-gpg-sign", "-m", _message(staged, None))
        head = git.rev("HEAD")
        return Snapshot(head, head, head, head_ref, len(staged), tuple(staged))

    return retrying(attempt)


def _staged(git: Git) -> list[str]:
    if git.rev("HEAD"):
        r = git.run("diff", "--cached", "-z", "--no-renames", "--name-only")
    else:
        r = git.run("ls-files", "-z", "--cached")
    return [p.decode("utf-8", "surrogateescape") for p in r.stdout.split(b"\0") if p]


def remove_stale_lock(lock: Path, *, max_age: float = STALE_LOCK_AGE) -> bool:
    """Remove ``lock`` if no process holds it open and it is older than ``max_age`` seconds."""
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return False
    if age < max_age or _held_open(lock):
        return False
    lock.unlink(missing_ok=True)
    _log.warning("snapshot.stale_lock_removed", lock=str(lock), age_s=round(age),
                 reason="no process holds it open")
    return True


def _held_open(path: Path) -> bool:
    target = str(path)
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            for fd in fd_dir.iterdir():
                try:
                    if os.readlink(fd) == target:
                        return True
                except OSError:
                    continue
        except OSError:
            continue
    return False
