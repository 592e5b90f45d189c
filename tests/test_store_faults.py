"""Store faults at the daemon level: the real ``watcherd run`` (and ``watcherd restore``) against S3
through a fault-injecting proxy, and against a local store, a workspace or a state directory on a
disk that fills up.

Each scenario injects one kind of fault while edits keep coming, and checks what the reliability
issue asks:

- the daemon keeps running (never exits) and retries with backoff: ``upload.failed`` lines carry
  ``attempt`` and a growing ``retry_in_s``, ``/status`` shows ``pending_retries.upload`` and
  ``last_error``;
- no manifest ever points at a partial object: an auditor thread reads the manifest over and over
  while the fault is on (straight from the store, not through the proxy) and checks that the bundle
  it names exists with the manifest's size and sha256; at the end every generation is checked;
- once the fault clears, the next attempt succeeds, no orphan is left, and a restore into an empty
  directory holds every edit (``tree_state``), made before, during and after the fault.

Downloads are ``watcherd restore`` through the proxy (or onto a full disk: the workspace's, or the
state directory's that holds the download): a fault it cannot ride out ends it with exit 1 and one
line, nothing installed and nothing left beside the workspace, and the rerun once the fault has
cleared restores every edit.

Each daemon and each restore has a state directory of its own (``workspace.state_dir``, a pod's
emptyDir), never the system default.

The default run does a short version of each scenario. ``make test-long`` (``-m slow``) repeats
them with random parameters (``$WATCHERD_FAULT_REPS`` times, default 6) and stalls one daemon past
the real 60 s read timeout. Every run's figures (faults injected, upload attempts, time from the
fault clearing to the generation being saved, edits and bytes lost, generations corrupted, daemon
exits) are appended as one JSON line to ``$WATCHERD_FIGURES`` when it is set;
``python tests/test_store_faults.py FILE`` prints them as a table.

The read timeout: S3Store's is 60 s and deliberately not a config key (DESIGN.md fixes the keys),
so a daemon cannot be given a shorter one. The quick stall scenarios therefore start the real
``watcherd`` through a launcher that builds its S3Store with ``read_timeout=1`` (the constructor
parameter S3Store keeps for tests and benchmarks); nothing else differs. The slow run also stalls
an unmodified daemon past the real default.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytest

from daemon_fixture import FAST, WATCHERD, Daemon, LogLines, _env, make_workspace, write_config
from helpers import git, said, tree_state, wait_for
from s3server import (
    FaultProxy,
    MotoS3,
    aws_env,
    drop_response,
    reset_request_after,
    reset_response_after,
    respond,
    stall,
)

# Read at import: conftest removes every WATCHERD_* variable from the environment of each test
# (a daemon would take them for config keys).
FIGURES = os.environ.get("WATCHERD_FIGURES")
REPS = int(os.environ.get("WATCHERD_FAULT_REPS", "6"))

KEY = "acme/faults/main"
PREFIX = "sandboxes"
SNAPSHOT_REF = "refs/watcherd/snapshots"
MiB = 2**20
FOREVER = 10**9  # a proxy rule that stays until the test clears it
#: The fixture's timings, quicker still: these tests wait for idle many times.
QUICK = {**FAST, "quiet_period": "100ms", "idle_timeout": "500ms"}
#: How long a scenario may take to see its upload fail, or recover: the daemon's backoff is
#: 1 s, 2 s, 4 s, 8 s (minus jitter), and botocore adds up to 1 s per retried request.
FAIL_WITHIN = 30.0

#: ``watcherd`` with its S3Store built with a shorter read timeout (argv[1], seconds).
_SHORT_READ_TIMEOUT = (
    "import functools, sys\n"
    "from watcherd.store import s3\n"
    "s3.S3Store.__init__ = functools.partialmethod(s3.S3Store.__init__,\n"
    "                                              read_timeout=float(sys.argv.pop(1)))\n"
    "from watcherd.cli import main\n"
    "sys.exit(main())\n"
)


def watcherd_command(read_timeout: float | None) -> list[str]:
    if read_timeout is None:
        return [WATCHERD]
    return [sys.executable, "-c", _SHORT_READ_TIMEOUT, str(read_timeout)]


# -- stores as the tests see them (never through the proxy) ----------------------------------------


class S3View:
    """The bucket, read straight from moto."""

    kind = "s3"

    def __init__(self, moto: MotoS3, bucket: str, creds: tuple[str, str] | None = None) -> None:
        self.moto, self.bucket = moto, bucket
        self.client = moto.client("s3", *creds) if creds else moto.client()

    def _key(self, name: str) -> str:
        return f"{PREFIX}/{KEY}/{name}"

    def _get(self, name: str) -> bytes | None:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(name))["Body"].read()
        except self.client.exceptions.NoSuchKey:
            return None

    def manifest(self) -> dict[str, Any] | None:
        data = self._get("manifest.json")
        return json.loads(data) if data is not None else None

    def bundle(self, name: str) -> bytes | None:
        return self._get(f"bundles/{name}")

    def bundle_names(self) -> set[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self._key("bundles/"))
        return {o["Key"].rsplit("/", 1)[1] for p in pages for o in p.get("Contents", ())}

    def leftovers(self) -> list[str]:
        """Unfinished multipart uploads (parts billed for ever)."""
        resp = self.client.list_multipart_uploads(Bucket=self.bucket)
        return [u["Key"] for u in resp.get("Uploads", ())]


class LocalView:
    """A local store directory."""

    kind = "local"

    def __init__(self, root: Path) -> None:
        self.root = root

    def manifest(self) -> dict[str, Any] | None:
        path = self.root / KEY / "manifest.json"
        return json.loads(path.read_bytes()) if path.is_file() else None

    def bundle(self, name: str) -> bytes | None:
        path = self.root / KEY / "bundles" / name
        return path.read_bytes() if path.is_file() else None

    def bundle_names(self) -> set[str]:
        folder = self.root / KEY / "bundles"
        return {p.name for p in folder.iterdir()} if folder.is_dir() else set()

    def leftovers(self) -> list[str]:
        """Temp files of writes that did not finish."""
        return [str(p) for p in self.root.rglob(".tmp-*")]


View = S3View | LocalView


class Auditor:
    """Reads the manifest over and over while a scenario runs: every version must name a whole
    bundle (the manifest's size and sha256). Bundles are immutable, so each is checked once."""

    def __init__(self, view: View, interval: float = 0.05) -> None:
        self.view = view
        self.interval = interval
        self.checked: dict[str, tuple[int, str]] = {}
        self.generations: set[int] = set()
        self.corrupt: set[str] = set()
        self.manifests_seen = 0
        self.problems: list[str] = []
        self._last: bytes | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="auditor", daemon=True)

    def start(self) -> Auditor:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check()
            except Exception as exc:  # noqa: BLE001 - reported by the test, not lost in a thread
                self.problems.append(f"auditor could not read the store: {exc!r}")

    def check(self, everything: bool = False) -> dict[str, Any] | None:
        """Check the current manifest (and with ``everything``, every generation it keeps)."""
        with self._lock:
            manifest = self.view.manifest()
            if manifest is None:
                return None
            raw = json.dumps(manifest, sort_keys=True).encode()
            if raw != self._last:
                self._last = raw
                self.manifests_seen += 1
            gens = [manifest] + (list(manifest.get("history", ())) if everything else [])
            for g in gens:
                self._verify(g)
            return manifest

    def _verify(self, g: dict[str, Any]) -> None:
        name, size, sha = g["bundle"], g["size"], g["sha256"]
        if self.checked.get(name) == (size, sha):
            return
        data = self.view.bundle(name)
        problems = len(self.problems)
        if data is None:
            self.problems.append(f"generation {g['generation']} names {name}, which does not exist")
        elif len(data) != size:
            self.problems.append(f"generation {g['generation']}: {name} has {len(data)} bytes, "
                                 f"the manifest says {size}")
        elif hashlib.sha256(data).hexdigest() != sha:
            self.problems.append(f"generation {g['generation']}: {name} does not match its sha256")
        else:
            self.checked[name] = (size, sha)
            self.generations.add(g["generation"])
        if len(self.problems) > problems:
            self.checked[name] = (size, sha)  # said once is enough
            self.corrupt.add(name)


# -- edits, as an agent makes them -----------------------------------------------------------------


class Edits:
    """Every edit made to the workspace, to count what a restore lost (must be nothing)."""

    def __init__(self, workspace: Path, rng: random.Random) -> None:
        self.ws = workspace
        self.rng = rng
        self.made: dict[str, bytes] = {}
        self.refused = 0  # writes the disk refused: the writer knew, they are no edit

    def write(self, rel: str, data: bytes | None = None, *, size: int = 300) -> bool:
        data = data if data is not None else self.rng.randbytes(size)
        path = self.ws / rel
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            self.refused += 1
            return False
        self.made[rel] = data
        return True

    def rewrite_in_place(self, rel: str) -> None:
        """Same length, same pages: succeeds even on a full disk."""
        path = self.ws / rel
        old = path.read_bytes()
        new = bytes(self.rng.randrange(97, 123) for _ in old)
        with open(path, "r+b") as f:
            f.write(new)
        self.made[rel] = new

    def lost(self, restored: Path) -> tuple[int, int]:
        """(edits, bytes) of the edits the restored tree does not hold."""
        lost = [data for rel, data in self.made.items()
                if not (restored / rel).is_file() or (restored / rel).read_bytes() != data]
        return len(lost), sum(len(d) for d in lost)


# -- figures ---------------------------------------------------------------------------------------


@dataclass
class Figures:
    scenario: str
    store: str
    params: dict[str, Any] = field(default_factory=dict)
    faults: int = 0  # requests faulted by the proxy, writes refused by the full disk
    upload_failures: int = 0  # upload.failed lines
    snapshot_failures: int = 0  # snapshot.failed lines
    attempts: int = 0  # the daemon's upload attempts until the save (failures + 1)
    retry_in_s: list[float] = field(default_factory=list)
    recover_s: float | None = None  # from the fault cleared to the generation saved
    edits: int = 0
    edits_lost: int = 0
    bytes_lost: int = 0
    manifests_seen: int = 0
    generations_checked: int = 0
    generations_corrupt: int = 0
    daemon_exits: int = 0
    duration_s: float = 0.0

    def emit(self) -> Figures:
        if FIGURES:
            with open(FIGURES, "a") as f:
                f.write(json.dumps(asdict(self)) + "\n")
        return self


# -- the daemons -----------------------------------------------------------------------------------


def s3_config(path: Path, *, workspace: Path, bucket: str, endpoint: str, max_attempts: int,
              listen: str = "", watch: dict[str, str] | None = None,
              state_dir: Path | None = None) -> Path:
    """A config on the S3 store; its state directory is ``<config name>-state`` beside it unless
    given (each pod has its own), as :func:`daemon_fixture.write_config` does."""
    timings = {**QUICK, **(watch or {})}
    state_dir = state_dir or path.with_name(f"{path.stem}-state")
    path.write_text("\n".join([
        "[workspace]", f'path = "{workspace}"', f'state_dir = "{state_dir}"', "",
        "[watch]", *(f'{k} = "{v}"' for k, v in timings.items()), "",
        "[store]", f'url = "s3://{bucket}/{PREFIX}"', f'key = "{KEY}"', "",
        "[store.s3]", f'endpoint_url = "{endpoint}"', "force_path_style = true",
        f"max_attempts = {max_attempts}", "",
        "[control]", f'listen = "{listen}"', "",
        "[log]", 'level = "info"', 'format = "json"', "",
    ]))
    return path


class S3Daemon(Daemon):
    """A :class:`Daemon` whose store is ``s3://<bucket>/<PREFIX>`` reached through ``endpoint``."""

    def __init__(self, base: Path, *, view: S3View, endpoint: str, max_attempts: int,
                 read_timeout: float | None = None, env: dict[str, str] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(base, key=KEY, **kwargs)
        self.view = view
        self.read_timeout = read_timeout
        self.env = env or {}
        s3_config(self.config, workspace=self.workspace, bucket=view.bucket, endpoint=endpoint,
                  max_attempts=max_attempts, listen=self.listen, watch=kwargs.get("watch"),
                  state_dir=self.state_dir)

    def start(self, *, env: dict[str, str] | None = None, wait_ready: bool = True) -> Daemon:
        env = {**self.env, **(env or {})}
        if self.read_timeout is None:
            return super().start(env=env, wait_ready=wait_ready)
        # Daemon.start with another command line (see _SHORT_READ_TIMEOUT).
        assert self.proc is None or self.proc.poll() is not None, "already running"
        stderr = self.base / f"{self.name}-{len(self.runs)}.stderr"
        with stderr.open("wb") as err:
            self.proc = subprocess.Popen(
                [*watcherd_command(self.read_timeout), "--config", str(self.config), "run"],
                stdout=subprocess.PIPE, stderr=err, text=True, env=_env(env))
        self.log = LogLines(self.proc.stdout)
        self.runs.append((self.log, stderr))
        if wait_ready:
            self.log.wait("daemon.ready", timeout=20)
        return self

    def manifest(self) -> dict[str, Any] | None:
        return self.view.manifest()


class Lab:
    """What one test builds: proxies, daemons, tmpfs mounts; all torn down at the end."""

    def __init__(self, base: Path, moto: MotoS3) -> None:
        self.base, self.moto = base, moto
        self.daemons: list[Daemon] = []
        self.proxies: list[FaultProxy] = []
        self.mounts: list[Path] = []
        self.auditors: list[Auditor] = []
        self._n = 0

    def dir(self, name: str) -> Path:
        self._n += 1
        path = self.base / f"{self._n:02d}-{name}"
        path.mkdir(parents=True)
        return path

    def proxy(self) -> FaultProxy:
        proxy = FaultProxy(self.moto.address).start()
        self.proxies.append(proxy)
        return proxy

    def s3_daemon(self, proxy: FaultProxy, *, max_attempts: int = 2,
                  read_timeout: float | None = None, creds: tuple[str, str] | None = None,
                  view_creds: tuple[str, str] | None = None,
                  watch: dict[str, str] | None = None) -> tuple[S3Daemon, S3View]:
        view = S3View(self.moto, self.moto.new_bucket(), view_creds)
        watch = {**QUICK, **(watch or {})}
        env = {"AWS_ACCESS_KEY_ID": creds[0], "AWS_SECRET_ACCESS_KEY": creds[1]} if creds else None
        d = S3Daemon(self.dir("s3"), name="d", view=view, endpoint=proxy.url,
                     max_attempts=max_attempts, read_timeout=read_timeout, env=env, watch=watch)
        self.daemons.append(d)
        return d, view

    def local_daemon(self, *, store: Path | None = None, workspace: Path | None = None,
                     state_dir: Path | None = None,
                     watch: dict[str, str] | None = None) -> tuple[Daemon, LocalView]:
        base = self.dir("local")
        d = Daemon(base, name="d", key=KEY, store=store or base / "store", workspace=workspace,
                   state_dir=state_dir, watch={**QUICK, **(watch or {})})
        self.daemons.append(d)
        return d, LocalView(d.store)

    def auditor(self, view: View) -> Auditor:
        a = Auditor(view).start()
        self.auditors.append(a)
        return a

    def tmpfs(self, size: str) -> Path:
        mnt = self.dir("tmpfs")
        try:
            r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                               capture_output=True, text=True)
        except FileNotFoundError:
            pytest.skip("no mount command: a full disk needs a small tmpfs")
        if r.returncode != 0:
            pytest.skip(f"mounting a tmpfs is not permitted here ({r.stderr.strip()}): a full "
                        "disk needs root with CAP_SYS_ADMIN")
        self.mounts.append(mnt)
        return mnt

    def close(self) -> None:
        for a in self.auditors:
            a.stop()
            if a.problems:
                print("--- the auditor found ---", *a.problems, sep="\n")
        for d in self.daemons:
            d.kill()
        for p in self.proxies:
            p.stop()
        for d in self.daemons:
            print(d.report())
        for mnt in self.mounts:
            subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoS3]:
    server = MotoS3().start()
    yield server
    server.stop()


@pytest.fixture
def lab(tmp_path: Path, moto: MotoS3, monkeypatch: pytest.MonkeyPatch) -> Iterator[Lab]:
    """Fake AWS keys for every process (no real credentials, no instance metadata)."""
    for name in [n for n in os.environ if n.startswith("AWS_")]:
        monkeypatch.delenv(name)
    for name, value in aws_env().items():
        monkeypatch.setenv(name, value)
    lab = Lab(tmp_path, moto)
    yield lab
    lab.close()


# -- restore ---------------------------------------------------------------------------------------


def restore(d: Daemon, target: Path, *, endpoint: str | None = None, max_attempts: int = 3,
            read_timeout: float | None = None,
            state_dir: Path | None = None) -> subprocess.CompletedProcess:
    """``watcherd restore`` into ``target`` from ``d``'s store (S3: through ``endpoint``, by
    default straight to moto), as a new pod: its state directory is ``<target
    name>-restore-state`` in ``d``'s base directory unless given."""
    cfg = d.base / f"{target.name}-restore.toml"
    if isinstance(d, S3Daemon):
        s3_config(cfg, workspace=target, bucket=d.view.bucket,
                  endpoint=endpoint or d.view.moto.endpoint, max_attempts=max_attempts,
                  state_dir=state_dir)
    else:
        write_config(cfg, workspace=target, store=d.store, key=KEY, listen="", state_dir=state_dir)
    return subprocess.run([*watcherd_command(read_timeout), "--config", str(cfg), "restore"],
                          capture_output=True, text=True, timeout=300, env=_env())


def expected_tree(ws: Path) -> dict[str, tuple]:
    ignored = set(git(ws, "ls-files", "--others", "--ignored", "--exclude-standard",
                      "--directory").splitlines())
    return {p: v for p, v in tree_state(ws).items()
            if not any(p == i.rstrip("/") or p.startswith(i if i.endswith("/") else i + "/")
                       for i in ignored)}


# -- the scenario every store fault goes through ---------------------------------------------------


def ride_out(d: Daemon, view: View, fig: Figures, *, lab: Lab, rng: random.Random,
             inject: Callable[[Edits], None], clear: Callable[[], None],
             faults: Callable[[], int], failures: int, big: int = 0,
             edit_during: Callable[[Edits, int], None] | None = None,
             while_failing: Callable[[], None] | None = None,
             within: float = FAIL_WITHIN) -> Figures:
    """Start ``d``, save a first generation, inject the fault, edit while the daemon fails
    ``failures`` uploads, clear the fault, and check everything the issue asks. ``within``: how
    long one failed attempt, or the recovery, may take."""
    started = time.monotonic()
    edits = Edits(d.workspace, rng)
    edits.write("src/before.txt")
    d.start()
    auditor = lab.auditor(view)
    d.settle(timeout=30)
    first = auditor.check()
    assert first is not None and first["snapshot"] == d.git("rev-parse", SNAPSHOT_REF)

    mark = d.log.mark()
    inject(edits)
    if big:  # written now: a save uploads only what is new, so every failing attempt carries it
        edits.write("assets/big.bin", rng.randbytes(big))
    edits.write("src/app.py", b"print('edited while the store fails')\n")
    edits.write("src/during-0.txt")
    if while_failing:
        while_failing()
    previous: dict[str, Any] | None = None
    before_previous: dict[str, Any] | None = None
    for attempt in range(1, failures + 1):
        failed = d.log.wait("upload.failed", after=mark, attempt=attempt, timeout=within)
        assert failed["retry_in_s"] > 0, failed
        if previous:  # backoff: it waited as long as it said, and waits longer each time
            assert failed["retry_in_s"] >= previous["retry_in_s"], (previous, failed)
            assert failed["_t"] - previous["_t"] >= previous["retry_in_s"] - 0.1, (previous, failed)
        if before_previous:  # doubling, shortened by at most half: strictly longer two apart
            assert failed["retry_in_s"] > before_previous["retry_in_s"], (before_previous, failed)
        before_previous, previous = previous, failed
        assert "\n" not in failed["error"] and failed["key"] == KEY
        status = d.status()  # the daemon answers while it retries
        assert status["pending_retries"]["upload"] >= attempt, status
        assert status["pending_retries"]["next_upload_retry_at"] or status["uploading"], status
        assert status["last_error"]["op"] == "upload" and status["last_error"]["error"], status
        assert status["state"] in ("dirty", "changing"), status
        assert d.proc.poll() is None, "the daemon exited during the fault"
        # an edit during the outage: it must be in the generation saved after it
        (edit_during or (lambda e, n: e.write(f"src/during-{n}.txt")))(edits, attempt)
    assert auditor.check() is not None  # whatever the store holds now is whole

    mark_clear = d.log.mark()
    cleared = time.monotonic()
    clear()
    fig.faults = faults()

    def recovered() -> float | None:
        # The daemon's own word (its retries are over), timed by the save when one is logged:
        # a write that landed without an answer is "unchanged" on the next attempt, not "saved".
        if d.status()["pending_retries"]["upload"]:
            return None
        saved = d.log.events("generation.saved", after=mark_clear)
        return saved[0]["_t"] if saved else time.monotonic()

    fig.recover_s = round(wait_for(recovered, timeout=within,
                                   message="the first save after the fault cleared") - cleared, 3)
    status, manifest = d.status(), view.manifest()
    assert status["last_upload"]["generation"] == manifest["generation"], (status, manifest)

    failed_lines = d.log.events("upload.failed", after=mark)
    fig.upload_failures = len(failed_lines)
    fig.snapshot_failures = len(d.log.events("snapshot.failed", after=mark))
    fig.attempts = fig.upload_failures + 1
    fig.retry_in_s = [line["retry_in_s"] for line in failed_lines]
    return check_everything_saved(d, view, fig, auditor=auditor, edits=edits, started=started)


def check_everything_saved(d: Daemon, view: View, fig: Figures, *, auditor: Auditor,
                           edits: Edits, started: float) -> Figures:
    """The end of every daemon scenario, once the fault is over: an edit after it reaches the
    store, the daemon reports no error, every generation is whole, a restore into an empty
    directory holds every edit, nothing is orphaned or left half-written, and the daemon stops
    cleanly."""
    edits.write("src/after.txt")  # the daemon goes on saving
    local = d.git("rev-parse", SNAPSHOT_REF)
    wait_for(lambda: (m := view.manifest()) and m["snapshot"] ==
             d.git("rev-parse", SNAPSHOT_REF) != local and d.status()["state"] == "idle",
             timeout=FAIL_WITHIN, message="the edit after recovery in the store")
    auditor.stop()
    manifest = auditor.check(everything=True)
    status = d.status()
    assert status["last_error"] is None and status["pending_retries"]["upload"] == 0, status
    assert status["last_upload"]["generation"] == manifest["generation"], (status, manifest)
    assert status["last_upload"]["snapshot"] == manifest["snapshot"], (status, manifest)

    fig.edits = len(edits.made)
    fig.manifests_seen = auditor.manifests_seen
    fig.generations_checked = len(auditor.checked)
    fig.generations_corrupt = len(auditor.corrupt)
    fig.daemon_exits = int(d.proc.poll() is not None)

    target = d.base / "restored"
    result = restore(d, target)
    assert result.returncode == 0, result.stderr
    fig.edits_lost, fig.bytes_lost = edits.lost(target)
    tree_ok = tree_state(target) == expected_tree(d.workspace)
    orphans = view.bundle_names() - {g["bundle"] for g in [manifest, *manifest["history"]]}
    leftovers = view.leftovers()
    code = d.stop(timeout=20)
    fig.daemon_exits += int(code != 0)
    fig.duration_s = round(time.monotonic() - started, 2)
    fig.emit()

    assert auditor.problems == []
    assert fig.edits_lost == 0 and tree_ok, "the restored tree is not the workspace"
    assert not orphans, f"bundles no manifest names: {orphans}"
    assert not leftovers, f"left behind: {leftovers}"
    assert code == 0 and fig.daemon_exits == 0
    return fig


# -- S3 scenarios ----------------------------------------------------------------------------------


def s3_fault(lab: Lab, scenario: str, action: Callable, *, rng: random.Random, failures: int,
             method: str | None = None, path: str | None = None, big: int = 0,
             max_attempts: int = 2, read_timeout: float | None = None,
             watch: dict[str, str] | None = None,
             while_failing: Callable[[S3Daemon], None] | None = None,
             edit_during: Callable[[Edits, int], None] | None = None,
             check: Callable[[S3Daemon], None] | None = None,
             within: float = FAIL_WITHIN) -> Figures:
    """A proxy rule on (method, path) from the first failure to the clear."""
    proxy = lab.proxy()
    d, view = lab.s3_daemon(proxy, max_attempts=max_attempts, read_timeout=read_timeout,
                            watch=watch)
    fig = Figures(scenario, "s3", params={"failures": failures, "big": big,
                                          "max_attempts": max_attempts,
                                          "read_timeout": read_timeout or 60.0})
    fig = ride_out(
        d, view, fig, lab=lab, rng=rng, failures=failures, big=big,
        inject=lambda edits: proxy.fail(action, method=method, path=path, times=FOREVER),
        clear=proxy.clear, faults=lambda: len(proxy.faults_applied()),
        edit_during=edit_during, within=within,
        while_failing=(lambda: while_failing(d)) if while_failing else None)
    assert fig.faults >= fig.upload_failures >= failures, fig
    if check:
        check(d)
    return fig


def five_hundred_on_bundle_puts(lab: Lab, rng: random.Random, failures: int) -> Figures:
    return s3_fault(lab, "500 InternalError on bundle uploads", respond(500, "InternalError"),
                    method="PUT", path="/bundles/", rng=rng, failures=failures)


def five_hundred_on_manifest_puts(lab: Lab, rng: random.Random, failures: int) -> Figures:
    # Each failed attempt leaves a whole bundle that no manifest names; the first save after
    # the fault must take the next number and prune them.
    return s3_fault(lab, "500 InternalError on the manifest swap", respond(500, "InternalError"),
                    method="PUT", path="/manifest.json", rng=rng, failures=failures)


def slowdown_on_everything(lab: Lab, rng: random.Random, failures: int) -> Figures:
    slow_down = respond(503, "SlowDown", "Please reduce your request rate.")
    return s3_fault(lab, "503 SlowDown on every request", slow_down, rng=rng, failures=failures)


def reset_mid_upload(lab: Lab, rng: random.Random, failures: int, *,
                     multipart: bool = False) -> Figures:
    big = 9 * MiB if multipart else MiB  # multipart above 8 MiB, in 8 MiB parts
    cut = rng.randrange(1, big // 2)
    if multipart:  # the second part of two: the upload is aborted, never completed
        return s3_fault(lab, "reset mid-upload (multipart part 2)", reset_request_after(cut),
                        method="PUT", path="partNumber=2", rng=rng, failures=failures, big=big)
    return s3_fault(lab, "reset mid-upload (bundle PUT)", reset_request_after(cut), method="PUT",
                    path="/bundles/", rng=rng, failures=failures, big=big)


def reset_mid_manifest_read(lab: Lab, rng: random.Random, failures: int) -> Figures:
    return s3_fault(lab, "reset mid-download of the manifest",
                    reset_response_after(rng.randrange(100, 400)), method="GET",
                    path="/manifest.json", rng=rng, failures=failures)


def answers_lost_after_manifest_write(lab: Lab, rng: random.Random, failures: int) -> Figures:
    # The first PUT lands and its answer is lost; botocore's retry then meets a changed manifest
    # (412), whose answer is lost too: the daemon sees a failure although its generation is in.
    # No edit after the last failure: the next attempt finds its own generation already stored.
    def edit_during(edits: Edits, n: int) -> None:
        if n < failures:
            edits.write(f"src/during-{n}.txt")

    def check(d: S3Daemon) -> None:
        assert d.log.events("generation.already_saved"), "the landed write was not recognised"

    return s3_fault(lab, "answer lost after the manifest write landed", drop_response(),
                    method="PUT", path="/manifest.json", rng=rng, failures=failures,
                    edit_during=edit_during, check=check)


def stall_past_read_timeout(lab: Lab, rng: random.Random, failures: int, *,
                            read_timeout: float = 1.0, hold: float | None = None) -> Figures:
    hold = hold or read_timeout + 5

    def responsive_while_stalled(d: S3Daemon) -> None:
        wait_for(lambda: d.status()["uploading"], timeout=FAIL_WITHIN,
                 message="the upload to be in flight")
        started = time.monotonic()
        assert d.status()["uploading"] and d.request("GET", "/healthz")[0] == 200
        assert time.monotonic() - started < 2.0, "the control endpoint waits for the store"

    return s3_fault(lab, f"stall past the read timeout ({read_timeout:g}s)", stall(hold),
                    method="PUT", path="/bundles/", rng=rng, failures=failures,
                    read_timeout=None if read_timeout == 60 else read_timeout,
                    while_failing=responsive_while_stalled,
                    # an attempt is max_attempts timeouts (botocore), and one may be in flight
                    # when the fault clears
                    within=FAIL_WITHIN + 2 * (read_timeout + 1))


def access_denied_then_policy_fixed(lab: Lab, rng: random.Random, failures: int) -> Figures:
    """Real 403s: moto checks signatures and IAM policies; the daemon's user loses s3:PutObject
    and gets it back (an operator fixing the policy)."""
    moto = lab.moto
    iam = moto.client("iam")
    admin_name = f"admin-{rng.getrandbits(32):08x}"
    iam.create_user(UserName=admin_name)
    iam.put_user_policy(UserName=admin_name, PolicyName="p", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": ["s3:*", "iam:*"],
                                                  "Resource": "*"}]}))
    key = iam.create_access_key(UserName=admin_name)["AccessKey"]
    admin = (key["AccessKeyId"], key["SecretAccessKey"])
    user = f"daemon-{rng.getrandbits(32):08x}"
    iam.create_user(UserName=user)
    key = iam.create_access_key(UserName=user)["AccessKey"]
    creds = (key["AccessKeyId"], key["SecretAccessKey"])

    def policy(actions: list[str]) -> str:
        return json.dumps({"Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Action": actions, "Resource": "*"}]})

    iam.put_user_policy(UserName=user, PolicyName="p", PolicyDocument=policy(["s3:*"]))
    admin_iam = moto.client("iam", *admin)
    proxy = lab.proxy()
    d, view = lab.s3_daemon(proxy, creds=creds, view_creds=admin)
    fig = Figures("403 AccessDenied until the IAM policy is fixed", "s3",
                  params={"failures": failures})
    os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"] = admin  # the restore
    with moto.auth():
        fig = ride_out(
            d, view, fig, lab=lab, rng=rng, failures=failures,
            inject=lambda edits: admin_iam.put_user_policy(
                UserName=user, PolicyName="p",
                PolicyDocument=policy(["s3:GetObject", "s3:ListBucket"])),
            clear=lambda: admin_iam.put_user_policy(UserName=user, PolicyName="p",
                                                    PolicyDocument=policy(["s3:*"])),
            faults=lambda: len(d.log.events("upload.failed")))
    denied = [line for line in d.log.events("upload.failed")]
    assert denied and all("access denied: s3:PutObject" in line["error"] for line in denied)
    return fig


# -- disk full -------------------------------------------------------------------------------------


def fill(path: Path) -> int:
    """Write ``path`` until its filesystem is full; the bytes written."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    written = 0
    try:
        for chunk in (MiB, 4096, 1):
            block = b"\0" * chunk
            while True:
                try:
                    n = os.write(fd, block)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
                written += n
                if n < chunk:
                    break
    finally:
        os.close(fd)
    return written


def store_disk_full(lab: Lab, rng: random.Random, failures: int) -> Figures:
    mnt = lab.tmpfs("2m")
    d, view = lab.local_daemon(store=mnt / "store")
    filler = mnt / "filler"
    fig = Figures("local store: disk full", "local", params={"failures": failures})
    fig = ride_out(d, view, fig, lab=lab, rng=rng, failures=failures, big=64 * 1024,
                   inject=lambda edits: fill(filler), clear=filler.unlink,
                   faults=lambda: len(d.log.events("upload.failed")))
    failed = d.log.events("upload.failed")
    assert all("the store's disk is full" in line["error"] for line in failed), failed
    return fig


def workspace_disk_full(lab: Lab, rng: random.Random, fills: int) -> Figures:
    """The workspace's disk fills up (a dev server's cache under an ignored directory) ``fills``
    times. Nothing of watcherd's is on it any more (its repository, index and spool are in the
    state directory), so nothing waits for the space: a snapshot committed just before the disk
    filled is uploaded while it is full, and so is every edit that still fits (a file rewritten in
    place); writes the disk refuses are the writer's to see, not edits. No upload or snapshot
    fails, and after the disk is freed everything is in the store."""
    mnt = lab.tmpfs("24m")
    ws = make_workspace(mnt / "ws")
    d, view = lab.local_daemon(workspace=ws, watch={"idle_timeout": "2s"})
    filler = ws / "node_modules" / ".cache" / "filler"  # ignored: no activity, no snapshot
    fig = Figures("workspace disk full", "local", params={"fills": fills})
    started = time.monotonic()
    edits = Edits(ws, rng)
    edits.write("src/before.txt")
    d.start()
    auditor = lab.auditor(view)
    d.settle(timeout=30)
    assert auditor.check()["snapshot"] == d.git("rev-parse", SNAPSHOT_REF)
    mark = d.log.mark()
    for n in range(fills):
        # An edit is committed (a snapshot), then the disk fills before its upload (2 s idle).
        at = d.log.mark()
        edits.write(f"src/committed-before-full-{n}.txt", size=2000)
        d.log.wait("snapshot.committed", after=at, timeout=10)
        assert not d.log.events("generation.saved", after=at), "uploaded before the disk filled"
        filler.parent.mkdir(parents=True, exist_ok=True)
        fill(filler)
        assert not edits.write(f"src/refused-{n}.txt", size=64 * 1024)  # the disk is full
        edits.rewrite_in_place("src/app.py")  # fits: an edit made while the disk is full
        # Both edits reach the store while the disk is still full.
        wait_for(lambda: (m := view.manifest()) and m["snapshot"] == (head := d.git(
                 "rev-parse", SNAPSHOT_REF)) and d.shown("src/app.py", head) ==
                 edits.made["src/app.py"].decode() and d.status()["state"] == "idle",
                 timeout=FAIL_WITHIN, message="the edits made before and while the disk was "
                 "full in the store, with the disk still full")
        assert os.statvfs(mnt).f_bavail == 0, "the disk was freed before the edits were saved"
        filler.unlink()
    fig.faults = edits.refused
    fig.attempts = 1  # every upload succeeded at its first attempt (checked next)
    assert d.log.events("upload.failed", after=mark) == []
    assert d.log.events("snapshot.failed", after=mark) == []
    return check_everything_saved(d, view, fig, auditor=auditor, edits=edits, started=started)


def state_disk_full(lab: Lab, rng: random.Random, failures: int) -> Figures:
    """The state directory's disk fills up (another tenant of the volume, or watcherd's own
    history grown too large for it). The snapshot committed just before is still saved: its
    bundle goes to a spool with room (``spool.fallback``). New snapshots cannot be committed:
    the daemon retries them with backoff and says why, the workspace's edits keep coming, and
    once space is freed the next attempt saves every one of them; the spool is left empty."""
    mnt = lab.tmpfs("24m")
    d, view = lab.local_daemon(state_dir=mnt / "state", watch={"idle_timeout": "2s"})
    filler = mnt / "filler"
    fig = Figures("state directory disk full", "local", params={"failures": failures})
    started = time.monotonic()
    edits = Edits(d.workspace, rng)
    edits.write("src/before.txt")
    d.start()
    auditor = lab.auditor(view)
    d.settle(timeout=30)

    mark = d.log.mark()
    edits.write("src/committed-before-full.txt", size=2000)
    committed = d.log.wait("snapshot.committed", after=mark, timeout=10)
    assert not d.log.events("generation.saved", after=mark), "uploaded before the disk filled"
    fill(filler)
    saved = d.log.wait("generation.saved", after=mark, timeout=FAIL_WITHIN)
    assert saved["snapshot"] == committed["commit"], (saved, committed)
    assert d.log.events("spool.fallback", after=mark), "the bundle was not written elsewhere"

    failing = d.log.mark()
    for n in range(1, failures + 1):
        edits.write(f"src/during-{n}.txt")
        failed = d.log.wait("snapshot.failed", after=failing, timeout=FAIL_WITHIN)
        assert "No space left on device" in failed["error"], failed
        failing = d.log.mark()
        assert d.proc.poll() is None, "the daemon exited while the disk was full"
    cleared = time.monotonic()
    filler.unlink()
    fig.snapshot_failures = len(d.log.events("snapshot.failed", after=mark))
    fig.faults = fig.snapshot_failures
    wait_for(lambda: (m := view.manifest()) and m["snapshot"] == d.git("rev-parse", SNAPSHOT_REF)
             and d.status()["state"] == "idle", timeout=FAIL_WITHIN,
             message="the edits made while the disk was full in the store")
    fig.recover_s = round(time.monotonic() - cleared, 3)
    failed = d.log.events("upload.failed") + d.log.events("snapshot.failed")
    assert failed and all("No space left on device" in line["error"] for line in failed), failed
    fig = check_everything_saved(d, view, fig, auditor=auditor, edits=edits, started=started)
    spool = d.state_dir / KEY / "spool"
    assert [p.name for p in spool.iterdir()] == []
    return fig


# -- download (restore) scenarios ------------------------------------------------------------------


def saved_generation(lab: Lab, rng: random.Random, big: int) -> tuple[S3Daemon, FaultProxy, Edits]:
    """A stopped daemon whose store holds one generation with a ``big`` random file."""
    proxy = lab.proxy()
    d, view = lab.s3_daemon(proxy)
    edits = Edits(d.workspace, rng)
    edits.write("assets/big.bin", rng.randbytes(big))
    d.start()
    d.settle(timeout=30)
    assert d.stop() == 0
    return d, proxy, edits


def reset_mid_download(lab: Lab, rng: random.Random, resets: int) -> Figures:
    """``watcherd restore`` through the proxy: a few resets are resumed where they stopped; a
    connection that keeps breaking fails the restore (exit 1) without touching the workspace, and
    the rerun after the fault clears restores every edit."""
    big = rng.randrange(2, 6) * MiB
    d, proxy, edits = saved_generation(lab, rng, big)
    max_attempts = 3
    fig = Figures("reset mid-download (watcherd restore)", "s3",
                  params={"resets": resets, "big": big, "max_attempts": max_attempts})
    started = time.monotonic()
    cut = lambda: reset_response_after(rng.randrange(1000, big // 2))  # noqa: E731

    # a few resets: resumed
    few = min(resets, max_attempts - 1)
    for _ in range(few):
        proxy.fail(cut(), method="GET", path="/bundles/")
    target = d.base / "restored-resumed"
    result = restore(d, target, endpoint=proxy.url, max_attempts=max_attempts)
    assert result.returncode == 0, result.stderr
    resumed = [json.loads(line) for line in result.stderr.splitlines()
               if '"s3.download_resume"' in line]
    assert len(resumed) == few
    lost = edits.lost(target)

    # a connection that keeps breaking: exit 1, nothing installed, nothing left beside
    proxy.fail(reset_response_after(rng.randrange(1000, big // 2)), method="GET", path="/bundles/",
               times=FOREVER)
    target = d.base / "restored-after-fault"
    result = restore(d, target, endpoint=proxy.url, max_attempts=max_attempts)
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert len(said(result.stderr)) == 1 and "Traceback" not in result.stderr
    assert not target.exists() or not any(target.iterdir())
    assert [p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}")] == []
    fig.faults = len(proxy.faults_applied())
    runs = 2
    cleared = time.monotonic()
    proxy.clear()
    result = restore(d, target, endpoint=proxy.url, max_attempts=max_attempts)
    runs += 1
    assert result.returncode == 0, result.stderr
    fig.recover_s = round(time.monotonic() - cleared, 3)
    fig.attempts = runs
    lost2 = edits.lost(target)
    fig.edits = len(edits.made)
    fig.edits_lost, fig.bytes_lost = lost[0] + lost2[0], lost[1] + lost2[1]
    auditor = Auditor(d.view)
    auditor.check(everything=True)
    fig.generations_checked, fig.generations_corrupt = len(auditor.checked), len(auditor.corrupt)
    fig.duration_s = round(time.monotonic() - started, 2)
    fig.emit()
    assert tree_state(target) == expected_tree(d.workspace)
    assert fig.edits_lost == 0 and fig.generations_corrupt == 0
    return fig


def stall_mid_download(lab: Lab, rng: random.Random, stalls: int) -> Figures:
    """A bundle GET that stalls past the read timeout is retried (botocore) and the restore
    finishes; the short read timeout as in :func:`stall_past_read_timeout`."""
    d, proxy, edits = saved_generation(lab, rng, MiB)
    fig = Figures("stall mid-download past the read timeout (1s)", "s3", params={"stalls": stalls})
    started = time.monotonic()
    proxy.fail(stall(4), method="GET", path="/bundles/", times=stalls)
    target = d.base / "restored"
    result = restore(d, target, endpoint=proxy.url, max_attempts=stalls + 1, read_timeout=1)
    assert result.returncode == 0, result.stderr
    fig.faults = len(proxy.faults_applied())
    fig.attempts = 1
    fig.edits = len(edits.made)
    fig.edits_lost, fig.bytes_lost = edits.lost(target)
    auditor = Auditor(d.view)
    auditor.check(everything=True)
    fig.generations_checked, fig.generations_corrupt = len(auditor.checked), len(auditor.corrupt)
    fig.duration_s = round(time.monotonic() - started, 2)
    fig.emit()
    assert fig.faults == stalls and fig.edits_lost == 0 and fig.generations_corrupt == 0
    assert tree_state(target) == expected_tree(d.workspace)
    return fig


def restore_disk_full(lab: Lab, rng: random.Random, big: int, disk: str) -> Figures:
    """``watcherd restore`` with a disk too small for the generation: the workspace's (where the
    tree is built, beside the workspace) or the state directory's (where the bundle is downloaded
    and proven). Exit 1 in one line naming the full disk, nothing installed, nothing left beside
    the workspace or in the state directory, no fallback to an older generation or to
    ``on_missing``; once the disk is grown (an operator resizing the volume), the rerun restores
    every edit."""
    d, view = lab.local_daemon()
    edits = Edits(d.workspace, rng)
    edits.write("assets/big.bin", rng.randbytes(big))
    d.start()
    d.settle(timeout=30)
    assert d.stop() == 0
    fig = Figures(f"restore: {disk} disk full", "local", params={"big": big, "disk": disk})
    started = time.monotonic()
    mnt = lab.tmpfs(f"{big // 2}")
    if disk == "workspace":
        target, state_dir = mnt / "app", d.base / "app-restore-state"
    else:
        target, state_dir = d.base / "app", mnt / "state"
    result = restore(d, target, state_dir=state_dir)
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    assert "No space left on device" in result.stderr and len(said(result.stderr)) == 1
    assert "restore.done" not in result.stdout, "it says it restored something"
    left = [p for p in target.parent.iterdir() if p.name.startswith(f".{target.name}.")]
    left += [p for p in mnt.iterdir() if p not in (target, state_dir)]
    assert left == [], f"left behind: {left}"
    assert not target.exists() or not any(target.iterdir()), "installed something"
    scratch = [p.name for p in (state_dir / KEY).iterdir()
               if p.name.startswith(("download-", "restore.json"))]
    assert scratch == [], f"left in the state directory: {scratch}"
    fig.faults = 1
    cleared = time.monotonic()
    subprocess.run(["mount", "-o", f"remount,size={4 * big}", str(mnt)], check=True)
    result = restore(d, target, state_dir=state_dir)
    assert result.returncode == 0, result.stderr
    fig.recover_s = round(time.monotonic() - cleared, 3)
    fig.attempts = 2
    fig.edits = len(edits.made)
    fig.edits_lost, fig.bytes_lost = edits.lost(target)
    auditor = Auditor(view)
    auditor.check(everything=True)
    fig.generations_checked, fig.generations_corrupt = len(auditor.checked), len(auditor.corrupt)
    fig.duration_s = round(time.monotonic() - started, 2)
    fig.emit()
    assert tree_state(target) == expected_tree(d.workspace)
    assert fig.edits_lost == 0 and fig.generations_corrupt == 0
    return fig


# -- the default run: each scenario once -----------------------------------------------------------


def test_500s_on_bundle_uploads_are_retried_with_backoff_and_the_next_attempt_saves_every_edit(lab):
    five_hundred_on_bundle_puts(lab, random.Random(1), failures=3)


def test_500s_on_the_manifest_swap_leave_the_old_generation_and_orphans_are_pruned_after(lab):
    five_hundred_on_manifest_puts(lab, random.Random(2), failures=2)


def test_slowdown_on_every_request_is_retried_until_s3_accepts_again(lab):
    slowdown_on_everything(lab, random.Random(3), failures=1)


def test_a_connection_reset_mid_upload_publishes_nothing_partial_and_the_retry_saves(lab):
    reset_mid_upload(lab, random.Random(4), failures=1)


def test_a_reset_mid_multipart_upload_is_aborted_and_the_retry_saves(lab):
    reset_mid_upload(lab, random.Random(5), failures=1, multipart=True)


def test_a_reset_while_reading_the_manifest_is_retried(lab):
    reset_mid_manifest_read(lab, random.Random(6), failures=1)


def test_a_manifest_write_that_landed_without_an_answer_is_recognised_as_saved(lab):
    answers_lost_after_manifest_write(lab, random.Random(7), failures=1)


def test_an_upload_stalled_past_the_read_timeout_fails_over_and_the_daemon_stays_responsive(lab):
    stall_past_read_timeout(lab, random.Random(8), failures=1)


def test_access_denied_is_retried_until_the_policy_is_fixed_and_then_everything_is_saved(lab):
    access_denied_then_policy_fixed(lab, random.Random(9), failures=1)


def test_a_full_store_disk_is_retried_until_space_is_freed_and_nothing_partial_stays(lab):
    store_disk_full(lab, random.Random(10), failures=1)


def test_a_full_workspace_disk_blocks_no_upload_and_every_edit_that_fits_is_saved(lab):
    workspace_disk_full(lab, random.Random(11), fills=1)


def test_a_full_state_disk_is_retried_until_freed_and_no_committed_edit_is_lost(lab):
    state_disk_full(lab, random.Random(15), failures=1)


def test_a_restore_resumes_a_broken_download_and_fails_cleanly_while_it_keeps_breaking(lab):
    reset_mid_download(lab, random.Random(12), resets=2)


def test_a_restore_whose_download_stalls_past_the_read_timeout_retries_and_finishes(lab):
    stall_mid_download(lab, random.Random(13), stalls=1)


@pytest.mark.parametrize("disk", ["workspace", "state"])
def test_a_restore_onto_a_full_disk_fails_cleanly_and_the_rerun_after_resizing_restores(lab, disk):
    restore_disk_full(lab, random.Random(14), big=3 * MiB, disk=disk)


# -- the long run ----------------------------------------------------------------------------------

LONG = {
    "500-bundle": lambda lab, rng: five_hundred_on_bundle_puts(lab, rng, rng.randint(1, 4)),
    "500-manifest": lambda lab, rng: five_hundred_on_manifest_puts(lab, rng, rng.randint(1, 4)),
    "slowdown": lambda lab, rng: slowdown_on_everything(lab, rng, rng.randint(1, 4)),
    "reset-upload": lambda lab, rng: reset_mid_upload(lab, rng, rng.randint(1, 3)),
    "reset-multipart": lambda lab, rng: reset_mid_upload(lab, rng, rng.randint(1, 2),
                                                         multipart=True),
    "reset-manifest-read": lambda lab, rng: reset_mid_manifest_read(lab, rng, rng.randint(1, 3)),
    "answer-lost": lambda lab, rng: answers_lost_after_manifest_write(lab, rng, rng.randint(1, 3)),
    "stall-upload": lambda lab, rng: stall_past_read_timeout(lab, rng, rng.randint(1, 3)),
    "403": lambda lab, rng: access_denied_then_policy_fixed(lab, rng, rng.randint(1, 3)),
    "store-disk-full": lambda lab, rng: store_disk_full(lab, rng, rng.randint(1, 3)),
    "workspace-disk-full": lambda lab, rng: workspace_disk_full(lab, rng, rng.randint(1, 3)),
    "state-disk-full": lambda lab, rng: state_disk_full(lab, rng, rng.randint(1, 3)),
    "reset-download": lambda lab, rng: reset_mid_download(lab, rng, rng.randint(1, 4)),
    "stall-download": lambda lab, rng: stall_mid_download(lab, rng, rng.randint(1, 2)),
    "restore-disk-full": lambda lab, rng: restore_disk_full(lab, rng, rng.randrange(2, 8) * MiB,
                                                           "workspace"),
    "restore-state-disk-full": lambda lab, rng: restore_disk_full(
        lab, rng, rng.randrange(2, 8) * MiB, "state"),
}


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("scenario", sorted(LONG))
def test_repeated_store_faults_never_lose_an_edit_corrupt_a_generation_or_end_the_daemon(
        tmp_path, moto, monkeypatch, scenario):
    for rep in range(REPS):
        lab = Lab(tmp_path / f"rep{rep}", moto)
        try:
            with monkeypatch.context() as m:
                for name in [n for n in os.environ if n.startswith("AWS_")]:
                    m.delenv(name)
                for name, value in aws_env().items():
                    m.setenv(name, value)
                LONG[scenario](lab, random.Random(f"{scenario}-{rep}"))
        finally:
            lab.close()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_an_upload_stalled_past_the_real_60s_read_timeout_fails_over_and_recovers(lab):
    stall_past_read_timeout(lab, random.Random(60), failures=1, read_timeout=60, hold=70)


# -- the table -------------------------------------------------------------------------------------


def table(lines: list[dict[str, Any]]) -> str:
    """Markdown: one row per scenario, over every run recorded."""
    by: dict[str, list[dict[str, Any]]] = {}
    for line in lines:
        by.setdefault(line["scenario"], []).append(line)

    def span(values: list[float]) -> str:
        if not values:
            return "-"
        if len(values) == 1:
            return f"{values[0]:g}"
        return f"{statistics.median(values):.2f} (max {max(values):.2f})"

    rows = ["| scenario | store | runs | faults injected | edits (lost) | bytes lost | generations "
            "checked (corrupt) | daemon exits | attempts (daemon uploads; restore runs) | "
            "retries after upload.failed | time to recover s, median (max) |", "|" + "---|" * 11]
    for name, runs in by.items():
        attempts = [r["attempts"] for r in runs]
        rows.append(
            f"| {name} | {runs[0]['store']} | {len(runs)} | {sum(r['faults'] for r in runs)} | "
            f"{sum(r['edits'] for r in runs)} ({sum(r['edits_lost'] for r in runs)}) | "
            f"{sum(r['bytes_lost'] for r in runs)} | "
            f"{sum(r['generations_checked'] for r in runs)} "
            f"({sum(r['generations_corrupt'] for r in runs)}) | "
            f"{sum(r['daemon_exits'] for r in runs)} | {min(attempts)}-{max(attempts)} | "
            f"{sum(r['upload_failures'] for r in runs)} | "
            f"{span([r['recover_s'] for r in runs if r['recover_s'] is not None])} |")
    return "\n".join(rows)


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        print(table([json.loads(line) for line in f if line.strip()]))
