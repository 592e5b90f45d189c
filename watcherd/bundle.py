"""Writing a git bundle that really clones, and proving that a bundle does.

A bundle of a shallow clone (a template cloned with ``--depth 1``) passes ``git bundle verify`` but
does not clone: its oldest commits name parents it does not carry. So before bundling a shallow
repository we ask its origin for the missing history; when the origin does not answer, the bundle
is written from a self-contained copy of the history in which the shallow boundary commits have no
parents. The rewrite is deterministic, so every later bundle of the same workspace maps the same
commits to the same new ids and the store's fast-forward checks keep working.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from watcherd import log
from watcherd.errors import GitError, IntegrityError
from watcherd.git import Git
from watcherd.snapshot import SNAPSHOT_REF

_log = log.get(__name__)
# Above this many loose objects a full bundle gets slow (hundreds of ms); a repack keeps it ~20 ms.
REPACK_LOOSE_OBJECTS = 256
UNSHALLOW_TIMEOUT = 120.0
# The one network call watcherd makes in the workspace reads the workspace's config, which the
# agent writes, while watcherd holds the store's credentials. Every setting there that names a
# command is pinned for this call (hooks, fsmonitor and protocol.ext=never hold for every call).
_FETCH_PINNED = (
    "-c", "credential.helper=",  # empty resets the list, URL-specific helpers included
    "-c", "core.sshCommand=ssh -o BatchMode=yes",
    "-c", "core.alternateRefsCommand=true",  # run by the shell: the builtin, lists nothing
)
_FETCH_ENV = {
    "GIT_PROXY_COMMAND": "",  # set (even empty) it wins over core.gitProxy
    "GIT_PROTOCOL_FROM_USER": "0",  # helpers git does not know (remote.<name>.vcs, foo::) refused
}


@dataclass(frozen=True)
class BundleFile:
    """A bundle written to local disk, ready to upload."""

    path: Path
    size: int
    sha256: str
    snapshot: str  # the snapshot head inside the bundle (ids as the bundle has them)
    head: str | None
    head_ref: str | None
    rewritten: bool = False  # True when written from a self-contained copy of a shallow history


class BundleSource:
    """Where a bundle is made from: the workspace itself, or a self-contained copy of it.

    Used as a context manager; the copy (a temporary repository borrowing the workspace's
    objects) is removed on exit. ``map`` translates workspace commit ids to the copy's.
    """

    def __init__(self, git: Git, spool: Path, *, try_unshallow: bool = True) -> None:
        self.workspace = git
        self.spool = spool
        self.try_unshallow = try_unshallow
        self.git = git
        self.mapping: dict[str, str] = {}
        self._tmp: Path | None = None
        self.unshallow_failed = False

    def __enter__(self) -> BundleSource:
        if self.workspace.is_shallow():
            if self.try_unshallow and _unshallow(self.workspace):
                return self
            self.unshallow_failed = True
            self._tmp = Path(tempfile.mkdtemp(prefix="selfcontained-", dir=self.spool))
            self.git, self.mapping = _self_contained_copy(self.workspace, self._tmp)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def map(self, commit: str | None) -> str | None:
        return self.mapping.get(commit, commit) if commit else None


def write(source: BundleSource, dest: Path, *, snapshot: str, head: str | None,
          head_ref: str | None) -> BundleFile:
    """Write a bundle of every ref of ``source`` to ``dest`` and checksum it."""
    git = source.git
    started = time.monotonic()
    if source.git is source.workspace and git.loose_object_count() > REPACK_LOOSE_OBJECTS:
        r = git.run("repack", "-d", "-q", check=False)
        if r.returncode != 0:  # slower without it, not wrong (e.g. a read-only .git)
            _log.warning("bundle.repack_failed", error=r.stderr.decode("utf-8", "replace").strip()[:300])
    git.run("bundle", "create", "--quiet", str(dest), "--all")
    size, sha = file_digest(dest)
    _log.debug("bundle.written", bytes=size, duration_ms=round((time.monotonic() - started) * 1000, 1))
    return BundleFile(dest, size, sha, source.map(snapshot) or snapshot, source.map(head),
                      head_ref, rewritten=bool(source.mapping))


def file_digest(path: Path) -> tuple[int, str]:
    """(size, sha256 hex) of a file, read in chunks."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def prove(bundle: Path, scratch: Path) -> None:
    """Raise :class:`IntegrityError` unless ``bundle`` verifies and its refs fetch completely.

    ``git bundle verify`` alone does not read the pack (a truncated or bit-flipped bundle is
    "okay"); fetching every ref into an empty repository does, and checks connectivity.
    """
    repo = scratch / "prove.git"
    git = Git(repo, bare=True)
    repo.mkdir(parents=True)
    # A sha256 bundle fetched into a sha1 repository fails as "pack is corrupted".
    git.run("init", "--bare", "--quiet", f"--object-format={object_format(bundle)}")
    try:
        git.run("bundle", "verify", "--quiet", str(bundle))
        git.run("fetch", "--quiet", "--no-tags", str(bundle), "refs/*:refs/*")
    except GitError as exc:
        raise IntegrityError(f"bundle does not restore: {exc}") from None
    finally:
        shutil.rmtree(repo, ignore_errors=True)


def object_format(bundle: Path) -> str:
    """The object format (``sha1`` or ``sha256``) a bundle's header declares."""
    with open(bundle, "rb") as f:
        for _ in range(16):
            line = f.readline()
            if not line.strip() or not (line.startswith(b"#") or line.startswith(b"@")):
                break
            if line.strip() == b"@object-format=sha256":
                return "sha256"
    return "sha1"


# -- shallow histories ---------------------------------------------------------------------------


def _unshallow(git: Git) -> bool:
    """Fetch the missing history from ``origin``; False (and a log line) when it cannot."""
    url = git.run("config", "--get", "remote.origin.url", check=False).text
    if not url:
        _log.warning("history.shallow", reason="no origin remote to fetch the missing history from")
        return False
    try:
        git.run(*_FETCH_PINNED, "fetch", "--quiet", "--unshallow",
                "--upload-pack=git-upload-pack", "origin", env=_FETCH_ENV,
                timeout=UNSHALLOW_TIMEOUT)
    except GitError as exc:
        _log.warning("history.shallow", reason="origin did not answer", error=str(exc))
        return False
    _log.info("history.unshallowed", origin=url)
    return True


def _self_contained_copy(git: Git, tmp: Path) -> tuple[Git, dict[str, str]]:
    """A temporary repository with every ref of ``git``, its shallow boundary made parentless.

    The copy borrows the workspace's objects (``objects/info/alternates``) and holds only the
    rewritten commits, so the workspace itself is not changed at all.
    """
    boundary = set((git.git_dir() / "shallow").read_text().split())
    fmt = git.object_format()
    # In a shallow repository rev-list already shows the boundary commits without parents.
    lines = git.out("rev-list", "--topo-order", "--reverse", "--parents", "--all", "HEAD").splitlines()
    graph = [(parts[0], parts[1:]) for parts in (line.split() for line in lines)]
    raw = _cat_commits(git, [c for c, _ in graph])

    copy = Git(tmp, bare=True)
    copy.run("init", "--bare", "--quiet", f"--object-format={fmt}")
    (tmp / "objects" / "info" / "alternates").write_text(str(git.git_dir() / "objects") + "\n")

    mapping: dict[str, str] = {}
    new_objects: list[bytes] = []
    for commit, parents in graph:
        new_parents = [mapping.get(p, p) for p in parents]
        if commit not in boundary and new_parents == parents:
            continue
        body = _reparent(raw[commit], new_parents)
        mapping[commit] = _object_id(fmt, body)
        new_objects.append(body)
    _write_commits(copy, new_objects, list(mapping.values()), tmp)

    refs = git.run("for-each-ref", "--format=%(refname) %(objectname) %(objecttype) %(*objectname)")
    for line in refs.text.splitlines():
        name, obj, kind, peeled = (line.split(" ") + [""])[:4]
        target = mapping.get(obj, obj)
        if kind == "tag" and peeled in mapping:
            # An annotated tag names the old commit; keep the name on the rewritten one.
            target = mapping[peeled]
            _log.warning("history.tag_rewritten", ref=name, note="annotated tag kept as a lightweight tag")
        copy.run("update-ref", name, target)
    head_ref = git.head_ref()
    if head_ref and copy.rev(head_ref):
        copy.run("symbolic-ref", "HEAD", head_ref)
    elif git.rev("HEAD"):
        copy.run("update-ref", "--no-deref", "HEAD", mapping.get(git.rev("HEAD"), git.rev("HEAD")))
    _log.warning("history.self_contained", boundary=sorted(boundary), rewritten=len(mapping),
                 head=git.rev("HEAD"), new_head=mapping.get(git.rev("HEAD") or "", None),
                 snapshot=git.rev(SNAPSHOT_REF),
                 new_snapshot=mapping.get(git.rev(SNAPSHOT_REF) or "", None),
                 why="the shallow clone's origin is unreachable; the bundle carries the history "
                     "from the shallow boundary on, with new commit ids")
    return copy, mapping


def _cat_commits(git: Git, commits: list[str]) -> dict[str, bytes]:
    out = git.run("cat-file", "--batch", input=("\n".join(commits) + "\n").encode()).stdout
    raw: dict[str, bytes] = {}
    pos = 0
    while pos < len(out):
        nl = out.index(b"\n", pos)
        oid, kind, size = out[pos:nl].decode().split()
        if kind != "commit":
            raise GitError(f"expected a commit, {oid} is a {kind}")
        start = nl + 1
        raw[oid] = out[start:start + int(size)]
        pos = start + int(size) + 1
    return raw


def _reparent(body: bytes, parents: list[str]) -> bytes:
    """The commit ``body`` with its parent lines replaced and any signature dropped."""
    header, sep, message = body.partition(b"\n\n")
    kept: list[bytes] = []
    skipping = False
    for line in header.split(b"\n"):
        if line.startswith(b" ") and skipping:
            continue  # continuation of a dropped multi-line header (a signature)
        skipping = line.startswith((b"gpgsig", b"parent "))
        if not skipping:
            kept.append(line)
            if line.startswith(b"tree "):
                kept += [b"parent " + p.encode() for p in parents]
    return b"\n".join(kept) + sep + message


def _object_id(fmt: str, body: bytes) -> str:
    algo = hashlib.sha256 if fmt == "sha256" else hashlib.sha1
    return algo(b"commit %d\0" % len(body) + body).hexdigest()


def _write_commits(copy: Git, bodies: list[bytes], expected: list[str], tmp: Path) -> None:
    if not bodies:
        return
    staging = tmp / "staging"
    staging.mkdir()
    paths = []
    for i, body in enumerate(bodies):
        p = staging / str(i)
        p.write_bytes(body)
        paths.append(str(p))
    got = copy.out("hash-object", "-t", "commit", "-w", "--no-filters", "--stdin-paths",
                   input=("\n".join(paths) + "\n").encode()).split()
    shutil.rmtree(staging)
    if got != expected:
        raise GitError("rewriting the shallow history gave unexpected commit ids")
