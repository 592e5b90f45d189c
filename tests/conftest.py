"""Shared fixtures: every test gets a git that ignores this machine's config and identity."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# The contract suite and helpers live beside the tests as plain modules.
sys.path.insert(0, str(Path(__file__).parent))


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
