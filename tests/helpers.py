"""Small tools the tests share: run git as a user would, capture a tree, wait on a condition."""

from __future__ import annotations

import os
import select
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def git(path: Path, *args: str, input: bytes | None = None) -> str:
    """Run git in ``path`` as the user (or agent) would, and return stdout."""
    proc = subprocess.run(["git", "-c", "init.defaultBranch=main", *args], cwd=path, input=input,
                          capture_output=True, check=False)
    if proc.returncode != 0:
        raise AssertionError(f"git {' '.join(args)} failed: {proc.stderr.decode()}")
    return proc.stdout.decode("utf-8", "surrogateescape").strip()


def make_repo(path: Path, text: str = "hello\n") -> Path:
    """A repository with one commit of ``readme.md``, as a user's project starts."""
    path.mkdir(parents=True)
    git(path, "init", "-q")
    (path / "readme.md").write_text(text)
    git(path, "add", "-A")
    git(path, "commit", "-q", "-m", "initial")
    return path


def punch_hole(path: Path, size: int) -> Path:
    """Extend file ``path`` to ``size`` bytes with a hole after what it holds, as a planted
    ``truncate`` does (it costs the agent no disk). Skips the test where the filesystem cannot
    tell holes (lseek's ``SEEK_HOLE``)."""
    import pytest

    os.truncate(path, size)
    fd = os.open(path, os.O_RDONLY)
    try:
        holes = os.lseek(fd, 0, os.SEEK_HOLE) < size
    finally:
        os.close(fd)
    if not holes:
        pytest.skip("this filesystem does not report holes")
    return path


def state_repo(ws: Path, key: str = "test/key"):
    """watcherd's own state for workspace ``ws`` (a state directory beside it), as the library
    tests use it: one per workspace, the same one each time it is asked for."""
    from watcherd.repo import Repo

    return Repo(ws.parent / f"{ws.name}-state", key, ws)


def sgit(ws: Path, *args: str, key: str = "test/key") -> str:
    """git in watcherd's own repository for ``ws`` (where its snapshots are)."""
    return git(ws.parent, f"--git-dir={state_repo(ws, key).git_dir}", *args)


def store_files(store_dir: Path) -> dict[str, bytes]:
    """Every object of a local store, by name: to show that something left the store unchanged."""
    return {p.relative_to(store_dir).as_posix(): p.read_bytes()
            for p in sorted(store_dir.rglob("*")) if p.is_file() and not p.name.startswith(".")}


def fetch_generation(repo: Path, store_dir: Path, key: str, doc: dict, refs: str = "refs/*") -> str:
    """Fetch one generation of a local store into bare repository ``repo`` with plain git, as a
    person auditing it would: every bundle of its chain, base first (an increment needs the
    bundles before it). ``doc`` is the manifest's entry for the generation; its snapshot id."""
    links = doc.get("chain") or [{"bundle": doc["bundle"]}]
    for link in links:
        git(repo, "fetch", "-q", "--no-tags", str(store_dir / key / "bundles" / link["bundle"]),
            f"+refs/*:{refs}")
    return doc["snapshot"]


def publish(store_dir: Path, key: str, bundle: Path, *, snapshot_commit: str, head: str | None,
            head_ref: str | None) -> int:
    """Put a hand-made bundle in a local store as the next generation, as an attacker with write
    access to the store (or a corrupted writer) could: size and sha256 match, so only git's own
    checks and watcherd's are left to refuse it."""
    from watcherd import manifest as mf
    from watcherd.bundle import file_digest

    manifest_path = store_dir / key / "manifest.json"
    current = mf.parse(manifest_path.read_bytes(), "manifest")
    number = current.current.generation + 1
    name = mf.bundle_name(number, snapshot_commit)
    shutil.copyfile(bundle, store_dir / key / "bundles" / name)
    size, sha = file_digest(bundle)
    new = mf.Generation(number, name, size, sha, snapshot_commit, head_ref, head,
                        mf.now_rfc3339(), mf.Writer("attacker", 1))
    manifest_path.write_bytes(current.advance(new, 10).to_json())
    return number


def said(stderr: str) -> list[str]:
    """The lines of a one-shot command's stderr meant for a person: all but its JSON log lines."""
    return [line for line in stderr.splitlines() if not line.startswith("{")]


def tree_state(root: Path) -> dict[str, tuple]:
    """Every entry under ``root`` except ``.git``: (kind, mode, bytes or link target)."""
    state: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath) == root and ".git" in dirnames:
            dirnames.remove(".git")
        rel_dir = Path(dirpath).relative_to(root)
        for name in dirnames + filenames:
            full = Path(dirpath, name)
            rel = (rel_dir / name).as_posix()
            st = full.lstat()
            if stat.S_ISLNK(st.st_mode):
                state[rel] = ("link", os.readlink(full))
            elif stat.S_ISDIR(st.st_mode):
                if not os.listdir(full):
                    continue  # git does not keep empty directories
                state[rel] = ("dir",)
            else:
                state[rel] = ("file", stat.S_IMODE(st.st_mode) & 0o100, full.read_bytes())
    return state


def watcherd_for_any_uid() -> list[str] | None:
    """The start of a command line that runs watcherd under any uid, or None when this machine
    has none (a test that needs one then skips, saying why)."""
    return python_for_any_uid("sys.argv[0] = 'watcherd'; from watcherd.cli import main; "
                              "raise SystemExit(main())")


def python_for_any_uid(code: str) -> list[str] | None:
    """A command line that runs the Python statements ``code`` under any uid, watcherd and its
    packages importable (``sys`` imported), or None when this machine has no such interpreter.

    A virtualenv's interpreter often lives under a home directory other users cannot enter
    (pyenv in /root); any interpreter of the same Python version that every user may execute
    works, given this checkout and the environment's packages on its path.
    """
    import sysconfig

    paths = [str(Path(__file__).resolve().parent.parent), sysconfig.get_paths()["purelib"]]
    if not all(_world_reachable(p) for p in paths):
        return None
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for exe in (os.path.realpath(sys.executable), shutil.which(version), f"/usr/bin/{version}"):
        if exe and _world_reachable(exe):
            probe = subprocess.run([exe, "-c", "import sys; print(sys.version_info[:2])"],
                                   capture_output=True, text=True)
            if probe.stdout.strip() == str(tuple(sys.version_info[:2])):
                return [exe, "-c", f"import sys; sys.path[:0] = {paths!r}\n{code}"]
    return None


def _world_reachable(path: str) -> bool:
    """Whether every directory on the way to ``path`` is searchable by anyone, and it readable."""
    p = Path(path).resolve()
    for parent in reversed(p.parents):
        if not os.stat(parent).st_mode & stat.S_IXOTH:
            return False
    return bool(os.stat(p).st_mode & stat.S_IROTH)


def wait_for(condition: Callable[[], T], timeout: float = 10.0, interval: float = 0.02,
             message: str = "condition") -> T:
    """Poll ``condition`` until it returns something truthy, or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def read_until(fd: int, needle: bytes, timeout: float = 10.0) -> bytes:
    """Read from ``fd`` until ``needle`` shows up, or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    data = b""
    while needle not in data:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"timed out waiting for {needle!r}; got {data!r}")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                raise AssertionError(f"end of output before {needle!r}; got {data!r}")
            data += chunk
    return data
