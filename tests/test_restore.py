"""``restore`` end to end: real repositories saved to a real local store and restored, every rule of
DESIGN's "Restore" section, bad stored data, leftovers of a killed restore and a mount point."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from helpers import git, make_repo, sgit, state_repo, tree_state
from watcherd import manifest as mf
from watcherd import restore as restore_module
from watcherd import snapshot
from watcherd.bundle import file_digest
from watcherd.config import Config, RestoreConfig, StoreConfig, WorkspaceConfig, parse_store_url
from watcherd.errors import RestoreError, UsageError, WorkspaceError
from watcherd.git import GitTimeout
from watcherd.generations import Generations
from watcherd.repo import SNAPSHOT_REF
from watcherd.restore import Request, restore
from watcherd.store.local import LocalStore

KEY = "acme/sandbox-7/main"


# -- helpers -------------------------------------------------------------------------------------------



def config_for(ws: Path, store_dir: Path, mode: str = "shadow", **restore_options) -> Config:
    """The config of the pod whose workspace is ``ws``: its state directory is beside it."""
    return Config(workspace=WorkspaceConfig(path=ws, mode=mode,
                                            state_dir=ws.parent / f"{ws.name}-state"),
                  store=StoreConfig(url=parse_store_url(f"file://{store_dir}"), key=KEY),
                  restore=RestoreConfig(**restore_options))


def gens_for(store_dir: Path) -> Generations:
    return Generations(LocalStore(store_dir), KEY)


def take(ws: Path, mode: str = "shadow") -> snapshot.Snapshot:
    repo = state_repo(ws, KEY)
    snapshot.prepare(repo)
    return snapshot.take(repo, mode)


def save(ws: Path, store_dir: Path, mode: str = "shadow"):
    take(ws, mode)
    return gens_for(store_dir).save(state_repo(ws, KEY))


def edit_and_save(ws: Path, store_dir: Path, text: str):
    (ws / "readme.md").write_text(text)
    return save(ws, store_dir)


def store_files(store_dir: Path) -> dict[str, bytes]:
    return {p.relative_to(store_dir).as_posix(): p.read_bytes()
            for p in sorted(store_dir.rglob("*")) if p.is_file() and not p.name.startswith(".")}


def status(path: Path) -> set[str]:
    # Not helpers.git: its strip() would eat the leading space of " M file".
    out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=path,
                         capture_output=True, text=True, check=True).stdout
    return set(out.splitlines())


def asides(ws: Path) -> list[Path]:
    return sorted(ws.parent.glob(f"{ws.name}.watcherd-*"))


def manifest(store_dir: Path) -> mf.Manifest:
    return mf.parse((store_dir / KEY / "manifest.json").read_bytes(), "manifest")


def bundle_path(store_dir: Path, gen: mf.Generation) -> Path:
    return store_dir / KEY / "bundles" / gen.bundle


def events(logs: list[dict], name: str) -> list[dict]:
    return [e for e in logs if e["event"] == name]


@pytest.fixture
def ws(tmp_path) -> Path:
    return make_repo(tmp_path / "ws")


@pytest.fixture
def store_dir(tmp_path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def target(tmp_path) -> Path:
    """Where the restored workspace goes: a fresh path beside the saved one."""
    return tmp_path / "restored"


# -- round trips ---------------------------------------------------------------------------------------


def test_restore_reproduces_the_saved_tree_branch_head_and_status_exactly(tmp_path, ws, store_dir, target):
    (ws / "tool.py").write_text("print('tool')\n")
    (ws / "gone.txt").write_text("will be deleted\n")
    (ws / ".gitignore").write_text("node_modules/\n")
    git(ws, "add", "-A")
    git(ws, "commit", "-q", "-m", "more")
    git(ws, "checkout", "-q", "-b", "feature/x")
    (ws / "readme.md").write_text("committed on the feature branch\n")
    git(ws, "commit", "-q", "-am", "feature work")
    # Uncommitted state of every kind.
    (ws / "readme.md").write_text("modified, not committed\n")
    (ws / "gone.txt").unlink()
    (ws / "tool.py").chmod(0o755)
    (ws / "café ünï.txt").write_text("unicode name\n")
    (ws / "dir with space").mkdir()
    (ws / "dir with space" / "file name.txt").write_text("spaces\n")
    (ws / "empty.txt").write_bytes(b"")
    (ws / "big.bin").write_bytes(os.urandom(10 * 2**20))
    os.symlink("does/not/exist", ws / "dangling")
    outside = tmp_path / "outside-secret.txt"
    outside.write_text("never copied into the bundle\n")
    os.symlink(str(outside), ws / "outside")
    (ws / "node_modules").mkdir()
    (ws / "node_modules" / "dep.js").write_text("ignored\n")
    head = git(ws, "rev-parse", "HEAD")
    status_before = status(ws)

    result = save(ws, store_dir)
    outside.unlink()  # a restore must not need (or recreate) what a link points at
    outcome = restore(config_for(target, store_dir), gens_for(store_dir))

    assert outcome.action == "restored" and outcome.generation == result.generation == 1
    expected = {k: v for k, v in tree_state(ws).items() if not k.startswith("node_modules")}
    assert tree_state(target) == expected
    assert tree_state(target)["outside"] == ("link", str(outside))
    assert tree_state(target)["tool.py"][1] == 0o100
    assert not outside.exists()
    assert git(target, "symbolic-ref", "HEAD") == "refs/heads/feature/x"
    assert git(target, "rev-parse", "HEAD") == head
    assert status(target) == status_before
    assert {" M readme.md", " D gone.txt", " M tool.py", "?? big.bin"} <= status_before


def test_a_restored_workspace_needs_no_new_snapshot_or_upload(ws, store_dir, target):
    (ws / "readme.md").write_text("edited\n")
    (ws / "new.txt").write_text("new\n")
    saved = save(ws, store_dir)
    restore(config_for(target, store_dir), gens_for(store_dir))

    # The whole recorded state comes back: the first snapshot of the restored workspace finds
    # nothing new (the same tree, and the same HEAD, refs, index and config give the same state).
    assert take(target).commit is None
    assert sgit(target, "rev-parse", SNAPSHOT_REF, key=KEY) == saved.snapshot
    again = gens_for(store_dir).save(state_repo(target, KEY))
    assert again.status == "unchanged" and again.generation == 1
    assert not (target / ".git" / "watcherd").exists()
    assert git(target, "for-each-ref", "refs/watcherd") == ""


def test_restore_keeps_a_deleted_symlink_deleted_even_when_it_pointed_outside(tmp_path, ws, store_dir, target):
    secret = tmp_path / "elsewhere.txt"
    secret.write_text("outside the workspace\n")
    os.symlink(str(secret), ws / "outlink")
    os.symlink("../elsewhere.txt", ws / "relative-outlink")
    git(ws, "add", "-A")
    git(ws, "commit", "-q", "-m", "links")
    (ws / "outlink").unlink()
    (ws / "relative-outlink").unlink()

    save(ws, store_dir)
    restore(config_for(target, store_dir), gens_for(store_dir))

    assert not (target / "outlink").is_symlink()
    assert not (target / "relative-outlink").is_symlink()
    assert secret.read_text() == "outside the workspace\n"
    assert status(target) == {" D outlink", " D relative-outlink"}


def test_restore_of_a_detached_head_keeps_it_detached(ws, store_dir, target):
    (ws / "readme.md").write_text("two\n")
    git(ws, "commit", "-q", "-am", "two")
    git(ws, "checkout", "-q", "--detach", "HEAD~1")
    (ws / "loose.txt").write_text("work on a detached head\n")
    save(ws, store_dir)

    restore(config_for(target, store_dir), gens_for(store_dir))

    assert subprocess.run(["git", "symbolic-ref", "-q", "HEAD"], cwd=target).returncode != 0
    assert git(target, "rev-parse", "HEAD") == git(ws, "rev-parse", "HEAD")
    assert tree_state(target) == tree_state(ws)


def test_restore_of_a_repository_without_commits_keeps_its_unborn_branch(tmp_path, store_dir, target):
    ws = tmp_path / "ws"
    ws.mkdir()
    git(ws, "init", "-q", "-b", "trunk")
    (ws / "draft.txt").write_text("nothing committed yet\n")
    save(ws, store_dir)

    restore(config_for(target, store_dir), gens_for(store_dir))

    assert tree_state(target) == tree_state(ws)
    assert git(target, "symbolic-ref", "HEAD") == "refs/heads/trunk"
    assert status(target) == {"?? draft.txt"}


def test_restore_of_a_branch_mode_generation_checks_out_the_branch_clean(ws, store_dir, target):
    (ws / "readme.md").write_text("committed by watcherd\n")
    (ws / "new.txt").write_text("new\n")
    save(ws, store_dir, mode="branch")

    outcome = restore(config_for(target, store_dir, mode="branch"), gens_for(store_dir))

    assert outcome.action == "restored"
    assert git(target, "rev-parse", "HEAD") == git(ws, "rev-parse", "HEAD")
    assert git(target, "status", "--porcelain") == ""
    assert tree_state(target) == tree_state(ws)


def test_restore_of_a_sha256_repository(tmp_path, store_dir, target):
    ws = tmp_path / "ws"
    ws.mkdir()
    git(ws, "init", "-q", "--object-format=sha256")
    (ws / "a.txt").write_text("a\n")
    git(ws, "add", "-A")
    git(ws, "commit", "-q", "-m", "sha256")
    (ws / "a.txt").write_text("edited\n")
    save(ws, store_dir)

    assert restore(config_for(target, store_dir), gens_for(store_dir)).action == "restored"
    assert tree_state(target) == tree_state(ws)
    assert git(target, "rev-parse", "--show-object-format") == "sha256"


def test_restore_into_an_existing_empty_directory_keeps_its_permissions(ws, store_dir, target):
    save(ws, store_dir)
    target.mkdir()
    target.chmod(0o750)
    assert restore(config_for(target, store_dir), gens_for(store_dir)).action == "restored"
    assert tree_state(target) == tree_state(ws)
    assert target.stat().st_mode & 0o777 == 0o750
    assert asides(target) == []


# -- skip ----------------------------------------------------------------------------------------------


def test_restore_skips_when_workspace_already_has_history(ws, store_dir):
    edit_and_save(ws, store_dir, "saved\n")
    before = tree_state(ws)
    outcome = restore(config_for(ws, store_dir), gens_for(store_dir))
    assert outcome.action == "skipped" and outcome.generation == 1
    assert tree_state(ws) == before and asides(ws) == []


def test_restore_skips_when_workspace_has_newer_local_snapshots_on_top(ws, store_dir):
    edit_and_save(ws, store_dir, "saved\n")
    (ws / "readme.md").write_text("newer, not uploaded yet\n")
    take(ws)
    before = tree_state(ws)
    outcome = restore(config_for(ws, store_dir), gens_for(store_dir))
    assert outcome.action == "skipped"
    assert tree_state(ws) == before and asides(ws) == []


# -- a workspace that holds something else ---------------------------------------------------------------


def test_restore_moves_a_foreign_workspace_aside_and_never_deletes_it(tmp_path, ws, store_dir, target):
    edit_and_save(ws, store_dir, "the stored history\n")
    make_repo(target, "started from the template, not the stored history\n")
    (target / "notes.txt").write_text("precious\n")
    foreign = tree_state(target)

    outcome = restore(config_for(target, store_dir), gens_for(store_dir))

    assert outcome.action == "restored"
    assert outcome.moved_aside is not None and outcome.moved_aside.parent == target.parent
    assert outcome.moved_aside.name.startswith(f"{target.name}.watcherd-")
    assert tree_state(outcome.moved_aside) == foreign
    assert tree_state(target) == tree_state(ws)


def test_restore_with_on_conflict_fail_refuses_and_moves_nothing(ws, store_dir, target):
    edit_and_save(ws, store_dir, "the stored history\n")
    target.mkdir()
    (target / "notes.txt").write_text("precious\n")
    before = tree_state(target)

    with pytest.raises(RestoreError, match="restore.on_conflict") as info:
        restore(config_for(target, store_dir, on_conflict="fail"), gens_for(store_dir))

    assert str(target) in str(info.value)
    assert tree_state(target) == before and asides(target) == []
    assert [p.name for p in target.parent.iterdir() if p.name.startswith(".")] == []


def test_restore_with_on_conflict_fail_still_skips_or_fills_an_empty_workspace(ws, store_dir, target):
    edit_and_save(ws, store_dir, "the stored history\n")
    cfg = config_for(target, store_dir, on_conflict="fail")
    assert restore(cfg, gens_for(store_dir)).action == "restored"
    assert restore(cfg, gens_for(store_dir)).action == "skipped"


def test_two_move_asides_within_one_second_keep_both_old_workspaces(ws, store_dir, target):
    edit_and_save(ws, store_dir, "the stored history\n")
    # The names a move-aside in the next few seconds would pick are taken already.
    now = time.time()
    for s in range(-1, 5):
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now + s))
        taken = target.parent / f"{target.name}.watcherd-{stamp}"
        taken.mkdir()
        (taken / "older.txt").write_text(stamp)
    target.mkdir()
    (target / "notes.txt").write_text("precious\n")

    outcome = restore(config_for(target, store_dir), gens_for(store_dir))

    assert (outcome.moved_aside / "notes.txt").read_text() == "precious\n"
    assert len(asides(target)) == 7
    assert all(len(list(p.iterdir())) == 1 for p in asides(target))


# -- choosing a generation ----------------------------------------------------------------------------


def test_restore_falls_back_to_the_previous_generation_when_the_newest_is_corrupt(ws, store_dir, target):
    edit_and_save(ws, store_dir, "generation one\n")
    edit_and_save(ws, store_dir, "generation two\n")
    newest = bundle_path(store_dir, manifest(store_dir).current)
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    before = store_files(store_dir)

    with capture_logs() as logs:
        outcome = restore(config_for(target, store_dir), gens_for(store_dir))

    assert outcome.action == "restored" and outcome.generation == 1
    assert (target / "readme.md").read_text() == "generation one\n"
    bad = events(logs, "restore.generation_bad")
    assert [e["generation"] for e in bad] == [2]
    fell = events(logs, "restore.fell_back")
    assert fell and fell[0]["generation"] == 1 and fell[0]["newest"] == 2
    assert store_files(store_dir) == before


def test_a_generation_that_fetches_but_lacks_its_snapshot_falls_back_and_seeds_none_of_it(
        tmp_path, ws, store_dir, target):
    # The newest generation's last bundle is a sound bundle of another repository (its manifest
    # agrees with its bytes): it fetches, but does not hold the snapshot the manifest names.
    edit_and_save(ws, store_dir, "generation one\n")
    edit_and_save(ws, store_dir, "generation two\n")
    other = make_repo(tmp_path / "other", "another project\n")
    other_store = tmp_path / "other-store"
    foreign = save(other, other_store).snapshot
    newest = bundle_path(store_dir, manifest(store_dir).current)
    shutil.copyfile(bundle_path(other_store, manifest(other_store).current), newest)
    mpath = store_dir / KEY / "manifest.json"
    doc = json.loads(mpath.read_bytes())
    doc["size"], doc["sha256"] = file_digest(newest)
    doc["chain"][-1]["size"], doc["chain"][-1]["sha256"] = doc["size"], doc["sha256"]
    mpath.write_text(json.dumps(doc))

    with capture_logs() as logs:
        outcome = restore(config_for(target, store_dir), gens_for(store_dir))

    assert outcome.generation == 1
    assert (target / "readme.md").read_text() == "generation one\n"
    bad = events(logs, "restore.generation_bad")
    assert [e["generation"] for e in bad] == [2]
    assert "do not hold the snapshot" in bad[0]["error"]
    # What the failed build had copied into watcherd's repository went with it.
    repo = state_repo(target, KEY)
    assert not repo.bare.has_commit(foreign)
    assert sgit(target, "rev-parse", SNAPSHOT_REF, key=KEY) == manifest(store_dir).find(1).snapshot


def test_the_restored_index_keeps_the_stat_data_of_the_files_laid_as_staged(ws, store_dir, target):
    # Restore writes each file once and records it as it goes: a file laid as it is staged needs
    # no second read (by a refresh, or by the first `git status`) to be known clean; one that
    # differs from the index has no stat data, so git compares its content.
    (ws / "clean.txt").write_text("committed and unchanged\n")
    (ws / "staged.txt").write_text("committed\n")
    git(ws, "add", "-A")
    git(ws, "commit", "-q", "-m", "two more")
    (ws / "staged.txt").write_text("staged\n")
    git(ws, "add", "staged.txt")
    (ws / "staged.txt").write_text("staged, then edited\n")
    (ws / "readme.md").write_text("modified, not staged\n")
    (ws / "untracked.txt").write_text("new\n")
    status_before = status(ws)
    save(ws, store_dir)

    restore(config_for(target, store_dir), gens_for(store_dir))

    debug = subprocess.run(["git", "ls-files", "--debug"], cwd=target, capture_output=True,
                           text=True, check=True,
                           env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"}).stdout
    sizes = {}
    name = None
    for line in debug.splitlines():
        if not line.startswith("  "):
            name = line
        elif line.strip().startswith("size:"):
            sizes[name] = int(line.split()[1])
    assert sizes["clean.txt"] == len("committed and unchanged\n")
    assert sizes["staged.txt"] == 0 and sizes["readme.md"] == 0
    assert "untracked.txt" not in sizes
    assert status(target) == status_before


def test_a_failure_creating_watcherds_repository_is_local_and_marks_no_generation_bad(
        ws, store_dir, target, monkeypatch):
    # Created beside the checkout: its failure (git init timing out, say) is the state
    # directory's, never a reason to call good generations corrupt and fall back past them.
    edit_and_save(ws, store_dir, "generation one\n")
    edit_and_save(ws, store_dir, "generation two\n")
    before = store_files(store_dir)

    def ensure(self, object_format="sha1"):
        raise GitTimeout("git init --bare timed out after 30s")

    monkeypatch.setattr(restore_module.Repo, "ensure", ensure)
    with capture_logs() as logs, pytest.raises(RestoreError, match="local disk"):
        restore(config_for(target, store_dir), gens_for(store_dir))

    assert not events(logs, "restore.generation_bad")
    assert not (target.parent / f"{target.name}-state" / KEY / "bad-generations.json").exists()
    assert not target.exists() and store_files(store_dir) == before


def test_restore_generation_n_restores_exactly_that_one_even_over_a_newer_workspace(ws, store_dir):
    edit_and_save(ws, store_dir, "generation one\n")
    edit_and_save(ws, store_dir, "generation two\n")
    newer = tree_state(ws)

    outcome = restore(config_for(ws, store_dir), gens_for(store_dir), Request(generation=1))

    assert outcome.action == "restored" and outcome.generation == 1
    assert (ws / "readme.md").read_text() == "generation one\n"
    assert sgit(ws, "rev-parse", SNAPSHOT_REF, key=KEY) == manifest(store_dir).history[0].snapshot
    assert tree_state(outcome.moved_aside) == newer  # time travel never loses the present
    again = restore(config_for(ws, store_dir), gens_for(store_dir), Request(generation=1))
    assert again.action == "skipped"


def test_restore_keeps_the_state_history_it_continues_and_sets_aside_one_it_does_not(ws, store_dir):
    edit_and_save(ws, store_dir, "generation one\n")
    edit_and_save(ws, store_dir, "generation two\n")
    one, two = manifest(store_dir).history[0], manifest(store_dir).current
    # The state directory outlived the workspace and still points at generation one.
    sgit(ws, "update-ref", SNAPSHOT_REF, one.snapshot, key=KEY)
    shutil.rmtree(ws)
    ws.mkdir()

    with capture_logs() as logs:
        outcome = restore(config_for(ws, store_dir), gens_for(store_dir))

    assert outcome.action == "restored" and outcome.generation == 2
    assert sgit(ws, "rev-parse", SNAPSHOT_REF, key=KEY) == two.snapshot
    assert sgit(ws, "for-each-ref", "refs/watcherd/previous/", key=KEY) == ""
    assert not events(logs, "state.new_history")

    # Back to generation one: that does not continue generation two, so two is set aside (info,
    # not a warning: restore replacing the workspace is what was asked for).
    with capture_logs() as logs:
        restore(config_for(ws, store_dir), gens_for(store_dir), Request(generation=1))

    [event] = events(logs, "state.new_history")
    assert event["log_level"] == "info" and event["previous"] == two.snapshot
    kept = sgit(ws, "for-each-ref", "--format=%(objectname)", "refs/watcherd/previous/", key=KEY)
    assert kept == two.snapshot
    assert sgit(ws, "rev-parse", SNAPSHOT_REF, key=KEY) == one.snapshot


def test_restore_before_a_time_picks_the_newest_generation_older_than_it(ws, store_dir, target):
    edit_and_save(ws, store_dir, "generation one\n")
    edit_and_save(ws, store_dir, "generation two\n")
    edit_and_save(ws, store_dir, "generation three\n")
    third = mf.parse_time(manifest(store_dir).current.created_at)

    outcome = restore(config_for(target, store_dir), gens_for(store_dir), Request(before=third))

    assert outcome.generation == 2
    assert (target / "readme.md").read_text() == "generation two\n"


def test_restore_of_a_generation_not_in_the_store_is_a_usage_error_listing_what_is(ws, store_dir, target):
    edit_and_save(ws, store_dir, "one\n")
    edit_and_save(ws, store_dir, "two\n")
    with pytest.raises(UsageError, match=r"--generation 7: not in the store \(kept: 2, 1\)"):
        restore(config_for(target, store_dir), gens_for(store_dir), Request(generation=7))
    assert not target.exists()


def test_restore_before_a_time_older_than_every_generation_is_a_usage_error(ws, store_dir, target):
    edit_and_save(ws, store_dir, "one\n")
    first = mf.parse_time(manifest(store_dir).current.created_at)
    with pytest.raises(UsageError, match="no generation is that old"):
        restore(config_for(target, store_dir), gens_for(store_dir), Request(before=first))
    assert not target.exists()


def test_time_travel_with_nothing_stored_fails(store_dir, target):
    with pytest.raises(RestoreError, match="no generation to travel to"):
        restore(config_for(target, store_dir), gens_for(store_dir), Request(generation=1))
    assert not target.exists()


# -- nothing stored: on_missing ------------------------------------------------------------------------


def test_nothing_stored_with_on_missing_empty_initialises_an_empty_repository(store_dir, target):
    outcome = restore(config_for(target, store_dir), gens_for(store_dir))
    assert outcome.action == "empty"
    assert (target / ".git").is_dir() and git(target, "rev-parse", "--git-dir") == ".git"
    assert subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], cwd=target).returncode
    assert tree_state(target) == {}
    # Generated directories are ignored from the start: an `npm install` is not a snapshot.
    (target / "node_modules").mkdir()
    (target / "node_modules" / "dep.js").write_text("x\n")
    assert status(target) == set()


def test_nothing_stored_keeps_a_non_empty_workspace_as_it_is(store_dir, target):
    target.mkdir()
    (target / "app.py").write_text("print('already here')\n")
    before = tree_state(target)
    outcome = restore(config_for(target, store_dir), gens_for(store_dir))
    assert outcome.action == "empty"
    assert tree_state(target) == before and asides(target) == []
    assert (target / ".git").is_dir()


def test_nothing_stored_with_on_missing_template_clones_the_template(tmp_path, store_dir, target):
    source = make_repo(tmp_path / "template-src", "from the template\n")
    template = tmp_path / "template.git"
    git(tmp_path, "clone", "-q", "--bare", str(source), str(template))

    outcome = restore(config_for(target, store_dir, on_missing="template", template_url=str(template)),
                      gens_for(store_dir))

    assert outcome.action == "template"
    assert (target / "readme.md").read_text() == "from the template\n"
    assert git(target, "rev-parse", "HEAD") == git(source, "rev-parse", "HEAD")
    assert git(target, "status", "--porcelain") == ""


def test_a_template_that_does_not_clone_fails_and_leaves_nothing_behind(tmp_path, store_dir, target):
    cfg = config_for(target, store_dir, on_missing="template", template_url=str(tmp_path / "nope.git"))
    with pytest.raises(RestoreError, match="restore.template_url .*nope.git"):
        restore(cfg, gens_for(store_dir))
    assert not target.exists()
    assert list(tmp_path.glob(".*")) == []  # no staging directory left beside it


def test_nothing_stored_with_on_missing_fail_is_an_error_naming_the_key(store_dir, target):
    with pytest.raises(RestoreError, match=f'{KEY}.*restore.on_missing = "fail"'):
        restore(config_for(target, store_dir, on_missing="fail"), gens_for(store_dir))
    assert not target.exists()


# -- bad stored data -----------------------------------------------------------------------------------


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-200])


def _truncate_and_fix_manifest(path: Path) -> None:
    """A truncated bundle whose manifest agrees with it: only the proof can tell."""
    _truncate(path)
    mpath = path.parent.parent / "manifest.json"
    doc = json.loads(mpath.read_bytes())
    doc["size"], doc["sha256"] = file_digest(path)
    doc["chain"][-1]["size"], doc["chain"][-1]["sha256"] = doc["size"], doc["sha256"]
    mpath.write_text(json.dumps(doc))


@pytest.mark.parametrize("damage", [
    pytest.param(lambda p: p.unlink(), id="missing-bundle"),
    pytest.param(_flip, id="wrong-checksum"),
    pytest.param(_truncate, id="truncated"),
    pytest.param(_truncate_and_fix_manifest, id="truncated-checksum-matches"),
])
def test_a_bad_newest_bundle_falls_back_and_changes_nothing_in_the_store(ws, store_dir, target, damage):
    edit_and_save(ws, store_dir, "generation one\n")
    edit_and_save(ws, store_dir, "generation two\n")
    damage(bundle_path(store_dir, manifest(store_dir).current))
    before = store_files(store_dir)
    target.mkdir()
    (target / "foreign.txt").write_text("kept\n")

    with capture_logs() as logs:
        outcome = restore(config_for(target, store_dir), gens_for(store_dir))

    assert outcome.generation == 1
    assert (target / "readme.md").read_text() == "generation one\n"
    assert (outcome.moved_aside / "foreign.txt").read_text() == "kept\n"
    assert events(logs, "restore.generation_bad") and events(logs, "restore.fell_back")
    assert store_files(store_dir) == before


@pytest.mark.parametrize("manifest_bytes", [
    pytest.param(b"{not json", id="not-json"),
    pytest.param(None, id="bundle-outside-its-key"),
])
def test_an_unreadable_manifest_fails_the_restore_and_leaves_the_workspace(ws, store_dir, target,
                                                                          manifest_bytes):
    # Unreadable is not "nothing stored": starting empty would bury the stored work.
    edit_and_save(ws, store_dir, "generation one\n")
    mpath = store_dir / KEY / "manifest.json"
    if manifest_bytes is None:
        doc = json.loads(mpath.read_bytes())
        doc["bundle"] = "../other/1-abcdef012345.bundle"
        manifest_bytes = json.dumps(doc).encode()
    mpath.write_bytes(manifest_bytes)
    before = store_files(store_dir)
    target.mkdir()
    (target / "work.txt").write_text("kept\n")

    for on_missing in ("empty", "fail"):
        with capture_logs() as logs, pytest.raises(RestoreError, match="manifest"):
            restore(config_for(target, store_dir, on_missing=on_missing), gens_for(store_dir))
        assert events(logs, "restore.manifest_bad")
        assert (target / "work.txt").read_text() == "kept\n" and asides(target) == []
        assert store_files(store_dir) == before


def test_every_generation_corrupt_with_on_missing_empty_keeps_a_record_the_next_save_supersedes(
        ws, store_dir, target):
    edit_and_save(ws, store_dir, "generation one\n")
    for gen in manifest(store_dir).generations:
        _flip(bundle_path(store_dir, gen))
    outcome = restore(config_for(target, store_dir), gens_for(store_dir))
    assert outcome.action == "empty"
    (target / "new.txt").write_text("a fresh start\n")
    result = save(target, store_dir)
    assert result.generation == 2 and result.superseded == (1,)


def test_every_generation_corrupt_with_on_missing_fail_fails_and_touches_nothing(ws, store_dir, target):
    edit_and_save(ws, store_dir, "generation one\n")
    edit_and_save(ws, store_dir, "generation two\n")
    for gen in manifest(store_dir).generations:
        _flip(bundle_path(store_dir, gen))
    before = store_files(store_dir)
    target.mkdir()
    (target / "work.txt").write_text("kept\n")

    with pytest.raises(RestoreError, match="every stored generation is corrupt") as raised:
        restore(config_for(target, store_dir, on_missing="fail"), gens_for(store_dir))

    said = str(raised.value)
    assert said.count("generation 2") == 1 and said.count("generation 1") == 1, said
    assert tree_state(target) == {"work.txt": ("file", 0, b"kept\n")}
    assert asides(target) == []
    assert store_files(store_dir) == before


def test_a_workspace_path_that_is_a_file_is_refused(tmp_path, store_dir):
    path = tmp_path / "file"
    path.write_text("not a directory\n")
    with pytest.raises(WorkspaceError, match=str(path)):
        restore(config_for(path, store_dir), gens_for(store_dir))
    assert path.read_text() == "not a directory\n"


# -- leftovers of a killed restore -----------------------------------------------------------------------


def test_planted_leftovers_are_workspace_content_and_never_acted_on(ws, store_dir, target):
    # Names a killed restore of an older watcherd left, planted by whoever writes the workspace:
    # without a journal entry in the state directory they are the workspace's own files.
    edit_and_save(ws, store_dir, "stored\n")
    target.mkdir()
    inside = target / ".watcherd-restore"
    (inside / ".git" / "watcherd").mkdir(parents=True)
    (inside / ".git" / "watcherd" / "READY").write_text(".watcherd-aside-x\n")
    (inside / "half.txt").write_text("planted\n")
    download = target / ".watcherd-download-xyz"
    download.mkdir()
    (download / "gen1-partial.bundle").write_bytes(b"# v2 git bundle\n")
    before = tree_state(target)

    outcome = restore(config_for(target, store_dir), gens_for(store_dir))

    assert outcome.action == "restored"
    assert tree_state(target) == tree_state(ws)
    assert tree_state(outcome.moved_aside) == before  # moved aside whole, nothing deleted


def _kill_after(monkeypatch, renames: int) -> None:
    """Make the restore die (like a kill -9, mid-move) after ``renames`` renames."""
    real = os.rename
    count = [0]

    def rename(*args, **kwargs):
        if count[0] >= renames:
            raise SystemExit("killed")
        count[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(restore_module.os, "rename", rename)


def _killed_then_rerun(monkeypatch, ws, store_dir, target, renames):
    edit_and_save(ws, store_dir, "stored\n")
    (target / "foreign.txt").write_text("precious\n")
    with monkeypatch.context() as m:
        _kill_after(m, renames)
        with pytest.raises(SystemExit):
            restore(config_for(target, store_dir), gens_for(store_dir))

    with capture_logs():
        outcome = restore(config_for(target, store_dir), gens_for(store_dir))

    assert outcome.action in ("restored", "skipped")
    restored = {k: v for k, v in tree_state(target).items() if not k.startswith(".watcherd-aside-")}
    assert restored == tree_state(ws)
    kept = [p for p in asides(target) + sorted(target.glob(".watcherd-aside-*"))
            if (p / "foreign.txt").exists()]
    assert len(kept) == 1 and (kept[0] / "foreign.txt").read_text() == "precious\n"
    leftovers = [*target.parent.iterdir(), *target.iterdir()]
    assert [p.name for p in leftovers if "watcherd-restore" in p.name] == []
    assert take(target).commit is None  # the daemon continues from the restored history


@pytest.mark.parametrize("renames", [0, 1])
def test_a_restore_killed_while_moving_into_place_is_finished_by_a_rerun(
        monkeypatch, ws, store_dir, target, renames):
    target.mkdir()
    _killed_then_rerun(monkeypatch, ws, store_dir, target, renames)


# -- a workspace that is a mount point ------------------------------------------------------------------


@pytest.fixture
def mounted(tmp_path):
    path = tmp_path / "mnt"
    path.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a tmpfs (the workspace-is-a-mount-point path)")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {proc.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_restore_into_a_mount_point_keeps_the_mount_and_moves_the_old_contents_inside(ws, store_dir,
                                                                                      mounted):
    (ws / "readme.md").write_text("stored\n")
    (ws / "untracked.txt").write_text("untracked\n")
    save(ws, store_dir)
    (mounted / "foreign.txt").write_text("what the pod started with\n")

    outcome = restore(config_for(mounted, store_dir), gens_for(store_dir))

    assert os.path.ismount(mounted)
    assert outcome.action == "restored"
    assert outcome.moved_aside.parent == mounted
    assert (outcome.moved_aside / "foreign.txt").read_text() == "what the pod started with\n"
    restored = {k: v for k, v in tree_state(mounted).items() if not k.startswith(".watcherd-aside-")}
    assert restored == tree_state(ws)
    assert status(mounted) == status(ws)  # the aside folder is ignored by the restored repository
    assert [p.name for p in mounted.iterdir() if p.name.startswith(".watcherd-restore")] == []
    assert take(mounted).commit is None


@pytest.mark.parametrize("renames", [0, 1, 2, 4])
def test_a_restore_into_a_mount_point_killed_mid_move_is_finished_by_a_rerun(
        monkeypatch, ws, store_dir, mounted, renames):
    (mounted / "other.txt").write_text("another old entry\n")
    _killed_then_rerun(monkeypatch, ws, store_dir, mounted, renames)


@pytest.fixture
def bind_mounted_onto_itself(tmp_path):
    """What systemd's ReadWritePaths=/app makes: a bind mount of a directory onto itself, on the
    same filesystem as its parent (which systemd has made read-only)."""
    path = tmp_path / "app"
    path.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to make a bind mount (the ReadWritePaths= case)")
    proc = subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"bind mounts are not permitted here: {proc.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_restore_into_a_bind_mount_onto_itself_stages_inside_it(ws, store_dir,
                                                                bind_mounted_onto_itself):
    target = bind_mounted_onto_itself
    assert not os.path.ismount(target)  # the trap: same device as the parent
    (ws / "readme.md").write_text("stored\n")
    save(ws, store_dir)
    staged_beside = set(target.parent.iterdir())

    outcome = restore(config_for(target, store_dir), gens_for(store_dir))

    assert outcome.action == "restored"
    assert tree_state(target) == tree_state(ws)
    # Nothing was staged beside it (under ProtectSystem=strict the parent is read-only), and the
    # mount is still the workspace: it was filled in place, not renamed over. (The state
    # directory beside it is this test's choice of state_dir.)
    assert {p for p in target.parent.iterdir() if not p.name.endswith("-state")} == \
        {p for p in staged_beside if not p.name.endswith("-state")}
    assert target in {Path(line.split(" ")[4]) for line in Path("/proc/self/mountinfo").read_text().splitlines()}
