"""A model-based test of the whole-state promise (DESIGN, "Workspace state"): for every sequence of
file operations, the user's git, ``.gitignore`` edits, a nested repository (made, edited, committed
in, stashed in, made plain files again and a repository again, removed), saves and restarts, a
restore of the last saved generation equals the state recorded at that save.

Hypothesis drives a real workspace and real git; watcherd snapshots and saves it into a real local
store with the library the daemon uses. "The state recorded at that save" is read from the
workspace with plain git at the moment of the save: ``git status --porcelain=v2``, the index, every
ref, HEAD, the stash, the remotes, branch tracking, and the bytes, modes and link targets of every
file git would keep (tracked, force-added or untracked-not-ignored); the nested repository's the
same way.

The default run is bounded (a few dozen sequences); ``-m slow`` runs a longer profile.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule

from helpers import make_repo
from watcherd import snapshot
from watcherd.config import Config, StoreConfig, WorkspaceConfig, parse_store_url
from watcherd.generations import Generations
from watcherd.repo import Repo
from watcherd.restore import restore
from watcherd.store.local import LocalStore

KEY = "model/ws/main"
NAMES = ["a.txt", "A.txt", "b.txt", "dir/c.txt", "dir/sub/d.txt", "build/e.js", "x.log",
         "dir/Link"]
CONTENTS = [b"", b"one\n", b"two\n", b"\x00\xffbinary\r\n", b"line\r\nwindows\r\n"]
IGNORES = ["*.log", "build/", "dir/sub/", "!x.log"]
NESTED = "vendor"  # where the user clones or inits a repository inside the workspace
NESTED_NAMES = ["n.txt", "deep/m.txt"]
NESTED_GIT = [("add", "-A"), ("commit", "-qam", "nested commit"), ("stash", "-q"),
              ("stash", "pop", "-q"), ("reset", "-q", "--hard", "HEAD~1"),
              ("checkout", "-q", "-b", "topic"), ("tag", "n1")]


def quiet_git(path: Path, *args: str) -> bool:
    """A git command of the user's that may fail (nothing to commit, no parent to reset to)."""
    return subprocess.run(["git", "-c", "init.defaultBranch=main", *args], cwd=path,
                          capture_output=True).returncode == 0


def kept_files(path: Path) -> dict[str, tuple]:
    """Every file git keeps in the work tree: (kind, exec bit, bytes or link target)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=path, capture_output=True, check=True).stdout
    files = {}
    for raw in filter(None, listed.split(b"\0")):
        rel = raw.decode("utf-8", "surrogateescape")
        full = path / rel
        if full.is_symlink():
            files[rel] = ("link", os.readlink(full))
        elif full.is_file():
            files[rel] = ("file", os.stat(full).st_mode & 0o100, full.read_bytes())
    return files


def all_files(path: Path) -> dict[str, tuple]:
    """Every file and link under ``path`` except any ``.git``."""
    files = {}
    for dirpath, dirnames, filenames in os.walk(path):
        if ".git" in dirnames:
            dirnames.remove(".git")
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            full = Path(dirpath, name)
            rel = full.relative_to(path).as_posix()
            if full.is_symlink():
                files[rel] = ("link", os.readlink(full))
            else:
                files[rel] = ("file", os.stat(full).st_mode & 0o100, full.read_bytes())
    return files


def recorded_state(path: Path, nested: bool = True) -> dict[str, object]:
    def out(*args: str) -> str:
        env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}
        return subprocess.run(["git", *args], cwd=path, capture_output=True, text=True,
                              env=env).stdout

    return {
        "status": out("status", "--porcelain=v2", "--branch", "--untracked-files=all"),
        "index": out("ls-files", "--stage"),
        "refs": out("for-each-ref", "--format=%(refname) %(objectname)"),
        "head": out("symbolic-ref", "-q", "HEAD") or out("rev-parse", "HEAD"),
        "stash": out("stash", "list", "--format=%H %gs"),
        "remotes": out("remote", "-v"),
        "tracking": out("config", "--get-regexp", r"^branch\."),
        "files": kept_files(path),
        # A repository in a directory whose files the workspace's index tracks is those files
        # to git: its own history is not recorded (watcherd says so).
        "nested": recorded_state(path / NESTED, False)
        if nested and (path / NESTED / ".git").is_dir() and not any(
            line.startswith(f"{NESTED}/") for line in out("ls-files").splitlines()) else None,
    }


def expected_files(state: dict[str, object]) -> dict[str, tuple]:
    """The files of a recorded state: the workspace's, and its nested repository's."""
    nested = state["nested"]
    return {**state["files"], **({f"{NESTED}/{k}": v for k, v in nested["files"].items()}
                                 if nested else {})}


class WorkspaceModel(RuleBasedStateMachine):
    """One workspace, its store, and the state recorded at the last save."""

    @initialize()
    def start(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="watcherd-model-"))
        self.ws = make_repo(self.base / "ws")
        self.store = self.base / "store"
        self.repo = Repo(self.base / "state", KEY, self.ws)
        self.cache = snapshot.Cache()
        snapshot.prepare(self.repo)
        self.saved: tuple[int, dict[str, object]] | None = None
        self.restores = 0

    def teardown(self) -> None:
        shutil.rmtree(self.base, ignore_errors=True)

    # -- files -------------------------------------------------------------------------------------

    @rule(name=st.sampled_from(NAMES), content=st.sampled_from(CONTENTS))
    def write(self, name: str, content: bytes) -> None:
        path = self.ws / name
        if path.is_symlink() or path.is_dir():
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.parent.is_dir() and not path.parent.is_symlink():
            path.write_bytes(content)

    @rule(name=st.sampled_from(NAMES))
    def delete(self, name: str) -> None:
        path = self.ws / name
        if path.is_symlink() or path.is_file():
            path.unlink()

    @rule(src=st.sampled_from(NAMES), dst=st.sampled_from(NAMES))
    def rename(self, src: str, dst: str) -> None:
        a, b = self.ws / src, self.ws / dst
        if (a.is_file() or a.is_symlink()) and not b.exists() and not b.is_symlink() and a != b:
            b.parent.mkdir(parents=True, exist_ok=True)
            os.rename(a, b)

    @rule(name=st.sampled_from(NAMES))
    def toggle_exec(self, name: str) -> None:
        path = self.ws / name
        if path.is_file() and not path.is_symlink():
            path.chmod(path.stat().st_mode ^ 0o111)

    @rule(name=st.sampled_from(NAMES), points_to=st.sampled_from(["a.txt", "../b.txt", "missing"]))
    def symlink(self, name: str, points_to: str) -> None:
        path = self.ws / name
        if not path.exists() and not path.is_symlink():
            path.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(points_to, path)

    @rule(pattern=st.sampled_from(IGNORES))
    def toggle_ignore(self, pattern: str) -> None:
        path = self.ws / ".gitignore"
        lines = path.read_text().splitlines() if path.exists() else []
        lines = [x for x in lines if x != pattern] if pattern in lines else lines + [pattern]
        path.write_text("".join(f"{x}\n" for x in lines))

    # -- the user's git ----------------------------------------------------------------------------

    @rule(name=st.sampled_from(NAMES), force=st.booleans())
    def add(self, name: str, force: bool) -> None:
        quiet_git(self.ws, "add", *(["-f"] if force else []), "--", name)

    @rule()
    def add_all(self) -> None:
        quiet_git(self.ws, "add", "-A")

    @rule(all_files=st.booleans())
    def commit(self, all_files: bool) -> None:
        quiet_git(self.ws, "commit", "-q", *(["-a"] if all_files else []), "-m", "user commit")

    @rule(branch=st.sampled_from(["feature", "fix/one", "main"]))
    def checkout(self, branch: str) -> None:
        quiet_git(self.ws, "checkout", "-q", "-b", branch) or \
            quiet_git(self.ws, "checkout", "-q", branch)

    @rule(how=st.sampled_from(["--soft", "--mixed", "--hard"]))
    def reset(self, how: str) -> None:
        quiet_git(self.ws, "reset", "-q", how, "HEAD~1")

    @rule(untracked=st.booleans())
    def stash(self, untracked: bool) -> None:
        quiet_git(self.ws, "stash", "push", "-q", *(["-u"] if untracked else []))

    @rule()
    def stash_pop(self) -> None:
        quiet_git(self.ws, "stash", "pop", "-q")

    @rule(name=st.sampled_from(["v1", "release/2"]), annotated=st.booleans())
    def tag(self, name: str, annotated: bool) -> None:
        quiet_git(self.ws, "tag", *(["-a", "-m", "tagged"] if annotated else []), name)

    @rule()
    def remote_and_tracking(self) -> None:
        quiet_git(self.ws, "remote", "add", "origin", "https://example.com/acme/app.git")
        head = subprocess.run(["git", "symbolic-ref", "-q", "--short", "HEAD"], cwd=self.ws,
                              capture_output=True, text=True).stdout.strip()
        if head and quiet_git(self.ws, "rev-parse", "--verify", "-q", "HEAD"):
            quiet_git(self.ws, "update-ref", f"refs/remotes/origin/{head}", "HEAD")
            quiet_git(self.ws, "config", f"branch.{head}.remote", "origin")
            quiet_git(self.ws, "config", f"branch.{head}.merge", f"refs/heads/{head}")

    # -- a nested repository ----------------------------------------------------------------------

    @precondition(lambda self: not (self.ws / NESTED).exists())
    @rule()
    def nest(self) -> None:
        make_repo(self.ws / NESTED, "nested\n")

    @precondition(lambda self: (self.ws / NESTED / ".git").is_dir())
    @rule(name=st.sampled_from(NESTED_NAMES), content=st.sampled_from(CONTENTS))
    def nested_write(self, name: str, content: bytes) -> None:
        path = self.ws / NESTED / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)

    @precondition(lambda self: (self.ws / NESTED / ".git").is_dir())
    @rule(args=st.sampled_from(NESTED_GIT))
    def nested_git(self, args: tuple[str, ...]) -> None:
        quiet_git(self.ws / NESTED, *args)

    @precondition(lambda self: (self.ws / NESTED / ".git").is_dir())
    @rule()
    def unnest(self) -> None:
        """``rm -rf vendor/.git``: its files are the workspace's now."""
        shutil.rmtree(self.ws / NESTED / ".git")

    @precondition(lambda self: (self.ws / NESTED).is_dir() and
                  not (self.ws / NESTED / ".git").exists())
    @rule()
    def renest(self) -> None:
        """``git init`` and a commit in a directory the workspace holds as files."""
        quiet_git(self.ws / NESTED, "init", "-q")
        quiet_git(self.ws / NESTED, "add", "-A")
        quiet_git(self.ws / NESTED, "commit", "-qm", "a repository again")

    @precondition(lambda self: (self.ws / NESTED).exists())
    @rule()
    def remove_nested(self) -> None:
        shutil.rmtree(self.ws / NESTED)

    # -- watcherd ----------------------------------------------------------------------------------

    @rule()
    def restart(self) -> None:
        """A new watcherd process (after a crash or a restart): nothing remembered in memory."""
        self.cache = snapshot.Cache()
        snapshot.prepare(self.repo)

    @rule()
    def snapshot_only(self) -> None:
        snapshot.take(self.repo, "shadow", self.cache)

    @rule()
    def save(self) -> None:
        expected = recorded_state(self.ws)
        snapshot.take(self.repo, "shadow", self.cache)
        result = Generations(LocalStore(self.store), KEY).save(self.repo)
        assert result.status in ("saved", "unchanged")
        self.saved = (result.generation, expected)
        self.check_restore()

    @precondition(lambda self: self.saved is not None)
    @rule()
    def check_restore(self) -> None:
        generation, expected = self.saved
        self.restores += 1
        target = self.base / f"restored-{self.restores}"
        config = Config(workspace=WorkspaceConfig(path=target, state_dir=self.base / f"pod-{self.restores}"),
                        store=StoreConfig(url=parse_store_url(f"file://{self.store}"), key=KEY))
        outcome = restore(config, Generations(LocalStore(self.store), KEY))
        assert outcome.generation == generation
        got = recorded_state(target)
        assert got == expected
        assert all_files(target) == expected_files(expected)  # and nothing else in the work tree
        shutil.rmtree(target)


# The default run, bounded (WATCHERD_MODEL_EXAMPLES raises it), and the long profile (-m slow).
BOUNDED = settings(
    max_examples=int(os.environ.get("WATCHERD_MODEL_EXAMPLES", "12")), stateful_step_count=25,
    deadline=None, suppress_health_check=[HealthCheck.too_slow])
LONG = settings(max_examples=300, stateful_step_count=60, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])

WorkspaceModel.TestCase.settings = BOUNDED
test_every_sequence_restores_the_state_recorded_at_the_last_save = WorkspaceModel.TestCase


class LongWorkspaceModel(WorkspaceModel):
    pass


LongWorkspaceModel.TestCase.settings = LONG
test_long_profile = pytest.mark.slow(pytest.mark.timeout(3600)(LongWorkspaceModel.TestCase))
