"""Crash consistency: SIGKILL at random points of a save or a restore, then check what is left.

Each run kills a real process — ``watcherd run``, ``watcherd snapshot``, ``watcherd restore`` — at a
random point, together with the git processes it started (every process of its tree, as a
container runtime or systemd's final SIGKILL to a unit's cgroup does: watcherd starts each git in
a session of its own, so its process group is not the whole of it), while a writer keeps editing
the workspace. The point is a random delay (after start-up, or after the process logged that a
save or a snapshot began), or just before a random one of watcherd's own file operations (renames,
links, unlinks: the short steps that publish, swap, prune and place, which a timer almost never
hits). After each kill, and after the rerun that follows it:

- the store's manifest parses and names complete bundles whose size and sha256 match;
- the stored generation moved only forward, to a commit of watcherd's snapshot history (in its
  own repository, in the state directory);
- a restore into an empty directory gives exactly that snapshot commit's tree (never a mix);
- every edit a generation held is still in every later generation (the writer only appends, so a
  file in a later generation must extend the same file in an earlier one), and after the last
  restart every edit reaches the store;
- watcherd's repository passes ``git fsck --no-dangling`` on its own objects (without the
  workspace's, which it reads through a link farm: every object its history needs is in its own
  packs), and so does the workspace's repository; no lock left by the killed process makes a
  later snapshot or save fail;
- a killed restore left the workspace untouched, fully restored, or (in a mount point) resumable
  as its journal in the state directory says, and a rerun (the same pod: the same state
  directory) finishes the job without losing what was there before, and leaves a history the
  daemon continues without a new snapshot.

The default run kills a few times per scenario. The long runs (``make test-long``, marker
``slow``) kill ``WATCHERD_CRASH_RUNS`` times per scenario (default 300) and print a table: kills,
where they landed (the last step the process logged before it died), edits lost, generations
corrupted, unexpected daemon exits. ``WATCHERD_CRASH_REPORT=path`` also appends each table as JSON.
"""

from __future__ import annotations

import collections
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from daemon_fixture import WATCHERD, LogLines
from helpers import git, tree_state, wait_for
from structlog.testing import capture_logs

from watcherd import manifest as mf
from watcherd import snapshot
from watcherd.bundle import file_digest
from watcherd.config import Config, RestoreConfig, StoreConfig, WorkspaceConfig, parse_store_url
from watcherd.generations import Generations
from watcherd.repo import Repo
from watcherd.restore import JOURNAL, Request, restore
from watcherd.store.local import LocalStore

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify is Linux-only")

# Read at import: the autouse fixture in conftest.py clears WATCHERD_* from the environment.
CRASH_RUNS = int(os.environ.get("WATCHERD_CRASH_RUNS", "300"))
REPORT = os.environ.get("WATCHERD_CRASH_REPORT", "")
QUICK_RUNS = 8
KEY = "acme/crash/main"
SNAPSHOT_REF = "refs/watcherd/snapshots"
# Incompressible files in the template: every bundle carries them, so writing, checksumming and
# uploading a bundle takes tens of milliseconds, long enough for a kill to land inside each step.
ASSETS = 4
ASSET_SIZE = 1 << 20
# Saves happen constantly: a snapshot 100 ms after an edit, an upload 300 ms after the last one.
TIMINGS = {"quiet_period": "100ms", "max_commit_delay": "500ms", "idle_timeout": "300ms",
           "max_upload_interval": "2s", "shutdown_timeout": "10s"}
# Kill the daemon this long after it said ready, at most: about a save cycle.
DAEMON_KILL_WINDOW = 1.2


def runs_param(test_id: str, per_run_s: float):
    """The quick count in the default run; ``CRASH_RUNS`` under ``-m slow``."""
    return [pytest.param(QUICK_RUNS, id=f"{test_id}-quick"),
            pytest.param(CRASH_RUNS, id=f"{test_id}-{CRASH_RUNS}",
                         marks=[pytest.mark.slow,
                                pytest.mark.timeout(int(CRASH_RUNS * per_run_s) + 300)])]


# -- the workload --------------------------------------------------------------------------------------


def make_workspace(path: Path) -> Path:
    """A template clone with a few MiB of incompressible assets and an ignored build directory."""
    path.mkdir()
    (path / ".gitignore").write_text("node_modules/\n*.log\n")
    (path / "README.md").write_text("# app\n")
    (path / "assets").mkdir()
    for i in range(ASSETS):
        (path / "assets" / f"blob{i}.bin").write_bytes(os.urandom(ASSET_SIZE))
    git(path, "init", "--quiet")
    git(path, "add", "-A")
    git(path, "commit", "--quiet", "-m", "template")
    return path


class Writer(threading.Thread):
    """An agent editing the workspace: bursts of appends and new files, then pauses.

    Every edit is identifiable: ``counters/c<k>.txt`` only ever grow by one line ``<n>\\n`` (n counts
    every edit), and ``notes/n<n>.txt`` are written once and never change. So any stored version of
    a counter file must be a prefix of what the writer wrote, and a later generation's version must
    be at least as long as an earlier one's: anything shorter is a lost edit.
    """

    COUNTERS = 4

    def __init__(self, ws: Path, seed: int) -> None:
        super().__init__(daemon=True)
        self.ws = ws
        self.rng = random.Random(seed)
        self.content: dict[str, bytes] = {}
        self.edits = 0
        self._halt = threading.Event()
        self.error: BaseException | None = None
        (ws / "counters").mkdir(exist_ok=True)
        (ws / "notes").mkdir(exist_ok=True)
        (ws / "build.log").write_text("ignored\n")

    def run(self) -> None:
        try:
            while not self._halt.is_set():
                for _ in range(self.rng.randint(1, 15)):
                    self.edit()
                    # Pacing of the workload, not synchronisation.
                    self._halt.wait(self.rng.uniform(0.005, 0.03))
                self._halt.wait(self.rng.uniform(0.0, 0.6))
        except BaseException as exc:  # noqa: BLE001 - reported by stop()
            self.error = exc

    def edit(self) -> None:
        # ``content`` is updated first: what is on disk is always a prefix of it.
        n = self.edits
        if n % 10 == 9:
            rel, data = f"notes/n{n:06}.txt", f"note {n}\n".encode()
            self.content[rel] = data
            (self.ws / rel).write_bytes(data)
        else:
            rel = f"counters/c{n % self.COUNTERS}.txt"
            line = f"{n}\n".encode()
            self.content[rel] = self.content.get(rel, b"") + line
            with open(self.ws / rel, "ab") as f:
                f.write(line)
        with open(self.ws / "build.log", "a") as f:  # an ignored write: no snapshot, no activity
            f.write(f"{n}\n")
        self.edits += 1

    def stop(self) -> None:
        self._halt.set()
        self.join(10)
        if self.error:
            raise self.error


def lost_edits(writer: Writer, earlier: dict[str, tuple] | None, later: dict[str, tuple]) -> list[str]:
    """What ``later`` (a stored tree) lacks or garbles of the writer's edits, or of ``earlier``."""
    problems = []
    for rel, entry in later.items():
        # A snapshot may catch a file half written, never anything the writer did not write.
        if rel.startswith(("counters/", "notes/")) and entry[0] == "file":
            if not writer.content.get(rel, b"").startswith(entry[2]):
                problems.append(f"{rel} holds {entry[2][-40:]!r}, not what the writer wrote")
    for rel, entry in (earlier or {}).items():
        if rel.startswith(("counters/", "notes/")) and entry[0] == "file":
            now = later.get(rel)
            if now is None or len(now[2]) < len(entry[2]):
                problems.append(f"{rel}: {len(entry[2])} bytes in an earlier generation, "
                                f"{'gone' if now is None else len(now[2])} in a later one")
    return problems


# -- processes and their logs ------------------------------------------------------------------------


# Runs watcherd with every file operation of its own code logged and counted (renames, links,
# unlinks, mkdir, rmdir, chmod: the steps that place, publish and prune); at the N-th, just before
# the operation, it stops its children and itself (SIGSTOP: no thread of it runs on) and says so,
# and the test kills the whole tree (Proc.kill). A kill at a random time mostly lands in git or in
# Python's start-up; this one lands on the boundaries between watcherd's own steps. N = 0 only
# counts.
_KILL_AT_OP = r"""
import json, os, signal, sys
n, count = int(sys.argv[1]), 0
def children(pid):
    found = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            found += [int(c) for c in open(f"/proc/{pid}/task/{tid}/children").read().split()]
        except OSError:
            pass
    return found
def say(doc):
    # One whole line under the lock watcherd's own log lines are written with: a print() from
    # this thread between another thread's line and its newline would spoil both.
    sink = getattr(sys.modules.get("watcherd.log"), "_Sink", None)
    line = json.dumps(doc) + "\n"
    if sink is None:
        sys.stdout.write(line)
        sys.stdout.flush()
        return
    with sink._lock:
        sys.stdout.write(line)
        sys.stdout.flush()
def halt():
    say({"event": "test.halted", "n": count})
    stack = children(os.getpid())
    while stack:
        pid = stack.pop()
        try:
            os.kill(pid, signal.SIGSTOP)
            stack += children(pid)
        except OSError:
            pass
    os.kill(os.getpid(), signal.SIGSTOP)
def counted(name):
    real = getattr(os, name)
    def op(*args, **kwargs):
        global count
        count += 1
        say({"event": "test.op", "n": count, "op": name, "path": str(args[0])})
        if count == n:
            halt()
        return real(*args, **kwargs)
    setattr(os, name, op)
for name in ("rename", "replace", "link", "unlink", "remove", "mkdir", "rmdir", "chmod"):
    counted(name)
from watcherd.cli import main
sys.argv[1:] = sys.argv[2:]
sys.exit(main())
"""


def _children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tids:
        try:
            found += [int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
        except OSError:
            pass
    return found


def _stopped(pid: int) -> bool:
    """Whether every thread of ``pid`` is stopped (or gone), or waits in vfork() for a child
    that is: a thread that vforked cannot stop until its child execs, and the kill-at-operation
    hook may have stopped that child first (it stops the children it sees, then itself)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return True  # gone
    for tid in tasks:
        try:
            raw = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
            state = raw[raw.rindex(")") + 2]
            if state in "TtZX":
                continue
            if state == "D" and Path(f"/proc/{pid}/task/{tid}/wchan").read_text() == "kernel_clone":
                continue  # in vfork(): its child exists already, and is collected with it
        except OSError:
            continue  # that thread is gone
        return False
    return True


def _threads(pids: list[int]) -> dict[str, str]:
    """Each thread's state and kernel wait channel, for a message (``pid/tid`` -> ``D fsync``)."""
    found = {}
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue  # gone
        for tid in tids:
            try:
                raw = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
                wchan = Path(f"/proc/{pid}/task/{tid}/wchan").read_text()
                comm = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
            except OSError:
                continue
            found[f"{pid}/{tid} {comm}"] = f"{raw[raw.rindex(')') + 2]} {wchan}"
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every process it started, as a container runtime (or systemd's
    cgroup) ends every process of a container at once.

    Its process group is not enough: watcherd starts each git in a session of its own (to kill it
    on a timeout), and a git that outlived its watcherd would go on writing (into a staging tree a
    rerun has removed, into an index) as no real kill allows. The tree is stopped first, so
    nothing in it starts another process while it is collected."""
    seen: list[int] = []
    new = [pid]
    while new:
        for p in new:
            try:
                os.kill(p, signal.SIGSTOP)
            except ProcessLookupError:
                pass
        seen += new
        try:
            # A thread in uninterruptible sleep (an fsync on a busy disk) stops when it returns.
            wait_for(lambda: all(_stopped(p) for p in new), timeout=60, interval=0.001,
                     message=f"processes {new} to stop")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {_threads(new)}") from None
        new = [c for p in seen for c in _children(p) if c not in seen]
    for p in seen:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


class Proc:
    """A watcherd command in its own process group, its JSON log lines collected by a thread."""

    def __init__(self, config: Path, *args: str, kill_at_op: int | None = None) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
        env["PYTHONUNBUFFERED"] = "1"
        command = [WATCHERD, "--config", str(config), *args]
        if kill_at_op is not None:
            command = [sys.executable, "-c", _KILL_AT_OP, str(kill_at_op), *command[1:]]
        self.started = time.monotonic()
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env=env, start_new_session=True)
        self.log = LogLines(self.proc.stdout)

    def file_operations(self, after: str | None = None) -> range:
        """The numbers of the file operations a run with ``kill_at_op=0`` made, all of them or
        those after it logged the event ``after``."""
        ops = [line for line in self.log.lines if line.get("event") == "test.op"]
        first = 1
        if after is not None:
            at = next((i for i, line in enumerate(self.log.lines) if line.get("event") == after),
                      None)
            if at is None:
                return range(0)
            first = 1 + sum(1 for line in self.log.lines[:at] if line.get("event") == "test.op")
        return range(first, len(ops) + 1)

    def halted(self, timeout: float) -> bool:
        """Whether a run with ``kill_at_op`` reached its operation and stopped there (for
        :meth:`kill`), or ended, within ``timeout`` seconds."""
        try:
            self.log.wait("test.halted", timeout=timeout)
            return True
        except AssertionError:  # its output ended, or the time is up
            try:
                self.proc.wait(1)
                return True
            except subprocess.TimeoutExpired:
                return False

    def kill(self) -> bool:
        """SIGKILL the process and every git it started; True if that is how it ended (by this
        kill, at a random time or where it halted), False if it had exited by itself."""
        if self.proc.poll() is None:
            kill_tree(self.proc.pid)
        self.proc.wait(10)
        self.log.join()
        return self.proc.returncode == -signal.SIGKILL

    def wait(self, timeout: float) -> int:
        code = self.proc.wait(timeout)
        self.log.join()
        return code

    def last_op(self) -> str:
        """`` (rename)`` for a run killed at a file operation: the one it was about to make."""
        halted = any(line.get("event") == "test.halted" for line in self.log.lines)
        ops = [line["op"] for line in self.log.lines if line.get("event") == "test.op"]
        return f" ({ops[-1]})" if ops and halted else ""

    def last_step(self, steps: dict[str, str], before: str) -> str:
        """The step the last logged event in ``steps`` says the process was in."""
        for line in reversed(self.log.lines):
            if line.get("event") in steps:
                return steps[line["event"]]
        return before

    def failures(self) -> list[dict]:
        bad = ("snapshot.failed", "upload.failed", "daemon.failed", "daemon.crashed",
               "generation.conflict")
        return [line for line in self.log.lines if line.get("event") in bad
                or line.get("text", "").startswith(("Traceback", "watcherd:"))]

    def text(self, last: int = 40) -> str:
        return "\n".join(json.dumps({k: v for k, v in line.items() if k != "_t"})
                         for line in self.log.lines[-last:])


# Where a save was when it died: the last of these events it logged (DEBUG level).
SAVE_STEPS = {
    "daemon.ready": "waiting",
    "snapshot.started": "snapshot commit",
    "snapshot.committed": "waiting",
    "snapshot.unchanged": "waiting",
    "generation.saving": "bundle write",
    "bundle.written": "upload",
    "bundle.uploaded": "manifest swap",
    "manifest.swapped": "prune",
    "generation.pruned": "prune",
    "generation.saved": "waiting",
}
RESTORE_STEPS = {
    "bundle.downloaded": "verify + build",
    "restore.placing": "move into place",
    "restore.moved_aside": "move into place",
    "restore.resumed": "resume",
    "restore.done": "finished",
}


def write_config(path: Path, ws: Path, store: Path, state_dir: Path, *, keep: int = 3) -> Path:
    lines = ["[workspace]", f'path = "{ws}"', f'state_dir = "{state_dir}"', "", "[watch]",
             *(f'{k} = "{v}"' for k, v in TIMINGS.items()), "",
             "[store]", f'url = "file://{store}"', f'key = "{KEY}"', f"keep = {keep}", "",
             "[control]", 'listen = ""', "", "[log]", 'level = "debug"', 'format = "json"', ""]
    path.write_text("\n".join(lines))
    return path


def lib_config(ws: Path, store: Path, state_dir: Path) -> Config:
    return Config(workspace=WorkspaceConfig(path=ws, state_dir=state_dir),
                  store=StoreConfig(url=parse_store_url(f"file://{store}"), key=KEY),
                  restore=RestoreConfig())


def lib_restore(ws: Path, store: Path, state_dir: Path):
    """``watcherd restore`` in this process (quicker than a new one): outcome and its log events."""
    with capture_logs() as logs:
        outcome = restore(lib_config(ws, store, state_dir), Generations(LocalStore(store), KEY),
                          Request())
    return outcome, logs


def state_git_dir(state_dir: Path) -> Path:
    """watcherd's own repository (the snapshot history) in ``state_dir``."""
    return state_dir / KEY / "repo.git"


# -- what is in a commit, the store, the repository ------------------------------------------------


_BLOBS: dict[str, bytes] = {}  # blob id -> content; the megabytes of assets are read once


def commit_state(git_dir: Path, commit: str) -> dict[str, tuple]:
    """What :func:`helpers.tree_state` gives for a checkout of ``commit`` (in ``git_dir``)."""
    out = subprocess.run(["git", f"--git-dir={git_dir}", "ls-tree", "-r", "-z", "--full-tree",
                          commit], capture_output=True, check=True).stdout
    entries = []
    for record in filter(None, out.split(b"\0")):
        meta, path = record.split(b"\t", 1)
        mode, _, oid = meta.split()
        entries.append((mode, oid.decode(), os.fsdecode(path)))
    missing = sorted({oid for _, oid, _ in entries if oid not in _BLOBS})
    batch = subprocess.run(["git", f"--git-dir={git_dir}", "cat-file", "--batch"], check=True,
                           capture_output=True,
                           input="".join(f"{oid}\n" for oid in missing).encode()).stdout
    pos = 0
    for oid in missing:
        nl = batch.index(b"\n", pos)
        size = int(batch[pos:nl].split()[2])
        _BLOBS[oid] = batch[nl + 1:nl + 1 + size]
        pos = nl + 1 + size + 1
    state: dict[str, tuple] = {}
    for mode, oid, path in entries:
        data = _BLOBS[oid]
        parts = path.split("/")
        for i in range(1, len(parts)):
            state["/".join(parts[:i])] = ("dir",)
        state[path] = (("link", os.fsdecode(data)) if mode == b"120000"
                       else ("file", 0o100 if mode == b"100755" else 0, data))
    return state


def fsck(git_dir: Path) -> tuple[list[str], list[str]]:
    """What ``git fsck --no-dangling`` says is wrong, and the garbage it only warns about.

    A killed git can leave temporary object files (``tmp_obj_*``, ``tmp_pack_*``): fsck warns
    "garbage found", git ignores them and ``git gc`` removes them after two weeks. They are
    counted, not failed on; so are fsck's notices (watcherd's bare repository has no branch for
    its HEAD: "notice: HEAD points to an unborn branch"). Anything else fsck says, or a non-zero
    exit, is corruption.
    """
    r = subprocess.run(["git", f"--git-dir={git_dir}", "fsck", "--no-dangling", "--no-progress"],
                       capture_output=True, text=True)
    lines = (r.stdout + r.stderr).splitlines()
    garbage = [line for line in lines if line.startswith("warning: garbage found:")]
    errors = [line for line in lines if line not in garbage and not line.startswith("notice:")]
    if r.returncode != 0 and not errors:
        errors = [f"git fsck exited {r.returncode}"]
    return errors, garbage


def fsck_own(git_dir: Path, scratch: Path) -> tuple[list[str], list[str]]:
    """:func:`fsck` of watcherd's repository on its own objects: a hard-linked copy without its
    alternate (the workspace's objects, read through ``workspace-objects/``, which a kill may
    leave half rebuilt and the next snapshot rebuilds). A user's ``git gc`` may delete any of
    the workspace's objects, so watcherd's history must not need one."""
    copy = scratch / "fsck-own.git"
    shutil.rmtree(copy, ignore_errors=True)
    subprocess.run(["cp", "-al", str(git_dir), str(copy)], check=True)
    (copy / "objects" / "info" / "alternates").unlink(missing_ok=True)
    try:
        return fsck(copy)
    finally:
        shutil.rmtree(copy)


def lock_files(*roots: Path) -> list[str]:
    """Lock files under each of ``roots`` (watcherd's state directory, the workspace's .git)
    that a killed process leaves: git's ``*.lock`` files. Not ``daemon.lock``: it is held with
    flock(2), its existence means nothing (the kernel releases it with the process)."""
    return sorted(p.as_posix() for root in roots for p in root.rglob("*.lock")
                  if p.name != "daemon.lock")


def snapshot_chain(git_dir: Path) -> list[str]:
    r = subprocess.run(["git", f"--git-dir={git_dir}", "rev-list", "--first-parent", SNAPSHOT_REF],
                       capture_output=True, text=True)
    return r.stdout.split() if r.returncode == 0 else []


@dataclass
class Tally:
    """The figures of one scenario (docs/reliability.md)."""

    scenario: str
    command: str
    runs: int = 0
    kills: int = 0
    finished_before_kill: int = 0
    steps: collections.Counter = field(default_factory=collections.Counter)
    how: collections.Counter = field(default_factory=collections.Counter)  # timer / file op
    left: collections.Counter = field(default_factory=collections.Counter)  # restore: state left
    edits_lost: int = 0
    generations_corrupted: int = 0
    unexpected_exits: int = 0
    leaks: int = 0
    generations: int = 0
    edits: int = 0
    locks_left: int = 0  # kills after which a git lock file was there for the next run to handle
    fsck_garbage: int = 0  # kills after which fsck warned of a killed git's temporary files
    restore: bool = False
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0
    _counted: set = field(default_factory=set, repr=False)

    def problem(self, kind: str, text: str) -> None:
        """Record a finding; each count is of runs (kills) with at least one of that kind."""
        self.problems.append(f"run {self.runs}: {text}")
        if (self.runs, kind) in self._counted:
            return
        self._counted.add((self.runs, kind))
        if kind == "lost":
            self.edits_lost += 1
        elif kind == "corrupt":
            self.generations_corrupted += 1
        elif kind == "exit":
            self.unexpected_exits += 1
        elif kind == "leak":
            self.leaks += 1

    def report(self) -> str:
        def listed(counter: collections.Counter) -> str:
            return ", ".join(f"{k} {v}" for k, v in counter.most_common())

        text = (f"\n{self.scenario}: {self.runs} runs, {self.kills} kills "
                f"({listed(self.how)}; {self.finished_before_kill} runs finished first), "
                f"{self.edits} edits, {self.generations} generations, {self.seconds:.0f} s\n"
                f"  kills landed in: {listed(self.steps)}\n"
                + (f"  the workspace right after a kill: {listed(self.left)}\n" if self.left else "")
                + (f"  old workspace contents lost: {self.edits_lost}, workspaces left broken or "
                   f"not finished by the rerun: {self.generations_corrupted}"
                   if self.restore else
                   f"  edits lost: {self.edits_lost}, generations corrupted: "
                   f"{self.generations_corrupted}, lock files left for the next run: "
                   f"{self.locks_left}, fsck garbage warnings: {self.fsck_garbage}")
                + f", unexpected exits: {self.unexpected_exits}, leftovers: {self.leaks}\n"
                f"  reproduce: {self.command}")
        if REPORT:
            with open(REPORT, "a") as f:
                f.write(json.dumps({k: v for k, v in self.__dict__.items()
                                    if k not in ("problems", "_counted")}
                                   | {"problems": len(self.problems)}) + "\n")
        return text

    def verdict(self) -> None:
        print(self.report())
        assert not self.problems, "\n".join(self.problems[:10])


class StoreChecker:
    """Checks the store, watcherd's repository (and the workspace's) and a restore after each
    kill of a saver."""

    def __init__(self, ws: Path, store: Path, state_dir: Path, scratch: Path, writer: Writer,
                 tally: Tally) -> None:
        self.ws, self.store, self.scratch, self.writer, self.tally = ws, store, scratch, writer, tally
        self.state_dir = state_dir
        self.repo = state_git_dir(state_dir)
        self.seen: mf.Generation | None = None
        self.seen_state: dict[str, tuple] | None = None
        self.gens: set[int] = set()

    def check(self, context: str) -> None:
        t = self.tally
        for name, (errors, garbage) in (
                ("watcherd's repository (its own objects)", fsck_own(self.repo, self.scratch)),
                ("the workspace's repository", fsck(self.ws / ".git"))):
            if errors:
                t.problem("corrupt", f"{context}: git fsck of {name}: {errors[:5]}")
            t.fsck_garbage += bool(garbage)
        t.locks_left += any("/spool/" not in lock
                            for lock in lock_files(self.state_dir, self.ws / ".git"))
        blob = self.store / KEY / "manifest.json"
        if not blob.exists():
            if self.seen is not None:
                t.problem("lost", f"{context}: the manifest is gone")
            return
        try:
            manifest = mf.parse(blob.read_bytes(), "manifest.json")
        except Exception as exc:  # noqa: BLE001 - what matters is that it happened
            t.problem("corrupt", f"{context}: the manifest does not parse: {exc}")
            return
        for gen in manifest.generations:
            path = self.store / KEY / "bundles" / gen.bundle
            if not path.is_file():
                t.problem("corrupt", f"{context}: generation {gen.generation} names "
                                     f"{gen.bundle}, which is missing")
            elif file_digest(path) != (gen.size, gen.sha256):
                t.problem("corrupt", f"{context}: generation {gen.generation}'s bundle does not "
                                     "match the manifest's size and sha256")
        current = manifest.current
        chain = snapshot_chain(self.repo)
        if self.seen is not None:
            if current.generation < self.seen.generation:
                t.problem("lost", f"{context}: generation went back from "
                                  f"{self.seen.generation} to {current.generation}")
            elif current.generation == self.seen.generation and current != self.seen:
                t.problem("corrupt", f"{context}: generation {current.generation} changed")
            if current == self.seen:
                return  # already checked and restored; its bundle is immutable (checked above)
        # Every generation saved since the last check, oldest first: each one a snapshot that was
        # really taken, each one holding every edit the one before it held.
        for gen in sorted(manifest.generations, key=lambda g: g.generation):
            if self.seen is not None and gen.generation <= self.seen.generation:
                continue
            if gen.snapshot not in chain:
                t.problem("corrupt", f"{context}: generation {gen.generation}'s snapshot "
                                     f"{gen.snapshot[:12]} is not a commit of watcherd's "
                                     "snapshot history")
                return
            self.gens.add(gen.generation)
            state = commit_state(self.repo, gen.snapshot)
            for p in lost_edits(self.writer, self.seen_state, state):
                t.problem("lost", f"{context}: generation {gen.generation}: {p}")
            self.seen, self.seen_state = gen, state
        t.generations = len(self.gens)
        self.check_restore(current, self.seen_state, context)

    def check_restore(self, gen: mf.Generation, state: dict[str, tuple], context: str) -> None:
        """A new pod restores ``gen`` (a state directory of its own)."""
        target = self.scratch / f"restored-{gen.generation}"
        state_dir = self.scratch / f"restored-{gen.generation}-state"
        try:
            outcome, logs = lib_restore(target, self.store, state_dir)
        except Exception as exc:  # noqa: BLE001
            self.tally.problem("corrupt", f"{context}: restore of generation {gen.generation} "
                                          f"failed: {exc}")
            return
        if outcome.generation != gen.generation:
            bad = [e for e in logs if e["event"] == "restore.generation_bad"]
            self.tally.problem("corrupt", f"{context}: restore gave generation "
                                          f"{outcome.generation}, not {gen.generation}: {bad}")
        elif tree_state(target) != state:
            self.tally.problem("corrupt", f"{context}: restored tree of generation "
                                          f"{gen.generation} differs from its snapshot commit")
        elif git(target, f"--git-dir={state_git_dir(state_dir)}", "rev-parse",
                 SNAPSHOT_REF) != gen.snapshot:
            self.tally.problem("corrupt", f"{context}: the restored snapshot history does not "
                                          f"end at {gen.snapshot}")
        elif git(target, "for-each-ref", "refs/watcherd"):
            self.tally.problem("corrupt", f"{context}: the restored workspace holds watcherd's "
                                          "refs")
        shutil.rmtree(target)
        shutil.rmtree(state_dir)


# -- killing savers ----------------------------------------------------------------------------------


def settle_and_check_everything_saved(ws: Path, store: Path, writer: Writer, checker: StoreChecker,
                                      tally: Tally) -> None:
    """With the writer stopped, the newest generation must hold every edit it made, and killed
    saves must have left nothing behind that a clean one does not remove."""
    final = dict(writer.content)

    def saved() -> bool:
        blob = store / KEY / "manifest.json"
        if not blob.exists():
            return False
        state = commit_state(checker.repo,
                             mf.parse(blob.read_bytes(), "manifest").current.snapshot)
        return all(state.get(rel, (None,))[-1] == data for rel, data in final.items())

    try:
        wait_for(saved, timeout=30, interval=0.1, message="every edit to reach the store")
    except AssertionError:
        tally.problem("lost", "after the last restart, not every edit reached the store")
    checker.check("final")
    tracked = {k: v for k, v in tree_state(ws).items() if k != "build.log"}  # build.log: ignored
    if checker.seen_state != tracked:
        tally.problem("lost", "the last generation's tree is not the workspace's tree")


def check_nothing_left_behind(ws: Path, store: Path, state_dir: Path, tally: Tally) -> None:
    left = [p.relative_to(store).as_posix() for p in store.rglob(".tmp-*")]
    left += [p.relative_to(state_dir).as_posix() for p in (state_dir / KEY / "spool").glob("*")
             if not p.name.startswith(".")]
    left += [p.relative_to(state_dir).as_posix() for p in (state_dir / KEY).rglob("scratch/*")]
    if left:
        tally.problem("leak", f"killed saves left files that nothing removes: {left}")
    locks = lock_files(state_dir, ws / ".git")
    if locks:
        tally.problem("leak", f"lock files left after a clean run: {locks}")


def saver_setup(tmp_path: Path, seed: int, tally: Tally):
    ws = make_workspace(tmp_path / "ws")
    store = tmp_path / "store"
    state_dir = tmp_path / "state"
    config = write_config(tmp_path / "watcherd.toml", ws, store, state_dir)
    (tmp_path / "scratch").mkdir()
    writer = Writer(ws, seed)
    return ws, store, config, writer, StoreChecker(ws, store, state_dir, tmp_path / "scratch",
                                                   writer, tally)


def typical_seconds(logs: list[dict], event: str, default: float) -> float:
    """The median duration_ms of ``event`` in ``logs``, in seconds."""
    took = sorted(line["duration_ms"] for line in logs if line.get("event") == event)
    return took[len(took) // 2] / 1000 if took else default


def kill_daemon_repeatedly(tmp_path: Path, runs: int, seed: int) -> Tally:
    """Kill ``watcherd run`` at a random moment: a quarter of the kills at any time after it is
    ready, a quarter inside a save (after it logged ``generation.saving``), a quarter inside a
    snapshot, each at a random delay; the last quarter just before a random one of its own file
    operations in its next save cycles (publishing, swapping the manifest, pruning)."""
    rng = random.Random(seed)
    tally = Tally("kill -9 watcherd run", f"WATCHERD_CRASH_RUNS={runs} make test-long "
                  "(or: .venv/bin/python -m pytest -m slow tests/test_crash.py -k daemon)")
    ws, store, config, writer, checker = saver_setup(tmp_path, seed, tally)
    logs: list[dict] = []
    # How many file operations a start makes up to READY (the last run's), from READY to its first
    # save, and in a save: every run counts them, so that a file-operation kill aims at the save
    # cycles that follow a restart, past the first snapshot's rebuild of workspace-objects/.
    ready_ops, to_save_ops, cycle_ops = 0, [0], [10]
    started = time.monotonic()
    writer.start()
    try:
        for n in range(runs):
            tally.runs += 1
            aim = ("anywhere", "save", "snapshot", "file operation")[n % 4]
            kill_at = 0  # only counts
            if aim == "file operation":
                kill_at = (ready_ops + statistics.median(to_save_ops)
                           + rng.randint(1, 2 * int(statistics.median(cycle_ops))))
            d = Proc(config, "run", kill_at_op=int(kill_at))
            if aim == "file operation":
                # It may halt before READY: a start's own operations vary from run to run (the
                # pass over the user's index ends before or after READY), a kill there will do.
                if not d.halted(30):
                    aim = "anywhere"  # fewer operations than expected: a kill now will do
            else:
                d.log.wait("daemon.ready", timeout=20)
            if aim == "anywhere":
                time.sleep(rng.uniform(0, DAEMON_KILL_WINDOW))  # the random point
            elif aim != "file operation":
                try:
                    d.log.wait("generation.saving" if aim == "save" else "snapshot.started",
                               after=1, timeout=15)
                except AssertionError:
                    pass  # it exited: reported below
                event = "generation.saved" if aim == "save" else "snapshot.committed"
                time.sleep(rng.uniform(0, 1.2 * typical_seconds(logs, event, 0.3)))
            if not d.kill():
                tally.problem("exit", f"the daemon exited by itself:\n{d.text()}")
            if any(line.get("event") == "daemon.ready" for line in d.log.lines):
                ready_ops = d.file_operations(after="daemon.ready").start - 1
            if saving := d.file_operations(after="generation.saving"):
                to_save_ops.append(saving.start - 1 - ready_ops)
            if per_save := _ops_per_save(d.log.lines):
                cycle_ops.append(per_save)
            tally.kills += 1
            tally.how[aim if aim == "file operation" else f"timer ({aim})"] += 1
            tally.steps[d.last_step(SAVE_STEPS, "waiting") + d.last_op()] += 1
            logs += d.log.lines
            for line in d.failures():
                tally.problem("exit" if line["event"].startswith("daemon.") else "corrupt",
                              f"kill {n}: {line}")
            checker.check(f"after kill {n}")
        d = Proc(config, "run")
        d.log.wait("daemon.ready", timeout=20)
        writer.stop()
        settle_and_check_everything_saved(ws, store, writer, checker, tally)
        d.proc.send_signal(signal.SIGTERM)
        if d.wait(30) != 0 or d.failures():
            tally.problem("exit", f"the last daemon did not stop cleanly:\n{d.text()}")
        check_nothing_left_behind(ws, store, checker.state_dir, tally)
    finally:
        writer.stop()
        tally.edits = writer.edits
        tally.seconds = time.monotonic() - started
    return tally


def _ops_per_save(lines: list[dict]) -> int:
    """The file operations of the first whole save in a log of a counting run."""
    count, inside = 0, False
    for line in lines:
        if line.get("event") == "generation.saving":
            count, inside = 0, True
        elif line.get("event") == "test.op" and inside:
            count += 1
        elif line.get("event") == "generation.saved" and inside:
            return count
    return 0


def kill_snapshot_command_repeatedly(tmp_path: Path, runs: int, seed: int) -> Tally:
    """Kill ``watcherd snapshot --standalone``: every other run at a random time, the others just
    before a random one of its own file operations."""
    rng = random.Random(seed)
    tally = Tally("kill -9 watcherd snapshot", f"WATCHERD_CRASH_RUNS={runs} make test-long "
                  "(or: .venv/bin/python -m pytest -m slow tests/test_crash.py -k snapshot_command)")
    ws, store, config, writer, checker = saver_setup(tmp_path, seed, tally)
    started = time.monotonic()
    writer.start()
    try:
        # Python's start-up is not what this is about: timed kills start a little before the first
        # step and end a little after a whole run, so some runs finish and prove that what the
        # killed ones left blocks nothing.
        firsts, durations, ops = [], [], []
        for _ in range(3):
            p = Proc(config, "snapshot", "--standalone", kill_at_op=0)
            assert p.wait(60) == 0, p.text()
            firsts.append(p.log.lines[0]["_t"] - p.started)
            durations.append(time.monotonic() - p.started)
            # Half the file-operation kills among all of them, half among the short last steps.
            ops.append((p.file_operations(), p.file_operations(after="bundle.written")))
        window = (0.8 * min(firsts), 1.05 * sorted(durations)[1])
        for n in range(runs):
            tally.runs += 1
            if n % 2:
                every, last_steps = max(ops, key=lambda o: len(o[1]))
                at = rng.choice(every if n % 4 == 1 or not last_steps else last_steps)
                p = Proc(config, "snapshot", "--standalone", kill_at_op=at)
                p.halted(60)
                how = "file operation"
            else:
                p = Proc(config, "snapshot", "--standalone")
                time.sleep(rng.uniform(*window))  # the random point: the test's purpose
                how = "timer"
            if p.kill():
                tally.kills += 1
                tally.how[how] += 1
                tally.steps[p.last_step(SAVE_STEPS, "start-up") + p.last_op()] += 1
            else:
                tally.finished_before_kill += 1
                if p.proc.returncode != 0:
                    tally.problem("exit", f"an uninterrupted snapshot failed after run {n - 1}:"
                                          f"\n{p.text()}")
            for line in p.failures():
                tally.problem("corrupt", f"run {n}: {line}")
            checker.check(f"after run {n}")
        writer.stop()
        p = Proc(config, "snapshot", "--standalone")
        if p.wait(60) != 0:
            tally.problem("exit", f"the last snapshot failed:\n{p.text()}")
        settle_and_check_everything_saved(ws, store, writer, checker, tally)
        check_nothing_left_behind(ws, store, checker.state_dir, tally)
    finally:
        writer.stop()
        tally.edits = writer.edits
        tally.seconds = time.monotonic() - started
    return tally


@pytest.mark.parametrize("runs", runs_param("daemon", 2.5))
def test_a_daemon_killed_at_random_points_never_loses_a_saved_edit_or_leaves_a_bad_store(
        fast_tmp, runs) -> None:
    kill_daemon_repeatedly(fast_tmp, runs, seed=runs).verdict()


@pytest.mark.parametrize("runs", runs_param("snapshot_command", 2.0))
def test_a_snapshot_command_killed_at_random_points_never_loses_a_saved_edit_or_leaves_a_bad_store(
        fast_tmp, runs) -> None:
    kill_snapshot_command_repeatedly(fast_tmp, runs, seed=runs).verdict()


# -- killing restores --------------------------------------------------------------------------------


def full_state(root: Path, skip=lambda name: False) -> dict[str, tuple] | None:
    """Every entry under ``root``, ``.git`` included, but the top-level names ``skip`` says;
    None if ``root`` does not exist."""
    if not root.is_dir():
        return None
    state: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath) == root:
            dirnames[:] = [d for d in dirnames if not skip(d)]
            filenames = [f for f in filenames if not skip(f)]
        rel_dir = Path(dirpath).relative_to(root)
        for name in dirnames + filenames:
            full = Path(dirpath, name)
            rel = (rel_dir / name).as_posix()
            state[rel] = (("link", os.readlink(full)) if full.is_symlink()
                          else ("dir",) if full.is_dir()
                          else ("file", full.lstat().st_mode & 0o777, full.read_bytes()))
    return state


def make_stored_workspace(path: Path, store: Path) -> mf.Generation:
    """A workspace with enough files that checking it out takes a while, saved as generation 1;
    with an uncommitted edit, an untracked file and a deleted file, as a real snapshot has. Its
    state directory is ``<path>-state``."""
    make_workspace(path)
    for d in range(10):
        (path / "src" / f"pkg{d:02}").mkdir(parents=True)
        for f in range(40):
            (path / "src" / f"pkg{d:02}" / f"m{f:02}.py").write_text(f"# module {d}.{f}\n" * 20)
    git(path, "add", "-A")
    git(path, "commit", "--quiet", "-m", "sources")
    (path / "README.md").write_text("# app, edited\n")
    (path / "untracked.txt").write_text("not committed yet\n")
    (path / "src" / "pkg00" / "m00.py").unlink()
    repo = Repo(path.with_name(f"{path.name}-state"), KEY, path)
    with capture_logs():
        snapshot.prepare(repo)
        snapshot.take(repo)
        Generations(LocalStore(store), KEY).save(repo)
    return mf.parse((store / KEY / "manifest.json").read_bytes(), "manifest").current


def make_foreign(path: Path, entries: int) -> None:
    """What a pod may start with instead: another repository, with many top-level entries."""
    path.mkdir(exist_ok=True)
    for i in range(entries):
        (path / f"foreign{i:03}.txt").write_text(f"foreign {i}\n")
    git(path, "init", "--quiet")
    git(path, "add", "-A")
    git(path, "commit", "--quiet", "-m", "something else")


class RestoreChecker:
    """What a killed ``watcherd restore`` may leave in a workspace and in its state directory,
    and what its rerun (the same pod again: the same state directory) must give."""

    def __init__(self, target: Path, store: Path, state_dir: Path, gen: mf.Generation,
                 expected: dict, mount: bool, tally: Tally) -> None:
        self.target, self.store, self.gen, self.expected = target, store, gen, expected
        self.state_dir = state_dir
        self.mount, self.tally = mount, tally

    def scratch(self, name: str) -> bool:
        """Names a killed restore may leave inside a mount point until its rerun (its staging
        tree; downloads go to the state directory)."""
        return self.mount and name.startswith(".watcherd-restore-")

    def not_the_workspace(self, name: str) -> bool:
        return self.scratch(name) or (self.mount and name.startswith(".watcherd-aside-"))

    def asides(self) -> list[Path]:
        if self.mount:
            return sorted(self.target.glob(".watcherd-aside-*"))
        return sorted(self.target.parent.glob(f"{self.target.name}.watcherd-*"))

    def journal(self) -> dict | None:
        """The restore's journal in the state directory, None when there is none."""
        try:
            return json.loads((self.state_dir / KEY / JOURNAL).read_text())
        except FileNotFoundError:
            return None

    def resumable(self) -> bool:
        """A mount point's move stopped half-way, and the journal says how to finish it: the
        staged tree is complete (phase ready or moving) and still where the journal says."""
        j = self.journal()
        return bool(self.mount and j and j.get("phase") in ("ready", "moving")
                    and Path(j["staging"]).is_dir() and Path(j["staging"]).parent == self.target)

    def restored(self, *, finished: bool = True) -> bool:
        """The stored tree, HEAD and snapshot history are in place (the history in watcherd's
        repository, none of watcherd's refs in the workspace's); ``finished``: and the restore's
        journal is cleared (right after a kill it may remain, for the rerun to clear)."""
        t = self.target
        if not (t / ".git").is_dir():
            return False
        if finished and self.journal() is not None:
            return False
        now = {k: v for k, v in tree_state(t).items()
               if not self.not_the_workspace(k.split("/")[0])}
        history = subprocess.run(["git", f"--git-dir={state_git_dir(self.state_dir)}",
                                  "rev-parse", "--verify", "-q", SNAPSHOT_REF],
                                 capture_output=True, text=True).stdout.strip()
        return (now == self.expected and git(t, "rev-parse", "HEAD") == self.gen.head
                and history == self.gen.snapshot and git(t, "for-each-ref", "refs/watcherd") == "")

    def old_contents_kept(self, before: dict | None, context: str, *, killed: bool = False) -> None:
        """The workspace's old contents are whole in one place: still there, or in an aside (or,
        right after a kill, where the swap put them until the rerun gives them their aside name)."""
        if not before:
            return
        places = [full_state(self.target, self.not_the_workspace)]
        places += [full_state(a) for a in self.asides()]
        if killed and not self.mount:
            places += [full_state(p) for p in
                       self.target.parent.glob(f".{self.target.name}.watcherd-restore-*")]
        if before not in places:
            self.tally.problem("lost", f"{context}: the workspace's old contents are not whole "
                                       f"anywhere (asides: {[a.name for a in self.asides()]})")

    def after_kill(self, before: dict | None, context: str) -> None:
        """Untouched, restored, or (mount point) resumable as the journal says."""
        now = full_state(self.target, self.not_the_workspace)
        if now == before:
            verdict = "untouched"
        elif self.restored(finished=False):
            verdict = "restored"
        elif self.resumable():
            verdict = "resumable"
        else:
            verdict = "neither"
            what = "missing" if now is None else f"{len(now)} entries"
            self.tally.problem("corrupt", f"{context}: the workspace is neither untouched nor "
                                          f"restored nor resumable ({what}; journal "
                                          f"{self.journal()})")
        self.tally.left[verdict] += 1
        if verdict != "resumable":
            self.old_contents_kept(before, context, killed=True)

    def after_rerun(self, before: dict | None, context: str) -> None:
        try:
            outcome, _ = lib_restore(self.target, self.store, self.state_dir)
        except Exception as exc:  # noqa: BLE001 - counted and reported
            self.tally.problem("corrupt", f"{context}: the rerun failed: {exc}")
            return
        if outcome.generation != self.gen.generation or not self.restored():
            self.tally.problem("corrupt", f"{context}: the rerun did not restore the workspace "
                                          f"({outcome})")
        self.old_contents_kept(before, context)
        # One aside for old contents, none for an empty or absent workspace: a second one holds
        # what the restore should not have moved (its own tree, taken for foreign).
        if len(self.asides()) != (1 if before else 0):
            self.tally.problem("corrupt", f"{context}: the rerun left "
                                          f"{[a.name for a in self.asides()]} (expected "
                                          f"{'one aside' if before else 'none'})")
        for aside in self.asides() if self.mount else ():
            ignored = subprocess.run(["git", "check-ignore", "-q", f"{aside.name}/"],
                                     cwd=self.target).returncode == 0
            if not ignored:
                self.tally.problem("corrupt", f"{context}: {aside.name} is not ignored: the next "
                                              "snapshot would take the old contents in")
        if self.mount:
            left = [p.name for p in self.target.iterdir() if self.scratch(p.name)]
        else:
            left = [p.name for p in self.target.parent.iterdir()
                    if p.name.startswith(f".{self.target.name}.watcherd-")]
        left += [p.name for p in (self.state_dir / KEY).glob("download-*")]
        if left:
            self.tally.problem("leak", f"{context}: the rerun left {left}")
        # The daemon of this pod (the same state directory) continues from the restored history:
        # its first snapshot finds nothing new, and starts no new history.
        repo = Repo(self.state_dir, KEY, self.target)
        with capture_logs() as logs:
            snapshot.prepare(repo)
            snap = snapshot.take(repo)
        if snap.commit is not None or repo.snapshot_head() != self.gen.snapshot:
            self.tally.problem("corrupt", f"{context}: the daemon would not continue the restored "
                                          f"history (snapshot {snap.commit}, log "
                                          f"{[e['event'] for e in logs]})")

    def reset(self, variant: str) -> dict | None:
        """A new pod: put the workspace in ``variant``'s state, with a new state directory; what
        the workspace holds then."""
        t = self.target
        for aside in self.asides():
            shutil.rmtree(aside)
        if self.mount:
            for p in t.iterdir():
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        elif t.exists():
            shutil.rmtree(t)
        shutil.rmtree(self.state_dir, ignore_errors=True)
        if variant == "empty":
            t.mkdir(exist_ok=True)
        elif variant == "foreign":
            make_foreign(t, 200)
        return full_state(t)


def kill_restore_repeatedly(tmp_path: Path, target: Path, runs: int, seed: int,
                            mount: bool) -> Tally:
    """Kill ``watcherd restore`` into a workspace that is absent, empty, or holds another
    repository: every other run at a random time, the others just before a random one of its own
    file operations (the steps that place the tree and move the old one aside)."""
    rng = random.Random(seed)
    where = "a mount point" if mount else "beside the workspace"
    tally = Tally(f"kill -9 watcherd restore ({where})",
                  f"WATCHERD_CRASH_RUNS={runs} make test-long (or: .venv/bin/python -m pytest -m "
                  f"slow tests/test_crash.py -k restore_{'mount' if mount else 'beside'})",
                  restore=True)
    store = tmp_path / "store"
    source = tmp_path / "source"
    gen = make_stored_workspace(source, store)
    state_dir = tmp_path / "restore-state"
    config = write_config(tmp_path / "restore.toml", target, store, state_dir)
    checker = RestoreChecker(target, store, state_dir, gen,
                             commit_state(state_git_dir(source.with_name("source-state")), gen.snapshot),
                             mount, tally)
    variants = ["empty", "foreign"] if mount else ["absent", "empty", "foreign"]
    started = time.monotonic()
    # Timed kills spread from a little before the first step (a restore of a workspace that
    # already holds the history does nothing else) to a little after a whole restore.
    durations, ops = [], {}
    for variant in variants:
        checker.reset(variant)
        p = Proc(config, "restore", kill_at_op=0)
        assert p.wait(60) == 0, p.text()
        durations.append(time.monotonic() - p.started)
        # Half the file-operation kills among all of them, half among those that place the tree.
        ops[variant] = (p.file_operations(), p.file_operations(after="restore.placing"))
    p = Proc(config, "restore")
    assert p.wait(60) == 0, p.text()
    window = (0.8 * (time.monotonic() - p.started), 1.1 * max(durations))
    for n in range(runs):
        tally.runs += 1
        variant = variants[n % len(variants)]
        before = checker.reset(variant)
        if (n // len(variants)) % 2:
            every, placing = ops[variant]
            p = Proc(config, "restore", kill_at_op=rng.choice(every if rng.random() < 0.5 else placing))
            p.halted(60)
            how = "file operation"
        else:
            p = Proc(config, "restore")
            time.sleep(rng.uniform(*window))  # the random point: the test's purpose
            how = "timer"
        context = f"kill {n} ({variant}, {how})"
        if p.kill():
            tally.kills += 1
            tally.how[how] += 1
            tally.steps[p.last_step(RESTORE_STEPS, "read + download") + p.last_op()] += 1
        else:
            tally.finished_before_kill += 1
            if p.proc.returncode != 0:
                tally.problem("exit", f"{context}: an uninterrupted restore failed:\n{p.text()}")
        checker.after_kill(before, context)
        checker.after_rerun(before, context)
    tally.seconds = time.monotonic() - started
    return tally


def mount_tmpfs(path: Path) -> str | None:
    """Mount a tmpfs at ``path``; why not, when it cannot be done here."""
    path.mkdir(exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return "needs root to mount a tmpfs"
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1g", "tmpfs", str(path)],
                          capture_output=True, text=True)
    return None if proc.returncode == 0 else f"mounting a tmpfs is not permitted here: {proc.stderr.strip()}"


@pytest.fixture
def fast_tmp(tmp_path):
    """A tmpfs to run in, where that is allowed: hundreds of checkouts take a third of the time.
    The crash behaviour under test (renames, links, fsync) is the same on any local filesystem."""
    path = tmp_path / "tmpfs"
    if mount_tmpfs(path) is not None:
        yield tmp_path
        return
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture
def mount_point(fast_tmp):
    """A tmpfs mounted at the workspace, as a Kubernetes emptyDir is a mount point."""
    path = fast_tmp / "mnt"
    why = mount_tmpfs(path)
    if why is not None:
        pytest.skip(f"{why} (the workspace-is-a-mount-point path)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.mark.parametrize("runs", runs_param("restore_beside", 2.0))
def test_a_killed_restore_leaves_the_workspace_untouched_or_restored_and_a_rerun_finishes(
        fast_tmp, runs) -> None:
    kill_restore_repeatedly(fast_tmp, fast_tmp / "app", runs, seed=runs, mount=False).verdict()


@pytest.mark.parametrize("runs", runs_param("restore_mount", 2.0))
def test_a_killed_restore_into_a_mount_point_is_untouched_restored_or_resumed_by_a_rerun(
        fast_tmp, mount_point, runs) -> None:
    kill_restore_repeatedly(fast_tmp, mount_point, runs, seed=runs, mount=True).verdict()
