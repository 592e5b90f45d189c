"""Scale benchmark: watcherd's costs as the workspace grows, each next to raw git doing the same
work in the same run (issue 12, "Proof"). docs/benchmarks.md, "Scale", has the numbers.

Workspaces (generated under ``--workdir``, default ``bench/out/``, gitignored):

* ``files-N``: N tracked (committed, packed) text files, 25 to a directory, a ``node_modules/``
  the rules ignore; N = 1k / 10k / 50k (``--quick``: 1k / 5k / 10k);
* ``mb-M``: a small template repository plus M MB of new, untracked files (3 MiB media-like
  random files and 100 KiB text files, 3:1 by bytes); M = 10 / 100 / 400 (``--quick``: 10 / 40);
* ``chain``: a ~9.4 MB repository (1,000 sources and 46 random 200 KiB assets) saved 300 times
  after a 1-file edit each (``--quick``: 40).

What is measured, watcherd against raw git (interleaved, medians of ``--runs``):

* **ready**     ``watcherd run`` start → ``READY=1``, against a bare ``inotify_simple`` process
  walking the same tree pruned by name (bench_daemon's ``FLOOR_WALK``); the interpreter start and
  watcherd's imports are timed on their own;
* **first**     the first save (``snapshot.prepare`` + ``snapshot.take`` + ``Generations.save``
  into a local store, fresh state directory), against ``git add -A`` (``core.bigFileThreshold=1m``)
  + ``git commit`` + ``git bundle create --all`` in a copy of the workspace's git directory;
* **snapshot**  a snapshot after a 1-file edit (the daemon's warm cache), against
  ``git add -A && git commit`` of the same edit (same work tree, another git directory);
* **save**      the save (upload) that follows, bytes and time, against ``git bundle create`` of
  that commit only (``HEAD ^HEAD~1``);
* **restore**   ``restore.restore`` into an empty directory from a store holding one full bundle,
  against ``git clone`` of that bundle file (+ checkout of the snapshot); the CLI's wall time
  (interpreter start included) beside it;
* **index**     (largest files-N) CPU of the running daemon's process tree in the window after a
  user's ``git add`` of 1 file, against that ``git add``'s own CPU;
* **chain**     store bytes after each of 300 saves with ``keep = 10`` against one full bundle of
  the oldest kept point plus the increments since (raw git), and the pack count of watcherd's
  repository.

Run from the repository root::

    .venv/bin/python bench/bench_scale.py [--quick] [--only SECTION ...] [--out FILE]

Benchmarks are not tests: this reports, it does not fail on a number.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_daemon as bd  # noqa: E402  (a sibling script: /proc accounting, the daemon driver)
import svgplot  # noqa: E402

from watcherd import config as wconfig  # noqa: E402
from watcherd import log as wlog  # noqa: E402
from watcherd import restore as wrestore  # noqa: E402
from watcherd import snapshot as wsnap  # noqa: E402
from watcherd.cli.restore_cmd import generations_for  # noqa: E402
from watcherd.repo import open_repo  # noqa: E402
from watcherd.store import open_store  # noqa: E402

PY = sys.executable
WATCHERD = bd.WATCHERD
RUN = ".venv/bin/python bench/bench_scale.py"
SECTIONS = ("ready", "first", "snapshot", "save", "restore", "index", "chain")
KEY = "bench/ws"
# Raw git as a user runs it, minus anything of this machine's: no global or system config.
RAW_ENV = {**os.environ, "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": "/dev/null",
           "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@localhost",
           "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@localhost"}
BIG = ["-c", "core.bigFileThreshold=1m"]
WORDS = ("const let function return import export from await async if else for while class "
         "new this props state render value item list data error result config options "
         "handler request response user session token path file index module").split()
GITIGNORE = "node_modules/\n.next/\ndist/\n*.log\n"

TARGETS = {  # what the issue asks for: watcherd / raw at most
    "upload": 2.0, "store": 1.2, "index": 2.0, "restore": 1.3, "first_mb": 1.2, "ready": 2.0,
    "snapshot": 1.5,
}


# -- small helpers ---------------------------------------------------------------------------------


median = bd.median
say = bd.say


def git(*args: str, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-c", "core.hooksPath=/dev/null", *args], cwd=cwd,
                          env=RAW_ENV, check=check, capture_output=True)


def rgit(gd: Path, ws: Path, *args: str) -> subprocess.CompletedProcess:
    """Raw git on git directory ``gd`` with ``ws`` as its work tree."""
    return git(f"--git-dir={gd}", f"--work-tree={ws}", *args, cwd=ws)


class Clock:
    """Wall time and CPU (this process and every child reaped meanwhile) of a block."""

    def __enter__(self) -> "Clock":
        self._r = _cpu()
        self._t = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self._t
        self.cpu = _cpu() - self._r


def _cpu() -> float:
    s = resource.getrusage(resource.RUSAGE_SELF)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def loadavg() -> list[float]:
    return [float(x) for x in open("/proc/loadavg").read().split()[:3]]


def du(path: Path) -> int:
    total = 0
    for dirpath, _, names in os.walk(path):
        for n in names:
            try:
                total += os.lstat(os.path.join(dirpath, n)).st_size
            except OSError:
                pass
    return total


def rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def drop(path: Path) -> None:
    """Remove a tree (outside any timed block); the files' pages go with it."""
    if path.exists():
        subprocess.run(["rm", "-rf", str(path)], check=False)


def fs_probe(directory: Path, n: int = 2000) -> float:
    """Microseconds to create one empty file in ``directory`` (then removed): the file system's
    state, which moves every figure that writes many files (a checkout, a clone, a restore)."""
    d = Path(tempfile.mkdtemp(prefix="probe-", dir=directory))
    t = time.perf_counter()
    for i in range(n):
        os.close(os.open(d / str(i), os.O_WRONLY | os.O_CREAT, 0o644))
    took = time.perf_counter() - t
    shutil.rmtree(d)
    return took / n * 1e6


def ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


def spread(xs: list[float]) -> float:
    """(max - min) / median: how much the runs of one figure moved."""
    return (max(xs) - min(xs)) / median(xs) if xs and median(xs) else math.nan


# -- workspaces ------------------------------------------------------------------------------------


def text(rnd: random.Random, size: int) -> bytes:
    words = rnd.choices(WORDS, k=max(size // 6, 4))
    lines = [" ".join(words[i:i + 10]) for i in range(0, len(words), 10)]
    return ("\n".join(lines) + "\n").encode()[:size]


def init_repo(ws: Path) -> None:
    git("init", "-q", "-b", "main", str(ws))
    (ws / ".gitignore").write_text(GITIGNORE)
    # An ignored node_modules/ the pruned walks must not enter.
    rnd = random.Random(7)
    for i in range(200):
        d = ws / "node_modules" / f"pkg{i:03d}" / "lib"
        d.mkdir(parents=True)
        for j in range(5):
            (d / f"m{j}.js").write_bytes(text(rnd, 200))


def commit_all(ws: Path, message: str) -> None:
    git("add", "-A", cwd=ws)
    git("commit", "-q", "-m", message, cwd=ws)
    git("repack", "-adq", cwd=ws)  # a template clone is packed
    git("prune", cwd=ws)


def gen_files(ws: Path, n: int, seed: int = 1) -> dict:
    """``n`` tracked text files (~300 bytes) in directories of 25, committed and packed."""
    init_repo(ws)
    rnd = random.Random(seed)
    dirs = set()
    for i in range(n):
        d = ws / "src" / f"m{i // 1000:02d}" / f"d{(i // 25) % 40:02d}"
        if d not in dirs:
            d.mkdir(parents=True, exist_ok=True)
            dirs.add(d)
        (d / f"f{i:05d}.js").write_bytes(text(rnd, 200 + rnd.randrange(200)))
    commit_all(ws, f"{n} files")
    return {"tracked": n, "dirs": len(dirs)}


def tracked_file(ws: Path, k: int) -> Path:
    return next((ws / "src").glob(f"m*/d*/f{k:05d}.js"), None) or \
        sorted((ws / "src").rglob("*.js"))[k]


def gen_mb(ws: Path, mb: int, seed: int = 2) -> dict:
    """A template (300 committed sources) plus ``mb`` MB of new, untracked files: 3/4 of the
    bytes in 3 MiB random (media-like) files, 1/4 in 100 KiB text files."""
    init_repo(ws)
    rnd = random.Random(seed)
    for i in range(300):
        d = ws / "src" / "m00" / f"d{i // 25:02d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i:05d}.js").write_bytes(text(rnd, 300))
    commit_all(ws, "template")
    total = mb * 10**6
    media, texts = 0, 0
    (ws / "assets").mkdir()
    while media < total * 3 // 4:
        size = min(3 * 2**20, total * 3 // 4 - media)
        (ws / "assets" / f"media{media // 2**20:05d}.bin").write_bytes(rnd.randbytes(size))
        media += size
    chunk = text(rnd, 16 * 1024)
    i = 0
    while texts < total - media:
        d = ws / "content" / f"c{i // 50:03d}"
        d.mkdir(parents=True, exist_ok=True)
        size = min(100 * 1024, total - media - texts)
        body = (f"// page {i}\n".encode() + chunk * 8)[:size]
        (d / f"page{i:05d}.md").write_bytes(body)
        texts += size
        i += 1
    return {"tracked": 300, "new_bytes": media + texts, "new_files": i + media // (3 * 2**20) + 1}


def gen_chain(ws: Path) -> dict:
    """~9.4 MB of repository: 1,000 sources, 46 random 200 KiB assets."""
    init_repo(ws)
    rnd = random.Random(3)
    for i in range(1000):
        d = ws / "src" / "m00" / f"d{i // 25:02d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i:05d}.js").write_bytes(text(rnd, 200 + rnd.randrange(200)))
    (ws / "public").mkdir()
    for i in range(46):
        (ws / "public" / f"asset{i:02d}.png").write_bytes(rnd.randbytes(200 * 1024))
    commit_all(ws, "template")
    return {"tracked": 1046}


def raw_copy(ws: Path, dest: Path) -> Path:
    """A copy of the workspace's git directory (objects, index with valid stat data) that raw
    git uses with the same work tree: the same edits, none of its commits seen by watcherd."""
    shutil.copytree(ws / ".git", dest, symlinks=True)
    return dest


# -- watcherd in-process ---------------------------------------------------------------------------


def wd_config(ws: Path, state: Path, store: Path, **store_keys) -> wconfig.Config:
    raw = {"workspace": {"path": str(ws), "state_dir": str(state)},
           "store": {"url": f"file://{store}", "key": KEY, **store_keys},
           "control": {"listen": ""}, "log": {"level": "warning", "format": "json"}}
    return wconfig.from_mapping(raw, {}, None)


class WD:
    """What the daemon does on a snapshot and a save, called in this process."""

    def __init__(self, ws: Path, state: Path, store: Path, **store_keys) -> None:
        self.cfg = wd_config(ws, state, store, **store_keys)
        self.repo = open_repo(self.cfg)
        self.store = open_store(self.cfg.store)
        self.gens = generations_for(self.cfg, self.store)
        self.cache = wsnap.Cache()
        self.prepared = False

    def snapshot(self):
        if not self.prepared:
            wsnap.prepare(self.repo)
            self.prepared = True
        return wsnap.take(self.repo, "shadow", self.cache)

    def save(self):
        result = self.gens.save(self.repo, compact=True)
        self.repo.maintain()  # as Daemon._save
        return result

    def packs(self) -> int:
        return len(list((self.repo.git_dir / "objects" / "pack").glob("pack-*.pack")))

    def loose(self) -> int:
        return self.repo.bare.loose_object_count()


def wd_restore(target: Path, state: Path, store: Path) -> None:
    cfg = wd_config(target, state, store)
    st = open_store(cfg.store)
    try:
        wrestore.restore(cfg, generations_for(cfg, st), wrestore.Request())
    finally:
        st.close()


def cli_restore(target: Path, state: Path, store: Path, tmp: Path) -> float:
    cfg = tmp / "restore.toml"
    cfg.write_text(f'[workspace]\npath = "{target}"\nstate_dir = "{state}"\n'
                   f'[store]\nurl = "file://{store}"\nkey = "{KEY}"\n'
                   '[control]\nlisten = ""\n[log]\nlevel = "warning"\nformat = "json"\n')
    t = time.perf_counter()
    subprocess.run([WATCHERD, "--config", str(cfg), "restore"], check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def store_bundle(store: Path) -> Path:
    bundles = sorted((store / KEY / "bundles").glob("*.bundle"))
    assert len(bundles) == 1, bundles
    return bundles[0]


def raw_clone(bundle: Path, target: Path, snapshot: str) -> None:
    """``git clone`` of a bundle whose one ref is refs/watcherd/snapshots, then its checkout."""
    git("clone", "-q", "--no-checkout", "-c",
        "remote.origin.fetch=+refs/watcherd/*:refs/remotes/origin/watcherd/*",
        str(bundle), str(target))
    git("checkout", "-q", "--detach", snapshot, cwd=target)


def append(path: Path, i: int) -> None:
    with open(path, "a") as f:
        f.write(f"// edit {i}\n")


# -- the benchmark ---------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.quick = args.quick
        self.runs = args.runs or (3 if self.quick else 5)
        self.sections = set(args.only or SECTIONS)
        self.file_sizes = args.files if args.files is not None else \
            [1000, 5000, 10000] if self.quick else [1000, 10000, 50000]
        self.mb_sizes = args.mb if args.mb is not None else \
            [10, 40] if self.quick else [10, 100, 400]
        self.saves = args.saves or (40 if self.quick else 300)
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix="scale-", dir=args.workdir))
        self.res: dict = {"machine": bd.machine(), "quick": self.quick, "runs": self.runs,
                          "load": [("start", loadavg())], "workspaces": {},
                          "workdir": str(Path(args.workdir).resolve()),
                          "fs_probe_us": [fs_probe(self.tmp)]}
        self.n = 0

    def fresh(self, name: str) -> Path:
        self.n += 1
        return self.tmp / f"{name}-{self.n}"

    def mark_load(self, what: str) -> None:
        self.res["load"].append((what, loadavg()))

    def run(self) -> dict:
        t0 = time.monotonic()
        try:
            if self.sections & {"ready", "first", "snapshot", "save", "restore", "index"}:
                for n in self.file_sizes:
                    self.workspace(f"files-{n // 1000}k", lambda ws, n=n: gen_files(ws, n),
                                   index=n == self.file_sizes[-1])
                for mb in self.mb_sizes:
                    self.workspace(f"mb-{mb}", lambda ws, mb=mb: gen_mb(ws, mb), ready=False)
            if "chain" in self.sections:
                self.chain()
            self.interpreter()
        finally:
            self.mark_load("end")
            self.res["fs_probe_us"].append(fs_probe(self.tmp))
            self.res["total_s"] = time.monotonic() - t0
            if not self.args.keep:
                drop(self.tmp)
        return self.res

    # -- one workspace, every figure ---------------------------------------------------------------

    def workspace(self, name: str, generate, *, index: bool = False, ready: bool = True) -> None:
        ws = self.tmp / name
        say(f"{name}: generating")
        with Clock() as c:
            info = generate(ws)
        info["generate_s"] = c.wall
        r: dict = {"info": info}
        self.res["workspaces"][name] = r
        self.mark_load(f"{name} generated")
        if ready and "ready" in self.sections:
            r["ready"] = self.ready(ws)
        main = self.first_saves(ws, r)
        if "restore" in self.sections:
            r["restore"] = self.restores(main["store"], main["snapshot"])
        if self.sections & {"snapshot", "save"}:
            r["edits"] = self.edits(ws, main)
        if index and "index" in self.sections:
            r["index"] = self.index(ws)
        self.mark_load(f"{name} done")
        drop(ws)
        drop(main["raw"])
        for p in main["dirs"]:
            drop(p)

    def first_saves(self, ws: Path, r: dict) -> dict:
        """watcherd's first save and raw git's, interleaved; the last watcherd one is kept (with
        its state and store) for the edits and the restores."""
        wd_runs, raw_runs = [], []
        kept = None
        runs = self.runs if "first" in self.sections else 1
        for i in range(runs):
            raw = self.fresh("raw")
            raw_copy(ws, raw)
            bundle = self.fresh("raw-bundle")
            with Clock() as c:
                rgit(raw, ws, *BIG, "add", "-A")
                committed = git(f"--git-dir={raw}", f"--work-tree={ws}", "commit", "-q",
                                "-m", "save", cwd=ws, check=False).returncode == 0
                git(f"--git-dir={raw}", "bundle", "create", "-q", str(bundle), "--all", cwd=ws)
            raw_runs.append({"wall": c.wall, "cpu": c.cpu, "bytes": bundle.stat().st_size,
                             "committed": committed})
            bundle.unlink()
            state, store = self.fresh("state"), self.fresh("store")
            wd = WD(ws, state, store)
            with Clock() as cs:
                wd.snapshot()
            with Clock() as cu:
                saved = wd.save()
            wd_runs.append({"wall": cs.wall + cu.wall, "cpu": cs.cpu + cu.cpu,
                            "snapshot_wall": cs.wall, "save_wall": cu.wall,
                            "bytes": saved.bytes, "packs": wd.packs(), "loose": wd.loose()})
            say(f"  first save {i + 1}/{runs}: watcherd {cs.wall:.2f}+{cu.wall:.2f} s, "
                f"raw {c.wall:.2f} s")
            if kept is not None:
                for p in kept["dirs"]:
                    drop(p)
                drop(kept["raw"])
            kept = {"wd": wd, "raw": raw, "store": store, "snapshot": saved.snapshot,
                    "dirs": [state, store]}
        if "first" in self.sections:
            r["first"] = {"watcherd": wd_runs, "raw": raw_runs}
        return kept

    def restores(self, store: Path, snapshot: str) -> dict:
        bundle = store_bundle(store)
        wd_runs, raw_runs, cli_runs = [], [], []
        for i in range(self.runs):
            target, state = self.fresh("restored"), self.fresh("rstate")
            with Clock() as c:
                wd_restore(target, state, store)
            wd_runs.append({"wall": c.wall, "cpu": c.cpu})
            drop(target)
            drop(state)
            clone = self.fresh("clone")
            with Clock() as cr:
                raw_clone(bundle, clone, snapshot)
            raw_runs.append({"wall": cr.wall, "cpu": cr.cpu})
            drop(clone)
            if i < 2:
                target, state = self.fresh("restored"), self.fresh("rstate")
                cli_runs.append(cli_restore(target, state, store, self.tmp))
                drop(target)
                drop(state)
            say(f"  restore {i + 1}/{self.runs}: watcherd {c.wall:.2f} s, clone {cr.wall:.2f} s")
        return {"watcherd": wd_runs, "raw": raw_runs, "cli_wall": cli_runs,
                "bundle_bytes": bundle.stat().st_size}

    def edits(self, ws: Path, main: dict) -> dict:
        """A 1-file edit, then watcherd's snapshot and save and raw git's commit and incremental
        bundle of it (the same work tree), in alternating order."""
        wd: WD = main["wd"]
        raw: Path = main["raw"]
        out = {"snapshot": [], "raw_commit": [], "save": [], "raw_bundle": []}
        victims = sorted((ws / "src").rglob("*.js"))
        for i in range(self.runs + 1):
            append(victims[(i * 7919) % len(victims)], i)
            order = (self._wd_edit, self._raw_edit) if i % 2 else (self._raw_edit, self._wd_edit)
            got = {}
            for step in order:
                got.update(step(ws, wd, raw, i))
            if i == 0:
                continue  # the first edit after the first save warms the cache: not counted
            for k, v in got.items():
                out[k].append(v)
            say(f"  edit {i}/{self.runs}: snapshot {got['snapshot']['wall'] * 1000:.0f} ms "
                f"(raw {got['raw_commit']['wall'] * 1000:.0f} ms), save "
                f"{got['save']['bytes']} B (raw {got['raw_bundle']['bytes']} B)")
        return out

    def _wd_edit(self, ws: Path, wd: WD, raw: Path, i: int) -> dict:
        with Clock() as cs:
            snap = wd.snapshot()
        assert snap.commit, "the edit was not snapshotted"
        with Clock() as cu:
            saved = wd.save()
        return {"snapshot": {"wall": cs.wall, "cpu": cs.cpu},
                "save": {"wall": cu.wall, "cpu": cu.cpu, "bytes": saved.bytes,
                         "full": saved.full, "manifest": self._manifest_bytes(wd)}}

    @staticmethod
    def _manifest_bytes(wd: WD) -> int:
        path = Path(wd.cfg.store.url.path) / KEY / "manifest.json"
        return path.stat().st_size if path.exists() else 0

    def _raw_edit(self, ws: Path, wd: WD, raw: Path, i: int) -> dict:
        bundle = self.tmp / "inc.bundle"
        with Clock() as cc:
            rgit(raw, ws, "add", "-A")
            git(f"--git-dir={raw}", f"--work-tree={ws}", "commit", "-q", "-m", f"edit {i}",
                cwd=ws)
        with Clock() as cb:
            git(f"--git-dir={raw}", "bundle", "create", "-q", str(bundle), "HEAD", "^HEAD~1",
                cwd=ws)
        size = bundle.stat().st_size
        bundle.unlink()
        return {"raw_commit": {"wall": cc.wall, "cpu": cc.cpu},
                "raw_bundle": {"wall": cb.wall, "cpu": cb.cpu, "bytes": size}}

    # -- READY -------------------------------------------------------------------------------------

    def ready(self, ws: Path) -> dict:
        state, store = self.fresh("dstate"), self.fresh("dstore")
        cfg = self.tmp / "ready.toml"
        cfg.write_text(daemon_toml(ws, state, store, quiet="1h"))
        runs, floors, imports = [], [], []
        for i in range(self.runs + 1):
            imports.append(import_ms())
            floor, fproc = bd.floor_walk(ws, "pruned")
            fproc.wait()
            fproc.stdout.close()
            d = bd.Daemon(cfg, self.tmp, self.n + i)
            ready_ms = d.wait_ready()
            rec = d.wait_for(lambda r: r.get("event") == "watch.ready", timeout=30)
            watches = bd.inotify_watches(d.pid)
            d.proc.send_signal(signal.SIGTERM)
            d.proc.wait(timeout=120)
            d.sock.close()
            run = {"ready_ms": ready_ms, "walk_ms": rec.get("duration_ms"), "watches": watches,
                   "first": i == 0}
            runs.append(run)
            floors.append(floor)
            say(f"  READY {i + 1}/{self.runs + 1}: {ready_ms:.0f} ms (walk "
                f"{run['walk_ms']} ms, {watches} watches); floor "
                f"{floor['start_to_ready_ms']:.0f} ms")
        self.n += self.runs + 1
        drop(state)
        drop(store)
        return {"watcherd": runs, "floor": floors, "imports_ms": imports}

    def interpreter(self) -> None:
        """The interpreter's start and watcherd's imports, timed on their own."""
        bare, imports, floor_imports = [], [], []
        for _ in range(self.runs + 2):
            for out, code in ((bare, "pass"),
                              (imports, "import watcherd.cli, watcherd.daemon"),
                              (floor_imports, "import inotify_simple")):
                t = time.perf_counter()
                subprocess.run([PY, "-c", code], check=True)
                out.append((time.perf_counter() - t) * 1000)
        self.res["interpreter"] = {"bare_ms": bare, "watcherd_imports_ms": imports,
                                   "floor_imports_ms": floor_imports}

    # -- the index path ----------------------------------------------------------------------------

    def index(self, ws: Path) -> dict:
        """The running daemon's CPU in the window after a user's ``git add`` of 1 file."""
        state, store = self.fresh("istate"), self.fresh("istore")
        cfg = self.tmp / "index.toml"
        cfg.write_text(daemon_toml(ws, state, store, quiet="200ms"))
        d = bd.Daemon(cfg, self.tmp, self.n + 1000)
        d.wait_ready()
        d.wait_for(lambda r: r.get("event") == "snapshot.committed", timeout=300)
        victims = sorted((ws / "src").rglob("*.js"))
        out = []
        window = 2.0
        for i in range(self.runs):
            f = victims[(i * 104729) % len(victims)]
            mark = len(d.records)
            append(f, 1000 + i)
            rel = str(f.relative_to(ws))
            d.wait_for(lambda r: r.get("event") == "snapshot.committed"
                       and rel in (r.get("paths") or []), start=mark, timeout=120)
            time.sleep(1.0)
            mark = len(d.records)
            c0 = bd.tree_cpu(d.pid)
            with Clock() as ca:
                git("add", "--", rel, cwd=ws)
            time.sleep(window)
            c1 = bd.tree_cpu(d.pid)
            events = [r.get("event") for r in d.records[mark:]]
            out.append({"daemon_cpu": c1 - c0, "git_add_cpu": ca.cpu, "git_add_wall": ca.wall,
                        "events": events})
            say(f"  index {i + 1}/{self.runs}: daemon {c1 - c0:.2f} s CPU, git add "
                f"{ca.cpu:.3f} s CPU; events {events}")
        d.proc.send_signal(signal.SIGTERM)
        d.proc.wait(timeout=120)
        d.sock.close()
        drop(state)
        drop(store)
        return {"runs": out, "window_s": window}

    # -- 300 saves ---------------------------------------------------------------------------------

    def chain(self) -> None:
        ws = self.tmp / "chain"
        say("chain: generating")
        info = gen_chain(ws)
        raw = raw_copy(ws, self.fresh("raw"))
        state, store = self.fresh("state"), self.fresh("store")
        wd = WD(ws, state, store, keep=10)
        wd.snapshot()
        first = wd.save()
        info["first_bundle_bytes"] = first.bytes
        rgit(raw, ws, "add", "-A")
        victims = sorted((ws / "src").rglob("*.js"))
        saves = []
        commits = []
        for i in range(self.saves):
            append(victims[(i * 7919) % len(victims)], i)
            got = {}
            order = (self._wd_edit, self._raw_edit) if i % 2 else (self._raw_edit, self._wd_edit)
            for step in order:
                got.update(step(ws, wd, raw, i))
            commits.append(git(f"--git-dir={raw}", "rev-parse", "HEAD", cwd=ws).stdout.decode()
                           .strip())
            got["store_bytes"] = du(store)
            got["packs"] = wd.packs()
            got["loose"] = wd.loose()
            saves.append(got)
            if (i + 1) % 25 == 0:
                say(f"  chain {i + 1}/{self.saves}: store {got['store_bytes'] / 1e6:.2f} MB, "
                    f"packs {got['packs']}, last save {got['save']['bytes']} B "
                    f"({'full' if got['save']['full'] else 'increment'})")
        # Raw git's store for the same 10 restore points: a full bundle of the oldest of them,
        # plus the increments after it.
        git(f"--git-dir={raw}", "repack", "-adq", cwd=ws)
        keep = 10
        raw_store = {}
        points = sorted({k for k in range(keep, self.saves + 1, 10)} | {self.saves})
        for k in points:
            oldest = commits[max(k - keep, 0)]
            git(f"--git-dir={raw}", "update-ref", "refs/tags/oldest", oldest, cwd=ws)
            full = self.tmp / "full.bundle"
            git(f"--git-dir={raw}", "bundle", "create", "-q", str(full), "refs/tags/oldest",
                cwd=ws)
            incs = sum(s["raw_bundle"]["bytes"] for s in saves[max(k - keep + 1, 0):k])
            raw_store[k] = {"full": full.stat().st_size, "increments": incs}
            full.unlink()
        self.res["chain"] = {"info": info, "saves": saves, "raw_store": raw_store, "keep": keep}
        self.mark_load("chain done")
        for p in (ws, raw, state, store):
            drop(p)


def import_ms() -> float:
    """Wall time of the interpreter start plus watcherd's imports (what `watcherd run` pays
    before its own work), taken beside each READY sample."""
    t = time.perf_counter()
    subprocess.run([PY, "-c", "import watcherd.cli, watcherd.daemon"], check=True)
    return (time.perf_counter() - t) * 1000


def daemon_toml(ws: Path, state: Path, store: Path, *, quiet: str) -> str:
    return (f'[workspace]\npath = "{ws}"\nstate_dir = "{state}"\n'
            f'[watch]\nquiet_period = "{quiet}"\nmax_commit_delay = "{quiet}"\n'
            'idle_timeout = "1h"\nmax_upload_interval = "1h"\nshutdown_timeout = "60s"\n'
            f'[store]\nurl = "file://{store}"\nkey = "{KEY}"\n'
            '[control]\nlisten = ""\n[log]\nlevel = "info"\nformat = "json"\n')


# -- the report ------------------------------------------------------------------------------------


def fmt_s(x: float) -> str:
    if math.isnan(x):
        return "n/a"
    return f"{x * 1000:.0f} ms" if x < 1 else f"{x:.2f} s"


def fmt_b(x: float) -> str:
    if x >= 10**6:
        return f"{x / 1e6:.2f} MB"
    if x >= 10**3:
        return f"{x / 1e3:.1f} KB"
    return f"{x:.0f} B"


def fmt_r(x: float) -> str:
    if math.isnan(x):
        return "n/a"
    return "≈ 0 (within noise)" if x < 0.05 else f"{x:.2f}x" if x < 10 else f"{x:.0f}x"


def summary(res: dict) -> tuple[list[dict], dict]:
    """One row per figure: what, watcherd, raw, ratio, target, met, spread; and plot series."""
    rows: list[dict] = []
    W = res["workspaces"]
    interp = res.get("interpreter", {})
    imports = median(interp.get("watcherd_imports_ms", []))

    def row(what, wd, raw, r, target, fmt, noise=math.nan, note=""):
        rows.append({"what": what, "watcherd": fmt(wd), "raw": fmt(raw), "ratio": r,
                     "target": target, "met": (r <= target) if target and not math.isnan(r)
                     else None, "spread": noise, "note": note})

    ch = res.get("chain")
    if ch:
        incs = [s for s in ch["saves"] if not s["save"]["full"]]
        up = [s["save"]["bytes"] for s in incs]
        upm = [s["save"]["bytes"] + s["save"]["manifest"] for s in incs]
        rawb = [s["raw_bundle"]["bytes"] for s in incs]
        size = ch["info"]["first_bundle_bytes"] / 1e6
        row(f"bytes uploaded by a save after a 1-file edit, {size:.1f} MB repository (bundle)",
            median(up), median(rawb), ratio(median(up), median(rawb)),
            TARGETS["upload"], fmt_b, note=f"median of {len(up)} increments")
        row("  same, with the manifest rewritten by the save", median(upm), median(rawb),
            ratio(median(upm), median(rawb)), None, fmt_b)
        n = len(ch["saves"])
        last = ch["saves"][-1]["store_bytes"]
        rs = ch["raw_store"][str(n)] if str(n) in ch["raw_store"] else ch["raw_store"][n]
        raw_last = rs["full"] + rs["increments"]
        row(f"store bytes held after {n} such saves, keep = {ch['keep']}", last, raw_last,
            ratio(last, raw_last), TARGETS["store"], fmt_b)
        def at(k):
            v = ch["raw_store"][k]
            return ch["saves"][int(k) - 1]["store_bytes"], v["full"] + v["increments"]

        worst = max(ch["raw_store"], key=lambda k: at(k)[0] / at(k)[1])
        row(f"  same, the worst point of the {n} saves (sampled every 10)", *at(worst),
            ratio(*at(worst)), None, fmt_b, note=f"after save {worst}")
        packs = [s["packs"] for s in ch["saves"]]
        rows.append({"what": f"packs in watcherd's repository over {n} saves", "watcherd":
                     f"max {max(packs)}, last {packs[-1]}", "raw": "", "ratio": math.nan,
                     "target": None, "met": max(packs) <= 16, "spread": math.nan,
                     "note": "bounded (geometric repack above 8)"})
        st = [s["save"]["wall"] for s in incs]
        rt = [s["raw_bundle"]["wall"] for s in incs]
        row("  time of such a save (bundle + upload + manifest) vs `git bundle create` of it",
            median(st), median(rt), ratio(median(st), median(rt)), None, fmt_s)
    for name, r in W.items():
        if "index" in r:
            runs = r["index"]["runs"]
            dc = [x["daemon_cpu"] for x in runs]
            gc = [x["git_add_cpu"] for x in runs]
            row(f"daemon CPU after a user's `git add` of 1 file, {r['info']['tracked']:,} tracked "
                "files", median(dc), median(gc), ratio(median(dc), median(gc)), TARGETS["index"],
                fmt_s, spread(dc))
    for name, r in W.items():
        if "restore" in r:
            wdr = [x["wall"] for x in r["restore"]["watcherd"]]
            raw = [x["wall"] for x in r["restore"]["raw"]]
            row(f"restore into an empty dir vs `git clone` of the bundle, {label(name, r)}",
                median(wdr), median(raw), ratio(median(wdr), median(raw)), TARGETS["restore"],
                fmt_s, spread(wdr),
                note=f"CLI incl. interpreter: {fmt_s(median(r['restore']['cli_wall']))}")
    for name, r in W.items():
        if "first" in r and name.startswith("mb-"):
            wdf = [x["wall"] for x in r["first"]["watcherd"]]
            raw = [x["wall"] for x in r["first"]["raw"]]
            row(f"first save of {label(name, r)} vs `git add` (bigFileThreshold=1m) + commit + "
                "bundle", median(wdf), median(raw), ratio(median(wdf), median(raw)),
                TARGETS["first_mb"], fmt_s, spread(wdf))
    for name, r in W.items():
        if "first" in r and name.startswith("files-"):
            wdf = [x["wall"] for x in r["first"]["watcherd"]]
            raw = [x["wall"] for x in r["first"]["raw"]]
            row(f"first save, {label(name, r)} vs `git add -A` + `git bundle create --all`",
                median(wdf), median(raw), ratio(median(wdf), median(raw)), None, fmt_s,
                spread(wdf))
    for name, r in W.items():
        if "ready" in r:
            runs = [x["ready_ms"] for x in r["ready"]["watcherd"] if not x["first"]]
            fl = [x["start_to_ready_ms"] for x in r["ready"]["floor"]]
            imp = median(r["ready"].get("imports_ms") or [imports])
            rr = ratio(median(runs) - imp, median(fl))
            row(f"READY, {label(name, r)}; ratio: (READY − interpreter start and imports, "
                f"{imp:.0f} ms) / floor",
                median(runs) / 1000, median(fl) / 1000, rr, TARGETS["ready"], fmt_s, spread(runs),
                note=f"first start {fmt_s(r['ready']['watcherd'][0]['ready_ms'] / 1000)}; walk "
                     f"{median([x['walk_ms'] for x in r['ready']['watcherd']]):.0f} ms")
    for name, r in W.items():
        if "edits" in r and (name in ("files-1k", "mb-400") or name == list(W)[-1]
                             or name.startswith("files-")):
            wds = [x["wall"] for x in r["edits"]["snapshot"]]
            raw = [x["wall"] for x in r["edits"]["raw_commit"]]
            row(f"snapshot after a 1-file edit vs `git add -A && git commit`, {label(name, r)}",
                median(wds), median(raw), ratio(median(wds), median(raw)),
                TARGETS["snapshot"] if name in ("files-1k", "mb-400") else None, fmt_s,
                spread(wds))
    return rows, {}


def label(name: str, r: dict) -> str:
    if name.startswith("files-"):
        return f"{r['info']['tracked']:,} files"
    return f"{r['info']['new_bytes'] / 1e6:.0f} MB of new files"


def report(res: dict) -> str:
    m = res["machine"]
    out: list[str] = []
    w = out.append
    w(f"Run: `{' '.join([RUN, *res.get('argv', [])])}`, {m['date']}. Machine: {m['nproc']} vCPU "
      f"({m['cpu']}), {m['memory']}, Linux {m['kernel']}, {m['git']}, Python {m['python']}.")
    w("")
    probe = res.get("fs_probe_us")
    if probe:
        w(f"Work directory `{res.get('workdir')}`: creating one empty file there took "
          f"{probe[0]:.0f} µs at the start, {probe[-1]:.0f} µs at the end (the file system's "
          "state moves every figure that writes many files).")
        w("")
    loads = res["load"]
    w("Load average (1/5/15 min) through the run: " + "; ".join(
        f"{what} {l[0]:.2f}/{l[1]:.2f}/{l[2]:.2f}" for what, l in loads) + ".")
    w("")
    if res.get("quick"):
        w("**--quick: smaller workspaces and fewer runs; a check, not the reference numbers.**")
        w("")
    rows, _ = summary(res)
    w(f"Medians of {res['runs']} runs, watcherd and raw git interleaved. Spread = (max − min) / "
      "median of watcherd's runs.")
    w("")
    w("| what | watcherd | raw git, same run | ratio | target | met | spread |")
    w("|---|---|---|---|---|---|---|")
    for r in rows:
        target = f"≤ {r['target']:g}x" if r["target"] else ""
        met = {True: "yes", False: "**no**", None: ""}[r["met"]]
        note = f" ({r['note']})" if r["note"] else ""
        sp = "" if math.isnan(r["spread"]) else f"{r['spread'] * 100:.0f}%"
        w(f"| {r['what']}{note} | {r['watcherd']} | {r['raw']} | {fmt_r(r['ratio'])} | {target} "
          f"| {met} | {sp} |")
    w("")
    interp = res.get("interpreter")
    if interp:
        w(f"Interpreter start, measured on its own: `python -c pass` "
          f"{median(interp['bare_ms']):.0f} ms; `python -c 'import watcherd.cli, watcherd.daemon'` "
          f"{median(interp['watcherd_imports_ms']):.0f} ms; the floor's `import inotify_simple` "
          f"{median(interp['floor_imports_ms']):.0f} ms.")
        w("")
    w(detail(res))
    return "\n".join(out).rstrip() + "\n"


def detail(res: dict) -> str:
    out: list[str] = []
    w = out.append
    w("#### Per workspace (medians)")
    w("")
    w("| workspace | first save: watcherd (snapshot + save) / raw | bundle bytes: watcherd / raw "
      "| snapshot after an edit / raw commit | save after an edit / raw inc. bundle | "
      "restore / clone | READY / floor |")
    w("|---|---|---|---|---|---|---|")
    for name, r in res["workspaces"].items():
        cells = [label(name, r)]
        if "first" in r:
            f = r["first"]
            cells.append(f"{fmt_s(median([x['snapshot_wall'] for x in f['watcherd']]))} + "
                         f"{fmt_s(median([x['save_wall'] for x in f['watcherd']]))} / "
                         f"{fmt_s(median([x['wall'] for x in f['raw']]))}")
            cells.append(f"{fmt_b(median([x['bytes'] for x in f['watcherd']]))} / "
                         f"{fmt_b(median([x['bytes'] for x in f['raw']]))}")
        else:
            cells += ["", ""]
        if "edits" in r:
            e = r["edits"]
            cells.append(f"{fmt_s(median([x['wall'] for x in e['snapshot']]))} / "
                         f"{fmt_s(median([x['wall'] for x in e['raw_commit']]))}")
            cells.append(f"{fmt_s(median([x['wall'] for x in e['save']]))}, "
                         f"{fmt_b(median([x['bytes'] for x in e['save']]))} / "
                         f"{fmt_s(median([x['wall'] for x in e['raw_bundle']]))}, "
                         f"{fmt_b(median([x['bytes'] for x in e['raw_bundle']]))}")
        else:
            cells += ["", ""]
        if "restore" in r:
            cells.append(f"{fmt_s(median([x['wall'] for x in r['restore']['watcherd']]))} / "
                         f"{fmt_s(median([x['wall'] for x in r['restore']['raw']]))}")
        else:
            cells.append("")
        if "ready" in r:
            ready = [x["ready_ms"] for x in r["ready"]["watcherd"] if not x["first"]]
            floor = [x["start_to_ready_ms"] for x in r["ready"]["floor"]]
            cells.append(f"{fmt_s(median(ready) / 1000)} / {fmt_s(median(floor) / 1000)}")
        else:
            cells.append("")
        w("| " + " | ".join(cells) + " |")
    w("")
    return "\n".join(out)


def plots(res: dict, directory: Path) -> list[Path]:
    """Save and restore cost as the workspace grows, as SVG (plain Python, no plotting library)."""
    made = []
    for prefix, xlabel, xof in (("files-", "tracked files", lambda r: r["info"]["tracked"]),
                                ("mb-", "MB of new files", lambda r: r["info"]["new_bytes"] / 1e6)):
        ws = {n: r for n, r in res["workspaces"].items() if n.startswith(prefix) and "first" in r}
        if len(ws) < 2:
            continue
        xs = [xof(r) for r in ws.values()]

        def series(get):
            return [median(get(r)) for r in ws.values()]

        def walls(part, who):
            return series(lambda r: [x["wall"] for x in r[part][who]])

        def pairs(a, b):
            return series(lambda r: [x["wall"] + y["wall"]
                                     for x, y in zip(r["edits"][a], r["edits"][b])])

        red, blue, green = "#d62728", "#1f77b4", "#2ca02c"
        lines = [("watcherd first save", walls("first", "watcherd"), red, False),
                 ("raw git: add + commit + bundle", walls("first", "raw"), red, True)]
        if all("restore" in r for r in ws.values()):
            lines += [("watcherd restore", walls("restore", "watcherd"), blue, False),
                      ("raw git: clone of the bundle", walls("restore", "raw"), blue, True)]
        if all("edits" in r for r in ws.values()):
            lines += [("watcherd snapshot + save of a 1-file edit", pairs("snapshot", "save"),
                       green, False),
                      ("raw git: add + commit + incremental bundle",
                       pairs("raw_commit", "raw_bundle"), green, True)]
        path = directory / f"scale-{prefix.rstrip('-')}.svg"
        path.write_text(svgplot.loglog(f"save and restore cost vs {xlabel}", xlabel, "seconds",
                                       xs, lines))
        made.append(path)
    return made


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="watcherd at scale, against raw git (issue 12).")
    p.add_argument("--quick", action="store_true",
                   help="1k/5k/10k files, 10/40 MB, 40 saves, 3 runs (a few minutes)")
    p.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these sections")
    p.add_argument("--runs", type=int, help="runs of each figure (default 5, --quick 3)")
    p.add_argument("--saves", type=int, help="saves of the chain section (default 300)")
    p.add_argument("--files", type=int, nargs="*", metavar="N",
                   help="tracked-file workspaces (default 1000 10000 50000)")
    p.add_argument("--mb", type=int, nargs="*", metavar="MB",
                   help="new-file workspaces, MB (default 10 100 400)")
    p.add_argument("--out", type=Path, help="markdown report (default stdout)")
    p.add_argument("--json", type=Path, help="every raw measurement")
    p.add_argument("--svg-dir", type=Path, help="write the growth plots (SVG) here")
    p.add_argument("--from-json", type=Path, metavar="FILE", help="render an earlier --json")
    p.add_argument("--workdir", default=str(HERE / "out"),
                   help="where the generated trees go (default bench/out/, gitignored)")
    p.add_argument("--keep", action="store_true", help="keep the generated trees")
    args = p.parse_args(argv)
    if args.from_json:
        res = json.loads(args.from_json.read_text())
    else:
        if not Path(WATCHERD).exists():
            p.error(f"{WATCHERD} not found: run with the venv's python (.venv/bin/python)")
        wlog.configure("warning", "json", sys.stderr)
        bd.compile_bytecode()
        res = Bench(args).run()
        res["argv"] = list(argv if argv is not None else sys.argv[1:])
        if args.json:
            args.json.write_text(json.dumps(res, indent=1, default=str))
            res = json.loads(args.json.read_text())
        else:
            res = json.loads(json.dumps(res, default=str))
    text = report(res) + f"\n_Benchmark wall time: {res['total_s']:.0f} s._\n"
    if args.svg_dir:
        args.svg_dir.mkdir(parents=True, exist_ok=True)
        for path in plots(res, args.svg_dir):
            say(f"plot written to {path}")
    if args.out:
        args.out.write_text(text)
        say(f"report written to {args.out}")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
