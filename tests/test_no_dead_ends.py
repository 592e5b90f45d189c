"""The store has no dead ends and says the truth about every save (issue 10's failing inputs, each
with the right value asserted), on real repositories, a real local store and the real daemon.
The protocol's rules themselves are checked exhaustively in ``test_protocol.py``."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from daemon_fixture import Daemon, run_cli, watcherd, write_config  # noqa: F401 (fixture)
from helpers import git, make_repo, state_repo, wait_for
from watcherd import manifest as mf
from watcherd import snapshot
from watcherd.config import Config, RestoreConfig, StoreConfig, WorkspaceConfig, parse_store_url
from watcherd.errors import RestoreError
from watcherd.generations import Generations
from watcherd.repo import AUTO_PACK_LIMIT
from watcherd.restore import restore
from watcherd.store.local import LocalStore

KEY = "acme/sandbox-10/main"
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify is Linux-only")


def config_for(ws: Path, store_dir: Path, **restore_options) -> Config:
    return Config(workspace=WorkspaceConfig(path=ws, state_dir=ws.parent / f"{ws.name}-state"),
                  store=StoreConfig(url=parse_store_url(f"file://{store_dir}"), key=KEY),
                  restore=RestoreConfig(**restore_options))


def gens(store_dir: Path) -> Generations:
    return Generations(LocalStore(store_dir), KEY)


def save(ws: Path, store_dir: Path):
    repo = state_repo(ws, KEY)
    snapshot.prepare(repo)
    snapshot.take(repo)
    return gens(store_dir).save(repo)


def edit_and_save(ws: Path, store_dir: Path, text: str):
    (ws / "readme.md").write_text(text)
    return save(ws, store_dir)


def stored(store_dir: Path) -> mf.Manifest:
    return mf.parse((store_dir / KEY / "manifest.json").read_bytes(), "manifest")


def flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


# -- fallback, then moving on -------------------------------------------------------------------------


def test_after_a_fallback_the_next_save_supersedes_the_bad_generation(tmp_path):
    ws = make_repo(tmp_path / "ws")
    store = tmp_path / "store"
    edit_and_save(ws, store, "generation one\n")
    edit_and_save(ws, store, "generation two\n")
    flip(store / KEY / "bundles" / stored(store).current.bundle)

    pod = tmp_path / "pod"
    outcome = restore(config_for(pod, store), gens(store))
    assert outcome.generation == 1  # fell back, loudly
    bad = state_repo(pod, KEY).bad_generations()
    assert bad is not None and bad.generations == {2} and bad.current == 2

    (pod / "readme.md").write_text("edited after the fallback\n")
    result = save(pod, store)

    assert result.status == "saved" and result.generation == 3 and result.superseded == (2,)
    m = stored(store)
    assert [s.generation for s in m.supersedes] == [2] and "sha256" in m.supersedes[0].reason
    assert [g.generation for g in m.generations] == [3, 2, 1]  # nothing stored was deleted
    assert state_repo(pod, KEY).bad_generations() is None
    again = tmp_path / "next-pod"
    assert restore(config_for(again, store), gens(store)).generation == 3
    assert (again / "readme.md").read_text() == "edited after the fallback\n"


# -- unreadable is not nothing --------------------------------------------------------------------------


@pytest.mark.parametrize("content,problem", [
    (b'{"format": 3, "generation": 9}', "upgrade watcherd"),
    (b'{"format": 1, "generation": 1, "bundle": "x\xff"}', "not UTF-8"),
    (None, "field 'sha256'"),
    (b"[" * 200_000, "nested too deeply"),
    (b"{}" + b" " * (mf.MAX_SIZE + 1), "far larger"),
])
@pytest.mark.parametrize("on_missing", ["empty", "template"])
def test_an_unreadable_manifest_fails_the_restore_whatever_on_missing_says(
        tmp_path, content, problem, on_missing):
    ws = make_repo(tmp_path / "ws")
    store = tmp_path / "store"
    edit_and_save(ws, store, "saved\n")
    path = store / KEY / "manifest.json"
    if content is None:
        doc = json.loads(path.read_bytes())
        doc["sha256"] = "not a checksum"
        content = json.dumps(doc).encode()
    path.write_bytes(content)
    target = tmp_path / "pod"
    template = make_repo(tmp_path / "template", "template\n")

    with pytest.raises(RestoreError, match=problem):
        restore(config_for(target, store, on_missing=on_missing, template_url=str(template)),
                gens(store))
    assert not target.exists()


def test_objects_without_a_manifest_are_not_nothing_stored(tmp_path):
    ws = make_repo(tmp_path / "ws")
    store = tmp_path / "store"
    edit_and_save(ws, store, "saved\n")
    (store / KEY / "manifest.json").unlink()
    with pytest.raises(RestoreError, match="holds objects but no manifest"):
        restore(config_for(tmp_path / "pod", store), gens(store))


def test_a_key_with_no_object_at_all_is_nothing_stored(tmp_path):
    store = tmp_path / "store"
    (store / "acme" / "other").mkdir(parents=True)  # another key's objects do not count
    (store / "acme" / "other" / "manifest.json").write_text("{}")
    assert restore(config_for(tmp_path / "pod", store), gens(store)).action == "empty"


@linux_only
def test_a_deeply_nested_manifest_does_not_crash_the_daemon(watcherd):
    d = watcherd()
    d.store.joinpath(d.key).mkdir(parents=True)
    d.store.joinpath(d.key, "manifest.json").write_bytes(b"[" * 200_000)
    d.start()
    mark = d.log.mark()
    (d.workspace / "src" / "app.py").write_text("print('saved beside')\n")
    refused = d.log.wait("generation.conflict", after=mark, timeout=15)
    assert "nested too deeply" in refused["reason"]
    assert not d.log.events("daemon.crashed") and d.proc.poll() is None


# -- a refused save is never reported as saved ------------------------------------------------------------


def _diverge(d: Daemon, tmp_path: Path) -> None:
    """Another pod saves the same key from an unrelated history: every save of ``d`` is refused."""
    other = make_repo(tmp_path / "other-pod", "another pod's work\n")
    repo = state_repo(other, d.key)
    snapshot.prepare(repo)
    snapshot.take(repo)
    Generations(LocalStore(d.store), d.key).save(repo)


@linux_only
def test_refused_saves_are_reported_refused_by_snapshot_status_metrics_and_the_stop(
        watcherd, tmp_path):
    d = watcherd()
    _diverge(d, tmp_path)
    d.start()
    d.log.wait("generation.conflict", timeout=15)  # the start-up save of the edits
    # The save logs the conflict, then its result reaches the scheduler: status follows.
    s = wait_for(lambda: (st := d.status())["refused"] and st, timeout=10,
                 message="status to say the save was refused")
    assert s["refused"] is True and s["state"] == "conflict"
    assert s["oldest_unsaved_change_age_ms"] is not None
    assert d.metrics()["watcherd_unsaved_conflict"] == 1

    r = run_cli(d.config, "snapshot")
    assert r.returncode == 3, (r.stdout, r.stderr)
    assert "conflicts/" in r.stderr and "nothing new" not in r.stdout

    d.signal(signal.SIGTERM)
    assert d.wait_exit(timeout=10) == 3
    stopped = d.log.wait("daemon.stopped", timeout=0)
    assert stopped["saved"] is False and "conflicts/" in stopped["conflict"]


@linux_only
def test_conflict_copies_do_not_pile_up(watcherd, tmp_path):
    d = watcherd()
    _diverge(d, tmp_path)
    d.start()
    d.log.wait("generation.conflict", timeout=15)
    for n in range(6):
        mark = d.log.mark()
        (d.workspace / "src" / "app.py").write_text(f"print('cycle {n}')\n")
        d.log.wait("generation.conflict", after=mark, timeout=15)
    copies = sorted((d.store / d.key / "conflicts").iterdir())
    assert 1 <= len(copies) <= 3, [c.name for c in copies]
    newest = copies[-1]
    scratch = tmp_path / "scratch"
    subprocess.run(["git", "init", "-q", "--bare", str(scratch)], check=True)
    subprocess.run(["git", f"--git-dir={scratch}", "fetch", "-q", str(newest),
                    "refs/*:refs/*"], check=True)
    assert git(tmp_path, f"--git-dir={scratch}", "show",
               "refs/watcherd/snapshots:src/app.py") == "print('cycle 5')"
    wait_for(lambda: (d.status()["conflict"] or {}).get("copies") == len(copies), timeout=10,
             message="status to count the conflict copies")
    # A save with nothing new does not upload another copy.
    before = sorted(p.name for p in (d.store / d.key / "conflicts").iterdir())
    assert run_cli(d.config, "snapshot").returncode == 3
    assert sorted(p.name for p in (d.store / d.key / "conflicts").iterdir()) == before


# -- local failures are not corruption --------------------------------------------------------------------


@pytest.fixture
def small_tmpfs(tmp_path):
    path = tmp_path / "small"
    path.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a small tmpfs (a full disk during restore)")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {proc.stderr.strip()}")
    yield path
    subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_full_disk_during_restore_fails_it_without_falling_back(tmp_path, small_tmpfs):
    ws = make_repo(tmp_path / "ws")
    store = tmp_path / "store"
    edit_and_save(ws, store, "generation one\n")
    (ws / "big.bin").write_bytes(os.urandom(4 * 2**20))  # does not fit the target disk
    save(ws, store)
    target = small_tmpfs / "app"
    config = Config(workspace=WorkspaceConfig(path=target, state_dir=tmp_path / "pod-state"),
                    store=StoreConfig(url=parse_store_url(f"file://{store}"), key=KEY))

    with pytest.raises(RestoreError, match="No space left on device|local disk"):
        restore(config, gens(store))

    assert not target.exists()  # never the older generation instead
    assert state_repo(target, KEY).bad_generations() is None


# -- the store vanished ----------------------------------------------------------------------------------


def test_a_store_root_that_vanished_is_not_quietly_recreated(tmp_path):
    ws = make_repo(tmp_path / "ws")
    store = tmp_path / "store"
    repo = state_repo(ws, KEY)
    snapshot.prepare(repo)
    generations = gens(store)  # opened while the directory exists, as a daemon does
    for n in range(3):
        (ws / "readme.md").write_text(f"{n}\n")
        snapshot.take(repo)
        generations.save(repo)
    shutil.rmtree(store)
    (ws / "readme.md").write_text("after the store vanished\n")
    snapshot.take(repo)

    with pytest.raises(Exception, match="vanished"):
        generations.save(repo)
    assert not store.exists()


def test_a_key_that_vanished_is_saved_again_loudly(tmp_path):
    from structlog.testing import capture_logs

    ws = make_repo(tmp_path / "ws")
    store = tmp_path / "store"
    for n in range(3):
        edit_and_save(ws, store, f"{n}\n")
    shutil.rmtree(store / KEY)
    with capture_logs() as logs:
        result = edit_and_save(ws, store, "after the key vanished\n")
    assert result.generation == 1 and result.store_vanished
    vanished = [e for e in logs if e["event"] == "store.vanished"]
    assert vanished and vanished[0]["last_generation"] == 3


# -- a restore under a running daemon ---------------------------------------------------------------------


@linux_only
def test_a_restore_under_a_running_daemon_is_refused_unless_forced(watcherd, tmp_path):
    d = watcherd().start()
    d.settle()
    config = write_config(tmp_path / "restore.toml", workspace=d.workspace, store=d.store,
                          key=d.key, listen="", state_dir=d.state_dir)
    r = run_cli(config, "restore")
    assert r.returncode == 2 and f"pid {d.pid}" in r.stderr and "--force" in r.stderr
    assert d.proc.poll() is None
    forced = run_cli(config, "restore", "--force")
    assert forced.returncode == 0, forced.stderr


# -- packs do not pile up ------------------------------------------------------------------------------


def test_the_pack_count_of_watchers_repository_stays_bounded(tmp_path):
    ws = make_repo(tmp_path / "ws")
    store = tmp_path / "store"
    repo = state_repo(ws, KEY)
    for n in range(20):
        (ws / "readme.md").write_text(f"edit {n}\n")
        git(ws, "commit", "-qam", f"user commit {n}")  # each snapshot copies new user objects
        save(ws, store)
        repo.maintain()
    packs = list((repo.git_dir / "objects" / "pack").glob("*.pack"))
    assert 1 <= len(packs) <= AUTO_PACK_LIMIT + 1
    target = tmp_path / "restored"
    assert restore(config_for(target, store), gens(store)).generation == 20


def test_maintain_repacks_watchers_repository_above_the_auto_pack_limit(tmp_path):
    ws = make_repo(tmp_path / "ws")
    repo = state_repo(ws, KEY)
    repo.ensure()
    pack_dir = repo.git_dir / "objects" / "pack"

    def add_pack(n: int) -> None:
        blob = git(ws, f"--git-dir={repo.git_dir}", "hash-object", "-w", "--stdin",
                   input=f"object {n}\n".encode())
        git(ws, f"--git-dir={repo.git_dir}", "pack-objects", "-q", str(pack_dir / "pack"),
            input=f"{blob}\n".encode())

    for n in range(AUTO_PACK_LIMIT):
        add_pack(n)
    repo.maintain()
    assert len(list(pack_dir.glob("pack-*.pack"))) == AUTO_PACK_LIMIT  # at the limit: left be
    add_pack(AUTO_PACK_LIMIT)
    repo.maintain()
    assert len(list(pack_dir.glob("pack-*.pack"))) < AUTO_PACK_LIMIT


# -- stored strings are printed safely ------------------------------------------------------------------


def test_list_escapes_control_characters_from_the_store(tmp_path):
    ws = make_repo(tmp_path / "ws")
    store = tmp_path / "store"
    edit_and_save(ws, store, "saved\n")
    path = store / KEY / "manifest.json"
    doc = json.loads(path.read_bytes())
    doc["writer"]["host"] = "evil\x1b[2J\x1b[31mhost\r\n"
    path.write_text(json.dumps(doc))
    config = tmp_path / "list.toml"
    config.write_text(f'[store]\nurl = "file://{store}"\nkey = "{KEY}"\n'
                      f'[workspace]\npath = "{ws}"\nstate_dir = "{tmp_path / "st"}"\n')
    r = run_cli(config, "list")
    assert r.returncode == 0 and "\x1b" not in r.stdout and "\\x1b" in r.stdout


def test_two_workspaces_configured_with_one_state_directory_and_key_are_refused(tmp_path):
    # Their histories would silently merge into one line; the second one is told instead.
    from watcherd.errors import ConfigError
    from watcherd.repo import Repo

    a, b = make_repo(tmp_path / "a"), make_repo(tmp_path / "b")
    state = tmp_path / "shared-state"
    snapshot.prepare(Repo(state, KEY, a))
    snapshot.take(Repo(state, KEY, a))
    with pytest.raises(ConfigError, match=f"holds the history of another workspace .*{a}"):
        snapshot.prepare(Repo(state, KEY, b))
    # A workspace whose directory was replaced (the old one is gone) starts a new history.
    shutil.rmtree(a)
    a.mkdir()
    snapshot.prepare(Repo(state, KEY, a))
    assert Repo(state, KEY, a).paired_with(a)
