"""Nested repositories (a submodule, a ``git clone`` or ``git init`` inside the workspace) are saved
by the same rules as the workspace (DESIGN, "Workspace state"): their working tree, index, HEAD,
refs, stash and allowlisted config, at the same moment, each in a snapshot of its own that the
workspace's snapshot names; a restore gives each back as a repository of its own. One that cannot
be saved is named in the log and in ``status``, and keeps the state it last had.

Real git repositories, real saves into a local store, real restores.
"""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest
import structlog
from structlog.testing import capture_logs

from helpers import git, make_repo, punch_hole, state_repo
from watcherd import snapshot, state
from watcherd import workspace as ws_reader
from watcherd.config import Config, StoreConfig, WorkspaceConfig, parse_store_url
from watcherd.errors import IntegrityError
from watcherd.generations import Generations
from watcherd.restore import restore
from watcherd.store.local import LocalStore

KEY = "acme/sandbox-9/nested"
pytestmark = pytest.mark.timeout(120)


def take(ws: Path, cache: snapshot.Cache | None = None) -> snapshot.Snapshot:
    repo = state_repo(ws, KEY)
    snapshot.prepare(repo)
    return snapshot.take(repo, cache=cache)


def save(ws: Path, store_dir: Path, cache: snapshot.Cache | None = None) -> snapshot.Snapshot:
    snap = take(ws, cache)
    assert Generations(LocalStore(store_dir), KEY).save(state_repo(ws, KEY)).status in \
        ("saved", "unchanged")
    return snap


def restore_into(target: Path, store_dir: Path):
    target.parent.mkdir(parents=True, exist_ok=True)
    config = Config(workspace=WorkspaceConfig(path=target, state_dir=target.parent / "pod-2"),
                    store=StoreConfig(url=parse_store_url(f"file://{store_dir}"), key=KEY))
    return restore(config, Generations(LocalStore(store_dir), KEY))


def files(root: Path) -> dict[str, tuple]:
    """Every entry under ``root`` except any ``.git``: (kind, exec bit, bytes or link target)."""
    found: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if ".git" in dirnames:
            dirnames.remove(".git")
        for name in dirnames + filenames:
            full = Path(dirpath, name)
            rel = full.relative_to(root).as_posix()
            st = full.lstat()
            if stat.S_ISLNK(st.st_mode):
                found[rel] = ("link", os.readlink(full))
            elif stat.S_ISDIR(st.st_mode):
                if os.listdir(full):
                    found[rel] = ("dir",)
            elif name != ".git":
                found[rel] = ("file", st.st_mode & 0o100, full.read_bytes())
    return found


def view(repo: Path) -> dict[str, str]:
    """What a person sees of a repository's state (DESIGN's list: status, stash, remotes, the
    branch's tracking, HEAD, refs)."""
    return {
        "status": git(repo, "status", "--porcelain=v2", "--branch"),
        "stash": git(repo, "stash", "list"),
        "remotes": git(repo, "remote", "-v"),
        "tracking": subprocess.run(["git", "config", "branch.dev.remote"], cwd=repo,
                                   capture_output=True, text=True).stdout,
        "head": git(repo, "symbolic-ref", "-q", "HEAD") if subprocess.run(
            ["git", "symbolic-ref", "-q", "HEAD"], cwd=repo).returncode == 0
        else git(repo, "rev-parse", "HEAD"),
        "refs": git(repo, "for-each-ref", "--format=%(refname) %(objectname)"),
    }


def busy_clone(path: Path) -> Path:
    """A nested repository holding everything a person could lose: commits on a branch, a tag,
    a stash, a remote with tracking, a staged change, an edit and an untracked file."""
    make_repo(path, "nested\n")
    git(path, "checkout", "-q", "-b", "dev")
    git(path, "tag", "-a", "v1", "-m", "first")
    (path / "readme.md").write_text("stashed\n")
    git(path, "stash", "-q")
    git(path, "remote", "add", "origin", "https://example.invalid/nested.git")
    git(path, "config", "branch.dev.remote", "origin")
    git(path, "config", "branch.dev.merge", "refs/heads/dev")
    (path / "staged.txt").write_text("staged\n")
    git(path, "add", "staged.txt")
    (path / "staged.txt").write_text("staged, then edited\n")
    (path / "readme.md").write_text("edited, not committed\n")
    (path / "untracked.txt").write_text("untracked\n")
    (path / "run.sh").write_text("#!/bin/sh\n")
    (path / "run.sh").chmod(0o755)
    os.symlink("readme.md", path / "link")
    return path


def test_a_nested_clone_comes_back_whole(tmp_path):
    ws = make_repo(tmp_path / "ws")
    nested = busy_clone(ws / "vendor" / "lib")
    (ws / "readme.md").write_text("outer edit\n")
    before = {"outer": view(ws), "nested": view(nested)}
    store = tmp_path / "store"

    with capture_logs() as logs:
        snap = save(ws, store)

    assert not [e for e in logs if e["log_level"] == "warning"], logs
    repo = state_repo(ws, KEY)
    loaded = state.load(repo.bare, snap.commit)
    assert list(loaded.nested) == ["vendor/lib"]
    assert "vendor/lib/readme.md" in snap.paths  # the log names what changed inside
    target = tmp_path / "restored"
    outcome = restore_into(target, store)
    assert outcome.generation
    assert files(target) == files(ws)
    assert {"outer": view(target), "nested": view(target / "vendor" / "lib")} == before
    assert (target / "vendor" / "lib" / ".git").is_dir()
    assert git(target / "vendor" / "lib", "cat-file", "-t", "v1") == "tag"
    assert subprocess.run(["git", "fsck", "--no-dangling"], cwd=target / "vendor" / "lib",
                          capture_output=True).returncode == 0


def test_an_uncommitted_edit_in_a_submodule_comes_back(tmp_path):
    lib = make_repo(tmp_path / "lib", "library\n")
    ws = make_repo(tmp_path / "ws")
    git(ws, "-c", "protocol.file.allow=always", "submodule", "add", "-q", str(lib), "lib")
    git(ws, "commit", "-qm", "add lib")
    store = tmp_path / "store"
    save(ws, store)
    (ws / "lib" / "readme.md").write_text("edited inside the submodule\n")
    (ws / "lib" / "new.txt").write_text("new inside the submodule\n")
    git(ws / "lib", "add", "new.txt")
    before = {"outer": view(ws), "nested": view(ws / "lib")}

    snap = save(ws, store)

    assert set(snap.paths) == {"lib/readme.md", "lib/new.txt"}
    target = tmp_path / "restored"
    restore_into(target, store)
    assert (target / "lib" / "readme.md").read_text() == "edited inside the submodule\n"
    assert files(target) == files(ws)
    assert {"outer": view(target), "nested": view(target / "lib")} == before


def test_the_bound_on_nested_repositories_counts_every_level_together(tmp_path, monkeypatch):
    """:data:`state.MAX_NESTED` bounds what one snapshot takes in the whole workspace, not in
    each repository: a level of its own each is no way round it. The rest are named."""
    monkeypatch.setattr(state, "MAX_NESTED", 3)
    ws = make_repo(tmp_path / "ws")
    for outer in ("a", "b"):
        make_repo(ws / outer)
        for inner in ("x", "y"):
            make_repo(ws / outer / inner)
    cache = snapshot.Cache()
    with capture_logs() as logs:
        take(ws, cache)
        take(ws, cache)  # counted again from nothing: the same ones saved, the same named

    # a, a/x and a/y are the three; b is not saved, and nothing in it is looked at.
    assert cache.not_saved() == {"b": "more than 3 nested repositories in the workspace"}
    assert {e["path"] for e in logs if e["event"] == "snapshot.nested_not_saved"} == {"b"}


def test_nested_repositories_with_a_sparse_index_are_saved_without_it_at_no_cost(tmp_path):
    """The attack: nested repositories whose ``.git/index`` is a real index with a 64 MiB hole
    after it (no disk for the agent). Each index is refused unread, the warning names it; all
    the rest of them is saved, their state records no index (a restore gives them HEAD's, not
    an empty one), and the state directory does not grow by the holes."""
    ws = make_repo(tmp_path / "ws")
    names = ("a", "b", "c")
    for name in names:
        lib = make_repo(ws / "vendor" / name, f"{name}\n")
        (lib / "readme.md").write_text(f"{name}, edited\n")
        punch_hole(lib / ".git" / "index", 64 << 20)
    store = tmp_path / "store"

    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        snap = save(ws, store)

    said = [e for e in logs if e["event"] == "snapshot.state_not_recorded"]
    assert {e.get("nested_repository") for e in said} == {f"vendor/{n}" for n in names}
    assert all(".git/index has holes" in e["reason"] for e in said), said
    assert {f"vendor/{n}/readme.md" for n in names} <= set(snap.paths)
    state_dir = state_repo(ws, KEY).dir
    assert sum(p.lstat().st_blocks * 512 for p in state_dir.rglob("*")) < 16 << 20
    target = tmp_path / "restored"
    restore_into(target, store)
    for name in names:
        assert (target / "vendor" / name / "readme.md").read_text() == f"{name}, edited\n"
        assert git(target / "vendor" / name, "status", "--porcelain") == "M readme.md"


def test_indexes_past_what_one_snapshot_reads_in_all_are_left_out_and_counted_anew_each_time(
        tmp_path, monkeypatch):
    """:data:`workspace.MAX_INDEX` bounds the indexes one snapshot reads in the whole workspace,
    not each one: the nested repositories past it have their index left out (named; all the
    rest of them saved, the snapshot taken), and the next snapshot counts from nothing."""
    ws = make_repo(tmp_path / "ws")
    for name in ("a", "b", "c"):
        make_repo(ws / name, f"{name}\n")
        (ws / name / "readme.md").write_text(f"{name}, edited\n")
    room = sum((ws / p / ".git" / "index").stat().st_size for p in (".", "a"))
    monkeypatch.setattr(ws_reader, "MAX_INDEX", room)  # the workspace's index and a's
    bare = state_repo(ws, KEY).bare

    def with_index(commit: str) -> set[str]:
        """The repositories whose index the snapshot ``commit`` records ("" the workspace)."""
        snapshots = {"": commit, **state.load(bare, commit).nested}
        return {path for path, snap in snapshots.items()
                if state.read(bare, state.state_parent(bare, snap)).index_tree is not None}

    cache = snapshot.Cache()
    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        first = take(ws, cache)

    assert with_index(first.commit) == {"", "a"}
    said = [e for e in logs if e["event"] == "snapshot.state_not_recorded"]
    assert {e["nested_repository"] for e in said} == {"b", "c"}
    assert all(f"left of the {room} bytes of indexes one snapshot reads" in e["reason"]
               for e in said), said
    assert {f"{n}/readme.md" for n in ("a", "b", "c")} <= set(first.paths)
    assert bare.out("show", f"{state.load(bare, first.commit).nested['b']}:readme.md") == \
        "b, edited"
    (ws / "c" / "readme.md").write_text("c, edited again\n")
    second = take(ws, cache)
    assert second.paths == ("c/readme.md",)
    assert with_index(second.commit) == {"", "a"}


def test_a_snapshot_holds_one_index_in_memory_however_deep_repositories_nest(tmp_path):
    """Three repositories nested in each other, each index 8 MiB: a snapshot keeps none of
    them in memory while it reads the next one (about one index at a time, not their sum),
    and records all three."""
    import hashlib
    import tracemalloc

    ws = make_repo(tmp_path / "ws")
    where, size = ws, 8 << 20
    for name in ("a", "b", "c"):
        where = make_repo(where / name, f"{name}\n")
        # As a big repository's index is big: an optional extension git skips (its name starts
        # with a capital letter), the checksum made again.
        index = where / ".git" / "index"
        body = index.read_bytes()[:-20] + b"ZZZZ" + size.to_bytes(4, "big") + os.urandom(size)
        index.write_bytes(body + hashlib.sha1(body).digest())
    repo = state_repo(ws, KEY)
    snapshot.prepare(repo)

    tracemalloc.start()
    try:
        snap = snapshot.take(repo)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    commit, recorded = snap.commit, []
    for name in ("a", "b", "c"):
        commit = state.load(repo.bare, commit).nested[name]
        rec = state.read(repo.bare, state.state_parent(repo.bare, commit))
        recorded.append(rec.index_tree is not None)
    assert recorded == [True, True, True]
    assert peak < size * 3 // 2  # one index and change; their sum is three


def test_a_repository_nested_in_a_nested_one_comes_back(tmp_path):
    ws = make_repo(tmp_path / "ws")
    outer = make_repo(ws / "a", "a\n")
    inner = make_repo(outer / "b", "b\n")
    (inner / "readme.md").write_text("edited two levels down\n")
    (outer / "x.txt").write_text("untracked one level down\n")
    store = tmp_path / "store"

    save(ws, store)

    target = tmp_path / "restored"
    restore_into(target, store)
    assert files(target) == files(ws)
    assert view(target / "a" / "b") == view(inner)
    assert view(target / "a") == view(outer)


def test_what_a_killed_process_left_in_the_state_of_every_level_is_removed_by_the_next_snapshot(
        tmp_path):
    # kill -9 between git's creating a lock or a scratch file and its removal: nothing of it may
    # block or be left behind, in this key's state or in a nested repository's, at any depth.
    ws = make_repo(tmp_path / "ws")
    outer = make_repo(ws / "a", "a\n")
    inner = make_repo(outer / "b", "b\n")
    take(ws)
    repo = state_repo(ws, KEY)
    levels = [repo, repo.nested("a"), repo.nested("a").nested("b")]
    gone = subprocess.Popen(["true"])
    gone.wait()
    dead_pid = gone.pid
    alive = [level.dir / f".fork.json.{os.getpid()}.140.tmp" for level in levels]
    left = []
    for level in levels:
        assert level.git_dir.is_dir()
        left += [level.dir / "index.lock", level.git_dir / "refs" / "watcherd" / "snapshots.lock",
                 level.git_dir / "packed-refs.lock", level.git_dir / "shallow.lock",
                 level.scratch / "rollback-index-1-2.lock",
                 level.scratch / "index-check-x1y2" / "index.lock",
                 level.scratch / "copy-x1y2" / "pack-tmp.pack", level.scratch / "config-x1y2",
                 level.dir / f".stored.json.{dead_pid}.140.tmp",
                 level.git_dir / f".shallow.{dead_pid}.140.tmp",
                 level.git_dir / "info" / f".exclude.{dead_pid}.140.tmp",
                 # where a watcherd before scratch/ kept them
                 level.dir / "rollback-index-77", level.dir / "config-a1b2",
                 level.git_dir / "index-check-77-140.lock",
                 level.git_dir / "tmp-copy-a1b2" / "pack-tmp.pack"]
    for path in left + alive:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")
    (inner / "readme.md").write_text("edited after the crash\n")

    with capture_logs() as logs:
        take(ws)

    assert [p for p in left if os.path.lexists(p)] == []
    assert all(p.exists() for p in alive)  # a live process's file being written is its own
    assert sorted(e["lock"] for e in logs if e["event"] == "state.stale_lock_removed") == \
        sorted({str(p.parent if p.parent.name.endswith("-x1y2") or p.parent.name.endswith("-a1b2")
                    else p) for p in left})
    sub = levels[2]
    assert b"edited after the crash" in subprocess.run(
        ["git", f"--git-dir={sub.git_dir}", "show", "refs/watcherd/snapshots:readme.md"],
        capture_output=True, check=True).stdout


def test_an_unchanged_nested_repository_costs_no_snapshot_and_a_change_inside_is_one(tmp_path):
    ws = make_repo(tmp_path / "ws")
    nested = make_repo(ws / "lib")
    cache = snapshot.Cache()
    first = take(ws, cache)
    assert first.commit
    assert take(ws, cache).commit is None
    assert take(ws, snapshot.Cache()).commit is None  # another process: the same answer

    (nested / "readme.md").write_text("edited inside\n")
    second = take(ws, cache)

    assert second.commit and second.paths == ("lib/readme.md",)
    assert take(ws, cache).commit is None


def test_a_nested_repository_going_away_takes_its_record_with_it(tmp_path):
    ws = make_repo(tmp_path / "ws")
    nested = make_repo(ws / "lib")
    cache = snapshot.Cache()
    take(ws, cache)
    subprocess.run(["rm", "-rf", str(nested / ".git")], check=True)  # its files are the tree's

    snap = take(ws, cache)

    loaded = state.load(state_repo(ws, KEY).bare, snap.commit)
    assert loaded.nested == {}
    assert git(ws.parent, f"--git-dir={state_repo(ws, KEY).git_dir}", "show",
               f"{snap.commit}:lib/readme.md") == "hello"


@pytest.mark.parametrize("how", ["directory-link", "gitdir-outside"])
def test_a_nested_repository_leading_outside_is_not_saved_keeps_its_last_state_and_says_so(
        tmp_path, how):
    ws = make_repo(tmp_path / "ws")
    nested = make_repo(ws / "lib", "saved inside\n")
    outside = make_repo(tmp_path / "outside", "SECRET outside the workspace\n")
    store = tmp_path / "store"
    cache = snapshot.Cache()
    first = save(ws, store, cache)
    first_nested = state.load(state_repo(ws, KEY).bare, first.commit).nested["lib"]

    if how == "directory-link":
        # The agent swaps the nested repository's directory for a link to another repository.
        os.rename(nested, ws / "lib-away")
        os.symlink(outside, ws / "lib")
    else:
        subprocess.run(["rm", "-rf", str(nested / ".git")], check=True)
        (nested / ".git").write_text(f"gitdir: {outside / '.git'}\n")
    (ws / "readme.md").write_text("edited beside it\n")
    with capture_logs() as logs:
        snap = take(ws, cache)

    bare = state_repo(ws, KEY).bare
    everything = bare.run("rev-list", "--objects", snap.commit).stdout
    for oid in (line.split()[0] for line in everything.decode().splitlines()):
        if bare.out("cat-file", "-t", oid) == "blob":
            assert b"SECRET" not in bare.run("cat-file", "blob", oid).stdout
    if how == "gitdir-outside":
        warned = [e for e in logs if e["event"] == "snapshot.nested_not_saved"]
        assert [e["path"] for e in warned] == ["lib"]
        assert warned[0]["kept"] == "its last saved state"
        assert "outside" in warned[0]["reason"]
        assert state.load(bare, snap.commit).nested == {"lib": first_nested}
        assert cache.not_saved().keys() == {"lib"}
    else:
        # A link is a link to git: recorded as one; the repository moved aside is saved there.
        assert state.load(bare, snap.commit).nested.keys() == {"lib-away"}
        assert bare.out("ls-tree", snap.commit, "lib").startswith("120000 ")


def test_a_change_of_the_reason_is_said_again_and_saved_again_is_said(tmp_path):
    ws = make_repo(tmp_path / "ws")
    nested = make_repo(ws / "lib")
    cache = snapshot.Cache()
    take(ws, cache)
    elsewhere = make_repo(tmp_path / "elsewhere")
    real_git = nested / ".git"
    os.rename(real_git, ws / "kept-git")
    (nested / ".git").write_text(f"gitdir: {elsewhere / '.git'}\n")
    with capture_logs() as logs:
        take(ws, cache)
        take(ws, cache)  # the same reason, within the interval: said once
    assert len([e for e in logs if e["event"] == "snapshot.nested_not_saved"]) == 1

    (nested / ".git").unlink()
    os.rename(ws / "kept-git", real_git)
    (nested / "readme.md").write_text("saved again\n")
    with capture_logs() as logs:
        snap = take(ws, cache)
    assert [e["path"] for e in logs if e["event"] == "snapshot.nested_saved"] == ["lib"]
    assert cache.not_saved() == {}
    assert "lib/readme.md" in snap.paths


def test_every_line_logged_while_saving_a_nested_repository_names_it(tmp_path):
    ws = make_repo(tmp_path / "ws")
    nested = make_repo(ws / "lib")
    (nested / ".git" / "refs" / "heads" / "broken").write_text("0" * 39 + "1\n")
    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        take(ws)
    said = [e for e in logs if e["event"] == "snapshot.state_not_recorded"]
    assert said and all(e.get("nested_repository") == "lib" for e in said)


def _tampered(tmp_path: Path, paths: list[str]) -> tuple[Path, Path]:
    """A store whose newest generation's nested record names ``paths`` (the store is untrusted:
    watcherd's own repository is rewritten here as an attacker with the store's keys would)."""
    ws = make_repo(tmp_path / "ws")
    make_repo(ws / "lib")
    store = tmp_path / "store"
    save(ws, store)
    repo = state_repo(ws, KEY)
    snap = repo.snapshot_head()
    record = state.nested_parent(repo.bare, snap)
    nested_snap = state.load(repo.bare, snap).nested["lib"]
    forged = state.write_nested(repo.bare, {p: nested_snap for p in paths})
    body = repo.bare.run("cat-file", "commit", snap).stdout.replace(record.encode(),
                                                                    forged.encode())
    tree_line, _, rest = body.partition(b"\n")
    body = tree_line + f"\nparent {snap}\n".encode() + rest  # on top of what the store has
    new = repo.bare.out("hash-object", "-t", "commit", "-w", "--stdin", input=body)
    repo.bare.update_ref("refs/watcherd/snapshots", new, snap, "forged")
    assert Generations(LocalStore(store), KEY).save(repo).status == "saved"
    return ws, store


@pytest.mark.parametrize("path", ["../escaped", "lib/../../escaped", ".git/hooks", "/abs",
                                  "lib/.GIT", ""])
def test_a_nested_record_naming_a_path_out_of_its_place_is_refused(tmp_path, path):
    repo_root = tmp_path / "probe"
    make_repo(repo_root)
    from watcherd.git import Git
    g = Git(repo_root / ".git", home=tmp_path)
    snap = g.out("rev-parse", "HEAD")
    record = state.write_nested(g, {path: snap})
    top = g.out("commit-tree", f"{g.out('rev-parse', 'HEAD^{tree}')}", "-p", record, "-m", "x")
    with pytest.raises(IntegrityError, match="nested.json is malformed"):
        state.load(g, top)


def test_a_nested_record_naming_a_path_the_tree_has_no_gitlink_for_fails_that_generation(
        tmp_path):
    ws, store = _tampered(tmp_path, ["readme.md"])  # a file of the tree, not a gitlink
    target = tmp_path / "restored"
    outcome = restore_into(target, store)
    # The newest generation does not restore; the one before it does, and nothing was written
    # through the forged record.
    assert outcome.generation == 1
    assert (target / "readme.md").read_text() == "hello\n"
    assert not (tmp_path / "escaped").exists()


def test_files_under_a_submodule_whose_git_went_are_named_not_saved_as_git_sees_them(tmp_path):
    # The user's index keeps `lib` as a submodule; with its .git removed, git sees its files in
    # no index (`git status` shows nothing of them): neither does the snapshot, and it says so.
    ws = make_repo(tmp_path / "ws")
    nested = make_repo(ws / "lib")
    git(ws, "add", "lib")  # a gitlink in the user's index
    cache = snapshot.Cache()
    take(ws, cache)
    subprocess.run(["rm", "-rf", str(nested / ".git")], check=True)
    (nested / "new.txt").write_text("in no index\n")

    with capture_logs() as logs:
        snap = take(ws, cache)

    bare = state_repo(ws, KEY).bare
    head = snap.commit or snap.snapshot_head
    assert bare.out("ls-tree", head, "lib").startswith("160000 ")
    assert state.load(bare, head).nested == {}
    warned = [e for e in logs if e["event"] == "snapshot.nested_not_saved"]
    assert [e["path"] for e in warned] == ["lib"] and "git rm --cached lib" in warned[0]["reason"]
    assert "lib" in cache.not_saved()


def test_a_submodule_not_checked_out_is_a_gitlink_and_no_warning(tmp_path):
    lib = make_repo(tmp_path / "lib", "library\n")
    ws = make_repo(tmp_path / "ws")
    git(ws, "-c", "protocol.file.allow=always", "submodule", "add", "-q", str(lib), "lib")
    git(ws, "commit", "-qm", "add lib")
    git(ws, "submodule", "deinit", "-q", "-f", "lib")  # its directory is empty now
    store = tmp_path / "store"

    with capture_logs() as logs:
        cache = snapshot.Cache()
        save(ws, store, cache)

    assert not [e for e in logs if e["log_level"] == "warning"]
    assert cache.not_saved() == {}
    target = tmp_path / "restored"
    restore_into(target, store)
    assert view(target) == view(ws)


def tree_entry(ws: Path, commit: str, path: str) -> str:
    """``<mode> <type> <id>`` of ``path`` in snapshot ``commit`` ("" when it holds none)."""
    out = git(ws.parent, f"--git-dir={state_repo(ws, KEY).git_dir}", "ls-tree", commit, "--", path)
    return out.split("\t")[0]


def commit_all_in(path: Path, message: str) -> None:
    """``git init``, then everything in ``path`` committed: a directory made a repository."""
    git(path, "init", "-q")
    git(path, "add", "-A")
    git(path, "commit", "-qm", message)


def become_a_repository(ws: Path, how: str) -> Path:
    """Make ``ws/proj``, saved as files, a repository with a commit (``how``)."""
    proj = ws / "proj"
    if how == "git-init":
        commit_all_in(proj, "its own history now")
    else:  # a clone of it moved into its place
        clone = ws.parent / "clone"
        make_repo(clone, "cloned\n")
        (clone / "a.txt").write_text("a, cloned\n")
        subprocess.run(["rm", "-rf", str(proj)], check=True)
        os.rename(clone, proj)
    return proj


@pytest.mark.parametrize("watched", [False, True], ids=["full-look", "watcher-hint"])
@pytest.mark.parametrize("how", ["git-init", "moved-in"])
def test_a_directory_saved_as_files_that_becomes_a_repository_is_saved_as_one(
        tmp_path, how, watched):
    """git add keeps updating files its index holds: without a look, a directory saved as files
    stayed saved as files after `git init` and a commit in it (or a clone moved into its place),
    its history in no snapshot. With the watcher's hint (the daemon) only the directories it
    named are looked at; without one, every directory."""
    ws = make_repo(tmp_path / "ws")
    (ws / "proj").mkdir()
    (ws / "proj" / "a.txt").write_text("a\n")
    cache = snapshot.Cache()
    if watched:
        cache.changed(())  # as the daemon's watcher does: after this snapshot, hints only
    first = take(ws, cache)
    assert tree_entry(ws, first.commit, "proj").startswith("040000 tree")
    proj = become_a_repository(ws, how)
    if watched:
        cache.changed(("README-elsewhere.md",))  # a hint that does not name it: not looked at
        unhinted = take(ws, cache).snapshot_head
        assert tree_entry(ws, unhinted, "proj").startswith("040000 tree")
        cache.changed(("proj",))
    with capture_logs() as logs:
        snap = take(ws, cache)

    head = git(proj, "rev-parse", "HEAD")
    assert tree_entry(ws, snap.commit, "proj") == f"160000 commit {head}"
    loaded = state.load(state_repo(ws, KEY).bare, snap.commit)
    assert list(loaded.nested) == ["proj"]
    assert [e["paths"] for e in logs if e["event"] == "snapshot.nested_found"] == [["proj"]]
    store = tmp_path / "store"
    save(ws, store, cache)
    target = tmp_path / "restored" / "ws"
    restore_into(target, store)
    assert view(target / "proj") == view(proj)
    assert files(target) == files(ws)


@pytest.mark.parametrize("how", ["no-commit", "fifo-head", "gitdir-outside", "user-tracks-it"])
def test_a_directory_saved_as_files_keeps_its_files_when_it_cannot_be_saved_as_a_repository(
        tmp_path, how):
    """Only a repository read inside the workspace, with a commit, and whose files the user's
    index does not track, is taken up: otherwise git could not record it (or records the files)
    and every file stays saved, with what it holds now."""
    ws = make_repo(tmp_path / "ws")
    proj = ws / "proj"
    proj.mkdir()
    (proj / "a.txt").write_text("a\n")
    if how == "user-tracks-it":
        git(ws, "add", "proj/a.txt")
    cache = snapshot.Cache()
    take(ws, cache)
    dotgit = proj / ".git"
    if how == "no-commit":
        git(proj, "init", "-q")
    elif how == "fifo-head":
        for d in ("objects", "refs/heads"):
            (dotgit / d).mkdir(parents=True)
        os.mkfifo(dotgit / "HEAD")
    elif how == "gitdir-outside":
        outside = make_repo(tmp_path / "outside")
        dotgit.write_text(f"gitdir: {outside / '.git'}\n")
    else:
        commit_all_in(proj, "inside")
    (proj / "a.txt").write_text("a, edited\n")
    (proj / "b.txt").write_text("b, new\n")

    with capture_logs() as logs:
        snap = take(ws, cache)

    shown = {p: git(ws.parent, f"--git-dir={state_repo(ws, KEY).git_dir}", "show",
                    f"{snap.commit}:proj/{p}") for p in ("a.txt", "b.txt")}
    assert shown == {"a.txt": "a, edited", "b.txt": "b, new"}
    assert tree_entry(ws, snap.commit, "proj").startswith("040000 tree")
    if how == "user-tracks-it":
        # Its history cannot be saved beside the files the user's git tracks: said, and shown.
        assert "index tracks files in it" in cache.not_saved()["proj"]
        assert [e["path"] for e in logs if e["event"] == "snapshot.nested_not_saved"] == ["proj"]
        git(ws, "rm", "-rqf", "--cached", "proj")
        again = take(ws, cache)
        assert tree_entry(ws, again.commit, "proj") == \
            f"160000 commit {git(proj, 'rev-parse', 'HEAD')}"
        assert cache.not_saved() == {}


@pytest.mark.parametrize("second_look", ["unsafe", "gone"])
def test_a_repository_taken_up_that_changes_before_it_is_confirmed_keeps_the_files_saved(
        tmp_path, monkeypatch, second_look):
    """The agent can swap the new repository's .git for one leading outside (or remove it)
    between the look that took it up and the check of what git recorded: the files as last
    saved stay, at their own paths (a tree's entry must never reach the index as one path),
    and the next snapshot looks again."""
    ws = make_repo(tmp_path / "ws")
    (ws / "proj").mkdir()
    (ws / "proj" / "a.txt").write_text("a\n")
    (ws / "proj" / "sub").mkdir()
    (ws / "proj" / "sub" / "b.txt").write_text("b\n")
    cache = snapshot.Cache()
    take(ws, cache)
    proj = become_a_repository(ws, "git-init")
    real = snapshot.ws.nested_head
    looks = []

    def nested_head(top, rel):
        looks.append(rel)
        if rel == "proj" and len(looks) > 1:
            if second_look == "unsafe":
                raise snapshot.ws.Unsafe("proj/.git leads outside the workspace")
            return None
        return real(top, rel)

    monkeypatch.setattr(snapshot.ws, "nested_head", nested_head)
    snap = take(ws, cache)
    monkeypatch.undo()

    listed = git(ws.parent, f"--git-dir={state_repo(ws, KEY).git_dir}", "ls-tree", "-r",
                 "--name-only", snap.snapshot_head)
    assert listed.splitlines() == ["proj/a.txt", "proj/sub/b.txt", "readme.md"]
    again = take(ws, cache)
    assert tree_entry(ws, again.commit, "proj") == \
        f"160000 commit {git(proj, 'rev-parse', 'HEAD')}"


def test_a_directory_of_a_nested_repository_that_becomes_one_is_saved_as_one_at_its_level(
        tmp_path):
    """The watcher reports a change inside a nested repository as the repository's path: that
    repository's next snapshot looks at its own directories."""
    ws = make_repo(tmp_path / "ws")
    lib = make_repo(ws / "lib")
    (lib / "sub").mkdir()
    (lib / "sub" / "s.txt").write_text("s\n")
    cache = snapshot.Cache()
    cache.changed(())
    take(ws, cache)
    commit_all_in(lib / "sub", "sub's own")
    cache.changed(("lib",))

    snap = take(ws, cache)

    lib_snapshot = state.load(state_repo(ws, KEY).bare, snap.commit).nested["lib"]
    assert tree_entry(ws, lib_snapshot, "sub") == \
        f"160000 commit {git(lib / 'sub', 'rev-parse', 'HEAD')}"


@pytest.mark.parametrize("user_tracks", [True, False])
def test_the_first_snapshot_sees_a_repository_in_a_directory_the_users_head_holds_as_files(
        tmp_path, user_tracks):
    """The first snapshot's index starts from the user's HEAD: a directory it holds as files
    that is a repository now is looked at then too, so a repository the user's index tracks as
    files is named at once, and one it no longer tracks is saved as a repository."""
    ws = make_repo(tmp_path / "ws")
    (ws / "proj").mkdir()
    (ws / "proj" / "a.txt").write_text("a\n")
    git(ws, "add", "proj")
    git(ws, "commit", "-qm", "proj as files")
    commit_all_in(ws / "proj", "its own")
    if not user_tracks:
        git(ws, "rm", "-rq", "--cached", "proj")
    cache = snapshot.Cache()

    snap = take(ws, cache)

    entry = tree_entry(ws, snap.commit, "proj")
    if user_tracks:
        assert entry.startswith("040000 tree")
        assert list(cache.not_saved()) == ["proj"]
    else:
        assert entry == f"160000 commit {git(ws / 'proj', 'rev-parse', 'HEAD')}"
        assert cache.not_saved() == {}


@pytest.mark.parametrize("bound", ["depth", "count"])
def test_a_directory_that_becomes_a_repository_past_the_bounds_keeps_its_files(
        tmp_path, monkeypatch, bound):
    """A repository the nested snapshots could not save (nested deeper than
    MAX_NESTED_DEPTH, or past MAX_NESTED in the workspace) is not taken up: its files stay
    saved, with what they hold now, rather than a gitlink with nothing behind it."""
    ws = make_repo(tmp_path / "ws")
    at = ws
    if bound == "depth":
        for i in range(1, state.MAX_NESTED_DEPTH + 1):
            at = make_repo(at / f"lib{i}", f"level {i}\n")
    else:
        monkeypatch.setattr(state, "MAX_NESTED", 3)
        for i in range(3):
            make_repo(ws / f"repo{i}", f"r{i}\n")
    proj = at / "zz-proj"
    proj.mkdir()
    (proj / "a.txt").write_text("saved as a file\n")
    store = tmp_path / "store"
    cache = snapshot.Cache()
    save(ws, store, cache)
    commit_all_in(proj, "its own history")
    (proj / "a.txt").write_text("edited after git init\n")

    save(ws, store, cache)

    target = tmp_path / "restored" / "ws"
    restore_into(target, store)
    assert (target / proj.relative_to(ws) / "a.txt").read_text() == "edited after git init\n"


def test_a_repository_that_loses_its_commit_after_it_is_taken_up_keeps_the_files_saved(
        tmp_path, monkeypatch):
    """HEAD becomes unborn between the look that took the directory up and git's add: git
    records neither a gitlink nor the files; the files as last saved are put back, and stay."""
    ws = make_repo(tmp_path / "ws")
    proj = ws / "proj"
    proj.mkdir()
    (proj / "a.txt").write_text("a\n")
    cache = snapshot.Cache()
    take(ws, cache)
    become_a_repository(ws, "git-init")
    real = snapshot._take_up_new_repositories

    def then_unborn(*args, **kwargs):
        taken = real(*args, **kwargs)
        (proj / ".git" / "HEAD").write_text("ref: refs/heads/unborn\n")
        return taken

    monkeypatch.setattr(snapshot, "_take_up_new_repositories", then_unborn)
    first = take(ws, cache)
    monkeypatch.undo()
    again = take(ws, cache)

    for snap in (first, again):
        shown = git(ws.parent, f"--git-dir={state_repo(ws, KEY).git_dir}", "show",
                    f"{snap.snapshot_head}:proj/a.txt")
        assert shown == "a"


def test_a_directory_holding_a_saved_nested_repository_taken_up_keeps_everything(tmp_path):
    """d/ is saved as files and holds a saved nested repository d/e; git init and a commit in d
    make d a repository holding e: d is saved as one, and e's gitlink is not given back inside
    it (e is d's own nested repository now): nothing of either is lost."""
    ws = make_repo(tmp_path / "ws")
    d = ws / "d"
    d.mkdir()
    (d / "a.txt").write_text("d's own\n")
    make_repo(d / "e", "e's file\n")
    store = tmp_path / "store"
    cache = snapshot.Cache()
    save(ws, store, cache)
    commit_all_in(d, "d has a history now")
    (ws / "later.txt").write_text("later\n")

    snap = save(ws, store, cache)

    assert tree_entry(ws, snap.snapshot_head, "d") == f"160000 commit {git(d, 'rev-parse', 'HEAD')}"
    target = tmp_path / "restored" / "ws"
    restore_into(target, store)
    assert (target / "d" / "a.txt").read_text() == "d's own\n"
    assert (target / "d" / "e" / "readme.md").read_text() == "e's file\n"
    assert (target / "later.txt").exists()


def test_gitlinks_survive_a_snapshot_whose_add_failed(tmp_path, monkeypatch):
    """The gitlinks are out of the private index while git adds: when the add fails, they are
    given back all the same, so a nested repository git cannot record at the next snapshot
    (on an unborn branch) keeps its last gitlink, and is saved."""
    ws = make_repo(tmp_path / "ws")
    nested = make_repo(ws / "proj")
    cache = snapshot.Cache()
    first = take(ws, cache)

    def failing(*args, **kwargs):
        raise snapshot.GitError("git add failed (a full disk)")

    monkeypatch.setattr(snapshot, "_add_all", failing)
    with pytest.raises(snapshot.GitError):
        take(ws, cache)
    monkeypatch.undo()
    git(nested, "checkout", "-q", "--orphan", "unborn")
    (ws / "later.txt").write_text("later\n")

    snap = take(ws, cache)

    assert tree_entry(ws, snap.commit, "proj") == tree_entry(ws, first.commit, "proj")
    assert "proj" in state.load(state_repo(ws, KEY).bare, snap.commit).nested


@pytest.mark.parametrize("dead", ["dangling-gitfile", "empty-dir", "junk-file"])
def test_a_nested_repository_whose_git_is_no_repository_any_more_is_saved_as_files(
        tmp_path, dead):
    """Its .git stays but is no repository to git (a submodule's gitfile whose directory went,
    an emptied .git, a junk file): git sees its files as the workspace's, and so do the
    snapshots: later edits in it are saved."""
    ws = make_repo(tmp_path / "ws")
    nested = make_repo(ws / "proj")
    cache = snapshot.Cache()
    take(ws, cache)
    subprocess.run(["rm", "-rf", str(nested / ".git")], check=True)
    if dead == "dangling-gitfile":
        (nested / ".git").write_text("gitdir: ../.git/modules/gone\n")
    elif dead == "empty-dir":
        (nested / ".git").mkdir()
    else:
        (nested / ".git").write_text("not a repository\n")
    (nested / "readme.md").write_text("edited later\n")

    snap = take(ws, cache)

    shown = git(ws.parent, f"--git-dir={state_repo(ws, KEY).git_dir}", "show",
                f"{snap.commit}:proj/readme.md")
    assert shown == "edited later"
