"""Writing a git bundle that really clones, and proving that a bundle does.

A bundle is written from watcherd's own repository: the snapshot history
(``refs/watcherd/snapshots``), which carries everything each snapshot recorded (:mod:`watcherd.state`).

A bundle of a shallow history (a template cloned with ``--depth 1``) passes ``git bundle verify``
but does not clone: its oldest commits name parents it does not carry. So before bundling a shallow
history watcherd asks the operator's ``restore.template_url`` for the missing history (never a URL
found in the workspace); when that is not set or does not answer, the bundle is written from a
self-contained copy of the history in which the shallow boundary commits have no parents. The
rewrite is deterministic, so every later bundle of the same workspace maps the same commits to the
same new ids and the store's fast-forward checks keep working.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from watcherd import log, state
from watcherd.errors import GitError, IntegrityError
from watcherd.git import Git, LocalIOError, object_id
from watcherd.repo import SNAPSHOT_REF, Repo

_log = log.get(__name__)
# Above this many loose objects a full bundle gets slow (hundreds of ms); a repack keeps it ~20 ms.
REPACK_LOOSE_OBJECTS = 256
UNSHALLOW_TIMEOUT = 120.0
BUNDLE_TIMEOUT = 1800.0


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
    since: str | None = None  # an increment on this snapshot; None for a full bundle


class BundleSource:
    """Where a bundle is made from: watcherd's repository, or a self-contained copy of it.

    Used as a context manager; the copy (a temporary repository borrowing the repository's
    objects) is removed on exit. ``map`` translates commit ids to the copy's.
    """

    def __init__(self, repo: Repo, spool: Path, *, template_url: str = "",
                 try_unshallow: bool = True) -> None:
        self.repo = repo
        self.spool = spool
        self.template_url = template_url
        self.try_unshallow = try_unshallow
        self.git = repo.bare
        self.mapping: dict[str, str] = {}
        self._tmp: Path | None = None
        self.unshallow_failed = False

    def __enter__(self) -> BundleSource:
        if self.repo.bare.is_shallow():
            if self.try_unshallow and self.template_url and _unshallow(self.repo, self.template_url):
                return self
            self.unshallow_failed = True
            self._tmp = Path(tempfile.mkdtemp(prefix="selfcontained-", dir=self.spool))
            self.git, self.mapping = _self_contained_copy(self.repo.bare, self._tmp)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def map(self, commit: str | None) -> str | None:
        return self.mapping.get(commit, commit) if commit else None


def write(source: BundleSource, dest: Path, *, since: str | None = None) -> BundleFile:
    """Write a bundle of the snapshot history to ``dest`` and checksum it: all of it, or with
    ``since`` (a snapshot the history contains) only what is new after it, an increment whose
    prerequisite is ``since`` (git-bundle(1), "specifying references").

    The snapshot it holds is read back from the bundle's own header (a snapshot taken meanwhile
    may have moved the ref), and the manifest's facts (HEAD and its branch) come from what that
    snapshot recorded, never from refs read now.
    """
    git = source.git
    started = time.monotonic()
    if source.git is source.repo.bare and git.loose_object_count() > REPACK_LOOSE_OBJECTS:
        r = git.run("repack", "-d", "-q", check=False, timeout=BUNDLE_TIMEOUT)
        if r.returncode != 0:  # slower without it, not wrong
            _log.warning("bundle.repack_failed",
                         error=r.stderr.decode("utf-8", "replace").strip()[:300])
    git.run("bundle", "create", "--quiet", str(dest), SNAPSHOT_REF,
            *([f"^{since}"] if since else []), timeout=BUNDLE_TIMEOUT)
    snapshot = bundle_heads(dest).get(SNAPSHOT_REF)
    if snapshot is None:
        raise GitError(f"the bundle written to {dest} does not hold {SNAPSHOT_REF}")
    size, sha = file_digest(dest)
    head, head_ref = recorded_head(git, snapshot)
    _log.debug("bundle.written", bytes=size, duration_ms=round((time.monotonic() - started) * 1000, 1))
    return BundleFile(dest, size, sha, snapshot, head, head_ref, rewritten=bool(source.mapping),
                      since=since)


def bundle_heads(path: Path) -> dict[str, str]:
    """The refs a bundle's header lists (git-bundle(5): after the signature line and optional
    ``@capability`` and ``-prerequisite`` lines, ``<id> <ref>`` lines up to a blank line)."""
    heads: dict[str, str] = {}
    with open(path, "rb") as f:
        if not f.readline().startswith(b"# v"):
            return heads
        for _ in range(100_000):
            line = f.readline()
            if line in (b"\n", b""):
                break
            if line.startswith((b"@", b"-")):
                continue
            oid, _, name = line.decode("utf-8", "replace").rstrip("\n").partition(" ")
            heads[name] = oid
    return heads


def recorded_head(git: Git, snapshot: str) -> tuple[str | None, str | None]:
    """(HEAD commit, HEAD's branch) as snapshot ``snapshot`` recorded them.

    A snapshot of an older watcherd has no state commit: its second parent was HEAD, its branch
    was not recorded.
    """
    found = state.load(git, snapshot)
    if found.recorded is not None:
        return found.recorded.head.oid, found.recorded.head.ref
    parents = git.out("rev-list", "--parents", "-n", "1", snapshot).split()[1:]
    return (parents[1] if len(parents) > 1 else None), None


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
    repo.mkdir(parents=True)
    git = Git(repo, home=scratch)
    # A sha256 bundle fetched into a sha1 repository fails as "pack is corrupted".
    git.run("init", "--bare", "--quiet", "--template=", f"--object-format={object_format(bundle)}",
            str(repo))
    try:
        git.run("bundle", "verify", "--quiet", str(bundle), timeout=BUNDLE_TIMEOUT)
        fetch_bundle(git, bundle)
    except LocalIOError:
        raise  # the disk here, not the bundle
    except GitError as exc:
        raise IntegrityError(f"bundle does not restore: {exc}") from None
    finally:
        shutil.rmtree(repo, ignore_errors=True)


def fetch_bundle(git: Git, bundle: Path, *, refspec: str = "refs/*:refs/*") -> None:
    """Fetch every ref of a bundle on local disk into ``git``'s repository.

    The one transport this allows is reading that file (git counts a bundle as the ``file``
    protocol); nothing the bundle holds can name another.
    """
    git.run("-c", "protocol.file.allow=always", "fetch", "--quiet", "--no-tags",
            "--no-recurse-submodules", "--update-head-ok", str(bundle), refspec,
            timeout=BUNDLE_TIMEOUT)


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


def transport_options(url: str) -> list[str]:
    """``-c`` options that allow exactly the protocol of the operator's ``url``.

    git's names (git-config(1), ``protocol.<name>.allow``): ``file`` for a path or ``file://``,
    ``ssh`` for ``ssh://`` and scp-like ``host:path``, else the URL's scheme. ``ext::`` (which
    runs a command) is never allowed.
    """
    scheme = urlsplit(url).scheme.lower()
    if "::" in url.split("/", 1)[0]:
        raise GitError(f"{url!r}: a remote helper URL (<helper>::<address>) is not allowed")
    if not scheme or len(scheme) == 1:  # a path (a Windows drive letter counts as one too)
        name = "ssh" if re.match(r"^[^/]+:", url) and not Path(url).exists() else "file"
    elif scheme in ("http", "https", "git", "ssh", "file"):
        name = scheme
    else:
        raise GitError(f"{url!r}: protocol {scheme!r} is not one watcherd fetches over")
    return ["-c", f"protocol.{name}.allow=always"]


# -- shallow histories ---------------------------------------------------------------------------


def _unshallow(repo: Repo, url: str) -> bool:
    """Fetch the missing history from ``url`` into watcherd's repository; False (and a log line)
    when it cannot."""
    git = repo.bare
    boundary = (repo.git_dir / "shallow").read_text().split()
    try:
        git.run(*transport_options(url), "fetch", "--quiet", "--unshallow", "--no-tags",
                "--no-recurse-submodules", "--no-write-fetch-head", "--", url,
                timeout=UNSHALLOW_TIMEOUT)
    except GitError as exc:
        _log.warning("history.shallow", reason="restore.template_url did not give the missing "
                     "history", error=str(exc))
        return False
    complete = [c for c in boundary if _parents_present(git, c)]
    repo.record_unshallowed(complete)
    _log.info("history.unshallowed", origin=url, commits=len(complete))
    return not git.is_shallow()


def _parents_present(git: Git, commit: str) -> bool:
    r = git.run("rev-list", "--objects", "--quiet", f"{commit}", check=False)
    return r.returncode == 0


def _self_contained_copy(git: Git, tmp: Path) -> tuple[Git, dict[str, str]]:
    """A temporary repository with the snapshot history, its shallow boundary made parentless.

    The copy borrows the repository's objects (``objects/info/alternates``) and holds only the
    rewritten commits (and the state commits' records, whose ids follow), so the repository
    itself is not changed at all.
    """
    boundary = set((git.git_dir / "shallow").read_text().split())
    fmt = git.object_format()
    # In a shallow repository rev-list already shows the boundary commits without parents.
    lines = git.out("rev-list", "--topo-order", "--reverse", "--parents", SNAPSHOT_REF).splitlines()
    graph = [(parts[0], parts[1:]) for parts in (line.split() for line in lines)]
    raw = _cat(git, [c for c, _ in graph])

    copy = Git(tmp, home=tmp)
    copy.run("init", "--bare", "--quiet", "--template=", f"--object-format={fmt}", str(tmp))
    (tmp / "objects" / "info" / "alternates").write_text(str(git.git_dir / "objects") + "\n")

    mapping: dict[str, str] = {}
    states: dict[str, str] = {}  # a state commit's tree -> the rewritten tree
    new_objects: list[tuple[str, bytes]] = []
    for commit, parents in graph:
        body = raw[commit]
        new_parents = [mapping.get(p, p) for p in parents]
        new_tree = None
        if body.endswith(f"\n\n{state.SUBJECT}\n".encode()):
            tree = body.split(b"\n", 1)[0].split()[1].decode()
            if tree not in states:
                states[tree] = _rewrite_state_tree(git, copy, tree, mapping, fmt)
            new_tree = states[tree] if states[tree] != tree else None
        if commit not in boundary and new_parents == parents and new_tree is None:
            continue
        body = _reparent(body, new_parents, new_tree)
        mapping[commit] = object_id(fmt, "commit", body)
        new_objects.append(("commit", body))
    _write_objects(copy, new_objects, tmp)
    head = git.rev(SNAPSHOT_REF)
    copy.run("update-ref", SNAPSHOT_REF, mapping.get(head, head))
    _log.warning("history.self_contained", boundary=sorted(boundary), rewritten=len(mapping),
                 snapshot=head, new_snapshot=mapping.get(head or "", None),
                 why="the shallow history's missing part could not be fetched "
                     "(restore.template_url unset or unreachable); the bundle carries the "
                     "history from the shallow boundary on, with new commit ids")
    return copy, mapping


def _rewrite_state_tree(git: Git, copy: Git, tree: str, mapping: dict[str, str], fmt: str) -> str:
    """A state commit's tree with the ids it names translated by ``mapping`` (annotated tags
    that name a rewritten commit are rewritten, and their new ids added to ``mapping``)."""
    listing = git.run("ls-tree", "-z", tree).stdout.split(b"\0")
    entries = {}
    for rec in filter(None, listing):
        meta, _, name = rec.partition(b"\t")
        entries[name.decode()] = meta.decode().split()
    changed = False
    if "tags" in entries:
        blob = git.run("cat-file", "blob", entries["tags"][2]).stdout
        new_blob = _rewrite_tags(blob, mapping, fmt)
        if new_blob != blob:
            entries["tags"][2] = copy.out("hash-object", "-w", "--stdin", input=new_blob)
            changed = True
    doc = git.run("cat-file", "blob", entries["state.json"][2]).stdout.decode()
    new_doc = re.sub(r"\b[0-9a-f]{40,64}\b", lambda m: mapping.get(m[0], m[0]), doc)
    if new_doc != doc:
        entries["state.json"][2] = copy.out("hash-object", "-w", "--stdin", input=new_doc.encode())
        changed = True
    if not changed:
        return tree
    text = "".join(f"{m[0]} {m[1]} {m[2]}\t{name}\n" for name, m in sorted(entries.items()))
    return copy.out("mktree", input=text.encode())


def _rewrite_tags(blob: bytes, mapping: dict[str, str], fmt: str) -> bytes:
    out = []
    for oid, body in state.tag_records(blob):
        m = re.match(rb"object ([0-9a-f]+)\n", body)
        if m and m[1].decode() in mapping:
            body = b"object " + mapping[m[1].decode()].encode() + body[m.end() - 1:]
            new = object_id(fmt, "tag", body)
            mapping[oid] = new
            _log.warning("history.tag_rewritten", tag=oid, new=new,
                         note="an annotated tag of a rewritten commit now names its new id")
            oid = new
        out.append(b"%s tag %d\n%s\n" % (oid.encode(), len(body), body))
    return b"".join(out)


def _cat(git: Git, commits: list[str]) -> dict[str, bytes]:
    raw: dict[str, bytes] = {}
    for name, found in zip(commits, git.cat_objects(commits)):
        if found is None or found[1] != "commit":
            raise GitError(f"expected a commit, {name} is {found[1] if found else 'missing'}")
        raw[found[0]] = found[2]
    return raw


def _reparent(body: bytes, parents: list[str], tree: str | None = None) -> bytes:
    """The commit ``body`` with its parent lines (and tree) replaced and any signature dropped."""
    header, sep, message = body.partition(b"\n\n")
    kept: list[bytes] = []
    skipping = False
    for line in header.split(b"\n"):
        if line.startswith(b" ") and skipping:
            continue  # continuation of a dropped multi-line header (a signature)
        skipping = line.startswith((b"gpgsig", b"parent "))
        if not skipping:
            if line.startswith(b"tree ") and tree is not None:
                line = b"tree " + tree.encode()
            kept.append(line)
            if line.startswith(b"tree "):
                kept += [b"parent " + p.encode() for p in parents]
    return b"\n".join(kept) + sep + message


def _write_objects(copy: Git, objects: list[tuple[str, bytes]], tmp: Path) -> None:
    if not objects:
        return
    staging = tmp / "staging"
    staging.mkdir()
    paths, expected = [], []
    fmt = copy.object_format()
    for i, (kind, body) in enumerate(objects):
        p = staging / str(i)
        p.write_bytes(body)
        paths.append(str(p))
        expected.append(object_id(fmt, kind, body))
    got = copy.out("hash-object", "-t", "commit", "-w", "--no-filters", "--stdin-paths",
                   input=("\n".join(paths) + "\n").encode()).split()
    shutil.rmtree(staging)
    if got != expected:
        raise GitError("rewriting the shallow history gave unexpected commit ids")
