"""The state commit: the workspace's git state at a snapshot, recorded as a git commit.

A shadow snapshot is a commit ``W`` whose tree is the working tree and whose parents are
``[previous snapshot, HEAD, S]`` (the first two when they exist). ``S``, the *state commit*, records
the rest of what a person would lose, read at the same moment as the tree (DESIGN, "Workspace
state"):

* its parents are every commit the refs, HEAD and the stash's reflog point at, so one bundle of
  the snapshot history carries the whole of it;
* its tree holds ``state.json`` (HEAD, every ref, the stash's reflog, the allowlisted config),
  ``index`` (the index as its own tree, when it could be recorded), ``tags`` (the raw annotated tag
  objects, which a tree cannot point at) and ``objects/`` (refs that point at a tree or a blob).

When the working tree holds nested repositories (a submodule, a ``git clone`` inside), a last
parent ``N`` follows ``S``: its tree's ``nested.json`` names, for each nested repository's path, its
own snapshot (a commit of the same shape: its working tree, its HEAD, its state commit), and its
parents are those snapshots, so the same bundle carries them (:func:`write_nested`).

``S`` and ``N`` have a fixed author, committer and date, so the same state always gives the same
commit and an unchanged state costs no new object. Restore reads ``S`` back with :func:`read`
(and ``N`` with :func:`load`); everything in them is checked again there, because what the store
returns is untrusted too.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from watcherd import log
from watcherd.errors import GitError, IntegrityError
from watcherd.git import Git, object_id
from watcherd.workspace import GitState, Head, Ref, StashEntry, printable, valid_ref_name

_log = log.get(__name__)
FORMAT = 1
SUBJECT = "watcherd: state"
NESTED_SUBJECT = "watcherd: nested repositories"
#: Nested repositories one snapshot saves at most (each is a snapshot of its own), and how deep
#: (repositories nested in nested ones).
MAX_NESTED = 256
MAX_NESTED_DEPTH = 4
_IDENT = "watcherd <watcherd@localhost> 0 +0000"
_OID = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
# The config a restore gives back (DESIGN, "Workspace state"): remotes, branch tracking, identity.
_CONFIG_KEY = re.compile(r"remote\.[^\n]{1,256}\.(url|pushurl|fetch)|branch\.[^\n]{1,256}\."
                         r"(remote|merge)|user\.(name|email)")
MAX_CONFIG_ENTRIES = 4096
_TAG_DEPTH = 8
_Object = tuple[str, str, bytes]  # (id, type, body), as Git.cat_objects reads it


@dataclass(frozen=True)
class Recorded:
    """What a state commit holds, validated."""

    head: Head
    refs: tuple[Ref, ...] = ()
    stash: tuple[StashEntry, ...] = ()
    config: tuple[tuple[str, str], ...] = ()
    index_tree: str | None = None
    tags: tuple[tuple[str, bytes], ...] = ()  # (id, raw tag object)
    notes: tuple[str, ...] = ()  # what was left out of the record, and why


@dataclass(frozen=True)
class Input:
    """What :func:`record` needs besides the workspace's refs: the parsed config, and the index
    (a copy in the state directory) or the reason there is none."""

    config: tuple[tuple[str, str], ...]
    index_file: Path | None
    index_problem: str | None = None


def parse_config(git: Git, raw: bytes, scratch: Path) -> tuple[tuple[str, str], ...]:
    """The allowlisted entries of a config file's bytes, parsed by git from a copy (a temporary
    file in directory ``scratch``).

    ``--no-includes``: an ``include.path`` of the workspace's is never followed. Entries git
    cannot parse give an empty result (the config is then not recorded), never an error.
    """
    if not raw:
        return ()
    with tempfile.NamedTemporaryFile(dir=scratch, prefix="config-") as f:
        f.write(raw)
        f.flush()
        r = git.run("config", "--file", f.name, "--no-includes", "--null", "--list", check=False)
    if r.returncode != 0:
        return ()
    entries = []
    for record in r.stdout.split(b"\0"):
        key, _, value = record.decode("utf-8", "surrogateescape").partition("\n")
        if _CONFIG_KEY.fullmatch(key) and "\0" not in value:
            entries.append((key, value))
    return tuple(entries[:MAX_CONFIG_ENTRIES])


def record(git: Git, state: GitState, given: Input, *, previous: str | None, scratch: Path,
           reader: Git | None = None) -> tuple[str, Recorded]:
    """Write the state commit for ``state`` into ``git``'s repository; (its id, what it holds).
    ``reader``: the same repository reading the workspace's objects too (default ``git``);
    ``scratch``: a directory for scratch files, on the repository's filesystem
    (:attr:`Repo.scratch`).

    Every object the record needs is copied into the repository's own packs first (``previous``,
    the last state commit, bounds the copy to what is new). A ref whose object is missing, or
    whose history is incomplete, is left out with a note; so is the index when git cannot write
    it as a tree (objects missing, a merge in progress). Raises :class:`GitError` only when git
    itself fails (a timeout, a full disk).
    """
    notes: list[str] = list(state.warnings)
    refs = list(state.refs)
    head = state.head
    stash = list(state.stash)

    wanted = {r.oid for r in refs if r.oid} | {e.new for e in stash}
    if head.ref is None and head.oid:
        wanted.add(head.oid)
    reader = reader or git
    types = _types(reader, wanted)
    tags, peeled = _tags(reader, {o for o, t in types.items() if t == "tag"}, types)

    def usable(oid: str | None, what: str) -> bool:
        kind = types.get(oid or "")
        if kind is None or kind == "missing":
            notes.append(f"{what} points at {oid}, which does not exist; left out")
            return False
        if kind == "tag" and oid not in tags:
            notes.append(f"{what} is a tag that does not resolve; left out")
            return False
        return True

    refs = [r for r in refs if r.oid is None or usable(r.oid, f"ref {r.name}")]
    stash = [e for e in stash if usable(e.new, "a stash entry")]
    if head.ref is None and head.oid and not usable(head.oid, "HEAD"):
        head = Head(None, None)

    index_tree, index_problem = _index_tree(git, given, scratch)
    roots = _roots(refs, stash, head, types, peeled, tags, index_tree)
    broken = copy_objects(reader, git, roots, previous, scratch)
    if broken:
        for oid in broken:
            notes.append(f"the history of {oid} is incomplete (objects are missing); "
                         "the refs that point at it are left out")
        refs = [r for r in refs if r.oid is None or peeled.get(r.oid, r.oid) not in broken
                and r.oid not in broken]
        stash = [e for e in stash if e.new not in broken]
        if head.oid in broken or peeled.get(head.oid or "") in broken:
            head = Head(head.ref, None) if head.ref else Head(None, None)
        if index_tree in broken:
            index_tree, index_problem = None, "the index names objects that do not exist"
        roots = _roots(refs, stash, head, types, peeled, tags, index_tree)
        if copy_objects(reader, git, roots, previous, scratch):
            raise GitError("copying the workspace's objects failed twice; retrying later")
    if index_problem:
        notes.append(f"index not recorded: {index_problem}")
    if head.ref is not None:
        head = Head(head.ref, next((r.oid for r in refs if r.name == head.ref), None))
    # Every tag object of the kept refs' chains (a tag of a tag needs its inner one back too),
    # only as the bytes its id names: a pack whose index lies is not believed here either.
    rec = Recorded(head, tuple(refs), tuple(stash), given.config, index_tree,
                   tuple((t, tags[t]) for t in sorted(tags) if object_id("sha256" if len(t) == 64 else "sha1", "tag", tags[t]) == t),
                   tuple(notes))
    return _write(git, rec, types, peeled), rec


def _index_tree(git: Git, given: Input, scratch: Path) -> tuple[str | None, str | None]:
    """The index as a tree (its staged content), or None and why it is not recorded."""
    if given.index_file is None:
        if given.index_problem:
            return None, given.index_problem
        # No index file yet (a repository nothing was ever added to): to git, an empty index.
        return git.out("mktree", input=b""), None
    # Its blobs are the workspace's (copied with the rest, copy_objects): only the trees here.
    r = git.run("write-tree", "--missing-ok", env={"GIT_INDEX_FILE": str(given.index_file)},
                check=False)
    if r.returncode == 0 and r.text:
        refused = _refused_paths(git, r.text, scratch) if _may_refuse(given.index_file) \
            else None
        if refused:
            # A restore reads this tree into the new index, and git refuses it there: the index
            # is recorded empty instead, so that every generation still restores.
            return git.out("mktree", input=b""), f"the index holds a path git refuses to " \
                f"check out ({refused}); recorded as empty"
        return r.text, None
    said = r.stderr.decode("utf-8", "replace")
    if "unmerged" in said:
        return None, "a merge is in progress (the index has unmerged paths)"
    if "invalid object" in said or "missing" in said:
        return None, "the index names objects that do not exist"
    return None, "git cannot read the index (" + printable(said.strip().splitlines()[-1][:200] \
        if said.strip() else "no message") + ")"


# What a path git refuses to check out has somewhere in an index file: ".git" followed by
# anything but a name's letters (".git/", ".git.", ".git::$INDEX_ALLOCATION", ".git\\"), a short
# name ("git~1", "gitmod~1"), ".gitmodules" (refused as a link), a backslash, "." or "..". An
# index without any of it needs no check; git's own read-tree decides for the others. Version 4
# indexes compress paths against the previous one, so they are always checked.
_SUSPECT_PATH = re.compile(rb"(?i)\.git(?![a-z0-9_-])|\.gitmodules|git~|gitmod~|\\|\.\.?/")


def _may_refuse(index_file: Path) -> bool:
    try:
        raw = Path(index_file).read_bytes()
    except OSError:
        return True
    return raw[4:8] == b"\x00\x00\x00\x04" or _SUSPECT_PATH.search(raw, 12) is not None


def _refused_paths(git: Git, tree: str, scratch: Path) -> str | None:
    """git's reason to refuse reading ``tree`` into an index (a path such as ``.git/hooks/x``,
    which an index written by the agent may hold), or None: ``read-tree`` into an index in
    ``scratch``, the very check a restore's ``read-tree`` makes (git's ``verify_path``)."""
    with _scratch_dir(scratch, "index-check-") as tmp:
        r = git.run("read-tree", tree, env={"GIT_INDEX_FILE": f"{tmp}/index"}, check=False)
    if r.returncode == 0:
        return None
    said = r.stderr.decode("utf-8", "replace").strip().splitlines()
    return printable(said[0][:200]) if said else "no message"


def _types(git: Git, oids: Iterable[str]) -> dict[str, str]:
    """Each object's type, or "missing"."""
    ids = sorted(oids)
    if not ids:
        return {}
    out = git.run("cat-file", "--batch-check=%(objectname) %(objecttype)",
                  input="".join(f"{o}\n" for o in ids).encode()).text
    types = {}
    for line in out.splitlines():
        oid, _, kind = line.partition(" ")
        types[oid] = kind
    return {o: types.get(o, "missing") for o in ids}


def _tags(git: Git, tag_ids: set[str], types: dict[str, str]) -> tuple[dict[str, bytes], dict[str, str]]:
    """The raw bytes of annotated tags, and what each peels to (its final non-tag object)."""
    raw: dict[str, bytes] = {}
    points: dict[str, str] = {}
    todo = set(tag_ids)
    for _ in range(_TAG_DEPTH):
        if not todo:
            break
        for oid, body in _cat_batch(git, sorted(todo)).items():
            raw[oid] = body
            m = re.match(rb"object ([0-9a-f]+)\ntype ([a-z]+)\n", body)
            if m:
                points[oid] = m[1].decode()
        targets = set(points.values()) - set(types)
        types.update(_types(git, targets))
        todo = {t for t in targets if types.get(t) == "tag"}
    peeled = {}
    for oid in tag_ids:
        target, hops = points.get(oid), 0
        while target is not None and types.get(target) == "tag" and hops < _TAG_DEPTH:
            target, hops = points.get(target), hops + 1
        if target is not None and types.get(target) not in (None, "missing", "tag"):
            peeled[oid] = target
    good = {t: b for t, b in raw.items() if t in peeled or types.get(points.get(t, "")) == "tag"}
    return good, peeled


def _cat_batch(git: Git, oids: list[str]) -> dict[str, bytes]:
    return {o[0]: o[2] for o in git.cat_objects(oids) if o is not None}


def _roots(refs, stash, head: Head, types, peeled, tags, index_tree) -> dict[str, str]:
    """Every object the record points at, with what its history must be complete for."""
    roots: dict[str, str] = {}
    for oid in [r.oid for r in refs if r.oid] + [e.new for e in stash] + \
            ([head.oid] if head.ref is None and head.oid else []):
        roots[oid] = types.get(oid, "commit")
        if oid in peeled:
            roots[peeled[oid]] = types.get(peeled[oid], "commit")
    if index_tree:
        roots[index_tree] = "tree"
    return roots


def copy_objects(reader: Git, git: Git, roots: dict[str, str], previous: str | None,
                 scratch: Path) -> set[str]:
    """Copy every object reachable from ``roots`` and not from ``previous`` into a pack of
    ``git``'s repository's own, read through ``reader`` (the same repository, reading the
    workspace's objects too); the pack is written in ``scratch`` first (a directory on the same
    filesystem as ``git``'s objects). The roots whose history is incomplete, empty when the copy
    succeeded.

    The workspace's objects are read by name and their bytes are the agent's: an object whose
    content is not what its name says (a loose object planted under another object's id) must
    never enter the history as that object. So, as a fetch does, every copied object gets its id
    from its content (``git index-pack``), and each root is then checked against watcherd's
    objects alone: a root that reaches a planted object is incomplete and left out."""
    if not roots:
        return set()
    stop = [f"^{previous}"] if previous else []
    lines = "".join(f"{o}\n" for o in sorted(roots)) + "".join(f"{s}\n" for s in stop)
    r = _pack_into(reader, git, lines, scratch)
    if r.returncode != 0 and len(roots) > 1:
        # One root's history cannot be read (missing, corrupt): copy the others one by one.
        for oid in sorted(roots):
            _pack_into(reader, git, f"{oid}\n" + "".join(f"{s}\n" for s in stop), scratch)
    # Checked on watcherd's objects alone: missing in the workspace, unreadable there, or not
    # what their names say (the copy indexed them under other ids), a root is incomplete.
    out = git.run("rev-list", "--objects", "--quiet", "--stdin", input=lines.encode(),
                  check=False)
    if out.returncode == 0:
        return set()
    broken = set()
    for oid in sorted(roots):
        check = git.run("rev-list", "--objects", "--quiet", oid, *stop, check=False)
        if check.returncode != 0:
            broken.add(oid)
    if not broken:
        raise GitError(f"copying objects into watcherd's repository failed: "
                       f"{r.stderr.decode('utf-8', 'replace').strip()[:300]}")
    return broken


def _pack_into(reader: Git, git: Git, revs: str, scratch: Path):
    """``pack-objects --revs`` of ``revs`` through ``reader``, written in ``scratch``, the pack
    taken into ``git``'s repository (:func:`_take_pack`); git's result."""
    with _scratch_dir(scratch, "copy-") as tmp:
        r = reader.run("pack-objects", "--revs", "--quiet", "--delta-base-offset",
                       f"{tmp}/pack", input=revs.encode(), check=False)
        if r.returncode == 0 and r.text:
            _take_pack(git, Path(tmp), r.text)
    return r


@contextmanager
def _scratch_dir(scratch: Path, prefix: str) -> Iterator[Path]:
    """A new directory in ``scratch``, removed after use. Group-shared as the state directory is
    (``mkdtemp`` makes it 0700): the lock that sweeps what a killed process left may be taken by
    another uid of the group (the daemon's, the app's ``watcherd restore``)."""
    with tempfile.TemporaryDirectory(prefix=prefix, dir=scratch) as tmp:
        os.chmod(tmp, 0o2770)
        yield Path(tmp)


def _take_pack(git: Git, tmp: Path, name: str) -> None:
    """Index the pack ``pack-<name>`` of ``tmp`` again from its content, then move it into the
    repository's packs (the pack, then its index: git finds a pack by its index)."""
    base = tmp / f"pack-{name}"
    for suffix in (".idx", ".rev"):
        Path(f"{base}{suffix}").unlink(missing_ok=True)
    r = git.run("index-pack", f"{base}.pack", check=False)
    if r.returncode != 0:  # not a pack git accepts: nothing of it is kept (the roots are checked)
        _log.warning("state.copy_refused", error=r.stderr.decode("utf-8", "replace").strip()[:300])
        return
    if _pack_count(Path(f"{base}.idx")) == 0:
        return  # nothing new: pack-objects writes a pack all the same
    pack_dir = git.git_dir / "objects" / "pack"
    for suffix in (".pack", ".rev", ".idx"):
        if os.path.exists(f"{base}{suffix}"):
            os.replace(f"{base}{suffix}", pack_dir / f"pack-{name}{suffix}")


def _pack_count(idx: Path) -> int:
    """How many objects pack index ``idx`` lists (idx v2: magic, version, then a fan-out table
    whose last entry is the count; gitformat-pack(5))."""
    try:
        with open(idx, "rb") as f:
            f.seek(8 + 255 * 4)
            return int.from_bytes(f.read(4), "big")
    except OSError:
        return -1


def _write(git: Git, rec: Recorded, types: dict[str, str], peeled: dict[str, str]) -> str:
    doc = {
        "format": FORMAT,
        "head": {"ref": rec.head.ref, "oid": rec.head.oid},
        "refs": [{"name": r.name, "symref": r.target} if r.target is not None
                 else {"name": r.name, "oid": r.oid} for r in rec.refs],
        "stash": [{"old": e.old, "new": e.new, "ident": e.ident, "message": e.message}
                  for e in rec.stash],
        "config": [list(kv) for kv in rec.config],
        "index": rec.index_tree is not None,
        "notes": list(rec.notes),
    }
    blob = _hash(git, "blob", (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode())
    entries = [f"100644 blob {blob}\tstate.json"]
    if rec.index_tree:
        entries.append(f"040000 tree {rec.index_tree}\tindex")
    if rec.tags:
        body = b"".join(b"%s tag %d\n%s\n" % (oid.encode(), len(raw), raw) for oid, raw in rec.tags)
        entries.append(f"100644 blob {_hash(git, 'blob', body)}\ttags")
    targets = {r.oid for r in rec.refs if r.oid} | {peeled[t] for t, _ in rec.tags if t in peeled}
    others = sorted(o for o in targets if types.get(o) in ("tree", "blob"))
    if others:
        listing = "".join(f"{'040000 tree' if types[o] == 'tree' else '100644 blob'} {o}\t{o}\n"
                          for o in others)
        entries.append(f"040000 tree {git.out('mktree', input=listing.encode())}\tobjects")
    tree = git.out("mktree", input=("\n".join(sorted(entries, key=lambda e: e.split('\t')[1]))
                                   + "\n").encode())
    commits = set()
    for oid in [r.oid for r in rec.refs if r.oid] + [e.new for e in rec.stash] + [rec.head.oid]:
        if oid is None:
            continue
        if types.get(oid) == "commit":
            commits.add(oid)
        elif types.get(peeled.get(oid, "")) == "commit":
            commits.add(peeled[oid])
    body = f"tree {tree}\n" + "".join(f"parent {c}\n" for c in sorted(commits)) + \
        f"author {_IDENT}\ncommitter {_IDENT}\n\n{SUBJECT}\n"
    return _hash(git, "commit", body.encode())


def _hash(git: Git, kind: str, data: bytes) -> str:
    return git.out("hash-object", "-t", kind, "-w", "--stdin", input=data)


def write_nested(git: Git, saved: dict[str, str]) -> str | None:
    """The commit ``N`` naming the snapshot of each nested repository: ``saved`` maps its path
    ('/'-separated, relative to the working tree) to that snapshot's commit. None when empty.

    Its parents are those snapshots (one bundle carries them), its tree one ``nested.json``;
    fixed author, committer and date: the same snapshots give the same commit."""
    if not saved:
        return None
    doc = {"format": FORMAT,
           "repositories": [{"path": p, "snapshot": saved[p]} for p in sorted(saved)]}
    blob = _hash(git, "blob", (json.dumps(doc, indent=1) + "\n").encode())
    tree = git.out("mktree", input=f"100644 blob {blob}\tnested.json\n".encode())
    body = f"tree {tree}\n" + "".join(f"parent {c}\n" for c in sorted(set(saved.values()))) + \
        f"author {_IDENT}\ncommitter {_IDENT}\n\n{NESTED_SUBJECT}\n"
    return _hash(git, "commit", body.encode())


# -- giving back -----------------------------------------------------------------------------------


def apply_refs(git: Git, rec: Recorded) -> None:
    """Make the refs, HEAD, allowlisted config and stash of ``git``'s repository (one watcherd
    just fetched a snapshot into) exactly what ``rec`` recorded: every other ref goes (the
    snapshot history, and whatever else a tampered bundle listed, are not the user's)."""
    for oid, raw in rec.tags:
        got = git.out("hash-object", "-t", "tag", "-w", "--stdin", input=raw)
        if got != oid:
            _log.warning("restore.tag_changed", tag=oid, written=got,
                         note="an annotated tag's stored bytes do not hash to its id")
    recorded = {r.name for r in rec.refs}
    fetched = git.out("for-each-ref", "--format=%(refname)").splitlines()
    lines = [f"update {r.name} {r.oid}\n" for r in rec.refs if r.oid]
    lines += [f"delete {name}\n" for name in fetched if name not in recorded]
    git.run("update-ref", "--no-deref", "--stdin", input="".join(lines).encode())
    for r in rec.refs:
        if r.target is not None:
            git.run("symbolic-ref", r.name, r.target)
    if rec.head.ref is not None:
        # What `git symbolic-ref HEAD <branch>` writes (a name read() checked), and the way it
        # does (HEAD.lock renamed over it: a git running beside this must never see HEAD
        # empty), without a git process: the repository is watcherd's own until the restore
        # or rollback is done.
        lock = git.git_dir / "HEAD.lock"
        lock.write_text(f"ref: {rec.head.ref}\n")
        os.replace(lock, git.git_dir / "HEAD")
    elif rec.head.oid is not None:
        git.run("update-ref", "--no-deref", "HEAD", rec.head.oid)
    for key, value in rec.config:
        git.run("config", "--add", key, value)
    if rec.stash:
        log_file = git.git_dir / "logs" / "refs" / "stash"
        log_file.parent.mkdir(parents=True, exist_ok=True)
        log_file.write_text("".join(f"{e.old} {e.new} {e.ident}\t{e.message}\n"
                                    for e in rec.stash))


# -- reading back ----------------------------------------------------------------------------------


def state_parent(git: Git, snapshot: str) -> str | None:
    """The state commit of snapshot ``snapshot`` (its last parent, or the one before its nested
    record), None for a snapshot written before state commits existed. :class:`GitError` when
    ``snapshot`` is not a commit here."""
    return _locate(git, snapshot)[1]


@dataclass(frozen=True)
class Loaded:
    """A snapshot as :func:`load` found it."""

    tree: str  # the work tree it recorded
    state_commit: str | None  # None: written before state commits existed
    recorded: Recorded | None  # what the state commit records (None with it)
    nested: dict[str, str] = field(default_factory=dict)  # nested repository path: its snapshot


def load(git: Git, snapshot: str) -> Loaded:
    """Snapshot ``snapshot``'s tree, state commit and what that records, and the snapshots of
    its nested repositories, read by ``git cat-file --batch`` processes (a restore waits for
    this; a git process costs ~2.5 ms).

    Raises :class:`GitError` when ``snapshot`` is not a commit here, :class:`IntegrityError` when
    its state commit or nested record does not parse as one watcherd wrote (a tampered store, a
    bug).
    """
    tree, last, objects, nested = _locate(git, snapshot)
    return Loaded(tree, last, None if last is None else _parse(last, *objects), nested)


def nested_parent(git: Git, snapshot: str) -> str | None:
    """The commit ``N`` of snapshot ``snapshot`` (see the module), None when it has none."""
    parents = _commit_parts(_commit(git, snapshot))[0].get("parent", [])
    if not parents:
        return None
    [found] = git.cat_objects([f"{parents[-1]}^{{commit}}"])
    return parents[-1] if found and _commit_parts(found[2])[1] == NESTED_SUBJECT else None


def _commit(git: Git, commit: str) -> bytes:
    [found] = git.cat_objects([f"{commit}^{{commit}}"])
    if found is None:
        raise GitError(f"{git.git_dir}: no commit {commit[:12]}")
    return found[2]


def _locate(git: Git, snapshot: str
            ) -> tuple[str, str | None, list[_Object | None], dict[str, str]]:
    """(the snapshot's tree, its state commit or None, that commit's state.json, index and tags
    objects, its nested repositories' snapshots by path)."""
    headers, _ = _commit_parts(_commit(git, snapshot))
    tree = headers.get("tree", [""])[0]
    if not _OID.fullmatch(tree):
        raise IntegrityError(f"snapshot {snapshot[:12]} is not a well-formed commit")
    parents = headers.get("parent", [])
    nested: dict[str, str] = {}
    if not parents:
        return tree, None, [], nested
    last = parents[-1]
    # One batch asks for the last parent as a state commit and as a nested record at once.
    commit, *objects, doc = git.cat_objects([f"{last}^{{commit}}", f"{last}:state.json",
                                             f"{last}:index", f"{last}:tags",
                                             f"{last}:nested.json"])
    if commit is not None and doc is not None and _commit_parts(commit[2])[1] == NESTED_SUBJECT:
        if doc[1] != "blob":
            raise IntegrityError(f"nested record {last[:12]} has no nested.json")
        nested = _parse_nested(last, commit[2], doc)
        parents = parents[:-1]
        if not parents:
            return tree, None, [], nested
        last = parents[-1]
        commit, *objects = git.cat_objects([f"{last}^{{commit}}", f"{last}:state.json",
                                            f"{last}:index", f"{last}:tags"])
    # A state commit says so in its subject and holds state.json; a user's commit that happens
    # to carry the same subject (the HEAD parent of an older watcherd's snapshot) does not.
    if commit is None or _commit_parts(commit[2])[1] != SUBJECT or objects[0] is None:
        return tree, None, [], nested
    return tree, last, objects, nested


def _parse_nested(commit: str, body: bytes, doc_object: _Object) -> dict[str, str]:
    """The nested.json of nested record ``commit`` (its body ``body``), checked: relative paths
    of plain names (no ``.``, ``..``, ``.git``, empty or absolute), each snapshot one of the
    commit's parents (so the bundles that carry the record carry it)."""
    where = f"nested record {commit[:12]}"
    parents = set(_commit_parts(body)[0].get("parent", []))
    try:
        doc = json.loads(doc_object[2])
        if doc["format"] != FORMAT:
            raise IntegrityError(f"{where}: format {doc['format']!r} is newer than this "
                                 "watcherd understands; upgrade watcherd")
        found: dict[str, str] = {}
        for item in doc["repositories"][:MAX_NESTED]:
            path, snap = item["path"], _oid(item["snapshot"])
            parts = path.split("/") if isinstance(path, str) else [""]
            if any(p in ("", ".", "..") or p.lower() == ".git" or "\0" in p for p in parts):
                raise ValueError(f"bad path {printable(str(path))[:80]!r}")
            if snap not in parents:
                raise ValueError(f"{snap[:12]} is not one of its parents")
            found[path] = snap
    except (KeyError, TypeError, ValueError, AttributeError, RecursionError) as exc:
        raise IntegrityError(f"{where}: nested.json is malformed ({exc})") from None
    return found


def read(git: Git, state_commit: str) -> Recorded:
    """What state commit ``state_commit`` records; :class:`IntegrityError` when it does not parse
    as a state watcherd wrote (a tampered store, a bug)."""
    doc, index, tags = git.cat_objects([f"{state_commit}:state.json", f"{state_commit}:index",
                                       f"{state_commit}:tags"])
    return _parse(state_commit, doc, index, tags)


def _commit_parts(body: bytes) -> tuple[dict[str, list[str]], str]:
    """A commit object's headers as git reads them (``tree``, then the ``parent`` lines that
    follow it, then the rest; a ``parent`` elsewhere is not a parent) and its subject as
    ``git log --format=%s`` gives it: blank lines skipped, then the first paragraph's lines with
    their trailing white space stripped, joined by spaces (git's pretty.c, format_subject)."""
    head, _, message = body.partition(b"\n\n")
    lines = head.decode("utf-8", "replace").split("\n")
    headers: dict[str, list[str]] = {}
    for i, line in enumerate(lines):
        name, _, value = line.partition(" ")
        if name == "tree" and i == 0:
            headers["tree"] = [value]
        elif name == "parent" and i > 0 and all(p.startswith("parent ") for p in lines[1:i]):
            headers.setdefault("parent", []).append(value)
    paragraph: list[str] = []
    for line in message.decode("utf-8", "replace").split("\n"):
        if line.strip():
            paragraph.append(line.rstrip())
        elif paragraph:
            break
    return headers, " ".join(paragraph)


def _parse(state_commit: str, doc_object: _Object | None, index: _Object | None,
           tags: _Object | None) -> Recorded:
    where = f"state commit {state_commit[:12]}"
    if doc_object is None or doc_object[1] != "blob":
        raise IntegrityError(f"{where} has no state.json")
    try:
        doc = json.loads(doc_object[2])
    except (ValueError, RecursionError) as exc:
        raise IntegrityError(f"{where}: state.json is not JSON ({exc})") from None
    try:
        if doc["format"] != FORMAT:
            raise IntegrityError(f"{where}: state format {doc['format']!r} is newer than this "
                                 "watcherd understands; upgrade watcherd")
        head = Head(_ref_or_none(doc["head"]["ref"]), _oid_or_none(doc["head"]["oid"]))
        refs = []
        for item in doc["refs"]:
            name = item["name"]
            if not valid_ref_name(name):
                raise ValueError(f"bad ref name {printable(str(name))!r}")
            if "symref" in item:
                target = item["symref"]
                if not valid_ref_name(target):
                    raise ValueError(f"bad symbolic ref target {printable(str(target))!r}")
                refs.append(Ref(name, target=target))
            else:
                refs.append(Ref(name, _oid(item["oid"])))
        stash = tuple(StashEntry(_oid(e["old"]), _oid(e["new"]), _line(e["ident"]),
                                 _line(e["message"])) for e in doc["stash"])
        config = tuple((_key(k), _value(v)) for k, v in doc["config"])
        notes = tuple(printable(str(n)) for n in doc.get("notes", []))
        has_index = doc["index"] is True
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise IntegrityError(f"{where}: state.json is malformed ({exc})") from None
    index_tree = None
    if has_index:
        if index is None or index[1] != "tree":
            raise IntegrityError(f"{where} says it holds the index, but has none")
        index_tree = index[0]
    recorded_tags = _parse_tags(tags[2], where) if tags is not None and tags[1] == "blob" else ()
    return Recorded(head, tuple(refs), stash, config, index_tree, recorded_tags, notes)


def _parse_tags(data: bytes, where: str) -> tuple[tuple[str, bytes], ...]:
    try:
        return tuple(tag_records(data))
    except ValueError as exc:
        raise IntegrityError(f"{where}: its tags do not parse ({exc})") from None


def tag_records(data: bytes) -> list[tuple[str, bytes]]:
    """The (id, raw object) records of a state commit's ``tags`` blob: ``<id> tag <size>\\n``,
    the object's ``<size>`` bytes, ``\\n``, over and over. :class:`ValueError` on anything else
    (the blob comes back from the store: a size that is not a count of the bytes that follow
    must not move the reading backwards or past the end)."""
    pos, tags = 0, []
    while pos < len(data):
        nl = data.find(b"\n", pos)
        if nl < 0:
            raise ValueError("a record header without its line end")
        fields = data[pos:nl].split(b" ")
        if (len(fields) != 3 or fields[1] != b"tag" or not fields[2].isdigit()
                or not _OID.fullmatch(fields[0].decode("ascii", "replace"))):
            raise ValueError("not a tag record")
        end = nl + 1 + int(fields[2])
        if data[end:end + 1] != b"\n":
            raise ValueError("a tag record shorter or longer than its size")
        tags.append((fields[0].decode("ascii"), data[nl + 1:end]))
        pos = end + 1
    return tags


def _oid(value: object) -> str:
    if not isinstance(value, str) or not _OID.fullmatch(value):
        raise ValueError(f"bad object id {printable(str(value))[:80]!r}")
    return value


def _oid_or_none(value: object) -> str | None:
    return None if value is None else _oid(value)


def _ref_or_none(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not valid_ref_name(value) or not value.startswith("refs/heads/"):
        raise ValueError(f"HEAD names {printable(str(value))!r}, which is not a branch")
    return value


def _line(value: object) -> str:
    if not isinstance(value, str) or "\n" in value or "\0" in value or len(value) > 4096:
        raise ValueError("a stash entry's text is not one line")
    return value


def _key(value: object) -> str:
    if not isinstance(value, str) or not _CONFIG_KEY.fullmatch(value):
        raise ValueError(f"config key {printable(str(value))[:80]!r} is not one watcherd records")
    return value


def _value(value: object) -> str:
    if not isinstance(value, str) or "\0" in value or len(value) > 65536:
        raise ValueError("a config value is not text")
    return value
