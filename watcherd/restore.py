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
import json
import os
import re
import secrets
import shutil
import stat
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from watcherd import bundle as bundles
from watcherd import log, state
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
from watcherd.repo import RAW_ATTRIBUTES, SNAPSHOT_REF, Repo, open_repo, write_private

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

    @property
    def explicit(self) -> bool:
        return self.generation is not None or self.before is not None


def restore(config: Config, generations: Generations, request: Request = Request()) -> Outcome:
    """Run the restore decision for ``config.workspace.path``; raise on failure."""
    started = time.monotonic()
    ws = config.workspace.path
    _check_parent(ws)
    repo = open_repo(config)
    repo.ensure_dirs()
    try:
        _recover(repo, ws)
        manifest, why = _read_manifest(generations)
        if manifest is None:
            if request.explicit:
                raise RestoreError(f"{generations.where(generations.key)}: {why}; "
                                   "no generation to travel to")
            outcome = _on_missing(config, repo, generations, why)
        else:
            outcome = _restore_stored(config, repo, generations, manifest, request)
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


def _restore_stored(config: Config, repo: Repo, generations: Generations, manifest: mf.Manifest,
                    request: Request) -> Outcome:
    ws = config.workspace.path
    candidates = _candidates(manifest, request)
    if _already_holds(repo, ws, candidates[0], exact=request.explicit):
        return Outcome("skipped", candidates[0].generation,
                       detail="the workspace already holds this history")
    if config.restore.on_conflict == "fail" and ws.is_dir() and any(ws.iterdir()):
        raise RestoreError(f"workspace.path {ws} holds something that is not the history stored at "
                           f"{generations.where(generations.key)}, and restore.on_conflict = "
                           '"fail": nothing was moved. Move it away, or set restore.on_conflict = '
                           '"move-aside"')
    failures = []
    for gen in candidates:
        with tempfile.TemporaryDirectory(prefix="download-", dir=repo.dir) as tmp:
            try:
                path = generations.fetch(gen, Path(tmp))
                bundles.prove(path, Path(tmp))
                aside = _install(repo, ws, lambda staging, p=path, g=gen: (
                    build_tree(staging, p, g, config, home=repo.home), _seed(repo, p, g)))
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
    return _on_missing(config, repo, generations,
                       "every stored generation is corrupt: " + "; ".join(failures))


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
            repo.forget_history("the workspace was cloned from restore.template_url")

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


def build_tree(staging: Path, bundle: Path, gen: mf.Generation, config: Config, *,
               home: Path) -> int:
    """A repository and work tree in ``staging`` equal to what ``gen`` recorded; its file count.

    ``home`` is a directory of watcherd's for git's HOME (never one inside the tree being built).
    A bundle that fetched but cannot be checked out is as bad as a corrupt one; a disk that is
    full (or read-only, or failing) is a local failure, raised as :class:`OSError`.
    """
    try:
        return _build(staging, bundle, gen, config, home)
    except GitError as exc:
        local = bundles.local_failure(exc, staging)
        if local is not None:
            raise local from None
        raise IntegrityError(f"generation {gen.generation} does not check out: {exc}") from None


def _build(staging: Path, bundle: Path, gen: mf.Generation, config: Config, home: Path) -> int:
    ident = Identity(config.workspace.author_name, config.workspace.author_email)
    git = Git(staging / ".git", home=home, work_tree=staging, identity=ident)
    git.run("init", "--quiet", "--template=", f"--object-format={bundles.object_format(bundle)}",
            str(staging))
    bundles.fetch_bundle(git, bundle)
    if not git.has_commit(gen.snapshot):
        raise IntegrityError(f"generation {gen.generation}: the bundle does not hold the "
                             f"snapshot {gen.snapshot[:12]} its manifest names")
    s_commit = state.state_parent(git, gen.snapshot)
    (staging / ".git" / "info").mkdir(exist_ok=True)
    attributes = staging / ".git" / "info" / "attributes"
    attributes.write_text(RAW_ATTRIBUTES)  # lay the recorded bytes exactly; removed below
    try:
        if s_commit is not None:
            _apply_state(git, gen.snapshot, state.read(git, s_commit))
        else:
            _apply_legacy(git, gen)
    finally:
        attributes.unlink(missing_ok=True)
    return git.run("ls-tree", "-r", "--name-only", "-z", gen.snapshot).stdout.count(b"\0")


def _apply_state(git: Git, snapshot: str, rec: state.Recorded) -> None:
    """Refs, HEAD, config, stash, index and work tree as ``rec`` recorded them."""
    for oid, raw in rec.tags:
        got = git.out("hash-object", "-t", "tag", "-w", "--stdin", input=raw)
        if got != oid:
            _log.warning("restore.tag_changed", tag=oid, written=got,
                         note="an annotated tag's stored bytes do not hash to its id")
    lines = [f"update {r.name} {r.oid}\n" for r in rec.refs if r.oid]
    lines.append(f"delete {SNAPSHOT_REF}\n")
    git.run("update-ref", "--no-deref", "--stdin", input="".join(lines).encode())
    for r in rec.refs:
        if r.target is not None:
            git.run("symbolic-ref", r.name, r.target)
    if rec.head.ref is not None:
        git.run("symbolic-ref", "HEAD", rec.head.ref)
    elif rec.head.oid is not None:
        git.run("update-ref", "--no-deref", "HEAD", rec.head.oid)
    for key, value in rec.config:
        git.run("config", "--add", key, value)
    if rec.stash:
        log_file = git.git_dir / "logs" / "refs" / "stash"
        log_file.parent.mkdir(parents=True, exist_ok=True)
        log_file.write_text("".join(f"{e.old} {e.new} {e.ident}\t{e.message}\n" for e in rec.stash))
    # The index first (what is staged), then the work tree laid over it through an index of its
    # own: files the snapshot has that the index lacks come back untracked, files the index has
    # that the snapshot lacks come back deleted, exactly as they were.
    if rec.index_tree is not None:
        git.run("read-tree", rec.index_tree)
    elif rec.head.oid is not None:
        git.run("read-tree", rec.head.oid)
    _lay_tree(git, snapshot)


def _apply_legacy(git: Git, gen: mf.Generation) -> None:
    """A generation written before state commits: the bundle's refs are the user's."""
    git.run("update-ref", "-d", SNAPSHOT_REF, check=False)
    if gen.head_ref and git.rev(gen.head_ref):
        git.run("symbolic-ref", "HEAD", gen.head_ref)
    elif gen.head:
        git.run("update-ref", "--no-deref", "HEAD", gen.head)
    elif gen.head_ref:
        git.run("symbolic-ref", "HEAD", gen.head_ref)  # a branch with no commit yet, as saved
    if git.rev("HEAD"):
        git.run("read-tree", "HEAD")
    _lay_tree(git, gen.snapshot)


def _lay_tree(git: Git, snapshot: str) -> None:
    """Write ``snapshot``'s tree into the (empty) work tree, each file once, and refresh the real
    index's stat data so ``git status`` sees exactly the recorded differences."""
    laid = git.git_dir / "watcherd-laid-index"
    env = {"GIT_INDEX_FILE": str(laid)}
    git.run("read-tree", f"{snapshot}^{{tree}}", env=env)
    git.run("checkout-index", "--all", "--force", "-u", env=env)
    laid.unlink(missing_ok=True)
    git.run("update-index", "--refresh", "-q", ok=(0, 1))


def _seed(repo: Repo, bundle: Path, gen: mf.Generation) -> None:
    """Give watcherd's repository the restored history (the daemon's next save moves the store
    forward from it). The pairing follows once the tree is in place."""
    repo.ensure(bundles.object_format(bundle))
    if repo.snapshot_head() is not None:
        repo.forget_history("the workspace was restored from the store")
    bundles.fetch_bundle(repo.bare, bundle, refspec=f"+{SNAPSHOT_REF}:{SNAPSHOT_REF}")
    if repo.snapshot_head() != gen.snapshot:
        repo.bare.run("update-ref", SNAPSHOT_REF, gen.snapshot)
    repo.index.unlink(missing_ok=True)  # of the tree that was there; the next snapshot re-reads


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
    repo.pair(ws)
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
        repo.pair(ws)
    elif phase == "moving" and journal.get("mount") and not os.path.lexists(staging) and \
            os.path.isdir(ws / ".git") and not os.path.islink(ws / ".git"):
        # Killed after the last entry (.git) moved up and the emptied staging directory was
        # removed, before the pairing: the tree is in place.
        repo.pair(ws)
    elif phase in ("ready", "moving") and journal.get("mount") and ours:
        _log.warning("restore.resumed", workspace=str(ws), note="finishing an interrupted restore")
        _finish_mount(repo, journal)
        repo.pair(ws)
    elif not os.path.lexists(ws) and ours and phase in ("placing", "swapping"):
        os.rename(staging, ws)  # killed between the two renames of a restore without renameat2
        _log.warning("restore.resumed", workspace=str(ws), note="finished moving into place")
        repo.pair(ws)
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
    path = repo.dir / JOURNAL
    if doc is None:
        path.unlink(missing_ok=True)
    else:
        write_private(path, json.dumps(doc).encode())


def _read_journal(repo: Repo) -> dict | None:
    try:
        doc = json.loads((repo.dir / JOURNAL).read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and isinstance(doc.get("staging"), str) else None


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
