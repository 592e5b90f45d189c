"""Snapshots: record the workspace's current state as a git commit.

``shadow`` mode (default) never touches the user's HEAD, index, branches or working tree: the whole
tree as git sees it is staged into a private index and committed with ``git commit-tree`` onto
``refs/watcherd/snapshots``, with parents ``[previous snapshot, HEAD]``. ``branch`` mode commits on
the current branch like a person would, retrying while the user's own git holds ``index.lock``, and
records each HEAD on the same snapshot history, so the store moves forward whatever the user does
to the branch; while the user is in the middle of a rebase or merge it only records the tree there.
"""

from __future__ import annotations

import fcntl
import os
import re
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
# open, with no git of the user's running in the repository, and older than this is removed
# (branch mode; shadow mode owns its own locks).
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
        _log.debug("snapshot.started", mode=mode)  # a trace of the save's steps, for post-mortems
        snap = _take_shadow(git) if mode == "shadow" else _take_branch(git)
    if snap.commit:
        _log.info("snapshot.committed", commit=snap.commit, files=snap.files, mode=mode,
                  head=snap.head, paths=list(snap.paths[:10]),
                  duration_ms=round((time.monotonic() - started) * 1000, 1))
    else:
        _log.debug("snapshot.unchanged", mode=mode, snapshot=snap.snapshot_head,
                   duration_ms=round((time.monotonic() - started) * 1000, 1))
    return snap


def snapshot_head(git: Git, mode: str) -> str | None:
    """The commit that stands for the workspace's saved state in ``mode``.

    Both modes keep their history on ``SNAPSHOT_REF`` (branch mode records each HEAD there, so a
    ``reset --hard`` or a rebase of the user's is not a non-fast-forward for the store). A
    branch-mode workspace saved before it kept that history is stood for by its HEAD.
    """
    return git.rev(SNAPSHOT_REF) or (git.rev("HEAD") if mode == "branch" else None)


@contextmanager
def workspace_lock(git: Git) -> Iterator[Path]:
    """Serialise watcherd processes on one repository (the daemon and a standalone snapshot).

    Under this lock any lock file in watcherd's own namespace is stale by definition: only a
    watcherd process that was killed can have left it, so it is removed.
    """
    state = git.git_dir() / "watcherd"
    try:
        state.mkdir(exist_ok=True)
        fd = os.open(state / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        # A read-only or full disk: one line that says so, and the daemon retries later.
        raise WorkspaceError(f"cannot write watcherd's lock {state / 'lock'}: {exc.strerror}; "
                             "nothing can be snapshotted until the workspace is writable") from None
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

    if (prev or head) and not Path(env["GIT_INDEX_FILE"]).exists():
        # An empty index would record whatever git cannot read right now (a directory without
        # read permission) as deleted; starting from the last recorded state keeps it instead.
        git.run("read-tree", prev or head, env=env)
    _add_all(git, env)
    _drop_now_ignored(git, env)
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


def _add_all(git: Git, env: dict[str, str] | None = None, *, attempts: int = 3) -> None:
    """``git add --all`` of the work tree into the index ``env`` names (the real one if None)."""
    for attempt in range(attempts):
        # --ignore-errors: an unreadable file must not stop every other edit from being saved.
        r = git.run("add", "--all", "--ignore-errors", "--", ".", env=env, check=False)
        if r.returncode == 0:
            return
        said = r.stderr.decode("utf-8", "replace").strip()
        if "unable to stat" in said and "No such file" in said and attempt < attempts - 1:
            continue  # a file vanished between git's listing and its stat (an editor's temp file)
        if r.returncode != 1:
            raise GitError(f"git add failed in {git.path}: {'; '.join(said.splitlines()[:3])}")
        # 1 is --ignore-errors' "these paths could not be added": the index holds all the rest.
        _report_skipped(said)
        return


def _drop_now_ignored(git: Git, env: dict[str, str]) -> None:
    """Take out of the private index what is ignored now and not tracked by the user.

    ``git add --all`` never drops an entry because a .gitignore matches it now (a tracked file is
    never ignored), and the private index holds everything ever snapshotted. Without this, a
    ``node_modules/`` or ``.env`` snapshotted before its .gitignore line would stay in every
    snapshot for ever, and ignoring a file too large to upload would not make the next bundle
    smaller. One ``ls-files`` when nothing is to be dropped.
    """
    listed = git.run("ls-files", "-z", "--cached", "--ignored", "--exclude-standard", env=env).stdout
    if not listed:
        return
    tracked = set(git.run("ls-files", "-z", "--cached", "--ignored", "--exclude-standard").stdout
                  .split(b"\0"))
    gone = [p for p in listed.split(b"\0") if p and p not in tracked]
    if gone:
        git.run("update-index", "-z", "--force-remove", "--stdin", env=env,
                input=b"".join(p + b"\0" for p in gone))
        _log.info("snapshot.now_ignored", files=len(gone),
                  paths=[p.decode("utf-8", "surrogateescape") for p in gone[:10]],
                  note="ignored since an earlier snapshot and not tracked: no longer snapshotted")


def _report_skipped(said: str) -> None:
    """Say which paths ``git add`` left out and why, one warning per kind of reason."""
    nested, refused, other = [], [], []
    for line in said.splitlines():
        if m := re.fullmatch(r"error: '(.*)/' does not have a commit checked out", line):
            nested.append(m[1])
        elif m := re.fullmatch(r"error: invalid path '(.*)'", line):
            refused.append(m[1])
        elif line.startswith(("error:", "warning:", "fatal:")) and "unable to add" not in line \
                and "adding embedded git repository" not in line:
            other.append(line)
    for path in nested:
        _log.warning("snapshot.nested_repository", path=path,
                     note="a nested git repository with no commit yet: git cannot record it, so "
                          "its files are not in the snapshot (commit in it, or remove its .git)")
    if refused:
        _log.warning("snapshot.paths_refused", paths=refused[:50], count=len(refused),
                     hint="git refuses these names (they would be .git on other systems, or a "
                          "symlinked .gitmodules); they are left out of the snapshot, rename them")
    if other:
        _log.warning("snapshot.unreadable_files", detail=other[:5],
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
    """The paths that differ; reports every nested repository (gitlink) that appeared or moved."""
    if old_tree:
        return _raw_paths(git.run("diff-tree", "-r", "-z", "--no-renames", old_tree, new_tree).stdout)
    # "<mode> <type> <id>" TAB <path> NUL.
    records = git.run("ls-tree", "-r", "-z", new_tree).stdout.split(b"\0")
    return _paths([(meta.split()[0], meta.split()[2], path)
                   for meta, _, path in (r.partition(b"\t") for r in records if r)])


def _raw_paths(raw: bytes) -> list[str]:
    """The paths of a ``diff-tree``/``diff-index`` ``-z`` raw listing, whose records are
    ":<old mode> <new mode> <old id> <new id> <status>" NUL <path> NUL."""
    fields = raw.split(b"\0")
    return _paths([(meta.split()[1], meta.split()[3], path)
                   for meta, path in zip(fields[0::2], fields[1::2]) if meta])


def _paths(entries: list[tuple[bytes, bytes, bytes]]) -> list[str]:
    """Paths of (new mode, new id, path) entries; each nested repository (gitlink) is reported."""
    paths = []
    for mode, oid, raw in entries:
        path = raw.decode("utf-8", "surrogateescape")
        paths.append(path)
        if mode == b"160000":
            _log.warning("snapshot.nested_repository", path=path, commit=oid.decode(),
                         note="a nested git repository: the snapshot records only its commit, "
                              "its files and history are not in the snapshot (make it part of "
                              "this repository, or save it separately)")
    return paths


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
    busy = _operation_in_progress(git)
    if busy:
        # `git add -A` would mark the user's conflicts resolved, markers and all, and `git commit`
        # would land in the middle of their rebase or conclude their merge: save the tree on the
        # snapshot history only, and leave the index and the branch to them.
        _log.info("snapshot.branch_deferred", operation=busy,
                  note="the user's git is in the middle of an operation: this snapshot is kept "
                       f"on {SNAPSHOT_REF} only, the branch and the index are left alone")
        return _take_shadow(git)
    if _git_running_in(git.git_dir()):
        # Our index.lock would make the user's running git fail (a rebase --autostash that cannot
        # apply its stash leaves a rebase that neither --continue nor --abort can end). Step aside:
        # the tree is saved on the snapshot history now, on the branch at the next snapshot.
        _log.debug("snapshot.branch_deferred", operation="a git command of the user is running")
        return _take_shadow(git)
    return _record_head(git, _commit_on_branch(git))


# A rebase, merge, cherry-pick, revert or bisect the user has not finished.
_OPERATIONS = ("rebase-merge", "rebase-apply", "MERGE_HEAD", "CHERRY_PICK_HEAD", "REVERT_HEAD",
               "BISECT_LOG")


def _operation_in_progress(git: Git) -> str | None:
    git_dir = git.git_dir()
    for name in _OPERATIONS:
        if (git_dir / name).exists():
            return name
    if git.run("ls-files", "--unmerged", "-z").stdout:
        return "unmerged paths"
    return None


def _record_head(git: Git, snap: Snapshot) -> Snapshot:
    """Add the HEAD ``snap`` left to the snapshot history (parents: previous snapshot, HEAD).

    The store only moves forward along this history. The branch alone would not do: after the
    user's ``reset --hard``, rebase or checkout of another branch, HEAD no longer contains the
    stored head, and every later save would be refused as a conflict. Recorded here, what the
    user moved away from also stays in every later bundle.
    """
    head = snap.head
    if head is None:
        return snap  # no commit yet on the branch: nothing to record
    prev = git.rev(SNAPSHOT_REF)
    tree = git.out("rev-parse", f"{head}^{{tree}}")
    prev_tree = git.out("rev-parse", f"{prev}^{{tree}}") if prev else None
    # The tree counts too: a snapshot taken while the user was mid-rebase recorded their work
    # tree, not HEAD's, and an aborted rebase goes back to HEAD's.
    if prev and tree == prev_tree and _recorded_head(git, prev, head) == head:
        return Snapshot(snap.commit, prev, head, snap.head_ref, snap.files, snap.paths)
    paths = list(snap.paths) if snap.commit else _changed(git, prev_tree, tree)
    args = ["commit-tree", tree, "-m", _message(paths, head)]
    for parent in (prev, head):
        if parent:
            args += ["-p", parent]
    recorded = git.out(*args)
    git.update_ref(SNAPSHOT_REF, recorded, prev, "watcherd: snapshot")
    # A HEAD moved by the user alone (their own commit) is new history too: it must be uploaded.
    return Snapshot(snap.commit or recorded, recorded, head, snap.head_ref, len(paths),
                    tuple(paths))


def _commit_on_branch(git: Git) -> Snapshot:
    lock = git.git_dir() / "index.lock"

    def attempt() -> Snapshot:
        for _ in range(3):
            remove_stale_lock(lock)
            _add_all(git)
            staged = _staged(git)
            head_ref = git.head_ref()
            if not staged:
                head = git.rev("HEAD")
                return Snapshot(None, head, head, head_ref)
            r = git.run("commit", "--quiet", "--no-verify", "--no-gpg-sign", "-m",
                        _message(staged, None), check=False)
            if r.returncode == 0:
                head = git.rev("HEAD")
                return Snapshot(head, head, head, head_ref, len(staged), tuple(staged))
            said = r.stderr.decode("utf-8", "replace").strip()
            if said and "cannot lock ref" not in said:  # a held index.lock: retrying() waits
                raise GitError(f"git commit failed in {git.path} (exit {r.returncode}): "
                               f"{'; '.join(said.splitlines()[:3])}")
            # "nothing to commit", or HEAD moved under our commit: the user's git (a stash, a
            # reset, a commit) changed the index or the branch between our add and our commit.
            # Look again.
        raise GitError(f"git commit in {git.path} was overtaken three times in a row: another git "
                       "keeps changing the index or the branch; retrying later")

    return retrying(attempt)


def _staged(git: Git) -> list[str]:
    # Plumbing, not `git diff`: the workspace's diff.* config (external diff, ignoreSubmodules)
    # has no say, and nested repositories are reported the same way as in shadow mode.
    base = "HEAD" if git.rev("HEAD") else _empty_tree(git)
    return _raw_paths(git.run("diff-index", "--cached", "-z", "--no-renames", base).stdout)


def remove_stale_lock(lock: Path, *, max_age: float = STALE_LOCK_AGE) -> bool:
    """Remove ``lock`` if it is older than ``max_age`` seconds, no process holds it open and no
    git of the user's runs in the repository."""
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return False
    if age < max_age or _held_open(lock) or _git_running_in(lock.parent):
        return False
    lock.unlink(missing_ok=True)
    _log.warning("snapshot.stale_lock_removed", lock=str(lock), age_s=round(age),
                 reason="no process holds it open and no git runs in the repository")
    return True


def _git_running_in(git_dir: Path) -> bool:
    """Whether a git process that is not ours runs in the repository of ``git_dir``.

    An open file is not the only sign of a live lock: ``git commit -a`` keeps ``index.lock`` while
    its editor is open, with the file closed, for as long as the user takes to write the message.
    A git whose directory cannot be read (another user's) counts as running here: a lock left in
    place costs a retry, a live lock removed costs the user's commit and can corrupt the index.
    Our own gits (and the gits they start) are not the user's.
    """
    roots = {str(git_dir), str(git_dir.parent)}
    parents: dict[int, int] = {}
    gits = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            stat = (proc / "stat").read_text()
            name = stat[stat.index("(") + 1:stat.rindex(")")]
            parents[int(proc.name)] = int(stat[stat.rindex(")") + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
        if name == "git":
            gits.append(int(proc.name))
    me = os.getpid()
    for pid in gits:
        ancestor, hops = parents.get(pid), 0
        while ancestor not in (None, 0, 1, me) and hops < 64:
            ancestor, hops = parents.get(ancestor), hops + 1
        if ancestor == me:
            continue  # ours: the daemon's check-ignore, a bundle being written
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except PermissionError:
            return True
        except OSError:
            continue
        if any(cwd == root or cwd.startswith(root + "/") for root in roots):
            return True
    return False


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
