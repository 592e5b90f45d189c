"""``watcherd rollback``: put the workspace back, in place, to a state a snapshot recorded.

The state the workspace is left in is first snapshotted and saved (the caller does that: the
daemon, or the command standalone), so every rollback can itself be undone (``--undo``). Then,
without moving the workspace directory (a dev server and an agent are running in it):

* a new git directory is built in the state directory from watcherd's own repository: the
  objects the recorded state needs, its refs, HEAD, stash and index;
* under watcherd's lock, the state is snapshotted once more (the undo snapshot) and the working
  tree changed from its tree to the target's with one two-tree ``read-tree -m -u``: only files
  that differ are written, files the target lacks are removed, ignored files are not touched,
  and a file edited in between stops it before anything is written (snapshot again, retry);
* the new git directory is put beside ``.git`` and takes its place in two renames, and the
  user's own entries of the old one (config, hooks, ``info/``, submodules' repositories, LFS
  objects) are moved into it, never read; every step goes through descriptors opened with
  ``O_NOFOLLOW`` (a link the agent plants is never followed out of the workspace), and all of
  it is journalled in the state directory so a rerun after a crash finishes it.

Refused while the user's git holds a lock (an ``index.lock``, a ref being written) or is in the
middle of a rebase or merge: the user's git and a rollback must not both write the repository.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
import stat
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from watcherd import bundle as bundles
from watcherd import log, snapshot, state, timeline
from watcherd import manifest as mf
from watcherd import workspace as ws
from watcherd.errors import IntegrityError, UsageError, WatcherdError
from watcherd.generations import Generations
from watcherd.git import Git
from watcherd.repo import SNAPSHOT_REF, Repo, write_private

_log = log.get(__name__)
ATTEMPTS = 5  # snapshot-and-change pairs tried while files keep changing under the rollback
JOURNAL = "rollback.json"
LAST = "last-rollback.json"
TARGET_REF = "refs/watcherd/rollback-target"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_OPERATIONS = ("rebase-merge", "rebase-apply", "MERGE_HEAD", "CHERRY_PICK_HEAD", "REVERT_HEAD")
# The user's own entries of the git directory, kept as they are (moved, never read): config,
# hooks, info/, submodules' repositories, LFS objects, linked worktrees' records.
_KEPT = ("config", "description", "info", "hooks", "modules", "lfs", "worktrees", "rr-cache")


class RollbackRefused(WatcherdError):
    """The rollback cannot run now (the user's git is busy, the target does not exist)."""

    exit_status = 2


@dataclass(frozen=True)
class Target:
    snapshot: str
    generation: int | None
    said: str  # how the person named it


def resolve(repo: Repo, manifest: mf.Manifest | None, name: str | None = None, *,
            before: datetime | None = None, undo: bool = False) -> Target:
    """The snapshot ``name`` means: a checkpoint's name, a generation number, or a snapshot id
    (at least 7 hex digits) of this history; or the newest snapshot before ``before``; or, with
    ``undo``, the state the last rollback left. Raises :class:`RollbackRefused` naming what is
    there when nothing matches."""
    git = repo.bare
    if undo:
        last = last_rollback(repo)
        if last is None:
            raise RollbackRefused("nothing to undo: no rollback of this workspace is recorded")
        return Target(last["undo"], None, f"the state before the rollback to {last.get('said')}")
    if before is not None:
        head = repo.snapshot_head()
        entries = timeline.read(git, head, manifest) if head else []
        older = [e for e in entries if mf.parse_time(e.at) < before]
        if not older:
            raise RollbackRefused(f"--before {before.isoformat()}: no snapshot is that old")
        return Target(older[0].snapshot, older[0].generation, f"--before {before.isoformat()}")
    assert name is not None
    checkpoint = manifest.checkpoint(name) if manifest else None
    if checkpoint is not None:
        gen = manifest.find(checkpoint.generation)
        if gen is None or gen.snapshot != checkpoint.snapshot:
            raise IntegrityError(f"checkpoint {name} names snapshot {checkpoint.snapshot[:12]}, "
                                 f"which generation {checkpoint.generation} does not hold: the "
                                 "manifest was altered")
        return Target(checkpoint.snapshot, checkpoint.generation, f"checkpoint {name}")
    if name.isdigit() and manifest is not None and (len(name) < 7 or manifest.find(int(name))):
        gen = manifest.find(int(name))
        if gen is None:
            have = ", ".join(str(g.generation) for g in manifest.generations)
            raise RollbackRefused(f"generation {name} is not in the store (kept: {have})")
        return Target(gen.snapshot, gen.generation, f"generation {name}")
    if re.fullmatch(r"[0-9a-f]{7,64}", name):
        r = git.run("rev-parse", "--verify", "--quiet", f"{name}^{{commit}}", check=False)
        head = repo.snapshot_head()
        if r.returncode == 0 and head and git.is_ancestor(r.text, head) and \
                state.state_parent(git, r.text) is not None:
            return Target(r.text, None, f"snapshot {name}")
    names = ", ".join(c.name for c in (manifest.checkpoints if manifest else ())) or "none"
    raise RollbackRefused(f"{name!r} is no checkpoint (there are: {names}), generation or "
                          "snapshot of this workspace's history")


def fetch_target(repo: Repo, generations: Generations, manifest: mf.Manifest | None,
                 target: Target) -> None:
    """Bring a generation's snapshot into watcherd's repository when it is not there yet (a
    generation of a history this workspace no longer continues: one superseded, or saved by
    another pod before a conflict). Its bundles are checked like a restore's; the snapshot is
    kept under ``refs/watcherd/rollback-target`` so nothing prunes it. Raises
    :class:`IntegrityError` when a bundle is missing or corrupt."""
    if target.generation is None or repo.bare.has_commit(target.snapshot):
        return
    gen = manifest.find(target.generation) if manifest else None
    if gen is None:
        raise RollbackRefused(f"{target.said} is not in the store any more")
    with tempfile.TemporaryDirectory(prefix="rollback-", dir=repo.spool) as scratch:
        for path in generations.fetch(gen, Path(scratch)):
            bundles.fetch_bundle(repo.bare, path, refspec=f"+{SNAPSHOT_REF}:{TARGET_REF}")
    if not repo.bare.has_commit(target.snapshot):
        raise IntegrityError(f"{target.said}: its bundles do not hold snapshot "
                             f"{target.snapshot[:12]}")


def parse_request(doc: dict) -> tuple[str | None, datetime | None, bool]:
    """``POST /rollback``'s body: exactly one of ``{"target": "NAME"}``, ``{"before": "TIME"}``
    (RFC 3339, or an age like ``"2h"``) or ``{"undo": true}``; (name, before, undo). Raises
    :class:`UsageError` naming what is wrong."""
    target, before, undo = doc.get("target"), doc.get("before"), doc.get("undo", False)
    unknown = sorted(set(doc) - {"target", "before", "undo"})
    if unknown:
        raise UsageError(f"unknown field {unknown[0]!r}: send one of target, before, undo")
    if not isinstance(undo, bool) or (target is not None and not isinstance(target, str)) or \
            (before is not None and not isinstance(before, str)):
        raise UsageError('send {"target": "NAME"}, {"before": "TIME"} or {"undo": true}')
    if sum((target is not None, before is not None, undo)) != 1:
        raise UsageError("name exactly one of: a target (checkpoint, generation, snapshot id), "
                         "before, undo")
    try:
        when = timeline.parse_moment(before) if before is not None else None
    except ValueError:
        raise UsageError(f"before {before!r}: not a time (2026-11-26T10:00:00Z) or an age "
                         '("2h")') from None
    return target, when, undo


def check_quiet(layout: ws.Layout) -> None:
    """Refuse while the user's git holds a lock or is in the middle of an operation."""
    if layout.git_dir is None:
        return
    for d in {layout.git_dir, layout.common_dir}:
        for name in ("index.lock", "HEAD.lock", "packed-refs.lock", "config.lock", *_OPERATIONS):
            if os.path.lexists(d / name):
                raise RollbackRefused(f"the user's git is busy in the workspace ({d / name} "
                                      "exists); try again once it is done")
        refs = d / "refs"
        if refs.is_dir():
            for dirpath, _, files in os.walk(refs):
                for f in files:
                    if f.endswith(".lock"):
                        raise RollbackRefused(f"the user's git is writing a ref ({dirpath}/{f}); "
                                              "try again once it is done")


def apply(repo: Repo, target: Target, *, mode: str = "shadow",
          cache: snapshot.Cache | None = None, attempts: int = ATTEMPTS) -> str:
    """Make the workspace's files and git state what ``target`` recorded; return the snapshot of
    the state it was in (what ``--undo`` returns to). Call under :meth:`Repo.lock`, after the
    current state was saved.

    Right before the files change, the state is snapshotted once more under the lock (edits made
    since the save are in that snapshot too); a file edited between that snapshot and the change
    makes git refuse before it writes anything, and the pair is tried again, ``attempts`` times.

    Raises :class:`RollbackRefused` when the workspace's ``.git`` is not a plain directory of it
    (a ``gitdir:`` file, a linked worktree), the user's git is busy, or the files kept changing.
    """
    layout = ws.locate(repo.workspace)
    if layout.git_dir is not None and layout.git_dir != layout.root / ".git":
        raise RollbackRefused("rollback in place needs the workspace's .git to be a directory "
                              "in it (not a gitdir: file or a linked worktree)")
    check_quiet(layout)
    cache = cache if cache is not None else snapshot.Cache()
    git = repo.bare
    s_commit = state.state_parent(git, target.snapshot)
    token = secrets.token_hex(4)
    names = {part: f".watcherd-rollback-{token}.{part}" for part in ("git", "old", "rescue")}
    journal = {"staging": names["git"], "old": names["old"], "rescue": names["rescue"],
               "target": target.snapshot, "phase": "building"}
    # Built in watcherd's own directory, where nothing of the agent's can redirect a write,
    # then put into the workspace root through a descriptor (:func:`_place`).
    staging = repo.spool / f"rollback-{token}.git"
    repo.write_journal(JOURNAL, journal)
    try:
        if s_commit is not None:
            _build_git_dir(repo, staging, s_commit, state.read(git, s_commit))
        undo, seen = _update_files(repo, target, layout, mode, cache, attempts, names["rescue"])
        if s_commit is not None:
            # The new index's stat data, from the files as they are now: no rehash by the
            # user's next git command.
            repo.git.run("update-index", "--refresh", "-q",
                         env={"GIT_INDEX_FILE": str(staging / "index")}, ok=(0, 1))
            _place(staging, layout.root, names["git"])
    except BaseException:
        _remove(layout.root, names["git"])
        _remove(layout.root, names["rescue"])
        repo.write_journal(JOURNAL, None)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if s_commit is None:
        # A snapshot of a workspace that had no repository (or of an older watcherd): the
        # files go back, the git directory is left as it is.
        repo.write_journal(JOURNAL, None)
        _log.warning("rollback.done", target=target.snapshot, said=target.said, undo=undo,
                     git_state="left as it is: the target recorded none",
                     note="the files are back to that state; `watcherd rollback --undo` returns")
        return undo
    if _git_state(layout) != seen:
        # The user's git wrote between the snapshot and now (a commit in those milliseconds):
        # what it wrote is kept in one more snapshot before its git directory goes.
        kept = snapshot.take_locked(repo, mode, cache).snapshot_head
        _log.warning("rollback.git_changed", snapshot=kept,
                     note="the user's git wrote during the rollback; that state is snapshot "
                          f"{kept}: `watcherd rollback {(kept or '')[:12]}` returns to it")
    journal["phase"] = "swapping"
    repo.write_journal(JOURNAL, journal)
    _swap(layout.root, journal["staging"], journal["old"])
    repo.write_journal(JOURNAL, None)
    _log.warning("rollback.done", target=target.snapshot, said=target.said, undo=undo,
                 note="the workspace is back to that state; `watcherd rollback --undo` returns")
    return undo


def _git_state(layout: ws.Layout) -> ws.GitState | None:
    try:
        return ws.read_state(layout) if layout.is_repository else None
    except ws.Unsafe:
        return None


def _update_files(repo: Repo, target: Target, layout: ws.Layout, mode: str,
                  cache: snapshot.Cache, attempts: int,
                  rescue: str) -> tuple[str, ws.GitState | None]:
    """Snapshot, then change the working tree from that snapshot's tree to the target's;
    (the snapshot ``--undo`` returns to, the git state it saw).

    Only what differs is written, files only the snapshot has are removed, what neither has
    (ignored files, files created since) is left alone. A two-tree merge (git-read-tree(1),
    "Two Tree Merge") checks every file it would touch against the snapshot before it writes
    any: an edit in between makes it refuse, and the pair is tried again. The last attempt,
    for a workspace written faster than a snapshot takes, forces the change and keeps what was
    edited in between (:func:`_forced`).
    """
    tmp = repo.dir / f"rollback-index-{os.getpid()}"
    env = {"GIT_INDEX_FILE": str(tmp)}
    git = repo.git  # watcherd's repository, the workspace as its work tree: raw bytes
    try:
        for attempt in range(attempts):
            undo = snapshot.take_locked(repo, mode, cache).snapshot_head
            if undo is None:
                raise RollbackRefused("the workspace is empty and has no snapshot to come back to")
            seen = _git_state(layout)
            # The snapshot's own index: its stat data spares hashing every file again.
            shutil.copyfile(repo.index, tmp)
            if git.out("write-tree", env=env) != git.out("rev-parse", f"{undo}^{{tree}}"):
                git.run("read-tree", f"{undo}^{{tree}}", env=env)
            git.run("update-index", "--refresh", "-q", env=env, ok=(0, 1))
            # Before any file changes: should the rest fail or be killed, --undo knows the way.
            _record_last(repo, undo, target)
            if attempt == attempts - 1:
                undo = _forced(repo, undo, target, env, layout.root, rescue)
                _record_last(repo, undo, target)
                return undo, seen
            r = git.run("read-tree", "-m", "-u", f"{undo}^{{tree}}", f"{target.snapshot}^{{tree}}",
                        env=env, check=False)
            if r.returncode == 0:
                return undo, seen
            _log.info("rollback.retried", attempt=attempt + 1,
                      reason=ws.printable(r.stderr.decode("utf-8", "replace").strip())[:300])
    finally:
        tmp.unlink(missing_ok=True)
    raise AssertionError("unreachable: the last attempt forces")


def _record_last(repo: Repo, undo: str, target: Target) -> None:
    write_private(repo.dir / LAST, json.dumps(
        {"undo": undo, "target": target.snapshot, "said": target.said,
         "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}).encode())


def _forced(repo: Repo, undo: str, target: Target, env: dict[str, str], root: Path,
            rescue: str) -> str:
    """Change the files from ``undo``'s tree to the target's even if some were edited since
    ``undo``, keeping those edits: each file about to change is hard-linked into directory
    ``rescue`` of the workspace root (ignored by the rules) before git replaces it; what the
    links hold afterwards that ``undo`` does not is committed as one more snapshot on top of it.
    Returns that snapshot, or ``undo`` when nothing was edited in between.

    Every path is reached through directory descriptors opened with ``O_NOFOLLOW``: a directory
    the agent swapped for a link is skipped, never followed out of the workspace."""
    git = repo.git
    raw = git.run("diff-tree", "-r", "-z", "--no-renames", f"{undo}^{{tree}}",
                  f"{target.snapshot}^{{tree}}").stdout
    fields = raw.split(b"\0")
    changes = []  # (path, mode in undo, blob in undo): what the rollback replaces or removes
    for meta, path in zip(fields[0::2], fields[1::2]):
        old_mode, _, old_oid, _, _ = meta.lstrip(b":").decode().split(" ")
        changes.append((path, old_mode, old_oid))
    rfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.mkdir(rescue, 0o700, dir_fd=rfd)
        kfd = os.open(rescue, _DIR_FLAGS, dir_fd=rfd)
    except BaseException:
        os.close(rfd)
        raise
    try:
        linked = []
        for n, (path, old_mode, old_oid) in enumerate(changes):
            if _link_aside(rfd, path, kfd, str(n), remove=set(old_oid) == {"0"}):
                linked.append((path, old_mode, old_oid, str(n)))
        git.run("read-tree", "--reset", "-u", f"{undo}^{{tree}}", f"{target.snapshot}^{{tree}}",
                env=env)
        kept = []
        for path, old_mode, old_oid, name in linked:
            mode, oid = _hash_at(repo, kfd, name)
            if (mode, oid) != (old_mode, old_oid):
                kept.append((mode, oid, path))
    finally:
        os.close(kfd)
        try:
            _remove_at(rfd, rescue)
        finally:
            os.close(rfd)
    return _keep_edits(repo, undo, kept) if kept else undo



def _link_aside(root_fd: int, path: bytes, dest_fd: int, name: str, *, remove: bool) -> bool:
    """Hard-link work-tree file ``path`` as ``name`` in directory ``dest_fd``, every leading
    directory opened without following links; with ``remove``, unlink the original (git must
    write a file there). False when there is nothing (or only a directory) there, or a leading
    directory is not a plain one."""
    *dirs, leaf = path.split(b"/")
    fd = os.dup(root_fd)
    try:
        for part in dirs:
            nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nfd
        st = os.stat(leaf, dir_fd=fd, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            return False
        os.link(leaf, name, src_dir_fd=fd, dst_dir_fd=dest_fd, follow_symlinks=False)
        if remove:
            os.unlink(leaf, dir_fd=fd)
        return True
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # a leading directory is a link
            return False
        raise
    finally:
        os.close(fd)


def _hash_at(repo: Repo, dir_fd: int, name: str) -> tuple[str, str]:
    """(git mode, blob id) of entry ``name`` of ``dir_fd``, written into watcherd's
    repository; read through a descriptor, never by path."""
    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    if stat.S_ISLNK(st.st_mode):
        data = os.fsencode(os.readlink(name, dir_fd=dir_fd))
        mode = "120000"
    else:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=dir_fd)
        with os.fdopen(fd, "rb") as f:
            data = f.read()
        mode = "100755" if st.st_mode & 0o100 else "100644"
    return mode, repo.bare.out("hash-object", "-w", "--stdin", input=data)


def _keep_edits(repo: Repo, undo: str, kept: list[tuple[str, str, bytes]]) -> str:
    """One more snapshot: ``undo``'s tree with the ``kept`` (mode, blob, path) entries, the same
    git state; the snapshot history moves to it."""
    index = {"GIT_INDEX_FILE": str(repo.dir / f"rollback-rescue-index-{os.getpid()}")}
    try:
        repo.bare.run("read-tree", f"{undo}^{{tree}}", env=index)
        repo.bare.run("update-index", "-z", "--index-info", env=index, input=b"".join(
            f"{mode} {oid}\t".encode() + path + b"\0" for mode, oid, path in kept))
        tree = repo.bare.out("write-tree", env=index)
    finally:
        Path(index["GIT_INDEX_FILE"]).unlink(missing_ok=True)
    listed = "\n".join(ws.printable(os.fsdecode(p)) for _, _, p in kept[:50])
    parents = repo.bare.out("rev-list", "--parents", "-n", "1", undo).split()[1:]
    args = ["commit-tree", tree, "-m", f"watcherd: snapshot ({len(kept)} files)\n\n{listed}\n",
            "-p", undo]
    for parent in parents[1:]:  # its HEAD and state commit: the git state is undo's
        args += ["-p", parent]
    commit = repo.bare.out(*args)
    repo.bare.update_ref(SNAPSHOT_REF, commit, undo, "watcherd: edits made during a rollback")
    _log.warning("rollback.kept_edits", snapshot=commit, files=len(kept),
                 note="files edited while the rollback ran are kept in this snapshot; "
                      "`watcherd rollback --undo` returns to it")
    return commit


def _place(src: Path, root: Path, name: str) -> None:
    """Put git directory ``src`` (in the state directory) at ``name`` in the workspace root: a
    rename on the same filesystem, else a copy whose every directory and file is created
    through descriptors (``O_EXCL``, ``O_NOFOLLOW``), so a link planted meanwhile is never
    written through."""
    rfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if os.stat(src).st_dev == os.fstat(rfd).st_dev:
            os.rename(src, name, dst_dir_fd=rfd)
        else:
            _copy_tree(src, rfd, name)
    finally:
        os.close(rfd)


def _copy_tree(src: Path, parent_fd: int, name: str) -> None:
    os.mkdir(name, 0o777, dir_fd=parent_fd)
    fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    try:
        for entry in os.scandir(src):
            if entry.is_dir(follow_symlinks=False):
                _copy_tree(Path(entry.path), fd, entry.name)
                continue
            mode = stat.S_IMODE(entry.stat(follow_symlinks=False).st_mode)
            out = os.open(entry.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW |
                          os.O_CLOEXEC, 0o600, dir_fd=fd)
            with open(entry.path, "rb") as f_in, os.fdopen(out, "wb") as f_out:
                shutil.copyfileobj(f_in, f_out, 1 << 20)
                os.fchmod(f_out.fileno(), mode)
    finally:
        os.close(fd)


def run(repo: Repo, target: Target, save: Callable[[], object], *, mode: str = "shadow") -> str:
    """A whole rollback in this process (``watcherd rollback`` with no daemon): ``save()``
    snapshots and saves the current state, :func:`apply`, then ``save()`` the rolled-back state
    (and the snapshots taken on the way). Returns the snapshot ``--undo`` returns to."""
    save()
    with repo.lock():
        undo = apply(repo, target, mode=mode)
    save()
    return undo


def last_rollback(repo: Repo) -> dict | None:
    """What the last rollback recorded (``undo``, ``target``, ``said``, ``at``), or None."""
    try:
        doc = json.loads((repo.dir / LAST).read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(doc, dict) and isinstance(doc.get("undo"), str)
    return doc if ok else None


def recover(repo: Repo) -> None:
    """Finish (or discard) what a killed rollback left, as its journal says: once the working
    tree was changed (phase ``swapping``) the new git directory is put in place, else the
    half-built one goes and the workspace keeps its git directory."""
    journal = repo.read_journal(JOURNAL)
    if journal is None:
        return
    try:
        staging, old, rescue = journal["staging"], journal["old"], journal["rescue"]
        names_ok = all(isinstance(n, str) and
                       re.fullmatch(r"\.watcherd-rollback-[0-9a-f]+\.(git|old|rescue)", n)
                       for n in (staging, old, rescue))
    except (KeyError, TypeError):
        names_ok = False
    if names_ok:
        _remove(repo.workspace, rescue)
        if journal.get("phase") == "swapping":
            _swap(repo.workspace, staging, old)
            _log.warning("rollback.resumed", target=journal.get("target"),
                         note="finished a rollback that was killed while swapping the git "
                              "directory")
        else:
            _remove(repo.workspace, staging)
            _log.warning("rollback.discarded", target=journal.get("target"),
                         note="a rollback was killed before it changed the git directory; some "
                              "files may already be the target's: run it again, or "
                              "`watcherd rollback --undo`")
    repo.write_journal(JOURNAL, None)


def _build_git_dir(repo: Repo, staging: Path, s_commit: str, rec: state.Recorded) -> None:
    """A new git directory at ``staging`` (in the state directory) holding what state commit
    ``s_commit`` recorded: the objects its refs, stash and index reach, the refs, HEAD, stash,
    and the index. git reads nothing of the user's while building it (the user's config, hooks
    and ``info/`` are moved in at the swap)."""
    git = repo.bare
    staging.mkdir(0o777)
    new = Git(staging, home=repo.home, identity=repo.identity)
    new.run("init", "--bare", "--quiet", "--template=", f"--object-format={repo.object_format()}",
            str(staging))
    # Everything the recorded state reaches (its refs' histories, the index, tags' targets).
    git.run("pack-objects", "--revs", "--quiet", str(staging / "objects" / "pack" / "pack"),
            input=f"{s_commit}\n".encode())
    shallow = repo.git_dir / "shallow"
    if shallow.exists():  # the boundary the history stops at (a shallow clone's)
        shutil.copyfile(shallow, staging / "shallow")
    new.run("config", "core.bare", "false")
    state.apply_refs(new, rec)
    base = rec.index_tree or rec.head.oid
    env = {"GIT_INDEX_FILE": str(staging / "index")}
    git.run("read-tree", *((base,) if base else ("--empty",)), env=env)


def _swap(root: Path, staging: str, old: str) -> None:
    """Put git directory ``staging`` in the place of ``.git`` (two renames in the workspace
    root), give it back the user's own entries of the old one, remove the old one. Idempotent:
    a rerun after a kill finishes it. Every step goes through directory descriptors opened with
    ``O_NOFOLLOW``, so a link swapped in meanwhile never moves anything outside the workspace."""
    rfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if _exists(rfd, staging):
            if _exists(rfd, ".git") and not _exists(rfd, old):
                os.rename(".git", old, src_dir_fd=rfd, dst_dir_fd=rfd)
            os.rename(staging, ".git", src_dir_fd=rfd, dst_dir_fd=rfd)
        if not _exists(rfd, old):
            return
        try:
            ofd = os.open(old, _DIR_FLAGS, dir_fd=rfd)
            nfd = os.open(".git", _DIR_FLAGS, dir_fd=rfd)
        except OSError:
            ofd = nfd = -1  # the old .git was a link or a file: nothing of it is kept
        try:
            if ofd >= 0:
                for name in _KEPT:
                    if _exists(ofd, name):
                        _remove_at(nfd, name)
                        os.rename(name, name, src_dir_fd=ofd, dst_dir_fd=nfd)
        finally:
            for fd in (ofd, nfd):
                if fd >= 0:
                    os.close(fd)
        _remove_at(rfd, old)
    finally:
        os.close(rfd)


def _exists(dir_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        return True
    except FileNotFoundError:
        return False


def _remove_at(dir_fd: int, name: str) -> None:
    """Remove entry ``name`` of a directory: a tree (no link followed), or a file or link."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=dir_fd)
    else:
        os.unlink(name, dir_fd=dir_fd)


def _remove(root: Path, name: str) -> None:
    rfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _remove_at(rfd, name)
    finally:
        os.close(rfd)


def refuse_read_only(root: Path) -> None:
    """Rollback writes the workspace: say so plainly when this process cannot."""
    if not os.access(root, os.W_OK):
        raise RollbackRefused(
            f"rollback writes the workspace in place, and {root} is read-only here (the "
            "least-privilege deployments mount it read-only into the daemon): run "
            "`watcherd rollback` as the app's user where watcherd's state is reachable, or "
            "restore the generation into a new pod (watcherd restore --generation N)")

