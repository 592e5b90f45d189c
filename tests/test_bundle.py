"""Bundles that really clone: shallow workspaces (with and without their origin) and the proof that
catches a truncated or bit-flipped bundle where ``git bundle verify`` does not."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from helpers import git, tree_state
from watcherd import bundle as bundles
from watcherd import snapshot
from watcherd.config import Config, RestoreConfig, StoreConfig, WorkspaceConfig, parse_store_url
from watcherd.errors import IntegrityError
from watcherd.generations import Generations
from watcherd.git import Git
from watcherd.restore import Request, restore
from watcherd.store.local import LocalStore

KEY = "acme/shallow/main"


def plain_git(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """git as any user would run it, with no watcherd options, for the "does it clone" checks."""
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)


def make_origin(path: Path, commits: int = 3) -> Path:
    path.mkdir()
    git(path, "init", "-q")
    for i in range(commits):
        (path / "history.txt").write_text(f"version {i}\n")
        (path / f"file{i}.txt").write_text(f"{i}\n")
        git(path, "add", "-A")
        git(path, "commit", "-q", "-m", f"commit {i}")
    return path


def shallow_clone(origin: Path, dest: Path) -> Path:
    # file:// because a plain local path ignores --depth.
    git(origin.parent, "clone", "-q", "--depth", "1", f"file://{origin}", str(dest))
    assert git(dest, "rev-parse", "--is-shallow-repository") == "true"
    return dest


def save(ws: Path, store_dir: Path) -> tuple[Generations, object]:
    g = Git(ws)
    snapshot.take(g)
    gens = Generations(LocalStore(store_dir), KEY)
    return gens, gens.save(g, "shadow", ws / ".git" / "watcherd" / "spool")


def stored_bundle(store_dir: Path, result) -> Path:
    return store_dir / KEY / "bundles" / result.bundle


def test_plain_bundle_of_a_shallow_clone_verifies_but_does_not_clone(tmp_path):
    """The trap itself (BASELINES), so the tests below are known to test something."""
    ws = shallow_clone(make_origin(tmp_path / "origin"), tmp_path / "ws")
    b = tmp_path / "plain.bundle"
    git(ws, "bundle", "create", "-q", str(b), "--all")
    assert plain_git(ws, "bundle", "verify", str(b)).returncode == 0
    assert plain_git(tmp_path, "clone", "-q", str(b), "out").returncode != 0


def test_shallow_clone_with_a_reachable_origin_is_unshallowed_and_its_bundle_clones(tmp_path):
    origin = make_origin(tmp_path / "origin")
    ws = shallow_clone(origin, tmp_path / "ws")
    (ws / "edit.txt").write_text("an edit\n")

    with capture_logs() as logs:
        _, result = save(ws, tmp_path / "store")

    assert result.status == "saved" and result.generation == 1
    assert git(ws, "rev-parse", "--is-shallow-repository") == "false"
    assert any(e["event"] == "history.unshallowed" for e in logs)
    cloned = plain_git(tmp_path, "clone", "-q", str(stored_bundle(tmp_path / "store", result)), "out")
    assert cloned.returncode == 0, cloned.stderr
    assert git(tmp_path / "out", "rev-list", "--count", "HEAD") == "3"
    assert git(tmp_path / "out", "rev-parse", "HEAD") == git(origin, "rev-parse", "HEAD")


def test_shallow_clone_whose_origin_is_gone_gives_a_self_contained_bundle_and_keeps_going(tmp_path):
    origin = make_origin(tmp_path / "origin")
    ws = shallow_clone(origin, tmp_path / "ws")
    shutil.rmtree(origin)
    shallow_file = (ws / ".git" / "shallow").read_bytes()
    head = git(ws, "rev-parse", "HEAD")
    (ws / "edit.txt").write_text("first edit\n")
    (ws / "file0.txt").unlink()

    with capture_logs() as logs:
        gens, first = save(ws, tmp_path / "store")

    assert first.status == "saved" and first.generation == 1
    assert any(e["event"] == "history.self_contained" for e in logs)
    # The workspace itself is not changed: still shallow, same HEAD, same boundary.
    assert git(ws, "rev-parse", "--is-shallow-repository") == "true"
    assert git(ws, "rev-parse", "HEAD") == head
    assert (ws / ".git" / "shallow").read_bytes() == shallow_file
    cloned = plain_git(tmp_path, "clone", "-q", str(stored_bundle(tmp_path / "store", first)), "out")
    assert cloned.returncode == 0, cloned.stderr
    assert (tmp_path / "out" / "history.txt").read_text() == "version 2\n"
    assert plain_git(tmp_path / "out", "fsck", "--connectivity-only").returncode == 0

    (ws / "edit.txt").write_text("second edit\n")
    (ws / "more.txt").write_text("more\n")
    _, second = save(ws, tmp_path / "store")

    assert second.status == "saved" and second.generation == 2  # a fast-forward, not a conflict
    assert not list((tmp_path / "store" / KEY).glob("conflicts/*"))
    manifest, _ = gens.read_manifest()
    assert [g.generation for g in manifest.generations] == [2, 1]

    target = tmp_path / "restored"
    config = Config(workspace=WorkspaceConfig(path=target),
                    store=StoreConfig(url=parse_store_url(f"file://{tmp_path / 'store'}"), key=KEY),
                    restore=RestoreConfig())
    outcome = restore(config, gens, Request(generation=2))

    assert outcome.action == "restored" and outcome.generation == 2
    assert tree_state(target) == tree_state(ws)
    assert git(target, "symbolic-ref", "HEAD") == "refs/heads/main"
    assert git(target, "rev-parse", "HEAD") == manifest.current.head
    assert git(target, "rev-parse", "--is-shallow-repository") == "false"
    # Generation 1's snapshot is history of generation 2's in the restored repository.
    git(target, "merge-base", "--is-ancestor", manifest.history[0].snapshot, manifest.current.snapshot)


# -- proving a bundle -----------------------------------------------------------------------------------


@pytest.fixture
def good_bundle(tmp_path) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    for i in range(5):
        (repo / f"f{i}.txt").write_text(f"line {i}\n" * 200)
        git(repo, "add", "-A")
        git(repo, "commit", "-q", "-m", f"c{i}")
    path = tmp_path / "good.bundle"
    git(repo, "bundle", "create", "-q", str(path), "--all")
    return path


def git_bundle_verify(bundle: Path, tmp_path: Path) -> int:
    empty = tmp_path / "verifier"
    if not empty.exists():
        empty.mkdir()
        git(empty, "init", "-q")
    return plain_git(empty, "bundle", "verify", str(bundle)).returncode


def _pack_offset(data: bytes) -> int:
    return data.index(b"\n\n") + 2  # the header ends with an empty line; the pack follows


def test_prove_accepts_a_good_bundle(good_bundle, tmp_path):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    bundles.prove(good_bundle, scratch)
    assert list(scratch.iterdir()) == []  # leaves nothing behind


def test_prove_rejects_a_truncated_bundle_that_git_bundle_verify_accepts(good_bundle, tmp_path):
    data = good_bundle.read_bytes()
    bad = tmp_path / "truncated.bundle"
    bad.write_bytes(data[: _pack_offset(data) + (len(data) - _pack_offset(data)) // 2])
    assert git_bundle_verify(bad, tmp_path) == 0  # the trap

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    with pytest.raises(IntegrityError, match="bundle does not restore"):
        bundles.prove(bad, scratch)


def test_prove_rejects_a_bit_flipped_bundle_that_git_bundle_verify_accepts(good_bundle, tmp_path):
    data = bytearray(good_bundle.read_bytes())
    start = _pack_offset(bytes(data))
    data[start + (len(data) - start) // 2] ^= 0x10
    bad = tmp_path / "flipped.bundle"
    bad.write_bytes(bytes(data))
    assert git_bundle_verify(bad, tmp_path) == 0  # the trap

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    with pytest.raises(IntegrityError, match="bundle does not restore"):
        bundles.prove(bad, scratch)


def test_prove_accepts_a_bundle_of_a_sha256_repository(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "--object-format=sha256")
    (repo / "a.txt").write_text("a\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "sha256")
    path = tmp_path / "sha256.bundle"
    git(repo, "bundle", "create", "-q", str(path), "--all")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    bundles.prove(path, scratch)
