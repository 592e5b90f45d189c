"""The generations protocol's rules as pure functions: may a save move the store forward, what
does a refused save keep, what may be deleted.

No I/O and no clock: every fact comes in as an argument (the stored manifest, which snapshots the
saving history contains, what a restore found corrupt), every decision goes out as a value. The
shell (:mod:`watcherd.generations`) reads the store and git, asks here, and acts. The rules
(DESIGN, "Ground rules" and "Restore"):

* the store only moves forward: a new generation's history contains the current one's snapshot;
* a generation a restore found corrupt does not block the store for ever: a history that contains
  the newest *good* generation supersedes the bad ones above it, and the manifest says so;
* a refused save is kept under ``conflicts/``, one copy per divergence (a newer copy of the same
  writer replaces the one its history contains), the newest few per writer;
* nothing stored is deleted except by ``keep`` (and a conflict copy by the rule above).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from watcherd import manifest as mf

#: Conflict copies kept per writer (host): each is a whole bundle.
CONFLICTS_PER_WRITER = 3
_CONFLICT_NAME = re.compile(r"(?P<stamp>[0-9]{8}T[0-9]{6}Z)-(?P<host>[A-Za-z0-9.-]{1,63})-"
                            r"(?P<snapshot>[0-9a-f]{12})(?:-[0-9]+)?\.bundle")


class Verdict(enum.Enum):
    UNCHANGED = "unchanged"  # the store holds exactly this history already
    FORWARD = "forward"  # a fast-forward: save the next generation
    SUPERSEDE = "supersede"  # forward from the newest good generation, over bad ones above it
    REFUSE = "refuse"  # not this history: keep it under conflicts/


@dataclass(frozen=True)
class BadGenerations:
    """What a restore found corrupt, recorded in the state directory.

    ``current`` is the manifest's current generation when it looked: the record speaks only of
    that manifest (another writer's later save makes it moot).
    """

    generations: frozenset[int]
    current: int
    reasons: tuple[tuple[int, str], ...] = ()


@dataclass(frozen=True)
class SaveDecision:
    verdict: Verdict
    reason: str = ""
    supersedes: tuple[int, ...] = ()  # generations above the good one, when superseding


def decide_save(stored: mf.Manifest | None, ours: str, contains: Callable[[str], bool],
                bad: BadGenerations | None = None) -> SaveDecision:
    """Whether the history whose head is ``ours`` may become the next generation.

    ``contains(snapshot)`` says whether that snapshot is part of ours (equal counts).
    """
    if stored is None:
        return SaveDecision(Verdict.FORWARD)
    current = stored.current
    if current.snapshot == ours:
        return SaveDecision(Verdict.UNCHANGED)
    if contains(current.snapshot):
        return SaveDecision(Verdict.FORWARD)
    if bad is not None and bad.current == current.generation:
        above = [g for g in stored.generations if g.generation in bad.generations]
        good = next((g for g in stored.generations if g.generation not in bad.generations), None)
        newer = [g.generation for g in stored.generations
                 if good is None or g.generation > good.generation]
        if above and set(newer) <= bad.generations and (good is None or contains(good.snapshot)):
            why = ", ".join(f"{n}: {r}" for n, r in bad.reasons) or "found corrupt by a restore"
            return SaveDecision(Verdict.SUPERSEDE, f"superseding generations {newer} ({why})",
                                tuple(sorted(newer, reverse=True)))
    return SaveDecision(Verdict.REFUSE,
                        f"the stored generation {current.generation} (snapshot "
                        f"{current.snapshot[:12]}) is not part of this workspace's history")


def next_manifest(stored: mf.Manifest | None, new: mf.Generation, keep: int,
                  supersedes: Sequence[mf.Superseded] = (),
                  forked_from: mf.Fork | None = None) -> mf.Manifest:
    """The manifest after ``new`` is saved: the newest ``keep`` generations, plus every older
    one a checkpoint pins (newest first); ``forked_from`` names where a first generation's
    history began."""
    if stored is None:
        return mf.Manifest(new, (), tuple(supersedes), (), forked_from)
    pinned = {c.generation for c in stored.checkpoints}
    older = stored.generations
    history = older[: max(keep - 1, 0)] + tuple(g for g in older[max(keep - 1, 0):]
                                                if g.generation in pinned)
    return mf.Manifest(new, history, tuple(supersedes), stored.checkpoints, stored.forked_from)


def label(manifest: mf.Manifest, checkpoint: mf.Checkpoint, keep_checkpoints: int) -> mf.Manifest:
    """``manifest`` with ``checkpoint`` added (a name already used moves to it), at most
    ``keep_checkpoints`` kept (the oldest go first); a generation no longer pinned and beyond
    ``keep`` stays listed until the next save prunes it."""
    if manifest.find(checkpoint.generation) is None:
        raise ValueError(f"generation {checkpoint.generation} is not in the manifest")
    others = [c for c in manifest.checkpoints if c.name != checkpoint.name]
    labels = tuple([checkpoint, *others][: max(keep_checkpoints, 1)])
    return mf.Manifest(manifest.current, manifest.history, manifest.supersedes, labels,
                       manifest.forked_from)


@dataclass(frozen=True)
class ChainPolicy:
    """When a save writes a new full bundle instead of an increment (config ``[store]``)."""

    max_increments: int = 50  # increments after a full bundle before the next full one
    max_increment_ratio: float = 0.5  # their total size, as a fraction of the full one's


def plan_chain(stored: mf.Manifest | None, decision: SaveDecision, policy: ChainPolicy,
               compact: bool) -> tuple[mf.Link, ...] | None:
    """The chain the next generation continues, or None for a new full bundle.

    An increment needs a good stored chain to stand on: the first save, and a save that
    supersedes bad generations, write a full bundle. Otherwise a full one (compaction) when the
    increments since the last full bundle got too many or too large, and only when ``compact`` is
    allowed (an idle save: never the final one on SIGTERM, which must be small and quick).
    """
    if stored is None or decision.verdict is not Verdict.FORWARD:
        return None
    links = stored.current.links
    increments = links[1:]
    if compact and (len(increments) >= policy.max_increments
                    or sum(link.size for link in increments)
                    > policy.max_increment_ratio * max(links[0].size, 1)):
        return None
    return links


def prunable(before: mf.Manifest | None, after: mf.Manifest, listed: Iterable[str]) -> set[str]:
    """Bundle names (under ``bundles/``) that no kept generation's chain needs, and orphans of
    crashed saves at or below the current generation (higher numbers may be a racing writer's
    upload). An increment of a pruned generation stays while a kept chain runs through it."""
    kept = {link.bundle for g in after.generations for link in g.links}
    doomed = {link.bundle for g in (before.generations if before else ()) for link in g.links
              if link.bundle not in kept}
    for name in listed:
        number = mf.bundle_generation(name)
        if number is not None and name not in kept and number <= after.current.generation:
            doomed.add(name)
    return doomed


@dataclass(frozen=True)
class ConflictCopy:
    """A conflict bundle's name, as the store lists it, and what the name says."""

    name: str  # under conflicts/
    stamp: str
    host: str
    snapshot: str | None  # the first 12 hex digits; None for names of an older watcherd


def parse_conflict(name: str) -> ConflictCopy | None:
    m = _CONFLICT_NAME.fullmatch(name)
    if m is None:
        return None
    return ConflictCopy(name, m["stamp"], m["host"], m["snapshot"])


def conflict_name(stamp: str, host: str, snapshot: str) -> str:
    return f"{stamp}-{host}-{snapshot[:12]}.bundle"


@dataclass(frozen=True)
class ConflictPlan:
    """What to do with a refused save: upload a new copy (or point at the one that holds it),
    then delete the copies it replaces."""

    upload: bool
    existing: str | None  # the copy that already holds this history, when not uploading
    delete: tuple[str, ...] = ()


def plan_conflict(copies: Iterable[ConflictCopy], host: str, ours: str,
                  contains: Callable[[str], bool], keep: int = CONFLICTS_PER_WRITER) -> ConflictPlan:
    """One copy per divergence: a history already kept is not uploaded again; a new copy
    replaces this writer's copies whose history it contains (it moved on); the newest ``keep``
    copies of this writer are kept. Other writers' copies are never touched.

    ``contains(prefix)`` says whether our history has a snapshot whose id starts with ``prefix``.
    """
    mine = sorted((c for c in copies if c.host == host and c.snapshot), key=lambda c: c.name)
    same = [c for c in mine if ours.startswith(c.snapshot)]
    if same:
        return ConflictPlan(upload=False, existing=same[-1].name)
    replaced = [c for c in mine if contains(c.snapshot)]
    left = [c for c in mine if c not in replaced]
    excess = left[: max(len(left) + 1 - keep, 0)]  # room for the new copy
    return ConflictPlan(upload=True, existing=None,
                        delete=tuple(c.name for c in replaced + excess))
