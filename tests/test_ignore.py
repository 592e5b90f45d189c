"""IgnoreOracle: git's own answer about ignored paths, from one long-lived check-ignore."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from watcherd.errors import GitError
from watcherd.git import Git
from watcherd.ignore import IgnoreOracle


@pytest.fixture
def repo(tmp_path: Path) -> Git:
    root = tmp_path / "ws"
    root.mkdir()
    git = Git(root)
    git.run("init")
    (root / ".gitignore").write_text("node_modules/\n*.log\nbuild\n!keep.log\n")
    return git


@pytest.fixture
def oracle(repo: Git):
    with IgnoreOracle(repo) as o:
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


def test_nested_gitignore_applies_below_its_directory_only(repo: Git) -> None:
    (repo.path / "app").mkdir()
    (repo.path / "app" / ".gitignore").write_text(".next/\n")
    with IgnoreOracle(repo) as oracle:
        assert oracle.ignored_many([("app/.next", True), (".next", True)]) == [True, False]


def test_info_exclude_and_core_excludes_file_are_applied(repo: Git, tmp_path: Path) -> None:
    (repo.path / ".git" / "info").mkdir(exist_ok=True)
    (repo.path / ".git" / "info" / "exclude").write_text("secret/\n")
    global_ignore = tmp_path / "global-ignore"
    global_ignore.write_text("*.swp\n")
    repo.run("config", "core.excludesFile", str(global_ignore))
    with IgnoreOracle(repo) as oracle:
        assert oracle.is_ignored("secret", is_dir=True)
        assert oracle.is_ignored("src/.main.c.swp")


def test_tracked_files_are_never_ignored_and_keep_their_directory_relevant(repo: Git) -> None:
    (repo.path / "build").mkdir()
    (repo.path / "build" / "keep.txt").write_text("x")
    repo.run("add", "-f", "build/keep.txt")
    with IgnoreOracle(repo) as oracle:
        # git add -A looks at tracked files whatever the ignore rules say.
        assert not oracle.is_ignored("build/keep.txt")
        assert not oracle.is_ignored("build", is_dir=True)
        assert oracle.is_ignored("build/other.txt")


def test_invalidate_picks_up_changed_rules(repo: Git, oracle: IgnoreOracle) -> None:
    assert not oracle.is_ignored("dist", is_dir=True)
    (repo.path / ".gitignore").write_text("dist/\n")
    assert not oracle.is_ignored("dist", is_dir=True)  # cached, and the process read the old file
    oracle.invalidate()
    assert oracle.is_ignored("dist", is_dir=True)


def test_paths_inside_git_dir_are_answered_without_asking_git(oracle: IgnoreOracle) -> None:
    assert oracle.ignored_many([(".git", True), (".git/HEAD", False), ("sub/.git", True)]) == [
        True, True, True]
    assert oracle.restarts == 0


def test_names_that_look_like_pathspec_magic_are_taken_literally(repo: Git,
                                                                oracle: IgnoreOracle) -> None:
    (repo.path / ".gitignore").write_text("/:x\n")
    oracle.invalidate()
    assert oracle.ignored_many([(":x", False), (":(glob)y", False), ("*", False), ("a\nb", False)]) \
        == [True, False, False, False]
    assert oracle.restarts == 1


def test_a_question_that_kills_check_ignore_is_answered_not_ignored_and_the_next_one_works(
        repo: Git, oracle: IgnoreOracle) -> None:
    (repo.path / "src").mkdir()
    os.symlink("src", repo.path / "lnk")
    # git dies on a path beyond a symlink; the tree can change between a listing and a question.
    answers = oracle.ignored_many([("a.log", False), ("lnk/x.log", False), ("b.log", False)])
    assert answers == [True, False, True]
    assert oracle.restarts == 2


def test_a_repository_that_cannot_answer_raises_git_error(tmp_path: Path) -> None:
    with IgnoreOracle(Git(tmp_path)) as oracle, pytest.raises(GitError, match="not a git repo"):
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
