"""The snapshot timeline: every snapshot of a history, newest first, with what it changed, the
generation that first saved it and the checkpoints that name it (``watcherd log``,
``GET /snapshots``).

Read from the snapshot commits themselves: their committer time, and their message, which
watcherd writes as ``watcherd: snapshot (N files)`` followed by the first changed paths.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from watcherd import manifest as mf
from watcherd.git import Git
from watcherd.workspace import printable

_SUBJECT = re.compile(r"watcherd: snapshot \((\d+) files\)")
#: Paths listed per entry (a snapshot's message holds up to 50).
PATHS_SHOWN = 10


@dataclass(frozen=True)
class Entry:
    snapshot: str
    at: str  # RFC 3339, the snapshot's commit time
    files: int  # paths changed since the snapshot before it
    paths: tuple[str, ...]  # the first of them
    generation: int | None  # the first generation that holds it; None: not in the store yet
    checkpoints: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["paths"] = list(self.paths)
        doc["checkpoints"] = list(self.checkpoints)
        return doc


def read(git: Git, head: str, manifest: mf.Manifest | None, *, since: datetime | None = None,
         limit: int = 1000) -> list[Entry]:
    """The snapshots from ``head`` back along the snapshot history (first parents), newest
    first, at most ``limit``, none older than ``since``."""
    out = git.run("log", "--first-parent", f"--max-count={limit}",
                  "--format=%H%x00%cI%x00%B%x01", head).stdout.decode("utf-8", "surrogateescape")
    commits: list[tuple[str, str, int, tuple[str, ...]]] = []
    for record in out.split("\x01"):
        record = record.strip("\n")
        if not record:
            continue
        oid, at, message = record.split("\x00", 2)
        lines = message.splitlines()
        m = _SUBJECT.fullmatch(lines[0]) if lines else None
        if m is None:
            break  # the user's own commit the first snapshot sits on: the history's start
        paths = []
        for line in lines[2:]:
            if not line or line.startswith("... and "):
                break
            paths.append(printable(line))
        commits.append((oid, at, int(m[1]), tuple(paths[:PATHS_SHOWN])))
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
