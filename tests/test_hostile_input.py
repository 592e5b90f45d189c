"""Hostile and odd input: what an agent can put in a workspace, and what a broken or hostile store
can hand to a restore. Each test says what must hold: a clear error, nothing lost, nothing written
or read outside the workspace, the daemon still running.

Runs against real repositories, a real local store and (for the daemon cases) the real
``watcherd run``. Mount and capability tricks need root; they skip with the reason when not
permitted. The 600 MiB file is ``slow`` (``make test-long``).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import textwrap
import unicodedata
from collections.abc import Callable
from pathlib import Path

import pytest
from structlog.testing import capture_logs

import daemon_fixture
from daemon_fixture import SNAPSHOT_REF, make_workspace, run_cli, watcherd  # noqa: F401 (fixture)
from helpers import git, make_repo, publish, said, sgit, state_repo, tree_state, wait_for
from watcherd import manifest as mf
from watcherd import snapshot, state
from watcherd.config import Config, RestoreConfig, StoreConfig, WorkspaceConfig, parse_store_url
from watcherd.errors import BundleTooLarge, IntegrityError, RestoreError, WatcherdError
from watcherd.generations import Generations, Limits
from watcherd.repo import Repo
from watcherd.restore import restore
from watcherd.store.local import LocalStore

KEY = "acme/hostile/main"
MiB = 2**20
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify is Linux-only")


# -- helpers -------------------------------------------------------------------------------------------



def config_for(ws: Path, store_dir: Path, **restore_options) -> Config:
    """The config of the pod whose workspace is ``ws``: its state directory is beside it (the one
    ``helpers.state_repo`` names)."""
    return Config(workspace=WorkspaceConfig(path=ws, state_dir=ws.parent / f"{ws.name}-state"),
                  store=StoreConfig(url=parse_store_url(f"file://{store_dir}"), key=KEY),
                  restore=RestoreConfig(**restore_options))


def gens_for(store_dir: Path, limits: Limits | None = None) -> Generations:
    return Generations(LocalStore(store_dir), KEY, limits)


def take(ws: Path, mode: str = "shadow", cache: snapshot.Cache | None = None) -> snapshot.Snapshot:
    """A snapshot, by a new process unless ``cache`` (one process's memory) is given."""
    repo = state_repo(ws, KEY)
    snapshot.prepare(repo)
    return snapshot.take(repo, mode, cache)


def save(ws: Path, store_dir: Path, mode: str = "shadow", limits: Limits | None = None):
    take(ws, mode)
    return gens_for(store_dir, limits).save(state_repo(ws, KEY))


def state_git_dir(ws: Path) -> Path:
    """watcherd's own repository for library-level workspace ``ws`` (where its snapshots are)."""
    return state_repo(ws, KEY).git_dir


def tree_paths(git_dir: Path, commit: str = SNAPSHOT_REF) -> dict[bytes, str]:
    """Path (bytes, as git stores it) -> mode, for every entry of ``commit`` in the repository
    ``git_dir`` (watcherd's own: ``state_git_dir(ws)``, or a daemon's ``d.repo``)."""
    out = subprocess.run(["git", f"--git-dir={git_dir}", "ls-tree", "-r", "-z", commit],
                         capture_output=True, check=True).stdout
    entries = {}
    for record in filter(None, out.split(b"\0")):
        meta, name = record.split(b"\t", 1)
        entries[name] = meta.split()[0].decode()
    return entries


def in_state(ws: Path, *args: str) -> str:
    return sgit(ws, *args, key=KEY)


def events(logs: list[dict], name: str) -> list[dict]:
    return [e for e in logs if e["event"] == name]


def listing(path: Path) -> dict[str, tuple]:
    """Everything under ``path`` (names, kinds, sizes, mtimes): to prove nothing was written there."""
    found = {}
    for p in sorted(path.rglob("*")):
        st = p.lstat()
        found[str(p.relative_to(path))] = (stat.S_IFMT(st.st_mode), st.st_size, st.st_mtime_ns)
    return found


def bundle_with_extra_refs(ws: Path, dest: Path, extra: list[bytes]) -> Path:
    """A v2 bundle of the snapshot history of ``ws`` (as watcherd writes it, from its own
    repository) whose header also lists ``extra`` ref lines."""
    plain = dest.with_suffix(".plain")
    in_state(ws, "bundle", "create", "-q", str(plain), SNAPSHOT_REF)
    header, sep, pack = plain.read_bytes().partition(b"\n\n")
    dest.write_bytes(header + b"\n" + b"\n".join(extra) + sep + pack)
    plain.unlink()
    return dest


# -- odd file names ------------------------------------------------------------------------------------

NFC = unicodedata.normalize("NFC", "café")
NFD = unicodedata.normalize("NFD", "café")
ODD_NAMES = [
    "new\nline.txt",  # a newline: breaks every line-based protocol
    "-rf", "--all", "-", "--", "-dir",  # would be options on a command line
    ":(exclude)magic", ":colon",  # pathspec magic
    "tab\there", "back\\slash", " lead space", "trail space ", "star*?[x]", '"quoted"',
    "\x01control\x1f", "HEAD", "refs",
    NFC + ".txt", NFD + ".txt",  # two different names that look the same
    "日本語のファイル名.txt", "emoji-\U0001F600.txt",
    "a" * 255,  # the longest name ext4 allows (bytes)
    "é" * 127 + "x",  # 255 bytes of UTF-8
]
NOT_UTF8 = os.fsdecode(b"latin1-\xe9-\xff.txt")  # bytes that are not UTF-8 at all


def write_odd_tree(ws: Path) -> None:
    for name in [*ODD_NAMES, NOT_UTF8]:
        (ws / name).write_bytes(os.fsencode(name) + b"\n")
    deep = ws / "-d"
    for part in ("d" * 200, "new\nline dir", "e" * 255):
        deep = deep / part
    deep.mkdir(parents=True)
    (deep / ("f" * 255)).write_text("deep\n")
    os.symlink("new\nline.txt", ws / "link\nto newline")


def test_odd_file_names_are_snapshotted_and_round_trip_through_save_and_restore(tmp_path):
    ws = make_repo(tmp_path / "ws")
    write_odd_tree(ws)
    store_dir, target = tmp_path / "store", tmp_path / "restored"

    result = save(ws, store_dir)
    outcome = restore(config_for(target, store_dir), gens_for(store_dir))

    names = set(tree_paths(state_git_dir(ws)))
    for name in [*ODD_NAMES, NOT_UTF8, "link\nto newline"]:
        assert os.fsencode(name) in names, name
    assert outcome.action == "restored" and outcome.generation == result.generation == 1
    assert tree_state(target) == tree_state(ws)
    # Both kept, neither normalised into the other.
    assert (target / (NFC + ".txt")).read_bytes() != (target / (NFD + ".txt")).read_bytes()


@linux_only
def test_the_daemon_snapshots_odd_names_it_is_told_about_and_keeps_running(watcherd, tmp_path):
    d = watcherd().start()
    d.settle()
    mark = d.log.mark()
    write_odd_tree(d.workspace)
    d.log.wait("snapshot.committed", after=mark, timeout=10)
    wait_for(lambda: {os.fsencode(n) for n in ODD_NAMES} <= set(tree_paths(d.repo)),
             message="every odd name in a snapshot")
    d.settle()
    assert d.proc.poll() is None
    assert not d.log.events("daemon.crashed") and not d.log.events("ignore.failed")
    target = tmp_path / "restored"
    target.mkdir()
    d.restore_into(target)
    assert tree_state(target) == tree_state(d.workspace)
    assert d.stop() == 0


@pytest.mark.parametrize("mode", ["shadow", "branch"])
def test_names_git_refuses_to_store_are_reported_and_every_other_edit_is_still_saved(tmp_path, mode):
    # git will not put these in an index at all (they would be ".git" on NTFS or HFS, or a
    # symlinked .gitmodules). One of them must not stop every other edit from being saved.
    ws = make_repo(tmp_path / "ws")
    for name in (".GIT", "git~1", ".git. "):
        (ws / name).mkdir()
        (ws / name / "config").write_text("[core]\n")
    os.symlink("readme.md", ws / ".gitmodules")
    (ws / "readme.md").write_text("an edit beside names git refuses\n")
    (ws / "new.txt").write_text("a new file\n")

    with capture_logs() as logs:
        snap = take(ws, mode)

    files = tree_paths(state_git_dir(ws), snap.commit)
    assert b"new.txt" in files and in_state(ws, "show", f"{snap.commit}:readme.md") == \
        "an edit beside names git refuses"
    refused = events(logs, "snapshot.paths_refused")
    assert refused and {".GIT/config", "git~1/config", ".gitmodules"} <= set(refused[0]["paths"])
    assert not any(p.startswith((b".GIT", b"git~1", b".gitmodules")) for p in files)


def test_files_ignored_after_a_snapshot_leave_the_next_one_unless_the_user_tracks_them(tmp_path):
    # An agent runs `npm install` and writes `.env` before it writes the .gitignore for them.
    ws = make_repo(tmp_path / "ws")
    (ws / "node_modules" / "pkg").mkdir(parents=True)
    (ws / "node_modules" / "pkg" / "index.js").write_text("module.exports = 1\n")
    (ws / ".env").write_text("TOKEN=only-for-this-pod\n")
    (ws / "tracked.log").write_text("the user committed this log on purpose\n")
    git(ws, "add", "tracked.log")
    git(ws, "commit", "-q", "-m", "a tracked log")
    first = take(ws)
    assert {b"node_modules/pkg/index.js", b".env"} <= \
        set(tree_paths(state_git_dir(ws), first.commit))
    (ws / ".gitignore").write_text("node_modules/\n.env\n*.log\n")

    with capture_logs() as logs:
        second = take(ws)

    files = set(tree_paths(state_git_dir(ws), second.commit))
    assert {b".gitignore", b"tracked.log", b"readme.md"} <= files
    assert not {b"node_modules/pkg/index.js", b".env"} & files
    dropped = events(logs, "snapshot.now_ignored")
    assert dropped and set(dropped[0]["paths"]) == {".env", "node_modules/pkg/index.js"}
    assert (ws / ".env").exists() and (ws / "node_modules" / "pkg" / "index.js").exists()


# -- symbolic links --------------------------------------------------------------------------------------


def make_outside(tmp_path: Path) -> Path:
    outside = tmp_path / "outside"
    (outside / "deeper").mkdir(parents=True)
    (outside / "secret.txt").write_text("the host's secret, never to be copied\n")
    (outside / "deeper" / "key.pem").write_text("-----BEGIN PRIVATE KEY-----\n")
    return outside


def test_a_symlinked_directory_pointing_outside_is_stored_as_a_link_and_never_followed(tmp_path):
    outside = make_outside(tmp_path)
    ws = make_repo(tmp_path / "ws")
    os.symlink(str(outside), ws / "ext")
    os.symlink("../outside/secret.txt", ws / "relative-file-link")

    snap = take(ws)

    files = tree_paths(state_git_dir(ws), snap.commit)
    assert files[b"ext"] == "120000" and files[b"relative-file-link"] == "120000"
    assert not any(p.startswith(b"ext/") for p in files)
    assert in_state(ws, "cat-file", "-p", f"{snap.commit}:ext") == str(outside)
    # Not in watcherd's object database either (bundles are made from it), nor the workspace's.
    for f in (outside / "secret.txt", outside / "deeper" / "key.pem"):
        blob = git(ws, "hash-object", str(f))
        for git_dir in (state_git_dir(ws), ws / ".git"):
            assert subprocess.run(["git", f"--git-dir={git_dir}", "cat-file", "-e", blob],
                                  capture_output=True).returncode != 0


@pytest.mark.parametrize("committed", ["real directory", "link"])
def test_restore_recreates_an_outside_link_and_never_writes_through_it(tmp_path, committed):
    """The user's HEAD has ``ext`` as one kind (a real directory, or a link to the outside) and the
    snapshot as the other: restore goes through both states, and must never write into the
    outside directory on the way."""
    outside = make_outside(tmp_path)
    ws = make_repo(tmp_path / "ws")
    if committed == "real directory":
        (ws / "ext").mkdir()
        (ws / "ext" / "secret.txt").write_text("a file of the workspace\n")
    else:
        os.symlink(str(outside), ws / "ext")
    git(ws, "add", "-A")
    git(ws, "commit", "-q", "-m", "ext")
    if committed == "real directory":
        shutil.rmtree(ws / "ext")
        os.symlink(str(outside), ws / "ext")
    else:
        (ws / "ext").unlink()
        (ws / "ext").mkdir()
        (ws / "ext" / "secret.txt").write_text("the workspace's own file, same name\n")
        (ws / "ext" / "new.txt").write_text("new\n")
    store_dir, target = tmp_path / "store", tmp_path / "restored"
    save(ws, store_dir)
    before = listing(outside)

    restore(config_for(target, store_dir), gens_for(store_dir))

    assert listing(outside) == before
    assert (outside / "secret.txt").read_text() == "the host's secret, never to be copied\n"
    assert tree_state(target) == tree_state(ws)


@linux_only
def test_the_daemon_does_not_watch_or_snapshot_through_a_symlinked_directory(watcherd, tmp_path):
    outside = make_outside(tmp_path)
    d = watcherd().start()
    d.settle()
    watches = d.watches()
    mark = d.log.mark()
    os.symlink(str(outside), d.workspace / "ext")
    d.log.wait("snapshot.committed", after=mark, timeout=10)
    assert d.watches() == watches  # the link is a file to git: nothing behind it is watched
    (outside / "new-outside.txt").write_text("written outside after the link appeared\n")
    (outside / "deeper" / "more").mkdir()
    mark = d.log.mark()
    (d.workspace / "src" / "barrier.py").write_text("# the daemon saw everything before this\n")
    line = d.log.wait("snapshot.committed", after=mark, timeout=10)
    files = tree_paths(d.repo, line["commit"])
    assert files[b"ext"] == "120000"
    assert not any(p.startswith(b"ext/") for p in files)
    assert d.watches() == watches
    assert d.stop() == 0


# -- special files -----------------------------------------------------------------------------------------


def make_special_files(ws: Path) -> socket.socket:
    os.mkfifo(ws / "a-fifo")
    (ws / "sub").mkdir(exist_ok=True)
    os.mkfifo(ws / "sub" / "another-fifo")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(ws / "a-socket"))
    sock.listen()
    return sock


@pytest.mark.timeout(60)
def test_fifos_and_sockets_are_skipped_without_hanging_and_the_rest_round_trips(tmp_path):
    ws = make_repo(tmp_path / "ws")
    sock = make_special_files(ws)
    try:
        (ws / "sub" / "real.txt").write_text("a real file beside a fifo\n")
        store_dir, target = tmp_path / "store", tmp_path / "restored"
        save(ws, store_dir)  # a read of a fifo would block here until the timeout
        restore(config_for(target, store_dir), gens_for(store_dir))
    finally:
        sock.close()
    files = tree_paths(state_git_dir(ws))
    assert b"sub/real.txt" in files
    assert not {b"a-fifo", b"sub/another-fifo", b"a-socket"} & set(files)
    assert (target / "sub" / "real.txt").read_text() == "a real file beside a fifo\n"
    assert not (target / "a-fifo").exists() and not (target / "a-socket").exists()


@linux_only
def test_the_daemon_keeps_going_with_fifos_and_sockets_in_the_workspace(watcherd):
    d = watcherd().start()
    d.settle()
    mark = d.log.mark()
    sock = make_special_files(d.workspace)
    try:
        (d.workspace / "src" / "app.py").write_text("print('beside a fifo')\n")
        line = d.log.wait("snapshot.committed", after=mark, timeout=10)
        d.settle()
        assert d.show("src/app.py", line["commit"]) == "print('beside a fifo')"
        assert d.proc.poll() is None and not d.log.events("snapshot.failed", after=mark)
        assert d.stop() == 0
    finally:
        sock.close()


# -- nested repositories -------------------------------------------------------------------------------


def nested_repo(path: Path, *, commit: bool) -> Path:
    path.mkdir(parents=True)
    git(path, "init", "-q")
    (path / "lib.py").write_text("print('the nested repository's own file')\n")
    if commit:
        git(path, "add", "-A")
        git(path, "commit", "-q", "-m", "nested")
    return path


@pytest.mark.parametrize("mode", ["shadow", "branch"])
def test_a_nested_repository_is_saved_in_a_snapshot_of_its_own(tmp_path, mode):
    ws = make_repo(tmp_path / "ws")
    nested = nested_repo(ws / "vendor" / "lib", commit=True)
    (nested / "lib.py").write_text("print('edited, not committed')\n")

    with capture_logs() as logs:
        snap = take(ws, mode, snapshot.Cache())

    files = tree_paths(state_git_dir(ws), snap.commit)
    assert files[b"vendor/lib"] == "160000"  # a gitlink, as git records it...
    assert b"vendor/lib/lib.py" not in files
    own = state.load(state_repo(ws, KEY).bare, snap.commit).nested  # ... and one of its own
    assert list(own) == ["vendor/lib"]
    assert in_state(ws, "show", f"{own['vendor/lib']}:lib.py") == "print('edited, not committed')"
    assert state.load(state_repo(ws, KEY).bare, own["vendor/lib"]).recorded.head.oid == \
        git(nested, "rev-parse", "HEAD")
    assert not events(logs, "snapshot.nested_not_saved")
    assert not events(logs, "snapshot.nested_repository")


@pytest.mark.parametrize("mode", ["shadow", "branch"])
def test_a_nested_repository_without_commits_is_reported_and_does_not_stop_snapshots(tmp_path, mode):
    # `git init` in a sub-directory (scaffolding tools do it) leaves a repository git cannot add.
    ws = make_repo(tmp_path / "ws")
    nested_repo(ws / "app", commit=False)
    (ws / "readme.md").write_text("edited beside a fresh nested repository\n")

    with capture_logs() as logs:
        snap = take(ws, mode)

    assert snap.commit
    assert in_state(ws, "show", f"{snap.commit}:readme.md") == \
        "edited beside a fresh nested repository"
    reported = events(logs, "snapshot.nested_repository")
    assert [e["path"] for e in reported] == ["app"]
    assert "no commit" in reported[0]["note"]


def test_a_sha256_repository_in_a_sha1_workspace_is_reported_as_such_and_the_rest_saved(tmp_path):
    """git reads the HEAD of a sha256 repository nested in a sha1 one as no commit, and no sha1
    tree can name one of its commits: its files are in no snapshot. The log and ``status`` say
    why (not "no commit yet", which would send the user committing in it for nothing), at every
    snapshot, and the rest is saved."""
    ws = make_repo(tmp_path / "ws")
    nested = ws / "lib"
    nested.mkdir()
    git(nested, "init", "-q", "--object-format=sha256")
    (nested / "lib.py").write_text("print('sha256')\n")
    git(nested, "add", "-A")
    git(nested, "commit", "-q", "-m", "nested")
    cache = snapshot.Cache()
    for n in range(2):
        (ws / "readme.md").write_text(f"edit {n}\n")
        with capture_logs() as logs:
            snap = take(ws, cache=cache)
        assert in_state(ws, "show", f"{snap.commit}:readme.md") == f"edit {n}"
        reported = events(logs, "snapshot.nested_repository")
        assert [e["path"] for e in reported] == ["lib"]
        assert reported[0]["reason"] == ("a sha256 repository in a sha1 workspace: git cannot "
                                         "record it, so its files are not saved")
        assert "no commit" not in reported[0]["note"]
    assert cache.not_saved() == {"lib": reported[0]["reason"]}


@linux_only
def test_the_daemon_saves_a_nested_repository_reports_one_without_commits_and_keeps_saving(
        watcherd, tmp_path):
    d = watcherd().start()
    d.settle()
    mark = d.log.mark()
    nested_repo(d.workspace / "packages" / "ui", commit=True)
    nested_repo(d.workspace / "scratch", commit=False)
    assert d.log.wait("snapshot.nested_repository", after=mark, timeout=10,
                      path="scratch")["note"].startswith("a nested git repository with no commit")
    (d.workspace / "packages" / "ui" / "lib.py").write_text("print('edited inside')\n")
    (d.workspace / "src" / "app.py").write_text("print('still saved')\n")
    wait_for(lambda: d.shown("src/app.py") == "print('still saved')" and
             d.status()["state"] == "idle", timeout=15,
             message="the edit beside the nested repositories saved")
    target = tmp_path / "restored"
    target.mkdir()
    d.restore_into(target)
    assert (target / "src" / "app.py").read_text() == "print('still saved')\n"
    assert (target / "packages" / "ui" / "lib.py").read_text() == "print('edited inside')\n"
    assert d.stop() == 0


# -- a file too large to upload ------------------------------------------------------------------------


def write_random(path: Path, size: int) -> None:
    """Incompressible bytes (git would squeeze zeros to nothing), written in 16 MiB chunks."""
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 16 * MiB)
            f.write(os.urandom(n))
            left -= n


def test_a_file_above_max_bundle_size_is_refused_clearly_and_nothing_is_uploaded(tmp_path):
    ws = make_repo(tmp_path / "ws")
    store_dir = tmp_path / "store"
    save(ws, store_dir)
    before = sorted(p.name for p in (store_dir / KEY / "bundles").iterdir())
    write_random(ws / "dump.bin", 3 * MiB)

    with pytest.raises(BundleTooLarge) as err:
        save(ws, store_dir, limits=Limits(warn_bundle_size=MiB, max_bundle_size=2 * MiB))

    message = str(err.value)
    assert "store.max_bundle_size (2MiB)" in message and "nothing was uploaded" in message
    assert "\n" not in message
    assert sorted(p.name for p in (store_dir / KEY / "bundles").iterdir()) == before
    assert mf.parse((store_dir / KEY / "manifest.json").read_bytes(), "m").current.generation == 1


def test_once_a_too_large_file_is_gone_the_next_save_succeeds_with_every_later_edit(tmp_path):
    # The refused file sits in a local snapshot commit that never reached the store; it must not
    # keep every later save above the limit for ever.
    ws = make_repo(tmp_path / "ws")
    store_dir, target = tmp_path / "store", tmp_path / "restored"
    limits = Limits(warn_bundle_size=MiB, max_bundle_size=2 * MiB)
    save(ws, store_dir, limits=limits)
    (ws / "readme.md").write_text("edit 1, before the dump\n")
    take(ws)
    write_random(ws / "dump.bin", 3 * MiB)
    with pytest.raises(BundleTooLarge):
        save(ws, store_dir, limits=limits)
    (ws / "dump.bin").unlink()
    (ws / "readme.md").write_text("edit 2, after the dump was removed\n")

    with capture_logs() as logs:
        result = save(ws, store_dir, limits=limits)

    assert result.status == "saved" and result.generation == 2 and result.bytes < MiB
    assert events(logs, "history.squashed")
    restore(config_for(target, store_dir), gens_for(store_dir))
    assert (target / "readme.md").read_text() == "edit 2, after the dump was removed\n"
    assert not (target / "dump.bin").exists()


@linux_only
def test_the_daemon_refuses_a_too_large_bundle_says_why_and_keeps_running(watcherd, tmp_path):
    d = watcherd()
    d.config.write_text(d.config.read_text().replace(
        "[store]\n", '[store]\nwarn_bundle_size = "1MiB"\nmax_bundle_size = "2MiB"\n'))
    d.start()
    d.settle()
    mark = d.log.mark()
    write_random(d.workspace / "src" / "dump.bin", 3 * MiB)
    failed = d.log.wait("upload.failed", after=mark, timeout=15)
    assert failed["kind"] == "BundleTooLarge" and "store.max_bundle_size" in failed["error"]
    s = d.status()
    assert any("store.max_bundle_size" in reason for reason in s["degraded"])
    assert s["last_error"]["op"] == "upload" and d.generation() == 1
    assert d.proc.poll() is None

    # The way out the error names: ignore the file (or remove it). Then saving resumes.
    (d.workspace / ".gitignore").write_text("node_modules/\n*.log\n*.bin\n")
    (d.workspace / "src" / "app.py").write_text("print('after the dump was ignored')\n")
    code, result = d.post("/snapshot")
    assert (code, result["status"]) == (200, "saved"), result
    target = tmp_path / "restored"
    target.mkdir()
    d.restore_into(target)
    assert (target / "src" / "app.py").read_text() == "print('after the dump was ignored')\n"
    assert d.stop() == 0


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_600_mib_file_is_refused_by_the_default_max_bundle_size(tmp_path):
    ws = make_repo(tmp_path / "ws")
    store_dir = tmp_path / "store"
    save(ws, store_dir)
    write_random(ws / "video.mp4", 600 * MiB)

    with pytest.raises(BundleTooLarge) as err:
        save(ws, store_dir)  # default limits: warn 100MiB, refuse 500MiB

    assert "above store.max_bundle_size (500MiB)" in str(err.value)
    assert mf.parse((store_dir / KEY / "manifest.json").read_bytes(), "m").current.generation == 1
    assert sum(p.stat().st_size for p in (store_dir / KEY).rglob("*") if p.is_file()) < MiB
    assert not any(state_repo(ws, KEY).spool.iterdir())  # no 600 MiB left behind


# -- unreadable files --------------------------------------------------------------------------------------

# As root, chmod 000 stops nothing: root reads any file. Dropping the two capabilities that let
# root ignore permissions (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH) makes root an ordinary owner
# again, for whom mode 000 means "no". That is what a daemon running as a non-root user meets.
CAPSH = shutil.which("capsh")
_DROP = "--drop=cap_dac_override,cap_dac_read_search"


def without_dac_override(argv: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return argv
    if CAPSH is None:
        pytest.skip("running as root without capsh: cannot make a file unreadable to root "
                    "(root bypasses mode 000); install libcap2-bin to run this test")
    return [CAPSH, _DROP, "--", "-c", 'exec "$0" "$@"', *argv]


_SNAPSHOT_AND_SAVE = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from structlog.testing import capture_logs
    from watcherd import snapshot
    from watcherd.generations import Generations
    from watcherd.repo import Repo
    from watcherd.store.local import LocalStore
    ws, store, key, state_dir = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
    try:
        open(ws / "secret.env").read()
        print(json.dumps({"readable": True}))
        sys.exit(0)
    except PermissionError:
        pass
    with capture_logs() as logs:
        repo = Repo(state_dir, key, ws)
        snapshot.prepare(repo)
        snap = snapshot.take(repo)
        saved = Generations(LocalStore(store), key).save(repo)
    print(json.dumps({"commit": snap.commit, "generation": saved.generation,
                      "logs": [{k: str(v) for k, v in e.items()} for e in logs]}))
""")


def test_unreadable_files_are_left_out_with_a_warning_and_every_other_edit_is_saved(tmp_path):
    ws = make_repo(tmp_path / "ws")
    (ws / "locked").mkdir()
    (ws / "locked" / "inside.txt").write_text("in a directory nobody may list\n")
    git(ws, "add", "-A")
    git(ws, "commit", "-q", "-m", "locked dir")
    (ws / "secret.env").write_text("TOKEN=unreadable\n")
    (ws / "readme.md").write_text("a readable edit\n")
    os.chmod(ws / "secret.env", 0)
    os.chmod(ws / "locked", 0)
    store_dir = tmp_path / "store"
    try:
        proc = subprocess.run(without_dac_override(
            [sys.executable, "-c", _SNAPSHOT_AND_SAVE, str(ws), str(store_dir), KEY,
             str(ws.parent / f"{ws.name}-state")]),
            capture_output=True, text=True, timeout=60)
    finally:
        os.chmod(ws / "locked", 0o755)
        os.chmod(ws / "secret.env", 0o644)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.splitlines()[-1])
    assert "readable" not in out, "the file is still readable: the test proves nothing"
    files = tree_paths(state_git_dir(ws), out["commit"])
    assert in_state(ws, "show", f"{out['commit']}:readme.md") == "a readable edit"
    assert b"secret.env" not in files
    # A directory git cannot list keeps what the snapshot had, it is not recorded as deleted.
    assert b"locked/inside.txt" in files
    warned = [e for e in out["logs"] if e["event"] == "snapshot.unreadable_files"]
    assert warned and "secret.env" in warned[0]["detail"]
    assert out["generation"] == 1


@linux_only
def test_the_daemon_keeps_going_past_an_unreadable_file_and_directory(watcherd, monkeypatch, tmp_path):
    if os.geteuid() == 0:
        wrapper = tmp_path / "watcherd-without-dac-override"
        wrapper.write_text("#!/bin/sh\nexec " + " ".join(
            f"'{a}'" for a in without_dac_override([daemon_fixture.WATCHERD])) + ' "$@"\n')
        wrapper.chmod(0o755)
        monkeypatch.setattr(daemon_fixture, "WATCHERD", str(wrapper))
    d = watcherd().start()
    d.settle()
    mark = d.log.mark()
    (d.workspace / "src" / "private").mkdir()
    (d.workspace / "src" / "private" / "x.py").write_text("x = 1\n")
    (d.workspace / "secret.env").write_text("TOKEN=unreadable\n")
    os.chmod(d.workspace / "secret.env", 0)
    os.chmod(d.workspace / "src" / "private", 0)
    try:
        (d.workspace / "src" / "app.py").write_text("print('beside unreadable things')\n")
        wait_for(lambda: d.status()["state"] == "idle" and
                 d.show("src/app.py") == "print('beside unreadable things')", timeout=15,
                 message="the readable edit saved")
        assert d.log.events("snapshot.unreadable_files", after=mark)
        assert b"secret.env" not in tree_paths(d.repo)
        assert d.proc.poll() is None and not d.log.events("daemon.crashed")
        assert d.stop() == 0
    finally:
        os.chmod(d.workspace / "src" / "private", 0o755)
        os.chmod(d.workspace / "secret.env", 0o644)


# -- a read-only workspace ---------------------------------------------------------------------------------


@pytest.fixture
def tmpfs(tmp_path):
    """Mount a tmpfs: ``tmpfs(name)`` mounts one at ``tmp_path/name`` and returns it with a
    function to remount it ``ro`` or ``rw``; every one is unmounted at teardown."""
    mounted: list[Path] = []

    def mount(name: str = "mnt") -> tuple[Path, Callable[[str], None]]:
        mnt = tmp_path / name
        mnt.mkdir()
        try:
            r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)],
                               capture_output=True, text=True)
        except FileNotFoundError:
            pytest.skip("no mount command")
        if r.returncode != 0:
            pytest.skip(f"mounting a tmpfs is not permitted here ({r.stderr.strip()}): needs "
                        "root with CAP_SYS_ADMIN")
        mounted.append(mnt)

        def remount(mode: str) -> None:
            subprocess.run(["mount", "-o", f"remount,{mode}", str(mnt)], check=True)

        return mnt, remount

    yield mount
    for mnt in mounted:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_read_only_workspace_is_snapshotted_and_saved_without_a_write_to_it(tmp_path, tmpfs):
    # Shadow mode needs only read access to the workspace (the shipped examples mount it
    # read-only into the sidecar): everything it writes is in the state directory.
    mnt, remount = tmpfs()
    ws = make_repo(mnt / "ws")
    repo = Repo(tmp_path / "state", KEY, ws)  # the sidecar's own volume, writable
    store_dir = tmp_path / "store"
    snapshot.prepare(repo)
    snapshot.take(repo)
    gens_for(store_dir).save(repo)
    (ws / "readme.md").write_text("edited, then the disk went read-only\n")
    snapshot.take(repo)  # a snapshot the store has not seen yet
    (ws / "late.txt").write_text("written just before the remount\n")
    remount("ro")
    before = listing(mnt)

    with capture_logs() as logs:
        snap = snapshot.take(repo)
        result = gens_for(store_dir).save(repo)

    assert snap.commit
    assert git(tmp_path, f"--git-dir={repo.git_dir}", "show", f"{snap.commit}:late.txt") == \
        "written just before the remount"
    assert (result.status, result.generation, result.snapshot) == ("saved", 2, snap.commit)
    assert not events(logs, "spool.fallback") and not events(logs, "snapshot.state_not_recorded")
    assert listing(mnt) == before
    target = tmp_path / "restored"
    restore(config_for(target, store_dir), gens_for(store_dir))
    assert (target / "late.txt").read_text() == "written just before the remount\n"
    assert (target / "readme.md").read_text() == "edited, then the disk went read-only\n"


def test_a_snapshot_with_a_read_only_state_dir_fails_clearly_and_loses_nothing(tmp_path, tmpfs):
    # What watcherd must write (its repository, index and spool) is in the state directory: when
    # that disk goes read-only, a snapshot fails with a reason, and what was already committed
    # still reaches the store through a spool elsewhere.
    mnt, remount = tmpfs("state")
    ws = make_repo(tmp_path / "ws")
    repo = Repo(mnt, KEY, ws)
    store_dir = tmp_path / "store"
    snapshot.prepare(repo)
    snapshot.take(repo)
    gens_for(store_dir).save(repo)
    (ws / "readme.md").write_text("edited, then the state disk went read-only\n")
    local = snapshot.take(repo).commit  # a snapshot the store has not seen yet
    (ws / "late.txt").write_text("written after the last snapshot\n")
    remount("ro")

    with pytest.raises(WatcherdError) as err:
        snapshot.take(repo)
    assert "Read-only file system" in str(err.value) and "\n" not in str(err.value)
    assert repo.snapshot_head() == local

    with capture_logs() as logs:
        result = gens_for(store_dir).save(repo)
    assert result.status == "saved" and result.snapshot == local
    assert events(logs, "spool.fallback")
    assert (ws / "late.txt").read_text() == "written after the last snapshot\n"  # untouched


@pytest.mark.parametrize("where", ["mount point", "directory on the mount"])
def test_restore_into_a_read_only_workspace_refuses_clearly_and_changes_nothing(tmp_path, tmpfs, where):
    mnt, remount = tmpfs()
    source = make_repo(tmp_path / "source")
    store_dir = tmp_path / "store"
    save(source, store_dir)
    ws = mnt if where == "mount point" else mnt / "ws"
    ws.mkdir(exist_ok=True)
    (ws / "old.txt").write_text("what was there before\n")
    remount("ro")
    before = listing(mnt)
    cfg = tmp_path / "restore.toml"
    cfg.write_text(f'[workspace]\npath = "{ws}"\nstate_dir = "{tmp_path / "restore-state"}"\n'
                   f'[store]\nurl = "file://{store_dir}"\n'
                   f'key = "{KEY}"\n[control]\nlisten = ""\n')

    result = run_cli(cfg, "restore")

    assert result.returncode == 1, result
    assert len(said(result.stderr)) == 1 and "Traceback" not in result.stderr
    assert "Read-only file system" in result.stderr and str(ws) in result.stderr
    assert listing(mnt) == before


@linux_only
def test_the_daemon_keeps_saving_a_read_only_workspace(watcherd, tmpfs, tmp_path):
    mnt, remount = tmpfs()
    # Long timings: the request below is what saves the edit, not the daemon's own schedule.
    d = watcherd(workspace=make_workspace(mnt / "ws"),
                 watch={"quiet_period": "60s", "max_commit_delay": "60s", "idle_timeout": "60s"})
    d.start()
    mark = d.log.mark()
    (d.workspace / "src" / "app.py").write_text("print('edited, then read-only')\n")
    remount("ro")
    code, result = d.post("/snapshot")
    assert (code, result["status"]) == (200, "saved"), result
    assert d.show("src/app.py", d.manifest()["snapshot"]) == "print('edited, then read-only')"
    assert not d.log.events("snapshot.failed", after=mark)
    assert d.proc.poll() is None
    assert d.stop() == 0
    target = tmp_path / "restored"
    target.mkdir()
    d.restore_into(target)
    assert (target / "src" / "app.py").read_text() == "print('edited, then read-only')\n"


@linux_only
def test_the_daemon_with_a_read_only_state_dir_says_why_and_keeps_running(watcherd, tmpfs):
    mnt, remount = tmpfs("state")
    d = watcherd(state_dir=mnt)
    d.start()
    d.settle()
    (d.workspace / "src" / "app.py").write_text("print('edited, then the state went read-only')\n")
    remount("ro")
    mark = d.log.mark()
    code, result = d.post("/snapshot")
    assert code == 500 and result["status"] == "failed"
    assert "Read-only file system" in result["error"]
    failed = d.log.wait("snapshot.failed", after=mark, timeout=5)
    assert "Read-only file system" in failed["error"]
    assert d.proc.poll() is None and not d.log.events("daemon.crashed")
    assert d.status()["last_error"]["op"] == "snapshot"
    remount("rw")
    code, result = d.post("/snapshot")
    assert (code, result["status"]) == (200, "saved"), result
    assert d.show("src/app.py") == "print('edited, then the state went read-only')"
    assert d.stop() == 0


# -- bundles and manifests from a hostile store ----------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    """A workspace saved once (generation 1) to a local store: (workspace, store directory)."""
    ws = make_repo(tmp_path / "ws")
    (ws / "readme.md").write_text("generation 1\n")
    store_dir = tmp_path / "store"
    save(ws, store_dir)
    return ws, store_dir


def test_a_bundle_with_hostile_ref_names_restores_the_recorded_refs_and_writes_nothing_outside(
        tmp_path, saved):
    # The user's refs come back as the snapshot recorded them. What else a tampered bundle lists
    # is refused by git (names that escape, names git cannot store) or, when it is a valid name
    # the snapshot did not record, not given back.
    ws, store_dir = saved
    (ws / "readme.md").write_text("generation 2, with hostile refs\n")
    snap = take(ws)
    head = git(ws, "rev-parse", "HEAD")
    escape = tmp_path / "escaped"
    hostile = [f"{head} {name}".encode() for name in (
        f"refs/heads/../../../../../../../../{escape.relative_to('/')}",
        "refs/heads/a/../../x", "refs/../config", "x/../../pwned", "config", "hooks/post-checkout",
        "refs/heads/.git/config", "refs/heads/x.lock", "refs/heads/sp ace", "refs/heads/a\x01b",
        "HEAD2", "FETCH_HEAD", "refs/heads/main/../../../objects/info/alternates",
        "refs/heads/planted", "refs/tags/planted", "refs/watcherd/planted")]
    bundle = bundle_with_extra_refs(ws, tmp_path / "hostile.bundle", hostile)
    number = publish(store_dir, KEY, bundle, snapshot_commit=snap.commit, head=head,
                     head_ref="refs/heads/main")
    target = tmp_path / "restored"
    before = listing(tmp_path / "store")

    outcome = restore(config_for(target, store_dir), gens_for(store_dir))

    assert (outcome.action, outcome.generation) == ("restored", number)
    assert (target / "readme.md").read_text() == "generation 2, with hostile refs\n"
    # The user's refs as recorded; the snapshot history is watcherd's, in its state directory.
    refs = set(git(target, "for-each-ref", "--format=%(refname)").splitlines())
    assert refs == {"refs/heads/main"}
    assert in_state(target, "rev-parse", SNAPSHOT_REF) == snap.commit
    assert not escape.exists() and not (target / ".git" / "pwned").exists()
    assert not (target / ".git" / "objects" / "info" / "alternates").exists()
    assert git(target, "config", "--local", "--list").count("\n") < 10  # only git init's own
    assert listing(tmp_path / "store") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["ws", "ws-state", "store", "hostile.bundle", "restored", "restored-state"])


def test_a_bundle_whose_ref_git_cannot_store_falls_back_to_the_previous_generation(tmp_path, saved):
    ws, store_dir = saved
    (ws / "readme.md").write_text("generation 2, unstorable ref\n")
    snap = take(ws)
    head = git(ws, "rev-parse", "HEAD")
    bundle = bundle_with_extra_refs(ws, tmp_path / "long.bundle",
                                    [f"{head} refs/heads/{'x' * 5000}".encode()])
    publish(store_dir, KEY, bundle, snapshot_commit=snap.commit, head=head, head_ref="refs/heads/main")
    target = tmp_path / "restored"

    with capture_logs() as logs:
        outcome = restore(config_for(target, store_dir), gens_for(store_dir))

    assert (outcome.action, outcome.generation) == ("restored", 1)
    assert (target / "readme.md").read_text() == "generation 1\n"
    bad = events(logs, "restore.generation_bad")
    assert [e["generation"] for e in bad] == [2]


def legacy_bundle(ws: Path, dest: Path) -> str:
    """A generation as a watcherd before state commits wrote it: the snapshot (the working tree,
    parent HEAD) on refs/watcherd/snapshots in the workspace's own repository, bundled with all
    its refs. Restore takes HEAD from such a generation's manifest. Returns the snapshot."""
    index = ws.parent / "legacy-index"
    env = {**os.environ, "GIT_INDEX_FILE": str(index)}
    subprocess.run(["git", "add", "-A"], cwd=ws, env=env, check=True)
    tree = subprocess.run(["git", "write-tree"], cwd=ws, env=env, check=True, capture_output=True,
                          text=True).stdout.strip()
    index.unlink()
    snap = git(ws, "commit-tree", tree, "-p", "HEAD", "-m", "watcherd: snapshot (1 files)")
    git(ws, "update-ref", SNAPSHOT_REF, snap)
    git(ws, "bundle", "create", "-q", str(dest), "--all")
    git(ws, "update-ref", "-d", SNAPSHOT_REF)
    return snap


@pytest.mark.parametrize("head_ref,head", [
    ("refs/heads/../../config", None),
    ("refs/heads/../../../../outside", None),
    (None, "f" * 40),  # a detached HEAD at a commit the bundle does not have
])
def test_a_manifest_with_a_hostile_head_for_an_old_generation_is_refused(
        tmp_path, saved, head_ref, head):
    # A generation of an older watcherd has no state commit: its manifest says where HEAD goes.
    ws, store_dir = saved
    (ws / "readme.md").write_text("generation 2, odd HEAD\n")
    bundle = tmp_path / "plain.bundle"
    snap = legacy_bundle(ws, bundle)
    publish(store_dir, KEY, bundle, snapshot_commit=snap, head=head, head_ref=head_ref)
    target = tmp_path / "restored"

    with capture_logs() as logs:
        outcome = restore(config_for(target, store_dir), gens_for(store_dir))

    assert (outcome.action, outcome.generation) == ("restored", 1)
    assert [e["generation"] for e in events(logs, "restore.generation_bad")] == [2]
    assert git(target, "symbolic-ref", "-q", "HEAD") == "refs/heads/main"
    assert (target / "readme.md").read_text() == "generation 1\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["ws", "ws-state", "store", "plain.bundle", "restored", "restored-state"])


@pytest.mark.parametrize("head_ref,head", [
    ("refs/heads/../../config", None),
    ("refs/heads/../../../../outside", None),
    (None, "f" * 40),
])
def test_a_hostile_head_in_the_manifest_is_not_where_a_restore_takes_head_from(
        tmp_path, saved, head_ref, head):
    # A generation with a state commit: HEAD comes back as the snapshot recorded it (validated
    # when read), and the manifest's copy of it, which a tampered store can change, is not used.
    ws, store_dir = saved
    (ws / "readme.md").write_text("generation 2, odd HEAD in the manifest\n")
    snap = take(ws)
    bundle = tmp_path / "plain.bundle"
    in_state(ws, "bundle", "create", "-q", str(bundle), SNAPSHOT_REF)
    number = publish(store_dir, KEY, bundle, snapshot_commit=snap.commit, head=head,
                     head_ref=head_ref)
    target = tmp_path / "restored"

    outcome = restore(config_for(target, store_dir), gens_for(store_dir))

    assert (outcome.action, outcome.generation) == ("restored", number)
    assert git(target, "symbolic-ref", "-q", "HEAD") == "refs/heads/main"
    assert git(target, "rev-parse", "HEAD") == git(ws, "rev-parse", "HEAD")
    assert (target / "readme.md").read_text() == "generation 2, odd HEAD in the manifest\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["ws", "ws-state", "store", "plain.bundle", "restored", "restored-state"])
    # .git/config (where "refs/heads/../../config" would land) is git's own, nothing else.
    assert git(target, "config", "--local", "--get", "core.bare") == "false"


@pytest.mark.parametrize("bundle_name", [
    "../other/1-abcdef012345.bundle",
    "../../other-key/main/bundles/1-abcdef012345.bundle",
    "/etc/passwd",
    "file:///etc/passwd",
    "s3://other-bucket/1-abcdef012345.bundle",
    "https://attacker.example/1-abcdef012345.bundle",
    "1-abcdef012345.bundle/../../../../other/1-abcdef012345.bundle",
    "1-abcdef012345.bundle\n",
    "..",
    "",
])
@pytest.mark.parametrize("where", ["current", "history"])
def test_a_manifest_naming_a_bundle_outside_its_key_is_refused_and_nothing_is_downloaded(
        tmp_path, saved, bundle_name, where):
    ws, store_dir = saved
    (ws / "readme.md").write_text("generation 2\n")
    save(ws, store_dir)
    # A real, valid bundle waits at the escaping path, so a download would succeed if tried.
    path = store_dir / KEY / "manifest.json"
    doc = json.loads(path.read_bytes())
    for name in ("../other/1-abcdef012345.bundle",
                 "../../other-key/main/bundles/1-abcdef012345.bundle"):
        dest = (store_dir / KEY / "bundles" / name).resolve()
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(store_dir / KEY / "bundles" / doc["bundle"], dest)
    entry = doc if where == "current" else doc["history"][0]
    entry["bundle"] = bundle_name
    path.write_text(json.dumps(doc))
    downloads: list[str] = []
    gens = gens_for(store_dir)
    real_download = gens.store.download
    gens.store.download = lambda name, dest, **kw: (downloads.append(name),
                                                    real_download(name, dest, **kw))[1]
    target = tmp_path / "restored"

    with capture_logs() as logs:
        with pytest.raises(RestoreError) as err:
            restore(config_for(target, store_dir, on_missing="fail"), gens)

    assert downloads == []
    assert "manifest.json" in str(err.value) and "bundle" in str(err.value)
    assert events(logs, "restore.manifest_bad")
    assert not target.exists()
    with pytest.raises(IntegrityError):
        gens_for(store_dir).read_manifest()


@pytest.mark.parametrize("key", ["../x", "acme/../../etc", "/etc/watcherd", "a//b", "a/./..",
                                 "a\\..\\b", "a/b\n"])
@pytest.mark.parametrize("command", [["config", "check"], ["restore"], ["run"]])
def test_a_store_key_from_the_environment_that_could_escape_is_a_config_error(tmp_path, key, command):
    store_dir = tmp_path / "store"
    cfg = tmp_path / "w.toml"
    cfg.write_text(f'[workspace]\npath = "{tmp_path / "ws"}"\nstate_dir = "{tmp_path / "state"}"\n'
                   f'[store]\nurl = "file://{store_dir}"\n'
                   '[control]\nlisten = ""\n')
    env = {**os.environ, "WATCHERD_STORE_KEY": key}

    result = subprocess.run([daemon_fixture.WATCHERD, "--config", str(cfg), *command],
                            capture_output=True, text=True, env=env, timeout=30)

    assert result.returncode == 2, result
    assert result.stdout == "" and result.stderr.count("\n") == 1
    assert "store.key" in result.stderr and "WATCHERD_STORE_KEY" in result.stderr
    assert "Traceback" not in result.stderr
    assert not store_dir.exists() and not (tmp_path / "ws").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.toml"]
