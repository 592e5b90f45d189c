"""IgnoreOracle: git's own answer about ignored paths, from one long-lived check-ignore.

The oracle runs ``check-ignore --no-index`` in watcherd's own repository (``helpers.state_repo``)
with the workspace as its work tree: git reads the workspace's ``.gitignore`` files as the work
tree's, its ``info/exclude`` only as watcherd's copy (``ignore.sync_rules``), and never its
config. Tracked paths the rules ignore (``git add -f``) are not the oracle's business:
``ignore.tracked_ignored`` lists them and the watcher treats them as not ignored.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from helpers import git, sgit, state_repo

from watcherd import ignore, snapshot
from watcherd import workspace as ws
from watcherd.errors import GitError
from watcherd.git import Git
from watcherd.ignore import IgnoreOracle
from watcherd.repo import Repo


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "ws"
    root.mkdir()
    git(root, "init", "-q")
    (root / ".gitignore").write_text("node_modules/\n*.log\nbuild\n!keep.log\n")
    return root


@pytest.fixture
def repo(root: Path) -> Repo:
    repo = state_repo(root)
    repo.ensure()
    return repo


@pytest.fixture
def oracle(repo: Repo):
    with IgnoreOracle(repo.git) as o:
        yield o


def test_patterns_of_the_root_gitignore_are_applied(oracle: IgnoreOracle) -> None:
    assert oracle.is_ignored("node_modules", is_dir=True)
    assert oracle.is_ignored("node_modules/react/index.js")
    assert oracle.is_ignored("src/debug.log")
    assert not oracle.is_ignored("src", is_dir=True)
    assert not oracle.is_ignored("src/app.js")


def test_a_matching_negation_means_not_ignored(oracle: IgnoreOracle) -> None:
    assert not oracle.is_ignored("keep.log")
    assert oracle.is_ignored("other.log")


def test_directory_only_patterns_match_directories_even_when_they_do_not_exist(
        oracle: IgnoreOracle) -> None:
    assert oracle.is_ignored("pkg/node_modules", is_dir=True)
    assert not oracle.is_ignored("pkg/node_modules", is_dir=False)  # a file of that name is kept


def test_nested_gitignore_applies_below_its_directory_only(root: Path, repo: Repo) -> None:
    (root / "app").mkdir()
    (root / "app" / ".gitignore").write_text(".next/\n")
    with IgnoreOracle(repo.git) as oracle:
        assert oracle.ignored_many([("app/.next", True), (".next", True)]) == [True, False]


def test_info_exclude_is_applied_through_watcherds_copy(root: Path, repo: Repo) -> None:
    (root / ".git" / "info").mkdir(exist_ok=True)
    (root / ".git" / "info" / "exclude").write_text("secret/\n")
    with IgnoreOracle(repo.git) as oracle:
        # git never reads the workspace's git directory: until the rules are copied, they are
        # not known.
        assert not oracle.is_ignored("secret", is_dir=True)
        assert ignore.sync_rules(repo, ws.locate(root)) is True
        assert ignore.sync_rules(repo, ws.locate(root)) is False  # unchanged: answers stay good
        oracle.invalidate()
        assert oracle.is_ignored("secret", is_dir=True)
        assert not oracle.is_ignored("public", is_dir=True)


def test_the_workspace_config_names_no_excludes_file_and_the_snapshot_agrees(
        root: Path, repo: Repo, tmp_path: Path) -> None:
    # core.excludesFile in the workspace's config is written by the agent and names a file
    # outside the workspace: watcherd reads neither. What counts is that the watcher and the
    # snapshot agree on it, so an edit that is watched is also saved (and the other way round).
    outside = tmp_path / "global-ignore"
    outside.write_text("*.swp\n")
    git(root, "config", "core.excludesFile", str(outside))
    (root / "src").mkdir()
    (root / "src" / ".main.c.swp").write_text("swap\n")
    (root / "src" / "main.c").write_text("int main;\n")
    with IgnoreOracle(repo.git) as oracle:
        assert not oracle.is_ignored("src/.main.c.swp")
    snapshot.prepare(repo)
    snap = snapshot.take(repo)
    files = set(sgit(root, "ls-tree", "-r", "--name-only", snap.commit).splitlines())
    assert {"src/.main.c.swp", "src/main.c"} <= files


def test_tracked_ignored_lists_exactly_the_force_added_paths(root: Path, repo: Repo) -> None:
    # git add -A looks at tracked files whatever the ignore rules say; the oracle answers from the
    # rules alone (--no-index), so the force-added paths are read from the user's index.
    (root / "build").mkdir()
    (root / "build" / "keep.txt").write_text("x")
    (root / "build" / "other.txt").write_text("x")
    (root / "debug.log").write_text("x")
    (root / "src.js").write_text("x")
    git(root, "add", "src.js")
    git(root, "add", "-f", "build/keep.txt")
    assert ignore.tracked_ignored(repo, ws.locate(root)) == {"build/keep.txt"}
    with IgnoreOracle(repo.git) as oracle:
        assert oracle.is_ignored("build/keep.txt")
        assert oracle.is_ignored("build/other.txt")
    git(root, "rm", "-q", "--cached", "build/keep.txt")
    assert ignore.tracked_ignored(repo, ws.locate(root)) == frozenset()
    assert not list(repo.dir.glob("watch-index*"))  # its copies of the index are gone


def test_tracked_ignored_is_empty_without_a_repository_or_an_index(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    repo = state_repo(plain)
    repo.ensure()
    assert ignore.tracked_ignored(repo, ws.locate(plain)) == frozenset()
    git(plain, "init", "-q")  # a repository with no index yet
    assert ignore.tracked_ignored(repo, ws.locate(plain)) == frozenset()


def test_after_an_index_change_only_the_paths_that_came_or_went_change_the_answer(
        root: Path, repo: Repo, monkeypatch: pytest.MonkeyPatch) -> None:
    # What the watcher does on each write of the user's index: the same answer as a full pass,
    # without matching every tracked path against the rules again.
    (root / "build" / "deep").mkdir(parents=True)
    for name in ("build/deep/a.txt", "build/b.txt", "debug.log", "keep.log", "src.js", ":odd"):
        (root / name).write_text("x")
    git(root, "add", "src.js")
    git(root, "add", "-f", "build/b.txt")
    tracked = ignore.TrackedIgnored()
    layout = ws.locate(root)
    assert tracked.full(repo, layout) == {"build/b.txt"}

    def no_full_pass(*args):
        raise AssertionError("a full pass, where only the paths that changed were to be asked")

    monkeypatch.setattr(tracked, "full", no_full_pass)
    git(root, "--literal-pathspecs", "add", "-f", "build/deep/a.txt", "debug.log", "keep.log",
        ":odd")
    assert tracked.index_changed(repo, layout) == {"build/b.txt", "build/deep/a.txt", "debug.log"}
    git(root, "rm", "-q", "--cached", "build/b.txt")
    (root / "src.js").write_text("y")
    git(root, "add", "src.js")  # the same paths: nothing to ask
    assert tracked.index_changed(repo, layout) == {"build/deep/a.txt", "debug.log"}
    assert tracked.index_changed(repo, layout) == ignore.tracked_ignored(repo, layout)
    tracked.close()
    assert not list(repo.dir.glob("watch-index*"))


def test_a_full_pass_keeps_the_index_it_read_until_the_first_change_is_compared(
        root: Path, repo: Repo) -> None:
    # A start-up pays for matching the index against the rules only: the paths the first change
    # is compared with are listed then, from the index the full pass read, not the one of the
    # moment (which already holds the change).
    (root / "build").mkdir()
    for name in ("build/a.txt", "build/b.txt", "src.js"):
        (root / name).write_text("x")
    git(root, "add", "src.js")
    git(root, "add", "-f", "build/a.txt")
    tracked = ignore.TrackedIgnored()
    layout = ws.locate(root)
    assert tracked.full(repo, layout) == {"build/a.txt"}
    assert len(list(repo.dir.glob("watch-index*"))) == 1
    git(root, "add", "-f", "build/b.txt")
    git(root, "rm", "-q", "--cached", "build/a.txt")
    assert tracked.index_changed(repo, layout) == {"build/b.txt"}
    assert not list(repo.dir.glob("watch-index*"))


def test_rules_are_replaced_whole_while_git_reads_them(root: Path, repo: Repo) -> None:
    # The watcher's thread (sync_rules) and a snapshot's (write_rules) both write watcherd's copy
    # of info/exclude while git children start and read it: a git that reads a half-written
    # copy would put node_modules/ (or a .env the rules hide) into a snapshot. Every reader must
    # see the old rules or the new ones.
    old = b"node_modules/\n" + b"# the user's notes\n" * 2000
    new = b"node_modules/\n*.tmp\n" + b"# the user's notes\n" * 2000
    stop = threading.Event()

    def rewrite() -> None:
        n = 0
        while not stop.is_set():
            ignore.write_rules(repo, old if n % 2 else new, ())
            n += 1

    writers = [threading.Thread(target=rewrite) for _ in range(2)]
    for t in writers:
        t.start()
    try:
        misread = sum(repo.git.run("check-ignore", "--no-index", "-q", "node_modules/",
                                   check=False).returncode != 0 for _ in range(1000))
    finally:
        stop.set()
        for t in writers:
            t.join()
    assert misread == 0, f"{misread} of 1000 gits read the rules half written"
    tail = b"\n" + ignore.ROLLBACK_ENTRIES + b"\n"
    assert (repo.git_dir / "info" / "exclude").read_bytes() in (old + tail, new + tail)


def test_invalidate_picks_up_changed_rules(root: Path, oracle: IgnoreOracle) -> None:
    assert not oracle.is_ignored("dist", is_dir=True)
    (root / ".gitignore").write_text("dist/\n")
    assert not oracle.is_ignored("dist", is_dir=True)  # cached, and the process read the old file
    oracle.invalidate()
    assert oracle.is_ignored("dist", is_dir=True)


def test_paths_inside_git_dir_are_answered_without_asking_git(oracle: IgnoreOracle) -> None:
    assert oracle.ignored_many([(".git", True), (".git/HEAD", False), ("sub/.git", True)]) == [
        True, True, True]
    assert oracle.restarts == 0


def test_names_that_look_like_pathspec_magic_are_taken_literally(root: Path,
                                                                oracle: IgnoreOracle) -> None:
    (root / ".gitignore").write_text("/:x\n")
    oracle.invalidate()
    assert oracle.ignored_many([(":x", False), (":(glob)y", False), ("*", False), ("a\nb", False)]) \
        == [True, False, False, False]
    assert oracle.restarts == 1


def test_a_question_that_kills_check_ignore_is_answered_not_ignored_and_the_next_one_works(
        root: Path, oracle: IgnoreOracle) -> None:
    (root / "src").mkdir()
    os.symlink("src", root / "lnk")
    # git dies on a path beyond a symlink; the tree can change between a listing and a question.
    answers = oracle.ignored_many([("a.log", False), ("lnk/x.log", False), ("b.log", False)])
    assert answers == [True, False, True]
    assert oracle.restarts == 2


def test_a_repository_that_cannot_answer_raises_git_error(tmp_path: Path) -> None:
    # watcherd's repository is gone (a state directory wiped under a running daemon).
    door = Git(tmp_path / "missing.git", home=tmp_path, work_tree=tmp_path)
    with IgnoreOracle(door) as oracle, pytest.raises(GitError, match="not a git repo"):
        oracle.ignored_many([("a.txt", False), ("b.txt", False), ("c.txt", False)])


def test_large_batches_do_not_deadlock_on_full_pipes(oracle: IgnoreOracle) -> None:
    # ~1 MiB of questions and more of answers: far beyond both 64 KiB pipe buffers.
    names = [(f"{'d' * 200}/{i}.log", False) for i in range(5000)]
    assert all(oracle.ignored_many(names))


def test_paths_outside_the_work_tree_are_refused(oracle: IgnoreOracle) -> None:
    with pytest.raises(ValueError):
        oracle.is_ignored("../elsewhere")
    with pytest.raises(ValueError):
        oracle.is_ignored("/etc/passwd")
