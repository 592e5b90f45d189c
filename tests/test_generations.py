"""Generations in the local store: layout, manifest, retention, size limits, forward-only saves and
bad stored data, against real repositories and a real store directory."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import threading
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from helpers import git, make_repo, sgit, state_repo, store_files
from watcherd import manifest as mf
from watcherd import snapshot
from watcherd.config import Config, StoreConfig, WorkspaceConfig, parse_store_url
from watcherd.errors import BundleTooLarge, ConflictError, IntegrityError
from watcherd.generations import Generations, Limits
from watcherd.repo import SNAPSHOT_REF
from watcherd.restore import restore
from watcherd.store.local import LocalStore

KEY = "acme/sandbox-1/main"


def gens_for(store_dir: Path, limits: Limits | None = None, key: str = KEY) -> Generations:
    return Generations(LocalStore(store_dir), key, limits)


def take(ws: Path) -> snapshot.Snapshot:
    """A shadow snapshot of ``ws`` in watcherd's own repository beside it (its state dir)."""
    repo = state_repo(ws, KEY)
    snapshot.prepare(repo)
    return snapshot.take(repo)


def snapshot_of(ws: Path) -> str:
    """The newest snapshot commit watcherd recorded for ``ws``."""
    return sgit(ws, "rev-parse", SNAPSHOT_REF, key=KEY)


def save(ws: Path, gens: Generations):
    take(ws)
    return gens.save(state_repo(ws, KEY))


def restore_into(target: Path, store_dir: Path) -> None:
    """``watcherd restore`` into ``target`` as the init container of its pod (the state
    directory beside it is the one its daemon continues with)."""
    config = Config(workspace=WorkspaceConfig(path=target,
                                              state_dir=target.parent / f"{target.name}-state"),
                    store=StoreConfig(url=parse_store_url(f"file://{store_dir}"), key=KEY))
    assert restore(config, gens_for(store_dir)).action == "restored"


def edit_and_save(ws: Path, gens: Generations, text: str):
    (ws / "readme.md").write_text(text)
    return save(ws, gens)


def key_dir(store_dir: Path, key: str = KEY) -> Path:
    return store_dir / key


def bundle_names(store_dir: Path, key: str = KEY) -> list[str]:
    return sorted(p.name for p in (key_dir(store_dir, key) / "bundles").glob("*.bundle"))


def manifest_doc(store_dir: Path, key: str = KEY) -> dict:
    return json.loads((key_dir(store_dir, key) / "manifest.json").read_bytes())


@pytest.fixture
def ws(tmp_path) -> Path:
    return make_repo(tmp_path / "ws")


@pytest.fixture
def store_dir(tmp_path) -> Path:
    return tmp_path / "store"


# -- layout and manifest -------------------------------------------------------------------------------


def test_a_save_writes_the_bundle_and_a_manifest_with_every_field(ws, store_dir):
    (ws / "readme.md").write_text("edited\n")
    result = save(ws, gens_for(store_dir))

    snap = snapshot_of(ws)
    name = f"1-{snap[:12]}.bundle"
    assert result.status == "saved" and result.generation == 1 and result.bundle == name
    assert sorted(p.relative_to(store_dir).as_posix() for p in store_dir.rglob("*") if p.is_file()
                  and not p.name.startswith(".")) == [f"{KEY}/bundles/{name}", f"{KEY}/manifest.json"]
    data = (key_dir(store_dir) / "bundles" / name).read_bytes()
    doc = manifest_doc(store_dir)
    assert doc["format"] == 2
    assert doc["generation"] == 1
    # The first generation's chain is its own, full bundle.
    assert doc["chain"] == [{"bundle": name, "size": len(data),
                             "sha256": hashlib.sha256(data).hexdigest(), "snapshot": snap}]
    assert doc["bundle"] == name
    assert doc["size"] == len(data) == result.bytes
    assert doc["sha256"] == hashlib.sha256(data).hexdigest()
    assert doc["snapshot"] == snap
    assert doc["head_ref"] == "refs/heads/main"
    assert doc["head"] == git(ws, "rev-parse", "HEAD")
    assert doc["created_at"].endswith("Z")
    assert mf.parse_time(doc["created_at"]).utcoffset().total_seconds() == 0
    assert doc["writer"]["pid"] == os.getpid()
    assert doc["writer"]["host"] and doc["writer"]["host"][0] == socket.gethostname()[0]
    assert doc["history"] == []


def test_a_second_save_is_generation_2_with_generation_1_in_its_history(ws, store_dir):
    gens = gens_for(store_dir)
    first = edit_and_save(ws, gens, "one\n")
    second = edit_and_save(ws, gens, "two\n")
    assert (first.generation, second.generation) == (1, 2)
    doc = manifest_doc(store_dir)
    assert doc["generation"] == 2
    assert [h["generation"] for h in doc["history"]] == [1]
    assert doc["history"][0]["bundle"] == first.bundle
    assert set(doc["history"][0]) == set(doc) - {"format", "history"}


def test_saving_an_unchanged_workspace_again_writes_nothing(ws, store_dir):
    gens = gens_for(store_dir)
    first = edit_and_save(ws, gens, "once\n")
    before = store_files(store_dir)
    again = save(ws, gens)
    assert again.status == "unchanged" and again.generation == first.generation
    assert store_files(store_dir) == before


def test_keep_3_after_5_saves_leaves_exactly_the_3_bundles_the_manifest_names(ws, store_dir):
    gens = gens_for(store_dir, Limits(keep=3))
    results = [edit_and_save(ws, gens, f"edit {i}\n") for i in range(5)]
    assert [r.generation for r in results] == [1, 2, 3, 4, 5]
    doc = manifest_doc(store_dir)
    named = sorted([doc["bundle"], *(h["bundle"] for h in doc["history"])])
    assert named == sorted(r.bundle for r in results[2:])
    assert bundle_names(store_dir) == named
    assert [doc["generation"], *(h["generation"] for h in doc["history"])] == [5, 4, 3]


def test_orphan_bundles_of_a_crashed_save_are_pruned_by_the_next_save(ws, store_dir):
    gens = gens_for(store_dir)
    edit_and_save(ws, gens, "one\n")
    gen1_manifest = (key_dir(store_dir) / "manifest.json").read_bytes()
    crashed = edit_and_save(ws, gens, "two\n")
    # A save that died after its upload and before its manifest: the bundle is there, unnamed.
    (key_dir(store_dir) / "manifest.json").write_bytes(gen1_manifest)

    after = edit_and_save(ws, gens, "three\n")

    assert after.status == "saved"
    assert crashed.bundle not in bundle_names(store_dir)
    assert bundle_names(store_dir) == sorted(g["bundle"] for g in
                                             [manifest_doc(store_dir), *manifest_doc(store_dir)["history"]])


def test_a_save_of_the_same_snapshot_a_crashed_save_left_behind_still_succeeds(ws, store_dir):
    gens = gens_for(store_dir)
    edit_and_save(ws, gens, "one\n")
    gen1_manifest = (key_dir(store_dir) / "manifest.json").read_bytes()
    crashed = edit_and_save(ws, gens, "two\n")
    (key_dir(store_dir) / "manifest.json").write_bytes(gen1_manifest)

    # Nothing changed since the crash: the next save names the very same snapshot.
    after = save(ws, gens)

    assert after.status == "saved" and after.snapshot == crashed.snapshot
    doc = manifest_doc(store_dir)
    assert doc["snapshot"] == crashed.snapshot and doc["generation"] > 1
    assert bundle_names(store_dir) == sorted([doc["bundle"], doc["history"][0]["bundle"]])


# -- size limits ---------------------------------------------------------------------------------------


def test_a_bundle_above_warn_bundle_size_is_saved_with_a_warning(ws, store_dir):
    (ws / "blob.bin").write_bytes(os.urandom(64 * 1024))
    with capture_logs() as logs:
        result = save(ws, gens_for(store_dir, Limits(warn_bundle_size=16 * 1024)))
    assert result.status == "saved"
    large = [e for e in logs if e["event"] == "bundle.large"]
    assert large and large[0]["bytes"] == result.bytes > 64 * 1024


def test_a_bundle_above_max_bundle_size_is_refused_and_nothing_is_uploaded(ws, store_dir):
    limits = Limits(warn_bundle_size=8 * 1024, max_bundle_size=16 * 1024)
    gens = gens_for(store_dir, limits)
    edit_and_save(ws, gens, "small\n")
    before = store_files(store_dir)
    (ws / "blob.bin").write_bytes(os.urandom(64 * 1024))

    with pytest.raises(BundleTooLarge, match="store.max_bundle_size"):
        save(ws, gens)

    assert store_files(store_dir) == before
    assert not list(store_dir.rglob(".tmp-*"))


def test_a_first_bundle_above_max_bundle_size_leaves_the_store_empty(ws, store_dir):
    (ws / "blob.bin").write_bytes(os.urandom(64 * 1024))
    with pytest.raises(BundleTooLarge):
        save(ws, gens_for(store_dir, Limits(warn_bundle_size=1024, max_bundle_size=2048)))
    assert store_files(store_dir) == {}


# -- forward only --------------------------------------------------------------------------------------


def test_a_save_that_is_not_a_fast_forward_is_refused_and_kept_under_conflicts(tmp_path, ws, store_dir):
    gens = gens_for(store_dir)
    edit_and_save(ws, gens, "the good history\n")
    before = (key_dir(store_dir) / "manifest.json").read_bytes()
    other = make_repo(tmp_path / "other", "started from the template again\n")

    with pytest.raises(ConflictError, match="not part of this workspace's history") as info:
        save(other, gens)

    assert (key_dir(store_dir) / "manifest.json").read_bytes() == before
    assert len(bundle_names(store_dir)) == 1
    conflicts = list((key_dir(store_dir) / "conflicts").glob("*.bundle"))
    assert [f"{KEY}/conflicts/{p.name}" for p in conflicts] == [info.value.conflict_name]
    assert conflicts[0].name.startswith(tuple("0123456789"))  # <time>-<host>...
    # What was refused is kept whole: it fetches and holds the other workspace's snapshot.
    kept = tmp_path / "kept"
    kept.mkdir()
    git(kept, "init", "-q", "--bare")
    git(kept, "fetch", "-q", str(conflicts[0]), "refs/*:refs/*")
    assert git(kept, "rev-parse", SNAPSHOT_REF) == snapshot_of(other)


def test_a_refused_history_that_moves_on_replaces_its_copy_and_unrelated_ones_are_both_kept(
        tmp_path, ws, store_dir):
    gens = gens_for(store_dir)
    edit_and_save(ws, gens, "the good history\n")
    other = make_repo(tmp_path / "other", "a rival\n")
    with pytest.raises(ConflictError):
        save(other, gens)
    (other / "readme.md").write_text("the rival again\n")
    with pytest.raises(ConflictError) as second:
        save(other, gens)
    # One copy per divergence: the second holds the first's history, so it replaces it...
    copies = list((key_dir(store_dir) / "conflicts").glob("*.bundle"))
    assert [f"{KEY}/conflicts/{p.name}" for p in copies] == [second.value.conflict_name]
    # ...and the same history refused again is not uploaded again.
    with pytest.raises(ConflictError) as third:
        save(other, gens)
    assert third.value.conflict_name == second.value.conflict_name
    # A second rival within the same second, from an unrelated history, is kept beside it.
    rival = make_repo(tmp_path / "rival", "a second rival\n")
    with pytest.raises(ConflictError):
        save(rival, gens)
    assert len(list((key_dir(store_dir) / "conflicts").glob("*.bundle"))) == 2


def test_a_save_that_continues_the_stored_history_is_a_fast_forward(tmp_path, ws, store_dir):
    gens = gens_for(store_dir)
    first = edit_and_save(ws, gens, "one\n")
    # Another pod restored from the store (its init container and its daemon share a state
    # directory) continues the stored history.
    continued = tmp_path / "continued"
    restore_into(continued, store_dir)
    (continued / "readme.md").write_text("continued elsewhere\n")

    second = save(continued, gens)

    assert second.status == "saved" and second.generation == 2
    assert _is_ancestor(continued, first.snapshot, second.snapshot)
    assert not (store_dir / KEY / "conflicts").exists()


def _is_ancestor(ws: Path, a: str, b: str) -> bool:
    """Whether ``a`` is in the history of ``b``, in watcherd's repository for ``ws``."""
    repo = state_repo(ws, KEY).git_dir
    return subprocess.run(["git", f"--git-dir={repo}", "merge-base", "--is-ancestor", a, b]
                          ).returncode == 0


@pytest.mark.parametrize("round_", range(4))
def test_two_concurrent_savers_of_one_key_cannot_both_win(tmp_path, store_dir, round_):
    # Two pods restored from the same stored generation 1 (each with its own state directory)
    # diverge and save at the same moment.
    base = make_repo(tmp_path / "base")
    gens = gens_for(store_dir)
    edit_and_save(base, gens, "common\n")
    workspaces = []
    for name in ("a", "b"):
        path = tmp_path / name
        restore_into(path, store_dir)
        (path / "readme.md").write_text(f"edited by {name}\n")
        assert take(path).commit
        workspaces.append(path)
    barrier = threading.Barrier(2)
    outcomes: dict[str, object] = {}

    def saver(path: Path) -> None:
        barrier.wait()
        try:
            outcomes[path.name] = gens_for(store_dir).save(state_repo(path, KEY))
        except ConflictError as exc:
            outcomes[path.name] = exc

    threads = [threading.Thread(target=saver, args=(p,)) for p in workspaces]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    saved = [n for n, o in outcomes.items() if not isinstance(o, Exception)]
    refused = [n for n, o in outcomes.items() if isinstance(o, ConflictError)]
    assert len(saved) == 1 and len(refused) == 1, outcomes
    winner = tmp_path / saved[0]
    doc = manifest_doc(store_dir)
    assert doc["generation"] == 2 and doc["snapshot"] == snapshot_of(winner)
    chain = [doc["snapshot"], *(h["snapshot"] for h in doc["history"])]
    assert all(_is_ancestor(winner, older, newer) for newer, older in zip(chain, chain[1:]))
    assert bundle_names(store_dir) == sorted([doc["bundle"], doc["history"][0]["bundle"]])
    assert len(list((key_dir(store_dir) / "conflicts").glob("*.bundle"))) == 1


# -- bad stored data -----------------------------------------------------------------------------------


def test_a_manifest_that_is_not_json_is_an_integrity_error_naming_it(store_dir):
    path = key_dir(store_dir) / "manifest.json"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"{not json")
    with pytest.raises(IntegrityError, match=f"{KEY}/manifest.json is not valid JSON"):
        gens_for(store_dir).read_manifest()
    assert path.read_bytes() == b"{not json"


def test_a_save_over_an_unreadable_manifest_is_kept_beside_it_and_changes_nothing(ws, store_dir):
    path = key_dir(store_dir) / "manifest.json"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"{not json")
    (ws / "readme.md").write_text("edited\n")
    with pytest.raises(ConflictError, match="the stored manifest cannot be used"):
        save(ws, gens_for(store_dir))
    assert path.read_bytes() == b"{not json"
    assert len(list((key_dir(store_dir) / "conflicts").glob("*.bundle"))) == 1
    assert not (key_dir(store_dir) / "bundles").exists()


def _saved(ws: Path, store_dir: Path, edits: int = 1) -> tuple[Generations, list]:
    gens = gens_for(store_dir)
    return gens, [edit_and_save(ws, gens, f"edit {i}\n") for i in range(edits)]


def test_a_manifest_naming_a_bundle_outside_its_key_is_refused(ws, store_dir):
    _saved(ws, store_dir)
    doc = manifest_doc(store_dir)
    doc["bundle"] = "../other/1-abcdef012345.bundle"
    (key_dir(store_dir) / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(IntegrityError, match="bundle"):
        gens_for(store_dir).read_manifest()


@pytest.mark.parametrize("writer", [{"host": "h", "pid": "not-a-number"}, ["h", 1], None])
def test_a_manifest_with_a_malformed_writer_is_an_integrity_error_not_a_crash(ws, store_dir, writer):
    _saved(ws, store_dir)
    doc = manifest_doc(store_dir)
    doc["writer"] = writer
    (key_dir(store_dir) / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(IntegrityError, match="writer"):
        gens_for(store_dir).read_manifest()


def test_fetching_a_bundle_the_manifest_names_but_the_store_lacks_says_which(ws, store_dir, tmp_path):
    gens, (result,) = _saved(ws, store_dir)
    (key_dir(store_dir) / "bundles" / result.bundle).unlink()
    manifest, _ = gens.read_manifest()
    with pytest.raises(IntegrityError, match=f"{result.bundle}, which does not exist"):
        gens.fetch(manifest.current, tmp_path)
    assert list(tmp_path.glob("gen*")) == []


def test_fetching_a_bundle_with_a_wrong_checksum_is_refused(ws, store_dir, tmp_path):
    gens, (result,) = _saved(ws, store_dir)
    path = key_dir(store_dir) / "bundles" / result.bundle
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    manifest, _ = gens.read_manifest()
    with pytest.raises(IntegrityError, match="has a sha256 that does not match the manifest"):
        gens.fetch(manifest.current, tmp_path)
    assert list(tmp_path.glob("gen*")) == []


def test_fetching_a_truncated_bundle_is_refused(ws, store_dir, tmp_path):
    gens, (result,) = _saved(ws, store_dir)
    path = key_dir(store_dir) / "bundles" / result.bundle
    path.write_bytes(path.read_bytes()[:-100])
    manifest, _ = gens.read_manifest()
    with pytest.raises(IntegrityError, match="truncated"):
        gens.fetch(manifest.current, tmp_path)
