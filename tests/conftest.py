"""Shared fixtures: every test gets a git that ignores this machine's config and identity."""

from __future__ import annotations

import compileall
import sys
from pathlib import Path

import pytest

# The contract suite and helpers live beside the tests as plain modules.
sys.path.insert(0, str(Path(__file__).parent))


def pytest_sessionstart(session):
    """watcherd's bytecode, brought up to date once, before the workers start: the suite starts
    hundreds of watcherd processes, and where ``PYTHONDONTWRITEBYTECODE`` is set (or after an
    edit) each of them would compile the package again, 0.3 s of CPU per process."""
    if not hasattr(session.config, "workerinput"):
        compileall.compile_dir(Path(__file__).parent.parent / "watcherd", quiet=1)


@pytest.fixture(autouse=True)
def isolated_git(tmp_path_factory, monkeypatch):
    """No global or system git config, a fixed identity for the tests' own commits."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(home / ".gitconfig"))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    for var, value in (("GIT_AUTHOR_NAME", "Test User"), ("GIT_AUTHOR_EMAIL", "user@example.com"),
                       ("GIT_COMMITTER_NAME", "Test User"),
                       ("GIT_COMMITTER_EMAIL", "user@example.com")):
        monkeypatch.setenv(var, value)
    for var in list(__import__("os").environ):
        if var.startswith("WATCHERD_"):
            monkeypatch.delenv(var)


_DEFAULT_STATE = Path("/var/lib/watcherd/state")


def _state_listing() -> set[tuple[str, int]]:
    if not _DEFAULT_STATE.is_dir():
        return set()
    return {(str(p), p.stat().st_mtime_ns) for p in _DEFAULT_STATE.rglob("*") if p.is_dir()}


@pytest.fixture(autouse=True)
def no_machine_wide_state():
    """A test must give every watcherd its own workspace.state_dir: the machine-wide default is
    shared by every test (and every worktree) on this machine."""
    before = _state_listing()
    yield
    after = _state_listing()
    assert after == before, ("this test wrote the machine-wide default state directory "
                             f"{_DEFAULT_STATE}: set workspace.state_dir in its config")
