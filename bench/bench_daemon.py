"""Benchmark of ``watcherd run`` on the reference workspace, against raw floors from the same run.

What it measures (docs/benchmarks.md, "Daemon", has the numbers and what they mean):

* **ready**   process start to ``READY=1`` (sd_notify) and the inotify watch count, against a bare
  ``inotify_simple`` process that walks the same non-ignored directories (the pruned walk), and a
  naive walk+watch of every directory (what watchdog and gitwatch do);
* **latency** edit of a tracked file to its ``snapshot.committed`` log line, minus quiet_period,
  against raw ``git status --porcelain && git add -A && git commit`` of the same kind of edit;
* **storm**   daemon CPU (its process tree, git children included) during an npm-like storm of
  100,000 file creations under ``node_modules/``, against the storm's own CPU; and how late the 3
  tracked edits made during the storm were snapshotted;
* **idle**    daemon CPU and context switches (wakeups) over 5 minutes of nothing, against a bare
  inotify process holding the pruned watches over the same window;
* **rss**     VmRSS/VmHWM of the daemon after READY and after the storm, against the bare process;
* **nested**  edit→snapshot latency with :data:`NESTED_REPOS` repositories cloned inside the
  workspace (each saved by the same rules at every snapshot), for an edit outside them and one
  inside one, against raw git saving the same: ``git add -A && git commit`` in each nested
  repository, then ``git status --porcelain && git add -A && git commit`` in the workspace.

Everything happens in one temporary directory under ``--workdir`` (default ``bench/out/``, which is
gitignored), removed at the end unless ``--keep``. Not the system temp dir by default: on the
machine of docs/benchmarks.md, creating files under ``/tmp`` cost 3-15x the kernel time of the same
files elsewhere on the same ext4 file system, which made the storm's floor swing.

Run from the repository root::

    .venv/bin/python bench/bench_daemon.py [--quick] [--out FILE] [--only SECTION ...]

``--quick`` (about 1-2 minutes) checks that everything works and gives rough numbers: a tenth of
``node_modules/`` (the sources are the same), a storm of 20,000 files over 10 s, 5 latency samples
instead of 20, 30 s of idle instead of 300 s, 3 starts instead of 5. Generating and removing the
full 150,000 files alone can take 2 minutes on a busy disk; ``--quick --full-size`` keeps them.

This is a benchmark, not a test: it reports, it does not judge. It needs Linux, git and the venv.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
import refworkspace  # noqa: E402  (a sibling script, not a package)

PY = sys.executable
WATCHERD = str(Path(PY).with_name("watcherd"))
CLK_TCK = os.sysconf("SC_CLK_TCK")
QUIET_PERIOD_S = 0.2
# Longer than the 5 s between the storm's tracked edits, so that no upload runs between them.
IDLE_TIMEOUT_S = 8.0
SECTIONS = ("ready", "latency", "storm", "idle", "rss", "watchdog", "nested")
NESTED_REPOS, NESTED_FILES = 5, 200  # the nested section: repositories, files in each
RUN = ".venv/bin/python bench/bench_daemon.py"

# The raw floor of "watch the workspace": a bare process that walks the directories git looks into
# (skipping node_modules/ and .next/ by name) and puts an inotify watch on each, with the mask the
# daemon uses for work directories. "all" walks everything (watchdog/gitwatch). With a hold time it
# then sits in a blocking read, the floor of an idle watcher.
FLOOR_WALK = r"""
import json, os, sys, time
from inotify_simple import INotify, flags as f
root, mode, hold = sys.argv[1], sys.argv[2], float(sys.argv[3])
skip = ("node_modules", ".next") if mode == "pruned" else ()
mask = (f.MODIFY | f.ATTRIB | f.CLOSE_WRITE | f.MOVED_FROM | f.MOVED_TO | f.CREATE | f.DELETE
        | f.DELETE_SELF | f.MOVE_SELF | f.ONLYDIR | f.DONT_FOLLOW | f.EXCL_UNLINK)
ino = INotify()
t0 = time.perf_counter()
n, stack = 0, [root]
while stack:
    d = stack.pop()
    ino.add_watch(d, mask)
    n += 1
    with os.scandir(d) as it:
        for e in it:
            if e.is_dir(follow_symlinks=False) and e.name != ".git" and e.name not in skip:
                stack.append(e.path)
walk_ms = (time.perf_counter() - t0) * 1000
st = dict(l.split(":", 1) for l in open("/proc/self/status") if ":" in l)
kib = lambda k: int(st[k].split()[0])
print(json.dumps({"watches": n, "walk_ms": walk_ms, "rss_kib": kib("VmRSS"),
                  "hwm_kib": kib("VmHWM")}), flush=True)
deadline = time.monotonic() + hold
while hold and time.monotonic() < deadline:
    ino.read(timeout=int(max(deadline - time.monotonic(), 0) * 1000) + 1)
"""


# -- small helpers ---------------------------------------------------------------------------------


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else math.nan


def p95(xs: list[float]) -> float:
    """Nearest-rank 95th percentile (of 20 samples: the second highest)."""
    if not xs:
        return math.nan
    s = sorted(xs)
    return s[max(0, math.ceil(0.95 * len(s)) - 1)]


def ratio(a: float, b: float) -> str:
    if b == 0 or math.isnan(a) or math.isnan(b):
        return "n/a"
    r = a / b
    return f"{r:.2g}x" if r < 0.1 else f"{r:.2f}x" if r < 10 else f"{r:.0f}x"


def ms(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.1f} ms" if x < 100 else f"{x:.0f} ms"


def say(*parts: object) -> None:
    print("[bench]", *parts, file=sys.stderr, flush=True)


def parse_ts(ts: str) -> float:
    return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


def git(cwd: Path, *args: str, capture: bool = False) -> str:
    r = subprocess.run(["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost",
                        "-c", "core.hooksPath=/dev/null", *args],
                       cwd=cwd, check=True, capture_output=True, text=True)
    return r.stdout if capture else ""


def machine() -> dict[str, str]:
    mem = next(line for line in open("/proc/meminfo") if line.startswith("MemTotal"))
    model = ""
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": str(os.cpu_count()),
        "cpu": model or platform.machine(),
        "memory": f"{int(mem.split()[1]) // 1024} MiB",
        "kernel": platform.release(),
        "git": subprocess.run(["git", "--version"], capture_output=True, text=True).stdout.strip(),
        "python": platform.python_version(),
        "loadavg at start": " ".join(open("/proc/loadavg").read().split()[:3]),
        "fs.inotify.max_user_watches": open("/proc/sys/fs/inotify/max_user_watches").read().strip(),
        "fs.inotify.max_queued_events": open("/proc/sys/fs/inotify/max_queued_events").read().strip(),
    }


# -- /proc accounting ------------------------------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    try:
        raw = open(f"/proc/{pid}/stat").read()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2:].split()  # fields from 3 (state) on


def descendants(pid: int) -> list[int]:
    out, stack = [], [pid]
    while stack:
        p = stack.pop()
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                kids = open(f"/proc/{p}/task/{tid}/children").read().split()
            except OSError:
                continue
            for k in kids:
                out.append(int(k))
                stack.append(int(k))
    return out


def tree_cpu(pid: int) -> float:
    """CPU seconds of ``pid``, its reaped children (cutime/cstime) and its live descendants.

    A child that is reaped between two readings moves from "live" to the parent's cutime: the sum
    stays continuous, which is what makes deltas of it honest.
    """
    total = 0
    for p in [pid, *descendants(pid)]:
        f = _stat(p)
        if f is not None:
            total += sum(int(x) for x in f[11:15])  # utime stime cutime cstime
    return total / CLK_TCK


def status_kib(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in open(f"/proc/{pid}/status"):
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM", "Threads"):
                out[k] = int(v.split()[0])
    except OSError:
        pass
    return out


class Switches:
    """Context switches of a process tree, per thread, so threads that come and go are counted."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.first: dict[tuple[int, int], tuple[int, int]] = {}
        self.last: dict[tuple[int, int], tuple[int, int]] = {}
        self.sample(initial=True)

    def sample(self, initial: bool = False) -> None:
        for p in [self.pid, *descendants(self.pid)]:
            try:
                tids = os.listdir(f"/proc/{p}/task")
            except OSError:
                continue
            for tid in tids:
                v = n = 0
                try:
                    for line in open(f"/proc/{p}/task/{tid}/status"):
                        if line.startswith("voluntary_ctxt_switches"):
                            v = int(line.split()[1])
                        elif line.startswith("nonvoluntary_ctxt_switches"):
                            n = int(line.split()[1])
                except OSError:
                    continue
                key = (p, int(tid))
                if initial:
                    self.first[key] = (v, n)
                self.last[key] = (v, n)

    def delta(self) -> tuple[int, int]:
        dv = dn = 0
        for key, (v, n) in self.last.items():
            v0, n0 = self.first.get(key, (0, 0))
            dv += v - v0
            dn += n - n0
        return dv, dn


def inotify_watches(pid: int) -> int:
    """Watches held by ``pid``'s inotify descriptors, as the kernel counts them."""
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:inotify":
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}") as info:
                n += sum(1 for line in info if line.startswith("inotify wd:"))
        except OSError:
            continue
    return n


def compile_bytecode() -> None:
    """Compile watcherd's modules as installing it does (pip compiles every module at install
    time; an image built from the Containerfile holds the bytecode), so that READY measures a
    deployed start. An editable install run under ``PYTHONDONTWRITEBYTECODE=1`` would compile
    all of watcherd at every start: about 100 ms more on this machine (`python -c 'import
    watcherd.cli, watcherd.daemon'`, median of 9, interleaved: 290 ms without watcherd's
    bytecode, 190 ms with it; 2026-12-02)."""
    subprocess.run([PY, "-m", "compileall", "-q", str(REPO / "watcherd")], check=True)


# -- the floors ------------------------------------------------------------------------------------


def floor_walk(root: Path, mode: str, hold: float = 0.0) -> tuple[dict, subprocess.Popen]:
    """Start a bare walker; return its report (with ``start_to_ready_ms``) and the process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([PY, "-c", FLOOR_WALK, str(root), mode, str(hold)],
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    report = json.loads(line)
    report["start_to_ready_ms"] = (time.perf_counter() - t0) * 1000
    return report, proc


def floor_copy(ws: Path, dest: Path) -> Path:
    """A copy of the workspace (work tree, .git, index, mtimes) for the raw git floor, where the
    daemon does not look. Made before any daemon runs.

    Its node_modules/ and .next/ are small: git never enters an ignored directory, it only sees the
    name, so their size does not change what `git status`/`git add -A` cost. A `git clone` would
    not do: its fresh index and checkout made every commit ~30% slower here.
    """
    def skip(d: str, names: list[str]) -> list[str]:
        return [n for n in names if n in refworkspace.IGNORED_TOPS] if Path(d) == ws else []

    shutil.copytree(ws, dest, symlinks=True, ignore=skip)
    for d in refworkspace.IGNORED_TOPS:
        (dest / d / "sub").mkdir(parents=True)
        (dest / d / "sub" / "x.js").write_text("x\n")
    return dest


def raw_git_sample(repo: Path, rel: str, i: int) -> tuple[float, float]:
    """Edit one tracked file, then time what a gitwatch-like loop runs for it: (status, all) ms."""
    with open(repo / rel, "a") as fh:
        fh.write(f"// raw floor edit {i}\n")
    t0 = time.perf_counter()
    git(repo, "status", "--porcelain")
    t1 = time.perf_counter()
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", f"raw floor edit {i}")
    t2 = time.perf_counter()
    return (t1 - t0) * 1000, (t2 - t0) * 1000


# -- the daemon under test -------------------------------------------------------------------------


class Daemon:
    """``watcherd run`` with its JSON log tailed and its sd_notify datagrams received."""

    def __init__(self, config: Path, tmp: Path, n: int) -> None:
        self.sock_path = tmp / f"notify-{n}.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.sock_path))
        self.records: list[dict] = []
        self.cond = threading.Condition()
        env = {**os.environ, "NOTIFY_SOCKET": str(self.sock_path)}
        env.pop("WATCHDOG_USEC", None)
        self.stderr = open(tmp / f"daemon-{n}.stderr", "w")
        self.cmd = [WATCHERD, "--config", str(config), "run"]
        self.t_spawn = time.perf_counter()
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=self.stderr, env=env)
        self.pid = self.proc.pid
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for raw in self.proc.stdout:
            try:
                rec = json.loads(raw)
            except ValueError:
                rec = {"event": "unparsed", "line": raw.decode("utf-8", "replace")}
            rec["_arrived"] = time.time()
            with self.cond:
                self.records.append(rec)
                self.cond.notify_all()

    def wait_ready(self, timeout: float = 120.0) -> float:
        """Milliseconds from spawn to the READY=1 datagram."""
        deadline = time.monotonic() + timeout
        self.sock.settimeout(0.2)
        while True:
            try:
                data = self.sock.recv(4096).decode()
            except TimeoutError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stderr.flush()
                    said = Path(self.stderr.name).read_text().strip()[-2000:]
                    raise RuntimeError(f"{' '.join(self.cmd)} never sent READY=1 (exit status "
                                       f"{self.proc.poll()}): {said}") from None
                continue
            if "READY=1" in data.split("\n"):
                return (time.perf_counter() - self.t_spawn) * 1000

    def wait_for(self, pred: Callable[[dict], bool], start: int = 0, timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        with self.cond:
            i = start
            while True:
                while i < len(self.records):
                    if pred(self.records[i]):
                        return self.records[i]
                    i += 1
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise TimeoutError(f"no matching log line within {timeout}s "
                                       f"(daemon exit status {self.proc.poll()})")
                self.cond.wait(min(left, 0.5))

    def mark(self) -> int:
        with self.cond:
            return len(self.records)

    def events(self, start: int = 0) -> list[dict]:
        with self.cond:
            return list(self.records[start:])

    def kill(self) -> None:
        """Only for a benchmark that failed half-way: no final save wanted."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.sock.close()
        self.sock_path.unlink(missing_ok=True)

    def stop(self, timeout: float = 90.0) -> tuple[int, float]:
        t0 = time.perf_counter()
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self.reader.join(5)
        self.sock.close()
        self.sock_path.unlink(missing_ok=True)
        self.stderr.close()
        return code, (time.perf_counter() - t0) * 1000


def write_config(tmp: Path, ws: Path, backend: str = "auto") -> Path:
    """The daemon's config. Its state directory (watcherd's own repository, private index and
    spool) is in the temporary tree too, on the workspace's file system, as an emptyDir beside
    the workspace's would be; every start of the benchmark reuses it, as a restarted pod does."""
    cfg = tmp / ("watcherd.toml" if backend == "auto" else f"watcherd-{backend}.toml")
    cfg.write_text(f"""\
[workspace]
path = "{ws}"
state_dir = "{tmp / 'state'}"

[watch]
backend = "{backend}"
quiet_period = "{int(QUIET_PERIOD_S * 1000)}ms"
idle_timeout = "{int(IDLE_TIMEOUT_S)}s"
shutdown_timeout = "60s"

[store]
url = "file://{tmp / 'store'}"
key = "bench/ref/main"

[control]
listen = ""

[log]
format = "json"
level = "info"
""")
    return cfg


def edit(path: Path, tag: str) -> float:
    """Append a line to a tracked file; the wall time right after close."""
    with open(path, "a") as fh:
        fh.write(f"// {tag}\n")
    return time.time()


def committed_with(rel: str) -> Callable[[dict], bool]:
    return lambda r: r.get("event") == "snapshot.committed" and rel in r.get("paths", [])


# -- the benchmark ---------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.quick = args.quick
        self.sections = set(args.only or SECTIONS)
        self.n_starts = 3 if self.quick else 5
        self.n_latency = 5 if self.quick else 20
        self.small = args.small or (self.quick and not args.full_size)
        self.storm_files = args.storm_files or (20_000 if self.small else 100_000)
        self.storm_seconds = 10.0 if self.quick else 20.0
        self.idle_seconds = args.idle_seconds or (30.0 if self.quick else 300.0)
        self.res: dict = {"machine": machine(), "quick": self.quick}
        self.notes: list[str] = []
        self.n_daemons = 0
        self.activity_mark: int | None = None  # log position where the last edits began

    def run(self) -> dict:
        base = Path(self.args.workdir)
        base.mkdir(parents=True, exist_ok=True)
        # Absolute: the config and NOTIFY_SOCKET must not depend on the daemon's working directory.
        tmp = Path(tempfile.mkdtemp(prefix="watcherd-bench-", dir=base)).resolve()
        self.tmp = tmp
        try:
            self._run(tmp)
        finally:
            if self.args.keep:
                say(f"kept {tmp}")
            else:
                t0 = time.perf_counter()
                # rm(1) is about twice as fast as shutil.rmtree on 250,000 files.
                subprocess.run(["rm", "-rf", "--one-file-system", str(tmp)], check=False)
                say(f"removed {tmp} in {time.perf_counter() - t0:.1f}s")
        return self.res

    def _run(self, tmp: Path) -> None:
        ws = tmp / "ws"
        say(f"generating the {'small' if self.small else 'reference'} workspace in {ws}")
        stats = refworkspace.generate(ws, refworkspace.SMALL if self.small else refworkspace.FULL)
        self.res["small"] = self.small
        self.res["workspace"] = dataclasses.asdict(stats)
        self.ws = ws
        self.sources = git(ws, "ls-files", capture=True).split()
        # Edits go to ordinary sources, not to .gitignore or package.json.
        self.editable = [p for p in self.sources if p.endswith((".ts", ".tsx", ".js", ".css"))]
        self.cfg = write_config(tmp, ws)
        say(f"workspace ready in {stats.seconds}s: {stats.sources} sources, "
            f"{stats.nm_dirs} node_modules dirs, {stats.nm_files} files")

        self.floors()
        if "ready" in self.sections:
            self.ready()
        if self.sections & {"latency", "storm", "idle", "rss"}:
            self.long_run()
        if "watchdog" in self.sections:
            self.watchdog()
        if "nested" in self.sections:
            self.nested()

    # -- floors ------------------------------------------------------------------------------------

    def floors(self) -> None:
        n = self.n_starts
        pruned, naive = [], []
        for _ in range(n):
            for mode, into in (("pruned", pruned), ("all", naive)):
                rep, proc = floor_walk(self.ws, mode)
                proc.wait()
                into.append(rep)
        self.res["floor_pruned"] = pruned
        self.res["floor_all"] = naive
        say("pruned walk: median %.1f ms in-process, %.0f ms from spawn, %d watches" % (
            median([r["walk_ms"] for r in pruned]), median([r["start_to_ready_ms"] for r in pruned]),
            pruned[0]["watches"]))
        say("naive walk: median %.1f ms in-process, %d watches" % (
            median([r["walk_ms"] for r in naive]), naive[0]["watches"]))

        if "latency" in self.sections:
            floor_copy(self.ws, self.tmp / "floor-copy")

    # -- time to READY -----------------------------------------------------------------------------

    def start(self, cfg: Path | None = None) -> Daemon:
        self.n_daemons += 1
        return Daemon(cfg or self.cfg, self.tmp, self.n_daemons)

    def ready(self, cfg: Path | None = None, key: str = "ready") -> None:
        runs = []
        for i in range(self.n_starts):
            d = self.start(cfg)
            try:
                ready_ms = d.wait_ready()
                watches = inotify_watches(d.pid)
                threads = len(os.listdir(f"/proc/{d.pid}/task"))
                wr = d.wait_for(lambda r: r.get("event") == "watch.ready", timeout=10)
                mem = status_kib(d.pid)
                # Let the start-up snapshot (one quiet period after READY) happen before stopping;
                # a SIGTERM right at READY is a different story (see docs/benchmarks.md).
                time.sleep(QUIET_PERIOD_S + 0.8)
            except BaseException:
                d.kill()
                raise
            code, stop_ms = d.stop()
            runs.append({"ready_ms": ready_ms, "watches": watches, "threads": threads,
                         "watch_ready_ms": wr.get("duration_ms"), "rss_kib": mem.get("VmRSS"),
                         "exit": code, "stop_ms": stop_ms})
            say(f"start {i + 1}: READY after {ready_ms:.0f} ms, {watches} watches "
                f"(walk {wr.get('duration_ms')} ms), exit {code} after {stop_ms:.0f} ms")
            if code != 0:
                self.notes.append(f"`watcherd run` exited {code} after SIGTERM (start {i + 1})")
        self.res[key] = runs

    # -- the watchdog backend ----------------------------------------------------------------------

    def watchdog(self) -> None:
        """The watchdog backend on the same workspace, right after the inotify backend's run:
        READY, watches, storm CPU (its own daemon, its own storm of the same size)."""
        cfg = write_config(self.tmp, self.ws, backend="watchdog")
        self.ready(cfg, key="watchdog_ready")
        d = self.start(cfg)
        try:
            d.wait_ready()
        except BaseException:
            d.kill()
            raise
        # The inotify run's storm figures stay where the report reads them.
        kept = {k: self.res.pop(k) for k in ("storm", "rss_storm", "latency") if k in self.res}
        mark, self.activity_mark = self.activity_mark, None
        try:
            time.sleep(QUIET_PERIOD_S + 1.0)
            self.storm(d)
            self.res["watchdog_storm"] = self.res.pop("storm")
            self.res["watchdog_rss_storm"] = self.res.pop("rss_storm")
        finally:
            self.res.update(kept)
            self.activity_mark = mark
            code, stop_ms = d.stop()
            say(f"watchdog daemon stopped: exit {code} after {stop_ms:.0f} ms")

    # -- nested repositories -----------------------------------------------------------------------

    def nested(self) -> None:
        """Repositories inside the workspace (``packages/nested-N``, untracked clones as an agent
        makes them), the same ones in a copy for the floor; edits alternate between a source of
        the workspace and a file of one nested repository. Run last: it adds to the workspace."""
        floor = self.tmp / "nested-floor"
        if not floor.exists():
            floor_copy(self.ws, floor)
        inside = []
        for root in (self.ws, floor):
            for i in range(NESTED_REPOS):
                n = root / "packages" / f"nested-{i}"
                (n / "src").mkdir(parents=True)
                for j in range(NESTED_FILES):
                    (n / "src" / f"f{j}.ts").write_text(f"export const f{j} = {j};\n")
                git(n, "init", "-q")
                git(n, "add", "-A")
                git(n, "commit", "-q", "-m", "nested")
                if root == self.ws:
                    inside.append(f"packages/nested-{i}/src/f{i}.ts")
        d = self.start()
        try:
            d.wait_ready()
            time.sleep(QUIET_PERIOD_S + 1.5)  # the start-up snapshot saves them all first
            runs: dict[str, list[float]] = {"outside": [], "inside": [], "floor": []}
            for i in range(self.n_latency):
                rel = self.editable[(i * 11) % len(self.editable)] if i % 2 else inside[i % 5]
                t0 = time.perf_counter()
                with open(floor / rel, "a") as fh:
                    fh.write(f"// floor {i}\n")
                for j in range(NESTED_REPOS):  # first: the workspace's commit records theirs
                    n = floor / "packages" / f"nested-{j}"
                    git(n, "add", "-A")
                    git(n, "commit", "-q", "--allow-empty", "-m", f"floor {i}")
                git(floor, "status", "--porcelain")
                git(floor, "add", "-A")
                git(floor, "commit", "-q", "-m", f"floor {i}")
                runs["floor"].append((time.perf_counter() - t0) * 1000)
                time.sleep(0.1)
                mark = d.mark()
                t_edit = edit(self.ws / rel, f"nested edit {i}")
                rec = d.wait_for(committed_with(rel), mark, timeout=30)
                runs["inside" if rel in inside else "outside"].append(
                    (parse_ts(rec["timestamp"]) - t_edit) * 1000 - QUIET_PERIOD_S * 1000)
                time.sleep(0.15 + 0.05 * (i % 4))
            self.res["nested"] = runs
            say(f"nested: edit->snapshot median outside {median(runs['outside']):.1f} ms, inside "
                f"{median(runs['inside']):.1f} ms; raw git median {median(runs['floor']):.1f} ms")
        finally:
            code, _ = d.stop()
            say(f"nested daemon stopped: exit {code}")

    # -- one long-running daemon for the rest ------------------------------------------------------

    def long_run(self) -> None:
        d = self.start()
        try:
            d.wait_ready()
        except BaseException:
            d.kill()
            raise
        try:
            # The start-up snapshot (nothing changed) happens one quiet period after READY.
            time.sleep(QUIET_PERIOD_S + 1.0)
            self.res["rss_ready"] = self.memory(d)
            self.res["long_run_watches"] = inotify_watches(d.pid)
            if "latency" in self.sections:
                self.latency(d)
            if self.sections & {"storm", "rss"}:
                self.storm(d)
            if self.sections & {"idle"}:
                self.idle(d)
        finally:
            code, stop_ms = d.stop()
            self.res["final_stop"] = {"exit": code, "stop_ms": stop_ms}
            say(f"daemon stopped: exit {code} after {stop_ms:.0f} ms")
            self.res["log_counts"] = self.count_events(d.events())

    def memory(self, d: Daemon) -> dict:
        kids = descendants(d.pid)
        own = status_kib(d.pid)
        children = [status_kib(k) for k in kids]
        return {"rss_kib": own.get("VmRSS"), "hwm_kib": own.get("VmHWM"),
                "threads": own.get("Threads"),
                "children_rss_kib": sum(c.get("VmRSS", 0) for c in children),
                "children": len(kids)}

    @staticmethod
    def count_events(records: list[dict]) -> dict[str, int]:
        counts: dict[str, int] = {}
        for r in records:
            counts[r.get("event", "?")] = counts.get(r.get("event", "?"), 0) + 1
        return counts

    def wait_uploaded(self, d: Daemon, start: int, timeout: float = 60.0) -> dict | None:
        try:
            return d.wait_for(lambda r: r.get("event") == "generation.saved", start, timeout)
        except TimeoutError:
            return None

    # -- edit -> snapshot --------------------------------------------------------------------------

    def latency(self, d: Daemon) -> None:
        """Daemon samples interleaved with raw-git samples, so both see the same machine load."""
        samples = []
        durations = []
        raw: dict[str, list[float]] = {"status": [], "commit": []}
        clone = self.tmp / "floor-copy"
        self.activity_mark = d.mark()
        cpu0 = tree_cpu(d.pid)
        for i in range(self.n_latency):
            rel = self.editable[(i * 7) % len(self.editable)]
            st, full = raw_git_sample(clone, rel, i)
            raw["status"].append(st)
            raw["commit"].append(full)
            time.sleep(0.1)
            mark = d.mark()
            t_edit = edit(self.ws / rel, f"latency edit {i}")
            rec = d.wait_for(committed_with(rel), mark, timeout=30)
            samples.append({"log_ms": (parse_ts(rec["timestamp"]) - t_edit) * 1000,
                            "seen_ms": (rec["_arrived"] - t_edit) * 1000})
            durations.append(rec.get("duration_ms"))
            # Let the daemon go back to waiting; vary the phase against anything periodic.
            time.sleep(0.15 + 0.05 * (i % 4))
        self.latency_end_cpu = tree_cpu(d.pid)
        cpu = self.latency_end_cpu - cpu0
        self.res["floor_git"] = raw
        self.res["latency"] = {"samples": samples, "snapshot_duration_ms": durations,
                               "daemon_cpu_s": cpu, "cpu_per_snapshot_s": cpu / len(samples)}
        lat = [s["log_ms"] - QUIET_PERIOD_S * 1000 for s in samples]
        say(f"edit->snapshot minus quiet_period: median {median(lat):.1f} ms, p95 {p95(lat):.1f} ms;"
            f" raw git status+add+commit: median {median(raw['commit']):.1f} ms, "
            f"p95 {p95(raw['commit']):.1f} ms")

    # -- storm -------------------------------------------------------------------------------------

    def storm(self, d: Daemon) -> None:
        # Start from a quiet daemon: the latency edits' upload must not land in the storm window.
        if self.activity_mark is not None:
            if self.wait_uploaded(d, self.activity_mark, timeout=IDLE_TIMEOUT_S + 60) is None:
                self.notes.append("no upload seen after the latency edits")
            time.sleep(1.0)
        self.activity_mark = d.mark()
        sw = Switches(d.pid)
        cpu0 = tree_cpu(d.pid)
        if "latency" in self.res:
            # Between the latency edits and now the daemon did one thing: the upload.
            self.res["latency"]["upload_cpu_s"] = cpu0 - self.latency_end_cpu
        t0 = time.monotonic()
        cmd = [PY, str(HERE / "refworkspace.py"), "storm", str(self.ws),
               "--files", str(self.storm_files), "--seconds", str(self.storm_seconds)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        try:
            self._storm(d, proc, t0, cpu0, sw)
        finally:
            if proc.returncode is None and proc.poll() is None:
                proc.kill()
                proc.wait()

    def _storm(self, d: Daemon, proc: subprocess.Popen, t0: float, cpu0: float,
               sw: Switches) -> None:
        mark = self.activity_mark
        edits = []
        picks = [self.editable[k * len(self.editable) // 3] for k in range(3)]
        for k, rel in enumerate(picks):
            at = t0 + self.storm_seconds * (k + 1) / 4  # 5, 10, 15 s of a 20 s storm
            time.sleep(max(0.0, at - time.monotonic()))
            edits.append({"path": rel, "t": edit(self.ws / rel, f"storm edit {k}"),
                          "at_s": time.monotonic() - t0})
        _, status, ru = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        storm_wall = time.monotonic() - t0
        cpu1 = tree_cpu(d.pid)
        sw.sample()
        in_window = self.count_events(d.events(mark))
        storm_out = json.loads(proc.stdout.read() or "{}")
        proc.stdout.close()
        storm_cpu = ru.ru_utime + ru.ru_stime
        for e in edits:
            try:
                rec = d.wait_for(committed_with(e["path"]), mark, timeout=60)
                e["late_ms"] = (parse_ts(rec["timestamp"]) - e["t"]) * 1000
                e["commit"] = rec.get("commit")
            except TimeoutError:
                e["late_ms"] = None
        # Include the snapshots of the last edit: they belong to the storm window's work.
        time.sleep(QUIET_PERIOD_S + 0.5)
        cpu2 = tree_cpu(d.pid)
        sw.sample()
        self.res["storm"] = {
            "storm": storm_out, "storm_exit": proc.returncode,
            "storm_cpu_s": storm_cpu, "storm_user_s": ru.ru_utime, "storm_sys_s": ru.ru_stime,
            "storm_wall_s": storm_wall,
            "daemon_cpu_s": cpu1 - cpu0, "daemon_cpu_incl_last_snapshot_s": cpu2 - cpu0,
            "switches": sw.delta(), "edits": edits,
            "log_counts": in_window,
        }
        self.res["rss_storm"] = self.memory(d)
        late = [e["late_ms"] for e in edits]
        say(f"storm: {storm_out.get('files_created')} files in {storm_wall:.1f}s, storm CPU "
            f"{storm_cpu:.2f}s, daemon CPU {cpu1 - cpu0:.3f}s ({cpu2 - cpu0:.3f}s with the last "
            f"snapshot); edits snapshotted after {late} ms")

    # -- idle --------------------------------------------------------------------------------------

    def idle(self, d: Daemon) -> None:
        # Quiet first: the upload of the last snapshot comes idle_timeout after the last edit.
        snaps = [i for i, r in enumerate(d.events()) if r.get("event") == "snapshot.committed"]
        if snaps and self.wait_uploaded(d, snaps[-1] + 1, timeout=IDLE_TIMEOUT_S + 60) is None:
            self.notes.append("no upload seen before the idle window")
        time.sleep(2.0)
        floor, fproc = floor_walk(self.ws, "pruned", hold=self.idle_seconds + 30)
        time.sleep(0.5)
        mark = d.mark()
        sw, fsw = Switches(d.pid), Switches(fproc.pid)
        c0, f0 = tree_cpu(d.pid), tree_cpu(fproc.pid)
        t0 = time.monotonic()
        say(f"idle window: {self.idle_seconds:.0f}s")
        while (left := t0 + self.idle_seconds - time.monotonic()) > 0:
            time.sleep(min(5.0, left))
            sw.sample()
            fsw.sample()
        c1, f1 = tree_cpu(d.pid), tree_cpu(fproc.pid)
        window = time.monotonic() - t0
        fproc.kill()
        fproc.wait()
        fproc.stdout.close()
        self.res["idle"] = {"window_s": window, "daemon_cpu_s": c1 - c0, "floor_cpu_s": f1 - f0,
                            "daemon_switches": sw.delta(), "floor_switches": fsw.delta(),
                            "log_lines": len(d.events(mark)),
                            "log_counts": self.count_events(d.events(mark))}
        say(f"idle: daemon {c1 - c0:.2f}s CPU, switches {sw.delta()}; floor {f1 - f0:.2f}s, "
            f"{fsw.delta()}")


# -- the report ------------------------------------------------------------------------------------


def report(res: dict) -> str:
    m = res["machine"]
    ws = res["workspace"]
    out: list[str] = []
    w = out.append
    w(f"Run: `{' '.join([RUN, *res['argv']])}`, {m['date']}. "
      f"Machine: {m['nproc']} vCPU ({m['cpu']}), {m['memory']}, Linux {m['kernel']}, "
      f"{m['git']}, Python {m['python']}; load average at start {m['loadavg at start']}.")
    w("")
    if res.get("small"):
        w("**Small workspace (a tenth of node_modules/): a check run, not the reference numbers.**")
        w("")
    gen = "generate DIR --small" if res.get("small") else "generate DIR"
    w(f"Workspace (`python bench/refworkspace.py {gen}`, {ws['seconds']} s to create): "
      f"{ws['sources']} tracked sources ({ws['source_bytes'] / 2**20:.2f} MiB) in "
      f"{ws['source_dirs']} non-ignored dirs; `node_modules/` {ws['nm_dirs']:,} dirs / "
      f"{ws['nm_files']:,} files; `.next/` {ws['next_dirs']} dirs / {ws['next_files']:,} files. "
      f"Daemon config: quiet_period {QUIET_PERIOD_S * 1000:.0f}ms, idle_timeout "
      f"{IDLE_TIMEOUT_S:.0f}s, shadow mode, state directory and local store on the workspace's "
      f"file system, control endpoint off, JSON log.")
    w("")
    pruned, naive = res["floor_pruned"], res["floor_all"]
    f_walk = median([r["walk_ms"] for r in pruned])
    f_start = median([r["start_to_ready_ms"] for r in pruned])
    n_walk = median([r["walk_ms"] for r in naive])
    n_start = median([r["start_to_ready_ms"] for r in naive])

    if "ready" in res:
        runs = res["ready"]
        d_ready = median([r["ready_ms"] for r in runs])
        d_walk = median([r["watch_ready_ms"] for r in runs if r["watch_ready_ms"] is not None])
        d_watches = runs[-1]["watches"]
        w(f"### Time to READY and watch count (median of {len(runs)} starts)")
        w("")
        w("| | watcherd | raw floor: pruned walk | ratio "
          "| naive walk of every dir (watchdog/gitwatch style) |")
        w("|---|---|---|---|---|")
        w(f"| process start → watches in place (`READY=1` for watcherd) | {ms(d_ready)} | "
          f"{ms(f_start)} | {ratio(d_ready, f_start)} | {ms(n_start)} |")
        w(f"| the walk itself, in-process (`watch.ready` duration_ms for watcherd) | {ms(d_walk)} | "
          f"{ms(f_walk)} | {ratio(d_walk, f_walk)} | {ms(n_walk)} |")
        w(f"| inotify watches (`/proc/PID/fdinfo`) | {d_watches} | {pruned[0]['watches']} | "
          f"{ratio(d_watches, pruned[0]['watches'])} | {naive[0]['watches']:,} |")
        first = runs[0]["ready_ms"]
        w("")
        w(f"First start (a new state directory: watcherd's repository and private index "
          f"created; empty store): {ms(first)}. Starts: "
          + ", ".join(f"{r['ready_ms']:.0f}" for r in runs) + " ms. "
          f"SIGTERM → exit (final snapshot + upload): median "
          f"{ms(median([r['stop_ms'] for r in runs]))}, exit status "
          f"{sorted({r['exit'] for r in runs})}.")
        w("watcherd's extra watches over the floor are its git directories (`.git`, `.git/info`, "
          "`.git/refs`, `refs/heads`, `refs/tags`, ...). The floor skips node_modules/ and .next/ "
          "by name; watcherd asks `git check-ignore`.")
        w("")
        w(f"Reproduce: `{RUN} --only ready`; floor: `python -c` of `FLOOR_WALK` in "
          "bench/bench_daemon.py (`ROOT pruned 0`, `ROOT all 0`).")
        w("")

    if "latency" in res:
        lat = res["latency"]
        vals = [s["log_ms"] - QUIET_PERIOD_S * 1000 for s in lat["samples"]]
        seen = [s["seen_ms"] - QUIET_PERIOD_S * 1000 for s in lat["samples"]]
        raw = res["floor_git"]["commit"]
        st = res["floor_git"]["status"]
        snap = [x for x in lat["snapshot_duration_ms"] if x is not None]
        w(f"### Edit → snapshot latency minus quiet_period "
          f"({len(vals)} edits, one tracked file each)")
        w("")
        w("| | watcherd | raw floor: `git status --porcelain && git add -A && git commit` | ratio |")
        w("|---|---|---|---|")
        w(f"| median | {ms(median(vals))} | {ms(median(raw))} | {ratio(median(vals), median(raw))} |")
        w(f"| p95 | {ms(p95(vals))} | {ms(p95(raw))} | {ratio(p95(vals), p95(raw))} |")
        w("")
        w(f"Latency = `timestamp` of the `snapshot.committed` log line naming the file − the wall "
          f"time right after the write, − {QUIET_PERIOD_S * 1000:.0f} ms. Of it, the snapshot "
          f"itself (`duration_ms`, shadow mode: the workspace's git state read as data, add "
          f"through the private index in the state directory, write-tree and diff-index, the "
          f"changed files read again, the commit object written by watcherd, the ref) took "
          f"median {ms(median(snap))}. Measured at line arrival on the pipe "
          f"instead: median {ms(median(seen))}, p95 {ms(p95(seen))}. Raw `git status --porcelain` "
          f"alone: median {ms(median(st))}.")
        w("")
        w(f"Reproduce: `{RUN} --only latency`; floor: in a copy of the generated workspace, "
          "append a line to a source, then `git status --porcelain && git add -A && "
          "git commit -q -m x`. The floor's samples are interleaved with the daemon's (same "
          "moment, same load).")
        w("")

    if "storm" in res:
        s = res["storm"]
        so = s["storm"]
        w(f"### CPU during an install-like storm ({so.get('files_created', 0):,} files / "
          f"{so.get('dirs_created', 0):,} dirs created under node_modules/, "
          f"{so.get('files_removed', 0):,} removed, {s['storm_wall_s']:.1f} s)")
        w("")
        w("| | watcherd (process tree, git children included) "
          "| raw floor: the storm's own CPU | ratio |")
        w("|---|---|---|---|")
        w(f"| CPU seconds during the storm | {s['daemon_cpu_s']:.2f} s | {s['storm_cpu_s']:.2f} s | "
          f"{ratio(s['daemon_cpu_s'], s['storm_cpu_s'])} |")
        per_snap = res.get("latency", {}).get("cpu_per_snapshot_s")
        per_up = res.get("latency", {}).get("upload_cpu_s")
        if per_snap is not None:
            n_snaps = s["log_counts"].get("snapshot.committed", 0)
            n_ups = s["log_counts"].get("generation.saved", 0)
            expected = n_snaps * per_snap + n_ups * (per_up or 0)
            rest = s["daemon_cpu_s"] - expected
            # Below a couple of 10 ms ticks the difference of two estimates is noise.
            shown, r = ((f"{rest:.2f} s", ratio(rest, s["storm_cpu_s"])) if rest > 0.02
                        else (f"≈ 0 s ({rest:+.2f} s)", "≈ 0"))
            w(f"| of which not its snapshots/uploads of the tracked edits (the storm's cost to the "
              f"daemon) | {shown} | {s['storm_cpu_s']:.2f} s | {r} |")
        w("")
        if per_snap is not None:
            w(f"Where the daemon's CPU went: in the same run without a storm, one snapshot of one "
              f"edited file cost {per_snap * 1000:.0f} ms of CPU (process tree, mean of the latency "
              f"edits) and one upload {(per_up or 0) * 1000:.0f} ms; the storm window held "
              f"{n_snaps} snapshot(s) and {n_ups} upload(s), ~{expected:.2f} s, of the "
              f"{s['daemon_cpu_s']:.2f} s measured. The storm itself costs the daemon nothing "
              f"measurable: writes under node_modules/ reach none of its watches. The storm cost "
              f"{s['storm_cpu_s'] / max(so.get('files_created', 1), 1) * 1e6:.0f} µs of CPU per "
              f"file created ({s['storm_sys_s']:.1f} s of its {s['storm_cpu_s']:.1f} s in the "
              f"kernel, which swings with the file system's state and the machine's other load), "
              f"{ms(s['storm_wall_s'] * 1000 / max(so.get('files_created', 1), 1) * 1000)} of "
              f"wall per 1,000 files.")
            w("")
        late = ", ".join("missed" if e["late_ms"] is None else f"{e['late_ms']:.0f} ms"
                         for e in s["edits"])
        at = ", ".join(f"{e['at_s']:.1f}" for e in s["edits"])
        w(f"Tracked edits made during the storm (t = {at} s): snapshotted {late} after the edit "
          f"(quiet_period {QUIET_PERIOD_S * 1000:.0f} ms; BASELINES: gitwatch 16–26 s late). "
          f"Daemon context switches in the window (voluntary, involuntary): {tuple(s['switches'])}. "
          f"Log events in the window: {s['log_counts']}.")
        w("")
        w(f"Reproduce: `{RUN} --only storm`; the storm alone: "
          f"`python bench/refworkspace.py storm DIR --files {so.get('files_created', 100000)} "
          f"--seconds {res.get('storm_seconds', 20):g}`.")
        w("")

    if "idle" in res:
        i = res["idle"]
        win = i["window_s"]
        dv, dn = i["daemon_switches"]
        fv, fn = i["floor_switches"]
        w(f"### Idle ({win:.0f} s{', not the 5 minutes of a full run' if win < 299 else ''})")
        w("")
        w("| | watcherd | raw floor: bare inotify process holding the pruned watches | ratio |")
        w("|---|---|---|---|")
        w(f"| CPU seconds over the window | {i['daemon_cpu_s']:.2f} s | {i['floor_cpu_s']:.2f} s | "
          f"{ratio(i['daemon_cpu_s'], i['floor_cpu_s'])} |")
        w(f"| context switches (voluntary + involuntary: wakeups) | {dv} + {dn} | {fv} + {fn} | "
          f"{ratio(dv + dn, fv + fn)} |")
        w(f"| log lines in the window | {i['log_lines']} | 0 | |")
        w("")
        w(f"CPU from /proc/PID/stat (utime+stime+cutime+cstime, {1000 // CLK_TCK} ms ticks) summed "
          "over the process tree (the daemon and its `git check-ignore`); switches from "
          "/proc/PID/task/*/status.")
        w("")
        w(f"Reproduce: `{RUN} --only idle [--idle-seconds N]`.")
        w("")

    if "rss_ready" in res:
        r0 = res["rss_ready"]
        r1 = res.get("rss_storm")
        f_rss = median([r["rss_kib"] for r in pruned])
        f_hwm = median([r["hwm_kib"] for r in pruned])
        n_rss = median([r["rss_kib"] for r in naive])
        w("### Memory")
        w("")
        w("| | watcherd | raw floor: bare pruned walk (python + inotify_simple) | ratio |")
        w("|---|---|---|---|")
        w(f"| VmRSS after READY | {r0['rss_kib'] / 1024:.1f} MiB | {f_rss / 1024:.1f} MiB | "
          f"{ratio(r0['rss_kib'], f_rss)} |")
        if r1:
            w(f"| VmRSS after the storm | {r1['rss_kib'] / 1024:.1f} MiB | {f_rss / 1024:.1f} MiB | "
              f"{ratio(r1['rss_kib'], f_rss)} |")
            w(f"| VmHWM (peak) after the storm | {r1['hwm_kib'] / 1024:.1f} MiB | "
              f"{f_hwm / 1024:.1f} MiB | {ratio(r1['hwm_kib'], f_hwm)} |")
        w("")
        last = r1 or r0
        w(f"Plus the long-lived `git check-ignore` child: {last['children_rss_kib'] / 1024:.1f} MiB "
          f"RSS ({last['children']} child process(es)); daemon threads: {last['threads']}. "
          f"The naive walk of every directory (watchdog/gitwatch style) holds "
          f"{n_rss / 1024:.1f} MiB in the same bare process (plus kernel memory for "
          f"{naive[0]['watches']:,} watches).")
        w("")
        w(f"Reproduce: `{RUN} --only rss`.")
        w("")

    if "final_stop" in res:
        fs = res["final_stop"]
        w(f"Long-running daemon: SIGTERM → exit {fs['exit']} after {ms(fs['stop_ms'])}; log events "
          f"over its life: {res.get('log_counts')}.")
        w("")
    if "watchdog_ready" in res:
        _report_watchdog(res, w)
    if "nested" in res:
        _report_nested(res, w)
    for n in res.get("notes", []):
        w(f"Note: {n}")
    return "\n".join(out).rstrip() + "\n"


def _report_watchdog(res: dict, w: Callable[[str], None]) -> None:
    wd, ino = res["watchdog_ready"], res.get("ready", [])
    wst, ist = res.get("watchdog_storm", {}), res.get("storm", {})

    def med(runs: list[dict], key: str) -> float:
        return median([r[key] for r in runs if r.get(key) is not None])

    w("### The watchdog backend, same workspace, same run")
    w("")
    w("| | inotify backend | watchdog backend (InotifyObserver, a schedule per directory) "
      "| ratio |")
    w("|---|---|---|---|")
    for label, key in (("process start → `READY=1`, median", "ready_ms"),
                       ("the walk (`watch.ready` duration_ms), median", "watch_ready_ms")):
        a, b = med(ino, key), med(wd, key)
        w(f"| {label} | {ms(a)} | {ms(b)} | {ratio(b, a)} |")
    for label, key in (("inotify watches (`/proc/PID/fdinfo`)", "watches"),
                       ("threads after READY", "threads")):
        a, b = (ino[-1].get(key) if ino else None), wd[-1].get(key)
        w(f"| {label} | {a} | {b} | {ratio(b, a) if a else 'n/a'} |")
    if wst and ist:
        a, b = ist["daemon_cpu_s"], wst["daemon_cpu_s"]
        w(f"| daemon CPU during the storm ({wst['storm'].get('files_created')} files) "
          f"| {a:.2f} s | {b:.2f} s | {ratio(b, a)} |")
        w(f"| the storm's own CPU (raw floor) | {ist['storm_cpu_s']:.2f} s "
          f"| {wst['storm_cpu_s']:.2f} s | |")
        for label, st in (("inotify", ist), ("watchdog", wst)):
            late = [None if e["late_ms"] is None else round(e["late_ms"]) for e in st["edits"]]
            w(f"| tracked edits during the storm, snapshotted after ({label}) | "
              f"{late} ms | | |")
    w("")
    w(f"Reproduce: `{RUN} --only ready storm watchdog`.")
    w("")



def _report_nested(res: dict, w: Callable[[str], None]) -> None:
    r = res["nested"]
    w(f"### Edit → snapshot with {NESTED_REPOS} nested repositories ({NESTED_FILES} files "
      "each), minus quiet_period")
    w("")
    w("| | watcherd, edit outside them | watcherd, edit inside one | raw floor | ratios |")
    w("|---|---|---|---|---|")
    for label, f in (("median", median), ("p95", p95)):
        a, b, c = f(r["outside"]), f(r["inside"]), f(r["floor"])
        w(f"| {label} | {ms(a)} | {ms(b)} | {ms(c)} | {ratio(a, c)} / {ratio(b, c)} |")
    w("")
    w("Raw floor: `git status --porcelain && git add -A && git commit` in a copy of the "
      "workspace, after `git add -A && git commit --allow-empty` in each nested repository "
      "(what saving them all costs raw git; watcherd snapshots each at every snapshot, "
      "changed or not).")
    w("")
    w(f"Reproduce: `{RUN} --only nested`.")
    w("")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Benchmark `watcherd run` on the reference workspace.")
    p.add_argument("--quick", action="store_true",
                   help="a small node_modules/, fewer samples, a 10 s storm of 20,000 files and "
                        "30 s of idle (1-2 minutes)")
    p.add_argument("--full-size", action="store_true",
                   help="with --quick: keep the reference workspace and the 100,000-file storm")
    p.add_argument("--out", type=Path, help="write the markdown report here (default: stdout)")
    p.add_argument("--json", type=Path, help="also write every raw measurement here")
    p.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these sections")
    p.add_argument("--workdir", default=str(HERE / "out"),
                   help="where the temporary tree goes (default: bench/out/, gitignored)")
    p.add_argument("--keep", action="store_true", help="keep the temporary tree")
    p.add_argument("--idle-seconds", type=float, help="idle window (default 300, --quick 30)")
    p.add_argument("--storm-files", type=int,
                   help="files the storm creates (default 100,000; 20,000 with a small workspace)")
    p.add_argument("--small", action="store_true",
                   help="a tenth of node_modules/ (the default of --quick): not the reference")
    p.add_argument("--from-json", type=Path, metavar="FILE",
                   help="only render the report of an earlier run's --json FILE")
    args = p.parse_args(argv)
    if args.from_json:
        res = json.loads(args.from_json.read_text())
        text = report(res) + f"\n_Benchmark wall time: {res['total_s']:.0f} s._\n"
        (args.out.write_text(text) if args.out else sys.stdout.write(text))
        return 0
    if not Path(WATCHERD).exists():
        p.error(f"{WATCHERD} not found: run with the venv's python (.venv/bin/python)")
    compile_bytecode()
    bench = Bench(args)
    t0 = time.monotonic()
    res = bench.run()
    res["notes"] = bench.notes
    res["argv"] = [a for a in (argv if argv is not None else sys.argv[1:])]
    res["storm_seconds"] = bench.storm_seconds
    res["total_s"] = time.monotonic() - t0
    text = report(res)
    text += f"\n_Benchmark wall time: {res['total_s']:.0f} s._\n"
    if args.out:
        args.out.write_text(text)
        say(f"report written to {args.out}")
    else:
        sys.stdout.write(text)
    if args.json:
        args.json.write_text(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
