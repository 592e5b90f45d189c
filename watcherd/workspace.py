"""The workspace's git state, read as data: the one place where untrusted bytes become values.

Everything under the workspace, ``.git`` included, is written by code watcherd must not trust (the
user's app, an AI agent), while watcherd holds the store's credentials. So in ``shadow`` mode git
never runs with the workspace's git directory as its repository: this module reads what a
snapshot needs — HEAD, loose refs, ``packed-refs``, the stash's reflog, the index, ``info/exclude``,
``shallow`` and the config — as plain files, and hands on typed, validated values:

* a path is followed only where it resolves inside the workspace (``.git`` as a ``gitdir:`` file,
  a linked worktree's ``commondir``, a symlinked ``.git``), and then opened one component at a
  time with ``O_NOFOLLOW``, so a link swapped in after the check is refused, never followed;
* only regular files are read (a FIFO would block, a device would never end), each up to a size
  bound, and none with a hole (git writes none: a sparse file costs the agent no disk and
  watcherd its size in memory);
* ref names follow git's ``check-ref-format`` rules, object ids are hex of the repository's
  format; anything else is skipped with a warning, never a reason to fail the whole snapshot.

What git itself must interpret (the index, the config's syntax) is copied out as bytes here and
read by watcherd's own repository (:mod:`watcherd.repo`) from its copy.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from watcherd.errors import WorkspaceError

# Size bounds of what is read. Generous for real repositories, small enough that a planted
# multi-gigabyte file cannot exhaust the sidecar's memory.
MAX_SMALL_FILE = 4096  # HEAD, a loose ref, the .git file, commondir
MAX_PACKED_REFS = 64 * 2**20
MAX_REFS = 100_000
MAX_CONFIG = 1 * 2**20
MAX_EXCLUDE = 1 * 2**20
MAX_SHALLOW = 16 * 2**20
MAX_STASH_LOG = 4 * 2**20
MAX_INDEX = 1 * 2**30  # in all: one snapshot reads the nested repositories' indexes within it
_REF_DEPTH = 32

_OID = {"sha1": re.compile(r"[0-9a-f]{40}"), "sha256": re.compile(r"[0-9a-f]{64}")}
_BAD_REF_CHARS = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]")
LEGACY_SNAPSHOT_REF = "refs/watcherd/snapshots"


class Unsafe(Exception):
    """A path or file of the workspace that is not read: outside it, a link, not a regular file,
    too large. The message names it."""


class NotRegular(Unsafe):
    """An :class:`Unsafe` file that is no regular file (a FIFO, a socket, a device): git, which
    opens it by path without ``O_NONBLOCK``, blocks on it."""


@dataclass(frozen=True)
class Layout:
    """Where a workspace's git directory is, resolved and checked.

    ``git_dir`` holds HEAD and the index; ``common_dir`` the refs, objects, ``info/`` and config
    (they differ in a linked worktree). Both None when the workspace is not a repository
    (``problem`` is None) or when its ``.git`` cannot be used safely (``problem`` says why).
    ``internal`` lists git directories inside the work tree under another name than ``.git``
    (a ``gitdir:`` file pointing at ``.repo/``): a snapshot must leave them out. ``boundary``:
    the workspace a nested repository is in (nothing of it is read outside that), else None.
    ``blocks``: the problem is a file git would block on (:class:`NotRegular`).
    """

    root: Path
    git_dir: Path | None = None
    common_dir: Path | None = None
    problem: str | None = None
    internal: tuple[str, ...] = ()
    boundary: Path | None = None
    blocks: bool = False

    @property
    def is_repository(self) -> bool:
        return self.git_dir is not None

    @property
    def top(self) -> Path:
        """The directory nothing is read outside of: the workspace."""
        return self.boundary or self.root


@dataclass(frozen=True)
class Ref:
    """A ref: ``oid`` for a direct one, ``target`` (another ref's name) for a symbolic one."""

    name: str
    oid: str | None = None
    target: str | None = None


@dataclass(frozen=True)
class Head:
    """HEAD: on branch ``ref`` (``oid`` None while unborn), or detached at ``oid`` (ref None)."""

    ref: str | None
    oid: str | None


@dataclass(frozen=True)
class StashEntry:
    """One line of the stash's reflog: what ``git stash list`` shows."""

    old: str
    new: str
    ident: str  # "Name <email> 1700000000 +0000"
    message: str


@dataclass(frozen=True)
class GitState:
    """The workspace's git state at one moment, every value validated."""

    object_format: str = "sha1"
    head: Head = Head("refs/heads/main", None)
    refs: tuple[Ref, ...] = ()
    stash: tuple[StashEntry, ...] = ()
    config: bytes = b""
    index: bytes | None = None
    index_problem: str | None = None  # why the index was not read (None: read, or there is none)
    exclude: bytes = b""
    shallow: tuple[str, ...] = ()
    legacy_snapshot: str | None = None
    warnings: tuple[str, ...] = field(default=(), compare=False)

    def ref(self, name: str) -> str | None:
        """The object id ``name`` resolves to (symbolic refs followed), None when unresolved."""
        by_name = {r.name: r for r in self.refs}
        for _ in range(_REF_DEPTH):
            r = by_name.get(name)
            if r is None:
                return None
            if r.oid is not None:
                return r.oid
            name = r.target or ""
        return None


# -- locating --------------------------------------------------------------------------------------


def locate(root: Path, *, boundary: Path | None = None) -> Layout:
    """Find the workspace's git directory without following anything out of ``boundary``
    (default: ``root``; for a nested repository, the workspace it is in).

    Raises :class:`WorkspaceError` when ``root`` itself is missing or not a directory.
    """
    root = Path(os.path.realpath(root))
    if not root.is_dir():
        raise WorkspaceError(f"workspace.path {root} does not exist or is not a directory")
    top = Path(os.path.realpath(boundary)) if boundary is not None else root
    outer = top if top != root else None
    dotgit = root / ".git"
    try:
        st = os.lstat(dotgit)
    except FileNotFoundError:
        return Layout(root, boundary=outer)
    except OSError as exc:
        return Layout(root, problem=f"{dotgit} cannot be read: {exc.strerror}", boundary=outer)
    try:
        if stat.S_ISREG(st.st_mode):
            text = read_file(top, dotgit, MAX_SMALL_FILE).decode("utf-8", "strict").strip()
            if not text.startswith("gitdir:"):
                raise Unsafe(f"{dotgit} is a file but not a 'gitdir:' link")
            git_dir = inside(top, _relative_to(root, text[len("gitdir:"):].strip()))
        elif stat.S_ISDIR(st.st_mode) or stat.S_ISLNK(st.st_mode):
            git_dir = inside(top, dotgit)
        else:
            raise Unsafe(f"{dotgit} is neither a directory nor a 'gitdir:' file")
        if not git_dir.is_dir():
            raise Unsafe(f"{dotgit} names {git_dir}, which is not a directory")
        common_dir = git_dir
        common = _small(top, git_dir / "commondir", required=False)
        if common is not None:
            common_dir = inside(top, _relative_to(git_dir, common.strip()))
        if not (common_dir / "objects").is_dir() and not (common_dir / "HEAD").exists():
            raise Unsafe(f"{common_dir} does not look like a git directory (no objects/, no HEAD)")
    except (Unsafe, UnicodeDecodeError) as exc:
        return Layout(root, problem=str(exc) if isinstance(exc, Unsafe)
                      else f"{dotgit} is not UTF-8 text", boundary=outer,
                      blocks=isinstance(exc, NotRegular))
    internal = tuple(sorted({_rel(root, d) for d in (git_dir, common_dir)
                             if _under(d, root) and d != dotgit and not _under(d, dotgit)}))
    return Layout(root, git_dir, common_dir, None, internal, outer)


def inside(root: Path, path: Path) -> Path:
    """``path`` resolved, if that is inside ``root`` (which must be resolved); else :class:`Unsafe`."""
    resolved = Path(os.path.realpath(path))
    if resolved != root and root not in resolved.parents:
        raise Unsafe(f"{path} resolves to {resolved}, outside the workspace {root}")
    return resolved


def nested_head(root: Path, rel: str) -> str | None:
    """The commit checked out in the nested repository at ``rel`` ('/'-separated, relative to
    the workspace ``root``, resolved), read as data by :func:`read_state`'s rules with the whole
    workspace as the boundary: its ``.git`` (a directory or a ``gitdir:`` file), ``commondir``,
    ``HEAD``, the branch's loose ref or ``packed-refs``, never followed out of ``root``.

    None when ``rel`` holds no repository now (no ``.git``, no ``HEAD``), or its branch is
    unborn or missing. Raises :class:`NotRegular` when a part git reads (its config too) is no
    regular file, :class:`Unsafe` when a part cannot be read safely otherwise (reached through a
    link, outside ``root``, too large, not a ref) or git cannot open it (an unknown format).
    """
    path = root / rel
    if Path(os.path.realpath(path)) != path:
        raise Unsafe(f"{rel} is reached through a link")
    try:
        layout = locate(path, boundary=root)
    except WorkspaceError:
        return None  # gone meanwhile
    if layout.problem:
        raise (NotRegular if layout.blocks else Unsafe)(layout.problem)
    if layout.git_dir is None or layout.common_dir is None:
        return None
    try:
        config = read_file(root, layout.common_dir / "config", MAX_CONFIG)
    except NotRegular:
        raise  # git reads it too, and blocks on it
    except (FileNotFoundError, Unsafe):
        config = b""
    if unknown := _unknown_format(config):
        # git cannot open it (and then reads the workspace's .gitmodules instead, a failure of
        # its own there failing the whole add): no repository watcherd records.
        raise Unsafe(f"{rel}: git cannot open a repository of {unknown}")
    oid = _OID[_object_format(config)]
    head_text = _small(root, layout.git_dir / "HEAD", required=False)
    if head_text is None:
        return None  # no repository to git either (being made or removed)
    head = _parse_head(head_text, oid)
    name = head.ref
    for _ in range(_REF_DEPTH):
        if name is None:
            return head.oid
        text = _small(root, layout.common_dir / name, required=False)
        if text is None:
            try:
                packed = read_file(root, layout.common_dir / "packed-refs", MAX_PACKED_REFS)
            except FileNotFoundError:
                return None
            return {r.name: r.oid for r in _parse_packed(packed, oid, [])}.get(name)
        value = text.strip()
        if value.startswith("ref:") and valid_ref_name(value[4:].strip()):
            name = value[4:].strip()
        elif oid.fullmatch(value) and set(value) != {"0"}:
            return value
        else:
            raise Unsafe(f"{rel}: ref {name} does not hold an object id")
    raise Unsafe(f"{rel}: more than {_REF_DEPTH} symbolic refs in a row")


def nested_object_format(root: Path, rel: str) -> str | None:
    """The object format (``sha1``, ``sha256``) the nested repository at ``rel`` declares in its
    config, read as :func:`nested_head` reads it; None when none can be read safely."""
    try:
        layout = locate(root / rel, boundary=root)
        if layout.problem or layout.common_dir is None:
            return None
        return _object_format(read_file(root, layout.common_dir / "config", MAX_CONFIG))
    except (WorkspaceError, Unsafe, OSError):
        return None


# -- reading ---------------------------------------------------------------------------------------


def read_state(layout: Layout, *, index_read: int = 0) -> GitState:
    """Read the git state of a repository workspace as data; see the module's rules.

    ``index_read``: bytes of other repositories' indexes the same snapshot read already (the
    workspace's, nested ones'); this index is read only within what they left of
    :data:`MAX_INDEX`, else left out like one that cannot be read.

    Never raises for what the workspace holds: unreadable parts become warnings and are left out
    (a ref that does not parse is skipped, a missing index is None, one that cannot be read is
    None with ``index_problem`` saying why). Raises :class:`Unsafe` only when HEAD itself cannot
    be read safely (nothing consistent could be recorded).
    """
    assert layout.git_dir is not None and layout.common_dir is not None
    root, git_dir, common = layout.top, layout.git_dir, layout.common_dir
    warnings: list[str] = []
    config = _optional(root, common / "config", MAX_CONFIG, warnings) or b""
    fmt = _object_format(config)
    oid = _OID[fmt]

    head_text = _small(root, git_dir / "HEAD", required=True)
    head = _parse_head(head_text, oid)

    refs: dict[str, Ref] = {}
    packed = _optional(root, common / "packed-refs", MAX_PACKED_REFS, warnings)
    if packed is not None:
        for r in _parse_packed(packed, oid, warnings):
            refs[r.name] = r
    for r in _loose_refs(root, common, oid, warnings):
        refs[r.name] = r  # a loose ref wins over its packed copy, as in git
    legacy = refs.pop(LEGACY_SNAPSHOT_REF, None)
    refs = {n: r for n, r in refs.items() if not n.startswith("refs/watcherd/")}
    if head.ref is not None and head.ref in refs and refs[head.ref].oid:
        head = Head(head.ref, refs[head.ref].oid)
    elif head.ref is not None and head.ref in refs:
        head = Head(head.ref, GitState(refs=tuple(refs.values())).ref(head.ref))

    stash: tuple[StashEntry, ...] = ()
    if "refs/stash" in refs:
        log = _optional(root, common / "logs" / "refs" / "stash", MAX_STASH_LOG, warnings)
        stash = _parse_stash_log(log or b"", oid, warnings)

    index, index_problem = None, None
    # Said without the bytes left: the note stays the same while this index does.
    bound = (f"what is left of the {MAX_INDEX} bytes of indexes one snapshot reads (nested "
             "repositories' included)") if index_read else None
    try:
        index = read_file(root, git_dir / "index", MAX_INDEX - index_read, bound=bound)
    except FileNotFoundError:
        pass
    except Unsafe as exc:
        index_problem = str(exc)
    exclude = _optional(root, common / "info" / "exclude", MAX_EXCLUDE, warnings) or b""
    shallow_raw = _optional(root, common / "shallow", MAX_SHALLOW, warnings) or b""
    shallow = tuple(sorted({line for line in shallow_raw.decode("ascii", "replace").split()
                            if oid.fullmatch(line)}))
    return GitState(
        object_format=fmt,
        head=head,
        refs=tuple(sorted(refs.values(), key=lambda r: r.name)),
        stash=stash,
        config=config,
        index=index,
        index_problem=index_problem,
        exclude=exclude,
        shallow=shallow,
        legacy_snapshot=legacy.oid if legacy else None,
        warnings=tuple(warnings),
    )


def read_file(root: Path, path: Path, limit: int, *, bound: str | None = None) -> bytes:
    """The bytes of regular file ``path`` (inside ``root``): as many as ``fstat`` says it holds,
    at most ``limit`` (``bound``: what that limit is, in the message; default: its bytes).

    The path is resolved first and must stay inside ``root``; then each component is opened with
    ``O_NOFOLLOW`` (a link swapped in meanwhile is refused), the file with ``O_NONBLOCK`` (a FIFO
    must not block) and ``fstat`` must say it is a regular file. A file with a hole (sparse) is
    refused before anything is read: git writes every file of ``.git`` whole, so a hole was
    planted, to make watcherd read (and, for the index, write back) gigabytes of zeros that cost
    the agent no disk. The bytes go into one buffer of the file's size, never chunks and then
    their join: a big file is in memory once. Bytes appended meanwhile are the next read's.
    Raises :class:`FileNotFoundError` when it does not exist, :class:`Unsafe` for everything else.
    """
    resolved = inside(root, path)
    with _open_nofollow(root, resolved) as fd:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegular(f"{path} is not a regular file")
        if st.st_size > limit:
            raise Unsafe(f"{path} is {st.st_size} bytes, above "
                         f"{bound or f'the {limit} bytes watcherd reads'}")
        if _has_hole(fd, st.st_size, path):
            raise Unsafe(f"{path} has holes (a sparse file): git never writes one")
        data = os.pread(fd, st.st_size, 0)
        while len(data) < st.st_size and (more := os.pread(fd, st.st_size - len(data), len(data))):
            data += more  # a short read (rare); a file cut meanwhile ends at its new end
        return data


def _has_hole(fd: int, size: int, path: Path) -> bool:
    """Whether open file ``fd`` of ``size`` bytes has a hole before its end (lseek(2)
    ``SEEK_HOLE``; a file smaller than a block has none). False where the filesystem or kernel
    cannot tell; :class:`Unsafe` when lseek fails otherwise."""
    try:
        return os.lseek(fd, 0, os.SEEK_HOLE) < size
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.ENXIO, errno.EOPNOTSUPP):
            return False  # no hole information (ENXIO: an empty file, offset 0 is its end)
        raise Unsafe(f"{path} cannot be read: {exc.strerror}") from None


def is_fifo(path: Path) -> bool:
    """Whether ``path`` itself (not what a link there names) is a FIFO; False when it is gone."""
    try:
        return stat.S_ISFIFO(os.lstat(path).st_mode)
    except OSError:
        return False


def is_plain_dir(root: Path, path: Path) -> bool:
    """Whether ``path`` is a directory reached without any symbolic link, inside ``root``."""
    try:
        resolved = inside(root, path)
    except Unsafe:
        return False
    if resolved != Path(os.path.abspath(path)):
        return False
    try:
        return stat.S_ISDIR(os.lstat(resolved).st_mode)
    except OSError:
        return False


@contextmanager
def _open_nofollow(root: Path, resolved: Path) -> Iterator[int]:
    parts = resolved.relative_to(root).parts
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
            flags |= os.O_NONBLOCK if last else os.O_DIRECTORY
            try:
                nxt = os.open(part, flags, dir_fd=fd)
            except OSError as exc:
                if exc.errno == errno.ENOENT:
                    raise FileNotFoundError(errno.ENOENT, "not found", str(resolved)) from None
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise Unsafe(f"{resolved} changed into a link while being read") from None
                raise Unsafe(f"{resolved} cannot be read: {exc.strerror}") from None
            os.close(fd)
            fd = nxt
        yield fd
    finally:
        os.close(fd)


def _small(root: Path, path: Path, *, required: bool) -> str | None:
    try:
        return read_file(root, path, MAX_SMALL_FILE).decode("utf-8", "strict")
    except FileNotFoundError:
        if required:
            raise Unsafe(f"{path} does not exist") from None
        return None
    except UnicodeDecodeError:
        raise Unsafe(f"{path} is not UTF-8 text") from None


def _optional(root: Path, path: Path, limit: int, warnings: list[str]) -> bytes | None:
    try:
        return read_file(root, path, limit)
    except FileNotFoundError:
        return None
    except Unsafe as exc:
        warnings.append(f"{exc}; left out")
        return None


def _object_format(config: bytes) -> str:
    # Only this one value is read from the raw text: which hash the objects use. A sha256
    # repository says so with extensions.objectFormat (git's documentation, "hash-function
    # transition"); everything else in the config waits for git to parse a copy.
    text = config.decode("utf-8", "replace").lower()
    in_extensions = False
    for line in text.splitlines():
        line = line.split("#", 1)[0].split(";", 1)[0].strip()
        if line.startswith("["):
            in_extensions = line.replace(" ", "") == "[extensions]"
        elif in_extensions and line.replace(" ", "") == "objectformat=sha256":
            return "sha256"
    return "sha1"


# The repository extensions git 2.39 reads (Documentation/technical/repository-version.txt;
# setup.c, handle_extension_v0 and handle_extension): those allowed in a format-0 repository,
# and those only a format-1 one may name (git refuses a format-0 repository naming one).
_EXTENSIONS_V0 = frozenset({"noop", "preciousobjects", "partialclone", "worktreeconfig"})
_EXTENSIONS_V1 = frozenset({"noop-v1", "objectformat"})
_SECTION = re.compile(r'\s*\[\s*([A-Za-z0-9.-]+)\s*("(?:[^"\\]|\\.)*")?\s*\](.*)')
_VARIABLE = re.compile(r"\s*([A-Za-z][A-Za-z0-9-]*)\s*(?:=(.*))?")
_BOOLEAN = re.compile(r"true|false|yes|no|on|off|-?[0-9]+[kmg]?|")  # git_parse_maybe_bool


def _unknown_format(config: bytes) -> str | None:
    """What in ``config`` (raw bytes of a repository's config) makes git refuse to open the
    repository: a line it cannot parse, a ``core.bare`` that is no boolean, a
    ``core.repositoryformatversion`` above 1 or not a number, an
    ``extensions.*`` git does not know in a format-1 repository, or one only format 1 may name
    in a format-0 one (git-config(1)'s syntax: a variable may follow its section header on the
    same line, blanks around ``=``, a value in quotes, a comment after it). None when git
    opens it."""
    section, version, extensions, continued = "", "0", [], False
    text = config.decode("utf-8", "replace").removeprefix("\ufeff")  # git skips a BOM
    for number, line in enumerate(text.splitlines(), 1):
        if continued:  # the rest of a value continued with a backslash
            continued = line.rstrip().endswith("\\")
            continue
        if m := _SECTION.match(line):
            section = m[1].lower() if m[2] is None else ""  # a subsection is none of these
            line = m[3]
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", ";")):
            continue
        if (m := _VARIABLE.fullmatch(stripped)) is None:
            return f"a config git cannot parse (line {number})"
        continued = stripped.endswith("\\")
        key = m[1].lower()
        value = _config_value(m[2]) if m[2] is not None else "true"
        if section == "core" and key == "repositoryformatversion":
            version = value
        elif section == "core" and key == "bare" and not _BOOLEAN.fullmatch(value.lower()):
            return f"core.bare {value[:20]!r}, no boolean"  # git dies parsing it
        elif section == "extensions":
            extensions.append(key)
    if version not in ("0", "1"):
        return f"repository format {version[:20]!r}"
    known = _EXTENSIONS_V0 | _EXTENSIONS_V1 if version == "1" else _EXTENSIONS_V0
    if version == "0":
        strict = [e for e in extensions if e in _EXTENSIONS_V1]
        if strict:
            return f"format 0 naming extension {strict[0]}"
        return None  # git ignores the other extensions of a format-0 repository
    unknown = [e for e in extensions if e not in known]
    return f"extension {unknown[0]}" if unknown else None


def _config_value(text: str) -> str:
    """A config value as git reads it, enough to compare a number: quotes taken away, a comment
    after it (``#``, ``;`` outside quotes) and the blanks around it dropped."""
    out, quoted = [], False
    for ch in text.strip():
        if ch == '"':
            quoted = not quoted
        elif ch in "#;" and not quoted:
            break
        else:
            out.append(ch)
    return "".join(out).strip()


def _parse_head(text: str, oid: re.Pattern[str]) -> Head:
    line = text.strip()
    if line.startswith("ref:"):
        name = line[4:].strip()
        if not valid_ref_name(name) or not name.startswith("refs/heads/"):
            raise Unsafe(f"HEAD names {name!r}, which is not a branch")
        return Head(name, None)
    if oid.fullmatch(line) and set(line) != {"0"}:
        return Head(None, line)
    raise Unsafe("HEAD is neither a branch nor an object id")


def _parse_packed(data: bytes, oid: re.Pattern[str], warnings: list[str]) -> list[Ref]:
    refs: list[Ref] = []
    bad = 0
    for raw in data.split(b"\n"):
        if not raw or raw.startswith((b"#", b"^")):
            continue
        try:
            value, name = raw.decode("utf-8", "strict").split(" ", 1)
        except (UnicodeDecodeError, ValueError):
            bad += 1
            continue
        if oid.fullmatch(value) and valid_ref_name(name):
            refs.append(Ref(name, value))
        else:
            bad += 1
        if len(refs) > MAX_REFS:
            warnings.append(f"packed-refs holds more than {MAX_REFS} refs; the rest are left out")
            break
    if bad:
        warnings.append(f"packed-refs: {bad} lines that are not '<id> <ref>' left out")
    return refs


def _loose_refs(root: Path, common: Path, oid: re.Pattern[str], warnings: list[str]) -> list[Ref]:
    refs: list[Ref] = []
    top = common / "refs"
    if not is_plain_dir(root, top):
        if os.path.lexists(top):
            warnings.append(f"{top} is not a plain directory; loose refs left out")
        return refs
    stack = [("refs", top)]
    while stack:
        prefix, directory = stack.pop()
        try:
            with os.scandir(directory) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            warnings.append(f"{directory} cannot be listed ({exc.strerror}); its refs left out")
            continue
        for e in entries:
            name = f"{prefix}/{e.name}"
            if e.name.endswith(".lock"):
                continue  # a ref being written: its old value is in the ref itself or packed
            try:
                is_dir = e.is_dir(follow_symlinks=False)
            except OSError:
                continue
            if is_dir:
                if name.count("/") < _REF_DEPTH:
                    stack.append((name, Path(e.path)))
                continue
            if not valid_ref_name(name):
                warnings.append(f"ref {printable(name)!r} is not a valid ref name; left out")
                continue
            try:
                text = read_file(root, Path(e.path), MAX_SMALL_FILE).decode("utf-8", "strict")
            except FileNotFoundError:
                continue  # deleted meanwhile
            except (Unsafe, UnicodeDecodeError) as exc:
                warnings.append(f"ref {name}: {exc}; left out")
                continue
            value = text.strip()
            if value.startswith("ref:") and valid_ref_name(value[4:].strip()):
                refs.append(Ref(name, target=value[4:].strip()))
            elif oid.fullmatch(value) and set(value) != {"0"}:
                refs.append(Ref(name, value))
            else:
                warnings.append(f"ref {name} does not hold an object id; left out")
            if len(refs) > MAX_REFS:
                warnings.append(f"more than {MAX_REFS} loose refs; the rest are left out")
                return refs
    return refs


def _parse_stash_log(data: bytes, oid: re.Pattern[str], warnings: list[str]) -> tuple[StashEntry, ...]:
    entries: list[StashEntry] = []
    line_re = re.compile(r"(\S+) (\S+) ([^\n<>]*<[^\n<>]*> \d{1,12} [+-]\d{4})\t?([^\n]*)")
    for raw in data.decode("utf-8", "replace").splitlines():
        m = line_re.fullmatch(raw)
        if not m or not oid.fullmatch(m[2]) or not (oid.fullmatch(m[1])):
            warnings.append("a line of the stash's reflog does not parse; left out")
            continue
        entries.append(StashEntry(m[1], m[2], m[3], printable(m[4])))
    return tuple(entries)


def valid_ref_name(name: str) -> bool:
    """git's ``check-ref-format`` rules for a full ref name (``refs/...``), plus a length bound.

    Source: git-check-ref-format(1): no component starting with ``.`` or ending with ``.lock``,
    no ``..``, no control characters, space, ``~ ^ : ? * [ \\``, no ``@{``, not ending with ``/``
    or ``.``, no empty component.
    """
    if not name.startswith("refs/") or len(name) > 1024:
        return False
    if _BAD_REF_CHARS.search(name) or ".." in name or "@{" in name or name.endswith((".", "/")):
        return False
    return all(part and not part.startswith(".") and not part.endswith(".lock")
               for part in name.split("/"))


def printable(text: str) -> str:
    """``text`` with control characters escaped, for logs and messages."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _relative_to(base: Path, text: str) -> Path:
    """The path a ``gitdir:`` or ``commondir`` ``text`` names from ``base``; :class:`Unsafe`
    when it leads into ``/proc``, which each process sees as its own (``/proc/self/cwd`` is
    git's working directory to git, watcherd's to watcherd)."""
    p = Path(text)
    full = p if p.is_absolute() else base / p
    if Path(os.path.normpath(full)).parts[1:2] == ("proc",):
        raise Unsafe(f"{text[:200]!r} leads into /proc: not followed")
    return full


def _under(path: Path, top: Path) -> bool:
    return path == top or top in path.parents


def _rel(root: Path, path: Path) -> str:
    return PurePosixPath(path.relative_to(root)).as_posix()
