"""``procfs.blocked_on``: the kernel names the file a child process is blocked opening or
reading, whatever the way it was named (a path relative to its working directory, to a
directory descriptor, a descriptor already open), in any of its threads or descendants."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import pytest

from watcherd import procfs

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or platform.machine() not in procfs._OPEN_PATH,
    reason="the kernel's system call table is known here for Linux on x86_64 and aarch64")


def child(code: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code], cwd=cwd, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)


def end(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, 9)  # its children too
    proc.wait()


def named(pid: int, path: Path | str, deadline: float = 10.0) -> list[procfs.Seen]:
    """blocked_on(pid) once it names ``path`` (the child needs a moment to get there)."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        seen = procfs.blocked_on(pid)
        assert seen is not None
        if str(path) in [s.path for s in seen]:
            return seen
        time.sleep(0.01)
    raise AssertionError(f"{path} never named: {procfs.blocked_on(pid)}")


@pytest.fixture
def fifo(tmp_path):
    (tmp_path / "d").mkdir()
    os.mkfifo(tmp_path / "d" / "fifo")
    return tmp_path / "d" / "fifo"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("how", [
    "open('d/fifo')",  # relative to the working directory (AT_FDCWD)
    "os.open('fifo', os.O_RDONLY, dir_fd=os.open('d', os.O_RDONLY))",  # relative to a descriptor
    "threading.Thread(target=open, args=('d/fifo',)).start()",  # in another thread
    "subprocess.run([sys.executable, '-c', \"open('d/fifo')\"])",  # in a child of its own
])
def test_an_open_blocked_on_a_fifo_names_the_fifo_first(tmp_path, fifo, how):
    proc = child(f"import os, subprocess, sys, threading; {how}", tmp_path)
    try:
        seen = named(proc.pid, fifo)
        assert seen[0] == (str(fifo), None)  # not open yet: no status of its own
    finally:
        end(proc)


@pytest.mark.timeout(30)
def test_a_read_blocked_on_a_fifo_names_it_through_its_descriptor(tmp_path, fifo):
    writer = os.open(fifo, os.O_RDWR)  # a writer that never writes: the child's open returns
    try:
        proc = child("f = open('d/fifo', 'rb'); f.read()", tmp_path)
        try:
            seen = named(proc.pid, fifo)[0]
            assert seen.path == str(fifo) and seen.stat.st_ino == os.stat(fifo).st_ino
        finally:
            end(proc)
    finally:
        os.close(writer)


@pytest.mark.timeout(30)
def test_a_read_of_a_pipe_names_no_file(tmp_path):
    proc = child("import sys; print('ready', flush=True); sys.stdin.read()", tmp_path)
    try:
        assert proc.stdout.readline() == b"ready\n"
        deadline = time.monotonic() + 10
        while (Path(f"/proc/{proc.pid}/syscall").read_text().split() or ["running"])[0] \
                in ("running", "-1"):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert procfs.blocked_on(proc.pid) == []  # nothing with a path
    finally:
        end(proc)


def test_an_architecture_whose_system_calls_are_not_known_cannot_tell(monkeypatch):
    monkeypatch.setattr(platform, "machine", lambda: "s390x")
    assert procfs.blocked_on(os.getpid()) is None


def test_a_process_that_has_ended_names_nothing():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert procfs.blocked_on(proc.pid) is None


@pytest.mark.timeout(30)
def test_memory_it_may_not_read_cannot_tell_rather_than_names_nothing(tmp_path, fifo, monkeypatch):
    """Yama or another uid can refuse the memory read after the system call was read: the
    answer is None (the caller walks the work tree instead), never "blocked on nothing"."""
    proc = child("open('d/fifo')", tmp_path)
    try:
        named(proc.pid, fifo)

        def refused(task: str, address: int) -> bytes:
            raise PermissionError(13, "Permission denied", f"{task}/mem")

        monkeypatch.setattr(procfs, "_string_at", refused)
        assert procfs.blocked_on(proc.pid) is None
    finally:
        end(proc)


@pytest.mark.timeout(30)
def test_an_open_through_proc_self_names_the_tasks_own_file_not_the_callers(tmp_path, fifo):
    """A ``gitdir:`` may name ``/proc/self/cwd/...``: git's own working directory, which from
    watcherd's side of /proc is watcherd's. The path is made the task's own."""
    proc = child("open('/proc/self/cwd/d/fifo')", tmp_path)
    try:
        seen = named(proc.pid, f"/proc/{proc.pid}/cwd/d/fifo")
        assert os.path.samefile(seen[0].path, fifo)
    finally:
        end(proc)


@pytest.mark.timeout(30)
def test_a_file_unlinked_while_held_keeps_its_own_status(tmp_path):
    """The kernel names a held file unlinked since as "<path> (deleted)": its status is the
    open file's, not whatever the name now holds."""
    (tmp_path / "big.bin").write_bytes(b"x" * 4096)
    proc = child("f = open('big.bin', 'rb'); print('open', flush=True); input()", tmp_path)
    try:
        assert proc.stdout.readline() == b"open\n"
        inode = os.stat(tmp_path / "big.bin").st_ino
        os.unlink(tmp_path / "big.bin")
        seen = named(proc.pid, f"{tmp_path / 'big.bin'} (deleted)")
        held = [s for s in seen if s.path.endswith(" (deleted)")]
        assert held[0].stat.st_ino == inode and held[0].stat.st_size == 4096
    finally:
        end(proc)
