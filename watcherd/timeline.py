"""The snapshot timeline: every snapshot of a history, newest first, with what it changed, the
generation that first saved it and the checkpoints that name it (``watcherd log``,
``GET /snapshots``).

Read from the snapshot commits themselves: their committer time, and their message, which
watcherd writes as ``watcherd: snapshot (N files)`` followed by the first changed paths.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from watcherd import bundle as bundles
from watcherd import log
from watcherd import manifest as mf
from watcherd.errors import WatcherdError
from watcherd.git import Git
from watcherd.repo import SNAPSHOT_REF, Repo
from watcherd.snapshot import MESSAGE_PATHS
from watcherd.units import parse_duration
from watcherd.workspace import printable

if TYPE_CHECKING:
    from watcherd.generations import Generations

_SUBJECT = re.compile(r"watcherd: snapshot \((\d+) files\)")
#: Paths listed per entry (a snapshot's message holds up to 50).
PATHS_SHOWN = 10


@dataclass(frozen=True)
class Entry:
    snapshot: str
    at: str  # RFC 3339, the snapshot's commit time
    files: int  # paths changed since the snapshot before it
    paths: tuple[str, ...]  # the first of them
    generation: int | None  # the oldest kept generation that holds it; None: not stored yet
    checkpoints: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["paths"] = list(self.paths)
        doc["checkpoints"] = list(self.checkpoints)
        return doc


def parse_moment(text: str) -> datetime:
    """A moment given as an RFC 3339 time (``2026-11-26T10:00:00Z``; naive is UTC) or as an age
    (``"2h"``, ``"90m"``: that long ago). Raises :class:`ValueError`."""
    try:
        return datetime.now(UTC) - timedelta(seconds=parse_duration(text))
    except ValueError:
        return mf.parse_time(text)


def read(git: Git, head: str, manifest: mf.Manifest | None, *, since: datetime | None = None,
         limit: int = 1000) -> list[Entry]:
    """The snapshots from ``head`` back along the snapshot history (first parents), newest
    first, at most ``limit``, none older than ``since``."""
    # -z: one NUL after each commit; a commit message cannot hold a NUL.
    out = git.run("log", "-z", "--first-parent", f"--max-count={limit}", "--format=%H %cI%n%B",
                  head).stdout.decode("utf-8", "surrogateescape")
    commits: list[tuple[str, str, int, tuple[str, ...]]] = []
    for record in out.split("\0"):
        lines = record.split("\n")
        ident = lines[0].split(" ")
        m = _SUBJECT.fullmatch(lines[1]) if len(lines) > 1 and len(ident) == 2 else None
        if m is None:
            break  # the user's own commit the first snapshot sits on: the history's start
        listed = min(int(m[1]), MESSAGE_PATHS)  # the message lists this many paths, one per line
        paths = tuple(printable(line) for line in lines[3:3 + min(listed, PATHS_SHOWN)])
        commits.append((ident[0], ident[1], int(m[1]), paths))
    by_snapshot = {g.snapshot: g.generation for g in (manifest.generations if manifest else ())}
    labels: dict[str, list[str]] = {}
    for c in manifest.checkpoints if manifest else ():
        labels.setdefault(c.snapshot, []).append(c.name)
    # Oldest first: a snapshot belongs to the first generation at or after it.
    entries: list[Entry] = []
    pending: list[tuple[str, str, int, tuple[str, ...]]] = []
    for commit in reversed(commits):
        pending.append(commit)
        if commit[0] in by_snapshot:
            entries += [_entry(p, by_snapshot[commit[0]], labels) for p in pending]
            pending.clear()
    entries += [_entry(p, None, labels) for p in pending]
    entries.reverse()
    if since is not None:
        entries = [e for e in entries if mf.parse_time(e.at) >= since]
    return entries


def _entry(commit: tuple[str, str, int, tuple[str, ...]], generation: int | None,
           labels: dict[str, list[str]]) -> Entry:
    oid, at, files, paths = commit
    return Entry(oid, at, files, paths, generation, tuple(labels.get(oid, ())))


def report(repo: Repo, generations: Generations, *, since: datetime | None = None,
           limit: int = 1000) -> dict[str, Any]:
    """The timeline as ``watcherd log --json`` and ``GET /snapshots`` give it::

        {"status": "ok", "key": str, "head": snapshot id | None,
         "source": "state_dir" | "store" (where the history was read),
         "snapshots": [Entry.to_dict(), ...] (newest first),
         "checkpoints": [{"name", "generation", "snapshot", "created_at", "note"}, ...],
         "forked_from": {"key", "generation", "snapshot"} | None,
         "store_error": str (only when the store could not be read: no generations then)}

    Read from watcherd's repository in the state directory; where there is none (a machine
    with only the store), from the newest generation's bundles, downloaded and checked like a
    restore's. Raises :class:`GitError` when the history cannot be read, :class:`IntegrityError`
    when the newest generation's bundles are corrupt."""
    doc: dict[str, Any] = {"status": "ok", "key": generations.key}
    try:
        manifest, _ = generations.read_manifest()
    except WatcherdError as exc:
        manifest = None
        doc["store_error"] = log.redact(str(exc))
    head = repo.snapshot_head()
    doc["source"] = "state_dir"
    if head is not None:
        entries = read(repo.bare, head, manifest, since=since, limit=limit)
    elif manifest is not None:
        head, doc["source"] = manifest.current.snapshot, "store"
        with tempfile.TemporaryDirectory(prefix="watcherd-log-") as scratch:
            git = _fetched(generations, manifest.current, Path(scratch))
            entries = read(git, head, manifest, since=since, limit=limit)
    else:
        entries = []
    doc["head"] = head
    doc["snapshots"] = [e.to_dict() for e in entries]
    doc["checkpoints"] = [asdict(c) for c in (manifest.checkpoints if manifest else ())]
    doc["forked_from"] = asdict(manifest.forked_from) if manifest and manifest.forked_from \
        else None
    return doc


def _fetched(generations: Generations, gen: mf.Generation, scratch: Path) -> Git:
    """A bare repository in ``scratch`` holding generation ``gen``'s snapshot history."""
    chain = generations.fetch(gen, scratch)
    git = Git(scratch / "history.git", home=scratch)
    git.run("init", "--bare", "--quiet", "--template=",
            f"--object-format={bundles.object_format(chain[0])}", str(scratch / "history.git"))
    for path in chain:
        bundles.fetch_bundle(git, path, refspec=f"+{SNAPSHOT_REF}:{SNAPSHOT_REF}")
    return git
