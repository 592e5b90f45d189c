"""The trust boundary against the real daemon: an agent plants what it can in the workspace while
``watcherd run`` holds store credentials in its environment. Whatever it plants, no program of
its runs, the secrets appear in no output, file or bundle, SIGTERM still ends in time, and what the
user did is saved as it was (DESIGN, "Trust boundary" and "Workspace state").
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from daemon_fixture import (  # noqa: F401 (fixture)
    Daemon,
    LogLines,
    free_port,
    make_workspace,
    watcherd,
    write_config,
)
from helpers import git, make_repo, tree_state, wait_for, watcherd_for_any_uid

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify is Linux-only")

SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIAWATCHERDTESTKEY1",
    "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYSECRETKEY1",
    "AWS_SESSION_TOKEN": "FwoGZXIvYXdzEBWATCHERDSESSIONTOKEN1",
    "GITHUB_TOKEN": "ghp_watcherdtesttoken0123456789abcdef",
}


def plant_everything(d: Daemon, tmp_path: Path) -> Path:
    """Every way a workspace's git directory could run a program of the agent's: each, if run,
    writes its environment into the returned directory."""
    ran = tmp_path / "ran"
    ran.mkdir()
    ws = d.workspace

    def program(name: str) -> str:
        return f"env > {ran / name}; cat"

    git(ws, "config", "filter.evil.clean", program("clean"))
    git(ws, "config", "filter.evil.smudge", program("smudge"))
    git(ws, "config", "filter.evil.process", program("process"))
    git(ws, "config", "filter.evil.required", "true")
    git(ws, "config", "core.fsmonitor", program("fsmonitor"))
    git(ws, "config", "core.sshCommand", program("ssh"))
    git(ws, "config", "core.pager", program("pager"))
    git(ws, "config", "diff.external", program("diff"))
    git(ws, "config", "gpg.program", program("gpg"))
    git(ws, "config", "commit.gpgSign", "true")
    git(ws, "config", "core.hooksPath", str(ran.parent / "hooks"))
    git(ws, "config", "remote.origin.url", "ext::sh -c " + program("ext"))
    git(ws, "config", "remote.origin.uploadpack", program("uploadpack"))
    git(ws, "config", "credential.helper", "!" + program("credential"))
    hooks = ran.parent / "hooks"
    hooks.mkdir()
    for hook in ("pre-commit", "post-commit", "post-checkout", "reference-transaction",
                 "post-index-change", "pre-auto-gc"):
        (hooks / hook).write_text(f"#!/bin/sh\nenv > {ran / hook}\n")
        (hooks / hook).chmod(0o755)
    (ws / ".git" / "extra.cfg").write_text(f'[filter "evil"]\n\tclean = {program("include")}\n')
    git(ws, "config", "include.path", "extra.cfg")
    (ws / ".gitattributes").write_text("* filter=evil diff=evil\n")
    return ran


def all_objects_text(repo: Path) -> bytes:
    """Every object's content in a repository (decompressed): what a bundle really carries."""
    return subprocess.run(["git", f"--git-dir={repo}", "cat-file", "--batch-all-objects",
                           "--batch"], capture_output=True, check=True).stdout


def bundle_contents(bundle: Path, scratch: Path) -> bytes:
    repo = scratch / f"unbundled-{bundle.name}.git"
    subprocess.run(["git", "init", "-q", "--bare", str(repo)], check=True)
    subprocess.run(["git", f"--git-dir={repo}", "fetch", "-q", str(bundle), "refs/*:refs/*"],
                   check=True, capture_output=True)
    return all_objects_text(repo)


def test_nothing_the_agent_plants_runs_and_no_secret_leaves_the_daemon(watcherd, tmp_path):
    d = watcherd()
    ran = plant_everything(d, tmp_path)
    d.start(env=SECRETS)
    (d.workspace / "src" / "app.py").write_text("print('saved through every trap')\n")
    # The user's own git (not watcherd) staging a file, with the traps turned off for itself.
    git(d.workspace, "-c", "core.hooksPath=/dev/null", "-c", "core.fsmonitor=false",
        "-c", "filter.evil.clean=", "-c", "filter.evil.process=",
        "-c", "filter.evil.required=false", "add", "-A")
    (d.workspace / "later.txt").write_text("an edit after the user's add\n")
    d.settle()
    assert d.stop() == 0

    assert sorted(p.name for p in ran.iterdir()) == []
    restored = tmp_path / "restored"
    d.restore_into(restored)
    assert (restored / "src" / "app.py").read_text() == "print('saved through every trap')\n"
    places: dict[str, bytes] = {
        "log": "\n".join(str(line) for line in d.log.lines).encode(),
        "stderr": b"".join(p.read_bytes() for p in tmp_path.glob("*.stderr")),
    }
    for root in (d.store, d.state_dir, d.workspace, restored):
        for p in root.rglob("*"):
            if p.is_file() and not p.is_symlink():
                places[str(p)] = p.read_bytes()
    for bundle in (d.store / d.key / "bundles").iterdir():
        places[f"objects of {bundle.name}"] = bundle_contents(bundle, tmp_path)
    places["objects of the state repository"] = all_objects_text(d.repo)
    for name, value in SECRETS.items():
        leaks = [where for where, data in places.items() if value.encode() in data]
        assert leaks == [], f"{name} found in {leaks}"


def test_sigterm_ends_in_time_while_a_loose_object_is_a_fifo(watcherd):
    d = watcherd(watch={"shutdown_timeout": "5s"}).start()
    d.settle()
    (d.workspace / "README.md").write_text("# a commit whose object becomes a FIFO\n")
    git(d.workspace, "commit", "-qam", "poisoned")
    head = git(d.workspace, "rev-parse", "HEAD")
    obj = d.workspace / ".git" / "objects" / head[:2] / head[2:]
    obj.unlink()
    os.mkfifo(obj)
    (d.workspace / "src" / "app.py").write_text("print('still saved')\n")
    mark = d.log.mark()
    d.log.wait("snapshot.state_not_recorded", after=mark, timeout=15)
    t0 = time.monotonic()
    d.signal(signal.SIGTERM)
    assert d.wait_exit(timeout=5 + 3) == 0
    assert time.monotonic() - t0 < 5 + 2
    assert d.show("src/app.py", d.manifest()["snapshot"]) == "print('still saved')"


def test_sigterm_saves_the_last_edit_in_time_while_a_new_nested_repository_holds_a_fifo(
        watcherd):
    """A FIFO as a new nested repository's HEAD blocks git add for good: the final save finds
    it after a second, leaves it out and saves the edit made just before SIGTERM, within
    shutdown_timeout (the door's timeout is a minute)."""
    d = watcherd(watch={"shutdown_timeout": "8s"}).start()
    d.settle()
    nested = d.workspace / "vendor" / "lib" / ".git"
    for sub in ("objects", "refs/heads"):
        (nested / sub).mkdir(parents=True)
    os.mkfifo(nested / "HEAD")
    (d.workspace / "src" / "app.py").write_text("print('the last edit')\n")
    t0 = time.monotonic()
    d.signal(signal.SIGTERM)
    assert d.wait_exit(timeout=8 + 3) == 0
    assert time.monotonic() - t0 < 8
    assert d.show("src/app.py", d.manifest()["snapshot"]) == "print('the last edit')"


def test_sigterm_saves_the_last_edit_in_time_while_a_gitignore_is_a_fifo(watcherd):
    """A FIFO as a .gitignore blocks git add, git ls-files and the watcher's git check-ignore
    for good: the final save lets git's open go on, and the daemon exits within
    shutdown_timeout with the edit made just before SIGTERM saved."""
    d = watcherd(watch={"shutdown_timeout": "5s"}).start()
    d.settle()
    (d.workspace / "sub").mkdir()
    os.mkfifo(d.workspace / "sub" / ".gitignore")
    (d.workspace / "last.txt").write_text("the last edit\n")
    t0 = time.monotonic()
    d.signal(signal.SIGTERM)
    assert d.wait_exit(timeout=5 + 3) == 0
    assert time.monotonic() - t0 < 5 + 2
    assert d.show("last.txt", d.manifest()["snapshot"]) == "the last edit"


def test_a_fifo_gitignore_holds_no_change_back_from_the_watcher(watcherd):
    """The watcher's git check-ignore opens the .gitignore of every directory on the way to a
    path it is asked about: a FIFO there held it 10 s per path, and no change anywhere was
    reported meanwhile. It is let go within seconds (and opening it is no change of the
    rules): an edit elsewhere is saved and uploaded promptly."""
    d = watcherd().start()
    d.settle()
    (d.workspace / "sub").mkdir()
    os.mkfifo(d.workspace / "sub" / ".gitignore")
    for i in range(8):
        (d.workspace / "sub" / f"f{i}.txt").write_text(f"{i}\n")
    (d.workspace / "important.txt").write_text("the user's edit\n")
    wait_for(lambda: (m := d.manifest()) and d.shown("important.txt", m["snapshot"]),
             timeout=12, message="the edit uploaded")
    assert len(d.log.events("watch.rescan")) < 5
    assert d.stop() == 0


@pytest.fixture
def shared_tmp():
    """A temporary directory other uids may enter (pytest's own tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="watcherd-uid-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_a_daemon_running_as_the_apps_uid_does_not_show_it_its_environment(shared_tmp):
    tmp_path = shared_tmp
    if os.geteuid() != 0:
        pytest.skip("needs root to run the daemon and a reader under another uid")
    command = watcherd_for_any_uid()
    if command is None:
        pytest.skip("no Python interpreter of this version that another uid may run")
    uid = 43210
    workspace = tmp_path / "ws"
    make_workspace(workspace)
    store, state = tmp_path / "store", tmp_path / "state"
    for p in (store, state):
        p.mkdir()
    subprocess.run(["chown", "-R", f"{uid}:{uid}", str(workspace), str(store), str(state)],
                   check=True)
    config = write_config(tmp_path / "d.toml", workspace=workspace, store=store, key="k/1",
                          listen=f"127.0.0.1:{free_port()}", state_dir=state)

    def as_app() -> None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)

    env = {**os.environ, **SECRETS, "HOME": str(tmp_path)}
    daemon = subprocess.Popen([*command, "--config", str(config), "run"], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, env=env, preexec_fn=as_app, text=True)
    plain = subprocess.Popen(["sleep", "60"], env=env, preexec_fn=as_app)
    try:
        lines = LogLines(daemon.stdout)
        lines.wait("daemon.ready", timeout=30)

        def read_as_app(pid: int) -> str:
            return subprocess.run(["sh", "-c", f"cat /proc/{pid}/environ >/dev/null 2>&1 && "
                                   "echo read || echo denied"], preexec_fn=as_app,
                                  capture_output=True, text=True).stdout.strip()

        assert read_as_app(plain.pid) == "read"  # what any process of that uid shows
        assert read_as_app(daemon.pid) == "denied"
    finally:
        plain.kill()
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(20)


def test_sigterm_while_the_agent_commits_never_restores_a_reverted_commit(watcherd, tmp_path):
    # The manifest names the HEAD the snapshot recorded with its tree: a commit landing a few ms
    # after SIGTERM is either in the saved state whole, or not at all (its content then shows as
    # an uncommitted change), never a new HEAD with the older tree.
    for run in range(6):
        d = watcherd(name=f"r{run}", key=f"acme/run-{run}/main").start()
        d.settle()
        app = d.workspace / "src" / "app.py"
        app.write_text(f"print('version {run}')\n")
        delay = random.uniform(0, 0.06)
        timer = threading.Timer(delay, lambda ws=d.workspace: git(ws, "commit", "-qam", "agent"))
        d.signal(signal.SIGTERM)
        timer.start()
        assert d.wait_exit(timeout=10) == 0
        timer.join()
        restored = tmp_path / f"restored-{run}"
        d.restore_into(restored)
        committed = git(restored, "show", "HEAD:src/app.py")
        assert (restored / "src" / "app.py").read_text() == f"print('version {run}')\n"
        if git(restored, "rev-parse", "HEAD") == git(d.workspace, "rev-parse", "HEAD") and \
                git(d.workspace, "log", "-1", "--format=%s") == "agent":
            assert committed == f"print('version {run}')"
        assert d.manifest()["head"] == git(restored, "rev-parse", "HEAD")


def test_a_force_added_file_under_an_ignored_directory_is_watched_saved_and_restored(watcherd, tmp_path):
    d = watcherd().start()
    d.settle()
    dist = d.workspace / "node_modules" / "pinned"
    dist.mkdir(parents=True)
    (dist / "patch.js").write_text("v1\n")
    (dist / "other.js").write_text("not tracked\n")
    git(d.workspace, "add", "-f", "node_modules/pinned/patch.js")
    git(d.workspace, "commit", "-qm", "pin a patched dependency")
    d.settle()
    mark = d.log.mark()
    (dist / "patch.js").write_text("rebuilt\n")  # a rebuild of the tracked file
    saved = d.log.wait("generation.saved", after=mark, timeout=15)
    assert d.show("node_modules/pinned/patch.js", saved["snapshot"]) == "rebuilt"
    assert d.shown("node_modules/pinned/other.js", saved["snapshot"]) is None
    assert d.stop() == 0
    restored = tmp_path / "restored"
    d.restore_into(restored)
    assert (restored / "node_modules" / "pinned" / "patch.js").read_text() == "rebuilt\n"
    expected = {k: v for k, v in tree_state(d.workspace).items() if k != "node_modules/pinned/other.js"}
    assert tree_state(restored) == expected


def test_a_submodule_edit_made_while_the_daemon_was_down_is_saved_at_start_and_comes_back(
        watcherd, tmp_path):
    lib = tmp_path / "lib-origin"
    lib.mkdir()
    git(lib, "init", "-q")
    (lib / "readme.md").write_text("library\n")
    git(lib, "add", "-A")
    git(lib, "commit", "-qm", "lib")
    first = watcherd().start()
    first.settle()
    git(first.workspace, "-c", "protocol.file.allow=always", "submodule", "add", "-q", str(lib),
        "lib")
    git(first.workspace, "commit", "-qm", "add lib")
    first.settle()
    assert first.stop() == 0
    (first.workspace / "lib" / "readme.md").write_text("edited inside, not committed\n")

    first.start()  # the same workspace, state and store: the gitlink did not move
    saved = first.log.wait("snapshot.committed", timeout=15)
    assert "lib/readme.md" in saved["paths"]
    first.settle()
    assert first.stop() == 0
    restored = tmp_path / "restored"
    first.restore_into(restored)
    assert (restored / "lib" / "readme.md").read_text() == "edited inside, not committed\n"


def test_a_nested_repository_that_cannot_be_saved_is_named_at_start_and_shown_degraded(
        watcherd, tmp_path):
    # Its .git names a directory outside the workspace: nothing of it is read, and a daemon that
    # starts on the workspace says so at once and shows it in status, until it is fixed.
    elsewhere = make_repo(tmp_path / "elsewhere")
    d = watcherd()
    (d.workspace / "vendor").mkdir()
    (d.workspace / "vendor" / ".git").write_text(f"gitdir: {elsewhere / '.git'}\n")
    (d.workspace / "vendor" / "edit.txt").write_text("not saved\n")
    d.start()
    d.settle()
    assert first_degraded(d)
    mark = d.log.mark()
    (d.workspace / "vendor" / ".git").unlink()
    git(d.workspace / "vendor", "init", "-q")
    git(d.workspace / "vendor", "add", "-A")
    git(d.workspace / "vendor", "commit", "-qm", "now a repository of the workspace")
    d.log.wait("snapshot.nested_saved", after=mark, timeout=15, path="vendor")
    wait_for(lambda: not first_degraded(d), timeout=15, message="status no longer degraded")
    assert d.stop() == 0


@pytest.mark.parametrize("backend", ["inotify", "watchdog"])
@pytest.mark.parametrize("how", ["git-init", "moved-in"])
def test_a_directory_saved_as_files_that_becomes_a_repository_is_saved_as_one_by_the_daemon(
        watcherd, tmp_path, backend, how):
    """The watcher names the directory where a .git appeared (or a repository moved in): the
    daemon's next snapshot saves it as a nested repository, its history with it."""
    d = watcherd(watch={"backend": backend}).start()
    proj = d.workspace / "proj"
    proj.mkdir()
    (proj / "a.txt").write_text("a\n")
    wait_for(lambda: d.shown("proj/a.txt") == "a", timeout=15, message="proj saved as files")
    if how == "git-init":
        git(proj, "init", "-q")
        git(proj, "add", "-A")
        git(proj, "commit", "-qm", "its own history now")
    else:
        clone = make_repo(tmp_path / "clone", "cloned\n")
        shutil.rmtree(proj)
        os.rename(clone, proj)
    head = git(proj, "rev-parse", "HEAD")
    wait_for(lambda: d.git("ls-tree", "refs/watcherd/snapshots", "proj").split("\t")[0]
             == f"160000 commit {head}", timeout=15, message="proj saved as a repository")
    d.settle()
    restored = tmp_path / "restored"
    assert d.restore_into(restored).returncode == 0
    assert git(restored / "proj", "log", "--format=%s") == git(proj, "log", "--format=%s")
    assert d.stop() == 0


def first_degraded(d) -> list[str]:
    return [r for r in d.status()["degraded"] if "nested repository vendor" in r]
