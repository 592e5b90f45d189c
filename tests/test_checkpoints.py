"""Checkpoints, the timeline, rollback in place, fork and export, on the real daemon.

The daemon runs as a process with real inotify and a local store; the commands run as a person
or a platform would run them (the CLI, or the control endpoint's JSON routes). "The exact state"
is the working tree's files (bytes, modes, links) and the user's git: HEAD, every ref, the index
(stage, mode, blob of each entry) and the stash.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from daemon_fixture import Daemon, run_cli, watcherd, write_config  # noqa: F401 (fixture)
from helpers import git, punch_hole, store_files, tree_state, wait_for

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify is Linux-only")


def exact_state(ws: Path) -> dict:
    """The workspace as a user sees it: files, HEAD, refs, index, stash."""
    return {
        "files": {k: v for k, v in tree_state(ws).items() if not k.startswith("node_modules")},
        "head": git(ws, "symbolic-ref", "-q", "HEAD") if (ws / ".git").exists() else None,
        "head_commit": git(ws, "rev-parse", "HEAD"),
        "refs": git(ws, "for-each-ref", "--format=%(objectname) %(objecttype) %(refname)"),
        "index": git(ws, "ls-files", "--stage"),
        "stash": git(ws, "stash", "list", "--format=%H %s"),
    }


def one_commit(ws: Path) -> Path:
    """A repository whose one commit ("one") holds ``a.txt``."""
    ws.mkdir()
    git(ws, "init", "--quiet")
    (ws / "a.txt").write_text("one\n")
    git(ws, "add", "a.txt")
    git(ws, "commit", "--quiet", "-m", "one")
    return ws


def busy_workspace(d: Daemon) -> None:
    """A user's state with every kind of git state: a branch, a tag, a stash, a staged file, an
    unstaged edit, an untracked file, an ignored directory."""
    ws = d.workspace
    git(ws, "branch", "feature")
    git(ws, "tag", "-a", "v1", "-m", "release one")
    (ws / "src" / "app.py").write_text("print('stashed')\n")
    git(ws, "stash", "--quiet")
    (ws / "staged.txt").write_text("staged\n")
    git(ws, "add", "staged.txt")
    (ws / "README.md").write_text("# app, edited\n")
    (ws / "untracked.txt").write_text("mine\n")
    (ws / "node_modules").mkdir()
    (ws / "node_modules" / "dep.js").write_text("ignored\n")


def edit_everything(d: Daemon) -> None:
    """Change every part of that state."""
    ws = d.workspace
    git(ws, "add", "-A")
    git(ws, "commit", "--quiet", "-m", "work")
    git(ws, "checkout", "--quiet", "-b", "topic")
    (ws / "src" / "app.py").write_text("print('rewritten')\n")
    (ws / "src" / "new.py").write_text("x = 1\n")
    os.symlink("new.py", ws / "src" / "link.py")
    (ws / "untracked.txt").unlink()
    git(ws, "branch", "-D", "feature")
    git(ws, "tag", "v2")
    git(ws, "stash", "drop", "--quiet")
    (ws / "tool.sh").write_text("#!/bin/sh\n")
    (ws / "tool.sh").chmod(0o755)
    git(ws, "add", "tool.sh")


def cli_json(d: Daemon, *args: str) -> dict:
    r = run_cli(d.config, *args, "--json", timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_checkpoint_edits_rollback_and_undo_each_give_back_the_exact_state(watcherd):
    d = watcherd().start()
    busy_workspace(d)
    label = cli_json(d, "checkpoint", "before-refactor", "--note", "green tests")
    assert label["status"] == "ok" and label["checkpoint"] == "before-refactor"
    checkpointed = exact_state(d.workspace)
    assert d.manifest()["checkpoints"][0]["name"] == "before-refactor"
    assert d.manifest()["checkpoints"][0]["note"] == "green tests"

    edit_everything(d)
    d.settle()
    edited = exact_state(d.workspace)
    assert edited != checkpointed
    activity_before = d.status()["last_activity_at"]
    snapshots_before = len(d.snapshots())

    back = cli_json(d, "rollback", "before-refactor")
    assert back["status"] == "rolled_back" and back["target"] == label["snapshot"]
    assert exact_state(d.workspace) == checkpointed
    # Ignored files are no snapshot's: the rollback leaves them.
    assert (d.workspace / "node_modules" / "dep.js").read_text() == "ignored\n"
    # The rollback's own writes were not activity: no change was seen, no snapshot scheduled.
    status = d.settle()
    assert status["last_activity_at"] == activity_before
    # The edited state and the rolled-back one, nothing else (the save before found the
    # edited state saved already).
    assert len(d.snapshots()) == snapshots_before + 1
    assert d.manifest()["snapshot"] == d.snapshots()[0]
    assert git(d.workspace, "fsck", "--no-progress", "--no-dangling") == ""

    undone = cli_json(d, "rollback", "--undo")
    assert undone["status"] == "rolled_back" and undone["target"] == back["undo"]
    assert exact_state(d.workspace) == edited
    d.settle()
    assert d.stop() == 0


def test_the_routes_speak_json_and_say_what_is_wrong(watcherd):
    d = watcherd().start()
    (d.workspace / "a.txt").write_text("a\n")
    code, body = d.post("/checkpoint", {"name": "first", "note": "n"})
    assert code == 200 and body["status"] == "ok" and body["generation"] >= 1
    for bad in ({"name": "../x"}, {"name": ""}, {"name": "x" * 129}, {"name": 7},
                {"name": "12"}, {"name": "deadbeef"}, {"name": "ok", "note": "n" * 1001},
                {"name": "ok", "note": ["no"]}, {"name": "ok", "extra": 1}):
        code, body = d.post("/checkpoint", bad)
        assert code == 400 and body["status"] == "invalid", bad
    code, body = d.request("POST", "/checkpoint", body=None)
    assert code == 400
    for bad in ({}, {"target": "first", "undo": True}, {"before": "yesterday-ish"},
                {"target": 3}, {"undo": "yes"}, {"target": "first", "color": "red"}):
        code, body = d.post("/rollback", bad)
        assert code == 400 and body["status"] == "invalid", (bad, body)
    code, body = d.post("/rollback", {"target": "no-such-label"})
    assert code == 409 and body["status"] == "refused" and "first" in body["error"]
    code, body = d.post("/rollback", {"undo": True})
    assert code == 409 and "nothing to undo" in body["error"]

    (d.workspace / "b.txt").write_text("b\n")
    d.settle()
    code, raw = d.request("GET", "/snapshots")
    doc = json.loads(raw)
    assert code == 200 and doc["status"] == "ok" and doc["key"] == d.key
    newest, *older = doc["snapshots"]
    assert newest["paths"] == ["b.txt"] and newest["files"] == 1
    assert newest["generation"] == d.generation()
    labelled = [e for e in doc["snapshots"] if e["checkpoints"]]
    assert labelled[0]["checkpoints"] == ["first"] and "a.txt" in labelled[0]["paths"]
    assert doc["checkpoints"][0]["name"] == "first"
    code, raw = d.request("GET", "/snapshots?since=2999-01-01T00:00:00Z")
    assert code == 200 and json.loads(raw)["snapshots"] == []
    code, raw = d.request("GET", "/snapshots?since=soon")
    assert code == 400
    # The CLI gives the same timeline; so does a machine with only the store (no state
    # directory, no daemon): it reads the newest generation's history.
    assert cli_json(d, "log")["snapshots"][0]["snapshot"] == newest["snapshot"]
    elsewhere = write_config(d.base / "laptop.toml", workspace=d.base / "laptop-ws",
                             store=d.store, key=d.key, listen="")
    r = run_cli(elsewhere, "log", "--json")
    assert r.returncode == 0, r.stderr
    remote = json.loads(r.stdout)
    assert remote["source"] == "store"
    assert [e["snapshot"] for e in remote["snapshots"]] == [e["snapshot"] for e in doc["snapshots"]]
    assert remote["snapshots"][0]["generation"] == d.generation()


def test_a_rollback_is_refused_while_the_users_git_holds_a_lock_and_nothing_changes(watcherd):
    d = watcherd().start()
    cli_json(d, "checkpoint", "base")
    (d.workspace / "src" / "app.py").write_text("print('later')\n")
    d.settle()
    before = exact_state(d.workspace)
    lock = d.workspace / ".git" / "index.lock"
    lock.write_text("")
    r = run_cli(d.config, "rollback", "base")
    assert r.returncode == 2, r.stderr
    assert "index.lock" in r.stderr and "busy" in r.stderr
    lock.unlink()
    assert exact_state(d.workspace) == before
    (d.workspace / ".git" / "rebase-merge").mkdir()
    r = run_cli(d.config, "rollback", "base")
    assert r.returncode == 2 and "rebase-merge" in r.stderr
    (d.workspace / ".git" / "rebase-merge").rmdir()
    assert run_cli(d.config, "rollback", "base").returncode == 0


def test_a_rollback_during_continuous_edits_completes_and_keeps_what_was_written(watcherd):
    d = watcherd().start()
    label = cli_json(d, "checkpoint", "clean")
    stop = threading.Event()
    written: list[int] = []
    notes = d.workspace / "notes"

    def agent() -> None:
        n = 0
        while not stop.is_set():
            # The rollback may take notes/ away at any point of an iteration, as it would an
            # agent's: a line counts as written once its append has returned.
            notes.mkdir(exist_ok=True)
            try:
                with open(notes / "log.txt", "a") as f:
                    f.write(f"{n}\n")
            except FileNotFoundError:
                continue
            written.append(n)
            with contextlib.suppress(FileNotFoundError):
                (notes / f"{n % 20}.txt").write_text(f"{n}\n")
            n += 1
            stop.wait(0.003)

    thread = threading.Thread(target=agent)
    thread.start()
    try:
        wait_for(lambda: len(written) > 50, message="the agent to be writing")
        code, body = d.post("/rollback", {"target": "clean"})
    finally:
        stop.set()
        thread.join()
    assert code == 200 and body["status"] == "rolled_back", body
    # Nothing the agent wrote is lost: each line is in the snapshot --undo returns to (edits
    # made while the rollback ran included), or was written after it, into the workspace.
    saved = d.git("show", f"{body['undo']}:notes/log.txt").split()
    assert saved == [str(n) for n in range(len(saved))] and len(saved) > 50
    after = (notes / "log.txt").read_text().split() if (notes / "log.txt").exists() else []
    assert saved + after == [str(n) for n in written]
    # The files the checkpoint holds are exactly the checkpoint's.
    for path in d.git("ls-tree", "-r", "--name-only", label["snapshot"]).splitlines():
        blob = subprocess.run(["git", f"--git-dir={d.repo}", "cat-file", "blob",
                               f"{label['snapshot']}:{path}"], capture_output=True, check=True)
        assert (d.workspace / path).read_bytes() == blob.stdout
    status = d.settle(timeout=30)
    assert status["last_error"] is None
    assert set(d.git("ls-tree", "-r", "--name-only", d.manifest()["snapshot"]).splitlines()) \
        == {p for p in tree_state(d.workspace) if not (d.workspace / p).is_dir()}


def test_fork_to_a_new_key_then_both_keys_move_forward_independently(watcherd, tmp_path):
    a = watcherd(key="acme/app/main").start()
    (a.workspace / "feature.py").write_text("v = 1\n")
    label = cli_json(a, "checkpoint", "demo")
    (a.workspace / "later.py").write_text("after the checkpoint\n")
    a.settle()
    source_before = {k: v for k, v in store_files(a.store).items() if k.startswith("acme/app/")}

    fork_ws = tmp_path / "fork-ws"
    b = watcherd(key="acme/app/experiment", workspace=fork_ws, store=a.store)
    r = run_cli(b.config, "restore", "--from-key", "acme/app/main", "--checkpoint", "demo",
                "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["action"] == "forked"
    assert (fork_ws / "feature.py").read_text() == "v = 1\n"
    assert not (fork_ws / "later.py").exists()
    assert git(fork_ws, "rev-parse", "HEAD") == git(a.workspace, "rev-parse", "HEAD")

    b.start()
    (fork_ws / "experiment.py").write_text("try this\n")
    (a.workspace / "main-only.py").write_text("main\n")
    b.settle()
    a.settle()
    mb, ma = b.manifest(), a.manifest()
    assert mb["forked_from"] == {"key": "acme/app/main", "generation": label["generation"],
                                 "snapshot": label["snapshot"]}
    assert "forked_from" not in ma
    assert b.git("merge-base", "--is-ancestor", label["snapshot"], mb["snapshot"]) == ""
    assert b.shown("experiment.py", mb["snapshot"]) == "try this"
    assert b.shown("main-only.py", mb["snapshot"]) is None
    assert a.shown("main-only.py", ma["snapshot"]) == "main"
    assert a.shown("experiment.py", ma["snapshot"]) is None
    # The fork only read the source key: what was there is still there, byte for byte.
    source_now = store_files(a.store)
    assert all(source_now[k] == v for k, v in source_before.items()
               if not k.endswith("manifest.json"))
    # A fork into a key that already holds generations is refused: histories never mix.
    again = tmp_path / "again-ws"
    c = watcherd(key="acme/app/experiment", workspace=again, store=a.store)
    again.mkdir()
    r = run_cli(c.config, "restore", "--from-key", "acme/app/main")
    assert r.returncode == 2 and "already holds" in r.stderr
    assert list(again.iterdir()) == []


def test_export_is_cloned_by_plain_git_to_what_restore_gives(watcherd, tmp_path):
    d = watcherd().start()
    busy_workspace(d)
    d.settle()
    out = tmp_path / "app.bundle"
    r = run_cli(d.config, "export", "--output", str(out))
    assert r.returncode == 0, r.stderr
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", str(out), str(clone)], check=True)
    restored = tmp_path / "restored"
    restored.mkdir()
    d.restore_into(restored)
    assert tree_state(clone) == tree_state(restored)
    assert git(clone, "log", "-1", "--format=%s") == "watcherd: working state"
    assert git(clone, "rev-parse", "HEAD^") == git(d.workspace, "rev-parse", "HEAD")
    heads = git(clone, "ls-remote", str(out))
    assert "refs/heads/feature" in heads and "refs/tags/v1" in heads and "refs/stash" in heads
    assert "refs/watcherd" not in heads  # the history (and its recorded config) stays home
    # The same generation exports to the same bytes, to a file or to stdout.
    streamed = subprocess.run([str(Path(sys.executable).with_name("watcherd")), "--config",
                               str(d.config), "export", "-o", "-"], capture_output=True)
    assert streamed.returncode == 0 and streamed.stdout == out.read_bytes()
    # A directory, an unknown generation or checkpoint are usage errors and write nothing.
    r = run_cli(d.config, "export", "-o", str(tmp_path))
    assert r.returncode == 2 and "is a directory" in r.stderr
    missing = tmp_path / "none.bundle"
    r = run_cli(d.config, "export", "--checkpoint", "nope", "-o", str(missing))
    assert r.returncode == 2 and not missing.exists()


def test_labelled_generations_survive_keep_and_keep_checkpoints_bounds_them(watcherd, tmp_path):
    d = watcherd(store_options={"keep": 2, "keep_checkpoints": 2}).start()
    (d.workspace / "v.txt").write_text("pinned\n")
    pinned = cli_json(d, "checkpoint", "pinned")
    for n in range(5):
        (d.workspace / "v.txt").write_text(f"later {n}\n")
        assert run_cli(d.config, "snapshot").returncode == 0
    gens = [g["generation"] for g in d.manifest()["history"]] + [d.generation()]
    assert pinned["generation"] in gens and len(gens) == 3
    target = tmp_path / "back"
    target.mkdir()
    d.restore_into(target, "--checkpoint", "pinned")
    assert (target / "v.txt").read_text() == "pinned\n"

    cli_json(d, "checkpoint", "two")
    (d.workspace / "v.txt").write_text("three\n")
    cli_json(d, "checkpoint", "three")
    names = [c["name"] for c in d.manifest()["checkpoints"]]
    assert names == ["three", "two"]
    (d.workspace / "v.txt").write_text("after\n")
    assert run_cli(d.config, "snapshot").returncode == 0
    kept = {g["generation"] for g in d.manifest()["history"]} | {d.generation()}
    assert pinned["generation"] not in kept  # no longer pinned: keep pruned it


def test_rollback_without_a_daemon_and_the_git_directorys_own_entries_kept(tmp_path):
    ws = one_commit(tmp_path / "ws")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("not watcherd's\n")
    os.symlink(outside, ws / ".git" / "modules")  # an agent's planted link
    hook = ws / ".git" / "hooks" / "pre-commit"
    hook.write_text("#!/bin/sh\nexit 0\n")
    config = write_config(tmp_path / "w.toml", workspace=ws, store=tmp_path / "store",
                          key="solo/main", listen="")
    assert run_cli(config, "checkpoint", "one").returncode == 0
    (ws / "a.txt").write_text("two\n")
    git(ws, "commit", "--quiet", "-am", "two")
    git(ws, "config", "user.note", "set after the checkpoint")
    r = run_cli(config, "rollback", "one")
    assert r.returncode == 0, r.stderr
    assert (ws / "a.txt").read_text() == "one\n"
    assert git(ws, "log", "--format=%s") == "one"
    # The user's config, hooks and planted link are theirs, kept as they are; nothing outside
    # the workspace was touched or followed.
    assert git(ws, "config", "user.note") == "set after the checkpoint"
    assert hook.read_text() == "#!/bin/sh\nexit 0\n"
    assert os.readlink(ws / ".git" / "modules") == str(outside)
    assert (outside / "keep.txt").read_text() == "not watcherd's\n"
    assert sorted(p.name for p in ws.iterdir()) == [".git", "a.txt"]
    r = run_cli(config, "rollback", "--undo")
    assert r.returncode == 0 and (ws / "a.txt").read_text() == "two\n"
    assert git(ws, "log", "--format=%s") == "two\none"


@pytest.mark.parametrize("step", ["exchanged", "renamed"])
@pytest.mark.parametrize("next_run", ["start", "snapshot", "checkpoint"])
def test_a_rollback_killed_while_swapping_is_finished_by_the_next_run(tmp_path, monkeypatch, step,
                                                                        next_run):
    """Finished by whatever runs next under watcherd's lock: a daemon's start, or a standalone
    snapshot or checkpoint, which would otherwise save the half-swapped workspace."""
    from helpers import state_repo

    from watcherd import dirfd, rollback, snapshot

    ws = one_commit(tmp_path / "ws")
    git(ws, "config", "user.note", "the user's")
    repo = state_repo(ws)
    snapshot.prepare(repo)
    first = snapshot.take(repo).snapshot_head
    (ws / "a.txt").write_text("two\n")
    git(ws, "commit", "--quiet", "-am", "two")
    two = git(ws, "rev-parse", "HEAD")
    snapshot.take(repo)

    def killed(root: Path, journal: dict) -> None:
        # One step of the swap (the exchange, or the first of the two renames), then the
        # process dies.
        with dirfd.opened(root) as rfd:
            if step == "exchanged":
                assert dirfd.exchange(rfd, journal["staging"], ".git")
            else:
                os.rename(".git", journal["old"], src_dir_fd=rfd, dst_dir_fd=rfd)
        raise KeyboardInterrupt

    monkeypatch.setattr(rollback, "_swap", killed)
    with pytest.raises(KeyboardInterrupt), repo.lock():
        rollback.apply(repo, rollback.Target(first, None, "test"))
    monkeypatch.undo()
    if next_run == "start":
        rollback.recover(repo)
    else:
        config = write_config(tmp_path / "w.toml", workspace=ws, store=tmp_path / "store",
                              key="test/key", listen="", state_dir=tmp_path / "ws-state")
        args = ["checkpoint", "after"] if next_run == "checkpoint" else ["snapshot"]
        r = run_cli(config, *args)
        assert r.returncode == 0, r.stderr
    assert git(ws, "log", "--format=%s") == "one"
    assert (ws / "a.txt").read_text() == "one\n"
    assert git(ws, "config", "user.note") == "the user's"  # the user's config came back
    assert git(ws, "cat-file", "-t", two) == "commit"  # and so did their objects
    assert sorted(p.name for p in ws.iterdir()) == [".git", "a.txt"]
    assert not (repo.dir / rollback.JOURNAL).exists()


def test_a_generation_no_longer_in_watchers_repository_is_fetched_from_the_store(tmp_path):
    from watcherd import rollback, snapshot
    from watcherd.generations import Generations
    from watcherd.repo import Repo
    from watcherd.store.local import LocalStore

    ws = one_commit(tmp_path / "ws")
    generations = Generations(LocalStore(tmp_path / "store"), "k/main")
    first = Repo(tmp_path / "state-1", "k/main", ws)
    snapshot.prepare(first)
    snapshot.take(first)
    saved = generations.save(first)
    expected = exact_state(ws)
    # The state directory is lost (a new pod without its volume): a new history starts there.
    (ws / "a.txt").write_text("two\n")
    git(ws, "commit", "--quiet", "-am", "two")
    repo = Repo(tmp_path / "state-2", "k/main", ws)
    snapshot.prepare(repo)
    snapshot.take(repo)
    assert not repo.bare.has_commit(saved.snapshot)
    manifest, _ = generations.read_manifest()
    target = rollback.resolve(repo, manifest, str(saved.generation))
    rollback.fetch_target(repo, generations, manifest, target)
    with repo.lock():
        rollback.apply(repo, target)
    assert exact_state(ws) == expected


def test_a_forced_rollback_never_follows_a_directory_swapped_for_a_link(tmp_path, monkeypatch):
    from helpers import state_repo

    from watcherd import rollback, snapshot

    ws = one_commit(tmp_path / "ws")
    repo = state_repo(ws)
    snapshot.prepare(repo)
    first = snapshot.take(repo).snapshot_head
    (ws / "dir").mkdir()
    (ws / "dir" / "c.txt").write_text("the agent's\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "c.txt").write_text("not the workspace's\n")
    taken = snapshot.take_locked

    def then_swapped(*args, **kwargs):
        snap = taken(*args, **kwargs)  # the undo snapshot holds dir/c.txt
        (ws / "dir" / "c.txt").unlink()
        (ws / "dir").rmdir()
        os.symlink(outside, ws / "dir")  # ...and the agent swaps the directory for a link
        return snap

    monkeypatch.setattr(snapshot, "take_locked", then_swapped)
    with repo.lock():
        rollback.apply(repo, rollback.Target(first, None, "test"), attempts=1)  # forced at once
    assert (outside / "c.txt").read_text() == "not the workspace's\n"
    assert sorted(p.name for p in outside.iterdir()) == ["c.txt"]
    # Nothing outside was read into watcherd's history either.
    blob = git(tmp_path, "hash-object", "--stdin", input=b"not the workspace's\n")
    assert repo.bare.run("cat-file", "-e", blob, check=False).returncode != 0
    assert (ws / "a.txt").read_text() == "one\n"
    assert not [p for p in os.listdir(ws) if p.startswith(".watcherd-")]


def test_a_rollback_never_writes_through_a_directory_swapped_for_a_link_while_it_runs(tmp_path):
    """The agent swaps a directory the rollback writes for a link to outside, and back, as fast
    as it can, while rollbacks run: whatever each rollback does (finish, retry, refuse), nothing
    outside the workspace is ever written, removed or read into watcherd's history."""
    from helpers import state_repo

    from watcherd import dirfd, snapshot
    from watcherd.errors import WatcherdError

    ws = one_commit(tmp_path / "ws")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "f000.txt").write_text("not the workspace's\n")
    os.symlink(outside, ws / "link")
    repo = state_repo(ws)
    snapshot.prepare(repo)
    (ws / "dir").mkdir()
    for i in range(150):
        (ws / "dir" / f"f{i:03}.txt").write_text(f"first {i}\n")
    first = snapshot.take(repo).snapshot_head
    for i in range(150):
        (ws / "dir" / f"f{i:03}.txt").write_text(f"second {i}\n")
    second = snapshot.take(repo).snapshot_head
    stop = threading.Event()

    def agent() -> None:  # dir and link trade places in one step, again and again
        with dirfd.opened(ws) as rfd:
            while not stop.is_set():
                try:
                    dirfd.exchange(rfd, "dir", "link")
                except OSError:
                    pass  # a rollback moved one of them meanwhile: try again

    swapper = threading.Thread(target=agent, daemon=True)
    swapper.start()
    outcomes = []
    try:
        for n in range(12):
            try:
                roll(repo, first if n % 2 == 0 else second, attempts=1 + n % 3)
                outcomes.append("rolled back")
            except WatcherdError as exc:  # refused, or a snapshot git could not take: retried
                outcomes.append(str(exc))
            assert sorted(p.name for p in outside.iterdir()) == ["f000.txt"]
            assert (outside / "f000.txt").read_text() == "not the workspace's\n"
    finally:
        stop.set()
        swapper.join(timeout=10)
    # Some of them changed files while the agent swapped (the race was run, not dodged).
    assert any(o == "rolled back" or "files changed so far" in o for o in outcomes), outcomes
    # What git read through the link while it added files is in no snapshot (never saved).
    blob = git(tmp_path, "hash-object", "--stdin", input=b"not the workspace's\n")
    assert blob not in repo.bare.out("rev-list", "--objects", "--all")
    # Once the agent stops, a rollback gives the snapshot's files back, nothing left behind.
    if (ws / "dir").is_symlink() and (ws / "link").is_dir():
        with dirfd.opened(ws) as rfd:
            dirfd.exchange(rfd, "dir", "link")
    snapshot.take(repo)
    roll(repo, first)
    assert {k: v for k, v in tree_state(ws).items() if k.startswith("dir/")} == {
        f"dir/f{i:03}.txt": ("file", 0, f"first {i}\n".encode()) for i in range(150)}
    assert os.readlink(ws / "link") == str(outside)
    assert not [p for p in os.listdir(ws) if p.startswith(".watcherd-")]


def test_a_rollback_turns_files_into_directories_links_and_back(tmp_path):
    """Every kind of change one path can see (a file becomes a directory, a directory a file,
    a file a link, the executable bit), both ways, gives the exact state back."""
    ws, repo, _ = library_workspace(tmp_path)
    from watcherd import snapshot

    (ws / "f").write_text("a file\n")
    (ws / "d").mkdir()
    (ws / "d" / "deep").mkdir()
    (ws / "d" / "deep" / "x.txt").write_text("deep\n")
    (ws / "tool").write_text("#!/bin/sh\n")
    (ws / "l").write_text("a file, later a link\n")
    git(ws, "add", "-A")
    git(ws, "commit", "--quiet", "-m", "shape one")
    one, one_state = snapshot.take(repo).snapshot_head, exact_state(ws)
    (ws / "f").unlink()
    (ws / "f").mkdir()
    (ws / "f" / "inner.txt").write_text("now a directory\n")
    import shutil

    shutil.rmtree(ws / "d")
    (ws / "d").write_text("now a file\n")
    (ws / "tool").chmod(0o755)
    (ws / "l").unlink()
    os.symlink("a.txt", ws / "l")
    git(ws, "add", "-A")
    git(ws, "commit", "--quiet", "-m", "shape two")
    two, two_state = snapshot.take(repo).snapshot_head, exact_state(ws)
    roll(repo, one)
    assert exact_state(ws) == one_state
    roll(repo, two)
    assert exact_state(ws) == two_state
    assert not [p for p in os.listdir(ws) if p.startswith(".watcherd-")]


def test_an_edit_made_while_the_files_change_is_kept(tmp_path, monkeypatch):
    """An agent's edits land after the rollback checked the files and right before it replaced
    one and removed another: what it wrote becomes one more snapshot, which --undo returns to."""
    from watcherd import snapshot, worktree

    ws, repo, first = library_workspace(tmp_path)
    (ws / "a.txt").write_text("two\n")
    (ws / "b.txt").write_text("b two\n")
    snapshot.take(repo)

    def edited_first(step):
        def edited(self, n, change):
            (ws / os.fsdecode(change.path)).write_text(f"the agent's {change.path.decode()}\n")
            return step(self, n, change)
        return edited

    monkeypatch.setattr(worktree.Checkout, "_write", edited_first(worktree.Checkout._write))
    monkeypatch.setattr(worktree.Checkout, "_remove", edited_first(worktree.Checkout._remove))
    undo = roll(repo, first)
    assert (ws / "a.txt").read_text() == "one\n" and not (ws / "b.txt").exists()
    assert sgit_show(repo, undo, "a.txt") == "the agent's a.txt\n"
    assert sgit_show(repo, undo, "b.txt") == "the agent's b.txt\n"
    roll(repo, undo)
    assert (ws / "a.txt").read_text() == "the agent's a.txt\n"


@pytest.mark.parametrize("filesystem", ["no renameat2", "another filesystem under sub/"])
def test_a_rollback_where_files_cannot_be_exchanged_into_the_rescue_directory(
        tmp_path, monkeypatch, filesystem):
    """Where the kernel cannot exchange entries, or a directory is another filesystem than the
    workspace root (a volume mounted inside it), the files still change exactly, what they held
    is still compared (an edit kept), and nothing is left behind."""
    import errno

    from watcherd import dirfd, snapshot, worktree

    ws, repo, _ = library_workspace(tmp_path)
    (ws / "sub").mkdir()
    (ws / "sub" / "s.txt").write_text("sub one\n")
    (ws / "sub" / "gone.txt").write_text("removed by the rollback\n")
    first = snapshot.take(repo).snapshot_head
    state_one = tree_state(ws)
    (ws / "sub" / "s.txt").write_text("sub two\n")
    (ws / "sub" / "gone.txt").unlink()
    (ws / "sub" / "new.txt").write_text("only in two\n")
    snapshot.take(repo)
    if filesystem == "no renameat2":
        monkeypatch.setattr(dirfd, "_renameat2", lambda *args: False)
    else:
        sub = os.stat(ws / "sub").st_ino

        def crosses(*fds: int) -> bool:
            kinds = {os.fstat(fd).st_ino == sub for fd in fds}
            return len(kinds) == 2 and any(".rescue" in os.readlink(f"/proc/self/fd/{fd}")
                                           for fd in fds)

        real_rename, real_renameat2 = os.rename, dirfd._renameat2

        def rename(src, dst, *, src_dir_fd=None, dst_dir_fd=None):
            if src_dir_fd is not None and crosses(src_dir_fd, dst_dir_fd):
                raise OSError(errno.EXDEV, "Invalid cross-device link")
            return real_rename(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)

        def renameat2(src_fd, a, dst_fd, b, flags):
            if crosses(src_fd, dst_fd):
                raise OSError(errno.EXDEV, "Invalid cross-device link")
            return real_renameat2(src_fd, a, dst_fd, b, flags)

        monkeypatch.setattr(worktree.os, "rename", rename)
        monkeypatch.setattr(dirfd, "_renameat2", renameat2)
    write = worktree.Checkout._write

    def edited_first(self, n, change):
        if change.path == b"sub/s.txt":
            (ws / "sub" / "s.txt").write_text("the agent's\n")
        return write(self, n, change)

    monkeypatch.setattr(worktree.Checkout, "_write", edited_first)
    undo = roll(repo, first)
    assert tree_state(ws) == state_one
    assert sgit_show(repo, undo, "sub/s.txt") == "the agent's\n"
    assert sorted(os.listdir(ws / "sub")) == ["gone.txt", "s.txt"]
    assert not [p for p in os.listdir(ws) if p.startswith(".watcherd-")]


# -- what an agent in the workspace (or a careless user) can do to a rollback ---------------------


def library_workspace(tmp_path: Path):
    """A workspace with one commit, watcherd's repository for it, and its first snapshot."""
    from helpers import state_repo

    from watcherd import snapshot

    ws = one_commit(tmp_path / "ws")
    repo = state_repo(ws)
    snapshot.prepare(repo)
    return ws, repo, snapshot.take(repo).snapshot_head


def roll(repo, snapshot_id: str, **kwargs) -> str:
    from watcherd import rollback

    with repo.lock():
        return rollback.apply(repo, rollback.Target(snapshot_id, None, "test"), **kwargs)


def test_names_planted_beside_git_never_wedge_a_rollback_or_the_next_start(tmp_path, monkeypatch):
    from watcherd import dirfd, rollback, snapshot

    ws, repo, first = library_workspace(tmp_path)
    (ws / "a.txt").write_text("two\n")
    snapshot.take(repo)
    placed = dirfd.place

    def and_planted(src, dir_fd, name):
        placed(src, dir_fd, name)
        # The agent sees the staged name and plants every name it could derive from it.
        token = name.split("-")[-1].split(".")[0]
        for kind in ("old", "rescue", "git-2"):
            (ws / f".watcherd-rollback-{token}.{kind}").mkdir()
            (ws / f".watcherd-rollback-{token}.{kind}" / "mine").write_text("x")

    monkeypatch.setattr(dirfd, "place", and_planted)
    roll(repo, first)
    assert (ws / "a.txt").read_text() == "one\n" and git(ws, "log", "--format=%s") == "one"
    # A journal that cannot be acted on is reported, never raised into the daemon's start.
    monkeypatch.undo()
    repo.write_journal(rollback.JOURNAL, {"staging": ".watcherd-rollback-00.git",
                                          "old": ".watcherd-rollback-01.old",
                                          "rescue": ".watcherd-rollback-02.rescue",
                                          "phase": "swapping", "new": [1, 2]})
    (ws / ".watcherd-rollback-00.git").mkdir()

    def broken(root, journal):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(rollback, "_swap", broken)
    rollback.recover(repo)  # logs rollback.recovery_failed


def test_a_rollback_never_overwrites_files_the_rules_ignore(tmp_path):
    from watcherd import rollback, snapshot

    ws, repo, _ = library_workspace(tmp_path)
    (ws / ".env").write_text("TEMPLATE=1\n")
    (ws / "data").write_text("a tracked file\n")
    git(ws, "add", ".env", "data")
    git(ws, "commit", "--quiet", "-m", "template")
    tracked = snapshot.take(repo).snapshot_head
    # Later: .env and data/ are ignored, and hold what no snapshot keeps.
    git(ws, "rm", "--cached", "--quiet", ".env", "data")
    (ws / ".gitignore").write_text(".env\ndata/\n")
    (ws / ".env").write_text("SECRET=hunter2\n")
    (ws / "data").unlink()
    (ws / "data").mkdir()
    (ws / "data" / "app.db").write_bytes(b"\x00rows")
    git(ws, "add", ".gitignore")
    git(ws, "commit", "--quiet", "-m", "ignore them")
    snapshot.take(repo)
    before = tree_state(ws)
    with pytest.raises(rollback.RollbackRefused, match=r"ignored.*\.env.*data"):
        roll(repo, tracked)
    assert tree_state(ws) == before
    assert git(ws, "log", "-1", "--format=%s") == "ignore them"


def test_a_rollback_writes_into_ignored_directories_and_never_over_what_they_hold(tmp_path):
    """Files saved while untracked, then ignored (``build/`` added to .gitignore): a rollback
    to that snapshot writes them back into the ignored directory and leaves its other files as
    they are. A path holding what the target does not (a file rebuilt since) refuses it; an
    entry already as the target has it, or an ignored directory emptied, is no obstacle."""
    from watcherd import rollback, snapshot

    ws, repo, _ = library_workspace(tmp_path)
    (ws / "build" / "gen").mkdir(parents=True)
    os.symlink("a.txt", ws / "build" / "e.js")
    (ws / "build" / "gen" / "f.js").write_text("generated\n")
    (ws / "out.map").write_text("a map\n")
    target = snapshot.take(repo).snapshot_head
    (ws / ".gitignore").write_text("build/\nout.map\n")
    (ws / "build" / "gen" / "f.js").unlink()  # build/gen/ is left empty
    (ws / "build" / "kept.log").write_text("no snapshot holds this\n")
    snapshot.take(repo)
    for path, text in (("build/gen/f.js", "rebuilt since\n"), ("out.map", "another map\n")):
        before = (ws / path).read_text() if (ws / path).exists() else None
        (ws / path).write_text(text)
        with pytest.raises(rollback.RollbackRefused, match=r"ignored.*\((build|out\.map)\)"):
            roll(repo, target)
        assert (ws / path).read_text() == text
        if before is None:
            (ws / path).unlink()
        else:
            (ws / path).write_text(before)

    roll(repo, target)

    assert os.readlink(ws / "build" / "e.js") == "a.txt"
    assert (ws / "build" / "gen" / "f.js").read_text() == "generated\n"
    assert (ws / "out.map").read_text() == "a map\n"
    assert (ws / "build" / "kept.log").read_text() == "no snapshot holds this\n"
    assert not (ws / ".gitignore").exists()
    assert not [p for p in os.listdir(ws) if p.startswith(".watcherd-")]


def test_a_sparse_file_of_terabytes_where_a_rollback_writes_refuses_it_unread(tmp_path):
    """A file nearly all holes (``truncate -s 1T``) at a path the rollback changes, or at one
    it adds under an ignored directory, would hold the rollback (and the snapshots waiting on
    its lock) for as long as reading its zeros takes: it is refused at once, by its status,
    and the file stays."""
    from watcherd import rollback, snapshot

    ws, repo, first = library_workspace(tmp_path)
    (ws / "build").mkdir()
    (ws / "build" / "out.bin").write_text("built\n")
    target = snapshot.take(repo).snapshot_head
    (ws / ".gitignore").write_text("build/\n")
    (ws / "a.txt").write_text("two\n")
    snapshot.take(repo)
    for path, to in (("a.txt", first), ("build/out.bin", target)):
        (ws / path).write_bytes(b"")
        punch_hole(ws / path, 1 << 40)
        with pytest.raises(rollback.RollbackRefused, match="nearly all holes"):
            roll(repo, to)
        assert os.stat(ws / path).st_size == 1 << 40
        (ws / path).unlink()


def test_a_sparse_file_the_rollback_keeps_never_holds_its_index_refresh(tmp_path, monkeypatch):
    """helper-40: a tracked file the rollback does not change, made a terabyte of holes, is
    hashed whole by the new index's refresh (its stat data, a saving of the user's time only):
    the refresh gives up within its bound, and the rollback finishes whole."""
    from watcherd import rollback, snapshot

    monkeypatch.setattr(rollback, "_REFRESH_FOR", 2.0)
    ws, repo, first = library_workspace(tmp_path)
    (ws / "b.txt").write_text("two\n")
    snapshot.take(repo)
    os.truncate(ws / "a.txt", 1 << 40)
    punch_hole(ws / "a.txt", 1 << 40)
    snapshot.take(repo)

    roll(repo, first)

    assert not (ws / "b.txt").exists()
    assert os.stat(ws / "a.txt").st_size == 1 << 40
    assert not (ws / ".git" / "index.lock").exists()
    assert git(ws, "log", "-1", "--format=%s") == "one"


def test_a_sparse_file_planted_once_the_checks_are_done_is_left_unread_and_kept(
        tmp_path, monkeypatch):
    """The agent sees the rescue directory appear and makes a file the rollback replaces a
    terabyte of holes: what the rollback put aside is judged as looked at and as opened, that
    file is neither read nor kept in a snapshot, and it is left (said) in the rescue directory,
    never removed with it."""
    from structlog.testing import capture_logs

    from watcherd import snapshot, worktree

    ws, repo, first = library_workspace(tmp_path)
    (ws / "a.txt").write_text("two\n")
    snapshot.take(repo)
    apply = worktree.Checkout.apply

    def planted(self, changes):
        os.truncate(ws / "a.txt", 1 << 40)
        return apply(self, changes)

    monkeypatch.setattr(worktree.Checkout, "apply", planted)
    with capture_logs() as logs:
        roll(repo, first)

    assert (ws / "a.txt").read_text() == "one\n"
    left = [e for e in logs if e["event"] == "rollback.rescue_left"]
    assert len(left) == 1 and left[0]["unread"] == 1
    rescue = ws / left[0]["path"]
    assert [os.stat(p).st_size for p in rescue.iterdir()] == [1 << 40]


def test_an_edit_put_aside_that_cannot_be_read_is_left_and_named_not_lost(tmp_path, monkeypatch):
    """An edit made during the rollback that watcherd then cannot read (``chmod 000`` by
    another uid; the suite runs as root, so the refusal is injected) fails neither the rollback
    nor its recovery: it is left in the rescue directory and named, never removed with it."""
    from structlog.testing import capture_logs

    from watcherd import snapshot, worktree

    ws, repo, first = library_workspace(tmp_path)
    (ws / "a.txt").write_text("two\n")
    snapshot.take(repo)
    apply = worktree.Checkout.apply

    def edited(self, changes):
        (ws / "a.txt").write_text("an edit made meanwhile\n")
        return apply(self, changes)

    def unreadable(git, spool, dir_fd, name, **kw):
        raise PermissionError(13, "Permission denied", name)

    monkeypatch.setattr(worktree.Checkout, "apply", edited)
    monkeypatch.setattr(worktree, "store_entry", unreadable)
    with capture_logs() as logs:
        roll(repo, first, attempts=1)

    monkeypatch.undo()
    assert (ws / "a.txt").read_text() == "one\n"
    left = [e for e in logs if e["event"] == "rollback.rescue_left"]
    assert len(left) == 1 and left[0]["unread"] == 1
    kept = [p.read_text() for p in (ws / left[0]["path"]).iterdir()]
    assert kept == ["an edit made meanwhile\n"]


def test_a_rollback_leaves_an_ignored_file_already_as_the_target_has_it_untouched(tmp_path):
    """A ``.env`` saved while untracked, then ignored and made private: the rollback neither
    refuses nor replaces it. Its permissions, its hard links and a reader holding it open keep
    the same file."""
    from watcherd import snapshot

    ws, repo, _ = library_workspace(tmp_path)
    (ws / ".env").write_text("SECRET=hunter2\n")
    target = snapshot.take(repo).snapshot_head
    (ws / ".gitignore").write_text(".env\nkeep/\n")
    os.chmod(ws / ".env", 0o600)
    (ws / "keep").mkdir()
    os.link(ws / ".env", ws / "keep" / "env")
    snapshot.take(repo)
    before = os.stat(ws / ".env")
    fd = os.open(ws / ".env", os.O_WRONLY | os.O_APPEND)
    try:
        roll(repo, target)
        os.write(fd, b"WRITTEN=after\n")
    finally:
        os.close(fd)

    after = os.stat(ws / ".env")
    assert (after.st_ino, after.st_mode, after.st_nlink) == \
        (before.st_ino, before.st_mode, before.st_nlink)
    assert (ws / ".env").read_text() == "SECRET=hunter2\nWRITTEN=after\n"
    assert not (ws / ".gitignore").exists()


def test_a_rollback_leaves_the_files_of_a_nested_repository_as_they_are(tmp_path):
    """``sub/`` saved as files, then made a repository whose .gitignore ignores ``.env``,
    which holds a secret: a rollback to when ``sub/`` was files writes nothing in it (its
    ignored files are out of the workspace's sight, its files are its own), keeps the secret
    in no snapshot, and the snapshot it returns to keeps ``sub`` as a repository."""
    from watcherd import snapshot

    ws, repo, _ = library_workspace(tmp_path)
    (ws / "sub").mkdir()
    (ws / "sub" / ".env").write_text("TEMPLATE=1\n")
    (ws / "sub" / "r.txt").write_text("r\n")
    target = snapshot.take(repo).snapshot_head
    git(ws / "sub", "init", "--quiet")
    (ws / "sub" / ".gitignore").write_text(".env\n")
    git(ws / "sub", "add", ".gitignore", "r.txt")
    git(ws / "sub", "commit", "--quiet", "-m", "sub")
    (ws / "sub" / ".env").write_text("SECRET=hunter2\n")
    (ws / "sub" / "r.txt").write_text("edited in sub\n")
    snapshot.take(repo)

    undo = roll(repo, target)

    assert (ws / "sub" / ".env").read_text() == "SECRET=hunter2\n"
    assert (ws / "sub" / "r.txt").read_text() == "edited in sub\n"
    assert (ws / "sub" / ".git").is_dir()
    listed = repo.bare.out("ls-tree", "-r", undo)
    assert "160000 commit" in listed and "sub/" not in listed
    secret = git(tmp_path, "hash-object", "--stdin", input=b"SECRET=hunter2\n")
    assert secret not in repo.bare.out("rev-list", "--objects", "--all")


@pytest.mark.parametrize("planted", ["an empty .git directory", "a .git file", "a .git link"])
def test_a_planted_git_name_never_keeps_a_rollback_from_the_workspaces_own_files(tmp_path,
                                                                               planted):
    """A nested repository is what the snapshot recorded as one, not any ``.git`` name: the
    agent plants one (no repository to git, which saves the directory's files as the
    workspace's) in a directory whose file it made a backdoor, and the rollback still puts
    the file back."""
    from watcherd import snapshot

    ws, repo, _ = library_workspace(tmp_path)
    (ws / "src").mkdir()
    (ws / "src" / "a.py").write_text("clean\n")
    clean = snapshot.take(repo).snapshot_head
    (ws / "src" / "a.py").write_text("EVIL backdoor\n")
    (ws / "src" / "b.py").write_text("more of it\n")
    snapshot.take(repo)
    dotgit = ws / "src" / ".git"
    if planted == "an empty .git directory":
        dotgit.mkdir()
    elif planted == "a .git file":
        dotgit.write_text("")
    else:
        os.symlink(tmp_path, dotgit)

    roll(repo, clean)

    assert (ws / "src" / "a.py").read_text() == "clean\n"
    assert not (ws / "src" / "b.py").exists()


def test_a_rollback_keeps_the_users_reflogs_and_every_object_their_git_holds(tmp_path):
    ws, repo, first = library_workspace(tmp_path)
    (ws / "a.txt").write_text("two\n")
    git(ws, "commit", "--quiet", "-am", "two")
    lost = git(ws, "rev-parse", "HEAD")
    git(ws, "reset", "--quiet", "--hard", "HEAD~1")  # "two" is reachable from the reflog only
    from watcherd import snapshot

    snapshot.take(repo)
    roll(repo, first)
    assert git(ws, "cat-file", "-t", lost) == "commit"
    assert lost in git(ws, "reflog", "--format=%H")
    assert git(ws, "rev-parse", "ORIG_HEAD") == lost
    assert git(ws, "fsck", "--no-progress", "--no-dangling") == ""


def test_edits_an_interrupted_forced_rollback_had_linked_aside_are_kept(
        tmp_path, monkeypatch):
    from watcherd import rollback, snapshot

    ws, repo, first = library_workspace(tmp_path)
    (ws / "a.txt").write_text("two\n")
    snapshot.take(repo)
    taken = snapshot.take_locked

    def then_edited(*args, **kwargs):
        snap = taken(*args, **kwargs)
        (ws / "a.txt").write_text("written while the rollback ran\n")
        return snap

    kept_edits, calls = rollback._kept_edits, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:  # after git changed the files, before the edits were kept
            raise KeyboardInterrupt
        return kept_edits(*args, **kwargs)

    monkeypatch.setattr(snapshot, "take_locked", then_edited)
    monkeypatch.setattr(rollback, "_kept_edits", interrupted)
    with pytest.raises(KeyboardInterrupt):
        roll(repo, first, attempts=1)
    head = repo.snapshot_head()
    assert sgit_show(repo, head, "a.txt") == "written while the rollback ran\n"
    assert not [p for p in os.listdir(ws) if p.startswith(".watcherd-")]


def test_an_object_swapped_for_a_fifo_mid_rollback_blocks_nothing(tmp_path, monkeypatch):
    """A blob the snapshot found among the workspace's own objects (``git hash-object -w``) is
    not written again by git; the agent swaps that loose object for a FIFO while the rollback
    runs. watcherd reads its own copy (taken through a descriptor, regular files only), never
    the workspace's entry: the rollback completes."""
    from watcherd import snapshot, worktree

    ws, repo, _ = library_workspace(tmp_path)
    (ws / "f.txt").write_text("content only in a dangling object\n")
    blob = git(ws, "hash-object", "-w", "f.txt")
    target = snapshot.take(repo).snapshot_head
    (ws / "f.txt").write_text("later\n")
    snapshot.take(repo)
    loose = ws / ".git" / "objects" / blob[:2] / blob[2:]
    apply = worktree.Checkout.apply

    def then_fifo(self, changes):
        loose.chmod(0o644)
        loose.unlink()
        os.mkfifo(loose)
        return apply(self, changes)

    monkeypatch.setattr(worktree.Checkout, "apply", then_fifo)
    roll(repo, target, attempts=1)
    assert (ws / "f.txt").read_text() == "content only in a dangling object\n"


def test_a_git_that_never_answers_fails_the_rollback_in_bounded_time(tmp_path, monkeypatch):
    """Whatever makes git's blob reader block (a file it opens that never answers), the
    rollback waits the door's timeout, not for ever, and leaves nothing half done."""
    import subprocess
    import time

    from watcherd import snapshot, worktree

    ws, repo, first = library_workspace(tmp_path)
    (ws / "a.txt").write_text("two\n")
    snapshot.take(repo)

    def silent(self):
        self._cat = subprocess.Popen(["sleep", "120"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        return self

    monkeypatch.setattr(worktree.Checkout, "__enter__", silent)
    repo.bare.timeout = 2
    started = time.monotonic()
    with pytest.raises(OSError, match="said nothing for 2s"):
        roll(repo, first, attempts=1)
    assert time.monotonic() - started < 30
    assert (ws / "a.txt").read_text() == "two\n"
    assert not [p for p in os.listdir(ws) if p.startswith(".watcherd-")]


def test_a_tree_thousands_of_levels_deep_never_stops_a_rollback_or_the_next_start(tmp_path):
    """The agent plants a directory 3,000 levels deep among the git directory's lock names
    (left behind in the old one, removed after the swap): the rollback finishes, and a journal
    that cannot be acted on is reported, never raised into a start."""
    from watcherd import rollback, snapshot

    ws, repo, first = library_workspace(tmp_path)
    (ws / "a.txt").write_text("two\n")
    snapshot.take(repo)
    os.mkdir(ws / ".git" / "x.lock")
    fd = os.open(ws / ".git" / "x.lock", os.O_RDONLY)
    for _ in range(3000):
        os.mkdir("d", dir_fd=fd)
        deeper = os.open("d", os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = deeper
    os.close(fd)
    roll(repo, first)
    assert (ws / "a.txt").read_text() == "one\n"
    assert not [p for p in os.listdir(ws) if p.startswith(".watcherd-")]

    def broken(root, journal):
        raise RecursionError("maximum recursion depth exceeded")

    repo.write_journal(rollback.JOURNAL, {"staging": ".watcherd-rollback-00.git",
                                          "old": ".watcherd-rollback-01.old",
                                          "rescue": ".watcherd-rollback-02.rescue",
                                          "phase": "swapping", "new": [1, 2]})
    (ws / ".watcherd-rollback-00.git").mkdir()
    real = rollback._swap
    rollback._swap = broken
    try:
        rollback.recover(repo)  # logs rollback.recovery_failed, raises nothing
    finally:
        rollback._swap = real


def test_an_edit_is_kept_even_when_what_was_put_aside_cannot_be_removed(tmp_path, monkeypatch):
    """The agent keeps filling the rescue directory so that removing it fails: the edit made
    during the rollback is in a snapshot all the same, and the rollback completes."""
    from watcherd import dirfd, rollback, snapshot, worktree

    ws, repo, first = library_workspace(tmp_path)
    (ws / "a.txt").write_text("two\n")
    snapshot.take(repo)
    write = worktree.Checkout._write

    def edited(self, n, change):
        (ws / "a.txt").write_text("typed during the rollback\n")
        return write(self, n, change)

    discard = rollback._discard_rescue

    def refill_first(rfd, journal):
        raise OSError(39, "Directory not empty")

    monkeypatch.setattr(worktree.Checkout, "_write", edited)
    monkeypatch.setattr(rollback, "_discard_rescue", refill_first)
    undo = roll(repo, first, attempts=1)
    assert (ws / "a.txt").read_text() == "one\n"
    assert sgit_show(repo, undo, "a.txt") == "typed during the rollback\n"
    assert rollback.last_rollback(repo)["undo"] == undo
    monkeypatch.undo()
    with dirfd.opened(ws) as rfd:
        for name in [p for p in os.listdir(ws) if p.endswith(".rescue")]:
            discard(rfd, {"rescue": name})


def test_a_sparse_file_put_aside_costs_the_state_directory_what_it_holds(tmp_path, monkeypatch):
    """An edit during a rollback makes a file a 512 MiB hole: keeping it copies its data, not
    its size, through the state directory."""
    from watcherd import snapshot, worktree

    ws, repo, first = library_workspace(tmp_path)
    (ws / "a.txt").write_text("two\n")
    snapshot.take(repo)
    write, copy = worktree.Checkout._write, worktree._copy_data
    peak = []

    def edited(self, n, change):
        with open(ws / "a.txt", "r+b") as f:
            f.truncate(1 << 29)
        return write(self, n, change)

    def measured(src, dst, *size):
        copy(src, dst, *size)
        peak.append(os.fstat(dst).st_blocks * 512)

    monkeypatch.setattr(worktree.Checkout, "_write", edited)
    monkeypatch.setattr(worktree, "_copy_data", measured)
    undo = roll(repo, first, attempts=1)
    assert peak and max(peak) < 1 << 20
    size = repo.bare.out("cat-file", "-s", f"{undo}:a.txt")
    assert int(size) == 1 << 29


def sgit_show(repo, commit: str, path: str) -> str:
    return repo.bare.run("show", f"{commit}:{path}").stdout.decode()


def test_the_lock_check_never_walks_out_of_the_workspace(tmp_path):
    from watcherd import rollback
    from watcherd import workspace as wsp

    ws, repo, first = library_workspace(tmp_path)
    outside = tmp_path / "outside"
    (outside / "heads").mkdir(parents=True)
    (outside / "heads" / "main.lock").write_text("")
    os.rename(ws / ".git" / "refs", tmp_path / "real-refs")
    os.symlink(outside, ws / ".git" / "refs")
    rollback.check_quiet(wsp.locate(ws))  # the link is not followed: no lock is found there


def test_a_git_file_or_a_linked_git_directory_is_refused_and_left_as_it_is(tmp_path):
    from watcherd import rollback

    ws, repo, first = library_workspace(tmp_path)
    os.rename(ws / ".git", tmp_path / "elsewhere.git")
    (ws / ".git").write_text(f"gitdir: {tmp_path / 'elsewhere.git'}\n")
    with pytest.raises(rollback.RollbackRefused, match="gitdir"):
        roll(repo, first)
    assert (ws / ".git").read_text().startswith("gitdir:")
    (ws / ".git").unlink()
    os.symlink(tmp_path / "elsewhere.git", ws / ".git")
    with pytest.raises(rollback.RollbackRefused, match="link"):
        roll(repo, first)
    assert (ws / ".git").is_symlink()


def test_file_names_with_control_characters_neither_break_nor_forge_the_timeline(tmp_path):
    from watcherd import snapshot, timeline

    ws, repo, _ = library_workspace(tmp_path)
    for name in ("evil\x01name", "z\nREADME.md", "cr\rname", "\n... and 3 more"):
        (ws / name).write_text("x")
    snapshot.take(repo)
    [newest, _] = timeline.read(repo.bare, repo.snapshot_head(), None)
    assert newest.files == 4
    assert sorted(newest.paths) == sorted(["\\n... and 3 more", "cr\\rname", "evil\\x01name",
                                           "z\\nREADME.md"])


def test_a_command_never_lands_on_a_daemon_that_watches_another_workspace(watcherd, tmp_path):
    d = watcherd().start()
    d.settle()
    before = d.manifest()
    other_ws = tmp_path / "other-ws"
    other_ws.mkdir()
    # The person changed the workspace and key, and forgot control.listen.
    other = write_config(tmp_path / "other.toml", workspace=other_ws, store=d.store,
                         key="acme/other/main", listen=d.listen)
    for args in (("checkpoint", "mine"), ("rollback", "--undo"), ("snapshot",), ("log",)):
        r = run_cli(other, *args)
        assert r.returncode == 2, (args, r.stderr)
        assert f"watches {d.workspace}" in r.stderr and "control.listen" in r.stderr, r.stderr
    assert d.manifest() == before
    status = run_cli(other, "status")
    assert status.returncode == 0 and f"watches {d.workspace}" in status.stderr
