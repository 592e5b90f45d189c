"""``manifest.json``: the pointer to a workspace's current generation and its recent history.

Pure data: parsing is strict because the manifest comes from a store that may hold anything; a
manifest that does not parse, or names a bundle outside its key, is an :class:`IntegrityError`.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from watcherd.errors import IntegrityError, UsageError

FORMAT = 2
#: Formats this watcherd reads: 1 (one full bundle per generation) and 2 (a chain per generation).
READABLE = (1, 2)
MAX_CHAIN = 10_000
#: A manifest watcherd writes is a few KiB (``keep`` entries); anything far larger is not one.
MAX_SIZE = 1 * 2**20
_BUNDLE_NAME = re.compile(r"[0-9]{1,12}-[0-9a-f]{7,64}\.bundle")
_OID = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
MAX_NOTE = 1000  # characters of a checkpoint's note
#: A checkpoint's name: what a store key's part may be (letters, digits, ".", "_", "-").
CHECKPOINT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def checkpoint_name_problem(name: str, note: str = "") -> str | None:
    """Why ``name`` (and ``note``) cannot label a new checkpoint, None when they can. A name is
    a store key's segment (1 to 128 letters, digits, ``.``, ``_``, ``-``, starting with a letter
    or digit) that cannot be read as the other things ``watcherd rollback`` takes: a generation
    number or a snapshot id."""
    shown = "".join(c if c.isprintable() else "?" for c in name[:140])
    if not CHECKPOINT_NAME.fullmatch(name):
        return (f"checkpoint name {shown!r}: 1 to 128 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit")
    if name.isdigit() or re.fullmatch(r"[0-9a-f]{7,64}", name):
        return (f"checkpoint name {shown!r} reads as a generation number or a snapshot id; "
                "use a name with a letter beyond a-f (before-refactor, v2-green)")
    if len(note) > MAX_NOTE:
        return f"note: at most {MAX_NOTE} characters"
    return None


@dataclass(frozen=True)
class Writer:
    host: str
    pid: int


@dataclass(frozen=True)
class Link:
    """One bundle of a generation's chain: a full bundle (the base), or an increment holding only
    what is new since the links before it (whose tips are its prerequisites)."""

    bundle: str  # file name under <key>/bundles/
    size: int
    sha256: str
    snapshot: str  # the snapshot the bundle's ref points at


@dataclass(frozen=True)
class Generation:
    """One saved state of the workspace: the bundle it added, its whole chain, and what it holds.

    ``bundle``, ``size`` and ``sha256`` are the generation's own bundle, the last link of
    ``chain``. A generation of format 1 has no chain: its bundle alone is whole.
    """

    generation: int
    bundle: str  # file name under <key>/bundles/
    size: int
    sha256: str
    snapshot: str  # the snapshot history's head commit
    head_ref: str | None  # the user's branch (refs/heads/main), None when detached
    head: str | None  # the user's HEAD commit, None in an empty repository
    created_at: str  # RFC 3339, UTC
    writer: Writer
    chain: tuple[Link, ...] = ()  # base first; () for a format 1 generation

    @property
    def links(self) -> tuple[Link, ...]:
        """The bundles to fetch, in order, to restore this generation."""
        return self.chain or (Link(self.bundle, self.size, self.sha256, self.snapshot),)

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["chain"] = [asdict(link) for link in self.links]
        return doc


@dataclass(frozen=True)
class Superseded:
    """A generation a later save replaced without containing it, because a restore found it
    corrupt: which one, and why."""

    generation: int
    reason: str


@dataclass(frozen=True)
class Checkpoint:
    """A name a person gave to a generation: pinned, ``keep`` never prunes it."""

    name: str
    generation: int
    snapshot: str
    created_at: str
    note: str = ""


@dataclass(frozen=True)
class Fork:
    """Where this key's history began when it was forked from another key."""

    key: str
    generation: int
    snapshot: str


@dataclass(frozen=True)
class Manifest:
    current: Generation
    history: tuple[Generation, ...] = ()  # older generations, newest first
    supersedes: tuple[Superseded, ...] = ()  # what the current generation replaced, and why
    checkpoints: tuple[Checkpoint, ...] = ()  # newest first
    forked_from: Fork | None = None

    @property
    def generations(self) -> tuple[Generation, ...]:
        """Every generation the store keeps, newest first."""
        return (self.current, *self.history)

    def advance(self, new: Generation, keep: int) -> Manifest:
        """The manifest after ``new`` is saved, keeping ``keep`` generations in all."""
        return Manifest(new, self.generations[: max(keep - 1, 0)])

    def to_json(self) -> bytes:
        doc = {"format": FORMAT, **self.current.to_dict(),
               "history": [g.to_dict() for g in self.history]}
        if self.supersedes:
            doc["supersedes"] = [asdict(s) for s in self.supersedes]
        if self.checkpoints:
            doc["checkpoints"] = [asdict(c) for c in self.checkpoints]
        if self.forked_from:
            doc["forked_from"] = asdict(self.forked_from)
        return (json.dumps(doc, indent=2, sort_keys=False) + "\n").encode()

    def checkpoint(self, name: str) -> Checkpoint | None:
        return next((c for c in self.checkpoints if c.name == name), None)

    def labelled(self, name: str) -> Generation:
        """The generation checkpoint ``name`` labels. Raises :class:`UsageError` naming the
        checkpoints there are when there is no such one."""
        label = self.checkpoint(name)
        gen = self.find(label.generation) if label else None
        if gen is None:
            names = ", ".join(c.name for c in self.checkpoints) or "none"
            raise UsageError(f"--checkpoint {name}: no such checkpoint (there are: {names})")
        return gen

    def find(self, generation: int) -> Generation | None:
        return next((g for g in self.generations if g.generation == generation), None)


def bundle_name(generation: int, snapshot: str) -> str:
    return f"{generation}-{snapshot[:12]}.bundle"


def bundle_generation(name: str) -> int | None:
    """The generation number in a bundle file name, None when the name is not ours."""
    return int(name.split("-", 1)[0]) if _BUNDLE_NAME.fullmatch(name) else None


def now_rfc3339() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_time(text: str) -> datetime:
    """An RFC 3339 / ISO 8601 time; naive times are taken as UTC."""
    t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return t if t.tzinfo else t.replace(tzinfo=UTC)


class NewerFormat(IntegrityError):
    """The manifest was written by a newer watcherd: this one must not read or replace it."""


def parse(data: bytes, where: str) -> Manifest:
    """Parse and check a stored manifest; ``where`` names it in errors.

    Every way the bytes can be wrong is an :class:`IntegrityError` (never "nothing stored"):
    too large, not UTF-8, not JSON or nested beyond reason, a field missing or invalid; a newer
    ``format`` is a :class:`NewerFormat` that says to upgrade.
    """
    if len(data) > MAX_SIZE:
        raise IntegrityError(f"{where} is {len(data)} bytes or more, far larger than a manifest "
                             f"watcherd writes ({MAX_SIZE} bytes at most); the store may be corrupt")
    try:
        doc = json.loads(data.decode("utf-8", "strict"))
    except UnicodeDecodeError:
        raise IntegrityError(f"{where} is not UTF-8 text; the store may be corrupt") from None
    except RecursionError:
        raise IntegrityError(f"{where} is JSON nested too deeply to be a manifest; the store may "
                             "be corrupt") from None
    except ValueError as exc:
        raise IntegrityError(f"{where} is not valid JSON ({exc}); the store may be corrupt") from None
    if not isinstance(doc, dict):
        raise IntegrityError(f"{where} is not a JSON object")
    fmt = doc.get("format")
    if isinstance(fmt, int) and not isinstance(fmt, bool) and fmt > FORMAT:
        raise NewerFormat(f"{where} has format {fmt}, written by a newer watcherd (this one reads "
                          f"formats up to {FORMAT}): upgrade watcherd")
    if fmt not in READABLE or isinstance(fmt, bool):
        raise IntegrityError(f"{where}: unsupported format {fmt!r} (this watcherd reads formats "
                             f"{', '.join(map(str, READABLE))})")
    current = _generation(doc, where)
    history_doc = doc.get("history", [])
    if not isinstance(history_doc, list):
        raise IntegrityError(f"{where}: history is not a list")
    history = tuple(_generation(h, f"{where} history[{i}]") for i, h in enumerate(history_doc))
    if fmt >= 2 and any(not g.chain for g in (current, *history)):
        raise IntegrityError(f"{where}: a format {fmt} generation without its chain")
    numbers = [g.generation for g in (current, *history)]
    if any(a <= b for a, b in zip(numbers, numbers[1:])):
        raise IntegrityError(f"{where}: generations are not in descending order: {numbers}")
    supersedes = []
    for i, item in enumerate(doc.get("supersedes", []) or []):
        if not isinstance(item, dict) or not isinstance(item.get("generation"), int) \
                or not isinstance(item.get("reason"), str):
            raise IntegrityError(f"{where}: supersedes[{i}] is not a generation and a reason")
        supersedes.append(Superseded(item["generation"], item["reason"][:1000]))
    return Manifest(current, history, tuple(supersedes), _checkpoints(doc, where, numbers),
                    _fork(doc.get("forked_from"), where))


def _checkpoints(doc: dict, where: str, numbers: list[int]) -> tuple[Checkpoint, ...]:
    items = doc.get("checkpoints", []) or []
    if not isinstance(items, list) or len(items) > MAX_CHAIN:
        raise IntegrityError(f"{where}: checkpoints is not a list")
    found = []
    for i, item in enumerate(items):
        try:
            name, gen, snap = item["name"], item["generation"], item["snapshot"]
            note, created = item.get("note", ""), item["created_at"]
            ok = (isinstance(name, str) and CHECKPOINT_NAME.fullmatch(name)
                  and isinstance(gen, int) and gen in numbers
                  and isinstance(snap, str) and _OID.fullmatch(snap)
                  and isinstance(note, str) and len(note) <= MAX_NOTE
                  and isinstance(created, str))
        except (KeyError, TypeError):
            ok = False
        if not ok:
            raise IntegrityError(f"{where}: checkpoints[{i}] is not a name, a kept generation, "
                                 "a snapshot and a time")
        found.append(Checkpoint(name, gen, snap, created, note))
    return tuple(found)


def _fork(item: Any, where: str) -> Fork | None:
    if item is None:
        return None
    try:
        key, gen, snap = item["key"], item["generation"], item["snapshot"]
        if isinstance(key, str) and len(key) <= 512 and isinstance(gen, int) and \
                isinstance(snap, str) and _OID.fullmatch(snap):
            return Fork(key, gen, snap)
    except (KeyError, TypeError):
        pass
    raise IntegrityError(f"{where}: forked_from is not a key, a generation and a snapshot")


def _generation(doc: Any, where: str) -> Generation:
    if not isinstance(doc, dict):
        raise IntegrityError(f"{where}: a generation entry is not a JSON object")

    def field(name: str, kind: type, pattern: re.Pattern[str] | None = None, optional: bool = False):
        value = doc.get(name)
        if value is None and optional:
            return None
        if not isinstance(value, kind) or isinstance(value, bool):
            raise IntegrityError(f"{where}: field {name!r} is missing or not a {kind.__name__}")
        if pattern is not None and not pattern.fullmatch(value):
            raise IntegrityError(f"{where}: field {name!r} has an unexpected value {value!r}")
        return value

    generation = field("generation", int)
    size = field("size", int)
    if generation < 1 or size < 0:
        raise IntegrityError(f"{where}: generation and size must be positive")
    # A hostile or broken manifest must not point at "../other-key/..." or an absolute path.
    bundle = field("bundle", str, _BUNDLE_NAME)
    head_ref = field("head_ref", str, optional=True)
    if head_ref is not None and not head_ref.startswith("refs/heads/"):
        raise IntegrityError(f"{where}: head_ref {head_ref!r} is not a branch")
    created_at = field("created_at", str)
    try:
        parse_time(created_at)
    except ValueError:
        raise IntegrityError(f"{where}: created_at {created_at!r} is not an RFC 3339 time") from None
    writer = doc.get("writer")
    if not isinstance(writer, dict):
        raise IntegrityError(f"{where}: field 'writer' is missing")
    pid = writer.get("pid") or 0
    if not isinstance(pid, int) or isinstance(pid, bool):
        raise IntegrityError(f"{where}: field 'writer' has a pid that is not a number: {pid!r}")
    gen = Generation(
        generation=generation,
        bundle=bundle,
        size=size,
        sha256=field("sha256", str, _SHA256),
        snapshot=field("snapshot", str, _OID),
        head_ref=head_ref,
        head=field("head", str, _OID, optional=True),
        created_at=created_at,
        writer=Writer(str(writer.get("host", "?"))[:255], pid),
        chain=_chain(doc.get("chain"), where),
    )
    if gen.chain and gen.chain[-1] != Link(gen.bundle, gen.size, gen.sha256, gen.snapshot):
        raise IntegrityError(f"{where}: the chain does not end with the generation's own bundle")
    return gen


def _chain(items: Any, where: str) -> tuple[Link, ...]:
    if items is None:
        return ()
    if not isinstance(items, list) or not items or len(items) > MAX_CHAIN:
        raise IntegrityError(f"{where}: field 'chain' is not a list of 1 to {MAX_CHAIN} bundles")
    links = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise IntegrityError(f"{where}: chain[{i}] is not a JSON object")
        bundle, size, sha, snap = (item.get(k) for k in ("bundle", "size", "sha256", "snapshot"))
        if not (isinstance(bundle, str) and _BUNDLE_NAME.fullmatch(bundle)
                and isinstance(size, int) and not isinstance(size, bool) and size >= 0
                and isinstance(sha, str) and _SHA256.fullmatch(sha)
                and isinstance(snap, str) and _OID.fullmatch(snap)):
            raise IntegrityError(f"{where}: chain[{i}] is not a bundle name, size, sha256 and "
                                 "snapshot")
        links.append(Link(bundle, size, sha, snap))
    return tuple(links)
