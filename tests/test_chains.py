"""Incremental generations: each save uploads only what is new, a chain of bundles per generation
(manifest format 2). Behaviour, not timing: the cost figures are in bench/ and docs/benchmarks.md.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from helpers import git, make_repo, state_repo, tree_state
from watcherd import manifest as mf
from watcherd import snapshot
from watcherd.config import Config, StoreConfig, WorkspaceConfig, parse_store_url
from watcherd.generations import Generations, Limits
from watcherd.protocol import ChainPolicy
from watcherd.restore import Request, restore
from watcherd.store.local import LocalStore

KEY = "acme/chains/main"


def gens(store: Path, **policy) -> Generations:
    """The key's generations; chains grow by count alone unless a test says otherwise (these
    repositories are so small that any increment is a large fraction of the base)."""
    policy.setdefault("max_increment_ratio", 10)
    return Generations(LocalStore(store), KEY, Limits(keep=100, chain=ChainPolicy(**policy)))


def config_for(ws: Path, store: Path) -> Config:
    return Config(workspace=WorkspaceConfig(path=ws, state_dir=ws.parent / f"{ws.name}-state"),
                  store=StoreConfig(url=parse_store_url(f"file://{store}"), key=KEY))


def edit_and_save(ws: Path, store: Path, text: str, name: str = "readme.md", **policy):
    (ws / name).write_text(text)
    repo = state_repo(ws, KEY)
    snapshot.prepare(repo)
    snapshot.take(repo)
    return gens(store, **policy).save(repo)


def stored(store: Path) -> mf.Manifest:
    return mf.parse((store / KEY / "manifest.json").read_bytes(), "manifest")


def bundle_file(store: Path, name: str) -> Path:
    return store / KEY / "bundles" / name


def test_a_chain_of_50_increments_restores_exactly(tmp_path):
    ws = make_repo(tmp_path / "ws")
    store = tmp_path / "store"
    (ws / "big.bin").write_bytes(os.urandom(256 * 1024))
    results = [edit_and_save(ws, store, f"edit {n}\n", name=f"f{n % 7}.txt", max_increments=100)
               for n in range(51)]
    assert results[0].full and not any(r.full for r in results[1:])
    m = stored(store)
    assert len(m.current.links) == 51
    # Each increment carries only what is new: a few KiB, never the 256 KiB file again.
    assert all(link.size < 16 * 1024 for link in m.current.links[1:])
    assert m.current.links[0].size > 256 * 1024
    target = tmp_path / "restored"
    assert restore(config_for(target, store), gens(store)).generation == 51
    assert tree_state(target) == tree_state(ws)


def test_every_increment_needs_only_the_bundles_before_it_in_its_chain(tmp_path):
    ws = make_repo(tmp_path / "ws")
    store = tmp_path / "store"
    for n in range(5):
        edit_and_save(ws, store, f"edit {n}\n")
        if n == 2:
            git(ws, "commit", "-qam", "a user commit between saves")
    links = stored(store).current.links
    repo = tmp_path / "check.git"
    subprocess.run(["git", "init", "-q", "--bare", str(repo)], check=True)
    for n, link in enumerate(links):
        path = bundle_file(store, link.bundle)
        header = path.read_bytes().split(b"\n\n", 1)[0].decode()
        prerequisites = [line[1:].split()[0] for line in header.splitlines()
                         if line.startswith("-")]
        assert bool(prerequisites) == (n > 0)
        for commit in prerequisites:  # each is in a bundle before it, as the manifest orders them
            assert subprocess.run(["git", f"--git-dir={repo}", "cat-file", "-e", commit]).returncode == 0
        subprocess.run(["git", f"--git-dir={repo}", "fetch", "-q", str(path), "+refs/*:refs/*"],
                       check=True)
        assert git(tmp_path, f"--git-dir={repo}", "rev-parse", "refs/watcherd/snapshots") == \
            link.snapshot


@pytest.mark.parametrize("damage", ["flip", "delete"])
def test_a_broken_increment_falls_back_to_the_newest_whole_chain(tmp_path, damage):
    ws = make_repo(tmp_path / "ws")
    store = tmp_path / "store"
    for n in range(5):
        edit_and_save(ws, store, f"edit {n}\n")
    broken = stored(store).current.links[3]  # generation 4's increment: 4 and 5 run through it
    path = bundle_file(store, broken.bundle)
    if damage == "flip":
        data = bytearray(path.read_bytes())
        data[-30] ^= 0xFF
        path.write_bytes(bytes(data))
    else:
        path.unlink()
    target = tmp_path / "restored"
    with capture_logs() as logs:
        outcome = restore(config_for(target, store), gens(store))
    assert outcome.generation == 3
    assert (target / "readme.md").read_text() == "edit 2\n"
    bad = [e["generation"] for e in logs if e["event"] == "restore.generation_bad"]
    assert bad == [5, 4]
    # The next save of the restored workspace supersedes them with a new full chain.
    (target / "readme.md").write_text("carried on\n")
    repo = state_repo(target, KEY)
    snapshot.take(repo)
    result = gens(store).save(repo)
    assert result.generation == 6 and result.full and result.superseded == (5, 4)


def test_a_full_bundle_starts_a_new_chain_when_increments_outnumber_or_outgrow_the_base(tmp_path):
    ws = make_repo(tmp_path / "ws")
    store = tmp_path / "store"
    results = [edit_and_save(ws, store, os.urandom(8 * 1024).hex(), max_increments=4)
               for _ in range(7)]
    assert [r.full for r in results] == [True, False, False, False, False, True, False]
    # By size: increments larger than half the base start a new chain at once.
    grown = [edit_and_save(ws, store, os.urandom(64 * 1024).hex(), name="big.txt",
                           max_increments=100, max_increment_ratio=0.5) for _ in range(3)]
    assert [r.full for r in grown] == [False, True, False]
    m = stored(store)
    assert len(m.current.links) == 2
    # Older generations keep their chains (keep counts restore points): all still restore.
    for g in m.generations:
        target = tmp_path / f"restored-{g.generation}"
        assert restore(config_for(target, store), gens(store),
                       Request(generation=g.generation)).generation == g.generation


def test_keep_prunes_a_bundle_only_when_no_kept_chain_needs_it(tmp_path):
    ws = make_repo(tmp_path / "ws")
    store = tmp_path / "store"
    repo = state_repo(ws, KEY)
    snapshot.prepare(repo)
    small = Generations(LocalStore(store), KEY,
                        Limits(keep=2, chain=ChainPolicy(max_increments=100, max_increment_ratio=10)))
    for n in range(6):
        (ws / "readme.md").write_text(f"{n}\n")
        snapshot.take(repo)
        small.save(repo)
    m = stored(store)
    assert [g.generation for g in m.generations] == [6, 5]
    needed = {link.bundle for g in m.generations for link in g.links}
    on_disk = {p.name for p in (store / KEY / "bundles").iterdir()}
    assert on_disk == needed and len(needed) == 6  # the base and every increment since
    assert restore(config_for(tmp_path / "restored", store), gens(store)).generation == 6


def test_a_format_1_store_restores_and_moves_forward_to_format_2(tmp_path):
    ws = make_repo(tmp_path / "ws")
    store = tmp_path / "store"
    edit_and_save(ws, store, "saved by an older watcherd\n")
    path = store / KEY / "manifest.json"
    doc = json.loads(path.read_bytes())
    doc["format"] = 1
    del doc["chain"]
    path.write_text(json.dumps(doc))  # what an older watcherd wrote: one full bundle
    target = tmp_path / "restored"
    assert restore(config_for(target, store), gens(store)).generation == 1
    (target / "readme.md").write_text("saved by this one\n")
    repo = state_repo(target, KEY)
    snapshot.take(repo)
    result = gens(store).save(repo)
    assert result.generation == 2 and not result.full  # an increment on the format 1 bundle
    m = stored(store)
    assert json.loads(path.read_bytes())["format"] == 2
    assert [link.bundle for link in m.current.links] == [doc["bundle"], result.bundle]
    again = tmp_path / "again"
    assert restore(config_for(again, store), gens(store)).generation == 2
    assert (again / "readme.md").read_text() == "saved by this one\n"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify is Linux-only")
def test_the_final_save_on_sigterm_is_an_increment_never_a_compaction(watcherd_daemon):
    d = watcherd_daemon
    d.settle()
    mark = d.log.mark()
    (d.workspace / "src" / "app.py").write_text("print('last words')\n")
    d.signal(signal.SIGTERM)
    assert d.wait_exit(timeout=10) == 0
    final = d.log.wait("generation.saved", after=mark, timeout=0)
    assert final["kind"] == "increment"


@pytest.fixture
def watcherd_daemon(watcherd):
    # max_increments = 1: every idle save would compact; the final one must not.
    d = watcherd()
    d.config.write_text(d.config.read_text().replace(
        "[store]\n", "[store]\nmax_increments = 1\n", 1))
    d.start()
    yield d


from daemon_fixture import watcherd  # noqa: E402,F401 (fixture)


def test_a_compaction_killed_half_way_leaves_every_generation_restorable(tmp_path):
    # kill -9 between the full bundle's upload and the manifest swap: an orphan, pruned later.
    ws = make_repo(tmp_path / "ws")
    store = tmp_path / "store"
    for n in range(3):
        edit_and_save(ws, store, f"{n}\n", max_increments=100)
    (ws / "readme.md").write_text("compacted\n")
    repo = state_repo(ws, KEY)
    snapshot.take(repo)
    script = tmp_path / "killer.py"
    script.write_text(
        "import os, sys\n"
        f"sys.path[:0] = {[str(Path(__file__).parent), str(Path(__file__).parent.parent)]!r}\n"
        "from watcherd.store.local import LocalStore\n"
        "real = LocalStore.write\n"
        "def write(self, name, data, **kw):\n"
        "    if name.endswith('manifest.json'):\n"
        "        os.kill(os.getpid(), 9)\n"
        "    return real(self, name, data, **kw)\n"
        "LocalStore.write = write\n"
        "from helpers import state_repo\n"
        "from watcherd.generations import Generations, Limits\n"
        "from watcherd.protocol import ChainPolicy\n"
        f"Generations(LocalStore({str(store)!r}), {KEY!r}, "
        "Limits(chain=ChainPolicy(max_increments=1))).save("
        f"state_repo(__import__('pathlib').Path({str(ws)!r}), {KEY!r}))\n")
    killed = subprocess.run([sys.executable, str(script)], capture_output=True)
    assert killed.returncode == -signal.SIGKILL
    m = stored(store)
    assert m.current.generation == 3  # the swap never happened
    for g in m.generations:
        target = tmp_path / f"r{g.generation}"
        assert restore(config_for(target, store), gens(store),
                       Request(generation=g.generation)).generation == g.generation
    orphans = {p.name for p in (store / KEY / "bundles").iterdir()} - \
        {link.bundle for g in m.generations for link in g.links}
    assert len(orphans) == 1
    result = edit_and_save(ws, store, "after the kill\n", max_increments=1)
    assert result.generation == 4
    assert {p.name for p in (store / KEY / "bundles").iterdir()} == \
        {link.bundle for g in stored(store).generations for link in g.links}
    shutil.rmtree(tmp_path / "r1", ignore_errors=True)
