"""Least privilege end to end: the real daemon as a uid of its own on a read-only workspace.

DESIGN.md, trust boundary point 4, as the shipped deployments set it up (examples/kubernetes,
systemd/): the app owns the workspace; ``watcherd run`` sees it through a read-only mount and
reads it as another uid through the app's group; watcherd's state lives in a directory shared
through that group; ``watcherd restore`` writes the workspace as the app's uid. The store is S3
(the local test server), as in the Kubernetes example.

Here a read-only bind mount of the workspace stands in for the sidecar's ``readOnly`` volume
mount, and a directory owned by root, group the app's, mode 2770, for the state ``emptyDir``
the kubelet gives to ``fsGroup``. The app's edits go through the writable path.

Needs root (to mount and to start processes as other users) and an interpreter that other users
may run; skips with the reason otherwise.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon_fixture import Daemon, make_workspace, write_config
from helpers import python_for_any_uid, wait_for, watcherd_for_any_uid
from s3server import MotoS3, aws_env

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="bind mounts and inotify are Linux-only")

APP_UID = APP_GID = 61001  # the app's user and group (the pod's runAsUser/runAsGroup/fsGroup)
WATCHERD_UID = WATCHERD_GID = 61002  # the daemon's own (the sidecar's runAsUser/runAsGroup)
KEY = "acme/vmcp-123/main"
PREFIX = "sandboxes"
EDITED = "print('edited by the app')\n"

# How each process runs (subprocess.Popen arguments): the app's umask is a container's default.
AS_APP = {"user": APP_UID, "group": APP_GID, "extra_groups": [APP_GID], "umask": 0o022}
AS_WATCHERD = {"user": WATCHERD_UID, "group": WATCHERD_GID, "extra_groups": [APP_GID],
               "umask": 0o022}


# -- the machine -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoS3]:
    server = MotoS3().start()
    yield server
    server.stop()


@pytest.fixture
def base() -> Iterator[Path]:
    """A directory every uid may traverse (pytest's own temp directories are root's, 0700)."""
    if os.geteuid() != 0:
        pytest.skip("needs root: it mounts, and starts processes as other users")
    path = Path(tempfile.mkdtemp(prefix="watcherd-least-privilege-"))
    path.chmod(0o755)
    closed = [p for p in path.parents if not os.stat(p).st_mode & stat.S_IXOTH]
    if closed:
        shutil.rmtree(path)
        pytest.skip(f"{closed[0]} is closed to other users: set TMPDIR to a directory they "
                    "may traverse")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def mounts(base: Path) -> Iterator[Any]:
    """``bind(source, target, read_only=...)``; everything mounted is unmounted at teardown."""
    done: list[Path] = []

    def bind(source: Path, target: Path, *, read_only: bool) -> Path:
        target.mkdir(exist_ok=True)
        steps = [["mount", "--bind", str(source), str(target)]]
        if read_only:
            steps.append(["mount", "-o", "remount,bind,ro", str(target)])
        for step in steps:
            try:
                r = subprocess.run(step, capture_output=True, text=True, timeout=30)
            except FileNotFoundError:
                pytest.skip("no mount command")
            if r.returncode != 0:
                what = " ".join(a for a in step if not a.startswith("/"))
                pytest.skip(f"`{what}` is not permitted here ({r.stderr.strip()}): needs root "
                            "with CAP_SYS_ADMIN")
            if step[1] == "--bind":
                done.append(target)
        return target

    yield bind
    for target in reversed(done):
        subprocess.run(["umount", "-l", str(target)], check=False)


@pytest.fixture
def runnable(base: Path) -> list[str]:
    """The command line that starts watcherd as another uid; skips when this machine has none
    (every interpreter of this Python version lives where other users may not read)."""
    command = watcherd_for_any_uid()
    if command is None:
        pytest.skip(f"uid {WATCHERD_UID} cannot run any interpreter of this Python version "
                    f"(this one is {os.path.realpath(sys.executable)})")
    r = subprocess.run([*command, "--version"], capture_output=True, text=True, timeout=60,
                       cwd=base, **AS_WATCHERD)
    assert r.returncode == 0, r.stderr
    return command


@pytest.fixture
def daemons(base: Path) -> Iterator[list[Daemon]]:
    """Daemons the test started: killed at teardown, their logs printed."""
    made: list[Daemon] = []
    yield made
    for d in made:
        d.kill()
    for d in made:
        print(d.report())


# -- what the deployments do -----------------------------------------------------------------------


def app_workspace(path: Path) -> Path:
    """A template clone the app owns, readable by its group and by nobody else."""
    make_workspace(path)
    give_to_app(path)
    return path


def give_to_app(path: Path) -> None:
    for p in [path, *path.rglob("*")]:
        os.lchown(p, APP_UID, APP_GID)
        if not p.is_symlink():
            p.chmod(stat.S_IMODE(p.lstat().st_mode) & ~0o007)


def state_dir(path: Path) -> Path:
    """An empty state directory as the kubelet makes the ``emptyDir`` of ``fsGroup: <the app's
    group>``: group-owned by it, set-group-ID, writable by the group (and closed to others)."""
    path.mkdir()
    os.chown(path, 0, APP_GID)
    path.chmod(0o2770)
    return path


def listing(root: Path) -> dict[str, tuple[int, ...]]:
    """Every entry under ``root``, ``.git`` included: mode, owner, group, size, mtime."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [".", *dirnames, *filenames]:
            p = Path(dirpath, name)
            st = p.lstat()
            found[p.relative_to(root).as_posix()] = (st.st_mode, st.st_uid, st.st_gid,
                                                     st.st_size, st.st_mtime_ns)
    return found


def ids(pid: int) -> tuple[set[int], set[int], set[int]]:
    """A process's (uids, gids, supplementary groups) as the kernel holds them."""
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    fields = dict(line.split(":", 1) for line in status)
    return ({int(v) for v in fields["Uid"].split()}, {int(v) for v in fields["Gid"].split()},
            {int(v) for v in fields["Groups"].split()})


def s3_env(moto: MotoS3, bucket: str) -> dict[str, str]:
    return {**aws_env(moto.endpoint), "WATCHERD_STORE_URL": f"s3://{bucket}/{PREFIX}"}


def manifest(moto: MotoS3, bucket: str) -> dict[str, Any] | None:
    key = f"{PREFIX}/{KEY}/manifest.json"
    if key not in moto.keys(bucket, f"{PREFIX}/{KEY}/"):
        return None
    return json.loads(moto.client().get_object(Bucket=bucket, Key=key)["Body"].read())


def start_daemon(base: Path, name: str, workspace: Path, moto: MotoS3, bucket: str,
                 daemons: list[Daemon], command: list[str]) -> Daemon:
    """``watcherd run`` as the sidecar runs: its own uid, in the app's group. Its state directory
    is ``<base>/<name>-state``, which the caller made."""
    d = Daemon(base, name=name, workspace=workspace, key=KEY)
    daemons.append(d)
    return d.start(env=s3_env(moto, bucket), popen=AS_WATCHERD, wait_ready=False,
                   command=command)


def ready_or_crashed(d: Daemon) -> dict[str, Any] | None:
    """Wait for ``daemon.ready``; the ``daemon.crashed`` line instead, if it crashed first."""
    def outcome():
        crashed = d.log.events("daemon.crashed")
        return (crashed and ("crashed", crashed[0])) or \
            (d.log.events("daemon.ready") and ("ready", None))
    return wait_for(outcome, timeout=30, message="daemon.ready or daemon.crashed")[1]


def saved(d: Daemon, moto: MotoS3, bucket: str, content: str) -> dict[str, Any]:
    """Wait until the newest snapshot holds ``content`` in src/app.py and is in the store."""
    def done():
        m = manifest(moto, bucket)
        snaps = d.snapshots()
        # The file as the very snapshot the store names: the ref may move between two reads.
        return (m and snaps and m["snapshot"] == snaps[0]
                and d.shown("src/app.py", snaps[0]) == content.strip() and m)
    return wait_for(done, timeout=30, message="the edit snapshotted and uploaded")


def restore_as_app(base: Path, target: Path, state: Path, moto: MotoS3, bucket: str,
                   command: list[str]) -> subprocess.CompletedProcess:
    """``watcherd restore`` as the init container runs it: the app's uid and group."""
    config = write_config(base / f"{target.name}-restore.toml", workspace=target,
                          store=base / "unused-local-store", key=KEY, listen="", state_dir=state)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "WATCHERD_"))}
    return subprocess.run([*command, "--config", str(config), "restore"], capture_output=True,
                          text=True, timeout=120, cwd=base, env={**env, **s3_env(moto, bucket)},
                          **AS_APP)


# -- the tests -------------------------------------------------------------------------------------


def test_the_daemon_as_its_own_uid_saves_a_read_only_workspace_and_writes_nothing_into_it(
        base, mounts, runnable, moto, daemons):
    ws = app_workspace(base / "pod1-app")
    # A file the app keeps to itself: the daemon's uid may not read it.
    (ws / "secret.env").write_text("TOKEN=the app's own\n")
    os.chown(ws / "secret.env", APP_UID, APP_GID)
    (ws / "secret.env").chmod(0o600)
    ro = mounts(ws, base / "pod1-ro", read_only=True)
    with pytest.raises(OSError) as refused:
        (ro / "probe").write_text("x")
    assert refused.value.errno == errno.EROFS  # the mount really is read-only
    state_dir(base / "d0-state")
    bucket = moto.new_bucket()
    before = listing(ws)

    d = start_daemon(base, "d0", ro, moto, bucket, daemons, runnable)
    assert ready_or_crashed(d) is None, "the daemon crashed"
    uids, gids, groups = ids(d.pid)
    assert uids == {WATCHERD_UID} and gids == {WATCHERD_GID} and APP_GID in groups
    d.log.wait("snapshot.committed", timeout=15)
    (ws / "src" / "app.py").write_text(EDITED)  # the app edits through its own, writable path

    m = saved(d, moto, bucket, EDITED)
    assert m["generation"] >= 1 and m["snapshot"] == d.snapshots()[0]
    tree = set(d.git("ls-tree", "-r", "--name-only", d.snapshots()[0]).splitlines())
    assert {"README.md", "src/app.py", ".gitignore"} <= tree
    # What the daemon's uid cannot read is left out, and said so; everything else is saved.
    assert "secret.env" not in tree
    warned = d.log.events("snapshot.unreadable_files")
    assert warned and "secret.env" in json.dumps(warned[0]), warned
    assert d.stop() == 0

    # Nothing of watcherd's in the workspace: every entry as it was, bar the app's own edit.
    after = listing(ws)
    edited = after.pop("src/app.py")
    assert after == {k: v for k, v in before.items() if k != "src/app.py"}
    assert edited[:3] == before["src/app.py"][:3]  # still the app's file, same mode
    # watcherd's state is where it was told, group-shared: the restore's uid can work there.
    key_dir = base / "d0-state" / KEY
    assert (key_dir / "repo.git").is_dir()
    assert key_dir.stat().st_gid == APP_GID and key_dir.stat().st_mode & 0o2070 == 0o2070


def test_a_restore_as_the_apps_uid_then_the_daemon_as_its_own_continue_one_history(
        base, mounts, runnable, moto, daemons):
    bucket = moto.new_bucket()
    # Pod 1: the daemon saves the app's edit, and its final save on the way out.
    ws1 = app_workspace(base / "pod1-app")
    state_dir(base / "d0-state")
    first = start_daemon(base, "d0", mounts(ws1, base / "pod1-ro", read_only=True), moto, bucket,
                         daemons, runnable)
    assert ready_or_crashed(first) is None, "the first daemon crashed"
    (ws1 / "src" / "app.py").write_text(EDITED)
    saved(first, moto, bucket, EDITED)
    assert first.stop() == 0
    stored = manifest(moto, bucket)

    # Pod 2: a new, empty workspace volume (a mount point, as an emptyDir is) and a new state
    # directory, which the restore (the app's uid) and then the daemon (its own) share.
    ws2 = base / "pod2-app"
    ws2.mkdir()
    os.chown(ws2, APP_UID, APP_GID)
    ws2.chmod(0o750)
    mounts(ws2, ws2, read_only=False)
    state = state_dir(base / "d1-state")
    restored = restore_as_app(base, ws2, state, moto, bucket, runnable)
    assert restored.returncode == 0, restored.stderr
    assert (ws2 / "src" / "app.py").read_text() == EDITED
    # Restored files belong to the app, which goes on editing them.
    foreign = {p: p.lstat().st_uid for p in ws2.rglob("*") if p.lstat().st_uid != APP_UID}
    assert not foreign, foreign

    before = listing(ws2)
    second = start_daemon(base, "d1", mounts(ws2, base / "pod2-ro", read_only=True), moto, bucket,
                          daemons, runnable)
    crashed = ready_or_crashed(second)
    assert crashed is None, f"the second daemon crashed: {crashed}"
    # The restored history is the daemon's: no new line of history, and the app's next edit
    # moves the store forward from the generation it restored (no conflict).
    (ws2 / "src" / "app.py").write_text("print('pod 2 carries on')\n")
    m = saved(second, moto, bucket, "print('pod 2 carries on')\n")
    assert m["generation"] == stored["generation"] + 1
    second.git("merge-base", "--is-ancestor", stored["snapshot"], m["snapshot"])
    assert not second.log.events("state.new_history")
    assert not moto.keys(bucket, f"{PREFIX}/{KEY}/conflicts/")
    assert second.stop() == 0
    after = listing(ws2)
    assert after.pop("src/app.py")[:3] == before["src/app.py"][:3]
    assert after == {k: v for k, v in before.items() if k != "src/app.py"}


def test_what_a_killed_process_of_another_uid_left_never_stops_the_next_lock(base, runnable):
    # The app's `watcherd restore` or `watcherd snapshot` and the daemon share the state
    # directory as two uids of one group. Whatever one of them leaves when it is killed (a pack
    # copy in scratch/), the other's next lock removes; what it cannot remove (a directory closed
    # to it) it names and goes on: the lock is never refused for it.
    ws = app_workspace(base / "app")
    state = state_dir(base / "state")
    opening = (f"import os\nfrom pathlib import Path\nfrom watcherd import state\n"
               f"from watcherd.repo import Repo\nrepo = Repo(Path({str(state)!r}), {KEY!r}, "
               f"Path({str(ws)!r}))\n")
    killed = python_for_any_uid(
        opening + "repo.ensure()\n"
        "with repo.lock():\n"
        "    (repo.scratch / 'closed').mkdir(mode=0o700)\n"
        "    (repo.scratch / 'closed' / 'index').write_text('')\n"
        "    held = state._scratch_dir(repo.scratch, 'copy-')\n"
        "    copy = held.__enter__()\n"
        "    (copy / 'pack-1.pack').write_text('half a pack')\n"
        "    os._exit(0)  # as kill -9 would: nothing cleaned up\n")
    r = subprocess.run(killed, capture_output=True, text=True, timeout=60, cwd=base, **AS_APP)
    assert r.returncode == 0, r.stderr
    left = sorted(p.name for p in (state / KEY / "scratch").iterdir())
    assert left[0] == "closed" and left[1].startswith("copy-") and len(left) == 2

    next_lock = python_for_any_uid(opening + "with repo.lock():\n    print('locked')\n")
    r = subprocess.run(next_lock, capture_output=True, text=True, timeout=60, cwd=base,
                       **AS_WATCHERD)
    assert r.returncode == 0 and "locked" in r.stdout, r.stderr
    assert sorted(p.name for p in (state / KEY / "scratch").iterdir()) == ["closed"]
    said = r.stdout + r.stderr
    assert "state.stale_lock_removed" in said and "state.stale_file_kept" in said
    assert f"{state / KEY / 'scratch' / 'closed'}" in said

