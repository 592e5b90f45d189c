"""``watcherd rollback``: put the workspace back, in place, to a state a snapshot recorded.

The state the workspace is left in is first snapshotted and saved (the caller does that: the
daemon, or the command standalone), so every rollback can itself be undone (``--undo``). Then,
without moving the workspace directory (a dev server and an agent are running in it):

* a new git directory is built in the state directory from watcherd's own repository: the
  objects the recorded state needs, its refs, HEAD, stash and index;
* under watcherd's lock, the state is snapshotted once more (the undo snapshot) and the working
  tree changed from its tree to the target's (:mod:`watcherd.worktree`): only files that differ
  are written, files the target lacks are removed, ignored files are not touched, a file edited
  in between stops it before anything is written (snapshot again, retry), and every directory
  is opened through descriptors with ``O_NOFOLLOW``, so a directory the agent swaps for a link
  meanwhile is never written through; what each change replaces is kept aside until compared
  with the snapshot (an edit made in between becomes one more snapshot, never lost);
* the new git directory is put beside ``.git`` and takes its place in one ``renameat2``
  exchange (two renames where the file system cannot exchange), and the
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
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from watcherd import bundle as bundles
from watcherd import dirfd, ignore, log, snapshot, state, timeline, worktree
from watcherd import manifest as mf
from watcherd import workspace as ws
from watcherd.errors import IntegrityError, UsageError, WatcherdError
from watcherd.generations import Generations
from watcherd.git import Git, GitTimeout
from watcherd.repo import SNAPSHOT_REF, Repo, write_private

_log = log.get(__name__)
ATTEMPTS = 5  # snapshot-and-change pairs tried while files keep changing under the rollback
JOURNAL = "rollback.json"
LAST = "last-rollback.json"
TARGET_REF = "refs/watcherd/rollback-target"
LOCK_WAIT = 2.0  # seconds to wait for a lock the user's git holds before the swap
_LOCKS = ("index.lock", "HEAD.lock", "packed-refs.lock", "config.lock")
_OPERATIONS = ("rebase-merge", "rebase-apply", "MERGE_HEAD", "CHERRY_PICK_HEAD", "REVERT_HEAD")
# What a rollback builds of the git directory (the recorded state), and what of the old one
# replaces what was built (the user's own settings, never read by watcherd).
_BUILT = ("refs", "packed-refs", "HEAD", "index", "shallow")
_THEIRS = ("config", "description", "info", "hooks")


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
    """Refuse while the user's git holds a lock or is in the middle of an operation. The git
    directory is walked through descriptors (a ``refs`` linked elsewhere is not followed) and
    at most :data:`~watcherd.workspace.MAX_REFS` entries deep."""
    if layout.git_dir is None:
        return
    with dirfd.opened(layout.root) as rfd:
        for d in {layout.git_dir, layout.common_dir}:
            rel = os.fsencode(os.path.relpath(d, layout.root))
            with dirfd.parent(rfd, rel + b"/x") as found:
                if found is None:
                    continue
                gfd, _ = found
                for name in (*_LOCKS, *_OPERATIONS):
                    if dirfd.exists(gfd, name):
                        raise RollbackRefused(f"the user's git is busy in the workspace "
                                              f"({ws.printable(os.fsdecode(rel))}/{name} exists); "
                                              "try again once it is done (if no git runs there, "
                                              "a killed one left it: remove it)")
                try:
                    with dirfd.opened_at(gfd, "refs") as refs:
                        lock = dirfd.find(refs, lambda n: n.endswith(".lock"), limit=ws.MAX_REFS,
                                          prefix="refs/")
                except OSError:
                    lock = None
                if lock:
                    raise RollbackRefused(f"the user's git is writing a ref ({ws.printable(lock)});"
                                          " try again once it is done")


def apply(repo: Repo, target: Target, *, mode: str = "shadow",
          cache: snapshot.Cache | None = None, attempts: int = ATTEMPTS) -> str:
    """Make the workspace's files and git state what ``target`` recorded; return the snapshot of
    the state it was in (what ``--undo`` returns to). Call under :meth:`Repo.lock`, after the
    current state was saved.

    Right before the files change, the state is snapshotted once more under the lock (edits made
    since the save are in that snapshot too); a file edited between that snapshot and the change
    makes git refuse before it writes anything, and the pair is tried again, ``attempts`` times.

    Raises :class:`RollbackRefused` (nothing changed) when ``.git`` is not a plain directory of
    the workspace (a link, a ``gitdir:`` file, a linked worktree), the user's git is busy, or the
    target would overwrite files the rules ignore (no snapshot holds them).
    """
    layout = ws.locate(repo.workspace)
    dotgit = repo.workspace / ".git"
    if os.path.lexists(dotgit) and (dotgit.is_symlink() or not dotgit.is_dir() or
                                    layout.git_dir != dotgit):
        raise RollbackRefused("rollback in place needs the workspace's .git to be a directory "
                              "in it (not a link, a gitdir: file or a linked worktree)"
                              + (f": {layout.problem}" if layout.problem else ""))
    check_quiet(layout)
    cache = cache if cache is not None else snapshot.Cache()
    git = repo.bare
    loaded = state.load(git, target.snapshot)
    s_commit = loaded.state_commit
    # Each name its own random token: the staging name shows in the workspace before the swap,
    # and must not tell the agent where the old directory will go.
    journal: dict = {"staging": _name("git"), "old": _name("old"), "rescue": _name("rescue"),
                     "target": target.snapshot, "phase": "building"}
    # Built in watcherd's own directory, where nothing of the agent's can redirect a write,
    # then put into the workspace root through a descriptor.
    staging = repo.spool / journal["staging"].lstrip(".")
    repo.write_journal(JOURNAL, journal)
    try:
        if s_commit is not None:
            _build_git_dir(repo, staging, s_commit, loaded.recorded)
        undo, seen = _update_files(repo, target, layout, mode, cache, attempts, journal)
        if s_commit is not None:
            # The new index's stat data, from the files as they are now: no rehash by the
            # user's next git command. Only a saving of the user's time: git hashes each file
            # whole, and what the agent made costly to read (terabytes of holes, many hard
            # links) must not hold the rollback half done.
            index = {"GIT_INDEX_FILE": str(staging / "index")}
            try:
                repo.git.run("update-index", "--refresh", "-q", env=index, ok=(0, 1),
                             timeout=_REFRESH_FOR)
            except GitTimeout:
                (staging / "index.lock").unlink(missing_ok=True)  # the killed git's
            with dirfd.opened(layout.root) as rfd:
                dirfd.place(staging, rfd, journal["staging"])
                journal["new"] = dirfd.identity(rfd, journal["staging"])
    except BaseException:
        with dirfd.opened(layout.root) as rfd:
            try:
                _salvage(repo, rfd, journal)  # edits a forced change had linked aside
            finally:
                dirfd.remove(rfd, journal["staging"])
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
    journal["phase"] = "swapping"
    repo.write_journal(JOURNAL, journal)
    # From here the user's git waits for us (its own lock files), and nothing it wrote since
    # the snapshot is lost: a changed state is snapshotted, and the old git directory's objects
    # and reflogs go into the new one.
    with _holding_users_locks(layout.root):
        if _git_state(layout) != seen:
            kept = snapshot.take_locked(repo, mode, cache).snapshot_head
            _log.warning("rollback.git_changed", snapshot=kept,
                         note="the user's git wrote during the rollback; that state is snapshot "
                              f"{kept}: `watcherd rollback {(kept or '')[:12]}` returns to it")
        _swap(layout.root, journal)
    repo.write_journal(JOURNAL, None)
    _log.warning("rollback.done", target=target.snapshot, said=target.said, undo=undo,
                 note="the workspace is back to that state; `watcherd rollback --undo` returns")
    return undo


def _name(kind: str) -> str:
    return f"{ignore.ROLLBACK_PREFIX}{secrets.token_hex(8)}.{kind}"


def _git_state(layout: ws.Layout) -> ws.GitState | None:
    try:
        return ws.read_state(layout) if layout.is_repository else None
    except ws.Unsafe:
        return None


@contextmanager
def _holding_users_locks(root: Path) -> Iterator[None]:
    """Hold the user's ``index.lock`` and ``HEAD.lock`` (git's own lock files, created with
    ``O_EXCL``): a git command started meanwhile waits or fails as it would for another git.
    Waits up to :data:`LOCK_WAIT` seconds for one the user's git holds, then goes on without."""
    held: list[str] = []
    with dirfd.opened(root) as rfd:
        try:
            gfd = os.open(".git", dirfd.DIR_FLAGS, dir_fd=rfd)
        except OSError:
            yield
            return
        try:
            deadline = time.monotonic() + LOCK_WAIT
            for name in ("index.lock", "HEAD.lock"):
                while True:
                    try:
                        os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL |
                                         os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=gfd))
                        held.append(name)
                        break
                    except FileExistsError:
                        if time.monotonic() > deadline:
                            break
                        time.sleep(0.02)
            yield
        finally:
            # Through the descriptor: after a swap they are in the old directory (gone, or left
            # over), before it in the user's .git, where they must not stay.
            for name in held:
                try:
                    os.unlink(name, dir_fd=gfd)
                except FileNotFoundError:
                    pass
            os.close(gfd)


def _update_files(repo: Repo, target: Target, layout: ws.Layout, mode: str,
                  cache: snapshot.Cache, attempts: int,
                  journal: dict) -> tuple[str, ws.GitState | None]:
    """Snapshot, then change the working tree from that snapshot's tree to the target's;
    (the snapshot ``--undo`` returns to, the git state it saw).

    Only what differs is written, files only the snapshot has are removed, what neither has
    (files created since) is left alone; files the rules ignore are never overwritten (refused
    instead: no snapshot holds them). Every file about to change is first checked against the
    snapshot: an edit in between stops it before anything is written, and the pair is tried
    again. The last attempt, for a workspace written faster than a snapshot takes, changes the
    files all the same; either way what a change replaces is kept (:func:`_change_files`).
    """
    tmp = repo.scratch_file("rollback-index")
    env = {"GIT_INDEX_FILE": str(tmp)}
    git = repo.git  # watcherd's repository, the workspace as its work tree: raw bytes
    try:
        for attempt in range(attempts):
            undo = snapshot.take_locked(repo, mode, cache).snapshot_head
            if undo is None:
                raise RollbackRefused("the workspace is empty and has no snapshot to come back to")
            seen = _git_state(layout)
            shutil.copyfile(repo.index, tmp)
            if git.out("write-tree", env=env) != git.out("rev-parse", f"{undo}^{{tree}}"):
                git.run("read-tree", f"{undo}^{{tree}}", env=env)
            changes = worktree.diff(git, f"{undo}^{{tree}}", f"{target.snapshot}^{{tree}}")
            changes = _outside_nested(changes, cache)
            _refuse_missing_blobs(repo, target, changes)
            with dirfd.opened(layout.root) as rfd:
                refuse = snapshot.sparse_bound()
                try:
                    _refuse_ignored_in_the_way(git, env, rfd, changes, repo.object_format(),
                                               refuse)
                    edited = worktree.first_edited(rfd, changes, repo.object_format(),
                                                   refuse=refuse)
                except PermissionError as exc:
                    raise RollbackRefused(
                        f"{ws.printable(str(exc.filename or ''))}: watcherd cannot read it, so "
                        "cannot tell whether it changed since the snapshot (nor keep what was "
                        "written to it); make it readable, and retry") from None
                except OSError as exc:
                    if exc.errno != errno.EFBIG:
                        raise
                    raise RollbackRefused(
                        f"{ws.printable(str(exc.filename or ''))}: a file nearly all holes (a "
                        "sparse file no snapshot keeps) where the rollback writes; watcherd "
                        "does not read it, so cannot keep it: move it away, then roll back "
                        "again") from None
            forced = attempt == attempts - 1
            if edited is not None and not forced:
                _log.info("rollback.retried", attempt=attempt + 1,
                          edited=ws.printable(os.fsdecode(edited)))
                continue
            # Before any file changes: should the rest fail or be killed, --undo knows the way.
            _record_last(repo, undo, target)
            journal["undo"] = undo
            undo = _change_files(repo, undo, target, layout.root, changes, journal)
            _record_last(repo, undo, target)
            return undo, seen
    finally:
        tmp.unlink(missing_ok=True)
    raise AssertionError("unreachable: the last attempt changes the files")


_REFRESH_FOR = 10.0  # seconds the new index's stat data may take; past them, left unrefreshed


def _outside_nested(changes: list[worktree.Change], cache: snapshot.Cache
                    ) -> list[worktree.Change]:
    """``changes`` without those inside a nested repository the snapshot just taken recorded
    (a gitlink it replaces) or could not save (``cache``): its files are its own, left as they
    are, and its ignored ones are out of the workspace's ``ls-files``' sight. Judged by what the
    snapshot found, not by a ``.git`` name the agent can plant at any time: a directory it saved
    as the workspace's files is rolled back as such."""
    nested = {c.path for c in changes if c.old_mode == worktree.GITLINK} | \
        {os.fsencode(p) for p in (*cache.unsaved, *cache.left_out)}
    if not nested:
        return changes
    return [c for c in changes if nested.isdisjoint(worktree.leading(c.path))]


def _refuse_ignored_in_the_way(git: Git, env: dict[str, str], rfd: int,
                               changes: list[worktree.Change], object_format: str,
                               refuse: Callable[[os.stat_result], bool]) -> None:
    """git overwrites ignored files in a checkout's way (they count as expendable); for the
    user they are not: a ``.env``, a database under an ignored ``data/``. No snapshot holds
    them, so a rollback that would write over one, or put a file where an ignored directory
    holding files is, is refused and names them. Writing into an ignored directory is not:
    its other entries stay, and an entry already as the target has it (saved while untracked,
    ignored since, left as it was) loses nothing. ``rfd``: the workspace root; ``refuse``:
    the files not read to tell (:func:`watcherd.snapshot.sparse_bound`)."""
    added = {c.path: c for c in changes if c.added}
    if not added:
        return
    removed = {c.path for c in changes if not c.added}
    listed = git.run("ls-files", "-z", "--others", "--ignored", "--exclude-standard",
                     "--directory", "--no-empty-directory", env=env).stdout
    hits = []
    for entry in filter(None, listed.split(b"\0")):
        entry = entry.rstrip(b"/")
        # the ignored entry lies under an added path (a file where its directory is), or is
        # one or holds one that cannot be written without replacing it
        if not added.keys().isdisjoint(worktree.leading(entry)) or any(
                not worktree.free_for(rfd, c, removed, object_format, refuse=refuse)
                for p, c in added.items() if p == entry or p.startswith(entry + b"/")):
            hits.append(ws.printable(os.fsdecode(entry)))
    if hits:
        more = f" and {len(hits) - 5} more" if len(hits) > 5 else ""
        raise RollbackRefused(f"the target has files where the workspace holds ignored ones, which "
                              f"no snapshot keeps ({', '.join(hits[:5])}{more}); move them "
                              "away first, then roll back again")


def _refuse_missing_blobs(repo: Repo, target: Target, changes: list[worktree.Change]) -> None:
    """Every file the rollback writes must be readable before it changes any: a blob of the
    target that is nowhere any more (a snapshot that borrowed it from the workspace's objects,
    which the user's ``git gc --prune=now`` dropped) refuses it, nothing changed."""
    wanted = sorted({c.new_oid for c in changes if not c.removed and c.new_mode != worktree.GITLINK})
    if not wanted:
        return
    out = repo.bare.run("cat-file", "--batch-check=%(objectname) %(objecttype)",
                        input="".join(f"{o}\n" for o in wanted).encode()).stdout
    missing = [line.split()[0].decode() for line in out.splitlines()
               if not line.endswith(b" blob")]
    if missing:
        raise RollbackRefused(f"{target.said}: {len(missing)} of its files are not in watcherd's "
                              f"repository any more (blob {missing[0][:12]}); restore that "
                              "generation from the store instead (watcherd restore --generation N)")


def _record_last(repo: Repo, undo: str, target: Target) -> None:
    write_private(repo.dir / LAST, json.dumps(
        {"undo": undo, "target": target.snapshot, "said": target.said,
         "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}).encode())


def _change_files(repo: Repo, undo: str, target: Target, root: Path,
                  changes: list[worktree.Change], journal: dict) -> str:
    """Change the files from ``undo``'s tree to the target's (:class:`watcherd.worktree.Checkout`:
    through descriptors, never following a link the agent plants), keeping what each change
    replaces or removes in the rescue directory of the workspace root (ignored by the rules);
    what those hold that ``undo`` does not (an edit made in between) is committed as one more
    snapshot on top of it. Returns that snapshot, or ``undo`` when nothing was edited in
    between. The journal lists every change first: a kill midway leaves the rescue directory,
    and :func:`recover` keeps its edits the same way."""
    rescue = journal["rescue"]
    with dirfd.opened(root) as rfd:
        os.mkdir(rescue, 0o700, dir_fd=rfd)
        try:
            with dirfd.opened_at(rfd, rescue) as kfd:
                journal["rescued"] = [[str(n), os.fsdecode(c.path), c.old_mode, c.old_oid,
                                       c.new_mode, c.new_oid] for n, c in enumerate(changes)]
                repo.write_journal(JOURNAL, journal)

                def beside() -> None:
                    journal["beside"] = True
                    repo.write_journal(JOURNAL, journal)

                try:
                    with worktree.Checkout(repo.bare, rfd, kfd, rescue, beside,
                                           object_format=repo.object_format(),
                                           refuse=snapshot.sparse_bound()) as checkout:
                        checkout.apply(changes)
                except worktree.Blocked as exc:
                    raise RollbackRefused(
                        f"{ws.printable(os.fsdecode(exc.path))}: {exc}; the files changed so far "
                        "are the target's (`watcherd rollback --undo` returns), move it and "
                        "roll back again") from None
                kept, unread = _kept_edits(repo, rfd, kfd, journal)
                # Kept before anything put aside is removed: a removal that fails (the agent
                # keeps filling the directory) must not take an edit with it.
                head = _keep_edits(repo, undo, kept) if kept else undo
        except BaseException:
            if "rescued" not in journal:
                dirfd.remove(rfd, rescue)
            raise
        rescued = journal.pop("rescued")
        repo.write_journal(JOURNAL, journal)
        try:
            if unread:
                _left_unread(rescue, unread)
            else:
                _discard_rescue(rfd, {**journal, "rescued": rescued})
        except OSError as exc:
            _log.warning("rollback.rescue_left", path=rescue, error=str(exc),
                         note="what the rollback put aside could not all be removed; every "
                              "edit in it is kept in a snapshot, the directory can be deleted")
    journal.pop("beside", None)
    return head


def _kept_edits(repo: Repo, rfd: int, kfd: int, journal: dict
                ) -> tuple[list[tuple[str, str, bytes]], list[tuple[str, str]]]:
    """(mode, blob, path) of each entry a change put aside that is neither what ``undo`` held
    there nor what the target writes (an edit made in between), written into watcherd's
    repository; and (path, name put aside as) of each one not read, so not kept: nearly all
    holes past the bound (:func:`watcherd.snapshot.sparse_bound`, judged as looked at and as
    opened: a sparse file of terabytes planted once the checks are done would hold the rollback
    for as long as reading its zeros takes), or unreadable to watcherd."""
    kept, unread = [], []
    fmt = repo.object_format()
    refuse = snapshot.sparse_bound()

    def accept(st: os.stat_result) -> bool:
        return not refuse(st)

    for entry in journal["rescued"]:
        name, path, old_mode, old_oid = entry[:4]
        new = tuple(entry[4:6]) if len(entry) >= 6 else None
        with worktree.aside(rfd, kfd, journal["rescue"], int(name), os.fsencode(path)) as found:
            if found is None:
                continue
            d, n = found
            try:
                seen = worktree.entry_id(d, os.fsencode(n), fmt, refuse=refuse)
                if seen is None or seen[0] == worktree.GITLINK or \
                        seen in ((old_mode, old_oid), new):
                    continue
                mode, oid = worktree.store_entry(repo.bare, repo.spool, d, n, accept=accept)
            except FileNotFoundError:
                continue
            except OSError:  # past the bound, or made unreadable meanwhile (chmod 000)
                unread.append((path, n))
                continue
        if (mode, oid) != (old_mode, old_oid):
            kept.append((mode, oid, os.fsencode(path)))
    return kept, unread


def _left_unread(rescue: str, unread: list[tuple[str, str]]) -> None:
    """Say where the files :func:`_kept_edits` did not read were left (the rescue directory,
    kept rather than removed with them)."""
    _log.warning("rollback.rescue_left", path=rescue, unread=len(unread),
                 files=[f"{ws.printable(p)} (as {ws.printable(n)})" for p, n in unread[:10]],
                 note="files that the rollback replaced or removed and could not read (nearly "
                      "all holes, or unreadable to watcherd) are not kept in a snapshot: they "
                      "are left, with what else it put aside, in this directory of the "
                      "workspace; move them back or delete them")


def _discard_rescue(rfd: int, journal: dict) -> None:
    """Remove the rescue directory, and what was put aside beside paths on other filesystems."""
    if journal.get("beside") and isinstance(journal.get("rescued"), list):
        worktree.discard_beside(rfd, journal["rescue"],
                                [os.fsencode(e[1]) for e in journal["rescued"]])
    dirfd.remove(rfd, journal["rescue"])


def _keep_edits(repo: Repo, base: str, kept: list[tuple[str, str, bytes]]) -> str:
    """One more snapshot: ``base``'s tree with the ``kept`` (mode, blob, path) entries, the same
    git state; the snapshot history moves to it."""
    index = {"GIT_INDEX_FILE": str(repo.scratch_file("rollback-rescue-index"))}
    try:
        repo.bare.run("read-tree", f"{base}^{{tree}}", env=index)
        repo.bare.run("update-index", "-z", "--index-info", env=index, input=b"".join(
            f"{mode} {oid}\t".encode() + path + b"\0" for mode, oid, path in kept))
        tree = repo.bare.out("write-tree", env=index)
    finally:
        Path(index["GIT_INDEX_FILE"]).unlink(missing_ok=True)
    parents = repo.bare.out("rev-list", "--parents", "-n", "1", base).split()[1:]
    args = ["commit-tree", tree, "-m", snapshot.message([os.fsdecode(p) for *_, p in kept], None),
            "-p", base]
    for parent in parents[1:]:  # its HEAD and state commit: the git state is base's
        args += ["-p", parent]
    commit = repo.bare.out(*args)
    repo.bare.update_ref(SNAPSHOT_REF, commit, base, "watcherd: edits made during a rollback")
    _log.warning("rollback.kept_edits", snapshot=commit, files=len(kept),
                 note="files edited while the rollback ran are kept in this snapshot; "
                      "`watcherd rollback --undo` returns to it")
    return commit


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
    """Finish what a killed rollback left, as its journal says, under watcherd's lock (so never
    under a rollback still running): edits it had linked aside are kept as a snapshot; once the
    working tree was changed (phase ``swapping``) the new git directory is put in place, else
    the staged one goes and the workspace keeps its git directory. Never raises: a journal that
    cannot be acted on is logged (``rollback.recovery_failed``) and kept for a person."""
    if repo.read_journal(JOURNAL) is None:
        return
    try:
        with repo.lock():
            journal = repo.read_journal(JOURNAL)
            if journal is not None:
                _recover(repo, journal)
                repo.write_journal(JOURNAL, None)
    except Exception as exc:  # noqa: BLE001 (a start must never die of what a rollback left)
        _log.error("rollback.recovery_failed", error=str(exc), kind=type(exc).__name__,
                   journal=str(repo.dir / JOURNAL),
                   note="what a killed rollback left could not be finished; the workspace is "
                        "saved as it is; see docs/operations.md")


def _recover(repo: Repo, journal: dict) -> None:
    pattern = re.escape(ignore.ROLLBACK_PREFIX) + r"[0-9a-f]+\.(git|old|rescue)"
    names = [journal.get(k) for k in ("staging", "old", "rescue")]
    if not all(isinstance(n, str) and re.fullmatch(pattern, n) for n in names):
        return
    with dirfd.opened(repo.workspace) as rfd:
        _salvage(repo, rfd, journal)
        if journal.get("phase") == "swapping":
            _swap(repo.workspace, journal)
            _log.warning("rollback.resumed", target=journal.get("target"),
                         note="finished a rollback that was killed while swapping the git "
                              "directory")
        else:
            dirfd.remove(rfd, journal["staging"])
            _log.warning("rollback.discarded", target=journal.get("target"),
                         note="a rollback was killed before it changed the git directory; some "
                              "files may already be the target's: run it again, or "
                              "`watcherd rollback --undo`")


def _salvage(repo: Repo, rfd: int, journal: dict) -> None:
    """Keep, as one more snapshot, what the entries a change had put aside hold that neither
    the snapshot before it nor the target did (the journal's ``rescued`` list), then remove
    them (all left, and said, when one was not read: :func:`_kept_edits`)."""
    rescued = journal.get("rescued")
    if isinstance(rescued, list) and dirfd.is_dir(rfd, journal["rescue"]):
        try:
            with dirfd.opened_at(rfd, journal["rescue"]) as kfd:
                kept, unread = _kept_edits(repo, rfd, kfd, journal)
            head = repo.snapshot_head()
            if kept and head:
                _keep_edits(repo, head, kept)
            if unread:
                _left_unread(journal["rescue"], unread)
                return
        except (ValueError, TypeError, IndexError) as exc:  # a journal watcherd did not write
            _log.warning("rollback.rescue_unreadable", error=str(exc))
    try:
        _discard_rescue(rfd, journal)
    except (ValueError, TypeError, IndexError) as exc:
        _log.warning("rollback.rescue_unreadable", error=str(exc))
        dirfd.remove(rfd, journal["rescue"])


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
    # No reflog entries of watcherd's building: the user's own reflogs are moved in at the swap
    # (the stash's, which is state, apply_refs writes itself).
    new.run("config", "core.logAllRefUpdates", "false")
    state.apply_refs(new, rec)
    new.run("config", "--unset", "core.logAllRefUpdates")
    base = rec.index_tree or rec.head.oid
    env = {"GIT_INDEX_FILE": str(staging / "index")}
    git.run("read-tree", *((base,) if base else ("--empty",)), env=env)


def _swap(root: Path, journal: dict) -> None:
    """Put the git directory staged at ``journal["staging"]`` in the place of ``.git`` (one
    ``renameat2`` exchange, or two renames where the filesystem cannot), give the user's own
    entries of the old one back to it, and remove what is left of the old one. Idempotent: a
    rerun after a kill finishes it (the journal's ``new`` is the staged directory's identity)."""
    staging, old, new = journal["staging"], journal["old"], journal.get("new")
    new = tuple(new) if isinstance(new, list | tuple) else None
    with dirfd.opened(root) as rfd:
        if new is None or dirfd.identity(rfd, ".git") != new:
            if not dirfd.exists(rfd, staging):
                return  # nothing staged (it was never placed): the workspace keeps its .git
            if not dirfd.exists(rfd, ".git"):
                os.rename(staging, ".git", src_dir_fd=rfd, dst_dir_fd=rfd)
            elif not dirfd.exchange(rfd, staging, ".git"):
                os.rename(".git", old, src_dir_fd=rfd, dst_dir_fd=rfd)
                os.rename(staging, ".git", src_dir_fd=rfd, dst_dir_fd=rfd)
        # The old git directory is at the staging name (exchanged) or the old one (renamed).
        for name in (staging, old):
            if dirfd.is_dir(rfd, name) and dirfd.identity(rfd, name) != new:
                try:
                    with dirfd.opened_at(rfd, name) as ofd, dirfd.opened_at(rfd, ".git") as nfd:
                        _give_back(ofd, nfd)
                except OSError as exc:
                    _log.warning("rollback.old_git_dir_left", path=name, error=str(exc),
                                 note="what the old git directory held could not all be moved "
                                      "into the new one; it is left in the workspace")
                    continue
            dirfd.remove(rfd, name)


def _give_back(old_fd: int, new_fd: int) -> None:
    """Move the user's own entries of the old git directory into the new one: its config,
    hooks, ``info/`` and description replace the built ones; its objects and reflogs are merged
    in (nothing the user's git wrote is lost: commits made meanwhile, what the reflogs reach);
    anything else the new one lacks (``ORIG_HEAD``, submodules' repositories, LFS objects)
    moves as it is. Its refs, HEAD, index and lock files are the old state's and stay behind."""
    for name in os.listdir(old_fd):
        if name in _BUILT or name.endswith(".lock"):
            continue
        if name in _THEIRS:
            dirfd.remove(new_fd, name)
        if not dirfd.exists(new_fd, name):
            os.rename(name, name, src_dir_fd=old_fd, dst_dir_fd=new_fd)
        elif dirfd.is_dir(old_fd, name) and dirfd.is_dir(new_fd, name):
            with dirfd.opened_at(old_fd, name) as s, dirfd.opened_at(new_fd, name) as d:
                dirfd.move_missing(s, d)


def refuse_read_only(root: Path) -> None:
    """Rollback writes the workspace: say so plainly when this process cannot."""
    if not os.access(root, os.W_OK):
        raise RollbackRefused(
            f"rollback writes the workspace in place, and {root} is read-only here (the "
            "least-privilege deployments mount it read-only into the daemon): run "
            "`watcherd rollback` as the app's user where watcherd's state is reachable, or "
            "restore the generation into a new pod (watcherd restore --generation N)")

