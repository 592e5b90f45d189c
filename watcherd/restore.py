"""``watcherd restore``: bring the newest good generation into the workspace before the app starts.

Decisions, in order: the workspace already holds the stored history → nothing to do; a stored
generation → download, verify, build the whole state in a staging tree, move it into place; a bad
generation → the one before it, loudly; nothing stored → ``restore.on_missing``. A non-empty
workspace that is not this history is moved aside, never deleted.

A restore acts on no file it finds in the workspace except the tree it is replacing: its journal
(which staging tree is ours, where the old entries go, how far the move got) lives in watcherd's
state directory, and so do its downloads. Staging survives a crash: a tree built beside the
workspace is swapped into place in one step (``renameat2(RENAME_EXCHANGE)``); a tree built inside a
workspace that is a mount point (a Kubernetes ``emptyDir``) is recorded complete in the journal,
with the folder the old entries go to, before anything moves, so a rerun either discards an
incomplete one or finishes both moves. Every move inside a workspace goes through directory
descriptors watcherd opened itself, so a link planted there is never followed.

The restored repository is the user's: HEAD, index, branches, tags, the stash and the recorded
config come back as the snapshot recorded them, and the working tree is laid over them byte for
byte. watcherd's own repository in the state directory is seeded with the restored history, so
the daemon's next save moves the store forward from it.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import secrets
import shutil
import stat
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from watcherd import bundle as bundles
from watcherd import log, protocol, rollback, state
from watcherd import manifest as mf
from watcherd.config import Config
from watcherd.errors import (
    GitError,
    IntegrityError,
    RestoreError,
    StoreUnavailable,
    UsageError,
    WorkspaceError,
)
from watcherd.generations import Generations
from watcherd.git import Git, Identity, LocalIOError
from watcherd.repo import RAW_ATTRIBUTES, SNAPSHOT_REF, Repo, open_repo
from watcherd.workspace import printable

_log = log.get(__name__)
STAGING = ".watcherd-restore"
ASIDE = ".watcherd-aside"
JOURNAL = "restore.json"
_STORE_ATTEMPTS = 4
# Generated directories a new, empty workspace ignores from the start (in .git/info/exclude):
# an `npm install` in a fresh workspace must not put node_modules into every snapshot for good.
FRESH_EXCLUDES = ("node_modules/", ".next/", ".nuxt/", "dist/", "build/", ".cache/", ".venv/",
                  "__pycache__/", "*.pyc", ".turbo/", "coverage/", "*.log", ".DS_Store")


@dataclass(frozen=True)
class Outcome:
    """What restore did: ``skipped``, ``restored``, ``empty``, ``template``."""

    action: str
    generation: int | None = None
    moved_aside: Path | None = None
    detail: str = ""


@dataclass(frozen=True)
class Request:
    generation: int | None = None
    before: datetime | None = None
    force: bool = False  # restore even while a daemon watches the workspace
    checkpoint: str | None = None  # a checkpoint's name (time travel by label)
    fork: bool = False  # the generations read are another key's: this one starts its own line

    @property
    def explicit(self) -> bool:
        return self.generation is not None or self.before is not None or \
            self.checkpoint is not None


def restore(config: Config, generations: Generations, request: Request = Request(),
            source: Generations | None = None) -> Outcome:
    """Run the restore decision for ``config.workspace.path``; raise on failure.

    ``source``: another key's generations to fork from (``--from-key``): the workspace gets that
    key's state, and this key (which must hold nothing yet) starts its own line of history from
    it, never writing the source.
    """
    started = time.monotonic()
    ws = config.workspace.path
    _check_parent(ws)
    repo = open_repo(config)
    repo.ensure_dirs()
    _refuse_under_a_daemon(repo, ws, request)
    if source is not None:
        if generations.holds_anything():
            raise UsageError(f"store.key {generations.key} already holds generations: fork into "
                             "a new key, so neither line of history is mixed into the other")
        request = Request(request.generation, request.before, request.force, request.checkpoint,
                          fork=True)
    try:
        rollback.recover(repo)  # a rollback killed half-way is finished first, as it would be
        _recover(repo, ws)
        manifest = _read_manifest(source or generations)
        if manifest is None:
            why = "nothing stored for this key"
            if request.fork:
                raise RestoreError(f"{source.where(source.key)}: {why}; nothing to fork from")
            if request.explicit:
                raise RestoreError(f"{generations.where(generations.key)}: {why}; "
                                   "no generation to travel to")
            outcome = _on_missing(config, repo, generations, why)
        else:
            outcome = _restore_stored(config, repo, source or generations, manifest, request)
    except OSError as exc:
        # A read-only or full disk is the usual cause: one line that names it, not a traceback.
        raise RestoreError(f"workspace.path {ws}: restore could not write "
                           f"{exc.filename or ws}: {exc.strerror}") from None
    _log.info("restore.done", action=outcome.action, generation=outcome.generation,
              key=generations.key, workspace=str(ws),
              moved_aside=str(outcome.moved_aside) if outcome.moved_aside else None,
              duration_ms=round((time.monotonic() - started) * 1000, 1))
    return outcome


# -- deciding ----------------------------------------------------------------------------------------


def _refuse_under_a_daemon(repo: Repo, ws: Path, request: Request) -> None:
    """A restore must not move a tree a running daemon is saving (it would save the move, or
    race it). Refused with exit 2, naming the daemon, unless ``--force``."""
    other = repo.paired_elsewhere()
    if other is not None and not request.force:
        raise UsageError(f"workspace.state_dir {repo.dir} holds the history of another workspace "
                         f"({other}); give this restore its own state directory "
                         "(WATCHERD_WORKSPACE_STATE_DIR=...), or pass --force to take it over")
    holder = repo.daemon_running()
    if holder is None:
        return
    if request.force:
        _log.warning("restore.forced", workspace=str(ws), daemon_pid=holder,
                     note="restoring while a daemon watches the workspace (--force)")
        return
    raise UsageError(f"workspace.path {ws}: a running watcherd (pid {holder}) watches this "
                     "workspace; stop it first, or pass --force to restore under it")


def _read_manifest(generations: Generations) -> mf.Manifest | None:
    """The stored manifest; None only when the key holds no object at all.

    A manifest that exists but cannot be read (corrupt, too large, a newer format), or objects
    without a manifest, is not "nothing stored": :class:`RestoreError`, whatever
    ``restore.on_missing`` says, because starting empty would bury the stored work.
    """
    delay = 1.0
    for attempt in range(_STORE_ATTEMPTS):
        try:
            manifest, _ = generations.read_manifest()
            if manifest is None and generations.holds_anything():
                raise RestoreError(f"{generations.where(generations.key)} holds objects but no "
                                   "manifest.json: it is not empty, so restore will not start "
                                   "from nothing; see docs/operations.md, 'Restore failed'")
            return manifest
        except StoreUnavailable as exc:
            if attempt == _STORE_ATTEMPTS - 1:
                raise RestoreError(f"store unreachable after {_STORE_ATTEMPTS} attempts: {exc}") from None
            _log.warning("restore.store_retry", attempt=attempt + 1, error=str(exc), wait_s=delay)
            time.sleep(delay)
            delay *= 2
        except IntegrityError as exc:
            _log.error("restore.manifest_bad", key=generations.key, error=str(exc))
            raise RestoreError(f"cannot restore: {exc}") from None
    raise AssertionError("unreachable")


def _candidates(manifest: mf.Manifest, request: Request) -> list[mf.Generation]:
    gens = list(manifest.generations)
    if request.checkpoint is not None:
        return [manifest.labelled(request.checkpoint)]
    if request.generation is not None:
        chosen = manifest.find(request.generation)
        if chosen is None:
            have = ", ".join(str(g.generation) for g in gens)
            raise UsageError(f"--generation {request.generation}: not in the store (kept: {have})")
        return [chosen]
    if request.before is not None:
        older = [g for g in gens if mf.parse_time(g.created_at) < request.before]
        if not older:
            raise UsageError(f"--before {request.before.isoformat()}: no generation is that old "
                             f"(oldest kept: {gens[-1].created_at})")
        return older
    return gens


def _restore_stored(config: Config, repo: Repo, generations: Generations, manifest: mf.Manifest,
                    request: Request) -> Outcome:
    ws = config.workspace.path
    candidates = _candidates(manifest, request)
    if not request.fork and _already_holds(repo, ws, candidates[0], exact=request.explicit):
        return Outcome("skipped", candidates[0].generation,
                       detail="the workspace already holds this history")
    if config.restore.on_conflict == "fail" and ws.is_dir() and any(ws.iterdir()):
        raise RestoreError(f"workspace.path {ws} holds something that is not the history stored at "
                           f"{generations.where(generations.key)}, and restore.on_conflict = "
                           '"fail": nothing was moved. Move it away, or set restore.on_conflict = '
                           '"move-aside"')
    failures: list[tuple[int, str]] = []
    with tempfile.TemporaryDirectory(prefix="download-", dir=repo.dir) as tmp:
        downloaded: dict[str, Path] = {}  # a chain shared by several candidates is fetched once
        for gen in candidates:
            try:
                paths = generations.fetch(gen, Path(tmp), downloaded)
                aside = _install(repo, ws, lambda staging, p=paths, g=gen:
                                 _build_and_seed(repo, config, staging, p, g))
            except LocalIOError as exc:
                # The disk here, not the generation: an older one would be no better, and
                # restoring it would pass off old work as the newest.
                raise RestoreError(f"restore failed on the local disk, not because of the stored "
                                   f"data: {exc}") from None
            except IntegrityError as exc:
                failures.append((gen.generation, str(exc)))
                _log.error("restore.generation_bad", key=generations.key,
                           generation=gen.generation, error=str(exc),
                           next="trying the generation before it" if gen is not candidates[-1]
                           else "no older generation left")
                continue
            if request.fork:
                repo.record_fork(mf.Fork(generations.key, gen.generation, gen.snapshot))
                _log.info("restore.forked", source_key=generations.key, generation=gen.generation,
                          note="this key's history starts here as its own line")
                return Outcome("forked", gen.generation, aside)
            repo.record_stored(gen.generation, gen.snapshot)
            if gen is not candidates[0]:
                _log.warning("restore.fell_back", key=generations.key, generation=gen.generation,
                             newest=candidates[0].generation,
                             failures=[_failure(n, e) for n, e in failures])
                if not request.explicit:
                    _record_bad(repo, generations, manifest, failures)
            else:
                repo.clear_bad_generations()
            return Outcome("restored", gen.generation, aside)
    said = "; ".join(_failure(n, e) for n, e in failures)
    if request.explicit:
        raise RestoreError("the requested generation is corrupt: " + said)
    # Nothing good is left: restore.on_missing decides (fail: exit 1). The record lets the next
    # save supersede the corrupt generations instead of being refused for ever.
    _record_bad(repo, generations, manifest, failures)
    return _on_missing(config, repo, generations, "every stored generation is corrupt: " + said)


def _failure(generation: int, error: str) -> str:
    """``error`` as said about ``generation``, which most errors name already."""
    prefix = f"generation {generation}"
    return error if error.startswith(prefix + " ") or error.startswith(prefix + ":") \
        else f"{prefix}: {error}"


def _record_bad(repo: Repo, generations: Generations, manifest: mf.Manifest,
                failures: list[tuple[int, str]]) -> None:
    """Remember which generations this restore found corrupt: the daemon's next save may then
    supersede them (its history holds the newest good one), instead of being refused for ever."""
    bad = protocol.BadGenerations(frozenset(n for n, _ in failures), manifest.current.generation,
                                  tuple((n, e[:300]) for n, e in failures))
    repo.record_bad_generations(bad)
    _log.warning("restore.recorded_bad", key=generations.key, generations=sorted(bad.generations),
                 note="the next save supersedes them with a history that holds the newest good "
                      "generation")


def _already_holds(repo: Repo, ws: Path, gen: mf.Generation, *, exact: bool) -> bool:
    """Whether the workspace is this history already: watcherd's record of it (in the state
    directory, which only watcherd writes) is paired with this workspace directory and holds the
    stored snapshot. Nothing the workspace itself says counts."""
    if not ws.is_dir() or not any(ws.iterdir()) or not repo.paired_with(ws):
        return False
    local = repo.snapshot_head()
    if local is None:
        return False
    if exact:
        return local == gen.snapshot
    return repo.bare.has_commit(gen.snapshot) and repo.bare.is_ancestor(gen.snapshot, local)


def _on_missing(config: Config, repo: Repo, generations: Generations, why: str) -> Outcome:
    ws = config.workspace.path
    policy = config.restore.on_missing
    if policy == "fail":
        raise RestoreError(f"{why} ({generations.where(generations.key)}) and "
                           'restore.on_missing = "fail"')
    _log.warning("restore.nothing_to_restore", key=generations.key, reason=why, on_missing=policy)
    if ws.is_dir() and any(ws.iterdir()):
        if not os.path.lexists(ws / ".git"):
            _init(ws, repo)
        return Outcome(policy, detail="kept the workspace as it is (not empty)")
    if policy == "empty":
        ws.mkdir(exist_ok=True)
        _init(ws, repo)
        repo.unpair()  # a new workspace: the daemon starts its history
        return Outcome("empty")
    def clone(staging: Path) -> None:
        _clone_template(staging, config.restore.template_url, repo)
        if repo.snapshot_head() is not None:
            repo.forget_history("the workspace was cloned from restore.template_url", expected=True)

    _install(repo, ws, clone)
    return Outcome("template", detail=config.restore.template_url)


def _init(ws: Path, repo: Repo) -> None:
    """An empty repository in ``ws``, ignoring the usual generated directories from the start."""
    git = Git(ws / ".git", home=repo.home, work_tree=ws)
    git.run("init", "--quiet", str(ws))
    exclude = ws / ".git" / "info" / "exclude"
    exclude.parent.mkdir(exist_ok=True)
    with open(exclude, "a") as f:
        f.write("# Generated files, ignored from the start by watcherd (edit freely):\n")
        f.writelines(f"{p}\n" for p in FRESH_EXCLUDES)


# -- building ----------------------------------------------------------------------------------------


def build_tree(staging: Path, chain: list[Path], gen: mf.Generation, config: Config, *,
               home: Path, alongside: Callable[[], None] | None = None) -> int:
    """A repository and work tree in ``staging`` equal to what ``gen`` recorded; its file count.

    ``chain`` is the generation's bundles, base first (checked against the manifest already):
    each is fetched in turn, so the staging repository's own ``index-pack`` and connectivity
    check are the proof that the chain restores. ``home`` is a directory of watcherd's for git's
    HOME (never one inside the tree being built). A chain that does not fetch or check out is as
    bad as a corrupt one; a full or broken local disk is a :class:`LocalIOError`, not a reason to
    try an older generation.

    ``alongside``, when given, runs in a thread from the moment the staging repository holds
    every object until the tree is built (a restore copies the packs into watcherd's repository
    meanwhile); what it raises is raised here.
    """
    try:
        return _build(staging, chain, gen, config, home, alongside)
    except LocalIOError:
        raise
    except GitError as exc:
        raise IntegrityError(f"generation {gen.generation} does not restore: {exc}") from None


def _build(staging: Path, chain: list[Path], gen: mf.Generation, config: Config,
           home: Path, alongside: Callable[[], None] | None) -> int:
    ident = Identity(config.workspace.author_name, config.workspace.author_email)
    git = Git(staging / ".git", home=home, work_tree=staging, identity=ident)
    git.run("init", "--quiet", "--template=",
            f"--object-format={bundles.object_format(chain[0])}", str(staging))
    for link, path in zip(gen.links, chain):
        # The fetch reads and checks every object, and refuses an increment whose prerequisites
        # (the links before it) are missing, in the words `git bundle verify` would use.
        try:
            bundles.fetch_bundle(git, path, refspec="+refs/*:refs/*")
        except LocalIOError:
            raise
        except GitError as exc:
            raise IntegrityError(f"generation {gen.generation}: bundle {link.bundle} does not "
                                 f"restore: {exc}") from None
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="restore") as pool:
        beside = pool.submit(alongside) if alongside is not None else None
        files = _lay_out(git, staging, gen, pool)
        if beside is not None:
            beside.result()
    return files


def _lay_out(git: Git, staging: Path, gen: mf.Generation, pool: ThreadPoolExecutor) -> int:
    """Refs, HEAD, config, stash, index and work tree of the fetched generation; the file count.

    The work tree and then the index are written (in ``pool``) while the recorded state is read
    and applied: they touch different files of the staging repository (the checkout reads
    objects and ``info/attributes`` and writes the index; the state writes refs, HEAD, the config
    and the stash's log), and the index waits only for the state to say what was staged. A
    snapshot missing from the bundles fails both; the state's reading says so plainly, so its
    error is the one raised.
    """
    laid = git.git_dir / "watcherd-laid-index"
    (staging / ".git" / "info").mkdir(exist_ok=True)
    attributes = staging / ".git" / "info" / "attributes"
    attributes.write_text(RAW_ATTRIBUTES)  # lay the recorded bytes exactly; removed below
    staged: Future[tuple[str, str | None]] = Future()
    work = pool.submit(_lay_work_tree, git, gen, laid, staged)
    try:
        try:
            found = state.load(git, gen.snapshot)
        except GitError:
            raise IntegrityError(f"generation {gen.generation}: the bundles do not hold the "
                                 f"snapshot {gen.snapshot[:12]} its manifest names") from None
        if found.recorded is not None:
            rec = found.recorded
            staged.set_result((found.tree,
                               rec.index_tree if rec.index_tree is not None else rec.head.oid))
            state.apply_refs(git, rec)
        else:
            staged.set_result((found.tree, _apply_legacy(git, gen)))
        files = work.result()
    except BaseException:
        staged.cancel()
        raise
    finally:
        wait([work])
        attributes.unlink(missing_ok=True)
    return files + _lay_out_nested(git, staging, found.nested, gen)


def _lay_out_nested(source: Git, root: Path, nested: dict[str, str], gen: mf.Generation,
                    depth: int = 0) -> int:
    """Give back each nested repository ``nested`` names (its path in work tree ``root``: its
    snapshot) by the same rules as the workspace's: a repository of its own in
    ``<path>/.git`` holding its history (copied from ``source``, the staging repository that
    fetched the generation, checked as a fetch checks it),
    refs, HEAD, config, stash, index and work tree; then those nested in it. The file count.

    The snapshot's tree holds a gitlink at each path, which the checkout laid as an empty
    directory. What the store returned is untrusted: a path that is no such directory, or a
    snapshot the bundles do not hold whole, fails the generation."""
    files = 0
    for path, snap in sorted(nested.items()):
        where = f"generation {gen.generation}: nested repository {printable(path)}"
        target = root / path
        if os.path.realpath(target) != os.path.join(os.path.realpath(root), path) or \
                not target.is_dir() or \
                any(target.iterdir()):
            raise IntegrityError(f"{where} is not an empty directory of the snapshot's tree")
        try:
            found = state.load(source, snap)
        except GitError:
            raise IntegrityError(f"{where}: the bundles do not hold its snapshot "
                                 f"{snap[:12]}") from None
        git = Git(target / ".git", home=source.home, work_tree=target, identity=source.identity)
        git.run("init", "--quiet", "--template=", f"--object-format={source.object_format()}",
                str(target))
        # Its history (the state commit's parents), its index and tags, and the work tree's
        # objects: not the snapshot history, which is watcherd's.
        roots = {found.tree: "tree"} | ({found.state_commit: "commit"}
                                         if found.state_commit else {})
        if state.copy_objects(source, git, roots, None, git.git_dir):
            raise IntegrityError(f"{where}: the bundles do not hold its objects whole")
        (git.git_dir / "info").mkdir(exist_ok=True)
        attributes = git.git_dir / "info" / "attributes"
        attributes.write_text(RAW_ATTRIBUTES)
        laid = git.git_dir / "watcherd-laid-index"
        try:
            git.run("read-tree", "--reset", "-u", found.tree, env={"GIT_INDEX_FILE": str(laid)})
            files += _index_entries(laid)
            rec = found.recorded
            if rec is not None:
                state.apply_refs(git, rec)
            _stage(git, laid, found.tree, None if rec is None else
                   rec.index_tree if rec.index_tree is not None else rec.head.oid)
        finally:
            attributes.unlink(missing_ok=True)
        if found.nested:
            if depth + 1 >= state.MAX_NESTED_DEPTH:
                raise IntegrityError(f"{where}: nested more than {state.MAX_NESTED_DEPTH} deep")
            files += _lay_out_nested(source, target, found.nested, gen, depth + 1)
    return files


def _lay_work_tree(git: Git, gen: mf.Generation, laid: Path,
                   staged: Future[tuple[str, str | None]]) -> int:
    """The work tree (:func:`_checkout`), then the index (:func:`_stage`) once ``staged`` says
    what it holds (the snapshot's tree, what was staged); the file count."""
    files = _checkout(git, gen, laid)
    # What is staged (the real index) and the work tree (the snapshot) as they were: files the
    # snapshot has that the index lacks come back untracked, files the index has that the
    # snapshot lacks come back deleted.
    _stage(git, laid, *staged.result())
    return files


def _apply_legacy(git: Git, gen: mf.Generation) -> str | None:
    """A generation written before state commits: the bundle's refs are the user's. What the
    index holds: HEAD's commit, when there is one."""
    git.run("update-ref", "-d", SNAPSHOT_REF, check=False)
    if gen.head_ref and git.rev(gen.head_ref):
        git.run("symbolic-ref", "HEAD", gen.head_ref)
    elif gen.head:
        git.run("update-ref", "--no-deref", "HEAD", gen.head)
    elif gen.head_ref:
        git.run("symbolic-ref", "HEAD", gen.head_ref)  # a branch with no commit yet, as saved
    return git.rev("HEAD")


def _checkout(git: Git, gen: mf.Generation, laid: Path) -> int:
    """Write the tree of ``gen``'s snapshot into the (empty) work tree, each file once,
    recording it in the index file ``laid`` (which must not exist yet); the file count.

    A one-way merge into an index that does not exist yet, as a clone's checkout is: git records
    each file's stat data as it writes it, and an index read from no file has no racily clean
    entries, so no file is read back (`checkout-index -u` from an index just written, then
    `update-index --refresh`, read every file again: 0.35 s of 1.8 s at 50,000 files). The
    snapshot (a commit id from the manifest) is given as it is: read-tree peels it to its tree.
    """
    git.run("read-tree", "--reset", "-u", gen.snapshot, env={"GIT_INDEX_FILE": str(laid)})
    return _index_entries(laid)


def _stage(git: Git, laid: Path, tree: str, staged: str | None) -> None:
    """Make the real index hold ``staged`` (a tree-ish; None: no index), with the stat data of
    every entry whose file :func:`_checkout` laid as it is staged (from ``laid``), so
    ``git status`` sees exactly the recorded differences without reading any file again.

    When the index differs from the work tree, a one-way merge of ``staged`` over the laid index
    keeps the stat data of the entries that match and drops the others (git-read-tree(1), "-m"
    with one tree). That index is given modification time 0 first: git would otherwise take
    every file written in the same second as racily clean and hash it again before writing the
    new index. Nothing but this restore writes the staging tree, so no file can have changed
    since git recorded its stat data.
    """
    if staged is None:
        laid.unlink()
        return
    index = git.git_dir / "index"
    os.replace(laid, index)
    if staged != tree:
        os.utime(index, (0, 0))
        git.run("read-tree", "-m", staged)


def _index_entries(path: Path) -> int:
    """The entry count of an index file git just wrote (its header: signature, version, count)."""
    with open(path, "rb") as f:
        header = f.read(12)
    if len(header) != 12 or header[:4] != b"DIRC":
        raise GitError(f"{path} is not an index file")
    return int.from_bytes(header[8:12], "big")


def _build_and_seed(repo: Repo, config: Config, staging: Path, chain: list[Path],
                    gen: mf.Generation) -> None:
    """Build ``gen`` in ``staging`` and give watcherd's repository its history."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="seed") as pool:
        seed = _Seed(repo, staging, bundles.object_format(chain[0]), pool)
        try:
            build_tree(staging, chain, gen, config, home=repo.home, alongside=seed.copy)
        except BaseException:
            seed.discard()
            raise
    seed.commit(gen)


class _Seed:
    """Give watcherd's repository the restored history (the daemon's next save moves the store
    forward from it). The pairing follows once the tree is in place.

    The repository is created (in ``pool``) while the staging repository fetches the chain.
    The staging repository checks every object it fetches: its pack files are then copied as
    they are, instead of reading the bundles a second time, while the tree is laid out
    (:meth:`copy`, run beside the build). The snapshot ref moves only once the tree is built
    (:meth:`commit`); a build that fails takes the copied packs back (:meth:`discard`).

    Copied, never hard-linked: the staging repository becomes the workspace's, which the agent
    writes, and a pack file shared with watcherd's repository could then be rewritten in place.
    """

    def __init__(self, repo: Repo, staging: Path, object_format: str,
                 pool: ThreadPoolExecutor) -> None:
        self.repo = repo
        self.packs = staging / ".git" / "objects" / "pack"
        self.copied: list[Path] = []
        # A repository created now holds no history (spares asking git in commit()).
        self.fresh = not (repo.git_dir / "HEAD").exists()
        self.created = pool.submit(repo.ensure, object_format)

    def copy(self) -> None:
        try:
            self.created.result()
        except GitError as exc:
            # The state directory, not the generation: never a reason to try an older one.
            raise LocalIOError(f"cannot create watcherd's repository in {self.repo.dir}: "
                               f"{exc}") from None
        dest = self.repo.git_dir / "objects" / "pack"
        for path in sorted(self.packs.glob("pack-*"), key=lambda p: p.suffix == ".idx"):
            # .idx last: git sees a pack once its index is there.
            if path.suffix in (".pack", ".idx", ".rev") and not (dest / path.name).exists():
                tmp = dest / f".tmp-{path.name}"
                try:
                    shutil.copyfile(path, tmp)
                    os.replace(tmp, dest / path.name)
                finally:
                    tmp.unlink(missing_ok=True)
                self.copied.append(dest / path.name)

    def commit(self, gen: mf.Generation) -> None:
        # Under the repository's lock, which also clears a ref lock a killed restore left.
        with self.repo.lock():
            old = None if self.fresh else self.repo.snapshot_head()
            if old is not None and not self.repo.bare.is_ancestor(old, gen.snapshot):
                # The restored generation does not continue this history: keep it aside.
                self.repo.forget_history("the workspace was restored from the store",
                                         expected=True)
                old = None
            self.repo.move_snapshot_head(gen.snapshot, old, "watcherd restore")
            # The private index described the tree that was there; the next snapshot re-reads.
            # So did the nested repositories' (their histories start again from this one's).
            self.repo.index.unlink(missing_ok=True)
            shutil.rmtree(self.repo.dir / "nested", ignore_errors=True)

    def discard(self) -> None:
        for path in self.copied:
            path.unlink(missing_ok=True)
        self.copied.clear()


def _clone_template(staging: Path, url: str, repo: Repo) -> None:
    staging.rmdir()  # git clone wants to create it
    git = Git(staging / ".git", home=repo.home)
    try:
        git.run(*bundles.transport_options(url), "clone", "--quiet", "--template=",
                "--no-recurse-submodules", "--", url, str(staging), timeout=600)
    except Exception as exc:
        raise RestoreError(f"restore.template_url {url}: clone failed: {exc}") from None


# -- placing -----------------------------------------------------------------------------------------


def _install(repo: Repo, ws: Path, build) -> Path | None:
    """Build a tree with ``build(staging)`` and put it at ``ws``; returns where the old one went.

    The new tree is complete before anything of the old one moves, so a failed build leaves the
    workspace untouched. Every step is in the journal first.
    """
    if ws.exists() and not ws.is_dir():
        raise WorkspaceError(f"workspace.path {ws} exists and is not a directory")
    mount = ws.is_dir() and _is_mount_point(ws)
    token = secrets.token_hex(4)
    staging = ws / f"{STAGING}-{token}" if mount else \
        ws.parent / f".{ws.name}{STAGING}-{token}"
    journal = {"workspace": str(ws), "mount": mount, "staging": str(staging), "phase": "building"}
    _journal(repo, journal)
    # Whatever the state directory recorded belongs to the tree being replaced.
    repo.unpair()
    os.mkdir(staging, 0o700)
    journal["staging_id"] = _identity(staging)
    _journal(repo, journal)
    mode = ws.stat().st_mode & 0o7777 if ws.is_dir() else 0o755
    try:
        build(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        _journal(repo, None)
        raise
    _log.debug("restore.placing", workspace=str(ws), staging=str(staging), mount=mount)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    if mount:
        occupied = [e for e in os.listdir(ws) if e != staging.name]
        journal.update(phase="ready", aside=str(_free_name(ws / f"{ASIDE}-{stamp}"))
                       if occupied else None)
        _journal(repo, journal)
        aside = _finish_mount(repo, journal)
    else:
        staging.chmod(mode)
        if not ws.is_dir() or not any(ws.iterdir()):
            journal["phase"] = "placing"
            _journal(repo, journal)
            os.rename(staging, ws)  # replaces an empty directory in the same step
            aside = None
        else:
            aside = _free_name(ws.with_name(f"{ws.name}.watcherd-{stamp}"))
            journal.update(phase="swapping", aside=str(aside))
            _journal(repo, journal)
            if _exchange(staging, ws):
                os.rename(staging, aside)  # the old workspace, now at the staging path
            else:  # no renameat2 here: for a moment there is no workspace; a rerun restores again
                os.rename(ws, aside)
                os.rename(staging, ws)
            _log.warning("restore.moved_aside", workspace=str(ws), moved_to=str(aside),
                         reason="the workspace held something that is not the stored history")
    # Paired before the journal goes: a kill between the two leaves the journal, and the rerun
    # pairs. The other way round, the rerun found neither and took the restored tree for foreign.
    repo.pair()
    _journal(repo, None)
    return aside


def _finish_mount(repo: Repo, journal: dict) -> Path | None:
    """Put a complete staged tree in place in a workspace that is a mount point (idempotent,
    resumes after a crash): first the old entries into the aside folder the journal names, then,
    once the journal says so, the staged entries up into the workspace, ``.git`` last."""
    ws, staging = Path(journal["workspace"]), Path(journal["staging"])
    aside = Path(journal["aside"]) if journal.get("aside") else None
    ws_fd = os.open(ws, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if journal["phase"] == "ready":
            if aside is not None:
                if "aside_id" not in journal:
                    if os.path.lexists(aside):  # planted meanwhile: not ours, pick another name
                        aside = _free_name(aside)
                        journal["aside"] = str(aside)
                    os.mkdir(aside.name, 0o700, dir_fd=ws_fd)
                    journal["aside_id"] = _identity(aside)
                    _journal(repo, journal)
                aside_fd = _open_ours(aside, journal["aside_id"])
                try:
                    for name in os.listdir(ws_fd):
                        if name not in (staging.name, aside.name):
                            os.rename(name, name, src_dir_fd=ws_fd, dst_dir_fd=aside_fd)
                finally:
                    os.close(aside_fd)
                _log.warning("restore.moved_aside", workspace=str(ws), moved_to=str(aside),
                             reason="the workspace held something that is not the stored history")
            journal["phase"] = "moving"
            _journal(repo, journal)
        staging_fd = _open_ours(staging, journal["staging_id"])
        try:
            if aside is not None:  # ignored by the restored repository: no snapshot takes it in
                exclude = staging / ".git" / "info" / "exclude"
                if exclude.parent.is_dir() and not exclude.is_symlink():
                    with open(exclude, "a") as f:
                        f.write(f"/{aside.name}/\n")
            names = sorted(os.listdir(staging_fd), key=lambda n: n == ".git")
            for name in names:  # .git last: until then the tree is not a repository
                os.rename(name, name, src_dir_fd=staging_fd, dst_dir_fd=ws_fd)
        finally:
            os.close(staging_fd)
        os.rmdir(staging.name, dir_fd=ws_fd)
    finally:
        os.close(ws_fd)
    return aside


def _recover(repo: Repo, ws: Path) -> None:
    """Finish or discard what a killed restore left behind, as its journal says. Nothing found in
    the workspace is acted on without the journal naming it (and its identity matching)."""
    journal = _read_journal(repo)
    for leftover in repo.dir.glob("download-*"):  # downloads of a killed restore
        shutil.rmtree(leftover, ignore_errors=True)
    if journal is None:
        return
    if journal.get("workspace") != str(ws):
        _journal(repo, None)
        return
    staging = Path(journal["staging"])
    ours = "staging_id" in journal and os.path.lexists(staging) and \
        _identity(staging) == journal["staging_id"]
    phase = journal.get("phase")
    placed = ws.is_dir() and "staging_id" in journal and _identity(ws) == journal["staging_id"]
    if placed:
        # The new tree is the workspace already; killed before the old one got its aside name
        # (it is still at the staging path), or just before the journal was cleared.
        if journal.get("aside") and os.path.isdir(staging) and not os.path.islink(staging):
            aside = _free_name(Path(journal["aside"]))
            os.rename(staging, aside)
            _log.warning("restore.resumed", workspace=str(ws), moved_to=str(aside),
                         note="gave the previous workspace its aside name")
        repo.pair()
    elif phase == "moving" and journal.get("mount") and not os.path.lexists(staging) and \
            os.path.isdir(ws / ".git") and not os.path.islink(ws / ".git"):
        # Killed after the last entry (.git) moved up and the emptied staging directory was
        # removed, before the pairing: the tree is in place.
        repo.pair()
    elif phase in ("ready", "moving") and journal.get("mount") and ours:
        _log.warning("restore.resumed", workspace=str(ws), note="finishing an interrupted restore")
        _finish_mount(repo, journal)
        repo.pair()
    elif not os.path.lexists(ws) and ours and phase in ("placing", "swapping"):
        os.rename(staging, ws)  # killed between the two renames of a restore without renameat2
        _log.warning("restore.resumed", workspace=str(ws), note="finished moving into place")
        repo.pair()
    elif ours:
        shutil.rmtree(staging, ignore_errors=True)  # never got as far as moving anything
    elif "staging_id" not in journal:
        # Killed between making the staging directory and recording it: nothing was built in it
        # yet. rmdir removes only an empty directory (never a link, never anything in one).
        try:
            os.rmdir(staging)
        except OSError:
            pass
    _journal(repo, None)


def _journal(repo: Repo, doc: dict | None) -> None:
    repo.write_journal(JOURNAL, doc)


def _read_journal(repo: Repo) -> dict | None:
    doc = repo.read_journal(JOURNAL)
    return doc if doc is not None and isinstance(doc.get("staging"), str) else None


def _identity(path: Path) -> list[int]:
    st = os.lstat(path)
    return [st.st_dev, st.st_ino]


def _open_ours(path: Path, identity: list[int]) -> int:
    """A descriptor of directory ``path``, if it is still the one watcherd made (no link
    followed); else :class:`RestoreError`."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    st = os.fstat(fd)
    if [st.st_dev, st.st_ino] != list(identity) or not stat.S_ISDIR(st.st_mode):
        os.close(fd)
        raise RestoreError(f"{path} is not the directory this restore made; not touching it")
    return fd


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one step (``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _free_name(path: Path) -> Path:
    n = 1
    candidate = path
    while os.path.lexists(candidate):
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate


def _is_mount_point(path: Path) -> bool:
    """Whether ``path`` is a mount point, bind mounts included.

    ``os.path.ismount`` compares devices with the parent, so it misses a bind mount of a directory
    onto itself — which is what systemd's ``ReadWritePaths=/app`` makes, under a read-only ``/``
    where nothing can be staged beside the workspace. The kernel's mount table knows better.
    """
    if os.path.ismount(path):
        return True
    target = os.path.realpath(path)
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            return any(_unescape(line.split(" ")[4]) == target for line in f)
    except OSError:
        return False


def _unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash in paths as octal escapes (\040).
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _check_parent(ws: Path) -> None:
    if not ws.parent.is_dir():
        raise WorkspaceError(f"workspace.path {ws}: the parent directory {ws.parent} does not exist")
    if ws.exists() and not ws.is_dir():
        raise WorkspaceError(f"workspace.path {ws} exists and is not a directory")
