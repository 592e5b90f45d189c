"""The real ``watcherd run`` as a subprocess, for end-to-end tests.

A :class:`Daemon` is one workspace (a git repository with a user's first commit and a
``.gitignore``), one local store and one TOML config in ``tmp_path``, with short timings and a
free loopback port for the control endpoint. Tests drive it the way an operator or a pod would:
files, git, signals, HTTP, the store's files, and the JSON log lines it prints on stdout, which a
reader thread collects so a test can wait for an event with a deadline.

Use the ``watcherd`` fixture (import it into the test module): it makes daemons, kills whatever is
still running at teardown and prints each daemon's log, so a failing test shows what happened.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from helpers import git, wait_for
from prometheus_client.parser import text_string_to_metric_families

WATCHERD = str(Path(sys.executable).with_name("watcherd"))
SNAPSHOT_REF = "refs/watcherd/snapshots"

# Short enough to keep the suite fast, long enough that a loaded CI machine still sees the order
# of things (an edit, its quiet period, a snapshot, idle, an upload).
FAST = {
    "quiet_period": "200ms",
    "max_commit_delay": "1s",
    "idle_timeout": "1s",
    "max_upload_interval": "10m",
    "shutdown_timeout": "5s",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_workspace(path: Path) -> Path:
    """A repository as a template clone leaves it: one commit, node_modules ignored."""
    (path / "src").mkdir(parents=True)
    (path / "README.md").write_text("# app\n")
    (path / "src" / "app.py").write_text("print('hello')\n")
    (path / ".gitignore").write_text("node_modules/\n*.log\n")
    git(path, "init", "--quiet")
    git(path, "add", "-A")
    git(path, "commit", "--quiet", "-m", "template")
    return path


def write_config(path: Path, *, workspace: Path, store: Path, key: str, listen: str,
                 token: str = "", watch: dict[str, str] | None = None,
                 log_level: str = "info", state_dir: Path | None = None,
                 store_options: dict[str, Any] | None = None) -> Path:
    """A daemon's config; its state directory is ``<config name>-state`` beside it unless given
    (each pod has its own). ``store_options``: more ``[store]`` keys (``{"keep": 2}``)."""
    timings = {**FAST, **(watch or {})}
    state_dir = state_dir or path.with_name(f"{path.stem}-state")
    lines = [
        "[workspace]", f'path = "{workspace}"', f'state_dir = "{state_dir}"', "",
        "[watch]", *(f'{k} = "{v}"' for k, v in timings.items()), "",
        "[store]", f'url = "file://{store}"', f'key = "{key}"',
        *(f"{k} = {json.dumps(v)}" for k, v in (store_options or {}).items()), "",
        "[control]", f'listen = "{listen}"', f'token = "{token}"', "",
        "[log]", f'level = "{log_level}"', 'format = "json"', "",
    ]
    path.write_text("\n".join(lines))
    return path


def run_cli(config: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """``watcherd --config <config> <args>``, as a person or a startup hook runs it."""
    return subprocess.run([WATCHERD, "--config", str(config), *args], capture_output=True,
                          text=True, timeout=timeout, env=_env())


def inotify_watches(pid: int) -> int:
    """The kernel's count of inotify watches held by process ``pid``."""
    total = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(fd) != "anon_inode:inotify":
                continue
            info = Path(f"/proc/{pid}/fdinfo/{fd.name}").read_text()
        except OSError:
            continue  # closed meanwhile
        total += sum(1 for line in info.splitlines() if line.startswith("inotify wd:"))
    return total


def holds_for(condition: Callable[[], Any], seconds: float, message: str,
              interval: float = 0.05) -> None:
    """Fail if ``condition`` turns false at any check during ``seconds`` (a negative's window)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert condition(), message
        time.sleep(interval)
    assert condition(), message


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


class LogLines:
    """JSON log lines from a stream, read by a thread; each gets ``_t``, its arrival (monotonic)."""

    def __init__(self, stream) -> None:
        self.lines: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        for raw in stream:
            try:
                line = json.loads(raw)
            except ValueError:
                line = {"event": "(not json)", "text": raw.rstrip("\n")}
            if not isinstance(line, dict):
                line = {"event": "(not json)", "text": raw.rstrip("\n")}
            line["_t"] = time.monotonic()
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()
        stream.close()
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def mark(self) -> int:
        """A position: pass it as ``after`` to look only at lines logged from now on."""
        with self._cond:
            return len(self.lines)

    def events(self, event: str, after: int = 0, **fields: Any) -> list[dict[str, Any]]:
        with self._cond:
            return [line for line in self.lines[after:] if _matches(line, event, fields)]

    def wait(self, event: str, *, after: int = 0, timeout: float = 10.0,
             **fields: Any) -> dict[str, Any]:
        """The first line with this event (and these field values) after ``after``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines[after:]:
                    if _matches(line, event, fields):
                        return line
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    why = "the daemon's output ended" if self._closed else f"{timeout}s passed"
                    raise AssertionError(f"no {event} {fields or ''} logged ({why})")
                self._cond.wait(left)

    def join(self, timeout: float = 5.0) -> None:
        self._thread.join(timeout)


def _matches(line: dict[str, Any], event: str, fields: dict[str, Any]) -> bool:
    return line.get("event") == event and all(line.get(k) == v for k, v in fields.items())


class Daemon:
    """One ``watcherd run`` process over one workspace and one local store."""

    def __init__(self, base: Path, *, name: str = "d", workspace: Path | None = None,
                 store: Path | None = None, key: str = "acme/sandbox-1/main",
                 listen: str | None = None, token: str = "", watch: dict[str, str] | None = None,
                 log_level: str = "info", state_dir: Path | None = None,
                 store_options: dict[str, Any] | None = None) -> None:
        self.base = base
        self.name = name
        self.workspace = workspace or make_workspace(base / f"{name}-ws")
        self.store = store or base / "store"
        self.key = key
        self.listen = listen or f"127.0.0.1:{free_port()}"
        self.port = int(self.listen.rpartition(":")[2])
        self.token = token
        self.state_dir = state_dir or base / f"{name}-state"
        self.config = write_config(base / f"{name}.toml", workspace=self.workspace,
                                   store=self.store, key=key, listen=self.listen, token=token,
                                   watch=watch, log_level=log_level, state_dir=self.state_dir,
                                   store_options=store_options)
        self.proc: subprocess.Popen | None = None
        self.log: LogLines | None = None
        self.runs: list[tuple[LogLines, Path]] = []  # every run's log, for the teardown report

    # -- life ------------------------------------------------------------------------------------

    def start(self, *, env: dict[str, str] | None = None, wait_ready: bool = True,
              popen: Mapping[str, Any] | None = None,
              command: Sequence[str] | None = None) -> Daemon:
        """Start ``watcherd run``. ``popen``: more :class:`subprocess.Popen` arguments, such as
        ``preexec_fn`` (resource limits), or ``user``, ``group``, ``extra_groups`` and ``umask``
        to run it as another user (root), with a ``command`` that user may run
        (``helpers.watcherd_for_any_uid``)."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        stderr = self.base / f"{self.name}-{len(self.runs)}.stderr"
        with stderr.open("wb") as err:
            self.proc = subprocess.Popen([*(command or [WATCHERD]), "--config", str(self.config),
                                          "run"],
                                         stdout=subprocess.PIPE, stderr=err, text=True,
                                         env=_env(env), **(popen or {}))
        self.log = LogLines(self.proc.stdout)
        self.runs.append((self.log, stderr))
        if wait_ready:
            self.log.wait("daemon.ready", timeout=20)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float) -> int:
        """The exit status; fails if the process is still running after ``timeout`` seconds."""
        assert self.proc is not None
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"watcherd still running {timeout}s later") from None
        self.log.join()
        return code

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, as Kubernetes or systemd stops it; the exit status."""
        self.signal(signal.SIGTERM)
        return self.wait_exit(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a test may have stopped it
            self.proc.kill()
            self.proc.wait(10)
        if self.log is not None:
            self.log.join()

    def settle(self, timeout: float = 15.0) -> dict[str, Any]:
        """Wait until every write made before the call was judged, everything is in the store
        and the daemon is idle; its status."""
        return wait_for(lambda: (s := self.status())["state"] == "idle" and
                        not s["events_unread"] and s,
                        timeout=timeout, message="the daemon to be idle with everything saved")

    # -- the control endpoint --------------------------------------------------------------------

    def request(self, method: str, path: str, *, token: str | None = None,
                timeout: float = 20.0, body: Any = None) -> tuple[int, bytes]:
        host = "127.0.0.1"
        data = json.dumps(body).encode() if body is not None else \
            (b"" if method == "POST" else None)
        req = urllib.request.Request(f"http://{host}:{self.port}{path}", method=method, data=data)
        token = self.token if token is None else token
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def status(self) -> dict[str, Any]:
        code, body = self.request("GET", "/status")
        assert code == 200, (code, body)
        return json.loads(body)

    def post(self, path: str, body: Any = None) -> tuple[int, Any]:
        """POST ``path`` (with ``body`` as JSON if given); (status, the JSON answer)."""
        code, answer = self.request("POST", path, body=body)
        return code, json.loads(answer) if answer else None

    def metrics(self) -> dict[str, float]:
        """Sample name -> value, parsed as Prometheus would."""
        code, body = self.request("GET", "/metrics")
        assert code == 200, (code, body)
        return {s.name: s.value for family in text_string_to_metric_families(body.decode())
                for s in family.samples}

    def watches(self) -> int:
        return inotify_watches(self.pid)

    # -- what it produced ------------------------------------------------------------------------

    def manifest(self) -> dict[str, Any] | None:
        path = self.store / self.key / "manifest.json"
        return json.loads(path.read_bytes()) if path.is_file() else None

    def generation(self) -> int:
        m = self.manifest()
        return m["generation"] if m else 0

    @property
    def repo(self) -> Path:
        """watcherd's own repository (the snapshot history) in the state directory."""
        return self.state_dir / self.key / "repo.git"

    def git(self, *args: str) -> str:
        """git in watcherd's own repository (where the snapshots are), as a person inspecting it."""
        return git(self.base, f"--git-dir={self.repo}", *args)

    def snapshots(self) -> list[str]:
        """The snapshot commits, newest first (not the user's commit the first one sits on)."""
        out = subprocess.run(["git", f"--git-dir={self.repo}", "log", "--first-parent",
                              "--format=%H %s", SNAPSHOT_REF], capture_output=True, text=True)
        if out.returncode != 0:
            return []
        return [line.split()[0] for line in out.stdout.splitlines()
                if line.split(" ", 1)[1].startswith("watcherd: snapshot")]

    def show(self, path: str, commit: str = SNAPSHOT_REF) -> str:
        return git(self.workspace, f"--git-dir={self.repo}", "show", f"{commit}:{path}")

    def shown(self, path: str, commit: str = SNAPSHOT_REF) -> str | None:
        """Like :meth:`show`, but None while the path (or the ref) is not there yet."""
        r = subprocess.run(["git", f"--git-dir={self.repo}", "show", f"{commit}:{path}"],
                           capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else None

    def restore_into(self, target: Path, *extra: str,
                     state_dir: Path | None = None) -> subprocess.CompletedProcess:
        """``watcherd restore`` into ``target`` with a second config on the same store and key
        (and a state directory of its own: another pod)."""
        config = write_config(target.parent / f"{target.name}-restore.toml", workspace=target,
                              store=self.store, key=self.key, listen="", state_dir=state_dir)
        result = run_cli(config, "restore", *extra)
        assert result.returncode == 0, result.stderr
        return result

    def report(self) -> str:
        parts = []
        for n, (log, stderr) in enumerate(self.runs):
            parts.append(f"--- {self.name} run {n}: log ---")
            parts += [json.dumps({k: v for k, v in line.items() if k != "_t"})
                      for line in list(log.lines)]
            text = stderr.read_text(errors="replace") if stderr.exists() else ""
            if text.strip():
                parts += [f"--- {self.name} run {n}: stderr ---", text]
        return "\n".join(parts)


@pytest.fixture
def watcherd(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """Make :class:`Daemon` objects (not started); each is killed at teardown if still running."""
    made: list[Daemon] = []

    def make(**kwargs: Any) -> Daemon:
        kwargs.setdefault("name", f"d{len(made)}")
        d = Daemon(tmp_path, **kwargs)
        made.append(d)
        return d

    yield make
    for d in made:
        d.kill()
    for d in made:
        print(d.report())
