"""Snapshots: record the workspace's whole state at one moment as a commit of watcherd's own.

A snapshot is a commit ``W`` in watcherd's repository (:mod:`watcherd.repo`) on
``refs/watcherd/snapshots``: its tree is the working tree as git sees it (every path of the
user's index, force-added ones included, plus every untracked path git would not ignore; raw
bytes, exec bits, symlinks), its parents ``[previous snapshot, HEAD, S]``, where ``S`` is the state
commit (:mod:`watcherd.state`) that records HEAD, every ref, the stash, the index and the
allowlisted config, all read at the same moment as the tree. A repository nested in the working
tree (a submodule, a ``git clone`` inside) is a gitlink in that tree, as git records it, and is
snapshotted by the same rules into a history of its own; a last parent ``N`` names those
snapshots (:func:`watcherd.state.write_nested`).

``shadow`` mode (default) reads the workspace and never runs git in it: its git state is read as
data (:mod:`watcherd.workspace`), its files are added through watcherd's private index. ``branch``
mode first commits on the user's branch (``git add -A`` + ``git commit`` in the workspace, like
gitwatch; trusted workspaces only), then records the snapshot the same way.

When the workspace's git state cannot be recorded (a hostile or broken ``.git``: a ref to a missing
object, a FIFO posing as an object, ``.git`` pointing outside the workspace), the working tree is
still snapshotted, with the last state that could be recorded, and the reason goes to the log and
the status: edits are never held back by the state around them.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Collection
from contextlib import nullcontext, suppress
from dataclasses import dataclass, field, replace
from pathlib import Path

import structlog

from watcherd import dirfd, ignore, log, procfs, state, worktree
from watcherd import workspace as ws
from watcherd.errors import ConfigError, GitError, WorkspaceError
from watcherd.git import Git, GitStalled, GitTimeout, LocalIOError, for_workspace, retrying
from watcherd.repo import SNAPSHOT_REF, Repo, write_private

MESSAGE_PATHS = 50
#: A nested repository that stays unsaved is warned about again at most this often (seconds).
NESTED_WARN_INTERVAL = 10.0
# A lock file left by a git process that died blocks every later commit. One that nobody holds
# open, with no git of the user's running in the repository, and older than this is removed
# (branch mode; shadow mode never writes in the workspace).
STALE_LOCK_AGE = 60.0

_log = log.get(__name__)


@dataclass(frozen=True)
class Snapshot:
    """The outcome of one snapshot attempt. ``commit`` is None when nothing had changed."""

    commit: str | None
    snapshot_head: str | None  # the snapshot history's head after this attempt
    head: str | None  # the user's HEAD commit as recorded (None: unborn or not recorded)
    head_ref: str | None  # the branch HEAD points at, None when detached
    files: int = 0
    paths: tuple[str, ...] = ()
    problems: tuple[str, ...] = ()  # why (part of) the git state is not recorded


@dataclass
class Cache:
    """What one process remembers between snapshots, to skip work when nothing changed."""

    index_digest: bytes | None = None
    user_paths: frozenset[bytes] | None = None
    user_gitlinks: dict[bytes, bytes] = field(default_factory=dict)  # the user's index: commit
    state_key: bytes | None = None
    state_commit: str | None = None
    state_notes: tuple[str, ...] = ()
    problems: tuple[str, ...] = ()
    depth: int = 0  # 0: the workspace's; n: a repository nested n deep in it
    at: str = ""  # where that repository is: "" or its path in the workspace and "/"
    subs: dict[str, tuple[Repo, Cache]] = field(default_factory=dict)  # nested, by path
    gitlinks: dict[str, str] | None = None  # the last tree's nested repositories: their commits
    gitlinks_tree: str | None = None
    index_tree: str | None = None  # the tree the private index held when the last snapshot ended
    # Nested repositories taken so far in this snapshot, at every depth: one count, shared with
    # every nested repository's cache (MAX_NESTED bounds the workspace, not each level).
    nested_taken: list[int] = field(default_factory=lambda: [0])
    # Nested repositories the last snapshot found in the whole workspace (gitlinks at every
    # level), counted when a snapshot starts: shared the same way.
    nested_known: list[int] = field(default_factory=lambda: [0])
    # Bytes of indexes read so far in this snapshot, the workspace's and every nested one's: one
    # count, shared the same way (ws.MAX_INDEX bounds them all together).
    index_read: list[int] = field(default_factory=lambda: [0])
    unsaved: dict[str, str] = field(default_factory=dict)  # nested repositories not saved: why
    unsaved_said: dict[str, tuple[str, float]] = field(default_factory=dict)
    not_saved_before: set[str] = field(default_factory=set)  # as the last snapshot found them
    nested_of: dict[str, str | None] = field(default_factory=dict)  # snapshot: nested record
    nested_records: dict[str, dict[str, str]] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)  # left out of adds for good: why
    # Repositories in directories whose files the user's index tracks: saved as those files,
    # their history not (see _take_up_new_repositories): why.
    tracked_inside: dict[str, str] = field(default_factory=dict)
    left_out: dict[str, str] = field(default_factory=dict)  # git recorded no gitlink now: why
    dropped_once: bool = False
    state_of: dict[str, str | None] = field(default_factory=dict)
    tree_of: dict[str, str] = field(default_factory=dict)
    heads: dict[str, tuple[str | None, str | None]] = field(default_factory=dict)
    # Where a repository may have appeared in a directory saved as files since the last
    # snapshot (paths relative to this repository's root, as the watcher reported them); None:
    # every directory is looked at (no watcher reports to this cache, or it may have missed one).
    appeared: set[str] | None = None
    watched: bool = False  # a watcher reports to this cache (:meth:`changed`)
    _appeared_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _taken: set[str] | None = None  # what the snapshot under way took (:meth:`give_back`)
    # When (monotonic) a git add still running is stopped for the last resort
    # (:func:`_save_changed`): set by the daemon on SIGTERM, whose final save must end in time.
    # One for the whole workspace, nested repositories' caches included: [the time or None].
    hurry_by: list[float | None] = field(default_factory=lambda: [None])

    def changed(self, paths: tuple[str, ...] | None) -> None:
        """What the watcher reported changed since the last snapshot (paths relative to the
        workspace), or None when it may have missed changes (a rescan, a batch cut at its
        bound): the next snapshot looks for repositories that appeared there only."""
        with self._appeared_lock:
            self.watched = True
            if paths is None or self.appeared is None:
                self.appeared = None
            else:
                self.appeared.update(paths)

    def look_again(self, everywhere: bool) -> None:
        """Make the next snapshot look for new repositories in every directory (``everywhere``)
        or nowhere: for a nested repository's cache, whose changes the watcher reports as its
        path, to the workspace's cache."""
        with self._appeared_lock:
            self.appeared = None if everywhere else set()

    def take_appeared(self) -> set[str] | None:
        """:attr:`appeared`, emptied for the next snapshot (None again without a watcher)."""
        with self._appeared_lock:
            found, self.appeared = self.appeared, set() if self.watched else None
            self._taken = found
        return found

    def give_back(self) -> None:
        """Put back what :meth:`take_appeared` took, for a snapshot that failed: the next one
        is to look there too (and :func:`_save_changed` to find every change reported since
        the last snapshot that succeeded)."""
        with self._appeared_lock:
            if self._taken is None:
                self.appeared = None
            elif self.appeared is not None:
                self.appeared |= self._taken

    def gitlink_count(self) -> int:
        """The gitlinks of this repository's last tree and of every nested one's, in all."""
        return len(self.gitlinks or {}) + sum(sub.gitlink_count() for _, sub in self.subs.values())

    def not_saved(self) -> dict[str, str]:
        """Every nested repository, at any depth, that the last snapshot could not save: its
        path in the workspace, and why (``status`` shows each as degraded)."""
        found = {f"{self.at}{path}": why for path, why in
                 (self.tracked_inside | self.refused | self.left_out | self.unsaved).items()}
        for _, sub in self.subs.values():
            found.update(sub.not_saved())
        return found

    def problems_all(self) -> list[str]:
        """:attr:`problems`, and those of every nested repository saved, each with its path."""
        found = list(self.problems)
        for _, sub in self.subs.values():
            found += [f"nested repository {sub.at.rstrip('/')}: {p}" for p in sub.problems_all()]
        return found


def prepare(repo: Repo) -> None:
    """Before the first snapshot of a process: make sure the history in the state directory is
    this workspace's, or start a new one; adopt a history an older watcherd kept in the workspace.
    """
    layout = ws.locate(repo.workspace)
    if repo.exists():
        repo.ensure_dirs()
    else:
        # Only a new repository needs the workspace's object format: reading it reads the whole
        # git state, the user's index included (megabytes at 50,000 files), on every start.
        repo.ensure(_object_format(layout))
    root = repo.workspace
    other = repo.paired_elsewhere()
    if other is not None:
        raise ConfigError(f"workspace.state_dir {repo.dir} holds the history of another "
                          f"workspace ({other}); give each workspace its own "
                          "workspace.state_dir (or store.key)")
    # Under the lock: another watcherd process may be snapshotting, and one that was killed may
    # have left a ref lock, which the lock clears.
    with repo.lock():
        if repo.snapshot_head() is not None and not repo.paired_with(root):
            repo.forget_history(f"the history in {repo.dir} was recorded for another workspace "
                                f"directory than {root}")
        if repo.snapshot_head() is None:
            _adopt_legacy(repo)
        if not repo.paired_with(root):
            repo.pair()


def _object_format(layout: ws.Layout) -> str:
    """The workspace's object format (watcherd's repository must use the same to read it)."""
    if not layout.is_repository:
        return "sha1"
    try:
        return ws.read_state(layout).object_format
    except ws.Unsafe:
        return "sha1"


def _adopt_legacy(repo: Repo) -> None:
    """An older watcherd kept ``refs/watcherd/snapshots`` in the workspace: continue it here, so
    the store moves forward without a manual step."""
    layout = ws.locate(repo.workspace)
    if not layout.is_repository:
        return
    try:
        found = ws.read_state(layout)
    except ws.Unsafe:
        return
    legacy = found.legacy_snapshot
    if legacy is None or repo.attach(layout, found.shallow) is not None:
        return
    broken = state.copy_objects(repo.reader, repo.bare, {legacy: "commit"}, None, repo.scratch)
    if broken or not repo.bare.has_commit(legacy):
        _log.warning("state.legacy_unreadable", snapshot=legacy,
                     reason="the workspace's old snapshot history is incomplete; starting anew")
        return
    repo.bare.update_ref(SNAPSHOT_REF, legacy, None, "watcherd: adopt the workspace's history")
    _log.info("state.adopted", snapshot=legacy, state_dir=str(repo.dir),
              note="the snapshot history an older watcherd kept in the workspace continues here")


def take(repo: Repo, mode: str = "shadow", cache: Cache | None = None) -> Snapshot:
    """Snapshot the workspace; a no-op (commit None) when nothing changed.

    Raises :class:`~watcherd.errors.WorkspaceError` when the workspace directory is gone,
    :class:`GitError` when git fails on watcherd's own repository (full disk, timeout).
    """
    with repo.lock():
        return take_locked(repo, mode, cache)


def take_locked(repo: Repo, mode: str = "shadow", cache: Cache | None = None) -> Snapshot:
    """:func:`take` for a caller that holds :meth:`Repo.lock` already (a rollback)."""
    cache = cache if cache is not None else Cache()
    cache.nested_taken[0] = 0
    cache.nested_known[0] = cache.gitlink_count()
    cache.index_read[0] = 0
    started = time.monotonic()
    _log.debug("snapshot.started", mode=mode)  # a trace of the save's steps, for post-mortems
    if repo.pairing() is not None and not repo.paired_with(repo.workspace):
        raise WorkspaceError(f"the history in {repo.dir} no longer belongs to "
                             f"{repo.workspace} (another process paired it with "
                             f"{repo.pairing().path}); restart watcherd")
    layout = ws.locate(repo.workspace)
    before = None
    if mode == "branch" and layout.is_repository:
        before = _commit_on_branch(repo, layout)
    try:
        snap = _take(repo, layout, cache, before)
    except BaseException:
        cache.give_back()
        raise
    if snap.commit:
        _log.info("snapshot.committed", commit=snap.commit, files=snap.files, mode=mode,
                  head=snap.head, paths=list(snap.paths[:10]),
                  duration_ms=round((time.monotonic() - started) * 1000, 1))
    else:
        _log.debug("snapshot.unchanged", mode=mode, snapshot=snap.snapshot_head,
                   duration_ms=round((time.monotonic() - started) * 1000, 1))
    return snap


def snapshot_head(repo: Repo) -> str | None:
    """The commit that stands for the workspace's saved state: the newest snapshot."""
    return repo.snapshot_head()


def _take(repo: Repo, layout: ws.Layout, cache: Cache, before: str | None = None) -> Snapshot:
    """``before``: the tree of HEAD before a branch-mode commit watcherd just made, if it made
    one (that commit is news to the snapshot history, not the user's own)."""
    problems: list[str] = [layout.problem] if layout.problem else []
    found: ws.GitState | None = None
    if layout.is_repository:
        try:
            found = ws.read_state(layout, index_read=cache.index_read[0])
            cache.index_read[0] += len(found.index or b"")
        except ws.Unsafe as exc:
            problems.append(f"the git state is not readable: {exc}")
    repo.ensure(found.object_format if found else "sha1")
    if found and repo.object_format() != found.object_format:
        problems.append(f"the workspace's objects are {found.object_format}, watcherd's "
                        f"repository {repo.object_format()}: the git state is not recorded")
        found = None
    detached = repo.attach(layout, found.shallow if found else ())
    if detached and found:
        problems.append(f"the workspace's objects are not read: {detached}")
        found = None
    rules_changed = ignore.write_rules(repo, found.exclude if found else b"", layout.internal)
    index_file = _sync_user_index(repo, found, cache)
    if found is not None:
        # git reads the copy from here on: the bytes are not held while nested repositories
        # read their indexes (memory peaks at one index, not their sum).
        found = replace(found, index=None)
    index_changed = cache.user_paths is None

    prev = repo.snapshot_head()
    prev_state = _state_of(repo, prev, cache)
    prev_tree = _tree_of(repo, prev, cache)
    # The git state first: copying the user's history in (checked, as a fetch does) gives the
    # working tree's add most of its blobs already, so it writes only what no commit holds.
    s_commit = prev_state
    if found is not None:
        try:
            s_commit, notes = _record_state(repo, found, index_file, prev_state, cache)
            problems.extend(notes)
        except GitError as exc:
            problems.append(f"the git state is not recorded this time: {exc}")
    appeared = cache.take_appeared()
    tree, entries = _worktree_tree(repo, layout, prev, prev_tree,
                                   found.head.oid if found else None, index_file, cache,
                                   appeared)
    if tree == prev_tree:
        entries = []  # the git state alone may have changed: no path did
    # Entries of the private index that the rules ignore now are dropped, but only looked for
    # when something that decides it changed: the rules (info/exclude, a .gitignore), the
    # user's index (git rm --cached of a force-added file), or a new process.
    if rules_changed or index_changed or not cache.dropped_once or \
            any(path.endswith(b".gitignore") for _, _, path in entries or ()):
        cache.dropped_once = True
        if _drop_now_ignored(repo.git, {"GIT_INDEX_FILE": str(repo.index)}, cache.user_paths,
                             cache.refused, _StallCheck(repo.workspace, cache.refused)):
            tree = repo.git.out("write-tree", "--missing-ok",
                                env={"GIT_INDEX_FILE": str(repo.index)})
            entries = [] if tree == prev_tree else \
                _diff(repo.bare, prev_tree, tree) if prev_tree else None

    _report(problems, cache)
    head, head_ref = _head_of(repo, s_commit, cache)

    cache.index_tree = tree  # what the private index holds (changed below: written again)
    if not prev and s_commit is None and tree == _empty_tree(repo.bare):
        return Snapshot(None, None, None, head_ref, problems=tuple(problems))
    base = prev_tree
    if entries is None:
        # The first snapshot lists what differs from the user's HEAD (their commit is no news),
        # as it was before a branch-mode commit watcherd just made (``before``).
        if before and repo.bare.run("cat-file", "-e", before, check=False).returncode != 0:
            before = None  # the workspace's objects are not readable this time
        base = prev_tree or before or \
            (repo.reader.out("rev-parse", f"{head}^{{tree}}") if head else None)
        entries = _diff(repo.bare, base, tree)
    if _confirm_reads(repo, layout, base, entries, cache):
        tree = repo.git.out("write-tree", "--missing-ok",
                            env={"GIT_INDEX_FILE": str(repo.index)})
        cache.index_tree = tree
        entries = _diff(repo.bare, base, tree)
    nested, nested_paths = _save_nested(repo, layout, tree, base, entries, cache, appeared)
    if prev and tree == prev_tree and s_commit == prev_state and \
            nested == _nested_of(repo, prev, cache):
        return Snapshot(None, prev, head, head_ref, problems=tuple(problems))
    paths = [p.decode("utf-8", "surrogateescape") for *_, p in entries] + nested_paths
    moved = head if prev and head != _head_of(repo, prev_state, cache)[0] else None
    commit = repo.commit_tree(tree, list(dict.fromkeys(p for p in (prev, head, s_commit, nested)
                                                       if p)),
                              message(paths, moved))
    repo.move_snapshot_head(commit, prev, "watcherd: snapshot")
    cache.state_of[commit] = s_commit
    cache.tree_of[commit] = tree
    cache.nested_of[commit] = nested
    return Snapshot(commit, commit, head, head_ref, len(paths), tuple(paths), tuple(problems))


def _tree_of(repo: Repo, commit: str | None, cache: Cache) -> str | None:
    if commit is None:
        return None
    if commit not in cache.tree_of:
        cache.tree_of[commit] = repo.bare.out("rev-parse", f"{commit}^{{tree}}")
    return cache.tree_of[commit]


def _state_of(repo: Repo, snapshot: str | None, cache: Cache) -> str | None:
    """The state commit of ``snapshot`` (None for none, or a snapshot of an older watcherd)."""
    if snapshot is None:
        return None
    if snapshot not in cache.state_of:
        cache.state_of[snapshot] = state.state_parent(repo.bare, snapshot)
    return cache.state_of[snapshot]


def _nested_of(repo: Repo, snapshot: str | None, cache: Cache) -> str | None:
    """The nested record of ``snapshot`` (None for none)."""
    if snapshot is None:
        return None
    if snapshot not in cache.nested_of:
        cache.nested_of[snapshot] = state.nested_parent(repo.bare, snapshot)
    return cache.nested_of[snapshot]


def _head_of(repo: Repo, s_commit: str | None, cache: Cache) -> tuple[str | None, str | None]:
    """(HEAD commit, HEAD's branch) as state commit ``s_commit`` records them."""
    if s_commit is None:
        return None, None
    if s_commit not in cache.heads:
        rec = state.read(repo.bare, s_commit)
        cache.heads[s_commit] = (rec.head.oid, rec.head.ref)
    return cache.heads[s_commit]


def _record_state(repo: Repo, found: ws.GitState, index_file: Path | None,
                  prev_state: str | None, cache: Cache) -> tuple[str, tuple[str, ...]]:
    """The state commit for ``found`` (the previous one when nothing in the state changed), and
    what it had to leave out."""
    key = hashlib.sha256(repr((found.head, found.refs, found.stash, found.config,
                               cache.index_digest, found.index_problem,
                               found.shallow, repo.packs_skipped)).encode()).digest()
    if cache.state_key == key and cache.state_commit and prev_state == cache.state_commit:
        return cache.state_commit, cache.state_notes
    config = state.parse_config(repo.bare, found.config, repo.scratch)
    given = state.Input(config, index_file, found.index_problem)
    commit, rec = state.record(repo.bare, found, given, previous=prev_state,
                               scratch=repo.scratch, reader=repo.reader)
    cache.state_key, cache.state_commit, cache.state_notes = key, commit, rec.notes
    cache.heads[commit] = (rec.head.oid, rec.head.ref)
    return commit, rec.notes


def _sync_user_index(repo: Repo, found: ws.GitState | None, cache: Cache) -> Path | None:
    """watcherd's copy of the user's index (git reads the copy, never the workspace's file)."""
    copy = repo.dir / "user-index"
    index = found.index if found else None
    if index is None:
        copy.unlink(missing_ok=True)
        cache.index_digest = None
        return None
    digest = hashlib.sha256(index).digest()
    if digest != cache.index_digest or not copy.exists():
        write_private(copy, index)
        cache.index_digest = digest
        cache.user_paths = None
    return copy


def _report(problems: list[str], cache: Cache) -> None:
    """Warn about each problem once, when it appears, and say when they are gone."""
    now = tuple(problems)
    for p in now:
        if p not in cache.problems:
            _log.warning("snapshot.state_not_recorded", reason=ws.printable(p))
    if cache.problems and not now:
        _log.info("snapshot.state_recorded", note="the workspace's git state is recorded again")
    cache.problems = now


# -- the working tree ------------------------------------------------------------------------------


def _worktree_tree(repo: Repo, layout: ws.Layout, prev: str | None, prev_tree: str | None,
                   head: str | None, index_file: Path | None, cache: Cache,
                   appeared: set[str] | None = None
                   ) -> tuple[str, list[tuple[bytes, bytes, bytes]] | None]:
    """The tree of the working tree as git sees it, through the private index, and what
    differs in it from ``prev_tree`` (None without one). ``head``: the user's HEAD commit as
    read from the workspace (unchecked: it may not exist); ``appeared``: where a repository
    may have appeared (:attr:`Cache.appeared`)."""
    git = repo.git
    # ``repo.git`` sees watcherd's objects alone: every blob and tree is written from the files
    # themselves, never skipped because the workspace's objects claim to hold it already (their
    # bytes are the agent's).
    env = {"GIT_INDEX_FILE": str(repo.index)}
    if not repo.index.exists():
        # An empty index would record whatever git cannot read right now (a directory without
        # read permission) as deleted; starting from the last recorded state keeps it instead.
        if prev:
            git.run("read-tree", f"{prev}^{{tree}}", env=env)
        elif head:
            # The first snapshot has no recorded state: the user's HEAD stands in for it (when
            # its objects cannot be read, the index starts empty, as before). Its trees are the
            # workspace's: read through the alternates.
            repo.reader.run("read-tree", f"{head}^{{tree}}",
                            env={"GIT_INDEX_FILE": str(repo.index)}, check=False)
    taken_up: list[bytes] = []
    saved, lister = (prev_tree, repo.bare) if prev_tree else \
        (f"{head}^{{tree}}", repo.reader) if head and repo.index.exists() else (None, None)
    if prev_tree:
        _drop_gone_repositories(repo, prev_tree, env, index_file, cache)
    if saved and lister:  # the last snapshot's tree, or the user's HEAD's the index started from
        taken_up = _take_up_new_repositories(repo, layout, lister, saved, env, index_file, cache,
                                             appeared if prev_tree else None)
    lifted = _lift_gitlinks(repo, env, prev_tree, cache)
    if cache.refused:
        cache.refused = _still_refused(repo.workspace, cache.refused)
    try:
        # The last resort saves what the watcher saw change into an index that holds the last
        # snapshot: never into a first one (the rest would read as deleted).
        _add_rounds(repo, env, cache, appeared if prev_tree else None)
    except BaseException:
        # What git did not record is given back all the same: the next snapshot lists the
        # gitlinks from this index. A killed git's lock on it goes first (nothing else writes
        # it: the caller holds watcherd's lock).
        Path(f"{repo.index}.lock").unlink(missing_ok=True)
        with suppress(GitError, OSError):
            _put_back(repo, env, lifted, taken_up, saved, lister)
        raise
    _put_back(repo, env, lifted, taken_up, saved, lister)
    _user_paths(repo, index_file, cache)
    _keep_user_gitlinks(repo, env, cache)
    if not prev_tree:
        return git.out("write-tree", "--missing-ok", env=env), None
    # The tree and what changed since the previous one are two questions about the same index,
    # asked at once: starting a git is most of what each costs on a small change, and with two
    # of them running the second one's start overlaps the first's. (write-tree only adds the
    # cache-tree to the index, renamed into place whole: the reader sees the same entries.)
    return _at_once(lambda: git.out("write-tree", "--missing-ok", env=env),
                    lambda: _diff_index(repo.bare, env, prev_tree))


def _add_rounds(repo: Repo, env: dict[str, str], cache: Cache,
                reported: set[str] | None = None) -> None:
    """``git add --all`` into the private index (``env``), again without what blocked or failed
    it (left out in ``cache.refused``, said once), at most :data:`_ADD_ROUNDS` times and for
    :data:`_ROUNDS_FOR` seconds; when each of them met something new to leave out (the agent
    making FIFO repositories faster than git gets past them, in a tree git takes seconds to
    walk), a last ``git add --update``: the files already saved are, the new ones wait for the
    next snapshot (said). When that fails too, or a git add times out or runs past
    :attr:`Cache.hurry_by` with nothing found to leave out, the last resort: the saved files
    whose status changed and the new paths the watcher ``reported``, read by watcherd itself
    (:func:`_save_changed`, said). Raises :class:`GitError` when that cannot be done either
    (no snapshot yet)."""
    git = repo.git
    stalled = _StallCheck(repo.workspace, cache.refused, lambda: cache.hurry_by[0])
    started = time.monotonic()
    for attempt in range(_ADD_ROUNDS + 1):
        # The last round walks no directory, only the index's paths.
        update = attempt == _ADD_ROUNDS or \
            (attempt > 0 and time.monotonic() - started > _ROUNDS_FOR)
        unreadable = stalled.found
        unreadable.clear()
        held = _hold_out(repo, env, cache.refused)
        try:
            left_out = _add_all(git, env, refused=frozenset(cache.refused), stalled=stalled,
                                why=lambda p: _cannot_record(repo, p), update=update)
            if update:
                _log.warning("snapshot.new_files_deferred", rounds=attempt,
                             note="git add met something new to leave out at every round (a "
                                  "FIFO repository made as fast as git got past the last "
                                  "one): this snapshot saves the changes to the files already "
                                  "saved; new files wait for the next one")
            else:
                cache.left_out = left_out
            break
        except GitError as exc:  # a timeout, a failure, or stopped as stalled
            if stalled.out_of_time or (not unreadable and isinstance(exc, GitTimeout)) or \
                    (update and not isinstance(exc, LocalIOError)):
                # Blocked or slow on what watcherd cannot find, or out of time: git walks no
                # more; the saved files that changed, and the new ones the watcher saw, are
                # read by watcherd itself.
                Path(f"{repo.index}.lock").unlink(missing_ok=True)  # the killed git's
                if (recorded := _save_changed(repo, env, reported, cache.refused)) is None:
                    raise
                _log.warning("snapshot.git_add_bypassed", files=recorded,
                             reason=ws.printable(str(exc)),
                             note="git add could not finish (blocked or slow on what the agent "
                                  "planted, or out of time for a final save): this snapshot "
                                  "holds the saved files whose status changed and the new "
                                  "ones the watcher saw, read by watcherd itself; the next one "
                                  "tries git add again")
                return
            if not unreadable and not update:  # failed: whatever git may have failed on
                unreadable.update(_unreadable_repositories(repo.workspace,
                                                           skip=cache.refused)[0])
            if not unreadable and not update and \
                    not isinstance(exc, (GitTimeout, LocalIOError)):
                # Nothing explains it: git fails opening a nested repository in a way watcherd
                # does not know (a config value it cannot parse names no file). The rest of the
                # workspace is saved without them rather than not at all.
                unreadable.update((path, f"git add failed while it was in: {exc}")
                                  for path in _unreadable_repositories(
                                      repo.workspace, every=True, skip=cache.refused)[0])
            if not unreadable or update:
                raise
        finally:
            # The failed git's lock on watcherd's private index (nothing else writes it: the
            # caller holds watcherd's lock), then what was held out, back as it was.
            Path(f"{repo.index}.lock").unlink(missing_ok=True)
            if held:
                repo.bare.run("update-index", "-z", "--index-info", env=env, input=held)
        cache.refused |= unreadable
        _log.warning("snapshot.nested_refused", paths=sorted(map(ws.printable, unreadable))[:10],
                     reason=ws.printable(next(iter(unreadable.values()))),
                     note="git failed or blocked on these paths (a nested repository that "
                          "cannot be read inside the workspace: a FIFO, a link or a .git "
                          "leading outside it; a FIFO .gitignore watcherd may not let go; a "
                          "file nearly all holes): left out of the snapshots, as last saved, "
                          "until that is no longer so")


def _save_changed(repo: Repo, env: dict[str, str], reported: set[str] | None,
                  refused: dict[str, str]) -> int | None:
    """The last resort when no ``git add`` of this snapshot can finish, done by watcherd itself
    into the private index ``env`` (which holds the last snapshot): each file and link it holds
    that the watcher ``reported``, then each other one whose status (ctime, mtime, size, inode,
    as git compares them) changed, is read again, one gone (or no longer a file: a FIFO, a
    directory) taken out; then each new path the watcher reported. At most
    :data:`_CHANGED_MAX` files read, for :data:`_CHANGED_FOR` seconds and
    :data:`_CHANGED_BYTES` in all; read through descriptors (no link followed, nothing but a
    file or a link opened, no file nearly all holes as opened, nothing in a ``.git``, under a
    path of ``refused`` or new in a nested repository): git walks nothing and resolves no
    repository, so nothing planted holds it up. The paths recorded or taken out; None (nothing
    done) when the index holds no snapshot yet (the rest would read as deleted)."""
    listed = repo.bare.run("ls-files", "-z", "--stage", "--debug", env=env).stdout
    held = {m[2]: m for m in _DEBUG_ENTRY.finditer(listed) if m[1] != b"160000"}
    if not held and reported is None:
        return None
    top = Path(os.path.realpath(repo.workspace))
    gone = b"0 " + b"0" * (64 if repo.object_format() == "sha256" else 40) + b"\t"
    told = sorted(p for p in (os.fsencode(r) for r in reported or ()) if p)
    reported_set = set(told)
    lines, left, reads = [], [_CHANGED_BYTES], [_CHANGED_MAX]
    deadline = time.monotonic() + _CHANGED_FOR

    def accept(st: os.stat_result) -> bool:  # the file as opened
        if mostly_holes(st) or st.st_size > left[0]:
            return False
        left[0] -= st.st_size
        return True

    def look(rfd: int, path: bytes, was: re.Match | None, told: bool) -> None:
        parts = os.fsdecode(path).split("/")
        if ".git" in parts or any("/".join(parts[:i]) in refused
                                  for i in range(1, len(parts) + 1)):
            return
        if was is None and worktree.in_nested_repository(rfd, path):
            return  # a nested repository's own: git add records it as one, or not at all
        with dirfd.parent(rfd, path) as where:
            if where is None:
                return  # a directory on the way gone, or a link: the next git add sees to it
            try:
                st = os.stat(where[1], dir_fd=where[0], follow_symlinks=False)
            except FileNotFoundError:
                if was is not None:
                    lines.append(gone + path + b"\0")
                return
            if stat.S_IFMT(st.st_mode) not in (stat.S_IFREG, stat.S_IFLNK):
                if was is not None:
                    lines.append(gone + path + b"\0")
                return
            if was is not None and not told and _as_recorded(st, was):
                return  # as git last read it
            if reads[0] <= 0 or time.monotonic() > deadline:
                return  # as last saved: the next git add reads it
            reads[0] -= 1
            try:
                mode, oid = worktree.store_entry(repo.bare, repo.spool, *where, accept=accept)
            except OSError:
                return  # unreadable, refused as opened, or changed meanwhile: as last saved
            lines.append(f"{mode} {oid}\t".encode() + path + b"\0")

    with dirfd.opened(top) as rfd:
        for path in told:
            if path in held:
                look(rfd, path, held[path], True)
        for path, was in held.items():
            if path not in reported_set:
                look(rfd, path, was, False)
        for path in told:
            if path not in held:
                look(rfd, path, None, True)
    if lines:
        repo.bare.run("update-index", "-z", "--index-info", env=env, input=b"".join(lines))
    return len(lines)


def _as_recorded(st: os.stat_result, was: re.Match) -> bool:
    """Whether ``st`` is the status git recorded in the index entry ``was`` (:data:`_DEBUG_ENTRY`:
    ctime, mtime, size, inode; the index keeps 32 bits of each)."""
    return (st.st_ctime_ns // 10**9 & _U32, st.st_ctime_ns % 10**9,
            st.st_mtime_ns // 10**9 & _U32, st.st_mtime_ns % 10**9,
            st.st_ino & _U32, st.st_size & _U32) == tuple(int(g) for g in was.groups()[2:])


# One entry of ``git ls-files -z --stage --debug``: mode, id, stage, path, then the status git
# recorded (git's ls-files.c, print_debug): ctime and mtime (seconds, nanoseconds), inode, size.
_DEBUG_ENTRY = re.compile(
    rb"([0-7]{6}) [0-9a-f]+ \d\t([^\0]*)\0  ctime: (\d+):(\d+)\n  mtime: (\d+):(\d+)\n"
    rb"  dev: \d+\tino: (\d+)\n  uid: \d+\tgid: \d+\n  size: (\d+)\tflags: [0-9a-f]+\n")
_CHANGED_MAX = 1_000  # files :func:`_save_changed` reads, at most
_CHANGED_FOR = 5.0  # seconds it reads for, at most (a final save has half its time left)
_CHANGED_BYTES = 256 << 20  # bytes it reads, at most
_U32 = 0xFFFF_FFFF


def _lift_gitlinks(repo: Repo, env: dict[str, str], prev_tree: str | None,
                   cache: Cache) -> dict[bytes, bytes]:
    """Take every gitlink out of the private index (``env``) for the ``git add`` that follows;
    the gitlinks taken, path: commit (:func:`_put_back` gives back those git does not record
    again).

    For a gitlink it holds, ``git add`` asks the nested repository whether it is modified by
    running ``git status`` inside it (git's ``is_submodule_modified``), and that git reads the
    nested repository's own config and ``.gitattributes``: a clean filter or any other program
    the agent names there would run as watcherd, a FIFO as its index would block it, a missing
    object would fail every add. An untracked nested repository is only read as files (its
    ``HEAD``, by path: :func:`_confirm_reads` checks what git read). The gitlinks are those of
    the last snapshot's tree when the index is known to hold it (:attr:`Cache.index_tree`),
    else listed from the index."""
    if prev_tree and cache.index_tree == prev_tree and cache.gitlinks_tree == prev_tree and \
            cache.gitlinks is not None:
        links = {os.fsencode(p): oid.encode() for p, oid in cache.gitlinks.items()}
    else:
        out = repo.git.run("ls-files", "-z", "--stage", env=env).stdout
        links = {path: meta.split()[1] for meta, _, path in
                 (r.partition(b"\t") for r in out.split(b"\0") if r)
                 if meta.startswith(b"160000 ")}
    cache.index_tree = None  # until this snapshot's tree is written from it
    if links:
        repo.git.run("update-index", "-z", "--force-remove", "--stdin", env=env,
                     input=b"".join(p + b"\0" for p in links))
    return links


def _put_back(repo: Repo, env: dict[str, str], lifted: dict[bytes, bytes],
              taken_up: list[bytes], saved: str | None, lister: Git | None) -> None:
    """After ``git add``: give each gitlink :func:`_lift_gitlinks` took its commit back where git
    recorded nothing at or under its directory, still a directory (a repository with no commit
    now, left out, unreadable to git, empty), as git itself keeps a gitlink it cannot update;
    and each directory :func:`_take_up_new_repositories` took up that git recorded nothing at
    (it changed meanwhile) the files ``saved`` (the tree ``lister`` reads) holds there: what was
    last saved stays. What git recorded stays as it is: files where git saw no repository any
    more (its ``.git`` gone or no repository), a gitlink where it saw one, nothing at a path
    gone or no longer a directory, and nothing of a repository inside one git now records as a
    gitlink (a directory taken up)."""
    asked = list(lifted) + [d for d in taken_up if d not in lifted]
    if not asked:
        return
    literal = {"GIT_LITERAL_PATHSPECS": "1"}
    listed = repo.git.run("ls-files", "-z", "--cached", "--", *map(os.fsdecode, asked),
                          env={**env, **literal}).stdout
    held = set()
    for path in listed.split(b"\0"):
        while path:
            held.add(path)
            path = path.rpartition(b"/")[0]
    recorded = set(asked) & held
    lines, files = [], []
    for path in asked:
        if path in recorded or not ws.is_plain_dir(repo.workspace,
                                                   repo.workspace / os.fsdecode(path)):
            continue
        if any(path.startswith(d + b"/") for d in recorded):
            continue  # inside a repository git records now: that repository's own
        if path in lifted:
            lines.append(b"160000 %s\t%s\0" % (lifted[path], path))
        else:
            files.append(path)
    if files and saved and lister:
        out = lister.run("ls-tree", "-r", "-z", saved, "--", *map(os.fsdecode, files),
                         env=literal, check=False).stdout
        for meta, _, path in (r.partition(b"\t") for r in out.split(b"\0") if r):
            mode, _, oid = meta.split()
            lines.append(b"%s %s\t%s\0" % (mode, oid, path))
    if lines:
        repo.bare.run("update-index", "-z", "--index-info", env=env, input=b"".join(lines))


def _confirm_reads(repo: Repo, layout: ws.Layout, base: str | None,
                   entries: list[tuple[bytes, bytes, bytes]], cache: Cache) -> bool:
    """Make every file, link and gitlink the snapshot records as changed what the workspace
    holds at that path, read through descriptors opened without following links
    (:mod:`watcherd.dirfd`).

    ``git add`` opens each file by path: an agent that swaps a directory for a link to outside
    while git runs has git read, at that directory's paths, files of wherever the link points
    (a token watcherd's uid may read) into the snapshot. An entry whose blob is not what the
    path holds now is recorded again from what it holds (an edit made meanwhile is simply the
    newer content), or dropped when nothing is there (one that cannot be read keeps what
    ``base``, the tree the entries differ from, holds); True when the index changed. Costs one
    read of each changed file.

    A gitlink is git's reading of a nested repository's HEAD, by path too (through its ``.git``
    file, ``commondir``, refs, ``packed-refs``): one that is not the commit
    :func:`workspace.nested_head` reads is recorded again with that commit, or dropped when
    there is none; one of a repository that cannot be read inside the workspace keeps what
    ``base`` holds (checked when it was recorded) and is named in ``cache.left_out``. A race of
    the agent's costs it a warning, not the repository's next gitlinks: it is checked again at
    the next snapshot.

    In a nested repository (``layout.boundary`` set) everything is read beneath the workspace,
    its own directory included: one swapped for a link reads as holding nothing.
    """
    if not entries:
        return False
    top = layout.top
    prefix = os.fsencode(os.path.relpath(layout.root, top)) + b"/" if layout.boundary else b""
    fmt, wrong, lines, unsafe = repo.object_format(), [], [], {}
    gone = b"0 " + b"0" * len(entries[0][1]) + b"\t" if entries else b""  # "remove this path"
    vanished = []  # gitlinks whose repository is gone now
    for mode, oid, path in entries:
        if mode != b"160000":
            continue
        try:
            head = ws.nested_head(top, os.fsdecode(prefix + path))
        except ws.Unsafe as exc:
            unsafe[path] = str(exc)
            continue
        if head is None and cache.user_gitlinks.get(path) == oid:
            continue  # a submodule not checked out, as the user's index holds it
        if head != oid.decode():
            wrong.append(path)
            if head:
                lines.append(b"160000 %s\t" % head.encode() + path + b"\0")
            else:
                vanished.append(path)
    cache.left_out.update((os.fsdecode(p), why) for p, why in unsafe.items())
    if unsafe:
        # git read another repository's HEAD, or a part of this one it was not to read.
        _log.warning("snapshot.nested_refused",
                     paths=[ws.printable(os.fsdecode(p)) for p in list(unsafe)[:10]],
                     reason=ws.printable(next(iter(unsafe.values()))),
                     note="a nested repository that cannot be read inside the workspace (a "
                          "link or a .git leading outside it): its commit as last recorded is "
                          "kept")
    unreadable = list(unsafe)  # the last gitlink recorded stays, as git add leaves it later
    with dirfd.opened(top) as tfd, dirfd.beneath(tfd, prefix) as rfd:
        changed = []
        for mode, oid, path in entries:
            if mode in (b"000000", b"160000"):
                continue
            try:
                if rfd is None:
                    raise FileNotFoundError(path)
                found = worktree.entry_id(rfd, path, fmt)
            except OSError:
                found = None  # unreadable now: recorded again below, or dropped
            if found != (mode.decode(), oid.decode()):
                changed.append(path)
        wrong += changed
        for path in changed:
            with dirfd.parent(rfd, path) if rfd is not None else nullcontext() as where:
                try:
                    if where is None:
                        raise FileNotFoundError(path)
                    mode, oid = worktree.store_entry(repo.bare, repo.spool, *where)
                    lines.append(f"{mode} {oid}\t".encode() + path + b"\0")
                except PermissionError:
                    unreadable.append(path)
                except OSError:
                    lines.append(gone + path + b"\0")
    lines += _as_base_holds(repo, base, unreadable, vanished, gone)
    if not lines:
        return False
    repo.bare.run("update-index", "-z", "--index-info", input=b"".join(lines),
                  env={"GIT_INDEX_FILE": str(repo.index)})
    if wrong:
        _log.info("snapshot.reread", files=len(wrong),
                  paths=[ws.printable(os.fsdecode(p)) for p in wrong[:10]],
                  note="what git read for these paths was not what they hold (changed while "
                       "it read them, or a directory swapped for a link): recorded from the "
                       "files themselves")
    return True


def _as_base_holds(repo: Repo, base: str | None, unreadable: list[bytes],
                   vanished: list[bytes], gone: bytes) -> list[bytes]:
    """``update-index --index-info`` lines (``gone``: the start of "remove this path") that
    give each of ``unreadable`` what ``base`` holds there, as ``git add --ignore-errors`` leaves
    an unreadable file: the last recorded content stays; and each of ``vanished`` (a gitlink
    whose repository went meanwhile) the files ``base`` holds under it, if it held it as a
    directory, else nothing. A directory of ``base`` comes back as its files: an index holds no
    trees."""
    asked = set(unreadable) | set(vanished)
    if not asked:
        return []
    held: dict[bytes, list[bytes]] = {path: [] for path in asked}
    if base:
        out = repo.bare.run("ls-tree", "-r", "-z", base, "--", *map(os.fsdecode, asked),
                            env={"GIT_LITERAL_PATHSPECS": "1"}).stdout
        for meta, _, path in (rec.partition(b"\t") for rec in out.split(b"\0") if rec):
            at = path
            while at not in asked and b"/" in at:
                at = at.rpartition(b"/")[0]
            if at in held:
                mode, _, oid = meta.split()
                held[at].append(b"%s %s\t%s\0" % (mode, oid, path))
    lines = []
    for path in sorted(asked):
        kept = held[path]
        if path in vanished and kept and kept[0].endswith(b"\t%s\0" % path):
            kept = []  # a repository then too: gone with it
        if not (len(kept) == 1 and kept[0].endswith(b"\t%s\0" % path)):
            lines.append(gone + path + b"\0")  # a directory's files replace what is there
        lines += kept
    return lines


def _user_paths(repo: Repo, index_file: Path | None, cache: Cache) -> frozenset[bytes]:
    """The paths of the user's index. Those the private index lacks (force-added under an
    ignored directory) are added to it; looked at again only when the user's index changed."""
    if cache.user_paths is not None:
        return cache.user_paths
    paths: frozenset[bytes] = frozenset()
    cache.user_gitlinks = {}
    if index_file is not None:
        r = repo.bare.run("ls-files", "-z", "--stage", env={"GIT_INDEX_FILE": str(index_file)},
                          check=False)
        if r.returncode == 0:
            entries = [rec.partition(b"\t") for rec in r.stdout.split(b"\0") if rec]
            paths = frozenset(path for _, _, path in entries)
            cache.user_gitlinks = {path: meta.split()[1] for meta, _, path in entries
                                   if meta.startswith(b"160000 ")}
    env = {"GIT_INDEX_FILE": str(repo.index)}
    ours = set(repo.git.run("ls-files", "-z", "--cached", env=env).stdout.split(b"\0"))
    missing = sorted(p for p in paths if p not in ours and p not in cache.user_gitlinks)
    if missing:
        r = repo.git.run("update-index", "--add", "--remove", "-z", "--stdin", env=env,
                         input=b"".join(p + b"\0" for p in missing), check=False)
        if r.returncode != 0:
            _log.warning("snapshot.unreadable_files", detail=_lines(r.stderr)[:5],
                         hint="files of the user's index that could not be read are left out")
    cache.user_paths = paths
    return paths


def _keep_user_gitlinks(repo: Repo, env: dict[str, str], cache: Cache) -> None:
    """A gitlink of the user's index whose directory holds no repository (a submodule not
    checked out, or its ``.git`` removed) hides that directory's files from git: the private
    index (the index ``env`` names) holds the same gitlink, never those files, as
    ``git status`` sees it (:func:`_save_nested` says they are not saved)."""
    hidden = {p: oid for p, oid in cache.user_gitlinks.items()
              if _holds_no_repository(repo.workspace / os.fsdecode(p))}
    if not hidden:
        return
    listed = repo.git.run("ls-files", "-z", "--stage", "--", *map(os.fsdecode, hidden),
                          env={**env, "GIT_LITERAL_PATHSPECS": "1"}).stdout
    ours = {path: meta for meta, _, path in (r.partition(b"\t") for r in listed.split(b"\0") if r)}
    gone = b"0 " + b"0" * len(next(iter(hidden.values()))) + b"\t"
    lines = [gone + path + b"\0" for path in ours if path not in hidden]  # files inside one
    lines += [b"160000 %s\t%s\0" % (oid, path) for path, oid in hidden.items()
              if not ours.get(path, b"").startswith(b"160000 %s " % oid)]
    if lines:
        repo.bare.run("update-index", "-z", "--index-info", env=env, input=b"".join(lines))


def _holds_no_repository(path: Path) -> bool:
    """Whether ``path`` is a directory (not a link) without a ``.git``."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode) and not os.path.lexists(path / ".git")
    except OSError:
        return False


def _add_all(git: Git, env: dict[str, str], *, attempts: int = 3, report: bool = True,
             refused: frozenset[str] = frozenset(),
             stalled: Callable[[int], bool] | None = None,
             why: Callable[[str], str] = lambda path: _NO_COMMIT,
             update: bool = False) -> dict[str, str]:
    """``git add --all`` of the work tree into the index ``env`` names; ``report``: warn about
    the paths it had to leave out; ``refused``: nested repositories left out (see
    :func:`_unreadable_repositories`); ``stalled``: asked while git runs long
    (:meth:`Git.run`). The nested repositories git could not record (no commit yet), each with
    why (``why``, asked for each: :func:`_report_skipped`). ``update``: ``git add --update``,
    only the paths the index holds (no walk of the work tree, no new file). Raises
    :class:`GitError` (:class:`~watcherd.git.GitStalled` when ``stalled`` stopped it)."""
    # A path reached through a link now is none git walks to (and git dies on an exclude
    # "beyond a symbolic link"): left out of the excludes.
    top = Path(os.path.realpath(git.work_tree)) if git.work_tree is not None else None
    specs = [".", *(f":(exclude,literal){p}" for p in sorted(refused)
                    if top is None or _linkless(top, p))]
    for attempt in range(attempts):
        # --ignore-errors: an unreadable file must not stop every other edit from being saved.
        r = git.run("add", "--update" if update else "--all", "--ignore-errors", "--", *specs,
                    env=env, check=False, stalled=stalled)
        if r.returncode == 0:
            return {}
        said = r.stderr.decode("utf-8", "replace").strip()
        if "unable to stat" in said and "No such file" in said and attempt < attempts - 1:
            continue  # a file vanished between git's listing and its stat (an editor's temp file)
        if r.returncode != 1:
            raise GitError(f"git add failed in {git.work_tree}: {'; '.join(_lines(r.stderr)[:3])}")
        # 1 is --ignore-errors' "these paths could not be added": the index holds all the rest.
        return _report_skipped(said, report, why)
    return {}


def _unreadable_repositories(root: Path, *, blocking: bool = False, every: bool = False,
                             skip: Collection[str] = (), for_s: float | None = None
                             ) -> tuple[dict[str, str], list[str]]:
    """What ``git add``, reading the work tree under ``root`` by path, blocks on, fails on or
    reads another repository through (walked through descriptors, no link followed, at most
    :data:`_WALK_BUDGET` entries, :data:`_WALK_DEPTH` deep): (nested repositories
    :func:`workspace.nested_head` cannot read inside the workspace, each with why: a FIFO as
    its ``HEAD``, ``commondir``, branch or config, which git opens to tell a repository, or a
    ``HEAD`` linked outside, no repository to git; the files of :data:`_READ_BY_GIT` that are
    FIFOs, which git opens without ``O_NONBLOCK``). A ``.git`` that is no repository to
    watcherd is walked past, as git walks past one that is none to it. Files nearly all holes
    (:func:`mostly_holes`), when together they would have git read more than
    :data:`_SPARSE_BUDGET` bytes (minutes of zeros), are among the first, each with why.
    ``blocking``: only the repositories git blocks on (a FIFO, a socket, a device), not those
    it reads another way than watcherd; ``every``: every nested repository, readable or not
    (why: ""); ``skip``: paths already left out of git's add, not looked into; ``for_s``:
    seconds after which it stops looking (what it found so far)."""
    found: dict[str, str] = {}
    fifos: list[str] = []
    holey: dict[str, os.stat_result] = {}
    left = [_WALK_BUDGET]
    deadline = None if for_s is None else time.monotonic() + for_s

    def walk(fd: int, at: str, depth: int) -> None:
        if deadline is not None and time.monotonic() > deadline:
            left[0] = -1
            return
        names = os.listdir(fd)
        left[0] -= len(names)
        if at and ".git" in names:
            try:
                ws.nested_head(root, at.rstrip("/"))
                if every:
                    found[at.rstrip("/")] = ""
                return  # git does not look further into a repository
            except ws.NotRegular as exc:
                found[at.rstrip("/")] = str(exc)
                return
            except ws.Unsafe as exc:
                if not blocking:
                    found[at.rstrip("/")] = str(exc)
                # Maybe no repository to git either (an empty .git, a junk file): it walks on.
        for name in _READ_BY_GIT:
            if name in names:
                try:
                    if stat.S_ISFIFO(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode):
                        fifos.append(f"{at}{name}")
                except OSError:
                    pass
        for name in names:
            if left[0] < 0 or depth > _WALK_DEPTH:
                return
            if name == ".git" or f"{at}{name}" in skip:
                continue
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode):
                try:
                    with dirfd.opened_at(fd, name) as sub:
                        walk(sub, f"{at}{name}/", depth + 1)
                except OSError:
                    continue
            elif mostly_holes(st):
                holey[f"{at}{name}"] = st

    root = Path(os.path.realpath(root))
    with dirfd.opened(root) as rfd:
        walk(rfd, "", 0)
    if sum(st.st_size for st in holey.values()) > _SPARSE_BUDGET:
        found.update((rel, _sparse(rel, st)) for rel, st in holey.items())
    return found, fifos


# How far _unreadable_repositories looks (git has no bound): past it, only what the kernel
# names (procfs) is found.
_WALK_DEPTH = 256  # directories deep
_WALK_BUDGET = 500_000  # entries listed, ignored ones too
_WALK_FOR = 5.0  # seconds, while git waits (50,000 nested repositories take 20)
_HOLEY = 1 << 20  # bytes above which a file nearly all holes counts (mostly_holes)
# Bytes of such files git may read in one add (about 15 s of zeros on a small machine): past
# it, all of them are left out. A count or a size per file alone is beaten by more files.
_SPARSE_BUDGET = 1 << 30


def _sparse(rel: str, st: os.stat_result) -> str:
    return (f"{rel} is a sparse file of {st.st_size} bytes, nearly all holes, one of more than "
            f"{_SPARSE_BUDGET >> 30} GiB of them: git would read (and a restore write) every "
            "byte")


def mostly_holes(st: os.stat_result) -> bool:
    """Whether ``st`` is a regular file above :data:`_HOLEY` bytes of which not an eighth is
    on disk: ``truncate -s 1T`` costs the agent nothing and git add minutes of reading zeros
    (at every snapshot, each ending in the door's timeout)."""
    return stat.S_ISREG(st.st_mode) and st.st_size > _HOLEY and \
        st.st_blocks * 512 < st.st_size // 8


def sparse_bound() -> Callable[[os.stat_result], bool]:
    """A judge of the files one task reads, as looked at or as opened: true (refuse it) of a
    file :func:`mostly_holes` once those let through would pass :data:`_SPARSE_BUDGET` bytes in
    all (the bound the snapshots keep): a few sparse files are read, a terabyte of zeros not.
    Each judgement is charged, the same file's too: each is one more read of it (looked at,
    then opened; a hard link of it), and the bound is on the time spent reading."""
    left = [_SPARSE_BUDGET]

    def refuse(st: os.stat_result) -> bool:
        if not mostly_holes(st):
            return False
        if st.st_size > left[0]:
            return True
        left[0] -= st.st_size
        return False

    return refuse


# Files of the work tree git opens by path, without O_NONBLOCK, while it adds: a FIFO there
# blocks it (.gitmodules: at the top, read when it meets a nested repository).
_READ_BY_GIT = (".gitignore", ".gitattributes", ".gitmodules")
_READABLE = frozenset({stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK})  # what git opens and finishes
_MAX_LET_GO = 32  # FIFOs of _READ_BY_GIT a stall check lets go; past that, their directories out
_ADD_ROUNDS = 4  # git adds tried in one snapshot, each after leaving out what blocked the last
# Seconds of them after which the next is the last (a SIGTERM's final save has 20 by default).
_ROUNDS_FOR = 8.0


class _StallCheck:
    """The ``stalled`` check of the gits of one snapshot that walk the work tree
    (:meth:`Git.run`): every second, what git is blocked on for good. The kernel names the
    file git is in ``open`` or ``read`` of (:func:`procfs.blocked_on`, any depth); where it
    cannot tell, from the second one on to find the others in one pass, where git holds a file
    nearly all holes (to weigh them all), and where git is blocked on what it reached through
    a nested ``.git`` another way than by a path of the work tree, a walk looks
    (:func:`_unreadable_repositories`, at most :data:`_WALK_FOR` seconds; one that found
    nothing waits twice as long before the next). A nested repository it cannot read (a FIFO as its
    ``HEAD``) goes to :attr:`found` and stops git (the caller leaves it out and tries again). A
    FIFO as a ``.gitignore``, ``.gitattributes`` or ``.gitmodules`` (which git reads even for
    files it is told to leave out) is let go (:func:`dirfd.release_fifos`): git reads it as
    empty; one watcherd may not open for writing (the app's, read-only to watcherd's uid) puts
    its directory in :attr:`found` instead, left out with the files it holds as last saved
    (:func:`_hold_out`). Either way seconds, once, not the door's whole timeout (a SIGTERM's
    final save must not wait for it). A git the kernel finds blocked on nothing of the work
    tree is only slow: the check costs no walk then."""

    def __init__(self, root: Path, refused: dict[str, str],
                 hurry: Callable[[], float | None] = lambda: None) -> None:
        self.root = root
        self.refused = refused
        self.hurry = hurry  # when (monotonic) git is stopped whatever it does
        self.out_of_time = False
        self.found: dict[str, str] = {}
        self.blocked = 0  # times the kernel named something git blocks on
        self.walk_due = 0.0  # when a walk may run again (monotonic)
        self.walk_every = _WALK_FOR  # seconds between walks that found nothing

    def _walk(self, *, blocking: bool) -> tuple[dict[str, str], list[str]]:
        """:func:`_unreadable_repositories`, bounded in time; one that finds nothing puts the
        next off twice as long as the last (git is asked about every second)."""
        found, fifos = _unreadable_repositories(self.root, blocking=blocking,
                                                skip=self.refused, for_s=_WALK_FOR)
        if not found and not fifos:
            self.walk_due = time.monotonic() + self.walk_every
            self.walk_every *= 2
        return found, fifos

    def __call__(self, pid: int) -> bool:
        if (by := self.hurry()) is not None and time.monotonic() >= by:
            self.out_of_time = True
            return True
        seen = procfs.blocked_on(pid)
        if seen is None:
            if time.monotonic() < self.walk_due:
                return False
            repositories, fifos = self._walk(blocking=True)
        else:
            repositories, fifos, elsewhere, holey = _blocking(self.root, seen)
            if elsewhere and time.monotonic() >= self.walk_due:
                # git is blocked on what it reached through a nested repository's .git in a
                # way no path of the work tree shows: the repositories watcherd cannot read
                # inside the workspace are the ones it may have followed.
                repositories = {**self._walk(blocking=False)[0], **repositories}
            elif repositories or fifos:
                if self.blocked:
                    # A second one in this snapshot: there may be many, and the kernel names
                    # one per check. The walk finds the others within its bounds at once (it
                    # costs as much as git's own walk: not for the first, often the only one).
                    more, more_fifos = self._walk(blocking=True)
                    repositories = {**more, **repositories}
                    fifos = list(dict.fromkeys(fifos + more_fifos))
                self.blocked += 1
            elif holey and time.monotonic() >= self.walk_due:
                repositories = self._walk(blocking=True)[0]  # weighs every sparse file
            else:
                return False
        self.found.update((path, why) for path, why in repositories.items()
                          if path not in self.refused)
        if not self.found and fifos:
            # Let go one after another, a few; more than that costs seconds a pass (each is
            # opened from the root, and only the one git is blocked on lets it go on): their
            # directories are left out instead (the top's cannot be).
            top = [f for f in fifos if "/" not in f]
            many = len(fifos) > _MAX_LET_GO
            denied = dirfd.release_fifos(self.root, top if many else fifos)
            why = (f"one of {len(fifos)} FIFOs git blocks reading, too many to let go" if many
                   else "a FIFO watcherd may not open to let git read it: git blocks reading it")
            for rel in denied + ([f for f in fifos if "/" in f] if many else []):
                where = rel.rpartition("/")[0]
                if where and where not in self.refused:
                    self.found[where] = f"{rel} is {why}"
        return bool(self.found)


def _blocking(root: Path, seen: list[procfs.Seen]
              ) -> tuple[dict[str, str], list[str], bool, bool]:
    """Of ``seen`` (what :func:`procfs.blocked_on` names git in ``open`` or ``read`` of, or
    holding), what in the work tree ``root`` blocks git for good, as
    :func:`_unreadable_repositories` (``blocking``) answers: (nested repositories, or files, to
    leave out, each with why; FIFOs of :data:`_READ_BY_GIT` to let go; whether git is blocked
    opening what is no regular file reached another way than the work tree's paths, a
    ``gitdir:`` into the workspace's ``.git`` or through ``/proc``; whether git holds a file
    nearly all holes, which only a walk can weigh against :data:`_SPARSE_BUDGET`). A file git
    holds that is no longer where it was read (unlinked, renamed) and is nearly all holes is
    left out at once: it is gone from the work tree, and git would read all of it."""
    top = os.path.realpath(root)
    found: dict[str, str] = {}
    fifos: list[str] = []
    elsewhere = holey = False
    for path, held in seen:
        name = path.removesuffix(" (deleted)") if held is not None else path
        rel = os.path.relpath(os.path.normpath(name), top)
        parts = rel.split("/")
        outside = rel == "." or parts[0] in ("..", ".git")  # the workspace's own .git too
        try:
            st = held or os.stat(path, follow_symlinks=False)
        except OSError:
            continue  # gone
        plain = stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)
        if held is not None:
            if not outside and mostly_holes(st):
                try:
                    now = os.lstat(name)
                    moved = (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino)
                except OSError:
                    moved = True
                if moved:
                    found[rel] = _sparse(rel, st)
                holey = True
            if plain:
                continue  # read to its end (a FIFO read blocks: looked at below)
        if outside:
            elsewhere |= not plain
        elif ".git" in parts:
            if not plain:  # to tell it is a repository, git opens its .git, HEAD, ref, config
                repository = "/".join(parts[:parts.index(".git")])
                found[repository] = f"{rel} is no regular file: git blocks opening it"
        elif parts[-1] in _READ_BY_GIT and stat.S_ISFIFO(st.st_mode):
            fifos.append(rel)
        elif not plain:
            found[rel] = f"{rel} is no regular file: git blocks opening it"
    return found, fifos, elsewhere, holey


def _still_refused(root: Path, refused: dict[str, str]) -> dict[str, str]:
    """The entries of ``refused`` (paths left out of ``git add``, each with why) that still
    hold what had them left out: a nested repository :func:`workspace.nested_head` cannot read,
    a FIFO git would read, a file nearly all holes, a FIFO or device git blocked on. One fixed
    since (or gone) is saved again from this snapshot on."""
    kept = {}
    top = Path(os.path.realpath(root))
    for path, why in refused.items():
        where = top / path
        if not _linkless(top, path):
            continue  # git walks no link: there is nothing it can block on there now
        try:
            st = os.lstat(where)
        except OSError:
            continue  # gone
        if mostly_holes(st) or stat.S_IFMT(st.st_mode) not in _READABLE:
            kept[path] = why
            continue
        if any(ws.is_fifo(where / name) for name in _READ_BY_GIT):
            kept[path] = why
        elif os.path.lexists(where / ".git"):
            try:
                ws.nested_head(root, path)
            except ws.Unsafe:
                kept[path] = why
    return kept


def _linkless(top: Path, rel: str) -> bool:
    """Whether ``rel`` under ``top`` (resolved) is reached through no link, itself included."""
    return os.path.realpath(top / rel) == str(top / rel)


def _hold_out(repo: Repo, env: dict[str, str], refused: dict[str, str]) -> bytes:
    """Take the entries under each directory of ``refused`` out of the private index
    (``env``) for a ``git add``: git reads the ``.gitignore`` of a directory whose files its
    index holds even when told to leave the directory out. The ``update-index --index-info``
    input that gives them back as they were (what was last saved stays)."""
    if not refused:
        return b""
    listed = repo.git.run("ls-files", "-z", "--stage", "--", *sorted(refused),
                          env={**env, "GIT_LITERAL_PATHSPECS": "1"}).stdout
    entries = [(meta, path) for meta, _, path in (r.partition(b"\t") for r in listed.split(b"\0")
                                                    if r) if not meta.startswith(b"160000 ")]
    if not entries:
        return b""
    repo.git.run("update-index", "-z", "--force-remove", "--stdin", env=env,
                 input=b"".join(path + b"\0" for _, path in entries))
    return b"".join(b"%s %s\t%s\0" % (meta.split()[0], meta.split()[1], path)
                    for meta, path in entries)


def _drop_now_ignored(git: Git, env: dict[str, str], user_paths: frozenset[bytes],
                      refused: dict[str, str] | None = None,
                      stalled: Callable[[int], bool] | None = None) -> bool:
    """Take out of the private index what is ignored now and not in the user's index.

    ``git add --all`` never drops an entry because a .gitignore matches it now (a tracked file is
    never ignored), and the private index holds everything ever snapshotted. Without this, a
    ``node_modules/`` or ``.env`` snapshotted before its .gitignore line would stay in every
    snapshot for ever, and ignoring a file too large to upload would not make the next bundle
    smaller. A path the user tracks stays (``git add -f``), as in their own ``git status``.
    ``refused``: nested repositories left out; ``stalled``: as :meth:`Git.run` takes it (a
    FIFO as a ``.gitignore``: :class:`_StallCheck`).
    """
    specs = [".", *(f":(exclude,literal){p}" for p in sorted(refused or ()))]
    try:
        listed = git.run("ls-files", "-z", "--cached", "--ignored", "--exclude-standard", "--",
                         *specs, env=env, stalled=stalled).stdout
    except GitStalled:
        return False  # a FIFO that cannot be let go: looked for again at the next snapshot
    gone = [p for p in listed.split(b"\0") if p and p not in user_paths]
    if not gone:
        return False
    git.run("update-index", "-z", "--force-remove", "--stdin", env=env,
            input=b"".join(p + b"\0" for p in gone))
    _log.info("snapshot.now_ignored", files=len(gone),
              paths=[p.decode("utf-8", "surrogateescape") for p in gone[:10]],
              note="ignored since an earlier snapshot and not tracked: no longer snapshotted")
    return True


def _report_skipped(said: str, report: bool = True,
                    why: Callable[[str], str] = lambda path: _NO_COMMIT) -> dict[str, str]:
    """Say which paths ``git add`` left out and why, one warning per kind of reason (``report``
    False: say nothing); the nested repositories among them, each with why (``why``: asked for
    each, git says only "does not have a commit checked out")."""
    nested, refused, other = {}, [], []
    for line in said.splitlines():
        if m := re.fullmatch(r"error: '(.*)/' does not have a commit checked out", line):
            nested[m[1]] = why(m[1])
        elif m := re.fullmatch(r"error: invalid path '(.*)'", line):
            refused.append(m[1])
        elif line.startswith(("error:", "warning:", "fatal:")) and "unable to add" not in line \
                and "adding embedded git repository" not in line:
            other.append(line)
    if not report:
        return nested
    for path, reason in nested.items():
        _log.warning("snapshot.nested_repository", path=path, reason=reason,
                     note="a nested git repository with no commit yet: git cannot record it, so "
                          "its files are not in the snapshot (commit in it, or remove its .git)"
                     if reason == _NO_COMMIT else
                     "a nested git repository git cannot record: its files are not in the "
                     "snapshot (remove its .git to have them saved as files)")
    if refused:
        _log.warning("snapshot.paths_refused", paths=refused[:50], count=len(refused),
                     hint="git refuses these names (they would be .git on other systems, or a "
                          "symlinked .gitmodules); they are left out of the snapshot, rename them")
    if other:
        _log.warning("snapshot.unreadable_files", detail=other[:5],
                     hint="files git could not read are left out of this snapshot")
    return nested


def _cannot_record(repo: Repo, path: str) -> str:
    """Why git recorded no gitlink for the nested repository at ``path`` (it says "does not have
    a commit checked out" either way): no commit yet, or objects named by another hash than the
    workspace's (git reads a sha256 ``HEAD`` in a sha1 workspace as no commit, and a tree of
    one format cannot name a commit of the other)."""
    fmt = ws.nested_object_format(repo.workspace, path)
    if fmt is not None and fmt != repo.object_format():
        return (f"a {fmt} repository in a {repo.object_format()} workspace: git cannot record "
                "it, so its files are not saved")
    return _NO_COMMIT


_NO_COMMIT = "a repository with no commit yet: git cannot record it, so its files are not saved"


def _diff_index(git: Git, env: dict[str, str], old_tree: str) -> list[tuple[bytes, bytes, bytes]]:
    """:func:`_diff` of ``old_tree`` and the tree the index ``env`` names would write."""
    raw = git.run("diff-index", "--cached", "-z", "--no-renames", old_tree, env=env).stdout
    return _raw_entries(raw)


def _at_once(first, second):
    """``first()`` here and ``second()`` in a thread, at the same time: (first's, second's)."""
    box: dict[str, object] = {}

    def run() -> None:
        try:
            box["value"] = second()
        except BaseException as exc:  # handed to the caller below
            box["error"] = exc

    helper = threading.Thread(target=run, name="watcherd-snapshot", daemon=True)
    helper.start()
    try:
        value = first()
    finally:
        helper.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return value, box["value"]


def _empty_tree(git: Git) -> str:
    return git.out("hash-object", "-t", "tree", "--stdin", input=b"")


def _diff(git: Git, old_tree: str | None, new_tree: str) -> list[tuple[bytes, bytes, bytes]]:
    """(new mode, new id, path) of every entry that differs (all of ``new_tree`` without an old
    one)."""
    if old_tree:
        return _raw_entries(git.run("diff-tree", "-r", "-z", "--no-renames", old_tree,
                                    new_tree).stdout)
    records = git.run("ls-tree", "-r", "-z", new_tree).stdout.split(b"\0")
    return [(meta.split()[0], meta.split()[2], path)
            for meta, _, path in (r.partition(b"\t") for r in records if r)]


def _raw_entries(raw: bytes) -> list[tuple[bytes, bytes, bytes]]:
    """(new mode, new id, path) of each record of a raw ``-z`` diff (``:old new old-id new-id
    status``, then the path)."""
    fields = raw.split(b"\0")
    return [(meta.split()[1], meta.split()[3], path)
            for meta, path in zip(fields[0::2], fields[1::2]) if meta]


def _save_nested(repo: Repo, layout: ws.Layout, tree: str, base: str | None,
                 entries: list[tuple[bytes, bytes, bytes]], cache: Cache,
                 appeared: set[str] | None = None) -> tuple[str | None, list[str]]:
    """Snapshot every repository nested in ``tree`` (a gitlink: a submodule, a ``git clone``
    inside) by the same rules, each into a history of its own sharing this one's objects
    (:meth:`Repo.nested`); (the record naming those snapshots, :func:`state.write_nested`, or
    None; the paths that changed in them, prefixed with the repository's path).

    One that cannot be saved now (a link or ``.git`` leading outside the workspace, its
    history unreadable, nested deeper than :data:`state.MAX_NESTED_DEPTH`) keeps the snapshot
    it last had in this history, if any, and is warned about (``snapshot.nested_not_saved``)
    and shown in ``status``: never silence, never a reason for the rest not to be saved."""
    links = _gitlinks(repo, tree, base, entries, cache)
    for path in cache.subs.keys() - links.keys():
        # Gone, or no longer a repository (its files are the tree's now): first, so that the
        # pack descriptors it held (Repo.attach) are there for the others.
        cache.subs.pop(path)[0].close()
    if not (links or cache.unsaved or cache.not_saved_before or cache.left_out or cache.refused
            or cache.tracked_inside):
        return None, []
    last = _nested_saved(repo, repo.snapshot_head(), cache)
    saved: dict[str, str] = {}
    unsaved: dict[str, str] = {}
    changed: list[str] = []
    for path in sorted(links):
        why = None
        if cache.nested_taken[0] >= state.MAX_NESTED:
            why = f"more than {state.MAX_NESTED} nested repositories in the workspace"
        elif cache.depth >= state.MAX_NESTED_DEPTH:
            why = f"nested more than {state.MAX_NESTED_DEPTH} repositories deep"
        else:
            cache.nested_taken[0] += 1
            try:
                snap = _take_nested(repo, layout, path, cache, appeared)
                if snap.snapshot_head:
                    saved[path] = snap.snapshot_head
                    changed += [f"{path}/{p}" for p in snap.paths]
                    continue
                why = "nothing in it can be recorded"
            except _NotARepository as exc:
                if exc.empty:
                    continue  # a submodule not checked out: nothing of it to save
                unsaved[path] = str(exc)  # its files are in no index: as git sees it
                continue
            except (ws.Unsafe, GitError, WorkspaceError, OSError) as exc:
                why = str(exc)
        unsaved[path] = why
        if path in last:
            saved[path] = last[path]  # its last saved state is not dropped
    _report_unsaved(unsaved | cache.tracked_inside, last, saved, cache)
    return state.write_nested(repo.bare, saved), changed


def _take_nested(repo: Repo, layout: ws.Layout, path: str, cache: Cache,
                 appeared: set[str] | None = None) -> Snapshot:
    """Snapshot the repository nested at ``path`` (relative to ``layout``'s root) into its own
    history; ``appeared``: as :attr:`Cache.appeared` for ``layout``'s repository (the watcher
    reports a change inside a nested repository as its path). :class:`ws.Unsafe` when it cannot
    be read inside the workspace."""
    full = layout.root / path
    if Path(os.path.realpath(full)) != full:
        raise ws.Unsafe(f"{path} is reached through a link")
    nested = ws.locate(full, boundary=layout.top)
    if nested.problem:
        raise ws.Unsafe(nested.problem)
    if not nested.is_repository:
        raise _NotARepository(path, full)
    if path not in cache.subs:
        cache.subs[path] = (repo.nested(path), Cache(depth=cache.depth + 1,
                                                     at=f"{cache.at}{path}/",
                                                     nested_taken=cache.nested_taken,
                                                     nested_known=cache.nested_known,
                                                     hurry_by=cache.hurry_by,
                                                     index_read=cache.index_read))
    sub, sub_cache = cache.subs[path]
    sub_cache.look_again(appeared is None or any(a == path or a.startswith(f"{path}/")
                                                 for a in appeared))
    # Every line logged meanwhile names the repository.
    with structlog.contextvars.bound_contextvars(nested_repository=ws.printable(sub_cache.at[:-1])):
        sub.ensure(repo.object_format())  # its objects are this repository's
        return _take(sub, nested, sub_cache)


def _drop_gone_repositories(repo: Repo, prev_tree: str, env: dict[str, str],
                            index_file: Path | None, cache: Cache) -> None:
    """Take out of the private index every gitlink of ``prev_tree`` whose directory holds files
    but no ``.git`` any more (``rm -rf lib/.git``), unless the user's index has it: ``git add
    --all`` keeps a gitlink for ever, and those files, untracked to ``git status`` now, would be
    in no snapshot. A gitlink of the user's index stays, as git sees it (a submodule not checked
    out: files in its directory are in no index, and :func:`_save_nested` says so); so does one
    whose directory is empty."""
    gone = []
    for path in _gitlinks(repo, prev_tree, prev_tree, [], cache):
        where = repo.workspace / path
        try:
            if os.path.lexists(where / ".git") or not any(os.scandir(where)):
                continue
        except OSError:
            continue  # gone, a file or unreadable: git add sees to it
        gone.append(os.fsencode(path))
    if gone and index_file is not None:
        tracked = repo.bare.run("ls-files", "-z", "--cached", "--", *map(os.fsdecode, gone),
                                env={"GIT_INDEX_FILE": str(index_file),
                                     "GIT_LITERAL_PATHSPECS": "1"}, check=False).stdout
        gone = [p for p in gone if p not in set(tracked.split(b"\0"))]
    if gone:
        repo.git.run("update-index", "-z", "--force-remove", "--stdin", env=env,
                     input=b"".join(p + b"\0" for p in gone))


def _take_up_new_repositories(repo: Repo, layout: ws.Layout, lister: Git, saved: str,
                              env: dict[str, str], index_file: Path | None, cache: Cache,
                              appeared: set[str] | None) -> list[bytes]:
    """Take out of the private index (``env``) the files of every directory ``saved`` (a tree
    ``lister`` reads: the last snapshot's, or the user's HEAD's the first index started from)
    holds as files that is a repository with a commit now (``git init`` and a commit in it, a
    clone moved into its place): ``git add --all`` keeps updating files the index holds, so
    without this the repository would stay saved as files for ever, its history, branches and
    stash in no snapshot. The ``git add`` that follows records it as git sees it, a gitlink,
    and :func:`_save_nested` saves it.

    Only a repository :func:`workspace.nested_head` reads inside the workspace, with a commit,
    is taken up: one with no commit yet, unreadable, or leading outside keeps its files saved
    (git could not record it). One in a directory whose files the user's index tracks stays
    saved as those files, as the user's ``git status`` shows them; its history cannot be, and
    it goes to ``cache.tracked_inside`` (warned about, shown in ``status``, looked at again at
    every snapshot). ``appeared``: the only directories looked at besides those (None: all of
    ``saved``'s; a full look costs a ``git ls-tree`` and an ``lstat`` per directory). Never more
    than :func:`_save_nested` can save (:data:`state.MAX_NESTED`, ``MAX_NESTED_DEPTH``): what it
    would refuse keeps its files. The directories taken up.
    """
    if cache.depth >= state.MAX_NESTED_DEPTH:  # its gitlinks would not be saved
        cache.tracked_inside = {}
        return []
    root = repo.workspace
    check = lister is repo.bare  # the user's HEAD may name objects the workspace lacks
    if appeared is None:
        listed = lister.run("ls-tree", "-r", "-d", "-z", saved, check=check).stdout
        dirs = [path for meta, _, path in (r.partition(b"\t") for r in listed.split(b"\0") if r)
                if meta.startswith(b"040000 ")]
    else:
        dirs = sorted({os.fsencode(p) for p in appeared | cache.tracked_inside.keys()})
    seen = [d for d in dirs if os.path.lexists(root / os.fsdecode(d) / ".git")]
    # What _save_nested can still save in this snapshot: the nested repositories the last one
    # found in the whole workspace come first.
    room = state.MAX_NESTED - cache.nested_known[0]
    literal = {"GIT_LITERAL_PATHSPECS": "1"}
    if seen and appeared is not None:  # a watcher's hint: only what was saved as a directory
        listed = lister.run("ls-tree", "-d", "-z", saved, "--", *map(os.fsdecode, seen),
                            env=literal, check=check).stdout
        as_dirs = {path for meta, _, path in (r.partition(b"\t") for r in listed.split(b"\0")
                                              if r) if meta.startswith(b"040000 ")}
        seen = [d for d in seen if d in as_dirs]
    top = layout.top
    prefix = os.path.relpath(layout.root, top) + "/" if layout.boundary else ""
    found: list[bytes] = []
    for d in seen:
        if any(d.startswith(f + b"/") for f in found) or os.fsdecode(d) in cache.refused:
            continue
        try:
            head = ws.nested_head(top, prefix + os.fsdecode(d))
        except ws.Unsafe:
            continue  # git could not record it safely: its files stay saved
        if head is not None:
            found.append(d)
    tracked: set[bytes] = set()
    if found and index_file is not None:
        listed = repo.bare.run("ls-files", "-z", "--cached", "--", *map(os.fsdecode, found),
                               env={"GIT_INDEX_FILE": str(index_file), **literal},
                               check=False).stdout.split(b"\0")
        tracked = {d for d in found if any(p.startswith(d + b"/") for p in listed)}
    cache.tracked_inside = {
        os.fsdecode(d): "the workspace's index tracks files in it: they are saved as the "
                        "workspace's files, its history, branches and stash are not (`git rm -r "
                        f"--cached {ws.printable(os.fsdecode(d))}` makes it a nested repository)"
        for d in sorted(tracked)}
    found = [d for d in found if d not in tracked][:max(0, room)]
    if not found:
        return []
    files = repo.git.run("ls-files", "-z", "--cached", "--", *map(os.fsdecode, found),
                         env={**env, **literal}).stdout
    repo.git.run("update-index", "-z", "--force-remove", "--stdin", env=env, input=files)
    _log.info("snapshot.nested_found", paths=[ws.printable(os.fsdecode(d)) for d in found[:10]],
              count=len(found),
              note="a directory saved as files is a git repository now: saved as a nested "
                   "repository, with its history, from this snapshot on")
    return found


class _NotARepository(Exception):
    """A gitlink whose directory holds no repository: a submodule not checked out (``empty``),
    or one whose ``.git`` went while the user's index keeps its gitlink."""

    def __init__(self, path: str, full: Path) -> None:
        try:
            self.empty = not any(os.scandir(full))
        except OSError:
            self.empty = True
        super().__init__(f"{path} holds no .git but the index keeps it as a submodule: git sees "
                         "its files in no index, so they are not saved (`git rm --cached "
                         f"{path}` makes them the workspace's)")


def _gitlinks(repo: Repo, tree: str, base: str | None,
              entries: list[tuple[bytes, bytes, bytes]], cache: Cache) -> dict[str, str]:
    """The gitlinks of ``tree`` (path: commit): listed once per process, then followed through
    ``entries``, what changed since ``base``."""
    if cache.gitlinks is None or cache.gitlinks_tree != base:
        out = repo.bare.run("ls-tree", "-r", "-z", "--full-tree", tree).stdout
        cache.gitlinks = {}
        for entry in out.split(b"\0"):
            if entry.startswith(b"160000 "):
                meta, _, raw = entry.partition(b"\t")
                cache.gitlinks[raw.decode("utf-8", "surrogateescape")] = meta.split()[2].decode()
    elif tree != base:
        for mode, oid, raw in entries:
            path = raw.decode("utf-8", "surrogateescape")
            if mode == b"160000":
                cache.gitlinks[path] = oid.decode()
            else:
                cache.gitlinks.pop(path, None)
    cache.gitlinks_tree = tree
    return cache.gitlinks


def _nested_saved(repo: Repo, snapshot: str | None, cache: Cache) -> dict[str, str]:
    """The nested repositories' snapshots ``snapshot`` names, by path."""
    record = _nested_of(repo, snapshot, cache)
    if record is None:
        return {}
    if record not in cache.nested_records:
        cache.nested_records = {record: state.load(repo.bare, snapshot).nested}
    return cache.nested_records[record]


def _report_unsaved(unsaved: dict[str, str], last: dict[str, str], saved: dict[str, str],
                    cache: Cache) -> None:
    """Warn about each nested repository that is not saved: when it first is not, when the
    reason changes, and again at most every :data:`NESTED_WARN_INTERVAL` seconds while it stays
    so (a snapshot follows every change inside it); say when one that was not (for any reason,
    :meth:`Cache.not_saved`) is saved."""
    now = time.monotonic()
    for path, why in unsaved.items():
        said = cache.unsaved_said.get(path)
        if said is not None and said[0] == why and now - said[1] < NESTED_WARN_INTERVAL:
            continue
        cache.unsaved_said[path] = (why, now)
        _log.warning("snapshot.nested_not_saved", path=ws.printable(path),
                     reason=ws.printable(why),
                     kept="its last saved state" if path in last else "nothing",
                     note="a nested repository whose files, history and uncommitted changes "
                          "this snapshot cannot save")
    cache.unsaved = unsaved
    now = set(cache.refused) | set(cache.left_out) | set(unsaved)
    for path in cache.not_saved_before - now:
        cache.unsaved_said.pop(path, None)
        if path in saved:
            _log.info("snapshot.nested_saved", path=ws.printable(path),
                      note="the nested repository is saved now")
    cache.not_saved_before = now


def message(paths: list[str], moved_head: str | None) -> str:
    """The snapshot's message: ``watcherd: snapshot (N files)``, a blank line, then the first
    :data:`MESSAGE_PATHS` paths one per line, control characters escaped (a name holding a
    newline must not read as two)."""
    lines = [f"watcherd: snapshot ({len(paths)} files)", ""]
    lines += [ws.printable(p) for p in paths[:MESSAGE_PATHS]]
    if len(paths) > MESSAGE_PATHS:
        lines.append(f"... and {len(paths) - MESSAGE_PATHS} more")
    if moved_head:
        lines += ["", f"HEAD: {moved_head}"]
    return "\n".join(lines).rstrip("\n") + "\n"


def _lines(stderr: bytes) -> list[str]:
    return [w.strip() for w in stderr.decode("utf-8", "replace").splitlines() if w.strip()]


# -- branch mode -------------------------------------------------------------------------------------


# A rebase, merge, cherry-pick, revert or bisect the user has not finished.
_OPERATIONS = ("rebase-merge", "rebase-apply", "MERGE_HEAD", "CHERRY_PICK_HEAD", "REVERT_HEAD",
               "BISECT_LOG")


def _commit_on_branch(repo: Repo, layout: ws.Layout) -> str | None:
    """``git add -A`` + ``git commit`` on the user's branch, unless the user is mid-operation;
    the tree of HEAD before that commit, None when nothing was committed.

    Runs git in the workspace: branch mode is for trusted workspaces only (``config check`` says
    so). While a rebase or merge is in progress, or a git of the user's runs, nothing is
    committed on the branch; the snapshot that follows still records the work tree. What ``git
    add`` leaves out is reported by that snapshot, which meets the same paths: once, not twice.
    """
    assert layout.git_dir is not None
    git = for_workspace(layout.root, layout.git_dir, home=repo.home, identity=repo.identity)
    busy = _operation_in_progress(git, layout.git_dir)
    if busy:
        _log.info("snapshot.branch_deferred", operation=busy,
                  note="the user's git is in the middle of an operation: this snapshot is kept "
                       f"on {SNAPSHOT_REF} only, the branch and the index are left alone")
        return None
    if _git_running_in(layout.git_dir) and not _ends_within(layout.git_dir, _USER_GIT_ENDS):
        # Nothing retries a deferred branch commit until the next change: a git that is
        # ending (the commit whose own writes woke this snapshot) is given a moment first.
        _log.debug("snapshot.branch_deferred", operation="a git command of the user is running")
        return None
    lock = layout.git_dir / "index.lock"

    def attempt() -> str | None:
        for _ in range(3):
            remove_stale_lock(lock)
            _add_all(git, {}, report=False)
            base = git.out("rev-parse", "HEAD^{tree}") if git.rev("HEAD") else _empty_tree(git)
            raw = git.run("diff-index", "--cached", "-z", "--no-renames", base).stdout
            staged = [p.decode("utf-8", "surrogateescape") for p in raw.split(b"\0")[1::2]]
            if not staged:
                return None
            r = git.run("commit", "--quiet", "--no-verify", "--no-gpg-sign", "-m",
                        message(staged, None), check=False)
            if r.returncode == 0:
                return base
            said = r.stderr.decode("utf-8", "replace").strip()
            if said and "cannot lock ref" not in said:  # a held index.lock: retrying() waits
                raise GitError(f"git commit failed in {layout.root} (exit {r.returncode}): "
                               f"{'; '.join(said.splitlines()[:3])}")
            # "nothing to commit", or HEAD moved under our commit: the user's git changed the
            # index or the branch between our add and our commit. Look again.
        raise GitError(f"git commit in {layout.root} was overtaken three times in a row: another "
                       "git keeps changing the index or the branch; retrying later")

    return retrying(attempt)


def _operation_in_progress(git: Git, git_dir: Path) -> str | None:
    for name in _OPERATIONS:
        if (git_dir / name).exists():
            return name
    if git.run("ls-files", "--unmerged", "-z").stdout:
        return "unmerged paths"
    return None


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


_USER_GIT_ENDS = 1.0  # seconds a snapshot waits for a user's git that is running to end


def _ends_within(git_dir: Path, seconds: float) -> bool:
    """Whether every git of the user's in ``git_dir`` (:func:`_git_running_in`) has ended
    within ``seconds``: the one whose writes (a commit's ref, its index) woke this snapshot is
    usually exiting."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.05)
        if not _git_running_in(git_dir):
            return True
    return False


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
