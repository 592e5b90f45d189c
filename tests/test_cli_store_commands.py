"""``watcherd snapshot | list | verify | restore`` as a script or an init container runs them: a real
process, a TOML config file, a local store, and the exit status the DESIGN promises."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import make_repo, said, store_files, tree_state
from watcherd.units import format_size

KEY = "acme/cli-1/main"
WATCHERD = Path(sys.executable).parent / "watcherd"



def write_config(path: Path, ws: Path, store_dir: Path, *, store: str = "", restore: str = "") -> Path:
    """A pod's config; its state directory is ``<config name>-state`` beside it (a restore and a
    snapshot of one config are one pod's)."""
    state_dir = path.with_name(f"{path.stem}-state")
    path.write_text(f"""
[workspace]
path = "{ws}"
state_dir = "{state_dir}"

[store]
url = "file://{store_dir}"
key = "{KEY}"
{store}

[restore]
{restore}

[control]
listen = ""

[log]
format = "json"
""")
    return path


def watcherd(config: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    command = [str(WATCHERD)] if WATCHERD.exists() else [sys.executable, "-m", "watcherd"]
    return subprocess.run([*command, "--config", str(config), *args], capture_output=True,
                          text=True, timeout=timeout, env=os.environ.copy())


def start(config: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "watcherd", "--config", str(config), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def log_events(stderr: str) -> list[dict]:
    found = []
    for line in stderr.splitlines():
        if line.startswith("{"):
            found.append(json.loads(line))
    return found


@pytest.fixture
def ws(tmp_path) -> Path:
    return make_repo(tmp_path / "ws")


@pytest.fixture
def store_dir(tmp_path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def cfg(tmp_path, ws, store_dir) -> Path:
    return write_config(tmp_path / "watcherd.toml", ws, store_dir)


def saved(cfg: Path, ws: Path, *texts: str) -> None:
    for text in texts:
        (ws / "readme.md").write_text(text)
        r = watcherd(cfg, "snapshot")
        assert r.returncode == 0, r.stderr


# -- snapshot ------------------------------------------------------------------------------------------


def test_snapshot_saves_a_generation_then_reports_nothing_new(cfg, ws, store_dir):
    (ws / "readme.md").write_text("edited\n")
    first = watcherd(cfg, "snapshot")
    assert first.returncode == 0, first.stderr
    assert "snapshot: saved generation 1" in first.stdout
    assert any(e["event"] == "generation.saved" and e["generation"] == 1 for e in log_events(first.stderr))
    assert (store_dir / KEY / "manifest.json").exists()

    again = watcherd(cfg, "snapshot")
    assert again.returncode == 0, again.stderr
    assert "nothing new" in again.stdout


def test_snapshot_refused_as_a_conflict_exits_3_and_keeps_it_under_conflicts(tmp_path, cfg, ws, store_dir):
    saved(cfg, ws, "the stored history\n")
    manifest_before = (store_dir / KEY / "manifest.json").read_bytes()
    other = make_repo(tmp_path / "other", "a second pod on the same key\n")
    other_cfg = write_config(tmp_path / "other.toml", other, store_dir)

    r = watcherd(other_cfg, "snapshot")

    assert r.returncode == 3, (r.stdout, r.stderr)
    assert "conflicts/" in r.stderr and KEY in r.stderr
    assert len(said(r.stderr)) == 1 and "Traceback" not in r.stderr
    assert (store_dir / KEY / "manifest.json").read_bytes() == manifest_before
    assert len(list((store_dir / KEY / "conflicts").glob("*.bundle"))) == 1


def test_two_snapshot_processes_on_one_key_started_together_cannot_both_win(tmp_path, store_dir):
    # Two pods (each with its own state directory) on one key.
    procs = []
    for name in ("a", "b"):
        path = make_repo(tmp_path / name, f"workspace {name}\n")
        procs.append(start(write_config(tmp_path / f"{name}.toml", path, store_dir), "snapshot"))
    codes = sorted(p.wait(timeout=60) for p in procs)
    for p in procs:
        p.stdout.close()
        p.stderr.close()

    assert codes == [0, 3]
    doc = json.loads((store_dir / KEY / "manifest.json").read_bytes())
    assert doc["generation"] == 1 and doc["history"] == []
    assert [p.name for p in (store_dir / KEY / "bundles").iterdir()] == [doc["bundle"]]
    assert len(list((store_dir / KEY / "conflicts").glob("*.bundle"))) == 1


def test_two_snapshot_processes_of_one_workspace_on_a_new_state_dir_both_succeed(tmp_path):
    # A `watcherd snapshot` run while the pod's daemon is starting (not answering yet) does the
    # save itself: two processes of one pod create its state directory at the same moment. Several
    # pods at once, as the window is a few milliseconds.
    pods = []
    for n in range(4):
        ws = make_repo(tmp_path / f"ws{n}", f"workspace {n}\n")
        pods.append((ws, tmp_path / f"store{n}",
                     write_config(tmp_path / f"pod{n}.toml", ws, tmp_path / f"store{n}")))
    procs = [(store, start(cfg, "snapshot")) for _, store, cfg in pods for _ in range(2)]
    results = [(store, p.wait(timeout=60), p.stdout.read(), p.stderr.read()) for store, p in procs]
    for _, p in procs:
        p.stdout.close()
        p.stderr.close()

    assert [(code, err) for _, code, _, err in results if code != 0] == []
    for ws, store, _ in pods:
        doc = json.loads((store / KEY / "manifest.json").read_bytes())
        assert doc["generation"] == 1, doc
        assert [p.name for p in (store / KEY / "bundles").iterdir()] == [doc["bundle"]]
        assert not (store / KEY / "conflicts").exists()


def test_snapshot_above_max_bundle_size_exits_1_and_uploads_nothing(tmp_path, ws, store_dir):
    cfg = write_config(tmp_path / "small.toml", ws, store_dir,
                       store='warn_bundle_size = "4KiB"\nmax_bundle_size = "16KiB"')
    (ws / "blob.bin").write_bytes(os.urandom(64 * 1024))

    r = watcherd(cfg, "snapshot")

    assert r.returncode == 1
    assert "store.max_bundle_size" in r.stderr and "nothing was uploaded" in r.stderr
    assert store_files(store_dir) == {}


def test_snapshot_of_a_missing_workspace_exits_2_naming_it(tmp_path, store_dir):
    missing = tmp_path / "no-such-workspace"
    r = watcherd(write_config(tmp_path / "c.toml", missing, store_dir), "snapshot")
    assert r.returncode == 2
    assert str(missing) in r.stderr and "Traceback" not in r.stderr


# -- list and verify -----------------------------------------------------------------------------------


def test_list_shows_each_generation_with_time_size_head_and_writer(cfg, ws, store_dir):
    saved(cfg, ws, "one\n", "two\n")
    doc = json.loads((store_dir / KEY / "manifest.json").read_bytes())

    r = watcherd(cfg, "list")

    assert r.returncode == 0, r.stderr
    rows = [line.split() for line in r.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert [row[0] for row in rows] == ["2", "1"]
    newest = rows[0]
    assert newest[1] == doc["created_at"]
    assert newest[2] == format_size(doc["size"])
    assert newest[3] == doc["snapshot"][:12] and newest[4] == doc["head"][:12]
    assert newest[5] == "main"
    assert newest[6] == f"{doc['writer']['host']}:{doc['writer']['pid']}"


def test_list_json_parses_and_names_every_generation(cfg, ws, store_dir):
    saved(cfg, ws, "one\n", "two\n", "three\n")
    r = watcherd(cfg, "list", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["key"] == KEY
    assert [g["generation"] for g in out["generations"]] == [3, 2, 1]
    assert {"size", "sha256", "head", "head_ref", "created_at", "writer"} <= set(out["generations"][0])


def test_list_of_an_empty_store_exits_0(cfg):
    r = watcherd(cfg, "list")
    assert r.returncode == 0 and "no generations" in r.stdout


def test_verify_exits_0_on_a_good_store(cfg, ws):
    saved(cfg, ws, "one\n")
    r = watcherd(cfg, "verify")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "generation 1 restores" in r.stdout


def test_verify_exits_1_and_names_a_corrupt_newest_generation(cfg, ws, store_dir):
    saved(cfg, ws, "one\n", "two\n")
    doc = json.loads((store_dir / KEY / "manifest.json").read_bytes())
    bundle = store_dir / KEY / "bundles" / doc["bundle"]
    data = bytearray(bundle.read_bytes())
    data[len(data) // 2] ^= 0x04
    bundle.write_bytes(bytes(data))

    r = watcherd(cfg, "verify")

    assert r.returncode == 1
    assert "generation 2 does NOT restore" in r.stdout and doc["bundle"] in r.stdout


def test_verify_with_nothing_stored_exits_1(cfg):
    r = watcherd(cfg, "verify")
    assert r.returncode == 1 and "nothing stored" in r.stdout


# -- restore -------------------------------------------------------------------------------------------


def test_restore_exits_0_with_the_workspace_ready(tmp_path, cfg, ws, store_dir):
    saved(cfg, ws, "restore me\n")
    target = tmp_path / "fresh-pod"
    r = watcherd(write_config(tmp_path / "pod.toml", target, store_dir), "restore")
    assert r.returncode == 0, r.stderr
    assert "restore: restored generation 1" in r.stdout
    assert tree_state(target) == tree_state(ws)


@pytest.mark.parametrize("args,message", [
    (["--generation", "0"], "--generation must be 1 or more"),
    (["--generation", "1", "--before", "1h"], "not both"),
    (["--generation", "9"], "--generation 9: not in the store"),
    (["--before", "last tuesday"], "not a time"),
    (["--generation", "two"], "invalid int value"),
])
def test_restore_with_bad_usage_exits_2_and_changes_nothing(tmp_path, cfg, ws, store_dir, args, message):
    saved(cfg, ws, "stored\n")
    before = tree_state(ws)
    r = watcherd(cfg, "restore", *args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert message in r.stderr
    assert tree_state(ws) == before
    assert not list(tmp_path.glob("ws.watcherd-*"))


def test_restore_before_a_time_restores_the_generation_saved_before_it(tmp_path, cfg, ws, store_dir):
    saved(cfg, ws, "one\n", "two\n")
    newest = json.loads((store_dir / KEY / "manifest.json").read_bytes())["created_at"]
    target = tmp_path / "fresh-pod"
    r = watcherd(write_config(tmp_path / "pod.toml", target, store_dir), "restore", "--before", newest)
    assert r.returncode == 0, r.stderr
    assert "restored generation 1" in r.stdout
    assert (target / "readme.md").read_text() == "one\n"


def test_restore_with_a_bad_config_exits_2(tmp_path, ws, store_dir):
    cfg = write_config(tmp_path / "bad.toml", ws, store_dir, restore='on_missing = "sometimes"')
    r = watcherd(cfg, "restore")
    assert r.returncode == 2 and "restore.on_missing" in r.stderr


def test_restore_with_nothing_stored_and_on_missing_fail_exits_1(tmp_path, store_dir):
    target = tmp_path / "fresh-pod"
    cfg = write_config(tmp_path / "pod.toml", target, store_dir, restore='on_missing = "fail"')
    r = watcherd(cfg, "restore")
    assert r.returncode == 1
    assert 'restore.on_missing = "fail"' in r.stderr and KEY in r.stderr
    assert not target.exists()


def test_restore_with_on_conflict_fail_exits_1_and_moves_nothing(tmp_path, cfg, ws, store_dir):
    saved(cfg, ws, "stored\n")
    target = tmp_path / "occupied"
    target.mkdir()
    (target / "mine.txt").write_text("not the stored history\n")
    pod = write_config(tmp_path / "pod.toml", target, store_dir, restore='on_conflict = "fail"')

    r = watcherd(pod, "restore")

    assert r.returncode == 1
    assert str(target) in r.stderr and "restore.on_conflict" in r.stderr
    assert tree_state(target) == {"mine.txt": ("file", 0, b"not the stored history\n")}
    assert not list(tmp_path.glob("occupied.watcherd-*"))


def test_restore_of_every_generation_corrupt_with_on_missing_fail_exits_1(tmp_path, cfg, ws, store_dir):
    saved(cfg, ws, "one\n")
    for bundle in (store_dir / KEY / "bundles").iterdir():
        bundle.write_bytes(bundle.read_bytes()[:-64])
    before = store_files(store_dir)
    target = tmp_path / "fresh-pod"
    r = watcherd(write_config(tmp_path / "pod.toml", target, store_dir, restore='on_missing = "fail"'),
                 "restore")
    assert r.returncode == 1
    assert "corrupt" in r.stderr
    assert store_files(store_dir) == before
    assert not target.exists()


def test_a_restored_pod_continues_the_stored_history(tmp_path, cfg, ws, store_dir):
    saved(cfg, ws, "from the first pod\n")
    target = tmp_path / "second-pod"
    pod = write_config(tmp_path / "pod.toml", target, store_dir)
    assert watcherd(pod, "restore").returncode == 0
    (target / "readme.md").write_text("the second pod carries on\n")
    r = watcherd(pod, "snapshot")
    assert r.returncode == 0, r.stderr
    assert "saved generation 2" in r.stdout
    shutil.rmtree(target)
    assert watcherd(pod, "restore").returncode == 0
    assert (target / "readme.md").read_text() == "the second pod carries on\n"
