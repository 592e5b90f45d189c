"""The generations protocol's pure core (``watcherd.protocol``), with no git and no store.

Examples for each rule, and a Hypothesis state machine over everything that can happen to a key:
writers that edit, save, race and restore; bundles and manifests that go bad; saves that fail
half way. Histories are modelled as a DAG of integers; the store as a dict. Invariants:

* the store only moves forward (or supersedes generations a restore recorded as bad, from a
  history that holds the newest good one);
* nothing stored is deleted except by ``keep``, or a conflict copy replaced by a newer copy of
  the same divergence;
* every refused save is reported refused and its history is in a conflict copy;
* no dead end: from every state, a new pod that restores, edits and saves either moves the store
  forward or gets a clear refusal (an unreadable manifest), never a silent loss.
"""

from __future__ import annotations

import hashlib
import itertools

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from watcherd import manifest as mf
from watcherd import protocol
from watcherd.protocol import BadGenerations, Verdict


def gen(n: int, snapshot: str) -> mf.Generation:
    return mf.Generation(n, mf.bundle_name(n, snapshot), 10, "0" * 64, snapshot, None, None,
                         "2026-01-01T00:00:00Z", mf.Writer("h", 1))


def snap(i: int) -> str:
    """Snapshot ``i``'s id: a hash, so ids differ in their first digits as git's do."""
    return hashlib.sha1(str(i).encode()).hexdigest()


def unsnap(snapshot: str) -> int:
    return _IDS[snapshot]


_IDS: dict[str, int] = {}


def manifest(*numbers_and_snaps: tuple[int, int]) -> mf.Manifest:
    for _, s in numbers_and_snaps:
        _IDS[snap(s)] = s
    gens = [gen(n, snap(s)) for n, s in numbers_and_snaps]
    return mf.Manifest(gens[0], tuple(gens[1:]))


# -- examples ------------------------------------------------------------------------------------------


def test_first_save_is_forward_and_the_same_history_is_unchanged():
    assert protocol.decide_save(None, snap(1), lambda s: False).verdict is Verdict.FORWARD
    m = manifest((1, 1))
    assert protocol.decide_save(m, snap(1), lambda s: True).verdict is Verdict.UNCHANGED


def test_a_history_without_the_stored_head_is_refused():
    m = manifest((2, 2), (1, 1))
    d = protocol.decide_save(m, snap(9), lambda s: s == snap(1))
    assert d.verdict is Verdict.REFUSE and "generation 2" in d.reason


def test_a_generation_recorded_bad_is_superseded_by_a_history_with_the_newest_good_one():
    m = manifest((3, 3), (2, 2), (1, 1))
    bad = BadGenerations(frozenset({3, 2}), current=3, reasons=((3, "sha256 mismatch"),))
    d = protocol.decide_save(m, snap(9), lambda s: s == snap(1), bad)
    assert d.verdict is Verdict.SUPERSEDE and d.supersedes == (3, 2)
    assert "sha256 mismatch" in d.reason
    # ...but not when the record speaks of another manifest (another writer saved since).
    assert protocol.decide_save(m, snap(9), lambda s: s == snap(1),
                                BadGenerations(frozenset({2}), current=2)).verdict is Verdict.REFUSE
    # ...nor from a history that does not hold the newest good generation.
    assert protocol.decide_save(m, snap(9), lambda s: False, bad).verdict is Verdict.REFUSE
    # ...nor when a generation above the good one was not found bad.
    partial = BadGenerations(frozenset({3}), current=3)
    assert protocol.decide_save(m, snap(9), lambda s: s == snap(1), partial).verdict \
        is Verdict.REFUSE


def test_a_conflict_already_kept_is_not_uploaded_again_and_a_newer_one_replaces_it():
    ours = snap(7)
    copies = [protocol.ConflictCopy(protocol.conflict_name(f"2026010{i}T000000Z", "pod-a", snap(i)),
                                    f"2026010{i}T000000Z", "pod-a", snap(i)[:12])
              for i in (5, 6)]
    same = protocol.plan_conflict(copies + [protocol.ConflictCopy(
        protocol.conflict_name("20260109T000000Z", "pod-a", ours), "20260109T000000Z", "pod-a",
        ours[:12])], "pod-a", ours, lambda p: True)
    assert not same.upload and same.existing.startswith("20260109")
    moved = protocol.plan_conflict(copies, "pod-a", ours, lambda p: p == snap(6)[:12])
    assert moved.upload and moved.delete == (copies[1].name,)
    other = protocol.plan_conflict(copies, "pod-b", ours, lambda p: True)
    assert other.upload and other.delete == ()  # another writer's copies are never touched


def test_conflict_copies_per_writer_are_bounded():
    copies = [protocol.ConflictCopy(f"2026010{i}T000000Z-pod-a-{snap(i)[:12]}.bundle",
                                    f"2026010{i}T000000Z", "pod-a", snap(i)[:12]) for i in range(5)]
    plan = protocol.plan_conflict(copies, "pod-a", snap(9), lambda p: False, keep=3)
    assert plan.upload and len(copies) + 1 - len(plan.delete) == 3
    assert set(plan.delete) == {copies[0].name, copies[1].name, copies[2].name}


def test_prunable_keeps_what_the_manifest_names_and_racing_uploads_above_it():
    before = manifest((2, 2), (1, 1))
    after = protocol.next_manifest(before, gen(3, snap(3)), keep=2)
    listed = [g.bundle for g in before.generations] + [mf.bundle_name(3, snap(3)),
                                                       mf.bundle_name(4, snap(4))]
    assert protocol.prunable(before, after, listed) == {mf.bundle_name(1, snap(1))}


# -- the model -----------------------------------------------------------------------------------------


class KeyModel(RuleBasedStateMachine):
    """One store key, two pods writing it, restores, damage and failures."""

    KEEP = 3

    @initialize()
    def start(self) -> None:
        self.ids = itertools.count(1)
        self.parents: dict[int, set[int]] = {}
        self.manifest: mf.Manifest | None = None
        self.unreadable = False  # the manifest exists but cannot be read
        self.bundles: dict[str, str] = {}  # name -> "good" | "corrupt"
        self.conflicts: dict[str, int] = {}  # name -> snapshot id
        self.ever_written: set[str] = set()
        self.refused_heads: set[int] = set()
        self.dropped_for_bound: set[int] = set()
        self.deleted_by_keep: set[str] = set()
        self.deleted_conflicts: set[str] = set()
        self.pods = {"a": self._new_pod(None), "b": self._new_pod(None)}
        self.history_of_current: list[mf.Generation] = []
        self.refused_ok = True

    def _new_pod(self, head: int | None) -> dict:
        return {"head": head, "bad": None, "reported": None}

    def _snapshot(self, parent: int | None) -> int:
        n = next(self.ids)
        self.parents[n] = {parent} if parent is not None else set()
        _IDS[snap(n)] = n
        return n

    def contains(self, head: int | None, snapshot_hex: str) -> bool:
        target = _IDS.get(snapshot_hex)
        seen, todo = set(), [head] if head is not None else []
        while todo:
            n = todo.pop()
            if n == target:
                return True
            if n in seen:
                continue
            seen.add(n)
            todo.extend(self.parents.get(n, ()))
        return False

    def contains_prefix(self, head: int | None, prefix: str) -> bool:
        return any(snap(n).startswith(prefix) and self.contains(head, snap(n)) for n in self.parents)

    # -- what writers do ---------------------------------------------------------------------------

    @rule(pod=st.sampled_from("ab"))
    def edit(self, pod: str) -> None:
        p = self.pods[pod]
        p["head"] = self._snapshot(p["head"])

    @rule(pod=st.sampled_from("ab"), fail_after_upload=st.booleans())
    def save(self, pod: str, fail_after_upload: bool) -> None:
        p = self.pods[pod]
        if p["head"] is None:
            return
        ours = snap(p["head"])
        before = self.manifest
        if self.unreadable:
            p["reported"] = self._refuse(pod, "unreadable manifest")
            return
        d = protocol.decide_save(before, ours, lambda s: self.contains(p["head"], s), p["bad"])
        if d.verdict is Verdict.UNCHANGED:
            p["reported"] = "unchanged"
            return
        if d.verdict is Verdict.REFUSE:
            p["reported"] = self._refuse(pod, d.reason)
            return
        number = before.current.generation + 1 if before else 1
        name = mf.bundle_name(number, ours)
        if name in self.bundles:  # an orphan of a crashed save with the same name: next number
            number += 1
            name = mf.bundle_name(number, ours)
        self.bundles[name] = "good"
        self.ever_written.add(name)
        if fail_after_upload:  # disk full / killed before the manifest swap: an orphan
            p["reported"] = "failed"
            return
        new = gen(number, ours)
        after = protocol.next_manifest(before, new, self.KEEP,
                                       [mf.Superseded(g, d.reason) for g in d.supersedes])
        self._check_forward(before, after, p)
        self.manifest = after
        for doomed in protocol.prunable(before, after, list(self.bundles)):
            assert doomed not in {g.bundle for g in after.generations}
            del self.bundles[doomed]
            self.deleted_by_keep.add(doomed)
        if d.supersedes:
            p["bad"] = None
        p["reported"] = "saved"

    def _refuse(self, pod: str, reason: str) -> str:
        p = self.pods[pod]
        ours = snap(p["head"])
        copies = [protocol.parse_conflict(n) for n in self.conflicts]
        plan = protocol.plan_conflict([c for c in copies if c], f"pod-{pod}", ours,
                                      lambda prefix: self.contains_prefix(p["head"], prefix))
        if plan.upload:
            self.stamps = getattr(self, "stamps", 0) + 1
            name = protocol.conflict_name(f"20260101T{self.stamps:06d}Z", f"pod-{pod}", ours)
            self.conflicts[name] = p["head"]
            for old in plan.delete:
                assert f"-pod-{pod}-" in old  # only this writer's copies
                kept = self.conflicts.pop(old)
                mine_left = [n for n in self.conflicts if f"-pod-{pod}-" in n]
                # A copy goes only when the new one holds its history (the divergence moved on),
                # or to keep this writer at the bound.
                assert self.contains(p["head"], snap(kept)) or \
                    len(mine_left) == protocol.CONFLICTS_PER_WRITER, (old, mine_left)
                if not self.contains(p["head"], snap(kept)):
                    self.dropped_for_bound.add(kept)
        else:
            assert self.conflicts[plan.existing] == p["head"]
        self.refused_heads.add(p["head"])
        return "refused"

    def _check_forward(self, before: mf.Manifest | None, after: mf.Manifest, pod: dict) -> None:
        if before is None:
            return
        new_head = unsnap(after.current.snapshot)
        if self.contains(new_head, before.current.snapshot):
            return
        # Superseding: only over generations recorded bad, from a history holding the newest good.
        assert after.supersedes, "the store moved backwards without superseding anything"
        bad = {s.generation for s in after.supersedes}
        good = [g for g in before.generations if g.generation not in bad]
        assert not good or self.contains(new_head, good[0].snapshot)
        assert all(self.bundles.get(g.bundle) != "good" or g.generation in pod["bad"].generations
                   for g in before.generations if g.generation in bad)

    # -- what happens to the store -----------------------------------------------------------------

    @rule(which=st.integers(0, 5))
    def corrupt_a_bundle(self, which: int) -> None:
        if self.manifest:
            gens = self.manifest.generations
            self.bundles[gens[which % len(gens)].bundle] = "corrupt"

    @rule()
    def corrupt_the_manifest(self) -> None:
        if self.manifest:
            self.unreadable = True

    @rule()
    def repair_the_manifest(self) -> None:
        self.unreadable = False  # a person put a good copy back

    @rule(pod=st.sampled_from("ab"))
    def restore(self, pod: str) -> None:
        """A new pod: the newest good generation, fallbacks recorded; an unreadable manifest is a
        clear failure (exit 1), not an empty start."""
        if self.unreadable:
            self.pods[pod] = self._new_pod(self.pods[pod]["head"])  # restore fails: pod kept as is
            return
        if self.manifest is None:
            self.pods[pod] = self._new_pod(None)
            return
        bad = []
        for g in self.manifest.generations:
            if self.bundles.get(g.bundle) == "good":
                record = None
                if bad:
                    record = BadGenerations(frozenset(bad), self.manifest.current.generation)
                self.pods[pod] = {"head": unsnap(g.snapshot), "bad": record, "reported": None}
                return
            bad.append(g.generation)
        self.pods[pod] = self._new_pod(None)  # everything corrupt: exit 1, nothing replaced

    # -- invariants ------------------------------------------------------------------------------

    @invariant()
    def nothing_is_deleted_but_by_keep(self) -> None:
        if not hasattr(self, "bundles"):
            return
        for name in self.ever_written:
            assert name in self.bundles or name in self.deleted_by_keep

    @invariant()
    def every_refused_save_is_in_a_conflict_copy(self) -> None:
        if not hasattr(self, "pods"):
            return
        for head in self.refused_heads:
            # Kept whole: in a copy, or in the history of the newer copy that replaced it, unless
            # its copy went to keep its writer within the bound.
            assert any(self.contains(kept, snap(head)) for kept in self.conflicts.values()) or \
                any(self.contains(dropped, snap(head)) for dropped in self.dropped_for_bound)

    @invariant()
    def there_is_always_a_way_forward(self) -> None:
        """A new pod that restores, edits and saves moves the store forward, unless the manifest
        cannot be read (then it is refused, clearly) or nothing good is left to restore."""
        if not hasattr(self, "manifest") or self.manifest is None:
            return
        good = [g for g in self.manifest.generations if self.bundles.get(g.bundle) == "good"]
        if self.unreadable or not good:
            return
        bad = [g.generation for g in self.manifest.generations if g.generation > good[0].generation]
        record = BadGenerations(frozenset(bad), self.manifest.current.generation) if bad else None
        head = self._snapshot(unsnap(good[0].snapshot))
        d = protocol.decide_save(self.manifest, snap(head), lambda s: self.contains(head, s), record)
        assert d.verdict in (Verdict.FORWARD, Verdict.SUPERSEDE), d


KeyModel.TestCase.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)
test_the_protocol_has_no_dead_ends = KeyModel.TestCase


@pytest.mark.parametrize("data", [
    b'{"format": 3}', b"\xff\xfe{}", b"[" * 200_000, b'{"format": 1, "generation": "x"}',
    b"{" + b" " * (mf.MAX_SIZE + 10) + b"}",
])
def test_every_unreadable_manifest_is_an_integrity_error_never_nothing_stored(data):
    with pytest.raises(mf.IntegrityError):
        mf.parse(data, "m")


def test_a_newer_format_says_to_upgrade():
    with pytest.raises(mf.NewerFormat, match="upgrade watcherd"):
        mf.parse(b'{"format": 3, "generation": 1}', "m")
