"""``watcherd restore``: bring the newest good generation into the workspace before the app starts.

Decisions, in order: the workspace already holds the stored history → nothing to do; a stored
generation → download, verify, build the work tree in a staging directory, move it into place;
a bad generation → the one before it, loudly; nothing stored → ``restore.on_missing``. A non-empty
workspace that is not this history is moved aside, never deleted.

Staging survives a crash: a tree built beside the workspace is renamed into place in one step (an
occupied workspace is swapped with it in one step, and a note in the new tree says where the old one
is until it has its aside name); a tree built inside a workspace that is a mount point (a Kubernetes
``emptyDir``) is marked complete, with the folder the old entries go to, before anything moves, so a
rerun either discards an incomplete one or finishes both moves.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from watcherd import bundle as bundles
from watcherd import log
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
from watcherd.git import Git, Identity
from watcherd.snapshot import snapshot_head

_log = log.get(__name__)
STAGING = ".watcherd-restore"
DOWNLOAD = ".watcherd-download"
_READY = "READY"  # in a staged tree: complete; names the aside folder for the old entries
_MOVING = "MOVING"  # in a staged tree: the old entries are aside, the new ones are moving up
_SWAPPED = "SWAPPED"  # in a workspace swapped into place: where the old one is, and its aside name
_STORE_ATTEMPTS = 4


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

    @property
    def explicit(self) -> bool:
        return self.generation is not None or self.before is not None


def restore(config: Config, generations: Generations, request: Request = Request()) -> Outcome:
    """Run the restore decision for ``config.workspace.path``; raise on failure."""
    started = time.monotonic()
    ws = config.workspace.path
    _check_parent(ws)
    try:
        _recover_staging(ws)
        manifest, why = _read_manifest(generations)
        if manifest is None:
            if request.explicit:
                raise RestoreError(f"{generations.where(generations.key)}: {why}; "
                                   "no generation to travel to")
            outcome = _on_missing(config, generations, why)
        else:
            outcome = _restore_stored(config, generations, manifest, request)
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


def _read_manifest(generations: Generations) -> tuple[mf.Manifest | None, str]:
    """The stored manifest (None when there is none or it is unreadable) and why it is None."""
    delay = 1.0
    for attempt in range(_STORE_ATTEMPTS):
        try:
            manifest, _ = generations.read_manifest()
            return manifest, "nothing stored for this key"
        except StoreUnavailable as exc:
            if attempt == _STORE_ATTEMPTS - 1:
                raise RestoreError(f"store unreachable after {_STORE_ATTEMPTS} attempts: {exc}") from None
            _log.warning("restore.store_retry", attempt=attempt + 1, error=str(exc), wait_s=delay)
            time.sleep(delay)
            delay *= 2
        except IntegrityError as exc:
            # Unreadable is treated like "every generation is corrupt": on_missing decides.
            _log.error("restore.manifest_bad", key=generations.key, error=str(exc))
            return None, f"the manifest is unreadable: {exc}"
    raise AssertionError("unreachable")


def _candidates(manifest: mf.Manifest, request: Request) -> list[mf.Generation]:
    gens = list(manifest.generations)
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


def _restore_stored(config: Config, generations: Generations, manifest: mf.Manifest,
                    request: Request) -> Outcome:
    ws = config.workspace.path
    candidates = _candidates(manifest, request)
    if _already_holds(ws, config.workspace.mode, candidates[0], exact=request.explicit):
        return Outcome("skipped", candidates[0].generation,
                       detail="the workspace already holds this history")
    if config.restore.on_conflict == "fail" and ws.is_dir() and _entries(ws):
        raise RestoreError(f"workspace.path {ws} holds something that is not the history stored at "
                           f"{generations.where(generations.key)}, and restore.on_conflict = "
                           '"fail": nothing was moved. Move it away, or set restore.on_conflict = '
                           '"move-aside"')
    failures = []
    for gen in candidates:
        scratch = _scratch_dir(ws)
        prefix = f"{DOWNLOAD}-" if scratch == ws else f".{ws.name}{DOWNLOAD}-"
        with tempfile.TemporaryDirectory(prefix=prefix, dir=scratch) as tmp:
            try:
                path = generations.fetch(gen, Path(tmp))
                bundles.prove(path, Path(tmp))
                aside = _install(ws, lambda staging, p=path, g=gen: build_tree(staging, p, g, config))
            except IntegrityError as exc:
                failures.append(f"generation {gen.generation}: {exc}")
                _log.error("restore.generation_bad", key=generations.key,
                           generation=gen.generation, error=str(exc),
                           next="trying the generation before it" if gen is not candidates[-1]
                           else "no older generation left")
                continue
        if gen is not candidates[0]:
            _log.warning("restore.fell_back", key=generations.key, generation=gen.generation,
                         newest=candidates[0].generation, failures=failures)
        return Outcome("restored", gen.generation, aside)
    if request.explicit:
        raise RestoreError("the requested generation is corrupt: " + "; ".join(failures))
    return _on_missing(config, generations, "every stored generation is corrupt: " + "; ".join(failures))


def _already_holds(ws: Path, mode: str, gen: mf.Generation, *, exact: bool) -> bool:
    if not ws.is_dir():
        return False
    git = Git(ws)
    if not git.is_repo():
        return False
    local = snapshot_head(git, mode)
    if local is None:
        return False
    if exact:
        return local == gen.snapshot
    return git.has_commit(gen.snapshot) and git.is_ancestor(gen.snapshot, local)


def _on_missing(config: Config, generations: Generations, why: str) -> Outcome:
    ws = config.workspace.path
    policy = config.restore.on_missing
    if policy == "fail":
        raise RestoreError(f"{why} ({generations.where(generations.key)}) and "
                           'restore.on_missing = "fail"')
    _log.warning("restore.nothing_to_restore", key=generations.key, reason=why, on_missing=policy)
    if ws.is_dir() and _entries(ws):
        git = Git(ws)
        if not git.is_repo():
            git.run("init", "--quiet")
        return Outcome(policy, detail="kept the workspace as it is (not empty)")
    if policy == "empty":
        ws.mkdir(exist_ok=True)
        Git(ws).run("init", "--quiet")
        return Outcome("empty")
    _install(ws, lambda staging: _clone_template(staging, config.restore.template_url))
    return Outcome("template", detail=config.restore.template_url)


# -- building ----------------------------------------------------------------------------------------


def build_tree(staging: Path, bundle: Path, gen: mf.Generation, config: Config) -> int:
    """A work tree in ``staging`` equal to what ``gen`` recorded; returns its file count.

    A bundle that fetched but cannot be checked out is as bad as a corrupt one.
    """
    try:
        return _build(staging, bundle, gen, config)
    except GitError as exc:
        raise IntegrityError(f"generation {gen.generation} does not check out: {exc}") from None


def _build(staging: Path, bundle: Path, gen: mf.Generation, config: Config) -> int:
    git = Git(staging, identity=Identity(config.workspace.author_name, config.workspace.author_email))
    git.run("init", "--quiet", f"--object-format={bundles.object_format(bundle)}")
    # Refs come across as they were (branches, tags, the snapshot history); a bundle carries no
    # config or hooks, and hooks are off for every git call of ours anyway.
    git.run("fetch", "--quiet", "--no-tags", "--update-head-ok", str(bundle), "refs/*:refs/*")
    if gen.head_ref and git.rev(gen.head_ref):
        git.run("symbolic-ref", "HEAD", gen.head_ref)
    elif gen.head:
        git.run("update-ref", "--no-deref", "HEAD", gen.head)
    elif gen.head_ref:
        git.run("symbolic-ref", "HEAD", gen.head_ref)  # a branch with no commit yet, as saved
    if git.rev("HEAD"):
        git.run("reset", "--quiet", "--hard", "HEAD")
    _lay_snapshot(git, gen.snapshot, git.rev("HEAD"))
    return git.run("ls-tree", "-r", "--name-only", "-z", gen.snapshot).stdout.count(b"\0")


def _lay_snapshot(git: Git, snapshot: str, head: str | None) -> None:
    """Make the working tree equal to ``snapshot``'s tree, leaving HEAD and the index alone.

    Files the snapshot has that HEAD lacks become untracked files again, files HEAD has that the
    snapshot lacks are deleted: exactly the uncommitted state that was saved.
    """
    if head and git.out("rev-parse", f"{head}^{{tree}}") == git.out("rev-parse", f"{snapshot}^{{tree}}"):
        return
    state = git.git_dir() / "watcherd"
    state.mkdir(exist_ok=True)
    # The private index the daemon's snapshots use: filled here, its stat data matches the files
    # just written, so the daemon's first snapshot finds nothing changed without rehashing.
    env = {"GIT_INDEX_FILE": str(state / "index")}
    git.run("read-tree", snapshot, env=env)
    if head:
        gone = git.run("diff-tree", "-r", "-z", "--no-renames", "--name-only", "--diff-filter=D",
                       head, snapshot).stdout.split(b"\0")
        root = git.path.resolve()
        for raw in filter(None, gone):
            target = (git.path / os.fsdecode(raw))
            # Check where the entry lives, not where it points: a symlink may point anywhere.
            parent = target.parent.resolve()
            inside = parent == root or root in parent.parents
            if inside and (target.is_file() or target.is_symlink()):
                target.unlink()
    git.run("checkout-index", "--all", "--force", env=env)
    git.run("update-index", "--refresh", "-q", env=env, ok=(0, 1))


def _clone_template(staging: Path, url: str) -> None:
    staging.rmdir()  # git clone wants to create it
    try:
        Git(staging.parent).run("clone", "--quiet", "--", url, str(staging), timeout=600)
    except Exception as exc:
        raise RestoreError(f"restore.template_url {url}: clone failed: {exc}") from None


# -- placing -----------------------------------------------------------------------------------------


def _install(ws: Path, build) -> Path | None:
    """Build a tree with ``build(staging)`` and put it at ``ws``; returns where the old one went.

    The new tree is complete before anything of the old one moves, so a failed build leaves the
    workspace untouched.
    """
    if ws.exists() and not ws.is_dir():
        raise WorkspaceError(f"workspace.path {ws} exists and is not a directory")
    mount = ws.is_dir() and _is_mount_point(ws)
    if mount:
        staging = ws / STAGING
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
    else:
        staging = Path(tempfile.mkdtemp(prefix=f".{ws.name}{STAGING}-", dir=ws.parent))
    mode = ws.stat().st_mode & 0o7777 if ws.is_dir() else 0o755
    try:
        build(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _log.debug("restore.placing", workspace=str(ws), staging=str(staging), mount=mount)
    # Beside a mount point watcherd's own folders stay; anywhere else the directory itself moves,
    # so anything at all in it (even a stray ".watcherd-..." name) goes aside with it.
    occupied = ws.is_dir() and bool(_entries(ws) if mount else any(ws.iterdir()))
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    # A free name: an earlier move-aside in the same second must not be replaced or refused.
    if mount:
        # A mount point cannot be renamed; its contents go into a folder inside it that the
        # restored repository ignores. The marker names that folder before anything moves, so a
        # rerun after a crash finishes both moves instead of splitting the old entries in two.
        aside = _free_name(ws / f".watcherd-aside-{stamp}") if occupied else None
        _write_marker(staging / ".git" / "watcherd" / _READY, aside.name if aside else "")
        _finish_staged(ws)
        return aside
    staging.chmod(mode)
    if not occupied:
        os.rename(staging, ws)  # replaces an empty directory in the same step
        return None
    aside = _free_name(ws.with_name(f"{ws.name}.watcherd-{stamp}"))
    _write_marker(staging / ".git" / "watcherd" / _SWAPPED, f"{staging}\n{aside}")
    if _exchange(staging, ws):
        os.rename(staging, aside)  # the old workspace, now at the staging path
    else:  # no renameat2 here: for a moment there is no workspace; a rerun restores again
        os.rename(ws, aside)
        os.rename(staging, ws)
    (ws / ".git" / "watcherd" / _SWAPPED).unlink()
    _log.warning("restore.moved_aside", workspace=str(ws), moved_to=str(aside),
                 reason="the workspace held something that is not the stored history")
    return aside


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
    while candidate.exists() or candidate.is_symlink():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate


def _write_marker(marker: Path, text: str) -> None:
    """Write a marker whole or not at all: a rerun acts on what it says."""
    marker.parent.mkdir(parents=True, exist_ok=True)
    tmp = marker.with_name(f"{marker.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, marker)


def _finish_staged(ws: Path) -> None:
    """Put a complete staged tree in place in ``ws`` (idempotent, resumes after a crash).

    First the workspace's old entries go into the aside folder the marker names; then, once
    ``MOVING`` says so, the staged entries move up, ``.git`` last.
    """
    staging = ws / STAGING
    state = staging / ".git" / "watcherd"
    if not (state / _MOVING).exists():
        name = (state / _READY).read_text().strip()
        if name.startswith(".watcherd-aside-") and "/" not in name:
            aside = ws / name
            aside.mkdir(exist_ok=True)
            for entry in _entries(ws):
                os.rename(entry, aside / entry.name)
            _log.warning("restore.moved_aside", workspace=str(ws), moved_to=str(aside),
                         reason="the workspace held something that is not the stored history")
        _write_marker(state / _MOVING, "")
    asides = [p.name for p in ws.iterdir() if p.name.startswith(".watcherd-aside-")]
    if asides:  # ignored before the tree is a repository, so no snapshot ever takes them in
        exclude = staging / ".git" / "info" / "exclude"
        exclude.parent.mkdir(exist_ok=True)
        have = exclude.read_text().splitlines() if exclude.exists() else []
        with open(exclude, "a") as f:
            f.writelines(f"/{name}/\n" for name in asides if f"/{name}/" not in have)
    for entry in sorted(staging.iterdir(), key=lambda p: p.name == ".git"):
        os.rename(entry, ws / entry.name)  # .git last: until then the tree is not a repository
    for marker in (_MOVING, _READY):
        (ws / ".git" / "watcherd" / marker).unlink(missing_ok=True)
    shutil.rmtree(staging)


def _recover_staging(ws: Path) -> None:
    """Finish or discard what a killed restore left behind."""
    inside = ws / STAGING
    if inside.is_dir():
        if (inside / ".git" / "watcherd" / _READY).exists():
            _log.warning("restore.resumed", workspace=str(ws), note="finishing an interrupted restore")
            _finish_staged(ws)
        else:
            shutil.rmtree(inside)
    for marker in (_MOVING, _READY):  # a restore killed just after moving .git up
        if (ws / ".git" / "watcherd" / marker).exists():  # (no unlink at all on a read-only disk)
            (ws / ".git" / "watcherd" / marker).unlink()
    swapped = ws / ".git" / "watcherd" / _SWAPPED
    if swapped.is_file():
        # Killed between swapping the new tree in and naming the old one: the old workspace is
        # still at the staging path, which the clean-up below would delete.
        old, aside = (Path(line) for line in swapped.read_text().splitlines()[:2])
        if old.is_dir() and old.parent == ws.parent and aside.parent == ws.parent:
            os.rename(old, _free_name(aside))
            _log.warning("restore.resumed", workspace=str(ws), moved_to=str(aside),
                         note="gave the previous workspace its aside name")
        swapped.unlink()
    if ws.is_dir():
        for leftover in ws.glob(f"{DOWNLOAD}-*"):  # partial downloads inside a mount point
            shutil.rmtree(leftover, ignore_errors=True)
    if ws.parent.is_dir():
        for pattern in (f".{ws.name}{STAGING}-*", f".{ws.name}{DOWNLOAD}-*"):
            for leftover in ws.parent.glob(pattern):
                shutil.rmtree(leftover, ignore_errors=True)


def _entries(ws: Path) -> list[Path]:
    """What is in ``ws``, not counting watcherd's own staging, download and aside folders."""
    return [p for p in ws.iterdir() if not p.name.startswith(".watcherd-")]


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


def _scratch_dir(ws: Path) -> Path:
    """Where downloads go: beside the workspace, so a huge bundle does not fill a tmpfs /tmp."""
    return ws if ws.is_dir() and _is_mount_point(ws) else ws.parent


def _check_parent(ws: Path) -> None:
    if not ws.parent.is_dir():
        raise WorkspaceError(f"workspace.path {ws}: the parent directory {ws.parent} does not exist")
    if ws.exists() and not ws.is_dir():
        raise WorkspaceError(f"workspace.path {ws} exists and is not a directory")
