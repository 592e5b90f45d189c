"""Snapshots against real repositories: what a shadow or branch snapshot records, and what it leaves
alone (the user's HEAD, index, branches, stash and working tree). The snapshots live in watcherd's
own repository in the state directory beside each workspace (``helpers.state_repo``)."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from helpers import git, sgit, state_repo
from watcherd import snapshot, state
from watcherd.errors import GitError, WorkspaceError
from watcherd.repo import SNAPSHOT_REF as REF


def take(ws: Path, mode: str = "shadow") -> snapshot.Snapshot:
    repo = state_repo(ws)
    snapshot.prepare(repo)
    return snapshot.take(repo, mode)


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
    """path -> mode for every file in ``commit`` (of watcherd's repository for ``path``)."""
    out = sgit(path, "ls-tree", "-r", "-z", commit)
    entries = {}
    for line in filter(None, out.split("\0")):
        meta, name = line.split("\t", 1)
        entries[name] = meta.split()[0]
    return entries


def parents(path: Path, commit: str) -> list[str]:
    """A snapshot's parents, its state commit (the last one) left out."""
    found = sgit(path, "rev-list", "--parents", "-n", "1", commit).split()[1:]
    s_commit = state.state_parent(state_repo(path).bare, commit)
    assert s_commit is not None and found[-1] == s_commit
    return found[:-1]


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

    snap = take(ws)

    assert snap.commit and snap.commit == sgit(ws, "rev-parse", REF)
    assert snap.head == head and snap.head_ref == "refs/heads/main"
    assert user_state(ws) == before
    assert {p.name for p in ws.iterdir()} == tree_before
    files = ls_tree(ws, snap.commit)
    assert files == {"readme.md": "100644", "run.sh": "100755", "new dir/untracked é.txt": "100644",
                     "link": "120000"}
    assert sgit(ws, "show", f"{snap.commit}:readme.md") == "hello, edited"
    assert sgit(ws, "cat-file", "-p", f"{snap.commit}:link") == "readme.md"
    assert not (ws / ".git" / "watcherd").exists()  # nothing of watcherd's in the workspace
    # The first snapshot has only HEAD as parent: there is no previous snapshot yet.
    assert parents(ws, snap.commit) == [head]


def test_second_shadow_snapshot_has_the_previous_snapshot_and_head_as_parents(tmp_path):
    ws = make_repo(tmp_path / "ws")
    first = take(ws)
    (ws / "readme.md").write_text("second\n")
    second = take(ws)
    assert second.commit and second.commit != first.commit
    assert parents(ws, second.commit) == [first.commit, git(ws, "rev-parse", "HEAD")]
    assert second.paths == ("readme.md",)


def test_shadow_snapshot_without_a_change_makes_no_commit(tmp_path):
    ws = make_repo(tmp_path / "ws")
    (ws / "readme.md").write_text("edited\n")
    first = take(ws)
    again = take(ws)
    assert first.commit
    assert again.commit is None
    assert again.snapshot_head == first.commit == sgit(ws, "rev-parse", REF)


def test_user_commit_of_the_same_tree_gives_a_snapshot_whose_second_parent_is_the_new_head(tmp_path):
    ws = make_repo(tmp_path / "ws")
    (ws / "readme.md").write_text("edited\n")
    first = take(ws)
    git(ws, "commit", "-q", "-am", "the user's own commit")
    new_head = git(ws, "rev-parse", "HEAD")

    snap = take(ws)

    assert snap.commit
    assert sgit(ws, "rev-parse", f"{snap.commit}^{{tree}}") == \
        sgit(ws, "rev-parse", f"{first.commit}^{{tree}}")
    assert parents(ws, snap.commit) == [first.commit, new_head]
    assert f"HEAD: {new_head}" in sgit(ws, "log", "-1", "--format=%B", snap.commit)


def test_a_snapshot_lists_exactly_the_paths_that_changed_since_the_previous_one(tmp_path):
    # Read from the private index while its tree is written (two gits at once): the same list
    # as a diff of the two snapshots' trees, whatever the kind of change.
    ws = make_repo(tmp_path / "ws")
    (ws / "sub").mkdir()
    (ws / "sub" / "kept.txt").write_text("kept\n")
    first = take(ws)
    (ws / "gone.txt").unlink()
    (ws / "run.sh").chmod(0o755)
    (ws / "readme.md").unlink()
    (ws / "readme.md").symlink_to("sub/kept.txt")
    (ws / "sub" / "new file.txt").write_text("new\n")
    (ws / "sub" / "kept.txt").write_text("changed\n")

    snap = take(ws)

    changed = sgit(ws, "diff-tree", "-r", "--name-only", "-z", first.commit, snap.commit)
    assert list(snap.paths) == [p for p in changed.split("\0") if p]
    assert set(snap.paths) == {"gone.txt", "run.sh", "readme.md", "sub/kept.txt",
                               "sub/new file.txt"}
    assert snap.files == 5


def test_snapshot_message_counts_files_and_truncates_the_path_list_beyond_50(tmp_path):
    ws = make_repo(tmp_path / "ws")
    take(ws)
    for i in range(60):
        (ws / f"f{i:02d}.txt").write_text(f"{i}\n")

    snap = take(ws)

    lines = sgit(ws, "log", "-1", "--format=%B", snap.commit).splitlines()
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

    snap = take(ws)

    files = set(ls_tree(ws, snap.commit))
    assert {".gitignore", "sub/.gitignore", "sub/code.py", "readme.md"} <= files
    assert not {"node_modules/pkg/index.js", "sub/debug.log", "secret.env"} & files


def test_stale_watcherd_locks_left_by_a_killed_process_do_not_block_the_next_snapshot(tmp_path):
    ws = make_repo(tmp_path / "ws")
    take(ws)
    (ws / "readme.md").write_text("after a crash\n")
    repo = state_repo(ws)
    (repo.dir / "index.lock").write_text("")
    (repo.git_dir / "refs" / "watcherd").mkdir(parents=True, exist_ok=True)
    (repo.git_dir / "refs" / "watcherd" / "snapshots.lock").write_text("")

    with capture_logs() as logs:
        snap = take(ws)

    assert snap.commit == sgit(ws, "rev-parse", REF)
    assert not (repo.dir / "index.lock").exists()
    assert not (repo.git_dir / "refs" / "watcherd" / "snapshots.lock").exists()
    assert sum(e["event"] == "state.stale_lock_removed" for e in logs) == 2


def test_snapshot_ref_is_written_as_git_writes_it(tmp_path):
    # After the first snapshot, watcherd replaces the ref's file itself (a git process saved):
    # git must read the very same ref, with the same file mode, and no reflog, as update-ref
    # writes none with core.logAllRefUpdates = false.
    ws = make_repo(tmp_path / "ws")
    repo = state_repo(ws)
    take(ws)
    path = repo.git_dir / REF
    mode = path.stat().st_mode & 0o777
    for i in range(3):
        (ws / "readme.md").write_text(f"edit {i}\n")
        snap = take(ws)
        assert snap.commit and snap.snapshot_head == snap.commit
        assert path.read_text() == f"{snap.commit}\n"
        assert sgit(ws, "rev-parse", "--verify", REF) == snap.commit
    assert path.stat().st_mode & 0o777 == mode
    assert sgit(ws, "for-each-ref", "--format=%(refname)", "refs/watcherd/") == REF
    assert not path.with_name("snapshots.lock").exists()
    assert not (repo.git_dir / "logs" / REF).exists()
    sgit(ws, "fsck", "--no-dangling")


def test_a_reflog_of_the_snapshot_ref_keeps_growing(tmp_path):
    # None is written by default; one that exists (an operator's, an older repository's) is
    # appended to, as git would.
    ws = make_repo(tmp_path / "ws")
    take(ws)
    reflog = state_repo(ws).git_dir / "logs" / REF
    reflog.parent.mkdir(parents=True)
    reflog.touch()  # git appends to a reflog that exists, whatever logAllRefUpdates says
    for i in range(2):
        (ws / "readme.md").write_text(f"edit {i}\n")
        take(ws)
    log = sgit(ws, "reflog", "show", "--format=%H %gs", REF).splitlines()
    assert log == [f"{sgit(ws, 'rev-parse', f'{REF}~{n}')} watcherd: snapshot" for n in (0, 1)]


def test_the_snapshot_ref_moves_only_from_the_value_expected_and_never_past_a_held_lock(tmp_path):
    ws = make_repo(tmp_path / "ws")
    first = take(ws)
    (ws / "readme.md").write_text("edited\n")
    second = take(ws)
    repo = state_repo(ws)
    path = repo.git_dir / REF
    lock = path.with_name("snapshots.lock")

    with pytest.raises(GitError, match="expected"):
        repo.move_snapshot_head(first.commit, first.commit, "stale expectation")
    assert path.read_text() == f"{second.commit}\n"
    assert not lock.exists()

    lock.write_text("another writer's\n")  # a git update-ref holding the ref right now
    with pytest.raises(GitError, match="another process"):
        repo.move_snapshot_head(first.commit, second.commit, "must wait")
    assert lock.read_text() == "another writer's\n"  # theirs: left alone
    assert path.read_text() == f"{second.commit}\n"


@pytest.mark.parametrize("odd", ["an empty directory where the ref goes",
                                 "the ref packed, refs/watcherd/ gone"])
def test_a_snapshot_ref_git_can_update_is_updated_whatever_its_file_looks_like(tmp_path, odd):
    # watcherd writes the ref's file itself where it can; where the file is not a plain loose
    # ref it leaves the update to git, as before, rather than fail every snapshot for good.
    ws = make_repo(tmp_path / "ws")
    take(ws)
    ref = state_repo(ws).git_dir / REF
    if odd.startswith("an empty directory"):
        sgit(ws, "update-ref", "-d", REF)
        ref.mkdir()
    else:
        sgit(ws, "pack-refs", "--all", "--prune")
        if ref.parent.exists():
            ref.parent.rmdir()
    (ws / "readme.md").write_text("edited\n")

    snap = take(ws)

    assert snap.commit and sgit(ws, "rev-parse", "--verify", REF) == snap.commit


def test_a_ref_lock_a_killed_watcherd_left_is_cleared_before_the_first_snapshot(tmp_path):
    # prepare() may set the history aside (another workspace directory's): under the lock,
    # which clears the lock file a killed restore or snapshot left.
    ws = make_repo(tmp_path / "ws")
    first = take(ws)
    repo = state_repo(ws)
    (repo.dir / "pairing.json").write_text('{"path": "/elsewhere", "device": 0, "inode": 0}')
    (repo.git_dir / f"{REF}.lock").write_text("left by a kill -9\n")

    snapshot.prepare(repo)

    assert sgit(ws, "for-each-ref", "--format=%(objectname)", "refs/watcherd/previous/") \
        == first.commit
    assert not (repo.git_dir / f"{REF}.lock").exists()


# -- workspaces that are not (yet) a repository -------------------------------------------------------


def test_a_directory_that_is_not_a_repository_is_snapshotted_and_left_as_it_is(tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "app.py").write_text("print('hi')\n")
    snap = take(ws)
    assert not (ws / ".git").exists()  # shadow mode never writes the workspace
    assert set(ls_tree(ws, snap.commit)) == {"app.py"}
    assert snap.head is None and snap.head_ref is None
    assert sgit(ws, "rev-list", "--parents", "-n", "1", snap.commit).split()[1:] == []


def test_an_empty_repository_without_head_is_snapshotted_with_its_unborn_branch(tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    git(ws, "init", "-q")
    assert take(ws).commit is not None  # the state: an unborn branch
    (ws / "first.txt").write_text("1\n")

    snap = take(ws)

    assert snap.commit and snap.head is None and snap.head_ref == "refs/heads/main"
    assert len(parents(ws, snap.commit)) == 1  # the previous snapshot; no HEAD commit yet
    assert set(ls_tree(ws, snap.commit)) == {"first.txt"}
    assert git(ws, "status", "--porcelain") == "?? first.txt"  # still untracked for the user


def test_a_missing_workspace_is_an_error_naming_the_path(tmp_path):
    ws = tmp_path / "nowhere"
    with pytest.raises(WorkspaceError, match=str(ws)):
        take(ws)
    assert not ws.exists()


def test_a_workspace_that_is_a_file_is_an_error_naming_the_path(tmp_path):
    ws = tmp_path / "file"
    ws.write_text("not a directory")
    with pytest.raises(WorkspaceError, match=f"{ws} does not exist or is not a directory"):
        take(ws)
    assert ws.read_text() == "not a directory"


# -- branch mode -------------------------------------------------------------------------------------


def test_branch_mode_commits_everything_on_the_current_branch(tmp_path):
    ws = make_repo(tmp_path / "ws")
    old = git(ws, "rev-parse", "HEAD")
    (ws / "readme.md").write_text("edited\n")
    (ws / "new.txt").write_text("new\n")
    (ws / "gone.txt").unlink()

    snap = take(ws, "branch")

    new = git(ws, "rev-parse", "refs/heads/main")
    assert new != old and snap.head == new
    assert git(ws, "rev-list", "--parents", "-n", "1", new).split()[1:] == [old]
    assert git(ws, "status", "--porcelain") == ""
    assert git(ws, "log", "-1", "--format=%s").startswith("watcherd: snapshot (3 files)")
    assert take(ws, "branch").commit is None
    # branch mode records each HEAD on the snapshot history too, so the store can move forward
    # after the user's reset or rebase
    assert parents(ws, snap.commit) == [new]


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
        snap = take(ws, "branch")
    finally:
        timer.cancel()
    assert released.is_set()  # it could only have committed after the user's git let go
    assert snap.head == git(ws, "rev-parse", "HEAD")
    assert git(ws, "status", "--porcelain") == ""


def test_branch_mode_removes_a_stale_index_lock_nobody_holds(tmp_path):
    ws = make_repo(tmp_path / "ws")
    (ws / "readme.md").write_text("edited after a crashed git\n")
    lock = ws / ".git" / "index.lock"
    lock.write_text("")
    old = time.time() - 3600
    os.utime(lock, (old, old))

    with capture_logs() as logs:
        snap = take(ws, "branch")

    assert snap.head == git(ws, "rev-parse", "HEAD")
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
            take(ws, "branch")
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

    snap = take(ws, mode)

    assert not marker.exists()
    assert sgit(ws, "show", f"{snap.commit}:notes.txt") == "lower case stays lower case"


def test_signing_config_in_the_workspace_does_not_run_a_gpg_program(tmp_path):
    ws = make_repo(tmp_path / "ws")
    marker = tmp_path / "gpg-ran"
    fake_gpg = tmp_path / "gpg"
    fake_gpg.write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
    fake_gpg.chmod(0o755)
    git(ws, "config", "commit.gpgSign", "true")
    git(ws, "config", "gpg.program", str(fake_gpg))
    (ws / "new.txt").write_text("x\n")

    snap = take(ws, "shadow")

    assert snap.commit and not marker.exists()


@pytest.mark.parametrize("name, email", [("watcherd", "watcherd@localhost"),
                                         (" Ada, Lovelace. ", "ada@example.org;"),
                                         ("Zoë “the agent”", "z@exämple.org")])
@pytest.mark.parametrize("tz", ["UTC", "Asia/Kolkata", "America/St_Johns"])
def test_a_commit_watcherd_writes_itself_is_the_one_git_commit_tree_writes(
        tmp_path, monkeypatch, name, email, tz):
    """A snapshot's commit is written without starting git (Repo.commit_tree): byte for byte
    what ``git commit-tree`` writes for the same tree, parents, message, identity and moment,
    in every time zone, with names git trims; and git's fsck finds nothing wrong with it."""
    from watcherd.git import Identity
    from watcherd.repo import Repo

    monkeypatch.setenv("TZ", tz)
    time.tzset()
    try:
        ws = make_repo(tmp_path / "ws")
        repo = Repo(tmp_path / "state", "k", ws, Identity(name, email))
        snapshot.prepare(repo)
        first = snapshot.take(repo).snapshot_head
        tree = repo.bare.out("rev-parse", f"{first}^{{tree}}")
        when = 1796100000
        off = time.localtime(when).tm_gmtoff // 60
        date = f"{when} {'-' if off < 0 else '+'}{abs(off) // 60:02d}{abs(off) % 60:02d}"
        for parents, message in (([], "one line"), ([first], "watcherd: snapshot (2 files)\n\na\nb"),
                                 ([first, first], "ends in a newline\n")):  # git: one parent
            ours = repo.commit_tree(tree, parents, message, when=when)
            args = ["commit-tree", tree, "-m", message.removesuffix("\n")]
            for p in parents:
                args += ["-p", p]
            theirs = repo.bare.out(*args, env={"GIT_AUTHOR_DATE": date,
                                               "GIT_COMMITTER_DATE": date})
            assert ours == theirs
        assert repo.bare.run("fsck", "--strict", "--no-dangling").returncode == 0
    finally:
        monkeypatch.undo()
        time.tzset()
