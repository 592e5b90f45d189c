"""Bundles that really restore: shallow workspaces (completed from the operator's
``restore.template_url``, or made self-contained without it; never fetched from the workspace's own
``origin``) and the proof that catches a truncated or bit-flipped bundle where ``git bundle verify``
does not."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from helpers import git, sgit, state_repo, tree_state
from watcherd import bundle as bundles
from watcherd import snapshot
from watcherd.config import Config, RestoreConfig, StoreConfig, WorkspaceConfig, parse_store_url
from watcherd.errors import IntegrityError
from watcherd.generations import Generations
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


def save(ws: Path, store_dir: Path, **options) -> tuple[Generations, object]:
    """Snapshot ``ws`` in watcherd's repository beside it and save; ``options`` go to
    :meth:`Generations.save` (``template_url``, ``try_unshallow``)."""
    repo = state_repo(ws, KEY)
    snapshot.prepare(repo)
    snapshot.take(repo)
    gens = Generations(LocalStore(store_dir), KEY)
    return gens, gens.save(repo, **options)


def stored_bundle(store_dir: Path, result) -> Path:
    return store_dir / KEY / "bundles" / result.bundle


def fetched(bundle: Path, dest: Path) -> Path:
    """Every ref of ``bundle`` fetched by plain git into a new bare repository, which must then be
    complete (the check a shallow history's plain bundle fails)."""
    git(dest.parent, "init", "-q", "--bare", str(dest))
    got = plain_git(dest, "fetch", "-q", str(bundle), "refs/*:refs/*")
    assert got.returncode == 0, got.stderr
    assert plain_git(dest, "fsck", "--connectivity-only").returncode == 0
    assert git(dest, "rev-parse", "--is-shallow-repository") == "false"
    return dest


def restored(tmp_path: Path, store_dir: Path, gens: Generations, **request) -> Path:
    """``watcherd restore`` of the stored history into a new pod's workspace."""
    target = tmp_path / "restored"
    config = Config(workspace=WorkspaceConfig(path=target, state_dir=tmp_path / "restored-state"),
                    store=StoreConfig(url=parse_store_url(f"file://{store_dir}"), key=KEY),
                    restore=RestoreConfig())
    outcome = restore(config, gens, Request(**request))
    assert outcome.action == "restored"
    return target


def test_plain_bundle_of_a_shallow_clone_verifies_but_does_not_clone(tmp_path):
    """The trap itself (BASELINES), so the tests below are known to test something."""
    ws = shallow_clone(make_origin(tmp_path / "origin"), tmp_path / "ws")
    b = tmp_path / "plain.bundle"
    git(ws, "bundle", "create", "-q", str(b), "--all")
    assert plain_git(ws, "bundle", "verify", str(b)).returncode == 0
    assert plain_git(tmp_path, "clone", "-q", str(b), "out").returncode != 0


def test_shallow_clone_is_completed_from_the_template_url_and_its_bundle_restores(tmp_path):
    origin = make_origin(tmp_path / "origin")
    ws = shallow_clone(origin, tmp_path / "ws")
    shallow_file = (ws / ".git" / "shallow").read_bytes()
    (ws / "edit.txt").write_text("an edit\n")
    store_dir = tmp_path / "store"

    with capture_logs() as logs:
        gens, result = save(ws, store_dir, template_url=f"file://{origin}")

    assert result.status == "saved" and result.generation == 1
    assert any(e["event"] == "history.unshallowed" for e in logs)
    assert not any(e["event"] == "history.self_contained" for e in logs)
    # watcherd's own repository got the missing history; the workspace was not touched.
    assert sgit(ws, "rev-parse", "--is-shallow-repository", key=KEY) == "false"
    assert git(ws, "rev-parse", "--is-shallow-repository") == "true"
    assert (ws / ".git" / "shallow").read_bytes() == shallow_file
    # The bundle is complete, with the user's commits under their own ids.
    head = git(origin, "rev-parse", "HEAD")
    repo = fetched(stored_bundle(store_dir, result), tmp_path / "fetched.git")
    assert git(repo, "rev-list", "--count", head) == "3"

    # A later save (the daemon asks the template once) stays a fast-forward of the same ids.
    (ws / "edit.txt").write_text("a second edit\n")
    _, second = save(ws, store_dir, try_unshallow=False)
    assert second.status == "saved" and second.generation == 2
    assert not list((store_dir / KEY).glob("conflicts/*"))

    target = restored(tmp_path, store_dir, gens)
    assert tree_state(target) == tree_state(ws)
    assert git(target, "rev-parse", "HEAD") == head
    assert git(target, "rev-parse", "--is-shallow-repository") == "false"
    assert git(target, "rev-list", "--count", "HEAD") == "3"


@pytest.mark.parametrize("template", ["unset", "unreachable"])
def test_shallow_clone_without_a_reachable_template_url_gives_a_self_contained_bundle_and_keeps_going(
        tmp_path, template):
    origin = make_origin(tmp_path / "origin")
    ws = shallow_clone(origin, tmp_path / "ws")
    if template == "unset":
        # The workspace's origin still answers, but it is the workspace's word: never fetched from.
        options = {}
    else:
        options = {"template_url": f"file://{tmp_path / 'template-gone'}"}
    shallow_file = (ws / ".git" / "shallow").read_bytes()
    head = git(ws, "rev-parse", "HEAD")
    (ws / "edit.txt").write_text("first edit\n")
    (ws / "file0.txt").unlink()
    store_dir = tmp_path / "store"

    with capture_logs() as logs:
        gens, first = save(ws, store_dir, **options)

    assert first.status == "saved" and first.generation == 1
    assert any(e["event"] == "history.self_contained" for e in logs)
    assert not any(e["event"] == "history.unshallowed" for e in logs)
    # Neither the workspace nor watcherd's repository got history from anywhere.
    assert sgit(ws, "rev-parse", "--is-shallow-repository", key=KEY) == "true"
    assert git(ws, "rev-parse", "--is-shallow-repository") == "true"
    assert git(ws, "rev-parse", "HEAD") == head
    assert (ws / ".git" / "shallow").read_bytes() == shallow_file
    repo = fetched(stored_bundle(store_dir, first), tmp_path / "fetched.git")
    assert git(repo, "show", f"{first.snapshot}:history.txt") == "version 2"
    # The user's HEAD is carried from the shallow boundary on: parentless, under a new id.
    stored_head = gens.read_manifest()[0].current.head
    assert stored_head != head and git(repo, "rev-list", "--count", stored_head) == "1"
    assert git(repo, "show", f"{stored_head}:history.txt") == "version 2"

    (ws / "edit.txt").write_text("second edit\n")
    (ws / "more.txt").write_text("more\n")
    _, second = save(ws, store_dir, **options)

    assert second.status == "saved" and second.generation == 2  # a fast-forward, not a conflict
    assert not list((store_dir / KEY).glob("conflicts/*"))
    manifest, _ = gens.read_manifest()
    assert [g.generation for g in manifest.generations] == [2, 1]

    target = restored(tmp_path, store_dir, gens, generation=2)
    assert tree_state(target) == tree_state(ws)
    assert git(target, "symbolic-ref", "HEAD") == "refs/heads/main"
    assert git(target, "rev-parse", "HEAD") == manifest.current.head
    assert git(target, "rev-parse", "--is-shallow-repository") == "false"
    # Generation 1's snapshot is history of generation 2's in the restored pod's repository.
    sgit(target, "merge-base", "--is-ancestor", manifest.history[0].snapshot,
         manifest.current.snapshot, key=KEY)


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


# -- reading objects back --------------------------------------------------------------------------


def test_cat_objects_answers_each_name_in_order_and_none_for_what_is_not_there(tmp_path):
    from watcherd.git import Git

    ws = make_origin(tmp_path / "ws", commits=1)
    (ws / "tricky.txt").write_bytes(b"abc blob 12\n\nmissing\n")  # reads like batch output
    git(ws, "add", "tricky.txt")
    git(ws, "commit", "-q", "-m", "tricky")
    head = git(ws, "rev-parse", "HEAD")
    door = Git(ws / ".git", home=tmp_path)

    found = door.cat_objects([f"{head}:tricky.txt", f"{head}:nope.txt", f"{head}^{{commit}}",
                              f"{head}:file0.txt", "0" * 40])

    blob = git(ws, "rev-parse", f"{head}:tricky.txt")
    assert found[0] == (blob, "blob", b"abc blob 12\n\nmissing\n")
    assert found[1] is None and found[4] is None
    assert found[2][:2] == (head, "commit") and found[2][2].startswith(b"tree ")
    assert found[3][1:] == ("blob", b"0\n")


@pytest.mark.parametrize("message", ["watcherd: state\nbut a second line", "watcherd: state"])
def test_a_user_commit_with_the_state_subject_is_not_taken_for_a_state_commit(tmp_path, message):
    # An older watcherd's snapshot had HEAD as its last parent: a user's commit titled like a
    # state commit, without state.json, is not one (and a two-line title is not that title).
    from watcherd import state
    from watcherd.git import Git

    ws = make_origin(tmp_path / "ws", commits=1)
    git(ws, "commit", "-q", "--allow-empty", "-m", message)
    tree = git(ws, "rev-parse", "HEAD^{tree}")
    snap = git(ws, "commit-tree", tree, "-p", "HEAD~1", "-p", "HEAD", "-m", "watcherd: snapshot")
    door = Git(ws / ".git", home=tmp_path)

    found = state.load(door, snap)

    assert (found.tree, found.state_commit, found.recorded) == (tree, None, None)
    assert state.state_parent(door, snap) is None


@pytest.mark.parametrize("size", [b"-50", b"-1", b"+5", b"5 ", b"", b"x", b"99999999999999999999", b"4", b"6"])
def test_a_tag_record_whose_size_is_not_the_count_of_its_bytes_is_refused_at_once(size):
    # The state commit's "tags" blob comes back from the store: a negative size once sent the
    # reading back to the start for ever, a wrong one read into the next record.
    from watcherd import state

    good = b"%s tag 5\nabcde\n" % (b"a" * 40)
    assert state.tag_records(good + good) == [("a" * 40, b"abcde")] * 2
    with pytest.raises(ValueError):
        state.tag_records(good + b"%s tag %s\nabcde\n" % (b"b" * 40, size))
    with pytest.raises(ValueError):
        state.tag_records(good[:-1])  # its last line end gone


@pytest.mark.parametrize("message", [
    "watcherd: state", "watcherd: state\nmore", "\n \nwatcherd: state", "watcherd:\n  state",
    "  watcherd: state  \n\nbody", "watcherd: state\t\n", "a\n\n\nb"])
def test_a_commit_is_read_as_git_reads_it_subject_and_parents(tmp_path, message):
    # The state commit is recognised by its subject and found as the snapshot's last parent:
    # both read as git reads them, whatever a tampered store put in the commit.
    from watcherd import state

    ws = make_origin(tmp_path / "ws", commits=2)
    tree = git(ws, "rev-parse", "HEAD^{tree}")
    one, two = git(ws, "rev-parse", "HEAD~1"), git(ws, "rev-parse", "HEAD")
    ident = "author A <a@x> 0 +0000\ncommitter A <a@x> 0 +0000"
    # A "parent" line after the committer is no parent to git.
    body = f"tree {tree}\nparent {one}\n{ident}\nparent {two}\n\n{message}\n".encode()
    commit = subprocess.run(["git", "hash-object", "-t", "commit", "-w", "--literally", "--stdin"],
                            cwd=ws, input=body, capture_output=True, check=True).stdout.decode().strip()

    headers, subject = state._commit_parts(body)

    assert subject == plain_git(ws, "log", "-1", "--format=%s", commit).stdout[:-1]
    assert headers["tree"] == [tree] and headers["parent"] == [one]
    assert git(ws, "log", "-1", "--format=%P", commit) == one
