"""A workspace's generations in the store: saving forward-only, fetching verified.

The imperative shell around :mod:`watcherd.protocol`: it reads the store and watcherd's repository,
asks the protocol what may be done, and does it. Write order for a save: bundle (uploaded whole,
size and checksum checked) → manifest swapped in with a conditional write on the version it
replaces → bundles beyond ``keep`` pruned. A save whose history does not contain the stored
snapshot is refused and kept under ``conflicts/`` (one copy per divergence), and reported as
refused everywhere; a generation a restore found corrupt is superseded by the next save whose
history holds the newest good one.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from watcherd import bundle as bundles
from watcherd import log
from watcherd import manifest as mf
from watcherd import protocol
from watcherd.errors import (
    BundleTooLarge,
    ConflictError,
    IntegrityError,
    ObjectMissing,
    PreconditionFailed,
    StoreError,
    UsageError,
)
from watcherd.repo import SNAPSHOT_REF, Repo
from watcherd.store.base import Store
from watcherd.units import format_size

_log = log.get(__name__)
_MANIFEST_RACE_ATTEMPTS = 5
# Bundles of a chain downloaded at once (a restore of a long chain from S3 waits on latency).
_PARALLEL_DOWNLOADS = 4


@dataclass(frozen=True)
class SaveResult:
    """What a save did: ``saved`` a new generation, or found the store ``unchanged``."""

    status: str  # "saved" | "unchanged"
    generation: int | None
    snapshot: str | None
    bytes: int = 0
    bundle: str | None = None
    superseded: tuple[int, ...] = ()  # generations this one replaced (found corrupt)
    store_vanished: bool = False  # the store had lost what this workspace saved before
    full: bool = True  # a full bundle (a new chain), or an increment on the stored chain


@dataclass(frozen=True)
class Limits:
    keep: int = 10
    warn_bundle_size: int = 100 * 2**20
    max_bundle_size: int = 500 * 2**20
    chain: protocol.ChainPolicy = protocol.ChainPolicy()
    keep_checkpoints: int = 20


class Generations:
    """The generations of one store key."""

    def __init__(self, store: Store, key: str, limits: Limits | None = None) -> None:
        self.store = store
        self.key = key
        self.limits = limits or Limits()

    @property
    def manifest_name(self) -> str:
        return f"{self.key}/manifest.json"

    def bundle_object(self, name: str) -> str:
        return f"{self.key}/bundles/{name}"

    def where(self, name: str) -> str:
        return f"{self.store.url.rstrip('/')}/{name}"

    # -- reading ---------------------------------------------------------------------------------

    def read_manifest(self) -> tuple[mf.Manifest | None, str | None]:
        """The stored manifest and its version; (None, None) when there is none.

        Raises :class:`IntegrityError` for a manifest that exists but cannot be used (read at
        most :data:`manifest.MAX_SIZE` bytes of it).
        """
        blob = self.store.read(self.manifest_name, limit=mf.MAX_SIZE)
        if blob is None:
            return None, None
        return mf.parse(blob.data, self.where(self.manifest_name)), blob.version

    def holds_anything(self) -> bool:
        """Whether the key holds any object at all (only then is there "nothing stored")."""
        return bool(self.store.list(f"{self.key}/"))

    def fetch(self, gen: mf.Generation, directory: Path,
              downloaded: dict[str, Path] | None = None) -> list[Path]:
        """Download every bundle of ``gen``'s chain into ``directory`` (several at once), check
        each one's size and sha256; the files, base first. ``downloaded`` (bundle name -> file)
        spares what an earlier call of a restore fetched already, and is filled in.

        Raises :class:`IntegrityError` naming the first bundle that is missing or corrupt.
        """
        downloaded = {} if downloaded is None else downloaded
        todo = [link for link in gen.links if link.bundle not in downloaded]
        with ThreadPoolExecutor(max_workers=min(_PARALLEL_DOWNLOADS, max(len(todo), 1)),
                                thread_name_prefix="fetch") as pool:
            paths = list(pool.map(lambda link: self._fetch_link(gen, link, directory), todo))
        downloaded.update({link.bundle: path for link, path in zip(todo, paths)})
        return [downloaded[link.bundle] for link in gen.links]

    def _fetch_link(self, gen: mf.Generation, link: mf.Link, directory: Path) -> Path:
        name = self.bundle_object(link.bundle)
        fd, tmp = tempfile.mkstemp(prefix=f"gen{gen.generation}-", suffix=".bundle", dir=directory)
        os.close(fd)
        path = Path(tmp)
        started = time.monotonic()
        try:
            self.store.download(name, path)
        except ObjectMissing:
            path.unlink(missing_ok=True)
            raise IntegrityError(f"generation {gen.generation}: the manifest names "
                                 f"{self.where(name)}, which does not exist") from None
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        size, sha = bundles.file_digest(path)
        if size != link.size or sha != link.sha256:
            path.unlink(missing_ok=True)
            what = (f"{size} bytes where the manifest says {link.size} (truncated?)"
                    if size != link.size else "a sha256 that does not match the manifest (corrupt)")
            raise IntegrityError(f"generation {gen.generation}: {self.where(name)} has {what}")
        _log.info("bundle.downloaded", key=self.key, generation=gen.generation,
                  bundle=link.bundle, bytes=size,
                  duration_ms=round((time.monotonic() - started) * 1000, 1))
        return path

    # -- saving ----------------------------------------------------------------------------------

    def save(self, repo: Repo, *, template_url: str = "", try_unshallow: bool = True,
             compact: bool = True) -> SaveResult:
        """Save the snapshot history in ``repo`` as the next generation: an increment on the
        stored chain, or a full bundle (the first save, a supersede, or a compaction, which only
        happens when ``compact``: not for the final save on SIGTERM).

        Raises :class:`ConflictError` when the stored history is not part of ours (the history is
        kept under ``conflicts/``, once per divergence), :class:`BundleTooLarge` above
        ``max_bundle_size``, :class:`StoreError` and friends when the store fails.
        """
        started = time.monotonic()
        local = repo.snapshot_head()
        if local is None:
            return SaveResult("unchanged", None, None)
        # Debug traces of each step (saving, bundle.written, bundle.uploaded, manifest.swapped):
        # after a crash, the last one says where the save was.
        _log.debug("generation.saving", key=self.key, snapshot=local)
        with _usable_spool(repo.spool, repo.size_estimate()) as spool, _spool_held(spool), \
                bundles.BundleSource(repo, spool, template_url=template_url,
                                     try_unshallow=try_unshallow) as source:
            ours = source.map(local)
            for _ in range(_MANIFEST_RACE_ATTEMPTS):
                try:
                    current, version = self.read_manifest()
                except IntegrityError as exc:
                    self._keep_conflict(source, spool, f"the stored manifest cannot be used: {exc}")
                vanished = current is None and self._vanished(repo)
                decision = protocol.decide_save(
                    current, ours, lambda snap: _contains(source.git, snap, ours),
                    repo.bad_generations())
                if decision.verdict is protocol.Verdict.UNCHANGED:
                    repo.record_stored(current.current.generation, ours)
                    return SaveResult("unchanged", current.current.generation, ours)
                if decision.verdict is protocol.Verdict.REFUSE:
                    self._keep_conflict(source, spool, decision.reason)
                try:
                    result = self._publish(source, spool, current, version, decision, compact)
                except BundleTooLarge:
                    squashed = _squash_unsaved(source, local, current)
                    if squashed is None:
                        raise
                    local = ours = squashed
                    result = self._publish(source, spool, current, version, decision, compact)
                if result is not None:
                    repo.record_stored(result.generation, result.snapshot)
                    if result.superseded:
                        repo.clear_bad_generations()
                    _log.info("generation.saved", key=self.key, generation=result.generation,
                              bundle=result.bundle, bytes=result.bytes, snapshot=result.snapshot,
                              kind="full" if result.full else "increment",
                              superseded=list(result.superseded) or None,
                              duration_ms=round((time.monotonic() - started) * 1000, 1))
                    return SaveResult(**{**result.__dict__, "store_vanished": vanished})
            raise PreconditionFailed(f"{self.where(self.manifest_name)} kept changing under us; "
                                     "is another watcherd writing the same store.key?")

    def _vanished(self, repo: Repo) -> bool:
        """Say it loudly when the store lost what this workspace saved there before."""
        known = repo.stored()
        if known is None:
            return False
        _log.error("store.vanished", key=self.key, store=self.store.url,
                   last_generation=known[0], last_snapshot=known[1],
                   note="the store no longer holds the generations this workspace saved; "
                        "saving the whole history again as generation 1")
        return True

    def _publish(self, source: bundles.BundleSource, spool: Path, current: mf.Manifest | None,
                 version: str | None, decision: protocol.SaveDecision,
                 compact: bool) -> SaveResult | None:
        """Upload a bundle and swap the manifest; None when another writer got there first."""
        first = current.current.generation + 1 if current else 1
        base = protocol.plan_chain(current, decision, self.limits.chain, compact)
        with tempfile.TemporaryDirectory(dir=spool) as tmp:
            try:
                bf = self._write_bundle(source, Path(tmp), since=base[-1].snapshot if base else None)
            except BundleTooLarge:
                # A compaction too large to store is not a reason to store nothing: continue the
                # chain instead (the full bundle is retried at the next idle save).
                base = protocol.plan_chain(current, decision, self.limits.chain, compact=False)
                if base is None:
                    raise
                bf = self._write_bundle(source, Path(tmp), since=base[-1].snapshot)
            if protocol.decide_save(current, bf.snapshot,
                                    lambda snap: _contains(source.git, snap, bf.snapshot),
                                    source.repo.bad_generations()).verdict != decision.verdict:
                return None  # the history moved under us (a squash): look again
            for number in range(first, first + _MANIFEST_RACE_ATTEMPTS):
                name = mf.bundle_name(number, bf.snapshot)
                obj = self.bundle_object(name)
                try:
                    self.store.upload(obj, bf.path, size=bf.size, sha256=bf.sha256)
                    break
                except PreconditionFailed:
                    # The name is taken: by a racing writer's upload, or by a save of this same
                    # snapshot that died before its manifest. Neither is ours to delete; the next
                    # number is free, the conditional manifest write below settles any race, and
                    # pruning removes the orphan once a later generation is published.
                    continue
            else:
                return None
            _log.debug("bundle.uploaded", key=self.key, bundle=name, bytes=bf.size)
            link = mf.Link(name, bf.size, bf.sha256, bf.snapshot)
            new = mf.Generation(number, name, bf.size, bf.sha256, bf.snapshot, bf.head_ref, bf.head,
                                mf.now_rfc3339(), mf.Writer(_host(), os.getpid()),
                                chain=(*(base or ()), link))
            superseded = [mf.Superseded(g, decision.reason) for g in decision.supersedes]
            # A forked workspace's first generation says where its history began.
            forked = source.repo.forked_from() if current is None else None
            updated = protocol.next_manifest(current, new, self.limits.keep, superseded,
                                             forked_from=forked)
            try:
                self.store.write(self.manifest_name, updated.to_json(), if_version=version)
            except PreconditionFailed:
                self.store.delete(obj)  # never published: nothing points at it
                _log.info("generation.raced", key=self.key, generation=number,
                          note="another writer saved first; checking its history")
                return None
            _log.debug("manifest.swapped", key=self.key, generation=number)
            if decision.supersedes:
                _log.warning("generation.superseded", key=self.key, generation=number,
                             superseded=list(decision.supersedes), reason=decision.reason)
        self._prune(current, updated)
        if forked:
            source.repo.clear_fork()
        return SaveResult("saved", number, bf.snapshot, bf.size, name, decision.supersedes,
                          full=base is None)

    def _write_bundle(self, source: bundles.BundleSource, tmp: Path, *,
                      since: str | None = None) -> bundles.BundleFile:
        bf = bundles.write(source, tmp / "snapshot.bundle", since=since)
        if bf.size > self.limits.max_bundle_size:
            raise BundleTooLarge(
                f"the bundle is {format_size(bf.size)}, above store.max_bundle_size "
                f"({format_size(self.limits.max_bundle_size)}); nothing was uploaded. Add large or "
                "generated files to .gitignore, or raise store.max_bundle_size")
        if bf.size > self.limits.warn_bundle_size:
            _log.warning("bundle.large", key=self.key, bytes=bf.size,
                         warn_bundle_size=self.limits.warn_bundle_size,
                         hint="large files slow every save and restore; check .gitignore")
        return bf

    def _prune(self, before: mf.Manifest | None, after: mf.Manifest) -> None:
        """Delete bundles no manifest names any more, and orphans of crashed saves."""
        listed = [info.name.rsplit("/", 1)[-1] for info in self.store.list(f"{self.key}/bundles/")]
        doomed = protocol.prunable(before, after, listed)
        for name in sorted(doomed):
            self.store.delete(self.bundle_object(name))
        if doomed:
            _log.info("generation.pruned", key=self.key, bundles=sorted(doomed))

    def label(self, generation: int, name: str, note: str = "") -> mf.Checkpoint:
        """Name ``generation`` (a checkpoint): ``keep`` never prunes it, ``keep_checkpoints``
        bounds how many there are. A name already used moves to this generation. Raises
        :class:`UsageError` when the generation is not in the manifest, :class:`StoreError`
        when the store fails."""
        for _ in range(_MANIFEST_RACE_ATTEMPTS):
            current, version = self.read_manifest()
            gen = current.find(generation) if current else None
            if gen is None:
                raise UsageError(f"generation {generation} is not in {self.where(self.manifest_name)}")
            checkpoint = mf.Checkpoint(name, generation, gen.snapshot, mf.now_rfc3339(), note)
            labelled = protocol.label(current, checkpoint, self.limits.keep_checkpoints)
            try:
                self.store.write(self.manifest_name, labelled.to_json(), if_version=version)
            except PreconditionFailed:
                continue  # another save or label landed: label again on the new manifest
            _log.info("checkpoint.created", key=self.key, name=name, generation=generation,
                      snapshot=gen.snapshot)
            return checkpoint
        raise PreconditionFailed(f"{self.where(self.manifest_name)} kept changing under us")

    def conflicts(self) -> list[protocol.ConflictCopy]:
        """The conflict copies under this key that watcherd can read the name of."""
        found = []
        for info in self.store.list(f"{self.key}/conflicts/"):
            parsed = protocol.parse_conflict(info.name.rsplit("/", 1)[-1])
            if parsed is not None:
                found.append(parsed)
        return found

    def _keep_conflict(self, source: bundles.BundleSource, spool: Path, reason: str) -> None:
        """Keep the refused history under ``conflicts/`` (unless a copy already holds it) and
        raise :class:`ConflictError`."""
        ours = source.map(source.repo.snapshot_head()) or ""
        host = _host()
        plan = protocol.plan_conflict(self.conflicts(), host, ours,
                                      lambda prefix: _contains_prefix(source.git, prefix, ours))
        if not plan.upload:
            name = f"{self.key}/conflicts/{plan.existing}"
            _log.info("generation.conflict_kept", key=self.key, conflict=name, snapshot=ours,
                      reason=reason, note="this history is kept there already; not uploaded again")
            raise ConflictError(f"refused to replace {self.where(self.manifest_name)}: {reason}. "
                                f"This workspace is saved as {self.where(name)}", name, ours)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        with tempfile.TemporaryDirectory(dir=spool) as tmp:
            bf = self._write_bundle(source, Path(tmp))
            base = protocol.conflict_name(stamp, host, bf.snapshot).removesuffix(".bundle")
            # Two refusals within one second from one host must both be kept.
            for n in range(_MANIFEST_RACE_ATTEMPTS):
                name = f"{self.key}/conflicts/{base}-{n}.bundle" if n else \
                    f"{self.key}/conflicts/{base}.bundle"
                try:
                    self.store.upload(name, bf.path, size=bf.size, sha256=bf.sha256)
                    break
                except PreconditionFailed:
                    if n == _MANIFEST_RACE_ATTEMPTS - 1:
                        raise
        for old in plan.delete:
            try:
                self.store.delete(f"{self.key}/conflicts/{old}")
            except StoreError as exc:  # the new copy is safe; an old one left over is no loss
                _log.warning("generation.conflict_prune_failed", conflict=old, error=str(exc))
        _log.error("generation.conflict", key=self.key, conflict=name, snapshot=bf.snapshot,
                   reason=reason, bytes=bf.size, replaced=list(plan.delete) or None,
                   hint="the stored history was kept; this workspace's state is saved beside it")
        raise ConflictError(f"refused to replace {self.where(self.manifest_name)}: {reason}. "
                            f"This workspace was saved as {self.where(name)}", name, bf.snapshot)


def _contains(git, snapshot: str, head: str) -> bool:
    return git.has_commit(snapshot) and git.is_ancestor(snapshot, head)


def _contains_prefix(git, prefix: str, head: str) -> bool:
    """Whether ``head``'s history has a commit whose id starts with ``prefix`` (conflict copies
    name their snapshot by its first 12 digits)."""
    r = git.run("rev-parse", "--verify", "--quiet", f"{prefix}^{{commit}}", check=False)
    return r.returncode == 0 and bool(r.text) and git.is_ancestor(r.text, head)


def _squash_unsaved(source: bundles.BundleSource, local: str,
                    current: mf.Manifest | None) -> str | None:
    """Replace the snapshots the store has not seen by one commit of the newest state; its id.

    A file above ``max_bundle_size`` that was snapshotted and then deleted or ignored stays in an
    unsaved snapshot commit, and every later bundle would carry it: no save would ever succeed
    again. Those commits never reached the store, so only their in-between states are given up;
    the newest state (its tree, HEAD and recorded git state), the stored history and the user's
    own commits are all kept. None when there is nothing to squash.
    """
    repo = source.repo
    git = repo.bare
    if source.git is not git:
        return None  # a rewritten copy of a shallow history: its ids are not the repository's
    stored = current.current.snapshot if current else None
    with repo.lock():
        if repo.snapshot_head() != local:
            return None  # a snapshot landed meanwhile: the next save tries again
        unsaved = git.out("rev-list", "--first-parent", local,
                          *([f"^{stored}"] if stored else [])).split()
        if len(unsaved) < 2:
            return None  # one commit: the large file is in the newest tree itself
        # [previous snapshot, HEAD, state] of the newest: the previous one is replaced by the
        # stored snapshot, the rest stays.
        parents = git.out("rev-list", "--parents", "-n", "1", local).split()[1:]
        args = ["commit-tree", f"{local}^{{tree}}", "-m",
                f"watcherd: snapshot (squashed {len(unsaved)} unsaved snapshots)\n\nTogether "
                "they were above store.max_bundle_size: the newest state is kept, the states in "
                "between are dropped.\n"]
        for parent in dict.fromkeys(p for p in ([stored] if stored else []) +
                                    [p for p in parents if p not in unsaved]):
            args += ["-p", parent]
        squashed = git.out(*args)
        git.update_ref(SNAPSHOT_REF, squashed, local, "watcherd: squash unsaved snapshots")
    _log.warning("history.squashed", snapshots=len(unsaved), old=local, new=squashed,
                 stored=stored, reason="the unsaved snapshots were above store.max_bundle_size; "
                 "their newest state is kept as one snapshot, the states in between are dropped")
    return squashed


@contextmanager
def _usable_spool(spool: Path, need: int) -> Iterator[Path]:
    """``spool``, or a private temporary directory elsewhere while ``spool`` cannot be written (a
    read-only disk) or has less room than the bundle may need (``need`` bytes): snapshots that
    are already committed must still reach the store, and a full state disk must not hold back
    the final save. Raises :class:`StoreError` naming both places when neither has room."""
    problem = None
    try:
        spool.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=spool).close()
        free = shutil.disk_usage(spool).free
        if free < need:
            problem = f"{format_size(free)} free, the bundle may need up to {format_size(need)}"
    except OSError as exc:
        problem = exc.strerror or str(exc)
    if problem is None:
        yield spool
        return
    elsewhere = Path(tempfile.gettempdir())
    if shutil.disk_usage(elsewhere).free < need:
        raise StoreError(f"no room to write the bundle: the spool {spool} has {problem}, and "
                         f"{elsewhere} has {format_size(shutil.disk_usage(elsewhere).free)} free; "
                         "free space in workspace.state_dir")
    tmp = Path(tempfile.mkdtemp(prefix="watcherd-spool-", dir=elsewhere))
    _log.warning("spool.fallback", spool=str(spool), problem=problem, using=str(tmp))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def _spool_held(spool: Path) -> Iterator[None]:
    """Use ``spool`` for one save; the only saver clears what killed saves left in it.

    A save killed while writing a bundle leaves its temp directory (megabytes) behind, and nothing
    else would ever remove it. Every save holds a shared lock on the spool directory itself; one
    that can take it exclusively knows no other process (a daemon, a ``watcherd snapshot``) is
    using the spool.
    """
    spool.mkdir(parents=True, exist_ok=True)
    fd = os.open(spool, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pass  # another save is running: its files are not ours to judge
        else:
            left = list(spool.iterdir())
            for p in left:
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            if left:
                _log.warning("spool.cleared", spool=str(spool), entries=len(left),
                             reason="left by a save that was killed")
        fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


def _host() -> str:
    """This host's name, reduced to characters that are safe in an object name."""
    return re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())[:63].strip(".-") or "host"
