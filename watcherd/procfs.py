"""What a child process is blocked on, read from ``/proc`` (Linux).

A git child that walks the workspace opens and reads files the agent wrote, without
``O_NONBLOCK``: a FIFO there blocks it for good. Looking at the whole work tree for every FIFO
that could be the one costs a walk of it, bounded, so a FIFO past the bound went unseen; asking
the kernel which file git is in ``open`` or ``read`` of names exactly that one, at any depth.

``/proc/<pid>/syscall`` names the system call a task is blocked in and its arguments
(proc(5)); for an ``open``/``openat`` the path is in the task's memory at the address of its
path argument, read through ``/proc/<pid>/mem``; for a ``read`` the descriptor's path is the link
``/proc/<pid>/fd/<fd>``. Both need ptrace access (``PTRACE_MODE_ATTACH``), which a process has to
its own children under the default Yama policy (``kernel.yama.ptrace_scope`` 1: a descendant).
Where it is refused, on another architecture or another system, :func:`blocked_on` answers None
and the caller looks another way.
"""

from __future__ import annotations

import os
import platform
from typing import NamedTuple

# System call numbers (the kernel's unistd tables): the ones that block on a FIFO, with the
# position of the path argument (open, openat, openat2) or the descriptor (the reads).
_OPEN_PATH = {  # number: (index of the directory descriptor or None, index of the path)
    "x86_64": {2: (None, 0), 257: (0, 1), 437: (0, 1)},
    "aarch64": {56: (0, 1), 437: (0, 1)},
}
_READ_FD = {  # read, pread64, readv, preadv, preadv2: the descriptor is the first argument
    "x86_64": frozenset({0, 17, 19, 295, 327}),
    "aarch64": frozenset({63, 65, 67, 69, 286}),
}
_AT_FDCWD = -100
_PATH_MAX = 4096  # linux/limits.h
_MAX_TASKS = 256  # tasks (threads and descendants) looked at: git add runs a few


class Seen(NamedTuple):
    """A file a process is blocked on or holds: its ``path`` as the kernel names it, and for
    one it holds open, ``stat``: the open file's own status (also after it was unlinked or
    renamed, when the path says `` (deleted)`` or another name)."""

    path: str
    stat: os.stat_result | None


def blocked_on(pid: int) -> list[Seen] | None:
    """The files process ``pid`` and its descendants are in a blocking ``open`` or ``read`` of
    right now, then every other file they hold open (a file read for minutes shows as held
    between two reads), each path once, in that order. An ``open``'s path is joined to the
    task's working directory or to its directory descriptor, and a ``/proc/self`` or
    ``/proc/thread-self`` in it is made the task's own; paths are not resolved further.

    None when ``/proc`` cannot tell: not Linux, an architecture whose system call numbers are
    not known here, or ptrace access refused (Yama, another uid). A task that ends meanwhile is
    skipped. Raises nothing."""
    opens, reads = _OPEN_PATH.get(platform.machine()), _READ_FD.get(platform.machine())
    if opens is None or reads is None or not os.path.isdir(f"/proc/{pid}/task"):
        return None
    found: list[Seen] = []
    held: list[Seen] = []
    pids, seen = [pid], 0
    while pids and seen < _MAX_TASKS:
        proc = pids.pop()
        try:
            tasks = os.listdir(f"/proc/{proc}/task")
        except OSError:
            continue  # ended
        for tid in tasks:
            seen += 1
            task = f"/proc/{proc}/task/{tid}"
            try:
                call = _syscall(task)
                blocked = _blocked_in(proc, tid, call, opens, reads) if call is not None else None
            except PermissionError:
                return None  # ptrace access refused: the caller must look another way
            except OSError:
                continue
            if blocked:
                found.append(blocked)
            try:
                with open(f"{task}/children", encoding="ascii") as f:
                    pids.extend(int(child) for child in f.read().split())
            except OSError:
                pass  # no CONFIG_PROC_CHILDREN, or ended
        try:
            held.extend(_held(proc))
        except PermissionError:
            return None
    first: dict[str, Seen] = {}
    for each in found + held:
        first.setdefault(each.path, each)
    return list(first.values())


def _syscall(task: str) -> tuple[int, ...] | None:
    """(number, arguments...) of the system call ``task`` is blocked in; None when it runs
    ("running") or is blocked outside one ("-1 ...")."""
    with open(f"{task}/syscall", encoding="ascii") as f:
        words = f.read().split()
    if not words or words[0] in ("running", "-1"):
        return None
    return tuple(int(w, 0) for w in words[:7])


def _blocked_in(pid: int, tid: str, call: tuple[int, ...],
                opens: dict[int, tuple[int | None, int]], reads: frozenset[int]) -> Seen | None:
    number, args = call[0], call[1:]
    task = f"/proc/{pid}/task/{tid}"
    try:
        if number in reads:
            return _open_file(pid, args[0])
        if number not in opens:
            return None
        at, where = opens[number]
        path = os.fsdecode(_string_at(task, args[where]))
        for own, mine in (("/proc/thread-self/", f"{task}/"), ("/proc/self/", f"/proc/{pid}/")):
            if path.startswith(own):  # the task's, not watcherd's (a gitdir: may name it)
                path = mine + path[len(own):]
        if not path or path.startswith("/"):
            return Seen(path, None) if path else None
        dir_fd = _AT_FDCWD if at is None else _signed(args[at])
        base = os.readlink(f"{task}/cwd" if dir_fd == _AT_FDCWD else f"{task}/fd/{dir_fd}")
        return Seen(os.path.join(base, path), None) if base.startswith("/") else None
    except PermissionError:
        raise
    except (OSError, ValueError, IndexError):
        return None  # the task moved on (a descriptor closed, its memory unmapped)


def _open_file(pid: int, fd: int | str) -> Seen | None:
    """The file descriptor ``fd`` of ``pid`` is open on: None for a pipe or a socket."""
    link = os.readlink(f"/proc/{pid}/fd/{fd}")
    if not link.startswith("/"):
        return None
    try:
        st = os.stat(f"/proc/{pid}/fd/{fd}")  # the open file itself, wherever its name went
    except FileNotFoundError:
        st = None  # closed meanwhile
    return Seen(link, st)


def _signed(word: int) -> int:
    """A 32-bit ``int`` argument as the kernel shows it (``AT_FDCWD`` is ``0xffffff9c``)."""
    word &= 0xFFFFFFFF
    return word - (1 << 32) if word >= 1 << 31 else word


def _string_at(task: str, address: int) -> bytes:
    """The NUL-terminated string at ``address`` of ``task``'s memory, read a page at a time (the
    next page may not be mapped), at most :data:`_PATH_MAX` bytes."""
    fd = os.open(f"{task}/mem", os.O_RDONLY | os.O_CLOEXEC)
    try:
        text = b""
        while len(text) < _PATH_MAX:
            chunk = os.pread(fd, 4096 - (address + len(text)) % 4096, address + len(text))
            if not chunk:
                break
            end = chunk.find(b"\0")
            if end >= 0:
                return text + chunk[:end]
            text += chunk
        raise ValueError("no path")
    finally:
        os.close(fd)


def _held(pid: int) -> list[Seen]:
    """The files ``pid`` holds open (its descriptors that are files)."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return []
    held = []
    for fd in fds:
        try:
            if seen := _open_file(pid, fd):
                held.append(seen)
        except PermissionError:
            raise
        except OSError:
            continue
    return held
