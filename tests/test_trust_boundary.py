"""The trust boundary: what an agent that writes every byte of the workspace, ``.git`` included, can
make watcherd do (DESIGN, "Trust boundary"). Each test plants what the agent would and asserts the
right outcome: no program of the workspace's runs, no secret leaves the process, nothing outside
the workspace and the state directory is read or written, and the user's work is still saved.

Library-level here (real git, real repositories); the same attacks against the real daemon with a
secret in its environment are in ``test_trust_boundary_daemon.py``.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from helpers import git, make_repo, punch_hole, sgit, state_repo, tree_state
from watcherd import snapshot, state
from watcherd import workspace as ws_reader
from watcherd.errors import GitError
from watcherd.config import Config, StoreConfig, WorkspaceConfig, parse_store_url
from watcherd.generations import Generations
from watcherd.restore import Request, restore
from watcherd.store.local import LocalStore

KEY = "acme/sandbox-9/main"


def take(ws: Path, mode: str = "shadow", cache: snapshot.Cache | None = None) -> snapshot.Snapshot:
    repo = state_repo(ws, KEY)
    snapshot.prepare(repo)
    return snapshot.take(repo, mode, cache)


def save(ws: Path, store_dir: Path):
    take(ws)
    return Generations(LocalStore(store_dir), KEY).save(state_repo(ws, KEY))


def config_for(ws: Path, store_dir: Path) -> Config:
    return Config(workspace=WorkspaceConfig(path=ws, state_dir=ws.parent / f"{ws.name}-state"),
                  store=StoreConfig(url=parse_store_url(f"file://{store_dir}"), key=KEY))


def files_of(ws: Path, commit: str) -> set[str]:
    return set(sgit(ws, "ls-tree", "-r", "--name-only", commit, key=KEY).splitlines())


def edit_and_take_within(ws: Path, cache: snapshot.Cache, seconds: float) -> snapshot.Snapshot:
    """Edit ``edit.txt``, take a snapshot and assert it took less than ``seconds`` and holds the
    edit: what an agent's trap must not stop."""
    import time

    (ws / "edit.txt").write_text("saved\n")
    started = time.monotonic()
    snap = take(ws, cache=cache)
    assert time.monotonic() - started < seconds
    assert "edit.txt" in files_of(ws, snap.commit)
    return snap


def recorded(ws: Path, commit: str) -> state.Recorded:
    bare = state_repo(ws, KEY).bare
    s_commit = state.state_parent(bare, commit)
    assert s_commit is not None
    return state.read(bare, s_commit)


def held_pack_files(root: Path) -> list[str]:
    """The pack files under ``root`` (in any ``objects/pack/``) this process holds open."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            found.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            continue
    return [p for p in found if p.startswith(f"{os.path.realpath(root)}/") and
            "/objects/pack/" in p]


def plant_empty_packs(pack_dir: Path, count: int) -> None:
    """``count`` valid packs of no object, with their indexes, in repository directory
    ``pack_dir``: the one ``git pack-objects`` writes from no object, copied under other names."""
    pack_dir.mkdir(exist_ok=True)
    name = git(pack_dir, "pack-objects", "-q", str(pack_dir / "pack"), input=b"")
    for suffix in (".pack", ".idx"):
        made = pack_dir / f"pack-{name}{suffix}"
        for i in range(count):
            shutil.copyfile(made, pack_dir / f"pack-{'e' * 30}{i:010x}{suffix}")
        made.unlink()


def planted_program(tmp_path: Path, name: str = "ran") -> tuple[Path, str]:
    """A marker file and a shell command that creates it (and dumps its environment into it)."""
    marker = tmp_path / name
    return marker, f"env > {marker}; cat"


# -- the workspace's config never reaches git --------------------------------------------------------


def test_a_clean_filter_behind_a_gitdir_file_never_runs(tmp_path):
    ws = tmp_path / "ws"
    make_repo(ws)
    os.rename(ws / ".git", ws / ".realgit")
    (ws / ".git").write_text("gitdir: .realgit\n")
    marker, command = planted_program(tmp_path)
    git(ws, "config", "filter.evil.clean", command)
    git(ws, "config", "filter.evil.required", "true")
    (ws / ".gitattributes").write_text("* filter=evil\n")
    (ws / "notes.txt").write_text("plain bytes\n")

    snap = take(ws)

    assert not marker.exists()
    assert sgit(ws, "show", f"{snap.commit}:notes.txt", key=KEY) == "plain bytes"
    assert snap.head == git(ws, "rev-parse", "HEAD")  # the git state behind the link is read
    # The git directory living in the work tree under another name is never snapshotted.
    assert not any(p.startswith(".realgit") for p in files_of(ws, snap.commit))


@pytest.mark.parametrize("how", ["include.path", "worktreeConfig", "same-size-rewrite"])
def test_a_filter_added_later_by_any_route_never_runs(tmp_path, how):
    ws = make_repo(tmp_path / "ws")
    take(ws)
    marker, command = planted_program(tmp_path)
    config = ws / ".git" / "config"
    if how == "include.path":
        (ws / ".git" / "extra.cfg").write_text(f"[filter \"evil\"]\n\tclean = {command}\n")
        git(ws, "config", "include.path", "extra.cfg")
    elif how == "worktreeConfig":
        git(ws, "config", "extensions.worktreeConfig", "true")
        (ws / ".git" / "config.worktree").write_text(f"[filter \"evil\"]\n\tclean = {command}\n")
    else:
        st = config.stat()
        text = config.read_text()
        extra = f"[filter \"evil\"]\n\tclean = {command}\n"
        config.write_text(text[: len(text) - len(extra)] + extra if len(text) > len(extra)
                          else text + extra)
        os.utime(config, ns=(st.st_atime_ns, st.st_mtime_ns))
    (ws / ".gitattributes").write_text("* filter=evil\n")
    (ws / "readme.md").write_text("edited after the filter appeared\n")

    snap = take(ws)

    assert snap.commit and not marker.exists()
    assert sgit(ws, "show", f"{snap.commit}:readme.md", key=KEY) == "edited after the filter appeared"


def test_a_promisor_remote_with_an_upload_pack_command_never_runs(tmp_path):
    ws = make_repo(tmp_path / "ws")
    marker, command = planted_program(tmp_path)
    (ws / "staged.txt").write_text("staged, then its object deleted\n")
    git(ws, "add", "staged.txt")
    blob = git(ws, "rev-parse", ":staged.txt")
    (ws / ".git" / "objects" / blob[:2] / blob[2:]).unlink()
    (ws / "staged.txt").write_text("the working version differs from the lost staged one\n")
    git(ws, "config", "extensions.partialClone", "origin")
    git(ws, "config", "remote.origin.url", str(tmp_path / "nowhere.git"))
    git(ws, "config", "remote.origin.promisor", "true")
    git(ws, "config", "remote.origin.uploadpack", command)
    git(ws, "config", "core.repositoryformatversion", "1")

    with capture_logs() as logs:
        snap = take(ws)

    assert not marker.exists()
    assert snap.commit and "staged.txt" in files_of(ws, snap.commit)  # the file itself is saved
    assert any("index not recorded" in p for p in snap.problems)
    assert any(e["event"] == "snapshot.state_not_recorded" for e in logs)


def test_a_shallow_workspace_with_a_hostile_origin_is_never_fetched_from(tmp_path):
    src = make_repo(tmp_path / "src")
    for n in range(3):
        (src / "readme.md").write_text(f"v{n}\n")
        git(src, "commit", "-qam", f"v{n}")
    ws = tmp_path / "ws"
    git(tmp_path, "clone", "-q", "--depth", "1", f"file://{src}", str(ws))
    marker, command = planted_program(tmp_path)
    git(ws, "config", "remote.origin.uploadpack", command)
    git(ws, "config", "fetch.recurseSubmodules", "true")
    (ws / "readme.md").write_text("edited in the shallow clone\n")
    store_dir = tmp_path / "store"

    result = save(ws, store_dir)  # no restore.template_url: nothing to fetch from

    assert result.status == "saved" and not marker.exists()
    target = tmp_path / "restored"
    assert restore(config_for(target, store_dir), Generations(LocalStore(store_dir), KEY)).action \
        == "restored"
    assert (target / "readme.md").read_text() == "edited in the shallow clone\n"


# -- data read as data -------------------------------------------------------------------------------


def test_a_symlinked_shallow_file_is_refused_and_its_target_never_read(tmp_path):
    ws = make_repo(tmp_path / "ws")
    secret = tmp_path / "sidecar-only.txt"
    secret.write_text("TOPSECRET-first-line\n")
    os.symlink(secret, ws / ".git" / "shallow")

    with capture_logs() as logs:
        snap = take(ws)

    assert snap.commit
    assert "TOPSECRET" not in repr(logs) and "TOPSECRET" not in repr(snap)
    assert not (state_repo(ws, KEY).git_dir / "shallow").exists()
    assert any("shallow" in p for p in snap.problems)


def test_a_ref_to_a_missing_object_is_skipped_and_saves_keep_working(tmp_path):
    ws = make_repo(tmp_path / "ws")
    git(ws, "branch", "good")
    (ws / ".git" / "refs" / "heads" / "broken").write_text("1234567890abcdef1234567890abcdef12345678\n")
    store_dir = tmp_path / "store"

    with capture_logs() as logs:
        first = save(ws, store_dir)
    (ws / "readme.md").write_text("edited\n")
    second = save(ws, store_dir)

    assert (first.status, second.status) == ("saved", "saved")
    rec = recorded(ws, second.snapshot)
    assert {r.name for r in rec.refs} == {"refs/heads/main", "refs/heads/good"}
    assert any("refs/heads/broken" in n and "does not exist" in n for n in rec.notes)
    assert any(e["event"] == "snapshot.state_not_recorded" and "broken" in e["reason"] for e in logs)


def test_a_ref_whose_history_is_incomplete_is_skipped(tmp_path):
    ws = make_repo(tmp_path / "ws")
    git(ws, "checkout", "-q", "-b", "side")
    (ws / "side.txt").write_text("side\n")
    git(ws, "add", "side.txt")
    git(ws, "commit", "-qm", "side")
    tree = git(ws, "rev-parse", "HEAD^{tree}")
    git(ws, "checkout", "-q", "main")
    (ws / ".git" / "objects" / tree[:2] / tree[2:]).unlink()  # the side commit's tree is gone

    snap = take(ws)

    rec = recorded(ws, snap.commit)
    assert [r.name for r in rec.refs] == ["refs/heads/main"]
    assert any("incomplete" in n for n in rec.notes)


def test_a_fifo_posing_as_an_object_does_not_block_the_snapshot(tmp_path):
    ws = make_repo(tmp_path / "ws")
    (ws / "readme.md").write_text("edit to save\n")
    git(ws, "commit", "-qam", "second")
    head = git(ws, "rev-parse", "HEAD")
    obj = ws / ".git" / "objects" / head[:2] / head[2:]
    obj.unlink()
    os.mkfifo(obj)
    (ws / "new.txt").write_text("still saved\n")

    snap = take(ws)  # pytest-timeout would end a test that blocks for ever

    assert snap.commit and "new.txt" in files_of(ws, snap.commit)
    assert recorded(ws, snap.commit).head.oid is None  # HEAD's commit could not be read


def test_a_fifo_planted_among_the_objects_after_a_snapshot_does_not_block_the_next(tmp_path):
    # A daemon's snapshots bring the links to the workspace's objects up to date from a listing
    # of objects/ and the fan-out directories' times: one that changed since the last snapshot
    # is looked into again, entry by entry, in an old fan-out directory as in a new one.
    ws = make_repo(tmp_path / "ws")
    repo = state_repo(ws, KEY)  # one for the daemon's life, as the daemon keeps it
    snapshot.prepare(repo)
    snapshot.take(repo)
    objects = ws / ".git" / "objects"
    linked = {d.name for d in objects.iterdir() if len(d.name) == 2}
    commits = [git(ws, "commit", "-q", "--allow-empty", "-m", "1") or git(ws, "rev-parse", "HEAD")]
    while commits[-1][:2] not in linked:  # until HEAD's commit is in a directory linked before
        git(ws, "commit", "-q", "--allow-empty", "-m", str(len(commits) + 1))
        commits.append(git(ws, "rev-parse", "HEAD"))
    assert any(c[:2] not in linked for c in commits[:-1]) or len(commits) == 1
    for commit in commits:  # old and new fan-out directories
        obj = objects / commit[:2] / commit[2:]
        obj.unlink()
        os.mkfifo(obj)
    (ws / "new.txt").write_text("still saved\n")

    snap = snapshot.take(repo)  # pytest-timeout would end a test that blocks for ever

    assert snap.commit and "new.txt" in files_of(ws, snap.commit)
    assert recorded(ws, snap.commit).head.oid is None  # HEAD's commit could not be read


def restore_into(tmp_path: Path, store_dir: Path):
    """Restore the newest good generation into a new pod's workspace: (its path, the outcome)."""
    target = tmp_path / "restored"
    config = Config(workspace=WorkspaceConfig(path=target, state_dir=tmp_path / "pod-2"),
                    store=StoreConfig(url=parse_store_url(f"file://{store_dir}"), key=KEY))
    return target, restore(config, Generations(LocalStore(store_dir), KEY))


def assert_whole(ws: Path) -> None:
    """watcherd's repository for ``ws`` passes git fsck: no object missing or corrupt."""
    own = state_repo(ws, KEY).git_dir
    assert subprocess.run(["git", f"--git-dir={own}", "fsck", "--no-dangling"],
                          capture_output=True).returncode == 0


def assert_never_read(ws: Path, commit: str, blob: str) -> None:
    """Neither ``commit`` nor ``blob`` (another repository's) is in watcherd's history, and
    the blob is nowhere in its repository."""
    own = state_repo(ws, KEY).git_dir
    history = git(ws.parent, f"--git-dir={own}", "rev-list", "--objects", "--all")
    assert commit not in history and blob not in history
    assert subprocess.run(["git", f"--git-dir={own}", "cat-file", "blob", blob],
                          capture_output=True).returncode != 0


@pytest.mark.parametrize("swapped", ["an object", "a fan-out directory"])
def test_objects_swapped_for_links_after_the_check_are_never_followed(tmp_path, monkeypatch,
                                                                      swapped):
    """The agent knows a commit of another repository watcherd's uid may read, points a branch
    at it, and right after watcherd looked at the objects (the race an agent wins by looping)
    turns that object, or its whole fan-out directory, into a link to the other repository's.
    Nothing of the other repository enters the history: no commit, tree or blob."""
    from watcherd.repo import Repo

    other = make_repo(tmp_path / "other", "another sandbox's secret history\n")
    stolen = git(other, "rev-parse", "HEAD")
    secret = git(other, "rev-parse", "HEAD:readme.md")
    theirs = [line.split()[0]  # its commit, tree and blob
              for line in git(other, "rev-list", "--objects", "--all").splitlines()]
    ws = make_repo(tmp_path / "ws")
    objects = ws / ".git" / "objects"
    for oid in theirs:  # regular files when watcherd looks
        (objects / oid[:2]).mkdir(exist_ok=True)
        (objects / oid[:2] / oid[2:]).write_bytes(b"a decoy")
    (ws / ".git" / "refs" / "heads" / "stolen").write_text(stolen + "\n")
    attach = Repo.attach

    def then_swapped(self, layout, shallow=()):
        said = attach(self, layout, shallow)
        for oid in theirs:
            if swapped == "an object":
                (objects / oid[:2] / oid[2:]).unlink(missing_ok=True)
                os.symlink(other / ".git" / "objects" / oid[:2] / oid[2:],
                           objects / oid[:2] / oid[2:])
            elif not (objects / oid[:2]).is_symlink():
                shutil.rmtree(objects / oid[:2])
                os.symlink(other / ".git" / "objects" / oid[:2], objects / oid[:2])
        return said

    monkeypatch.setattr(Repo, "attach", then_swapped)
    snap = take(ws)
    assert snap.commit and "readme.md" in files_of(ws, snap.commit)
    assert_never_read(ws, stolen, secret)


def test_a_pack_directory_swapped_for_a_link_after_the_check_is_never_followed(
        tmp_path, monkeypatch):
    """The agent names its own pack files after another repository's packs (regular files,
    when watcherd looks), points a branch at that repository's commit, and then swaps its
    whole ``objects/pack`` for a link to the other repository's. watcherd's git children read
    the files watcherd opened (through ``/proc/self/fd``), never what the path holds later:
    nothing of the other repository enters the history."""
    from watcherd.repo import Repo

    other = make_repo(tmp_path / "other", "another sandbox's secret history\n")
    git(other, "repack", "-a", "-d", "-q")
    stolen = git(other, "rev-parse", "HEAD")
    secret = git(other, "rev-parse", "HEAD:readme.md")
    ws = make_repo(tmp_path / "ws")
    pack_dir = ws / ".git" / "objects" / "pack"
    pack_dir.mkdir(exist_ok=True)
    for name in os.listdir(other / ".git" / "objects" / "pack"):
        (pack_dir / name).write_bytes(b"a decoy")
    (ws / ".git" / "refs" / "heads" / "stolen").write_text(stolen + "\n")
    attach = Repo.attach

    def then_swapped(self, layout, shallow=()):
        said = attach(self, layout, shallow)
        shutil.rmtree(pack_dir)
        os.symlink(other / ".git" / "objects" / "pack", pack_dir)
        return said

    monkeypatch.setattr(Repo, "attach", then_swapped)
    snap = take(ws)
    assert snap.commit and "readme.md" in files_of(ws, snap.commit)
    assert_never_read(ws, stolen, secret)


def plant(ws: Path, kind: bytes, wanted: bytes, instead: bytes) -> str:
    """A loose object in the workspace named for ``kind`` object ``wanted`` but holding
    ``instead`` (a valid object of the same size: only the name lies); its id."""
    import hashlib
    import zlib

    oid = hashlib.sha1(b"%s %d\0" % (kind, len(wanted)) + wanted).hexdigest()
    fanout = ws / ".git" / "objects" / oid[:2]
    fanout.mkdir(exist_ok=True)
    (fanout / oid[2:]).write_bytes(zlib.compress(b"%s %d\0" % (kind, len(instead)) + instead))
    return oid


def test_a_blob_planted_under_the_id_of_a_files_content_never_enters_the_history(tmp_path):
    """The agent plants a loose object under the id of content C with other bytes, then writes
    a file holding C: the snapshot writes C itself (git never finds it "already there" among
    the workspace's objects), so every generation stays whole after the agent removes the
    plant, and a restore gives back C."""
    ws = make_repo(tmp_path / "ws")
    store_dir = tmp_path / "store"
    wanted = b"the user's important edit\n"
    oid = plant(ws, b"blob", wanted, b"agent garbage!!!!!!!!!!!!!\n"[:len(wanted)])
    (ws / "notes.txt").write_bytes(wanted)
    save(ws, store_dir)
    (ws / ".git" / "objects" / oid[:2] / oid[2:]).unlink()
    (ws / "later.txt").write_text("a later edit\n")
    save(ws, store_dir)
    assert_whole(ws)
    target, outcome = restore_into(tmp_path, store_dir)
    assert outcome.generation == 2
    assert (target / "notes.txt").read_bytes() == wanted
    assert (target / "later.txt").read_text() == "a later edit\n"


def forge_pack(ws: Path, oid: str, claimed: str) -> None:
    """Pack object ``oid`` of ``ws``, then make the pack's index call it ``claimed`` (its one
    name, and the fan-out table that finds it: gitformat-pack(5), "pack-*.idx files have the
    following format", version 2); the loose object goes."""
    pack = ws / ".git" / "objects" / "pack" / "pack"
    name = git(ws, "pack-objects", "-q", str(pack), input=f"{oid}\n".encode())
    git(ws, "prune-packed")
    idx = Path(f"{pack}-{name}.idx")
    raw = bytearray(idx.read_bytes())
    first = int(claimed[:2], 16)
    for b in range(256):
        raw[8 + 4 * b:12 + 4 * b] = (1 if b >= first else 0).to_bytes(4, "big")
    raw[8 + 1024:8 + 1024 + 20] = bytes.fromhex(claimed)
    idx.chmod(0o644)
    idx.write_bytes(bytes(raw))


@pytest.mark.parametrize("held", ["loose", "packed"])
def test_a_commit_planted_under_another_id_leaves_its_ref_out_not_the_history_broken(
        tmp_path, held):
    """A branch points at an id whose object in the workspace holds other bytes (a loose
    object, or a pack whose index lies): the branch is left out with a note, the rest is saved,
    watcherd's repository stays whole and nothing of the planted object is in it."""
    ws = make_repo(tmp_path / "ws")
    head = git(ws, "rev-parse", "HEAD")
    tree = git(ws, "rev-parse", "HEAD^{tree}")
    who = "a <a@b> 1 +0000"
    claimed = f"tree {tree}\nparent {head}\nauthor {who}\ncommitter {who}\n\nclaimed\n"
    told = f"tree {tree}\nparent {head}\nauthor {who}\ncommitter {who}\n\nactual\n"
    if held == "loose":
        oid = plant(ws, b"commit", claimed.encode(), told.encode())
    else:
        oid = git(ws, "hash-object", "-t", "commit", "--stdin", input=claimed.encode())
        actual = git(ws, "hash-object", "-t", "commit", "-w", "--stdin", input=told.encode())
        forge_pack(ws, actual, oid)
    (ws / ".git" / "refs" / "heads" / "planted").write_text(oid + "\n")
    snap = take(ws)
    rec = recorded(ws, snap.commit)
    assert [r.name for r in rec.refs] == ["refs/heads/main"]
    assert any("refs/heads/planted" in n or oid in n for n in rec.notes), rec.notes
    assert_whole(ws)
    own = state_repo(ws, KEY).git_dir
    assert oid not in git(tmp_path, f"--git-dir={own}", "rev-list", "--objects", "--all")
    assert Generations(LocalStore(tmp_path / "store"), KEY).save(state_repo(ws, KEY)).status \
        == "saved"


def test_tag_bytes_from_a_pack_whose_index_lies_are_not_recorded(tmp_path):
    """An annotated tag's id, served by a pack whose index names other bytes: neither the tag
    ref nor those bytes are recorded (a restore would write them under the claimed id)."""
    ws = make_repo(tmp_path / "ws")
    head = git(ws, "rev-parse", "HEAD")
    body = f"object {head}\ntype commit\ntag v9\ntagger a <a@b> 1 +0000\n\n"
    claimed = git(ws, "hash-object", "-t", "tag", "--stdin", input=(body + "claimed\n").encode())
    actual = git(ws, "hash-object", "-t", "tag", "-w", "--stdin",
                 input=(body + "actual\n").encode())
    forge_pack(ws, actual, claimed)
    (ws / ".git" / "refs" / "tags" / "v9").write_text(claimed + "\n")
    snap = take(ws)
    rec = recorded(ws, snap.commit)
    assert "refs/tags/v9" not in {r.name for r in rec.refs}
    assert claimed not in {t for t, _ in rec.tags}


def test_loose_objects_that_are_not_what_their_names_say_cost_the_state_directory_nothing(
        tmp_path):
    """A 2 GiB sparse file, three hard links to it under other object names, a zlib bomb
    claiming 100 GB, and a 5-byte object padded to 20 MB under 20 names, all posing as loose
    objects: watcherd copies none of them (each is not the object its name says, or is far
    bigger than what it holds), its state directory grows by kilobytes, and the snapshot is
    taken."""
    import zlib

    ws = make_repo(tmp_path / "ws")
    fanout = ws / ".git" / "objects" / "ab"
    fanout.mkdir(exist_ok=True)
    with open(fanout / ("0" * 38), "wb") as f:
        f.truncate(2 << 30)
    for i in range(1, 4):
        os.link(fanout / ("0" * 38), fanout / (str(i) * 38))
    (fanout / ("9" * 38)).write_bytes(zlib.compress(b"blob 100000000000\0" + b"\0" * (8 << 20)))
    # A valid stream of 5 bytes, padded with 20 MB of empty stored blocks, under 20 names.
    content = b"blob 5\0hello"
    with open(tmp_path / "padded", "wb") as f:
        f.write(b"\x78\x01\x00" + len(content).to_bytes(2, "little") +
                (0xffff ^ len(content)).to_bytes(2, "little") + content)
        f.write(b"\x00\x00\x00\xff\xff" * 4_000_000)
        f.write(b"\x01\x00\x00\xff\xff" + zlib.adler32(content).to_bytes(4, "big"))
    for i in range(20):
        os.link(tmp_path / "padded", fanout / f"{i + 100:038x}")
    (ws / "edit.txt").write_text("an edit\n")
    with capture_logs() as logs:
        snap = take(ws)
    assert snap.commit and "edit.txt" in files_of(ws, snap.commit)
    state_dir = state_repo(ws, KEY).dir
    used = sum(p.stat().st_blocks * 512 for p in state_dir.rglob("*") if p.is_file())
    assert used < 50 << 20
    skipped = [e for e in logs if e["event"] == "state.objects_skipped"]
    assert skipped and skipped[0]["count"] == 25


@pytest.mark.parametrize("look", ["kernel", "walk"])
@pytest.mark.parametrize("fifo", ["HEAD", "refs/heads/main", "commondir"])
def test_a_nested_repository_holding_a_fifo_costs_seconds_once_not_the_timeout(
        tmp_path, monkeypatch, fifo, look):
    """git opens a nested repository's HEAD (and its branch's ref, its commondir) to tell it is
    one; a FIFO there blocks it for good. The snapshot finds why after a second, not after the
    door's whole timeout (a SIGTERM's final save must not wait a minute), leaves the repository
    out (named in the log) and saves the rest; the next ones do not wait again. Found by the
    kernel naming what git is blocked on, or where it cannot tell (another architecture, ptrace
    refused) by a walk of the work tree."""
    import time

    from watcherd import procfs
    from watcherd.git import DEFAULT_TIMEOUT

    if look == "walk":
        monkeypatch.setattr(procfs, "blocked_on", lambda pid: None)
    ws = make_repo(tmp_path / "ws")
    nested = ws / "vendor" / "lib" / ".git"
    for d in ("objects", "refs/heads"):
        (nested / d).mkdir(parents=True)
    if fifo != "HEAD":
        (nested / "HEAD").write_text("ref: refs/heads/main\n")
    os.mkfifo(nested / fifo)
    (ws / "edit.txt").write_text("one\n")
    cache = snapshot.Cache()
    started = time.monotonic()
    with capture_logs() as logs:
        snap = take(ws, cache=cache)
    assert time.monotonic() - started < DEFAULT_TIMEOUT / 6
    assert snap.commit and "edit.txt" in files_of(ws, snap.commit)
    refused = [e for e in logs if e["event"] == "snapshot.nested_refused"]
    assert refused and refused[0]["paths"] == ["vendor/lib"]
    (ws / "edit.txt").write_text("two\n")
    started = time.monotonic()
    snap = take(ws, cache=cache)
    assert time.monotonic() - started < 3
    assert sgit(ws, "show", f"{snap.commit}:edit.txt", key=KEY) == "two"


@pytest.mark.parametrize("past", ["depth", "entries", "time"])
def test_a_fifo_repository_past_the_walks_bounds_costs_seconds_not_the_timeout(
        tmp_path, monkeypatch, past):
    """The walk that looks for what blocks git stops somewhere (256 directories deep, 500,000
    entries, 5 seconds); git does not. The kernel names the file git is blocked opening
    wherever it is: a nested repository with a FIFO HEAD 300 directories deep, or behind more
    entries than the walk lists or than it has time for, is left out within seconds, named,
    and the rest saved."""
    from watcherd.git import DEFAULT_TIMEOUT

    ws = make_repo(tmp_path / "ws")
    if past == "depth":
        where = "/".join(["d"] * 300) + "/lib"
    elif past == "entries":
        monkeypatch.setattr(snapshot, "_WALK_BUDGET", 50)
        for i in range(100):
            (ws / "big").mkdir(exist_ok=True)
            (ws / "big" / f"f{i}.txt").write_text(f"{i}\n")
        where = "big/lib"
    else:
        monkeypatch.setattr(snapshot, "_WALK_FOR", 0.0)
        where = "lib"
    nested = ws / where / ".git"
    for d in ("objects", "refs/heads"):
        (nested / d).mkdir(parents=True)
    os.mkfifo(nested / "HEAD")
    assert where not in snapshot._unreadable_repositories(ws, blocking=True,
                                                          for_s=snapshot._WALK_FOR)[0]
    cache = snapshot.Cache()

    edit_and_take_within(ws, cache, DEFAULT_TIMEOUT / 6)

    assert list(cache.refused) == [where]
    assert "HEAD is no regular file" in cache.refused[where]


def test_fifo_repositories_made_faster_than_git_gets_past_them_still_save_every_edit(tmp_path):
    """An agent that makes a nested repository with a FIFO HEAD every few milliseconds has git
    blocked on a new one at every round, however many were left out before it. After its rounds
    the snapshot saves what the index already holds (``git add --update`` walks no directory,
    so it opens no new repository): every edit of a file already saved is saved, at each
    snapshot, and new files wait (said)."""
    import threading
    import time

    ws = make_repo(tmp_path / "ws")
    (ws / "edit.txt").write_text("first\n")
    cache = snapshot.Cache()
    take(ws, cache=cache)
    stop = threading.Event()

    def agent() -> None:
        for i in range(100_000):
            if stop.is_set():
                return
            nested = ws / f"r{i}" / ".git"
            (nested / "objects").mkdir(parents=True)
            os.mkfifo(nested / "HEAD")
            time.sleep(0.002)

    making = threading.Thread(target=agent, daemon=True)
    making.start()
    try:
        while not (ws / "r20").exists():  # the agent is under way
            time.sleep(0.01)
        for n in range(2):
            (ws / "edit.txt").write_text(f"edit {n}\n")
            take(ws, cache=cache)
            head = state_repo(ws, KEY).snapshot_head()
            assert sgit(ws, "show", f"{head}:edit.txt", key=KEY) == f"edit {n}"
    finally:
        stop.set()
        making.join()


def test_pack_files_the_workspace_drops_are_let_go(tmp_path):
    """watcherd holds the workspace's pack files open for its git children; a user's repack
    replaces them again and again: the ones gone are closed (no descriptor of a deleted pack
    stays open), the ones there are held, and every commit is still saved."""
    ws = make_repo(tmp_path / "ws")
    repo = state_repo(ws, KEY)
    snapshot.prepare(repo)
    cache = snapshot.Cache()
    for i in range(6):
        (ws / f"f{i}.txt").write_text(f"{i}\n")
        git(ws, "add", "-A")
        git(ws, "commit", "-qm", f"commit {i}")
        git(ws, "repack", "-adq")
        snap = snapshot.take(repo, "shadow", cache)
        assert recorded(ws, snap.commit).head.oid == git(ws, "rev-parse", "HEAD")
    pack_files = sorted(str(p) for p in (ws / ".git" / "objects" / "pack").iterdir())
    assert not [p for p in held_pack_files(ws) if p.endswith("(deleted)")]
    assert sorted(held_pack_files(ws)) == pack_files


def test_a_damaged_object_in_the_users_history_never_stops_the_saves(tmp_path):
    """One object of the user's history (a blob only an older commit holds) gets bytes after
    its stream, which git refuses: the branch that needs it is left out, and every save goes
    on, each generation restoring with the edit it was saved with."""
    ws = make_repo(tmp_path / "ws")
    store_dir = tmp_path / "store"
    save(ws, store_dir)
    (ws / "a.txt").write_text("an old version, only in history now\n")
    git(ws, "add", "-A")
    git(ws, "commit", "-qm", "two")
    blob = git(ws, "rev-parse", "HEAD:a.txt")
    (ws / "a.txt").write_text("current version\n")
    git(ws, "commit", "-qam", "three")
    obj = ws / ".git" / "objects" / blob[:2] / blob[2:]
    obj.chmod(0o644)
    with open(obj, "ab") as f:
        f.write(b"trailing")
    for i in range(1, 4):
        (ws / "edit.txt").write_text(f"user's edit {i}\n")
        assert save(ws, store_dir).status == "saved"
    assert_whole(ws)
    target, _ = restore_into(tmp_path, store_dir)
    assert (target / "edit.txt").read_text() == "user's edit 3\n"
    assert (target / "a.txt").read_text() == "current version\n"


@pytest.mark.parametrize("planted, link", [
    (".git/hooks/post-checkout", False), (".GIT/config", False),
    (".git::$INDEX_ALLOCATION/x", False), (".git\\hooks\\x", False), ("git~1/config", False),
    (".gitmodules", True), ("sub/.GITMODULES", True)])
def test_an_index_holding_a_path_git_refuses_never_makes_a_generation_unrestorable(
        tmp_path, planted, link):
    """The agent rewrites the index so that an entry's path is one git refuses to check out
    (``.git`` as any file system spells it, a ``.gitmodules`` that is a link): git writes such a
    tree, but a restore's read-tree refuses it. The index is recorded empty (with a note), so
    the generation restores, with the edit it was saved with."""
    import hashlib

    ws = make_repo(tmp_path / "ws")
    store_dir = tmp_path / "store"
    save(ws, store_dir)
    # A path git takes, as long as the planted one, rewritten in place in the index.
    real = planted.replace(".git", "agit").replace(".GIT", "aGIT").replace("git~", "gitx")
    assert len(real) == len(planted) and real != planted
    (ws / real).parent.mkdir(parents=True, exist_ok=True)
    if link:
        os.symlink("a.txt", ws / real)
    else:
        (ws / real).write_text("#!/bin/sh\n")
    git(ws, "add", "--", real)
    raw = (ws / ".git" / "index").read_bytes()[:-20].replace(real.encode(), planted.encode())
    (ws / ".git" / "index").write_bytes(raw + hashlib.sha1(raw).digest())
    (ws / "edit.txt").write_text("precious, v2\n")
    snap = take(ws)
    assert any("refuses to check out" in n for n in recorded(ws, snap.commit).notes)
    assert Generations(LocalStore(store_dir), KEY).save(state_repo(ws, KEY)).status == "saved"
    target, outcome = restore_into(tmp_path, store_dir)
    assert outcome.generation == 2
    assert (target / "edit.txt").read_text() == "precious, v2\n"


def test_a_thousand_lone_or_empty_pack_files_hold_no_descriptor(tmp_path):
    """Lone ``.pack`` files are not opened (git cannot use a pack without its index), nor are
    packs of no object, empty files or valid empty packs: they cost no descriptor, and the
    snapshot is taken."""
    ws = make_repo(tmp_path / "ws")
    pack_dir = ws / ".git" / "objects" / "pack"
    plant_empty_packs(pack_dir, 300)
    for i in range(1100):
        (pack_dir / f"pack-{i:040x}.pack").write_bytes(b"")
    for i in range(300):
        (pack_dir / f"pack-{i + 5000:040x}.idx").write_bytes(b"")
        (pack_dir / f"pack-{i + 5000:040x}.pack").write_bytes(b"")
    repo = state_repo(ws, KEY)
    snapshot.prepare(repo)
    assert snapshot.take(repo).commit
    assert held_pack_files(ws) == []


def packed_repo(path: Path, copies: int = 0, empty: int = 0) -> Path:
    """A repository whose history is in one pack (``git gc``), that pack copied ``copies``
    times more under other names, ``empty`` packs of no object beside them, and an edit."""
    make_repo(path, f"{path.name}\n")
    git(path, "gc", "-q")
    pack_dir = path / ".git" / "objects" / "pack"
    for made in list(pack_dir.glob("pack-*")):
        for i in range(copies):
            shutil.copyfile(made, made.with_name(f"pack-{'c' * 30}{i:010x}{made.suffix}"))
    plant_empty_packs(pack_dir, empty)
    (path / "edit.txt").write_text(f"{path.name}, not committed\n")
    return path


# A snapshot in a process of its own, under a limit of open files: the descriptors it ends up
# holding (its Repos are alive: the cache keeps them) go to the file named last.
_SNAPSHOT_UNDER_A_LIMIT = """
import json, os, sys
from watcherd import log, repo, snapshot
log.configure("info", "json", sys.stderr)
state_dir, key, workspace, out = sys.argv[1:]
r = repo.Repo(state_dir, key, workspace)
snapshot.prepare(r)
cache = snapshot.Cache()
snap = snapshot.take(r, cache=cache)
fds = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
       if os.path.exists(f"/proc/self/fd/{fd}")]
with open(out, "w") as f:
    json.dump({"commit": snap.commit, "fds": fds}, f)
"""


def test_many_nested_repositories_full_of_packs_share_one_bound_and_every_file_is_saved(
        tmp_path):
    """20 nested repositories, each with 40 packs of no object and 4 of its history: under a
    limit of 256 open files, watcherd holds a quarter of it at most for pack files, the rest
    are left out with a warning, and every file of the workspace and of each nested repository
    is in the snapshot (their histories as far as their packs held are read)."""
    ws = make_repo(tmp_path / "ws")
    (ws / "edit.txt").write_text("the workspace's edit\n")
    nested = [packed_repo(ws / "vendor" / f"lib{i:02d}", copies=3, empty=40) for i in range(20)]
    out = tmp_path / "held.json"

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    run = subprocess.run([sys.executable, "-c", _SNAPSHOT_UNDER_A_LIMIT,
                          str(tmp_path / "ws-state"), KEY, str(ws), str(out)],
                         capture_output=True, text=True, preexec_fn=limit, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    held = [p for p in result["fds"] if p.startswith(f"{os.path.realpath(ws)}/") and
            "/objects/pack/" in p]
    assert held and len(held) <= 256 // 4
    assert "state.packs_skipped" in run.stderr
    assert files_of(ws, result["commit"]) >= {"readme.md", "edit.txt", *(
        f"vendor/{lib.name}" for lib in nested)}
    saved = state.load(state_repo(ws, KEY).bare, result["commit"]).nested
    assert sorted(saved) == [f"vendor/{lib.name}" for lib in nested]
    for lib in nested:
        assert files_of(ws, saved[f"vendor/{lib.name}"]) == {"readme.md", "edit.txt"}


def test_a_nested_repository_gone_gives_its_pack_descriptors_to_the_others(tmp_path,
                                                                            monkeypatch):
    """Under a bound that fits one nested repository's packs, the first holds them and the
    second's history is not read; once the first is removed, its descriptors are closed and
    counted back, and the next snapshot reads the second's history through them."""
    from watcherd import repo as repo_module

    ws = make_repo(tmp_path / "ws")
    first = packed_repo(ws / "vendor" / "a")
    second = packed_repo(ws / "vendor" / "b")
    per_repo = len(list((first / ".git" / "objects" / "pack").iterdir()))
    gc.collect()  # a Repo an earlier test dropped gives its descriptors back now, not meanwhile
    budget = repo_module.PACK_BUDGET
    before = budget.held
    monkeypatch.setattr(repo_module, "PACK_MAX_FDS", before + per_repo)
    repo = state_repo(ws, KEY)
    snapshot.prepare(repo)
    cache = snapshot.Cache()

    def second_recorded(snap: snapshot.Snapshot) -> bool:
        nested = state.load(repo.bare, snap.commit).nested["vendor/b"]
        s_commit = state.state_parent(repo.bare, nested)
        return s_commit is not None and \
            state.read(repo.bare, s_commit).head.oid == git(second, "rev-parse", "HEAD")

    with capture_logs() as logs:
        snap = snapshot.take(repo, cache=cache)
    assert len(held_pack_files(first)) == per_repo and held_pack_files(second) == []
    assert budget.held == before + per_repo
    assert [e["count"] for e in logs if e["event"] == "state.packs_skipped"] == [1]
    assert not second_recorded(snap)

    shutil.rmtree(first)
    snap = snapshot.take(repo, cache=cache)
    assert held_pack_files(first) == []
    assert len(held_pack_files(second)) == per_repo
    assert budget.held == before + per_repo
    assert second_recorded(snap)
    assert files_of(ws, state.load(repo.bare, snap.commit).nested["vendor/b"]) == \
        {"readme.md", "edit.txt"}


# Every descriptor the process may have taken, then watcherd's state directory created.
_CREATE_OUT_OF_DESCRIPTORS = """
import os, resource, sys
from watcherd.errors import WorkspaceError
from watcherd.repo import Repo
resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
held = []
try:
    while True:
        held.append(os.open(os.devnull, os.O_RDONLY))
except OSError:
    pass
try:
    Repo(sys.argv[1], "key", sys.argv[2]).ensure()
except WorkspaceError as exc:
    print(exc)
"""


def test_out_of_descriptors_is_said_as_such_not_blamed_on_the_state_directory(tmp_path):
    """The process has no descriptor left when it creates its repository (git cannot start):
    the error says so, not that the state directory, writable all along, is at fault."""
    ws = make_repo(tmp_path / "ws")
    state_dir = tmp_path / "state"
    run = subprocess.run([sys.executable, "-c", _CREATE_OUT_OF_DESCRIPTORS, str(state_dir),
                          str(ws)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("out of file descriptors while creating ")
    assert "may open 64 files" in run.stdout and "workspace.state_dir" not in run.stdout
    assert os.access(state_dir, os.W_OK)  # it was writable all along


def test_a_nested_git_file_naming_a_repository_outside_records_nothing_of_it(tmp_path):
    """``sub/.git`` is a ``gitdir:`` file naming another sandbox's repository: git reads that
    repository's HEAD to record ``sub`` as a gitlink. The snapshot drops that gitlink (named in
    the log), so the other repository's commit id is in no snapshot; a submodule whose git
    directory is inside the workspace keeps its gitlink."""
    other = make_repo(tmp_path / "other", "another sandbox\n")
    theirs = git(other, "rev-parse", "HEAD")
    ws = make_repo(tmp_path / "ws")
    (ws / "sub").mkdir()
    (ws / "sub" / ".git").write_text(f"gitdir: {other / '.git'}\n")
    inner = make_repo(tmp_path / "inner-src")
    os.rename(inner, ws / "vendor")  # a nested repository of the workspace's own
    (ws / "edit.txt").write_text("saved\n")
    with capture_logs() as logs:
        snap = take(ws)
    files = files_of(ws, snap.commit)
    assert "edit.txt" in files and "vendor" in files and "sub" not in files
    assert theirs not in sgit(ws, "ls-tree", "-r", snap.commit, key=KEY)
    refused = [e for e in logs if e["event"] == "snapshot.nested_refused"]
    assert refused and refused[0]["paths"] == ["sub"]


def _plant_in_nested(nested: Path, other: Path, part: str) -> None:
    """Make git, reading nested repository ``nested``'s HEAD by path, reach ``other``'s."""
    dot, theirs = nested / ".git", other / ".git"
    branch = git(nested, "symbolic-ref", "HEAD")
    if part == "refs":
        shutil.rmtree(dot / "refs")
        os.symlink(theirs / "refs", dot / "refs")
    elif part == "branch":
        (dot / branch).unlink()
        os.symlink(theirs / git(other, "symbolic-ref", "HEAD"), dot / branch)
    elif part == "packed-refs":
        git(other, "pack-refs", "--all")
        (dot / branch).unlink()
        os.symlink(theirs / "packed-refs", dot / "packed-refs")
    elif part == "commondir":
        (dot / "commondir").write_text(f"{theirs}\n")
    elif part == "HEAD":
        (dot / "HEAD").unlink()
        os.symlink(theirs / "HEAD", dot / "HEAD")


@pytest.mark.parametrize("part", ["refs", "branch", "packed-refs", "commondir", "HEAD"])
def test_a_link_inside_a_nested_git_directory_never_puts_anothers_commit_in_a_snapshot(
        tmp_path, part):
    """A nested repository's ``.git`` is a directory of the workspace, but its refs, branch,
    ``packed-refs``, ``commondir`` or HEAD lead to another sandbox's repository: git, reading
    the HEAD by path to record the gitlink, would record that repository's commit. The gitlink
    is checked against the HEAD read through descriptors inside the workspace: refused (named
    in the log), the other commit's id in no snapshot, the rest saved. (A HEAD linked to
    another HEAD file is no repository to git at all: its files are saved as files.)"""
    other = make_repo(tmp_path / "other", "another sandbox\n")
    theirs = git(other, "rev-parse", "HEAD")
    ws = make_repo(tmp_path / "ws")
    nested = make_repo(ws / "vendor", "the workspace's own nested repository\n")
    mine = git(nested, "rev-parse", "HEAD")
    take(ws)
    (nested / "readme.md").write_text("moved on\n")
    git(nested, "commit", "-qam", "two")
    _plant_in_nested(nested, other, part)
    (ws / "edit.txt").write_text("saved\n")
    with capture_logs() as logs:
        snap = take(ws)
    assert "edit.txt" in files_of(ws, snap.commit)
    listing = sgit(ws, "ls-tree", "-r", snap.commit, key=KEY)
    assert theirs not in listing
    if part == "HEAD":
        # A HEAD linked elsewhere makes it no repository to git: its files, as git sees them.
        assert "vendor/readme.md" in listing
    else:
        assert f"160000 commit {mine}\tvendor" in listing  # the last checked commit stays
        refused = [e for e in logs if e["event"] == "snapshot.nested_refused"]
        assert refused and refused[0]["paths"] == ["vendor"]
    assert not [e for e in logs if theirs in str(e)]


def test_a_gitlink_is_the_commit_the_nested_repository_holds_now(tmp_path):
    """A submodule whose git directory is in the workspace's ``.git/modules`` (a ``gitdir:``
    file, as ``git submodule`` lays it out) and a nested clone: each gitlink is the commit its
    HEAD names, read inside the workspace, after a commit in each."""
    ws = make_repo(tmp_path / "ws")
    sub = make_repo(tmp_path / "sub-src", "a submodule\n")
    (ws / ".git" / "modules").mkdir()
    os.rename(sub / ".git", ws / ".git" / "modules" / "sub")
    os.rename(sub, ws / "sub")
    (ws / "sub" / ".git").write_text("gitdir: ../.git/modules/sub\n")
    git(ws / "sub", "config", "core.worktree", "../../../sub")
    nested = make_repo(ws / "vendor", "a clone\n")
    take(ws)
    for repo in (ws / "sub", nested):
        (repo / "readme.md").write_text("changed\n")
        git(repo, "commit", "-qam", "two")
    snap = take(ws)
    listing = sgit(ws, "ls-tree", snap.commit, key=KEY)
    assert f"160000 commit {git(ws / 'sub', 'rev-parse', 'HEAD')}\tsub" in listing
    assert f"160000 commit {git(nested, 'rev-parse', 'HEAD')}\tvendor" in listing


def test_a_nested_git_file_swapped_while_git_reads_never_records_anothers_commit(tmp_path):
    """``vendor/.git`` flips between the workspace's own nested repository and a ``gitdir:``
    file naming another sandbox's, as fast as a thread can, across snapshots: whatever git read
    meanwhile, no snapshot holds the other commit's id, and each holds the workspace's
    repository's commit or none."""
    import threading

    other = make_repo(tmp_path / "other", "another sandbox\n")
    theirs = git(other, "rev-parse", "HEAD")
    ws = make_repo(tmp_path / "ws")
    nested = make_repo(ws / "vendor", "the workspace's own\n")
    mine = git(nested, "rev-parse", "HEAD")
    os.rename(nested / ".git", ws / "vendor-git")
    own, planted = ws / "vendor" / ".own", ws / "vendor" / ".planted"
    stop = threading.Event()

    def flip() -> None:
        while not stop.is_set():
            for text in ("gitdir: ../vendor-git\n", f"gitdir: {other / '.git'}\n"):
                (own if "vendor-git" in text else planted).write_text(text)
                os.replace(own if "vendor-git" in text else planted, nested / ".git")

    flipper = threading.Thread(target=flip)
    flipper.start()
    try:
        repo = state_repo(ws, KEY)
        snapshot.prepare(repo)
        for i in range(15):
            (ws / "edit.txt").write_text(f"{i}\n")
            snap = snapshot.take(repo, "shadow", snapshot.Cache())
            listing = sgit(ws, "ls-tree", "-r", snap.commit, key=KEY)
            assert theirs not in listing
            gitlinks = [line for line in listing.splitlines() if line.startswith("160000")]
            assert gitlinks in ([], [f"160000 commit {mine}\tvendor"])
    finally:
        stop.set()
        flipper.join()


def test_a_git_symlink_to_another_workspace_is_refused_and_never_read(tmp_path):
    other = make_repo(tmp_path / "other", "another sandbox's secret history\n")
    ws = tmp_path / "ws"
    ws.mkdir()
    os.symlink(other / ".git", ws / ".git")
    (ws / "mine.txt").write_text("this workspace's file\n")
    store_dir = tmp_path / "store"

    with capture_logs() as logs:
        result = save(ws, store_dir)

    snap = result.snapshot
    assert files_of(ws, snap) == {"mine.txt"}
    assert state.state_parent(state_repo(ws, KEY).bare, snap) is None  # no git state recorded
    other_head = git(other, "rev-parse", "HEAD")
    assert subprocess.run(["git", f"--git-dir={state_repo(ws, KEY).git_dir}", "cat-file", "-e",
                           other_head]).returncode != 0
    assert any("outside the workspace" in str(e.get("reason", "")) for e in logs)


@pytest.mark.parametrize("part", ["objects", "refs", "packed-refs", "index", "HEAD"])
def test_a_part_of_git_linked_outside_is_never_followed(tmp_path, part):
    other = make_repo(tmp_path / "other", "outside\n")
    git(other, "pack-refs", "--all")
    ws = make_repo(tmp_path / "ws")
    target = ws / ".git" / part
    if target.is_dir():
        os.rename(target, tmp_path / f"moved-{part}")
    elif target.exists():
        target.unlink()
    os.symlink(other / ".git" / part, target)
    other_head = git(other, "rev-parse", "HEAD")

    snap = take(ws)

    assert snap.commit and "readme.md" in files_of(ws, snap.commit)
    assert subprocess.run(["git", f"--git-dir={state_repo(ws, KEY).git_dir}", "cat-file", "-e",
                           other_head]).returncode != 0


def test_a_directory_swapped_for_a_link_while_git_adds_never_puts_outside_files_in_a_snapshot(
        tmp_path):
    """git add opens files by path: the agent swaps a directory and a link to outside, in one
    step, over and over, while snapshots run. What git read through the link is recorded again
    from the workspace's own files, so no snapshot ever holds a byte of outside."""
    import threading

    from watcherd import dirfd

    secret = b"a token only watcherd's uid may read\n"
    outside = tmp_path / "outside"
    outside.mkdir()
    for i in range(100):
        (outside / f"f{i:02}.txt").write_bytes(secret)
    ws = make_repo(tmp_path / "ws")
    os.symlink(outside, ws / "link")
    (ws / "dir").mkdir()
    repo = state_repo(ws, KEY)
    snapshot.prepare(repo)
    stop = threading.Event()

    def agent() -> None:
        with dirfd.opened(ws) as rfd:
            while not stop.is_set():
                dirfd.exchange(rfd, "dir", "link")

    real = os.open(ws / "dir", os.O_RDONLY | os.O_DIRECTORY)  # wherever it is moved to
    swapper = threading.Thread(target=agent, daemon=True)
    swapper.start()
    try:
        for n in range(30):
            for i in range(100):  # every round, new content for git to read
                fd = os.open(f"f{i:02}.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644,
                             dir_fd=real)
                os.write(fd, f"round {n}\n".encode())
                os.close(fd)
            try:
                snapshot.take(repo)
            except GitError:
                pass  # git gave up on a file that vanished under it: the next one is taken
    finally:
        stop.set()
        swapper.join(timeout=10)
        os.close(real)
    assert all((outside / f"f{i:02}.txt").read_bytes() == secret for i in range(100))
    blob = git(tmp_path, "hash-object", "--stdin", input=secret)
    assert blob not in repo.bare.out("rev-list", "--objects", "--all")


def test_a_file_git_read_but_watcherd_cannot_read_again_keeps_its_last_recorded_content(
        tmp_path, monkeypatch):
    """What git read cannot be confirmed (the file is unreadable by the time watcherd reads it
    through descriptors): the snapshot keeps what the last one recorded, as ``git add
    --ignore-errors`` does for a file it cannot read, never what git read."""
    from watcherd import worktree

    ws = make_repo(tmp_path / "ws")
    (ws / "keep.txt").write_text("recorded\n")
    first = take(ws)
    (ws / "keep.txt").write_text("git read this, watcherd could not confirm it\n")
    (ws / "other.txt").write_text("confirmed\n")
    entry_id, store_entry = worktree.entry_id, worktree.store_entry

    def unreadable(dir_fd, path, fmt):
        if path == b"keep.txt":
            raise PermissionError(13, "Permission denied", "keep.txt")
        return entry_id(dir_fd, path, fmt)

    def unreadable_too(git, spool, dir_fd, name):
        if name == b"keep.txt":
            raise PermissionError(13, "Permission denied", "keep.txt")
        return store_entry(git, spool, dir_fd, name)

    monkeypatch.setattr(worktree, "entry_id", unreadable)
    monkeypatch.setattr(worktree, "store_entry", unreadable_too)
    snap = take(ws)
    assert snap.commit and snap.commit != first.commit
    assert sgit(ws, "show", f"{snap.commit}:keep.txt", key=KEY) == "recorded"
    assert sgit(ws, "show", f"{snap.commit}:other.txt", key=KEY) == "confirmed"


def test_read_file_refuses_links_fifos_devices_and_oversized_files(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "ok").write_text("fine\n")
    os.symlink("/etc/hostname", root / "link")
    os.mkfifo(root / "fifo")
    (root / "big").write_bytes(b"x" * 100)
    assert ws_reader.read_file(root, root / "ok", 10) == b"fine\n"
    for name, limit in (("link", 10), ("fifo", 10), ("big", 10)):
        with pytest.raises(ws_reader.Unsafe):
            ws_reader.read_file(root, root / name, limit)
    with pytest.raises(ws_reader.Unsafe):
        ws_reader.read_file(root, Path("/dev/zero"), 10)


def test_read_file_refuses_a_file_with_holes_and_reads_empty_small_and_whole_ones(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "index").write_bytes(b"DIRC\0\0\0\x02\0\0\0\0")
    punch_hole(root / "index", 64 << 20)
    with open(root / "packed-refs", "wb") as f:  # a hole in the middle
        f.write(b"# pack-refs with: peeled\n")
        f.seek(1 << 20)
        f.write(b"0" * 40 + b" refs/heads/main\n")
    whole = os.urandom(3 << 20) + b"tail"  # many blocks, the last one partly filled
    (root / "whole").write_bytes(whole)
    (root / "HEAD").write_bytes(b"ref: refs/heads/main\n")
    (root / "empty").write_bytes(b"")

    for name in ("index", "packed-refs"):
        with pytest.raises(ws_reader.Unsafe, match="has holes"):
            ws_reader.read_file(root, root / name, 1 << 30)
    assert ws_reader.read_file(root, root / "whole", 4 << 20) == whole
    assert ws_reader.read_file(root, root / "HEAD", 4096) == b"ref: refs/heads/main\n"
    assert ws_reader.read_file(root, root / "empty", 4096) == b""


def test_read_file_holds_a_big_file_in_memory_once(tmp_path):
    import tracemalloc

    size = 32 << 20
    content = os.urandom(size)
    (tmp_path / "index").write_bytes(content)
    tracemalloc.start()
    try:
        data = ws_reader.read_file(tmp_path, tmp_path / "index", 1 << 30)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert data == content
    assert peak < size + (4 << 20)  # not the chunks read and their join: twice the size


@pytest.mark.parametrize("name,ok", [
    ("refs/heads/main", True), ("refs/heads/feature/x", True), ("refs/tags/v1.0", True),
    ("refs/heads/../../etc", False), ("refs/heads/a..b", False), ("refs/heads/x.lock", False),
    ("refs/heads/.hidden", False), ("refs/heads/sp ace", False), ("refs/heads/a@{1}", False),
    ("refs/heads/ctl\x01", False), ("refs/heads/", False), ("HEAD", False),
    ("refs/heads/x:y", False), ("refs/heads/star*", False),
])
def test_ref_names_follow_git_check_ref_format(tmp_path, name, ok):
    assert ws_reader.valid_ref_name(name) is ok
    if "\x01" not in name and name.startswith("refs/"):
        r = subprocess.run(["git", "check-ref-format", name], capture_output=True)
        assert (r.returncode == 0) is ok


# -- nothing of watcherd's in the workspace ----------------------------------------------------------


def test_a_planted_spool_link_into_the_store_changes_nothing(tmp_path):
    ws = make_repo(tmp_path / "ws")
    store_dir = tmp_path / "store"
    save(ws, store_dir)
    (ws / ".git" / "watcherd").mkdir()
    os.symlink(store_dir, ws / ".git" / "watcherd" / "spool")
    before = sorted(p.relative_to(store_dir).as_posix() for p in store_dir.rglob("*"))

    (ws / "readme.md").write_text("edited\n")
    result = save(ws, store_dir)

    assert result.generation == 2
    after = {p.relative_to(store_dir).as_posix() for p in store_dir.rglob("*")}
    assert set(before) <= after  # nothing of the store deleted


def test_planted_restore_markers_in_the_workspace_are_ignored(tmp_path):
    ws = make_repo(tmp_path / "ws")
    store_dir = tmp_path / "store"
    save(ws, store_dir)
    target = make_repo(tmp_path / "target", "foreign\n")
    sibling = tmp_path / "sibling"
    sibling.mkdir()
    (sibling / "keep.txt").write_text("a sibling directory\n")
    markers = target / ".git" / "watcherd"
    markers.mkdir()
    (markers / "SWAPPED").write_text(f"{sibling}\n{tmp_path / 'stolen'}\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    staging = target / ".watcherd-restore"
    (staging / ".git" / "watcherd").mkdir(parents=True)
    (staging / ".git" / "watcherd" / "READY").write_text(".watcherd-aside-x\n")
    os.symlink(outside, target / ".watcherd-aside-x")

    outcome = restore(config_for(target, store_dir), Generations(LocalStore(store_dir), KEY))

    assert outcome.action == "restored"
    assert (sibling / "keep.txt").read_text() == "a sibling directory\n"
    assert not (tmp_path / "stolen").exists()
    assert list(outside.iterdir()) == []
    assert tree_state(target) == tree_state(ws)


# -- the whole state comes back ------------------------------------------------------------------------


def porcelain(path: Path) -> str:
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}
    return subprocess.run(["git", "status", "--porcelain=v2", "--branch", "--untracked-files=all"],
                          cwd=path, env=env, capture_output=True, check=True, text=True).stdout


def whole_state(path: Path) -> dict[str, object]:
    def out(*args: str) -> str:
        r = subprocess.run(["git", *args], cwd=path, capture_output=True, text=True)
        return r.stdout

    return {
        "status": porcelain(path),
        "stash": out("stash", "list"),
        "remotes": out("remote", "-v"),
        "tracking": out("config", "--get-regexp", r"^branch\."),
        "user": out("config", "--get-regexp", r"^user\."),
        "refs": out("for-each-ref", "--format=%(refname) %(objectname)"),
        "head": out("symbolic-ref", "-q", "HEAD") or out("rev-parse", "HEAD"),
        "index": out("ls-files", "-s"),
        "files": tree_state(path),
    }


def test_restore_gives_back_index_stash_remotes_tracking_tags_and_force_added_files(tmp_path):
    ws = make_repo(tmp_path / "ws")
    (ws / ".gitignore").write_text("dist/\n")
    (ws / "dist").mkdir()
    (ws / "dist" / "app.js").write_text("built v1\n")
    git(ws, "add", ".gitignore")
    git(ws, "add", "-f", "dist/app.js")
    git(ws, "commit", "-qm", "ship dist")
    git(ws, "tag", "-a", "-m", "release", "v1")
    git(ws, "tag", "-a", "-m", "a tag of a tag", "outer", "v1")
    git(ws, "tag", "light")
    blob = git(ws, "hash-object", "-w", "--stdin", input=b"a tagged blob\n")
    git(ws, "tag", "blob-light", blob)
    git(ws, "tag", "-a", "-m", "an annotated blob", "blob-annotated", blob)
    git(ws, "tag", "tree-light", "HEAD^{tree}")
    git(ws, "remote", "add", "origin", "https://example.com/acme/app.git")
    git(ws, "update-ref", "refs/remotes/origin/main", "HEAD")
    git(ws, "config", "branch.main.remote", "origin")
    git(ws, "config", "branch.main.merge", "refs/heads/main")
    git(ws, "config", "user.name", "Agent Smith")
    (ws / "stash-me.txt").write_text("stashed\n")
    git(ws, "add", "stash-me.txt")
    git(ws, "stash", "-q")
    (ws / "readme.md").write_text("second stash\n")
    git(ws, "stash", "-q")
    (ws / "dist" / "app.js").write_text("rebuilt\n")  # tracked under an ignored directory
    (ws / "dist" / "other.js").write_text("ignored\n")
    (ws / "staged.txt").write_text("the staged version\n")
    git(ws, "add", "staged.txt")
    (ws / "staged.txt").write_text("the working version\n")
    (ws / "untracked.txt").write_text("untracked\n")
    store_dir = tmp_path / "store"
    expected = whole_state(ws)
    expected["files"] = {k: v for k, v in expected["files"].items() if k != "dist/other.js"}

    save(ws, store_dir)
    target = tmp_path / "restored"
    restore(config_for(target, store_dir), Generations(LocalStore(store_dir), KEY))

    got = whole_state(target)
    assert got == expected
    assert git(target, "show", ":staged.txt") == "the staged version"
    assert git(target, "cat-file", "-t", "v1") == "tag"
    assert git(target, "cat-file", "-p", "outer^{}") == git(ws, "cat-file", "-p", "outer^{}")
    assert git(target, "cat-file", "blob", "blob-annotated^{}") == "a tagged blob"
    assert subprocess.run(["git", "fsck", "--no-dangling"], cwd=target,
                          capture_output=True).returncode == 0


@pytest.mark.parametrize("held", ["loose", "packed"])
def test_a_blob_git_found_among_the_workspaces_objects_is_kept_when_they_drop_it(tmp_path, held):
    """git does not write a blob it finds through the alternate: a file whose content the
    workspace already holds as a dangling object (``git hash-object -w``) would leave the
    snapshot depending on it. watcherd copies it, so the workspace dropping it (a prune) breaks
    nothing: the snapshot still reads, and a rollback to it works."""
    from watcherd import rollback

    ws = make_repo(tmp_path / "ws")
    (ws / "f.txt").write_text("only in a dangling object\n")
    blob = git(ws, "hash-object", "-w", "f.txt")
    pack = ws / ".git" / "objects" / "pack" / "pack"
    if held == "packed":
        name = git(ws, "pack-objects", "-q", str(pack), input=f"{blob}\n".encode())
        git(ws, "prune-packed")
    first = take(ws)
    (ws / "f.txt").write_text("later\n")
    if held == "packed":
        for suffix in (".pack", ".idx"):
            os.unlink(f"{pack}-{name}{suffix}")
    else:
        (ws / ".git" / "objects" / blob[:2] / blob[2:]).unlink()
    take(ws)  # watcherd follows the workspace's objects: that one is gone
    assert sgit(ws, "cat-file", "-p", f"{first.commit}:f.txt", key=KEY) == \
        "only in a dangling object"
    repo = state_repo(ws, KEY)
    with repo.lock():
        rollback.apply(repo, rollback.Target(first.commit, None, "test"))
    assert (ws / "f.txt").read_text() == "only in a dangling object\n"


def test_a_linked_worktree_inside_the_workspace_is_saved_as_a_nested_repository(tmp_path):
    """``git worktree add wt`` inside the workspace: ``wt/.git`` is a file naming
    ``.git/worktrees/wt``. The snapshot records the workspace, its branches (the worktree's
    one included) and ``wt`` as one gitlink, as git does, and the worktree by the same rules in a
    snapshot of its own; nothing of it is followed outside the workspace. A restore gives back
    the workspace, the branch, and the worktree's files and branch as a repository of its own."""
    ws = make_repo(tmp_path / "ws")
    git(ws, "worktree", "add", "-q", "-b", "side", "wt")
    (ws / "wt" / "only-in-the-worktree.txt").write_text("saved too\n")
    (ws / "main.txt").write_text("saved\n")
    with capture_logs() as logs:
        snap = take(ws)
    assert snap.commit
    files = files_of(ws, snap.commit)
    assert "main.txt" in files and "wt" in files
    assert not [f for f in files if f.startswith("wt/")]
    assert "wt/only-in-the-worktree.txt" in snap.paths
    assert not [e for e in logs if e["event"] == "snapshot.nested_not_saved"]
    assert "refs/heads/side" in {r.name for r in recorded(ws, snap.commit).refs}
    store_dir = tmp_path / "store"
    assert Generations(LocalStore(store_dir), KEY).save(state_repo(ws, KEY)).status == "saved"
    target, _ = restore_into(tmp_path, store_dir)
    assert (target / "main.txt").read_text() == "saved\n"
    assert git(target, "rev-parse", "--verify", "-q", "refs/heads/side")
    assert (target / "wt" / "only-in-the-worktree.txt").read_text() == "saved too\n"
    assert git(target / "wt", "symbolic-ref", "HEAD") == "refs/heads/side"


def test_a_users_gc_prune_after_reset_hard_breaks_no_later_save_or_restore(tmp_path):
    # Every object watcherd's history needs is in its own packs: the user's git may drop the
    # commits it no longer references (reset --hard, then gc --prune=now) at any time.
    ws = make_repo(tmp_path / "ws")
    store_dir = tmp_path / "store"
    (ws / "feature.py").write_text("work the user will throw away\n")
    git(ws, "add", "feature.py")
    git(ws, "commit", "-qm", "a commit about to be dropped")
    dropped = git(ws, "rev-parse", "HEAD")
    save(ws, store_dir)
    git(ws, "reset", "-q", "--hard", "HEAD~1")
    git(ws, "reflog", "expire", "--expire=now", "--all")
    git(ws, "gc", "-q", "--prune=now")
    assert subprocess.run(["git", "cat-file", "-e", dropped], cwd=ws).returncode != 0
    (ws / "readme.md").write_text("edited after the gc\n")

    second = save(ws, store_dir)
    target = tmp_path / "restored"
    outcome = restore(config_for(target, store_dir), Generations(LocalStore(store_dir), KEY))

    assert second.generation == 2 and (outcome.action, outcome.generation) == ("restored", 2)
    assert tree_state(target) == tree_state(ws)
    older = tmp_path / "older"
    restore(config_for(older, store_dir), Generations(LocalStore(store_dir), KEY),
            Request(generation=1))
    assert (older / "feature.py").read_text() == "work the user will throw away\n"
    assert git(older, "rev-parse", "HEAD") == dropped


@pytest.mark.parametrize("program", ["filter", "fsmonitor"])
def test_a_program_a_nested_repositorys_config_names_never_runs(tmp_path, program):
    """git add asks a nested repository it holds a gitlink for whether it is modified by
    running git status inside it, which reads that repository's own config and
    .gitattributes: watcherd never lets git hold a gitlink during its add, so a clean filter
    or an fsmonitor command planted there never runs, even on a same-size edit."""
    import time

    ws = make_repo(tmp_path / "ws")
    proj = make_repo(ws / "proj", "nested\n")
    repo = state_repo(ws, KEY)
    snapshot.prepare(repo)
    cache = snapshot.Cache()
    snapshot.take(repo, "shadow", cache)  # proj is a gitlink of the private index now
    marker = tmp_path / "RAN"
    script = tmp_path / "program.sh"
    script.write_text(f"#!/bin/sh\necho ran >> {marker}\ncat\n")
    script.chmod(0o755)
    if program == "filter":
        (proj / ".gitattributes").write_text("* filter=planted\n")
        git(proj, "config", "filter.planted.clean", str(script))
    else:
        git(proj, "config", "core.fsmonitor", str(script))
    (proj / "readme.md").write_text("NESTED\n")  # the same size: git status must read it
    later = time.time() + 5  # and a later mtime than its index records, with no wait
    os.utime(proj / "readme.md", (later, later))
    (ws / "edit.txt").write_text("saved\n")

    snap = snapshot.take(repo, "shadow", cache)

    assert not marker.exists()
    assert "edit.txt" in files_of(ws, snap.commit)
    nested = state.load(repo.bare, snap.commit).nested["proj"]
    assert sgit(ws, "show", f"{nested}:readme.md", key=KEY) == "NESTED"


@pytest.mark.parametrize("damage", ["missing-object", "fifo-index", "fifo-config"])
def test_a_broken_nested_repository_never_stops_or_slows_the_rest(tmp_path, damage):
    """What a git status inside the nested repository would fail or block on (its HEAD's
    object gone, a FIFO as its index or config) costs the rest of the workspace nothing: an
    edit elsewhere is saved within seconds."""
    import time

    ws = make_repo(tmp_path / "ws")
    proj = make_repo(ws / "proj", "nested\n")
    cache = snapshot.Cache()
    take(ws, cache=cache)
    dot = proj / ".git"
    if damage == "missing-object":
        shutil.rmtree(dot / "objects")
        (dot / "objects" / "pack").mkdir(parents=True)
    else:
        name = "index" if damage == "fifo-index" else "config"
        (dot / name).unlink()
        os.mkfifo(dot / name)
    (ws / "later.txt").write_text("an edit outside proj\n")
    started = time.monotonic()

    snap = take(ws, cache=cache)

    assert time.monotonic() - started < 10
    assert "later.txt" in files_of(ws, snap.commit)


@pytest.mark.parametrize("tracked", [True, False])
@pytest.mark.parametrize("name", [".gitignore", ".gitattributes", "fake-git"])
def test_a_fifo_git_reads_costs_a_second_and_reads_as_empty(tmp_path, tracked, name):
    """git opens every .gitignore and .gitattributes it meets without O_NONBLOCK, even in a
    directory it is told to leave out whose files its index holds: a FIFO there would block the
    add until its timeout. watcherd lets git's open go on (it reads an empty file) within
    seconds, and everything is saved, the directory's files too; also below a .git that is no
    repository (git walks on past it, and so does watcherd's look)."""
    import time

    ws = make_repo(tmp_path / "ws")
    (ws / "sub").mkdir()
    (ws / "sub" / "kept.txt").write_text("one\n")
    cache = snapshot.Cache()
    if tracked:
        take(ws, cache=cache)
    fifo = ".gitignore" if name == "fake-git" else name
    if name == "fake-git":
        (ws / "sub" / ".git").mkdir()  # an empty .git: no repository to git
    os.mkfifo(ws / "sub" / fifo)
    (ws / "sub" / "deeper").mkdir()
    os.mkfifo(ws / "sub" / "deeper" / fifo)  # met one after the other
    (ws / "sub" / "kept.txt").write_text("two\n")
    (ws / "edit.txt").write_text("saved\n")
    started = time.monotonic()

    snap = take(ws, cache=cache)

    assert time.monotonic() - started < 10
    assert "edit.txt" in files_of(ws, snap.commit)
    assert sgit(ws, "show", f"{snap.commit}:sub/kept.txt", key=KEY) == "two"
    assert cache.refused == {}


def test_letting_a_fifo_go_never_opens_a_regular_file_for_writing(tmp_path):
    """git's reader is let go by opening the FIFO it waits on for writing; the same name may be
    a regular .gitignore by then (or on the way to the path the watcher asked about): opening
    that for writing would be a change to the watcher (a rescan), so it is not opened at all."""
    from inotify_simple import INotify, flags

    from watcherd import dirfd

    (tmp_path / ".gitignore").write_text("*.log\n")
    inotify = INotify()
    inotify.add_watch(tmp_path, flags.CLOSE_WRITE)

    assert dirfd.release_fifos(tmp_path, [".gitignore"], for_s=0.05) == []
    assert inotify.read(timeout=0) == []
    inotify.close()


def test_a_slow_add_never_leaves_out_what_does_not_block_it(tmp_path, monkeypatch):
    """The stall check runs whenever git add takes long, a big workspace's too: only what git
    blocks on (a FIFO) is left out; a directory whose .git merely leads outside, or a
    repository half copied in, keeps being saved as git sees it."""
    from watcherd import git as git_door

    monkeypatch.setattr(git_door, "STALL_CHECK", 0.02)  # every add is "slow"
    ws = make_repo(tmp_path / "ws")
    (ws / "src").mkdir()
    (ws / "src" / ".git").write_text("gitdir: /nonexistent\n")
    (ws / "src" / "app.py").write_text("one\n")
    copying = ws / "copying"
    (copying / ".git" / "objects").mkdir(parents=True)
    (copying / ".git" / "HEAD").write_text("")  # a cp -r caught halfway
    cache = snapshot.Cache()
    take(ws, cache=cache)
    (ws / "src" / "app.py").write_text("two\n")

    snap = take(ws, cache=cache)

    assert cache.refused == {}
    assert sgit(ws, "show", f"{snap.commit}:src/app.py", key=KEY) == "two"


def test_a_fifo_gitmodules_beside_a_nested_repository_costs_a_second(tmp_path):
    """git reads the top .gitmodules when it meets a nested repository it cannot read as one
    (an unknown extension): a FIFO there is let go like a .gitignore."""
    import time

    ws = make_repo(tmp_path / "ws")
    nested = make_repo(ws / "lib")
    git(nested, "config", "core.repositoryformatversion", "1")
    git(nested, "config", "extensions.unknownToGit", "true")
    os.mkfifo(ws / ".gitmodules")
    (ws / "edit.txt").write_text("saved\n")
    started = time.monotonic()

    snap = take(ws)

    assert time.monotonic() - started < 10
    assert "edit.txt" in files_of(ws, snap.commit)


def test_a_broken_gitmodules_beside_a_repository_git_cannot_open_never_fails_the_saves(tmp_path):
    """git falls back to the workspace's .gitmodules for a nested repository it cannot open (a
    format or extension it does not know), and dies on a .gitmodules it cannot parse: that
    repository is left out (named), and every save goes on."""
    ws = make_repo(tmp_path / "ws")
    nested = make_repo(ws / "proj")
    git(nested, "config", "core.repositoryformatversion", "1")
    git(nested, "config", "extensions.agentWasHere", "true")
    (ws / ".gitmodules").write_text("[[[\n")
    cache = snapshot.Cache()
    for n in range(3):
        (ws / "edit.txt").write_text(f"edit {n}\n")
        snap = take(ws, cache=cache)
        assert sgit(ws, "show", f"{snap.commit}:edit.txt", key=KEY) == f"edit {n}"
    assert "git cannot open a repository of extension agentwashere" in cache.not_saved()["proj"]


def test_a_fifo_gitignore_watcherd_may_not_let_go_leaves_its_directory_out_as_last_saved(
        tmp_path, monkeypatch):
    """In the shipped deployments watcherd reads the app's files through a group: a FIFO the
    app's uid made (mode 0644) cannot be opened for writing to let git go. Its directory is
    left out, its files as last saved (out of git's index too, or git would read the FIFO
    anyway), the rest saved within seconds; once the FIFO is gone, saved again."""
    import time

    from watcherd import dirfd

    monkeypatch.setattr(dirfd, "release_fifos", lambda root, fifos, **kw: sorted(fifos))
    ws = make_repo(tmp_path / "ws")
    (ws / "sub").mkdir()
    (ws / "sub" / "kept.txt").write_text("one\n")
    cache = snapshot.Cache()
    take(ws, cache=cache)
    os.mkfifo(ws / "sub" / ".gitignore")
    (ws / "sub" / "kept.txt").write_text("two\n")
    (ws / "edit.txt").write_text("saved\n")
    started = time.monotonic()

    snap = take(ws, cache=cache)

    assert time.monotonic() - started < 15
    assert "edit.txt" in files_of(ws, snap.commit)
    assert sgit(ws, "show", f"{snap.commit}:sub/kept.txt", key=KEY) == "one"
    assert list(cache.refused) == ["sub"]
    (ws / "edit.txt").write_text("saved again\n")
    started = time.monotonic()
    snap = take(ws, cache=cache)  # still a FIFO: no wait again
    assert time.monotonic() - started < 5
    assert sgit(ws, "show", f"{snap.commit}:edit.txt", key=KEY) == "saved again"
    (ws / "sub" / ".gitignore").unlink()
    snap = take(ws, cache=cache)
    assert sgit(ws, "show", f"{snap.commit}:sub/kept.txt", key=KEY) == "two"
    assert cache.refused == {}


@pytest.mark.parametrize("config, refused", [
    (b"[core]\n\trepositoryformatversion = 0\n", False),
    (b'[core]\n\trepositoryformatversion = "0"\n', False),
    (b"[core]\n\trepositoryformatversion = 1 # one\n[extensions]\n\tobjectFormat = sha1\n", False),
    (b"[core]\n\trepositoryformatversion = 1\n[extensions]\n\tworktreeConfig = true\n", False),
    (b"[core]\n\trepositoryformatversion = 0\n[extensions]\n\tpreciousObjects = true\n", False),
    (b'[alias]\n\tx = !sh -c \\\n  "echo continued"\n', False),
    (b'[core "x"]\n\trepositoryformatversion = 5\n', False),
    (b"\xef\xbb\xbf[core]\n\trepositoryformatversion = 0\n", False),
    (b"[core] repositoryformatversion = 2\n", True),
    (b"[core]\n\trepositoryformatversion\t= 1\n[extensions]\n\tagent = x\n", True),
    (b"[core]\n\trepositoryformatversion = 1\n[extensions] agent = x\n", True),
    (b"[core]\n\trepositoryformatversion = 0\n[extensions]\n\tobjectformat = sha1\n", True),
    (b"[core]\n\trepositoryformatversion = 0\n[extensions]\n\tnoop-v1 = x\n", True),
    (b"[core]\n\tbare = maybe\n", True),
    (b"[core]\n\tbare = false\n[[[\n", True),
])
def test_a_nested_repository_git_cannot_open_is_told_as_git_tells_it(tmp_path, config, refused):
    """workspace.nested_head refuses a nested repository exactly when git would not open it
    (git-config(1)'s syntax, git 2.39's repository formats): one git opens is never refused,
    one it cannot open never left for git to fail the whole add on."""
    ws = make_repo(tmp_path / "ws")
    nested = make_repo(ws / "proj")
    (nested / ".git" / "config").write_bytes(config)
    agrees = subprocess.run(["git", "rev-parse", "HEAD"], cwd=nested, capture_output=True)
    assert (agrees.returncode != 0) == refused  # what git itself says
    if refused:
        with pytest.raises(ws_reader.Unsafe):
            ws_reader.nested_head(ws, "proj")
    else:
        assert ws_reader.nested_head(ws, "proj") == git(nested, "rev-parse", "HEAD")


@pytest.mark.parametrize("damage", ["unparsable", "bad-boolean"])
def test_a_nested_config_git_cannot_parse_never_fails_the_saves(tmp_path, damage):
    """git add opens a nested repository and dies on a config it cannot parse: that
    repository is left out (named), and every save goes on."""
    ws = make_repo(tmp_path / "ws")
    nested = make_repo(ws / "proj")
    with open(nested / ".git" / "config", "a") as config:
        config.write("[[[\n" if damage == "unparsable" else "[core]\n\tbare = maybe\n")
    cache = snapshot.Cache()
    for n in range(3):
        (ws / "edit.txt").write_text(f"edit {n}\n")
        snap = take(ws, cache=cache)
        assert sgit(ws, "show", f"{snap.commit}:edit.txt", key=KEY) == f"edit {n}"
    assert "proj" in cache.not_saved()


def test_thousands_of_fifo_gitignores_cost_seconds_not_the_timeout(tmp_path):
    """Only the FIFO git is blocked on at that moment can be let go: past a few, their
    directories are left out at once instead of one per pass."""
    import time

    ws = make_repo(tmp_path / "ws")
    for i in range(200):
        (ws / f"d{i:03d}").mkdir()
        (ws / f"d{i:03d}" / "f.txt").write_text(f"{i}\n")
        os.mkfifo(ws / f"d{i:03d}" / ".gitignore")
    (ws / "edit.txt").write_text("saved\n")
    started = time.monotonic()

    snap = take(ws)

    assert time.monotonic() - started < 15
    assert "edit.txt" in files_of(ws, snap.commit)


@pytest.mark.parametrize("files,size", [(6, 1 << 30), (40, 64 << 20)])
def test_many_sparse_files_each_below_a_bound_are_weighed_together(tmp_path, files, size):
    """A bound per file is beaten by more files: six of exactly 1 GiB, or forty of 64 MiB,
    cost the agent no disk and git minutes of zeros. What git would read of files nearly all
    holes is weighed together: past 1 GiB they are all left out within seconds, named, and the
    edit beside them is saved."""
    import time

    from watcherd.git import DEFAULT_TIMEOUT

    ws = make_repo(tmp_path / "ws")
    for i in range(files):
        (ws / f"zero{i}.bin").write_bytes(b"")
        os.truncate(ws / f"zero{i}.bin", size)
    if os.stat(ws / "zero0.bin").st_blocks:
        pytest.skip("this filesystem allocates what truncate grows")
    (ws / "edit.txt").write_text("saved\n")
    cache = snapshot.Cache()
    started = time.monotonic()

    snap = take(ws, cache=cache)

    assert time.monotonic() - started < DEFAULT_TIMEOUT / 4
    assert files_of(ws, snap.commit) == {"readme.md", "edit.txt"}
    assert sorted(cache.refused) == sorted(f"zero{i}.bin" for i in range(files))


def test_a_sparse_file_unlinked_as_git_opens_it_is_let_go_at_once(tmp_path):
    """The agent unlinks a terabyte of holes the moment git opens it: git goes on reading the
    open file, which no path shows any more (the kernel names it "... (deleted)"). It is
    stopped within seconds, and the rest is saved."""
    import threading
    import time

    from inotify_simple import INotify, flags

    from watcherd.git import DEFAULT_TIMEOUT

    ws = make_repo(tmp_path / "ws")
    big = ws / "big.bin"
    big.write_bytes(b"")
    os.truncate(big, 1 << 40)
    if os.stat(big).st_blocks:
        pytest.skip("this filesystem allocates what truncate grows")
    (ws / "edit.txt").write_text("saved\n")
    inotify = INotify()
    inotify.add_watch(big, flags.OPEN)

    def agent() -> None:
        if inotify.read(timeout=30_000):
            big.unlink()

    unlinking = threading.Thread(target=agent, daemon=True)
    unlinking.start()
    started = time.monotonic()
    try:
        snap = take(ws)
    finally:
        unlinking.join()
        inotify.close()

    assert time.monotonic() - started < DEFAULT_TIMEOUT / 4
    assert files_of(ws, snap.commit) == {"readme.md", "edit.txt"}


@pytest.mark.parametrize("gitdir", ["/proc/self/cwd/.git/planted", "../.git/planted"])
def test_a_nested_gitdir_into_the_workspaces_own_git_holding_a_fifo_costs_seconds(
        tmp_path, monkeypatch, gitdir):
    """A nested ``.git`` file may send git into the workspace's own ``.git`` (which git's walk
    never enters), directly or through ``/proc/self`` (git's own working directory: the
    workspace). git blocks on a FIFO HEAD there that no path of the work tree shows: the
    repository that led it there is left out within seconds, and the rest saved."""
    from watcherd.git import DEFAULT_TIMEOUT

    (tmp_path / "watcherd-cwd").mkdir()
    monkeypatch.chdir(tmp_path / "watcherd-cwd")
    ws = make_repo(tmp_path / "ws")
    planted = ws / ".git" / "planted"
    for d in ("objects", "refs"):
        (planted / d).mkdir(parents=True)
    os.mkfifo(planted / "HEAD")
    (ws / "p1").mkdir()
    (ws / "p1" / ".git").write_text(f"gitdir: {gitdir}\n")
    (ws / "p1" / "f.txt").write_text("inside\n")
    cache = snapshot.Cache()

    edit_and_take_within(ws, cache, DEFAULT_TIMEOUT / 6)

    assert list(cache.refused) == ["p1"]
    assert "watcherd-cwd" not in cache.refused["p1"]  # /proc/self is git's, not watcherd's


def test_a_refused_repository_whose_parent_becomes_a_link_never_fails_the_saves(tmp_path):
    """A repository left out (a FIFO HEAD) stays named in git's excludes; the agent then moves
    its parent away and links it back (``mv d e; ln -s e d``). git dies on an exclude "beyond a
    symbolic link", and a check that followed the link kept it there: every save failed. A
    path reached through a link now is no longer left out (git walks no link), and every edit
    is saved."""
    ws = make_repo(tmp_path / "ws")
    nested = ws / "d" / "p1" / ".git"
    (nested / "objects").mkdir(parents=True)
    os.mkfifo(nested / "HEAD")
    cache = snapshot.Cache()
    take(ws, cache=cache)
    assert list(cache.refused) == ["d/p1"]
    (ws / "d").rename(ws / "e")
    (ws / "d").symlink_to("e")
    for n in range(2):
        (ws / "readme.md").write_text(f"edit {n}\n")
        snap = take(ws, cache=cache)
        assert sgit(ws, "show", f"{snap.commit}:readme.md", key=KEY) == f"edit {n}"
    assert "d" in files_of(ws, snap.commit)  # the link, as git records it


@pytest.mark.parametrize("why", ["hurried", "timeout"])
def test_a_git_add_nothing_explains_gives_way_to_what_the_watcher_saw_change(
        tmp_path, monkeypatch, why):
    """Whatever holds git add up where no look of watcherd's finds it (past the walk's bounds,
    a file git reads that no path shows), the edit the watcher reported is saved: once git add
    has timed out, or at once when the daemon's final save is out of time (SIGTERM sets
    ``hurry_by``), watcherd reads the reported paths itself, through descriptors, into the
    index that holds the last snapshot. Nothing else of the snapshot changes."""
    import time

    from watcherd import procfs

    monkeypatch.setattr(snapshot, "_WALK_DEPTH", 2)  # a blocker the walk cannot reach...
    monkeypatch.setattr(procfs, "blocked_on", lambda pid: None)  # ...nor the kernel name
    ws = make_repo(tmp_path / "ws")
    (ws / "gone.txt").write_text("to be deleted\n")
    cache = snapshot.Cache()
    cache.changed(())  # a watcher reports to this cache
    take(ws, cache=cache)
    nested = ws / "a" / "b" / "c" / "d" / "lib" / ".git"
    (nested / "objects").mkdir(parents=True)
    os.mkfifo(nested / "HEAD")
    (ws / "readme.md").write_text("edited\n")
    (ws / "gone.txt").unlink()
    cache.changed(("readme.md", "gone.txt"))
    repo = state_repo(ws, KEY)
    if why == "hurried":
        cache.hurry_by[0] = time.monotonic()
    else:
        repo.git.timeout = 3.0
    started = time.monotonic()

    with capture_logs() as logs:
        snapshot.take(repo, "shadow", cache)

    assert time.monotonic() - started < 20
    head = state_repo(ws, KEY).snapshot_head()
    assert sgit(ws, "show", f"{head}:readme.md", key=KEY) == "edited"
    assert files_of(ws, head) == {"readme.md"}
    assert [e["files"] for e in logs if e["event"] == "snapshot.git_add_bypassed"] == [2]


def test_the_last_resort_reads_again_only_the_files_whose_status_changed(tmp_path, monkeypatch):
    """The last resort compares each saved file's status with the one git recorded in the
    index (size, mtime, inode) and reads again only those that differ: its cost follows the
    change, not the workspace. Nothing under a path left out is read."""
    from watcherd import worktree

    ws = make_repo(tmp_path / "ws")
    for i in range(50):
        (ws / f"f{i}.txt").write_text(f"{i}\n")
    (ws / "left" / "out").mkdir(parents=True)
    (ws / "left" / "out" / "x.txt").write_text("saved\n")
    cache = snapshot.Cache()
    take(ws, cache=cache)
    (ws / "f7.txt").write_text("edited, longer\n")
    (ws / "left" / "out" / "x.txt").write_text("edited where it is left out\n")
    read = []
    store = worktree.store_entry
    monkeypatch.setattr(worktree, "store_entry",
                        lambda *a, **kw: read.append(a[-1]) or store(*a, **kw))
    repo = state_repo(ws, KEY)

    assert snapshot._save_changed(repo, {"GIT_INDEX_FILE": str(repo.index)}, set(),
                                   {"left/out": "a FIFO HEAD"}) == 1

    assert [os.fsdecode(name) for name in read] == ["f7.txt"]


def test_the_last_resort_sees_what_git_sees_change_and_what_the_watcher_reported(tmp_path):
    """Status as git compares it: a same-size edit with its mtime put back (``cp -p``,
    ``touch -r``) still changes the ctime, and so does ``chmod +x``; a path the watcher
    reported is read again whatever its status says."""
    ws = make_repo(tmp_path / "ws")
    for name in ("kept.py", "run.sh", "told.txt"):
        (ws / name).write_text("aaaa\n")
    take(ws)
    before = os.stat(ws / "kept.py")
    (ws / "kept.py").write_text("bbbb\n")
    os.utime(ws / "kept.py", ns=(before.st_atime_ns, before.st_mtime_ns))
    os.chmod(ws / "run.sh", 0o755)
    repo = state_repo(ws, KEY)
    env = {"GIT_INDEX_FILE": str(repo.index)}

    assert snapshot._save_changed(repo, env, {"told.txt"}, {}) == 3

    staged = repo.bare.out("ls-files", "-s", "kept.py", "run.sh", env=env).splitlines()
    assert staged[1].startswith("100755 ")
    assert repo.bare.out("cat-file", "-p", staged[0].split()[1]) == "bbbb"


def test_the_last_resort_records_no_new_file_of_a_nested_repository(tmp_path):
    """git add stops at a directory holding a ``.git`` (it records the repository as one, or
    not at all); the last resort does too, at any depth, even for paths the watcher reported
    inside it (reported before the watcher knew it for a repository). A new file beside it is
    recorded."""
    ws = make_repo(tmp_path / "ws")
    take(ws)
    for where in ("sub", "deep/er/sub"):
        make_repo(ws / where)
        (ws / where / "inner" / "x.txt").parent.mkdir()
        (ws / where / "inner" / "x.txt").write_text("the nested repository's\n")
    (ws / "deep" / "er" / "beside.txt").write_text("the workspace's\n")
    repo = state_repo(ws, KEY)
    env = {"GIT_INDEX_FILE": str(repo.index)}
    told = {"sub/readme.md", "sub/inner/x.txt", "deep/er/sub/inner/x.txt", "deep/er/beside.txt"}

    assert snapshot._save_changed(repo, env, told, {}) == 1

    assert repo.bare.out("ls-files", env=env).splitlines() == ["deep/er/beside.txt", "readme.md"]


def test_the_last_resort_reads_a_bounded_number_of_files_and_judges_each_as_opened(
        tmp_path, monkeypatch):
    """Touching thousands of saved files must not hold a final save: the last resort reads at
    most a bounded number (the rest wait as last saved). A file is judged as opened, not as
    looked at before: one grown into terabytes of holes in between is not read."""
    from watcherd import dirfd, worktree

    monkeypatch.setattr(snapshot, "_CHANGED_MAX", 10)
    ws = make_repo(tmp_path / "ws")
    for i in range(40):
        (ws / f"f{i}.txt").write_text("")
    take(ws)
    for i in range(40):
        (ws / f"f{i}.txt").write_text(f"{i}\n")
    repo = state_repo(ws, KEY)
    assert snapshot._save_changed(repo, {"GIT_INDEX_FILE": str(repo.index)}, set(), {}) == 10

    (ws / "big.bin").write_bytes(b"")
    os.truncate(ws / "big.bin", 1 << 40)
    with dirfd.opened(ws) as rfd, pytest.raises(OSError):
        worktree.store_entry(repo.bare, repo.spool, rfd, "big.bin",
                             accept=lambda st: not snapshot.mostly_holes(st))


def test_rounds_that_run_past_their_time_end_in_one_that_saves_every_saved_files_edit(
        tmp_path, monkeypatch):
    """In a tree git takes seconds to walk, four rounds each blocked by a new FIFO repository
    would run past a SIGTERM's final save: once the rounds have taken their time, the last is
    ``git add --update``, which opens no directory. The edit of a file already saved is saved,
    the new file waits for the next snapshot, and the log says so."""
    monkeypatch.setattr(snapshot, "_ROUNDS_FOR", 0.0)
    ws = make_repo(tmp_path / "ws")
    cache = snapshot.Cache()
    take(ws, cache=cache)
    nested = ws / "lib" / ".git"
    (nested / "objects").mkdir(parents=True)
    os.mkfifo(nested / "HEAD")
    (ws / "readme.md").write_text("edited\n")
    (ws / "new.txt").write_text("new\n")

    with capture_logs() as logs:
        take(ws, cache=cache)

    head = state_repo(ws, KEY).snapshot_head()
    assert sgit(ws, "show", f"{head}:readme.md", key=KEY) == "edited"
    assert files_of(ws, head) == {"readme.md"}
    deferred = [e for e in logs if e["event"] == "snapshot.new_files_deferred"]
    assert len(deferred) == 1 and deferred[0]["rounds"] == 1


def test_a_sparse_file_of_a_terabyte_is_left_out_not_every_save(tmp_path):
    """`truncate -s 1T` costs the agent no disk and git add hours of reading zeros, at every
    snapshot (each ending in the door's timeout): the file is left out within seconds, named,
    the rest saved, and it is looked at again at each snapshot."""
    import time

    ws = make_repo(tmp_path / "ws")
    (ws / "big.bin").write_bytes(b"")
    os.truncate(ws / "big.bin", 1 << 40)
    if os.stat(ws / "big.bin").st_blocks:
        pytest.skip("this filesystem allocates what truncate grows")
    (ws / "edit.txt").write_text("saved\n")
    cache = snapshot.Cache()
    started = time.monotonic()
    with capture_logs() as logs:
        snap = take(ws, cache=cache)
    assert time.monotonic() - started < 15
    assert "edit.txt" in files_of(ws, snap.commit) and "big.bin" not in files_of(ws, snap.commit)
    assert [e["paths"] for e in logs if e["event"] == "snapshot.nested_refused"] == [["big.bin"]]
    (ws / "edit.txt").write_text("saved again\n")
    started = time.monotonic()
    snap = take(ws, cache=cache)
    assert time.monotonic() - started < 5
    assert sgit(ws, "show", f"{snap.commit}:edit.txt", key=KEY) == "saved again"
    (ws / "big.bin").unlink()
    take(ws, cache=cache)
    assert cache.refused == {}
