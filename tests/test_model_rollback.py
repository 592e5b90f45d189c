"""A model-based test of rollback in place: for every sequence of file operations, the user's
git, snapshots and rollbacks, a rollback to a snapshot gives back exactly the state recorded when
it was taken, and ``--undo`` gives back exactly the state the rollback started from.

The workspace model's rules (files, ignore rules, the user's git, restarts) drive a real
workspace; ``mark`` snapshots it and records its state with plain git; ``roll_back`` returns to
a random mark and ``undo`` to where the last rollback started. What a rollback leaves as it is,
by design, is left out of the comparison: files the rules ignored before the rollback (no
snapshot holds them), the user's git config (remotes, branch tracking), which stays theirs, and
a nested repository, before the rollback or in its target (docs/security.md: a rollback puts
back the workspace's own files and leaves a nested repository's as they are). A rollback whose
target would replace an ignored file is refused and changes nothing.
"""

from __future__ import annotations

import os
import subprocess

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import precondition, rule
from test_model_workspace import (BOUNDED, LONG, NESTED, WorkspaceModel, all_files,
                                  recorded_state)

from watcherd import rollback, snapshot


def ignored(path) -> set[str]:
    out = subprocess.run(["git", "ls-files", "-z", "--others", "--ignored", "--exclude-standard"],
                         cwd=path, capture_output=True).stdout
    return {p.decode("utf-8", "surrogateescape") for p in out.split(b"\0") if p}


def comparable(state: dict, leave_out: set[str]) -> dict:
    """``state`` without what a rollback keeps as it is (a directory in ``leave_out`` ends in
    "/": everything in it)."""
    state = dict(state)
    state.pop("remotes")
    state.pop("tracking")
    state.pop("nested")
    dirs = tuple(p for p in leave_out if p.endswith("/"))
    state["files"] = {k: v for k, v in state["files"].items()
                      if k not in leave_out and not (k + "/").startswith(dirs)}
    state["status"] = "".join(
        line for line in state["status"].splitlines(keepends=True)
        if not line.startswith(("# branch.upstream", "# branch.ab"))
        and not (line.startswith("? ") and line[2:].rstrip("\n") in leave_out)
        # a left-out directory's own line too: a gitlink's submodule state (a new commit in
        # the nested repository) is that repository's, left as it is
        and not (line[0] in "12?" and (_path(line) + "/").startswith(dirs)))
    return state


def _path(line: str) -> str:
    """The path a ``git status --porcelain=v2`` entry line is about."""
    if line.startswith("? "):
        return line[2:].rstrip("\n")
    return line.rstrip("\n").split(" ", 8 if line[0] == "1" else 9)[-1].split("\t")[0]


class RollbackModel(WorkspaceModel):
    """The workspace model, with snapshots to return to."""

    marks: list

    @rule()
    def mark(self) -> None:
        expected = recorded_state(self.ws)
        snap = snapshot.take(self.repo, "shadow", self.cache)
        if snap.snapshot_head is not None:
            if not hasattr(self, "marks"):
                self.marks = []
            self.marks.append((snap.snapshot_head, expected))

    @precondition(lambda self: getattr(self, "marks", None))
    @rule(data=st.data())
    def roll_back(self, data) -> None:
        target, expected = data.draw(st.sampled_from(self.marks))
        self._roll(rollback.Target(target, None, "mark"), expected)

    @precondition(lambda self: getattr(self, "before_rollback", None) is not None)
    @rule()
    def undo(self) -> None:
        undo, expected = self.before_rollback
        self._roll(rollback.Target(undo, None, "--undo"), expected)

    def _roll(self, target: rollback.Target, expected: dict) -> None:
        leave_out = ignored(self.ws)
        before = recorded_state(self.ws)
        # An ignored file the target's files would replace (one at a path the target holds
        # otherwise, under a path it holds as a file, or where it needs a directory): no
        # snapshot keeps it, so the rollback is refused and changes nothing.
        now, wanted = all_files(self.ws), expected["files"]
        in_the_way = [p for p in leave_out if (p in wanted and now.get(p) != wanted[p]) or any(
            p.startswith(f"{f}/") or f.startswith(f"{p}/") for f in wanted)]
        # A repository nested in the workspace, or a submodule the index keeps without its
        # .git (a gitlink hiding the directory's files), is left as it is by a rollback; so is
        # the .git of one in a directory whose files the workspace's index tracks (those files
        # are the workspace's, its .git is not).
        gitlink = any(line.startswith("160000 ") and line.endswith(f"\t{NESTED}")
                      for line in before["index"].splitlines())
        if before["nested"] is not None or expected["nested"] is not None or gitlink or \
                os.path.lexists(self.ws / NESTED / ".git"):
            leave_out.add(f"{NESTED}/")
        with self.repo.lock():
            if in_the_way:
                with pytest.raises(rollback.RollbackRefused, match="ignored"):
                    rollback.apply(self.repo, target, cache=self.cache)
                assert recorded_state(self.ws) == before and all_files(self.ws) == now
                return
            came_from = rollback.apply(self.repo, target, cache=self.cache)
        self.before_rollback = (came_from, before)
        assert comparable(recorded_state(self.ws), leave_out) == comparable(expected, leave_out)
        assert not [p for p in os.listdir(self.ws) if p.startswith(".watcherd-")]
        fsck = subprocess.run(["git", "fsck", "--no-progress", "--no-dangling"], cwd=self.ws,
                              capture_output=True, text=True)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr

    # Restores are the workspace model's business; here they only slow the search down.
    check_restore = None
    save = None


RollbackModel.TestCase.settings = BOUNDED
test_every_sequence_rolls_back_to_exactly_the_state_recorded = RollbackModel.TestCase


class LongRollbackModel(RollbackModel):
    pass


LongRollbackModel.TestCase.settings = LONG
test_long_profile = pytest.mark.slow(pytest.mark.timeout(3600)(LongRollbackModel.TestCase))
