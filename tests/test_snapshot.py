"""Snapshots against real repositories: what a shadow or branch snapshot records, and what it leaves
alone (the user's HEAD, index, branches, stash and working tree)."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from helpers import git
from watcherd import snapshot
from watcherd.errors import GitError, WorkspaceError
from watcherd.git import Git

REF = snapshot.SNAPSHOT_REF


def make_repo(path: Path) -> Path:
    path.mkdir()
    git(path, "init", "-q")
    (path / "readme.md").write_text("hello\n")
    (path / "gone.txt").write_text("to be deleted\n")
    (path / "run.sh").write_text("#!/bin/sh\necho hi\n")
    git(path, "add", "-A")
    git(path, "commit", "-q", "-m", "initial")
    return path


def ls_tree(path: Path, commit: str) -> dict[str, str]:
    """path -> mode for every file in ``commit``."""
    out = git(path, "ls-tree", "-r", "-z", commit)
    entries = {}
    for line in filter(None, out.split("\0")):
        meta, name = line.split("\t", 1)
        entries[name] = meta.split()[0]
    return entries


def parents(path: Path, commit: str) -> list[str]:
    return git(path, "rev-list", "--parents", "-n", "1", commit).split()[1:]


def porcelain_status(path: Path) -> str:
    # GIT_OPTIONAL_LOCKS=0: the check itself must not refresh (rewrite) the index it compares.
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}
    return subprocess.run(["git", "status", "--porcelain=v2", "--branch", "--untracked-files=all"],
                          cwd=path, env=env, capture_output=True, check=True, text=True).stdout


def user_state(path: Path) -> dict[str, object]:
    return {
        "status": porcelain_status(path),
        "index": (path / ".git" / "index").read_bytes(),
        "head": (path / ".git" / "HEAD").read_bytes(),
        "refs": git(path, "for-each-ref", "--format=%(refname) %(objectname)",
                    "refs/heads", "refs/tags", "refs/stash"),
        "stash": git(path, "stash", "list"),
    }


# -- shadow mode --------------------------------------------------------------------------------------


def test_shadow_snapshot_records_the_whole_tree_and_leaves_the_user_state_alone(tmp_path):
    ws = make_repo(tmp_path / "ws")
    git(ws, "branch", "feature")
    (ws / "stashed.txt").write_text("stash me\n")
    git(ws, "add", "stashed.txt")
    git(ws, "stash", "-q")
    (ws / "run.sh").chmod(0o755)  # exec bit flipped, not committed
    (ws / "gone.txt").unlink()  # tracked file deleted
    (ws / "readme.md").write_text("hello, edited\n")  # modified and staged
    git(ws, "add", "readme.md")
    (ws / "new dir").mkdir()
    (ws / "new dir" / "untracked é.txt").write_text("untracked\n")
    os.symlink("readme.md", ws / "link")
    head = git(ws, "rev-parse", "HEAD")
    before = user_state(ws)
    tree_before = {p.name for p in ws.iterdir()}

    snap = snapshot.take(Git(ws))

    assert snap.commit and snap.commit == git(ws, "rev-parse", REF)
    assert snap.head == head and snap.head_ref == "refs/heads/main"
    assert user_state(ws) == before
    assert {p.name for p in ws.iterdir()} == tree_before
    files = ls_tree(ws, snap.commit)
    assert files == {"readme.md": "100644", "run.sh": "100755", "new dir/untracked é.txt": "100644",
                     "link": "120000"}
    assert git(ws, "show", f"{snap.commit}:readme.md") == "hello, edited"
    assert git(ws, "cat-file", "-p", f"{snap.commit}:link") == "readme.md"
    # The first snapshot has only HEAD as parent: there is no previous snapshot yet.
    assert parents(ws, snap.commit) == [head]


def test_second_shadow_snapshot_has_the_previous_snapshot_and_head_as_parents(tmp_path):
    ws = make_repo(tmp_path / "ws")
    first = snapshot.take(Git(ws))
    (ws / "readme.md").write_text("second\n")
    second = snapshot.take(Git(ws))
    assert second.commit and second.commit != first.commit
    assert parents(ws, second.commit) == [first.commit, git(ws, "rev-parse", "HEAD")]
    assert second.paths == ("readme.md",)


def test_shadow_snapshot_without_a_change_makes_no_commit(tmp_path):
    ws = make_repo(tmp_path / "ws")
    (ws / "readme.md").write_text("edited\n")
    first = snapshot.take(Git(ws))
    again = snapshot.take(Git(ws))
    assert first.commit
    assert again.commit is None
    assert again.snapshot_head == first.commit == git(ws, "rev-parse", REF)


def test_user_commit_of_the_same_tree_gives_a_snapshot_whose_second_parent_is_the_new_head(tmp_path):
    ws = make_repo(tmp_path / "ws")
    (ws / "readme.md").write_text("edited\n")
    first = snapshot.take(Git(ws))
    git(ws, "commit", "-q", "-am", "the user's own commit")
    new_head = git(ws, "rev-parse", "HEAD")

    snap = snapshot.take(Git(ws))

    assert snap.commit
    assert git(ws, "rev-parse", f"{snap.commit}^{{tree}}") == git(ws, "rev-parse", f"{first.commit}^{{tree}}")
    assert parents(ws, snap.commit) == [first.commit, new_head]
    assert f"HEAD: {new_head}" in git(ws, "log", "-1", "--format=%B", snap.commit)


def test_snapshot_message_counts_files_and_truncates_the_path_list_beyond_50(tmp_path):
    ws = make_repo(tmp_path / "ws")
    snapshot.take(Git(ws))
    for i in range(60):
        (ws / f"f{i:02d}.txt").write_text(f"{i}\n")

    snap = snapshot.take(Git(ws))

    lines = git(ws, "log", "-1", "--format=%B", snap.commit).splitlines()
    assert lines[0] == "watcherd: snapshot (60 files)"
    listed = [line for line in lines if line.startswith("f") and line.endswith(".txt")]
    assert listed == [f"f{i:02d}.txt" for i in range(50)]
    assert "... and 10 more" in lines


def test_snapshot_leaves_out_what_git_ignores(tmp_path):
    ws = make_repo(tmp_path / "ws")
    (ws / ".gitignore").write_text("node_modules/\n")
    (ws / "node_modules" / "pkg").mkdir(parents=True)
    (ws / "node_modules" / "pkg" / "index.js").write_text("x\n")
    (ws / "sub").mkdir()
    (ws / "sub" / ".gitignore").write_text("*.log\n")
    (ws / "sub" / "debug.log").write_text("noise\n")
    (ws / "sub" / "code.py").write_text("print()\n")
    (ws / ".git" / "info" / "exclude").write_text("secret.env\n")
    (ws / "secret.env").write_text("TOKEN=1\n")

    snap = snapshot.take(Git(ws))

    files = set(ls_tree(ws, snap.commit))
    assert {".gitignore", "sub/.gitignore", "sub/code.py", "readme.md"} <= files
    assert not {"node_modules/pkg/index.js", "sub/debug.log", "secret.env"} & files


def test_stale_watcherd_locks_left_by_a_killed_process_do_not_block_the_next_snapshot(tmp_path):
    ws = make_repo(tmp_path / "ws")
    snapshot.take(Git(ws))
    (ws / "readme.md").write_text("after a crash\n")
    (ws / ".git" / "watcherd" / "index.lock").write_text("")
    (ws / ".git" / "refs" / "watcherd" / "snapshots.lock").write_text("")

    with capture_logs() as logs:
        snap = snapshot.take(Git(ws))

    assert snap.commit == git(ws, "rev-parse", REF)
    assert not (ws / ".git" / "watcherd" / "index.lock").exists()
    assert not (ws / ".git" / "refs" / "watcherd" / "snapshots.lock").exists()
    assert sum(e["event"] == "snapshot.stale_lock_removed" for e in logs) == 2


# -- workspaces that are not (yet) a repository -------------------------------------------------------


def test_a_directory_that_is_not_a_repository_is_initialised_and_snapshotted(tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "app.py").write_text("print('hi')\n")
    g = Git(ws)
    snapshot.ensure_workspace(ws, g)
    assert (ws / ".git").is_dir()
    snap = snapshot.take(g)
    assert set(ls_tree(ws, snap.commit)) == {"app.py"}


def test_an_empty_repository_without_head_is_snapshotted_without_parents(tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    git(ws, "init", "-q")
    g = Git(ws)
    assert snapshot.take(g).commit is None  # nothing at all yet: nothing to record
    (ws / "first.txt").write_text("1\n")

    snap = snapshot.take(g)

    assert snap.commit and snap.head is None and snap.head_ref == "refs/heads/main"
    assert parents(ws, snap.commit) == []
    assert set(ls_tree(ws, snap.commit)) == {"first.txt"}
    assert git(ws, "status", "--porcelain") == "?? first.txt"  # still untracked for the user


def test_a_missing_workspace_is_an_error_naming_the_path(tmp_path):
    ws = tmp_path / "nowhere"
    with pytest.raises(WorkspaceError, match=str(ws)):
        snapshot.ensure_workspace(ws, Git(ws))
    assert not ws.exists()


def test_a_workspace_that_is_a_file_is_an_error_naming_the_path(tmp_path):
    ws = tmp_path / "file"
    ws.write_text("not a directory")
    with pytest.raises(WorkspaceError, match=f"{ws} is not a directory"):
        snapshot.ensure_workspace(ws, Git(ws))
    assert ws.read_text() == "not a directory"


# -- branch mode -------------------------------------------------------------------------------------


def test_branch_mode_commits_everything_on_the_current_branch(tmp_path):
    ws = make_repo(tmp_path / "ws")
    old = git(ws, "rev-parse", "HEAD")
    (ws / "readme.md").write_text("edited\n")
    (ws / "new.txt").write_text("new\n")
    (ws / "gone.txt").unlink()

    snap = snapshot.take(Git(ws), "branch")

    assert snap.commit == git(ws, "rev-parse", "refs/heads/main") != old
    assert parents(ws, snap.commit) == [old]
    assert git(ws, "status", "--porcelain") == ""
    assert git(ws, "log", "-1", "--format=%s").startswith("watcherd: snapshot (3 files)")
    assert snapshot.take(Git(ws), "branch").commit is None
    # branch mode records each HEAD on the snapshot ref too, so the store can move forward
    # after the user's reset or rebase
    assert parents(ws, git(ws, "rev-parse", REF)) == [snap.commit]


def _hold_lock(ws: Path):
    """A fresh ``index.lock`` held open, as a user's running ``git commit`` would hold it."""
    lock = ws / ".git" / "index.lock"
    fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    return lock, fd


def test_branch_mode_waits_for_a_held_index_lock_and_commits_after_its_release(tmp_path):
    ws = make_repo(tmp_path / "ws")
    (ws / "readme.md").write_text("edited while the user's git runs\n")
    lock, fd = _hold_lock(ws)
    released = threading.Event()

    def release() -> None:
        os.close(fd)
        lock.unlink()
        released.set()

    timer = threading.Timer(0.4, release)
    timer.start()
    try:
        snap = snapshot.take(Git(ws), "branch")
    finally:
        timer.cancel()
    assert released.is_set()  # it could only have committed after the user's git let go
    assert snap.commit == git(ws, "rev-parse", "HEAD")
    assert git(ws, "status", "--porcelain") == ""


def test_branch_mode_removes_a_stale_index_lock_nobody_holds(tmp_path):
    ws = make_repo(tmp_path / "ws")
    (ws / "readme.md").write_text("edited after a crashed git\n")
    lock = ws / ".git" / "index.lock"
    lock.write_text("")
    old = time.time() - 3600
    os.utime(lock, (old, old))

    with capture_logs() as logs:
        snap = snapshot.take(Git(ws), "branch")

    assert snap.commit == git(ws, "rev-parse", "HEAD")
    assert not lock.exists()
    assert any(e["event"] == "snapshot.stale_lock_removed" and e["lock"] == str(lock) for e in logs)


def test_branch_mode_keeps_an_old_lock_that_a_process_still_holds(tmp_path):
    ws = make_repo(tmp_path / "ws")
    lock, fd = _hold_lock(ws)
    try:
        old = time.time() - 3600
        os.utime(lock, (old, old))
        assert snapshot.remove_stale_lock(lock) is False
        assert lock.exists()
    finally:
        os.close(fd)
    assert snapshot.remove_stale_lock(lock) is True
    assert not lock.exists()


def test_branch_mode_gives_up_with_a_clear_error_when_the_lock_is_never_released(tmp_path):
    ws = make_repo(tmp_path / "ws")
    (ws / "readme.md").write_text("edited\n")
    lock, fd = _hold_lock(ws)
    head = git(ws, "rev-parse", "HEAD")
    started = time.monotonic()
    try:
        with pytest.raises(GitError, match="index.lock"):
            snapshot.take(Git(ws), "branch")
    finally:
        os.close(fd)
    assert time.monotonic() - started < 30
    assert lock.exists()  # a lock someone holds is never taken away from them
    assert git(ws, "rev-parse", "HEAD") == head


# -- the workspace's config must not run code through watcherd ---------------------------------------


@pytest.mark.parametrize("mode", ["shadow", "branch"])
def test_a_filter_driver_from_the_workspace_config_is_never_run_and_bytes_are_kept(tmp_path, mode):
    ws = make_repo(tmp_path / "ws")
    marker = tmp_path / "filter-ran"
    git(ws, "config", "filter.evil.clean", f"touch {marker}; tr a-z A-Z")
    git(ws, "config", "filter.evil.required", "true")
    (ws / ".gitattributes").write_text("*.txt filter=evil\n")
    (ws / "notes.txt").write_text("lower case stays lower case\n")

    snap = snapshot.take(Git(ws), mode)

    assert not marker.exists()
    assert git(ws, "show", f"{snap.commit}:notes.txt") == "lower case stays lower case"


def test_signing_config_in_the_workspace_does_not_run_a_gpg_program(tmp_path):
    ws = make_repo(tmp_path / "ws")
    marker = tmp_path / "gpg-ran"
    fake_gpg = tmp_path / "gpg"
    fake_gpg.write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
    fake_gpg.chmod(0o755)
    git(ws, "config", "commit.gpgSign", "true")
    git(ws, "config", "gpg.program", str(fake_gpg))
    (ws / "new.txt").write_text("x\n")

    snap = snapshot.take(Git(ws), "shadow")

    assert snap.commit and not marker.exists()
