"""Split brain: two writers on one store key, and a workspace that is not the stored history.

The store only moves forward (DESIGN.md, invariant 1). These tests run real daemons that write the
same key — two pods restored from one generation and then edited, or a pod that came up from the
template because its restore failed or was skipped — and check what must hold whatever the timing:

* every generation the store ever named continues the one before it (checked by fetching the
  bundles into one repository and asking git, not by reading the manifest's word for it);
* the side whose history does not contain the stored one is refused: its state is saved under
  ``conflicts/`` (the bundle fetches and holds its edits), its ``/status`` says ``conflict`` and its
  log says ``generation.conflict``;
* nothing of either side is lost: each side's final tree is the stored head (the winner) or its
  newest conflict bundle (the loser), and every file either side wrote is in one of them.

Who wins a race is timing; that exactly one wins, and that the other is kept beside, is not.
"""

from __future__ import annotations

import json
import shutil
import random
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from daemon_fixture import (  # noqa: F401 (fixture)
    SNAPSHOT_REF,
    Daemon,
    make_workspace,
    run_cli,
    watcherd,
    write_config,
)
from helpers import git, tree_state

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify is Linux-only")


# -- reading the store as an auditor would -------------------------------------------------------------


class Audit:
    """A bare repository that every bundle of the store is fetched into, each under its own refs."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir()
        git(path, "init", "-q", "--bare")
        self.fetched: dict[Path, str] = {}

    def fetch(self, bundle: Path) -> str:
        """Fetch ``bundle`` (once) and return the snapshot head it carries."""
        if bundle not in self.fetched:
            ns = f"refs/audit/{len(self.fetched)}"
            git(self.path, "fetch", "-q", "--no-tags", str(bundle), f"+refs/*:{ns}/*")
            self.fetched[bundle] = git(self.path, "rev-parse", f"{ns}/{SNAPSHOT_REF[5:]}")
        return self.fetched[bundle]

    def generation(self, d: Daemon, doc: dict[str, Any]) -> str:
        """Fetch a generation's whole chain (base first, each bundle once); its snapshot head."""
        head = ""
        for link in doc.get("chain") or [{"bundle": doc["bundle"]}]:
            head = self.fetch(bundle_path(d, link["bundle"]))
        return head

    def is_ancestor(self, older: str, newer: str) -> bool:
        return subprocess.run(["git", "merge-base", "--is-ancestor", older, newer],
                              cwd=self.path).returncode == 0

    def files(self, commit: str) -> dict[str, bytes]:
        """Path -> content of every file in ``commit``'s tree."""
        listing = git(self.path, "ls-tree", "-r", "-z", commit).split("\0")
        entries = [(line.split()[2], line.split("\t", 1)[1]) for line in listing if line]
        if not entries:
            return {}
        out = subprocess.run(["git", "cat-file", "--batch"], cwd=self.path, check=True,
                             input="".join(f"{oid}\n" for oid, _ in entries).encode(),
                             capture_output=True).stdout
        files, pos = {}, 0
        for _, path in entries:
            header_end = out.index(b"\n", pos)
            size = int(out[pos:header_end].split()[2])
            files[path] = out[header_end + 1:header_end + 1 + size]
            pos = header_end + 1 + size + 1
        return files

    def all_blobs(self) -> set[bytes]:
        """The content of every file in every commit fetched so far (small repositories only)."""
        blobs: set[bytes] = set()
        for commit in git(self.path, "rev-list", "--all").split():
            blobs.update(self.files(commit).values())
        return blobs


def worktree_files(ws: Path) -> dict[str, bytes]:
    """The files of a work tree as git records them (the fixture ignores node_modules/, *.log)."""
    return {path: entry[2] for path, entry in tree_state(ws).items()
            if entry[0] == "file" and not path.startswith("node_modules/")
            and not path.endswith(".log")}


def manifest_of(d: Daemon) -> dict[str, Any]:
    m = d.manifest()
    assert m is not None, "nothing stored"
    return m


def bundle_path(d: Daemon, name: str) -> Path:
    return d.store / d.key / "bundles" / name


def conflict_bundles(d: Daemon) -> list[Path]:
    return sorted((d.store / d.key / "conflicts").glob("*.bundle"))


def assert_history_is_linear(d: Daemon, audit: Audit) -> list[str]:
    """Every generation the manifest keeps continues the one before it; their snapshots, oldest
    first."""
    m = manifest_of(d)
    gens = sorted([m, *m["history"]], key=lambda g: g["generation"])
    numbers = [g["generation"] for g in gens]
    assert numbers == list(range(numbers[0], m["generation"] + 1))
    heads = []
    for g in gens:
        head = audit.generation(d, g)
        assert head == g["snapshot"], f"generation {g['generation']}: bundle and manifest disagree"
        heads.append(head)
    for older, newer in zip(heads, heads[1:]):
        assert audit.is_ancestor(older, newer), f"{newer} does not continue {older}"
    return heads


def set_keep(d: Daemon, keep: int) -> None:
    """Keep every generation of a run, so the whole history can be audited at the end."""
    text = d.config.read_text()
    d.config.write_text(text.replace(f'key = "{d.key}"', f'key = "{d.key}"\nkeep = {keep}', 1))


def restored_pod(watcherd, tmp_path: Path, origin: Daemon, name: str, keep: int = 0) -> Daemon:
    ws = tmp_path / f"{name}-ws"
    ws.mkdir()
    d = watcherd(name=name, workspace=ws, store=origin.store, key=origin.key)
    origin.restore_into(ws, state_dir=d.state_dir)  # the init container of d's pod
    if keep:
        set_keep(d, keep)
    return d


def saved_origin(watcherd, tmp_path: Path, keep: int = 0, workspace: Path | None = None) -> Daemon:
    """A first pod that saved generation 1 (and stopped, as an evicted pod does)."""
    origin = watcherd(name="origin", workspace=workspace)
    if keep:
        set_keep(origin, keep)
    origin.start()
    (origin.workspace / "src" / "app.py").write_text("print('generation 1')\n")
    origin.settle()
    assert origin.stop() == 0
    assert origin.generation() >= 1
    return origin


# -- two pods on one key -------------------------------------------------------------------------------


def race_two_pods(watcherd, tmp_path: Path, rounds: int, repetition: int = 0) -> dict[str, int]:
    """Two pods restored from one generation edit and ask for a save at the same moment, ``rounds``
    times. Returns what happened, for the reliability figures."""
    base = tmp_path / f"rep{repetition}"
    base.mkdir()
    origin = watcherd(name=f"r{repetition}-origin", store=base / "store")
    set_keep(origin, rounds + 5)
    origin.start()
    (origin.workspace / "src" / "app.py").write_text(f"print('repetition {repetition}')\n")
    origin.settle()
    assert origin.stop() == 0
    pods = [restored_pod(watcherd, base, origin, f"r{repetition}-{side}", keep=rounds + 5)
            for side in ("a", "b")]
    for pod in pods:
        pod.start()
    for pod in pods:
        pod.settle()
    audit = Audit(base / "audit")
    first = manifest_of(origin)
    stored = [audit.generation(origin, first)]
    generation = first["generation"]
    winner = loser = None
    for r in range(rounds):
        for pod in pods:
            (pod.workspace / "src" / "app.py").write_text(f"print('{pod.name} round {r}')\n")
            (pod.workspace / "notes").mkdir(exist_ok=True)
            (pod.workspace / "notes" / f"{pod.name}-{r}.txt").write_text(f"{pod.name} {r}\n")
        results = save_at_once(pods)
        statuses = {name: res.get("status") for name, res in results.items()}
        assert sorted(statuses.values()) == ["conflict", "saved"], results
        won = next(p for p in pods if statuses[p.name] == "saved")
        lost = next(p for p in pods if statuses[p.name] == "conflict")
        assert (results[won.name]["code"], results[lost.name]["code"]) == (200, 409)
        if winner is None:
            winner, loser = won, lost
        # Once refused, always refused: the loser's history can never contain the winner's.
        assert (won.name, lost.name) == (winner.name, loser.name), f"round {r}: {statuses}"

        # The store moved forward by exactly the winner's save, and only forward.
        m = manifest_of(winner)
        generation += 1
        assert m["generation"] == generation, f"round {r}: {m['generation']}"
        head = audit.generation(winner, m)
        assert head == m["snapshot"] == results[winner.name]["snapshot"]
        assert audit.is_ancestor(stored[-1], head), \
            f"round {r}: generation {generation} does not continue the one before it"
        stored.append(head)
        assert audit.files(head) == worktree_files(winner.workspace)

        # The loser's state is beside it, whole, and said so in its status and its log.
        saved_as = results[loser.name]["saved_as"]
        kept = audit.fetch(loser.store / saved_as)
        assert audit.files(kept) == worktree_files(loser.workspace)
        assert loser.status()["conflict"]["saved_as"] == saved_as
        loser.log.wait("generation.conflict", conflict=saved_as, timeout=5)
        assert winner.status()["conflict"] is None

    assert loser.status()["counters"]["conflicts"] == rounds
    raced = sum(len(pod.log.events("generation.raced")) for pod in pods)
    # Both stopped (each made its final save; the loser's was refused, and it says so with its
    # exit status): the history is linear end to end, the winner's final tree is the stored head,
    # the loser's in its conflict copy. One copy per divergence: each refused save of the loser
    # replaced the copy before it, whose history it holds.
    assert winner.stop() == 0 and loser.stop() == 3
    heads = assert_history_is_linear(winner, audit)
    assert heads[0] == stored[0] and heads[-1] == stored[-1]
    assert audit.files(heads[-1]) == worktree_files(winner.workspace)
    conflicts = conflict_bundles(winner)
    assert len(conflicts) == 1
    assert audit.files(audit.fetch(max(conflicts, key=lambda p: p.stat().st_mtime_ns))) \
        == worktree_files(loser.workspace)
    assert_nothing_lost(audit, pods, [bundle_path(winner, n) for n in stored_bundles(winner)]
                        + conflicts, rounds)
    return {"rounds": rounds, "conflicts": len(conflicts), "raced": raced}


def save_at_once(pods: list[Daemon]) -> dict[str, dict[str, Any]]:
    """``POST /snapshot`` to every pod at the same moment; each one's answer."""
    barrier = threading.Barrier(len(pods))
    results: dict[str, dict[str, Any]] = {}

    def save(pod: Daemon) -> None:
        barrier.wait()
        code, body = pod.post("/snapshot")
        results[pod.name] = {"code": code, **(body or {})}

    threads = [threading.Thread(target=save, args=(pod,)) for pod in pods]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == len(pods), f"a save did not answer: {results}"
    return results


def stored_bundles(d: Daemon) -> list[str]:
    """Every bundle the kept generations' chains run through, in the order they can be fetched."""
    m = manifest_of(d)
    names: dict[str, None] = {}
    for g in sorted((m, *m["history"]), key=lambda g: g["generation"]):
        names.update((link["bundle"], None) for link in g.get("chain") or [{"bundle": g["bundle"]}])
    return list(names)


def assert_nothing_lost(audit: Audit, pods: list[Daemon], bundles: list[Path], rounds: int) -> None:
    """Every edit of every pod is in some bundle of the store: a generation or a conflict."""
    for b in bundles:
        audit.fetch(b)
    everything = audit.all_blobs()
    for pod in pods:
        for r in range(rounds):
            assert f"{pod.name} {r}\n".encode() in everything, f"{pod.name}'s note {r} was lost"
            assert f"print('{pod.name} round {r}')\n".encode() in everything, \
                f"{pod.name}'s edit of round {r} was lost"


def test_two_pods_restored_from_one_generation_keep_the_store_linear_and_the_loser_beside_it(
        watcherd, tmp_path: Path) -> None:
    race_two_pods(watcherd, tmp_path, rounds=3)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_two_pods_racing_for_one_key_many_times_never_both_win_nor_lose_an_edit(
        watcherd, tmp_path: Path) -> None:
    repetitions, rounds = 25, 4
    totals = {"rounds": 0, "conflicts": 0, "raced": 0}
    for rep in range(repetitions):
        for k, v in race_two_pods(watcherd, tmp_path, rounds=rounds, repetition=rep).items():
            totals[k] += v
    print(f"FIGURES split-brain race: repetitions={repetitions} {json.dumps(totals)}")


def free_running_pods(watcherd, tmp_path: Path, seconds: float, seed: int) -> dict[str, int]:
    """Two pods restored from one generation, each edited by its own agent at random for
    ``seconds``, saving on the daemons' own timers (no requests); then both are stopped."""
    rng = random.Random(seed)
    base = tmp_path / f"free{seed}"
    base.mkdir()
    origin = watcherd(name=f"f{seed}-origin", store=base / "store")
    set_keep(origin, 10_000)
    origin.start()
    (origin.workspace / "src" / "app.py").write_text(f"print('seed {seed}')\n")
    origin.settle()
    assert origin.stop() == 0
    pods = [restored_pod(watcherd, base, origin, f"f{seed}-{side}", keep=10_000)
            for side in ("a", "b")]
    for pod in pods:
        pod.start()
    written: dict[str, list[bytes]] = {pod.name: [] for pod in pods}

    def agent(pod: Daemon, rng: random.Random) -> None:
        notes = pod.workspace / "notes"
        notes.mkdir(exist_ok=True)
        ends = time.monotonic() + seconds
        n = 0
        while time.monotonic() < ends:
            n += 1
            pick = rng.random()
            if pick < 0.45:
                data = f"{pod.name} note {n}\n".encode()
                (notes / f"{pod.name}-{n}.txt").write_bytes(data)
            elif pick < 0.9:
                data = f"print('{pod.name} edit {n}')\n".encode()
                (pod.workspace / "src" / "app.py").write_bytes(data)
            else:
                # A pause longer than idle_timeout: the daemon uploads on its own.
                time.sleep(rng.uniform(1.1, 1.6))
                continue
            written[pod.name].append(data)
            time.sleep(rng.uniform(0.0, 0.3))

    threads = [threading.Thread(target=agent, args=(pod, random.Random(rng.random())))
               for pod in pods]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 30)
    codes = {pod.name: pod.stop(timeout=20) for pod in pods}

    refused = {pod.name: pod.log.events("generation.conflict") for pod in pods}
    losers = [pod for pod in pods if refused[pod.name]]
    assert len(losers) == 1, {name: len(c) for name, c in refused.items()}
    loser = losers[0]
    winner = next(pod for pod in pods if pod is not loser)
    # The loser's final save was refused too: never reported as saved.
    assert (codes[winner.name], codes[loser.name]) == (0, 3), codes
    audit = Audit(base / "audit")
    heads = assert_history_is_linear(winner, audit)
    assert audit.files(heads[-1]) == worktree_files(winner.workspace)
    newest = loser.store / refused[loser.name][-1]["conflict"]
    assert audit.files(audit.fetch(newest)) == worktree_files(loser.workspace)
    # The store never took anything of the loser's: none of its notes is in a generation.
    in_store = set().union(*(audit.files(h).values() for h in heads))
    assert not [d for d in written[loser.name] if d in in_store and b"note" in d]
    conflicts = conflict_bundles(winner)
    assert len(conflicts) == 1  # one per divergence: each newer copy replaced the older
    for c in conflicts:
        audit.fetch(c)
    # Nothing lost: every note either agent wrote is in a generation or a conflict bundle (notes are
    # never overwritten; an edit of app.py overwritten within a quiet period may never be seen).
    everything = audit.all_blobs()
    for name, datas in written.items():
        lost = [d for d in datas if b" note " in d and d not in everything]
        assert not lost, f"{name}: {len(lost)} notes lost, e.g. {lost[:3]}"
    return {"generations": len(heads) - 1, "conflicts": len(conflicts),
            "edits": sum(len(d) for d in written.values()),
            "raced": sum(len(pod.log.events("generation.raced")) for pod in pods)}


def test_two_pods_saving_on_their_own_timers_keep_the_store_linear_and_lose_nothing(
        watcherd, tmp_path: Path) -> None:
    free_running_pods(watcherd, tmp_path, seconds=6, seed=1)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_two_pods_saving_on_their_own_timers_for_minutes_keep_the_store_linear(
        watcherd, tmp_path: Path) -> None:
    totals = {"generations": 0, "conflicts": 0, "edits": 0, "raced": 0}
    runs = 6
    for seed in range(runs):
        for k, v in free_running_pods(watcherd, tmp_path, seconds=30, seed=seed).items():
            totals[k] += v
    print(f"FIGURES split-brain free-running: runs={runs} {json.dumps(totals)}")


# -- a workspace that is not the stored history ------------------------------------------------------


def store_objects(d: Daemon) -> dict[str, bytes]:
    """Everything under the key except conflicts/: what a refused save must not change."""
    root = d.store / d.key
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*")
            if p.is_file() and not p.name.startswith(".")
            and p.relative_to(root).parts[0] != "conflicts"}


@pytest.mark.parametrize("why", ["restore_skipped", "restore_skipped_shallow", "manifest_unreadable"])
def test_a_workspace_that_came_from_the_template_never_replaces_the_stored_history(
        watcherd, tmp_path: Path, why: str) -> None:
    template = make_workspace(tmp_path / "template")
    origin_ws = tmp_path / "origin-ws"
    git(tmp_path, "clone", "-q", str(template), str(origin_ws))
    origin = saved_origin(watcherd, tmp_path, workspace=origin_ws)
    key_dir = origin.store / origin.key
    if why == "manifest_unreadable":
        (key_dir / "manifest.json").write_bytes(b'{"format": 1, "generation": ')
        # An unreadable manifest is not "nothing stored": the restore fails (the init container
        # is retried) instead of handing the app its template.
        pod_ws = tmp_path / "pod-ws"
        pod_ws.mkdir()
        cfg = write_config(tmp_path / "pod-restore.toml", workspace=pod_ws, store=origin.store,
                           key=origin.key, listen="", state_dir=tmp_path / "pod-restore-state")
        cfg.write_text(cfg.read_text() + f'\n[restore]\non_missing = "template"\n'
                                          f'template_url = "{template}"\n')
        r = run_cli(cfg, "restore")
        assert r.returncode == 1 and "manifest" in r.stderr, r.stderr
        assert list(pod_ws.iterdir()) == []
        shutil.rmtree(pod_ws)
    before = store_objects(origin)

    pod_ws = tmp_path / "pod-ws"
    pod = watcherd(name="pod", workspace=pod_ws, store=origin.store, key=origin.key)
    # The app came up from its template without the restore hook (or before it ran).
    depth = ["--depth", "1"] if why.endswith("shallow") else []
    git(tmp_path, "clone", "-q", *depth, f"file://{template}", str(pod_ws))
    assert (pod_ws / "src" / "app.py").read_text() == "print('hello')\n"  # the template's

    pod.start()
    # Its first save (the start-up snapshot of the template) is refused...
    first = pod.log.wait("generation.conflict", timeout=20)
    (pod_ws / "src" / "app.py").write_text("print('work done on the template')\n")
    (pod_ws / "src" / "new.py").write_text("print('new on the template')\n")
    # ... and so is every later one, kept whole under conflicts/ (the newer copy replaces the
    # older, whose history it holds), and reported refused, never saved.
    code, result = pod.post("/snapshot")
    assert (code, result["status"]) == (409, "conflict"), result
    assert result["saved_as"] != first["conflict"]
    status = pod.status()
    assert status["conflict"]["saved_as"] == result["saved_as"] and status["refused"]
    assert status["last_upload"] is None  # the stored generation is not this workspace's
    assert status["counters"]["conflicts"] == 2 and status["counters"]["uploads"] == 0
    assert pod.stop() == 3
    assert store_objects(origin) == before, "a refused save changed the stored history"
    audit = Audit(tmp_path / "audit")
    kept = audit.fetch(origin.store / result["saved_as"])
    assert audit.files(kept) == worktree_files(pod_ws)
    assert len(conflict_bundles(origin)) == 1
    if why.startswith("restore_skipped"):
        # The store still restores the good history, not the template's.
        again = tmp_path / "again"
        again.mkdir()
        origin.restore_into(again)
        assert tree_state(again) == tree_state(origin_ws)


def test_a_pod_that_found_every_generation_corrupt_moves_the_store_on_from_its_template(
        watcherd, tmp_path: Path) -> None:
    # Every stored generation corrupt: the restore falls to restore.on_missing (the template)
    # and records what it found bad; the pod's saves then supersede the corrupt generations,
    # which stay listed (nothing deleted but by keep), instead of being refused for ever.
    template = make_workspace(tmp_path / "template")
    origin_ws = tmp_path / "origin-ws"
    git(tmp_path, "clone", "-q", str(template), str(origin_ws))
    origin = saved_origin(watcherd, tmp_path, workspace=origin_ws)
    key_dir = origin.store / origin.key
    for bundle in (key_dir / "bundles").glob("*.bundle"):
        data = bytearray(bundle.read_bytes())
        data[len(data) // 2] ^= 0xFF
        bundle.write_bytes(bytes(data))
    stored_before = json.loads((key_dir / "manifest.json").read_bytes())["generation"]
    pod_ws = tmp_path / "pod-ws"
    pod_ws.mkdir()
    pod = watcherd(name="pod", workspace=pod_ws, store=origin.store, key=origin.key)
    cfg = write_config(tmp_path / "pod-restore.toml", workspace=pod_ws, store=origin.store,
                       key=origin.key, listen="", state_dir=pod.state_dir)
    cfg.write_text(cfg.read_text() + f'\n[restore]\non_missing = "template"\n'
                                      f'template_url = "{template}"\n')
    r = run_cli(cfg, "restore")
    assert r.returncode == 0, r.stderr

    pod.start()
    (pod_ws / "src" / "app.py").write_text("print('work done on the template')\n")
    saved = pod.log.wait("generation.saved", timeout=20)
    assert saved["generation"] == stored_before + 1
    manifest = json.loads((key_dir / "manifest.json").read_bytes())
    assert [s["generation"] for s in manifest["supersedes"]] == \
        list(range(stored_before, 0, -1))[: len(manifest["supersedes"])]
    assert not conflict_bundles(origin)
    assert pod.stop() == 0
