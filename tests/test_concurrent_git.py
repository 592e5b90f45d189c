"""A user (or an agent) running git in the workspace while the daemon runs, in both modes.

An :class:`Agent` edits files and runs ``commit``, ``rebase``, ``reset --hard``, ``checkout -b``,
``stash`` and friends in a loop, as fast as a busy agent does, while a real daemon snapshots on its
own timers. What must hold, stated so that it is true whatever the interleaving:

* **No lost edit.** Each snapshot is judged against the work tree *during its own window*: the
  daemon logs ``snapshot.started`` before git reads the tree and ``snapshot.committed`` or
  ``snapshot.unchanged`` after, with wall-clock timestamps; the agent records the wall-clock window
  of each of its writes and git commands. For a snapshot window that no git command of the agent
  overlaps, every file the agent did not write during the window must be in the snapshot with the
  content it had on disk, and nothing else may be. (A window a git command overlaps is not judged:
  ``rebase --autostash`` or ``stash`` change files and put them back, so what git read is not
  knowable from outside.) And at checkpoints — the agent pauses, asks ``POST /snapshot``, and
  checks — the store's newest generation holds exactly the tree on disk; after everything settles,
  so does the last one.
* **No corrupted repository.** ``git fsck`` passes and ``git status``/``diff-index --cached HEAD``
  work at every checkpoint; the agent's own git never reports a corrupt index or object.
* **Shadow mode never touches the user's git state**: ``.git/index`` keeps its bytes and inode,
  HEAD and its branch stay where they were, across a save with no user activity, and nothing of
  watcherd's (refs, index) is ever written into ``.git``: its snapshots are in its own repository
  in the state directory (``Daemon.repo``), where the checks below read them.
* **No deleted live lock.** A lock the user's git holds is waited for, never removed — held open,
  or kept by a ``git commit`` waiting for its editor; a stale one nobody holds is cleaned once it
  is older than ``STALE_LOCK_AGE``.
* **The store keeps moving forward** whatever the user does to their branch (``reset --hard``,
  rebase, amend, checkout): the user's git is not a second writer, so no save is a conflict.
* **Branch mode leaves the user's git alone while it runs**: in the middle of a rebase or merge,
  or while a git command of theirs runs, the tree is saved on the snapshot history only.
"""

from __future__ import annotations

import bisect
import json
import os
import random
import re
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from daemon_fixture import Daemon, watcherd  # noqa: F401 (fixture)
from helpers import fetch_generation, git, wait_for

from watcherd.snapshot import STALE_LOCK_AGE

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify is Linux-only")

# What the user's own git says when watcherd (or anyone) broke the repository under it.
CORRUPTION = re.compile(r"corrupt|bad object|broken link|index file smaller|bad signature|"
                        r"invalid object|unable to read tree|missing blob|missing tree|"
                        r"fatal: index file", re.I)
# What it says when another git holds a lock for a moment: a person would simply run it again.
LOCKED = re.compile(r"index\.lock|\.lock': File exists|Unable to create .*\.lock|cannot lock ref",
                    re.I)


def files_of(root: Path) -> dict[str, bytes]:
    """The work tree's files as git would record them (the fixture ignores node_modules/, *.log)."""
    out: dict[str, bytes] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        if rel_dir == Path("."):
            dirnames[:] = [d for d in dirnames if d not in (".git", "node_modules")]
        for name in filenames:
            if name.endswith(".log"):
                continue
            try:
                out[(rel_dir / name).as_posix()] = Path(dirpath, name).read_bytes()
            except FileNotFoundError:
                continue
    return out


def commit_files(repo: Path, commit: str) -> dict[str, bytes]:
    """Path -> content of every file in ``commit``'s tree, read from ``repo``."""
    listing = subprocess.run(["git", "ls-tree", "-r", "-z", commit], cwd=repo, check=True,
                             capture_output=True).stdout.split(b"\0")
    entries = [(line.split()[2].decode(), line.split(b"\t", 1)[1].decode())
               for line in listing if line]
    if not entries:
        return {}
    out = subprocess.run(["git", "cat-file", "--batch"], cwd=repo, check=True, capture_output=True,
                         input="".join(f"{oid}\n" for oid, _ in entries).encode()).stdout
    files, pos = {}, 0
    for _, path in entries:
        header_end = out.index(b"\n", pos)
        size = int(out[pos:header_end].split()[2])
        files[path] = out[header_end + 1:header_end + 1 + size]
        pos = header_end + 1 + size + 1
    return files


def wall(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


@dataclass
class Step:
    """One thing the agent did, with its wall-clock window and the tree it left behind."""

    kind: str  # "write" | "git"
    what: str  # the path written, or the git command
    t0: float
    t1: float
    after: dict[str, bytes]


@dataclass
class Findings:
    """What a run found; every list must stay empty."""

    lost: list[str] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)
    touched: list[str] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)

    def check(self) -> None:
        assert not self.corrupt, "corrupted repository:\n" + "\n".join(self.corrupt[:10])
        assert not self.touched, \
            "the user's git state was touched:\n" + "\n".join(self.touched[:10])
        assert not self.lost, "lost edits:\n" + "\n".join(self.lost[:10])


class Agent:
    """Edits and git commands in the workspace, one at a time, each recorded as a :class:`Step`."""

    def __init__(self, d: Daemon, mode: str, rng: random.Random, findings: Findings) -> None:
        self.d = d
        self.ws = d.workspace
        self.mode = mode
        self.rng = rng
        self.found = findings
        self.n = 0
        self.state = files_of(self.ws)
        self.steps: list[Step] = []
        self.initial = dict(self.state)
        self.checkpoints = 0

    # -- the user's actions ------------------------------------------------------------------------

    def write(self, rel: str, data: bytes | None) -> None:
        path = self.ws / rel
        t0 = time.time()
        if data is None:
            path.unlink(missing_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        t1 = time.time()
        if not rel.startswith("node_modules/"):
            if data is None:
                self.state.pop(rel, None)
            else:
                self.state[rel] = data
        self.steps.append(Step("write", rel, t0, t1, dict(self.state)))
        self.found.counts["writes"] += 1

    def git(self, *args: str) -> subprocess.CompletedProcess:
        """Run the user's git; a lock held by someone else is retried, as a person would."""
        give_up = time.monotonic() + 30
        while True:
            p = subprocess.run(["git", *args], cwd=self.ws, capture_output=True)
            said = p.stderr.decode("utf-8", "replace")
            if CORRUPTION.search(said):
                self.found.corrupt.append(f"user's git {' '.join(args)}: {said.strip()}")
            if p.returncode != 0 and LOCKED.search(said) and time.monotonic() < give_up:
                self.found.counts["user_git_waited_for_a_lock"] += 1
                time.sleep(0.02)  # the user's "try again", not a synchronisation
                continue
            return p

    def op(self, name: str, *commands: tuple[str, ...]) -> None:
        t0 = time.time()
        for args in commands:
            if self.git(*args).returncode != 0:
                break
        self.tidy()
        t1 = time.time()
        self.state = files_of(self.ws)
        self.steps.append(Step("git", name, t0, t1, dict(self.state)))
        self.found.counts[f"git {name}"] += 1

    def tidy(self) -> None:
        """Leave nothing half done (a rebase stopped by a lock, a stash pop that conflicted)."""
        git_dir = self.ws / ".git"
        if (git_dir / "rebase-merge").exists() or (git_dir / "rebase-apply").exists():
            self.found.counts["rebase stopped, aborted"] += 1
            if self.git("rebase", "--abort").returncode != 0:
                # A rebase --autostash whose stash could not be applied (another git held a
                # lock at that moment) leaves a rebase nothing can abort; --quit keeps the stash.
                self.git("rebase", "--quit")
                self.found.counts["rebase left half-finished, quit"] += 1
        if self.git("ls-files", "-u").stdout.strip():
            self.git("reset", "-q", "--hard")
            self.found.counts["conflict reset"] += 1

    def commits(self) -> int:
        p = self.git("rev-list", "--count", "HEAD")
        return int(p.stdout) if p.returncode == 0 else 0

    def step(self) -> None:
        """One random action of a busy agent."""
        self.n += 1
        n, rng = self.n, self.rng
        pick = rng.choices(
            ["edit", "note", "delete", "ignored", "commit", "commit_a", "rebase", "reset_hard",
             "checkout_b", "checkout_main", "stash", "stash_pop", "status", "pause"],
            weights=[25, 14, 4, 4, 9, 4, 5, 4, 4, 3, 4, 4, 4, 8])[0]
        if pick == "edit":
            target = rng.choice(["src/app.py", *(f"src/lib{k}.py" for k in range(4))])
            self.write(target, f"# edit {n}\nVALUE = {n}\n".encode())
        elif pick == "note":
            self.write(f"notes/n{n:05}.txt", f"note {n}\n".encode())
        elif pick == "delete":
            existing = [p for p in self.state if p.startswith("src/lib")]
            if existing:
                self.write(rng.choice(sorted(existing)), None)
        elif pick == "ignored":
            self.write(f"node_modules/pkg/f{n}.js", b"module.exports = 1\n")
        elif pick == "commit":
            self.op("commit", ("add", "-A"), ("commit", "-q", "-m", f"user {n}"))
        elif pick == "commit_a":
            self.op("commit -a", ("commit", "-q", "-a", "-m", f"user {n}"))
        elif pick == "rebase" and self.commits() >= 3:
            self.op("rebase", ("-c", "rebase.autoStash=true", "rebase", "-q", "--force-rebase",
                               "HEAD~2"))
        elif pick == "reset_hard" and self.commits() >= 2:
            self.op("reset --hard", ("reset", "-q", "--hard", "HEAD~1"))
        elif pick == "checkout_b":
            self.op("checkout -b", ("checkout", "-q", "-b", f"topic-{n}"))
        elif pick == "checkout_main":
            self.op("checkout main", ("checkout", "-q", "main"))
        elif pick == "stash":
            extra = ["--include-untracked"] if rng.random() < 0.3 else []
            self.op("stash", ("stash", "push", "-q", *extra))
        elif pick == "stash_pop":
            if self.git("stash", "list").stdout.strip():
                self.op("stash pop", ("stash", "pop", "-q"))
        elif pick == "status":
            self.op("status", ("status", "--porcelain"))
        elif pick == "pause":
            # Long enough for a quiet period to pass: the daemon snapshots between actions.
            time.sleep(rng.uniform(0.25, 0.6))
        time.sleep(rng.uniform(0.0, 0.05))

    # -- checkpoints -------------------------------------------------------------------------------

    def checkpoint(self, audit: Path) -> None:
        """Pause, save through the daemon, and check the store, the repository and the index."""
        self.checkpoints += 1
        on_disk = files_of(self.ws)
        if on_disk != self.state:
            self.found.lost.append(f"checkpoint {self.checkpoints}: the agent's own record of the "
                                   f"tree is off: {sorted(set(on_disk) ^ set(self.state))[:5]}")
        index = self.ws / ".git" / "index"
        before = _index_fingerprint(index)
        head = self.git("rev-parse", "-q", "--verify", "HEAD").stdout.strip()
        branch = self.git("symbolic-ref", "-q", "HEAD").stdout.strip()
        code, result = self.d.post("/snapshot")
        if code != 200 or result.get("status") not in ("saved", "unchanged"):
            self.found.lost.append(f"checkpoint {self.checkpoints}: save answered {code} {result}")
            return
        m = self.d.manifest()
        fetch_generation(audit, self.d.store, self.d.key, m, f"refs/cp/{self.checkpoints}/*")
        stored = commit_files(audit, m["snapshot"])
        if stored != on_disk:
            missing = sorted(p for p in on_disk if stored.get(p) != on_disk[p])
            extra = sorted(set(stored) - set(on_disk))
            self.found.lost.append(f"checkpoint {self.checkpoints}: generation {m['generation']} "
                                   f"differs from the tree: missing/stale {missing[:5]}, "
                                   f"extra {extra[:5]}")
        if self.mode == "shadow":
            after = _index_fingerprint(index)
            if after != before:
                self.found.touched.append(f"checkpoint {self.checkpoints}: .git/index changed "
                                          f"across a save ({before[:3]} -> {after[:3]})")
            now_head = self.git("rev-parse", "-q", "--verify", "HEAD").stdout.strip()
            now_branch = self.git("symbolic-ref", "-q", "HEAD").stdout.strip()
            if (now_head, now_branch) != (head, branch):
                self.found.touched.append(f"checkpoint {self.checkpoints}: HEAD moved "
                                          f"{branch}@{head[:8]} -> {now_branch}@{now_head[:8]}")
            # watcherd's history and index live in its state directory, never in the user's .git.
            ours = self.git("for-each-ref", "--format=%(refname)", "refs/watcherd/").stdout
            if ours.strip() or (self.ws / ".git" / "watcherd").exists():
                self.found.touched.append(f"checkpoint {self.checkpoints}: watcherd wrote into "
                                          f".git: {ours.decode().split()[:3]}")
        else:
            now_branch = self.git("symbolic-ref", "-q", "HEAD").stdout.strip()
            if now_branch != branch:
                self.found.touched.append(f"checkpoint {self.checkpoints}: branch switched")
            left = self.git("status", "--porcelain").stdout.decode().strip()
            if left:
                self.found.lost.append(f"checkpoint {self.checkpoints}: branch mode left "
                                       f"uncommitted changes after a save: {left[:200]!r}")
        self.check_repository(f"checkpoint {self.checkpoints}")
        self.found.counts["checkpoints"] += 1

    def check_repository(self, when: str) -> None:
        for args in (("fsck", "--no-dangling", "--no-progress"), ("status", "--porcelain"),
                     ("diff-index", "--cached", "HEAD")):
            p = self.git(*args)
            if p.returncode != 0:
                self.found.corrupt.append(f"{when}: git {args[0]} failed: "
                                          f"{p.stderr.decode('utf-8', 'replace').strip()}")


def _index_fingerprint(index: Path) -> tuple:
    try:
        st = index.stat()
    except FileNotFoundError:
        return (None,)
    return (st.st_ino, st.st_mtime_ns, st.st_size, index.read_bytes())


# -- judging every snapshot against its own window ----------------------------------------------------


def snapshot_windows(d: Daemon) -> list[tuple[float, float, str]]:
    """(start, end, commit) of every snapshot the daemon finished, from its log."""
    windows, start = [], None
    for line in list(d.log.lines):
        event = line.get("event")
        if event == "snapshot.started":
            start = wall(line["timestamp"])
        elif event in ("snapshot.committed", "snapshot.unchanged") and start is not None:
            commit = line.get("commit") or line.get("snapshot")
            if commit:
                windows.append((start, wall(line["timestamp"]), commit))
            start = None
        elif event == "snapshot.failed":
            start = None
    return windows


def judge_windows(d: Daemon, agent: Agent, findings: Findings) -> None:
    steps = agent.steps
    ends = [s.t1 for s in steps]
    for s0, s1, commit in snapshot_windows(d):
        # Steps that overlap the window [s0, s1].
        first = bisect.bisect_right(ends, s0)
        overlapping = [s for s in steps[first:] if s.t0 < s1]
        if any(s.kind == "git" for s in overlapping):
            findings.counts["snapshots not judged (a git command overlapped)"] += 1
            continue
        before = steps[first - 1].after if first else agent.initial
        moving = {s.what for s in overlapping}
        expected = {p: v for p, v in before.items() if p not in moving}
        got = commit_files(d.repo, commit)
        stale = sorted(p for p, v in expected.items() if got.get(p) != v)
        extra = sorted(p for p in set(got) - set(before) if p not in moving)
        if stale or extra:
            findings.lost.append(f"snapshot {commit[:12]} ({s1 - s0:.3f}s window): "
                                 f"missing or stale {stale[:5]}, never on disk {extra[:5]}")
        findings.counts["snapshots judged"] += 1


# -- the run -----------------------------------------------------------------------------------------

RACING = {"quiet_period": "30ms", "max_commit_delay": "150ms", "idle_timeout": "400ms"}


def run_agent(watcherd, tmp_path: Path, mode: str, seconds: float, seed: int,
              checkpoint_every: float = 1.5) -> Findings:
    findings = Findings()
    base = tmp_path / f"{mode}-{seed}"
    base.mkdir()
    # Timers far shorter than the fixture's: the daemon snapshots and uploads almost continuously,
    # so its git runs while the user's does, again and again.
    d = daemon_in(watcherd, mode, name=f"{mode}{seed}", store=base / "store", log_level="debug",
                  watch=RACING).start()
    d.settle()
    audit = base / "audit"
    audit.mkdir()
    git(audit, "init", "-q", "--bare")
    agent = Agent(d, mode, random.Random(seed), findings)
    ends = time.monotonic() + seconds
    next_checkpoint = time.monotonic() + checkpoint_every
    while time.monotonic() < ends:
        agent.step()
        if time.monotonic() >= next_checkpoint:
            agent.checkpoint(audit)
            next_checkpoint = time.monotonic() + checkpoint_every
    agent.checkpoint(audit)
    # Everything settles: the last generation is the final tree.
    d.settle(timeout=30)
    final = files_of(d.workspace)
    m = d.manifest()
    fetch_generation(audit, d.store, d.key, m, "refs/final/*")
    if commit_files(audit, m["snapshot"]) != final:
        findings.lost.append("after settling, the last generation is not the final tree")
    agent.check_repository("the end")
    status = d.status()
    assert d.proc.poll() is None, "the daemon exited"
    assert d.stop() == 0
    judge_windows(d, agent, findings)
    snapshots = [c for _, _, c in snapshot_windows(d)]
    for commit in set(snapshots):
        if any(p.startswith("node_modules/") for p in commit_files(d.repo, commit)):
            findings.lost.append(f"snapshot {commit[:12]} holds an ignored file")
    findings.counts["snapshots"] = len(snapshots)
    findings.counts["generations"] = m["generation"]
    findings.counts["snapshot failures"] = status["counters"]["snapshot_failures"]
    findings.counts["conflicts"] = status["counters"]["conflicts"]
    assert not d.log.events("daemon.crashed") and not d.log.events("daemon.failed")
    return findings


@pytest.mark.parametrize("mode", ["shadow", "branch"])
def test_git_commands_racing_the_daemon_lose_no_edit_and_corrupt_nothing(
        watcherd, tmp_path: Path, mode: str) -> None:
    findings = run_agent(watcherd, tmp_path, mode, seconds=9, seed=7)
    print(f"{mode}: {dict(findings.counts)}")
    findings.check()
    assert findings.counts["snapshots judged"] >= 5, findings.counts
    assert findings.counts["checkpoints"] >= 5, findings.counts
    # The generations did not stop at a conflict: the user's git is not a second writer.
    assert findings.counts["conflicts"] == 0, findings.counts


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("mode", ["shadow", "branch"])
def test_git_commands_racing_the_daemon_for_minutes_lose_no_edit_and_corrupt_nothing(
        watcherd, tmp_path: Path, mode: str) -> None:
    total = Findings()
    runs = 5
    for seed in range(runs):
        found = run_agent(watcherd, tmp_path, mode, seconds=60, seed=100 + seed)
        total.lost += found.lost
        total.corrupt += found.corrupt
        total.touched += found.touched
        total.counts.update(found.counts)
    print(f"FIGURES concurrent git {mode}: runs={runs} {json.dumps(dict(total.counts))} "
          f"lost={len(total.lost)} corrupt={len(total.corrupt)} touched={len(total.touched)}")
    total.check()
    assert total.counts["conflicts"] == 0


# -- locks -------------------------------------------------------------------------------------------


def daemon_in(watcherd, mode: str, **kwargs: Any) -> Daemon:
    d = watcherd(**kwargs)
    text = d.config.read_text()
    d.config.write_text(text.replace("[workspace]\n", f'[workspace]\nmode = "{mode}"\n', 1))
    return d


def age(path: Path, seconds: float) -> None:
    """Make ``path`` look ``seconds`` old, as a lock left hours ago would."""
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_branch_mode_waits_for_an_index_lock_a_running_git_holds_and_never_removes_it(
        watcherd) -> None:
    d = daemon_in(watcherd, "branch").start()
    d.settle()
    ws = d.workspace
    head = git(ws, "rev-parse", "HEAD")
    lock = ws / ".git" / "index.lock"
    # A long-running git of the user: the lock is held open, and old enough to look stale.
    fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        age(lock, STALE_LOCK_AGE * 2)
        inode = lock.stat().st_ino
        mark = d.log.mark()
        (ws / "src" / "app.py").write_text("print('edited while the user\\'s git runs')\n")
        failed = d.log.wait("snapshot.failed", after=mark, timeout=30)
        assert "index.lock" in failed["error"]
        assert lock.stat().st_ino == inode, "watcherd replaced the user's lock"
        assert not d.log.events("snapshot.stale_lock_removed")
        assert git(ws, "rev-parse", "HEAD") == head
        assert d.status()["last_error"]["op"] == "snapshot"
    finally:
        os.close(fd)
    lock.unlink()  # the user's git finished
    line = d.log.wait("snapshot.committed", after=mark, timeout=30)
    assert d.show("src/app.py", line["commit"]) == \
        "print('edited while the user\\'s git runs')"
    assert git(ws, "status", "--porcelain") == ""
    assert d.stop() == 0


class EditorCommit:
    """The user's ``git commit -a`` whose editor stays open until :meth:`finish`.

    Such a git keeps ``index.lock`` for as long as the user writes the message, but does not hold
    it open: only the running git process says the lock is alive. It is started detached, so it is
    nobody's child here (watcherd tells its own gits from the user's by ancestry).
    """

    def __init__(self, ws: Path, tmp: Path) -> None:
        self.go = tmp / "editor-may-finish"
        self.rc, self.err = tmp / "commit.rc", tmp / "commit.err"
        editor = tmp / "editor.py"
        editor.write_text(
            "import pathlib, sys, time\n"
            "deadline = time.monotonic() + 60\n"
            f"while not pathlib.Path({str(self.go)!r}).exists() and time.monotonic() < deadline:\n"
            "    time.sleep(0.02)\n"
            "pathlib.Path(sys.argv[1]).write_text('user: the message took a while\\n')\n")
        script = (f"(git commit -q -a 2>'{self.err}'; echo $? > '{self.rc}.tmp'; "
                  f"mv '{self.rc}.tmp' '{self.rc}') </dev/null >/dev/null 2>&1 &")
        subprocess.run(["sh", "-c", script], cwd=ws, check=True,
                       env={**os.environ, "GIT_EDITOR": f"{sys.executable} {editor}"})
        self.lock = ws / ".git" / "index.lock"
        wait_for(self.lock.exists, timeout=10, message="the user's git to take index.lock")
        age(self.lock, STALE_LOCK_AGE * 2)  # the user has been typing for a while

    def finish(self) -> None:
        self.go.touch()
        wait_for(self.rc.exists, timeout=30, message="the user's git commit to end")
        assert self.rc.read_text().strip() == "0", self.err.read_text()


def test_a_lock_whose_git_waits_for_its_editor_is_never_taken_for_stale(tmp_path: Path) -> None:
    from watcherd.snapshot import remove_stale_lock

    ws = tmp_path / "ws"
    ws.mkdir()
    git(ws, "init", "-q")
    (ws / "a.txt").write_text("one\n")
    git(ws, "add", "a.txt")
    git(ws, "commit", "-q", "-m", "one")
    (ws / "a.txt").write_text("two\n")
    user = EditorCommit(ws, tmp_path)
    try:
        assert remove_stale_lock(user.lock) is False
        assert user.lock.exists()
    finally:
        user.finish()
    assert git(ws, "show", "HEAD:a.txt") == "two"


def test_branch_mode_never_removes_the_lock_of_a_git_commit_waiting_for_its_editor(
        watcherd, tmp_path: Path) -> None:
    d = daemon_in(watcherd, "branch").start()
    d.settle()
    ws = d.workspace
    head = git(ws, "rev-parse", "HEAD")
    (ws / "src" / "app.py").write_text("print('staged by the user')\n")
    user = EditorCommit(ws, tmp_path)
    try:
        inode = user.lock.stat().st_ino
        mark = d.log.mark()
        (ws / "README.md").write_text("# edited while the user writes a commit message\n")
        # Saved at once, on the snapshot history only: the branch and the index are the user's
        # git's until it ends.
        line = d.log.wait("snapshot.committed", after=mark, timeout=30)
        assert d.show("README.md", line["commit"]) == \
            "# edited while the user writes a commit message"
        assert user.lock.exists() and user.lock.stat().st_ino == inode, "a live lock was removed"
        assert not d.log.events("snapshot.stale_lock_removed")
        assert git(ws, "rev-parse", "HEAD") == head
    finally:
        user.finish()
    assert git(ws, "log", "-1", "--format=%s", "HEAD", "--", "src/app.py") == \
        "user: the message took a while"
    assert git(ws, "show", "HEAD:src/app.py") == "print('staged by the user')"
    # The user's git is done: the edit goes on the branch too.
    wait_for(lambda: subprocess.run(["git", "show", "HEAD:README.md"], cwd=ws, capture_output=True,
                                    text=True).stdout == "# edited while the user writes a commit "
                                                         "message\n",
             timeout=15, message="README.md committed on the branch")
    fsck = subprocess.run(["git", "fsck", "--no-dangling"], cwd=ws, capture_output=True)
    assert fsck.returncode == 0, fsck.stderr
    d.settle()
    assert git(ws, "status", "--porcelain") == ""
    assert d.stop() == 0


def test_a_lock_nobody_holds_is_stale_only_once_it_is_older_than_stale_lock_age(
        tmp_path: Path) -> None:
    from watcherd.snapshot import remove_stale_lock

    git(tmp_path, "init", "-q")
    lock = tmp_path / ".git" / "index.lock"
    lock.write_bytes(b"")  # nobody holds it: a git just starting, or one that was killed
    assert remove_stale_lock(lock) is False and lock.exists()
    age(lock, STALE_LOCK_AGE - 5)
    assert remove_stale_lock(lock) is False and lock.exists()
    age(lock, STALE_LOCK_AGE + 5)
    assert remove_stale_lock(lock) is True and not lock.exists()


def test_branch_mode_removes_a_stale_index_lock_nobody_holds_and_commits(watcherd) -> None:
    d = daemon_in(watcherd, "branch").start()
    d.settle()
    ws = d.workspace
    lock = ws / ".git" / "index.lock"
    lock.write_bytes(b"")  # left by a git that was killed an hour ago
    age(lock, 3600)
    mark = d.log.mark()
    (ws / "src" / "app.py").write_text("print('after a crashed git')\n")
    removed = d.log.wait("snapshot.stale_lock_removed", after=mark, timeout=30)
    assert removed["lock"] == str(lock)
    line = d.log.wait("snapshot.committed", after=mark, timeout=30)
    assert d.show("src/app.py", line["commit"]) == "print('after a crashed git')"
    assert not d.log.events("snapshot.failed", after=mark)
    assert d.stop() == 0


def test_shadow_mode_snapshots_while_the_users_git_holds_index_lock_and_leaves_the_lock_alone(
        watcherd) -> None:
    d = watcherd().start()
    d.settle()
    ws = d.workspace
    lock = ws / ".git" / "index.lock"
    fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        age(lock, STALE_LOCK_AGE * 2)
        before = lock.stat()
        mark = d.log.mark()
        (ws / "src" / "app.py").write_text("print('snapshotted beside the user lock')\n")
        line = d.log.wait("snapshot.committed", after=mark, timeout=10)
        assert d.show("src/app.py", line["commit"]) == "print('snapshotted beside the user lock')"
        after = lock.stat()
        assert (after.st_ino, after.st_mtime_ns, after.st_size) == \
            (before.st_ino, before.st_mtime_ns, before.st_size)
    finally:
        os.close(fd)
        lock.unlink()
    assert d.stop() == 0


def test_shadow_mode_leaves_the_users_index_byte_for_byte_across_snapshots(watcherd) -> None:
    d = watcherd().start()
    d.settle()
    ws = d.workspace
    # A half-staged state: one file staged, another modified, a third untracked.
    (ws / "src" / "app.py").write_text("print('staged')\n")
    git(ws, "add", "src/app.py")
    (ws / "src" / "app.py").write_text("print('staged, then edited again')\n")
    (ws / "README.md").write_text("# modified, not staged\n")
    (ws / "new.txt").write_text("untracked\n")
    git(ws, "status", "--porcelain")  # the user's own refresh of the index
    index = ws / ".git" / "index"
    before = _index_fingerprint(index)
    staged = git(ws, "diff", "--cached", "--name-only")
    for n in range(3):
        (ws / "notes.txt").write_text(f"edit {n}\n")
        code, result = d.post("/snapshot")
        assert code == 200 and result["status"] == "saved", result
        assert _index_fingerprint(index) == before, f"save {n} touched .git/index"
    assert git(ws, "diff", "--cached", "--name-only") == staged == "src/app.py"
    assert d.show("src/app.py") == "print('staged, then edited again')"
    assert d.stop() == 0


# -- the user's history moves under the daemon ---------------------------------------------------------


REWRITES = {
    "reset --hard": [("reset", "-q", "--hard", "HEAD~1")],
    "rebase": [("-c", "rebase.autoStash=true", "rebase", "-q", "--force-rebase", "HEAD~2")],
    "commit --amend": [("commit", "-q", "--amend", "-m", "user: reworded")],
    "checkout of an older branch": [("checkout", "-q", "-b", "older", "HEAD~2")],
}


@pytest.mark.parametrize("rewrite", sorted(REWRITES))
@pytest.mark.parametrize("mode", ["shadow", "branch"])
def test_the_store_keeps_moving_forward_after_the_user_rewrites_their_history(
        watcherd, tmp_path: Path, mode: str, rewrite: str) -> None:
    d = daemon_in(watcherd, mode).start()
    ws = d.workspace
    for n in range(3):
        (ws / "src" / f"step{n}.py").write_text(f"STEP = {n}\n")
        git(ws, "add", "-A")
        git(ws, "commit", "-q", "-m", f"user: step {n}")
    d.settle()
    before = d.manifest()
    moved_from = git(ws, "rev-parse", "HEAD")
    for args in REWRITES[rewrite]:
        git(ws, *args)
    (ws / "after.txt").write_text(f"written after {rewrite}\n")
    code, result = d.post("/snapshot")
    assert (code, result["status"]) == (200, "saved"), result
    after = d.manifest()
    assert after["generation"] == before["generation"] + 1
    assert d.status()["conflict"] is None and not list((d.store / d.key).glob("conflicts/*"))
    # The new generation continues the old one, and still carries what the user moved away from.
    audit = tmp_path / "audit"
    audit.mkdir()
    git(audit, "init", "-q", "--bare")
    fetch_generation(audit, d.store, d.key, after)
    assert subprocess.run(["git", "merge-base", "--is-ancestor", before["snapshot"],
                           after["snapshot"]], cwd=audit).returncode == 0
    assert subprocess.run(["git", "merge-base", "--is-ancestor", moved_from, after["snapshot"]],
                          cwd=audit).returncode == 0
    assert commit_files(audit, after["snapshot"]) == files_of(ws)
    assert after["head"] == git(ws, "rev-parse", "HEAD")
    assert d.stop() == 0


def test_branch_mode_uploads_a_commit_the_user_made_on_their_own(watcherd) -> None:
    d = daemon_in(watcherd, "branch").start()
    d.settle()
    ws = d.workspace
    # Nothing for watcherd to commit, only the user's HEAD moves: still new history to save.
    git(ws, "commit", "-q", "--allow-empty", "-m", "user: a commit of their own")
    head = git(ws, "rev-parse", "HEAD")
    wait_for(lambda: (d.manifest() or {}).get("head") == head, timeout=15,
             message="the user's commit to reach the store")
    assert d.stop() == 0


@pytest.mark.parametrize("ending", ["continue", "abort"])
def test_branch_mode_leaves_a_rebase_stopped_on_a_conflict_to_the_user(watcherd, ending) -> None:
    d = daemon_in(watcherd, "branch").start()
    ws = d.workspace
    git(ws, "checkout", "-q", "-b", "feature")
    (ws / "src" / "app.py").write_text("print('feature')\n")
    git(ws, "commit", "-q", "-am", "feature: app")
    git(ws, "checkout", "-q", "main")
    (ws / "src" / "app.py").write_text("print('main')\n")
    git(ws, "commit", "-q", "-am", "main: app")
    git(ws, "checkout", "-q", "feature")
    d.settle()
    stopped = subprocess.run(["git", "rebase", "main"], cwd=ws, capture_output=True)
    assert stopped.returncode != 0 and (ws / ".git" / "rebase-merge").is_dir()
    head = git(ws, "rev-parse", "HEAD")
    unmerged = git(ws, "ls-files", "-u")
    assert unmerged
    # While the user resolves, an edit elsewhere: saved, but not by committing into their rebase.
    (ws / "notes.txt").write_text("written while resolving\n")
    mark = d.log.mark()
    code, result = d.post("/snapshot")
    assert (code, result["status"]) == (200, "saved"), result
    assert git(ws, "rev-parse", "HEAD") == head, "watcherd committed into the user's rebase"
    assert git(ws, "ls-files", "-u") == unmerged, "the user's conflicts were marked resolved"
    assert d.log.events("snapshot.branch_deferred", after=mark)
    stored = d.manifest()["snapshot"]
    assert d.show("notes.txt", stored) == "written while resolving"
    assert "<<<<<<<" in d.show("src/app.py", stored)  # the tree as it is, markers too
    # The user ends the rebase as if watcherd were not there.
    if ending == "continue":
        (ws / "src" / "app.py").write_text("print('main and feature')\n")
        git(ws, "add", "src/app.py")
        done = subprocess.run(["git", "-c", "core.editor=true", "rebase", "--continue"], cwd=ws,
                              capture_output=True)
        assert done.returncode == 0, done.stderr.decode()
        assert git(ws, "log", "--format=%s", "-2") == "feature: app\nmain: app"
    else:
        git(ws, "rebase", "--abort")
        assert git(ws, "show", "HEAD:src/app.py") == "print('feature')"
    d.settle()
    # The last generation is the tree after the rebase, markers gone.
    assert commit_files(d.repo, d.manifest()["snapshot"]) == files_of(ws)
    assert "<<<<<<<" not in (ws / "src" / "app.py").read_text()
    assert git(ws, "status", "--porcelain") == ""
    assert d.stop() == 0


def test_branch_mode_saves_the_clean_tree_once_the_user_undoes_a_conflicted_stash_pop(
        watcherd) -> None:
    d = daemon_in(watcherd, "branch").start()
    ws = d.workspace
    d.settle()
    (ws / "src" / "app.py").write_text("print('stashed')\n")
    git(ws, "stash", "-q")
    (ws / "src" / "app.py").write_text("print('committed meanwhile')\n")
    git(ws, "commit", "-q", "-am", "user: meanwhile")
    popped = subprocess.run(["git", "stash", "pop"], cwd=ws, capture_output=True)
    assert popped.returncode != 0 and git(ws, "ls-files", "-u")
    code, result = d.post("/snapshot")  # saved as it is, conflict markers and all
    assert (code, result["status"]) == (200, "saved"), result
    assert "<<<<<<<" in d.show("src/app.py", d.manifest()["snapshot"])
    head = git(ws, "rev-parse", "HEAD")
    git(ws, "reset", "-q", "--hard")  # the user gives up on the pop (the stash is kept)
    code, result = d.post("/snapshot")
    assert (code, result["status"]) == (200, "saved"), result
    assert git(ws, "rev-parse", "HEAD") == head
    assert commit_files(d.repo, d.manifest()["snapshot"]) == files_of(ws)
    assert d.show("src/app.py", d.manifest()["snapshot"]) == \
        "print('committed meanwhile')"
    assert d.stop() == 0
