"""Work inside the workspace through directory descriptors, never by path.

The workspace is the agent's: between two steps of watcherd's, any directory in it may be
swapped for a link to somewhere else. Every operation here starts from a descriptor of a
directory watcherd trusts (the workspace root, opened once) and opens each further directory
with ``O_NOFOLLOW``, so a planted link is refused (``ELOOP``, ``ENOTDIR``), never followed out of
the workspace. Names are single path components unless a function says otherwise.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import stat
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@contextmanager
def opened(path: Path) -> Iterator[int]:
    """A descriptor of directory ``path`` (the workspace root: the operator's path, trusted)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


@contextmanager
def opened_at(dir_fd: int, name: str | bytes) -> Iterator[int]:
    """A descriptor of directory ``name`` of ``dir_fd``; :class:`OSError` when it is a link,
    not a directory, or missing."""
    fd = os.open(name, DIR_FLAGS, dir_fd=dir_fd)
    try:
        yield fd
    finally:
        os.close(fd)


def identity(dir_fd: int, name: str | bytes) -> tuple[int, int] | None:
    """(device, inode) of entry ``name`` (the entry itself, no link followed); None if absent."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def exists(dir_fd: int, name: str | bytes) -> bool:
    return identity(dir_fd, name) is not None


def is_dir(dir_fd: int, name: str | bytes) -> bool:
    """True when ``name`` is a directory itself (a link to one is not)."""
    try:
        return stat.S_ISDIR(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except FileNotFoundError:
        return False


def remove(dir_fd: int, name: str | bytes) -> None:
    """Remove entry ``name``: a tree (:func:`remove_tree`), or a file or link. Nothing there is
    fine."""
    if is_dir(dir_fd, name):
        remove_tree(dir_fd, name)
    else:
        try:
            os.unlink(name, dir_fd=dir_fd)
        except FileNotFoundError:
            pass


def remove_tree(dir_fd: int, name: str | bytes, *, budget: int = 2_000_000) -> None:
    """Remove directory ``name`` of ``dir_fd`` and everything in it, through descriptors (no
    link followed), without recursion: a tree the agent made thousands of levels deep neither
    overflows Python's stack (``shutil.rmtree`` recurses per level) nor holds a descriptor per
    level. Each directory is listed once (and once more when emptied, for what appeared
    meanwhile); going back up, each parent is checked to be the directory it came from (the
    agent may move a directory away midway). Raises :class:`OSError` rather than go on in a
    directory outside the tree, or once ``budget`` entries were removed and more keep coming."""
    left = [budget]

    def clear(fd: int) -> list[str]:
        """Unlink what is not a directory; the directories' names."""
        dirs = []
        with os.scandir(fd) as it:
            for e in it:
                left[0] -= 1
                if left[0] < 0:
                    raise OSError(errno.EAGAIN, "entries keep appearing in a tree being removed",
                                  e.name)
                if e.is_dir(follow_symlinks=False):
                    dirs.append(e.name)
                    continue
                try:
                    os.unlink(e.name, dir_fd=fd)
                except FileNotFoundError:
                    pass
        return dirs

    fd = os.open(name, DIR_FLAGS, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        # Per level, from the top: its name, its identity, the subdirectories still to remove.
        levels: list[tuple[str | bytes, tuple[int, int], list[str]]] = [
            (name, (st.st_dev, st.st_ino), clear(fd))]
        while True:
            pending = levels[-1][2]
            if pending:
                sub = pending.pop()
                try:
                    nfd = os.open(sub, DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    continue
                except OSError as exc:  # became a link or a file since the listing
                    if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                    os.unlink(sub, dir_fd=fd)
                    continue
                os.close(fd)
                fd = nfd
                st = os.fstat(fd)
                levels.append((sub, (st.st_dev, st.st_ino), clear(fd)))
                continue
            again = clear(fd)  # what appeared since it was listed
            if again:
                pending.extend(again)
                continue
            if len(levels) == 1:
                break
            up = os.open("..", DIR_FLAGS, dir_fd=fd)
            st = os.fstat(up)
            os.close(fd)
            fd = up
            if (st.st_dev, st.st_ino) != levels[-2][1]:
                raise OSError(errno.EXDEV, "a directory was moved out of the tree being removed",
                              os.fsdecode(levels[-1][0]))
            try:
                os.rmdir(levels.pop()[0], dir_fd=fd)
            except FileNotFoundError:
                pass
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=dir_fd)


@contextmanager
def parent(root_fd: int, path: bytes) -> Iterator[tuple[int, bytes] | None]:
    """(descriptor of the directory holding ``path``, its last component), every leading
    directory of the relative ``path`` opened without following links; None when one of them is
    missing, a link or not a directory."""
    *dirs, leaf = path.split(b"/")
    fd = os.dup(root_fd)
    try:
        for part in dirs:
            nfd = os.open(part, DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nfd
    except OSError as exc:
        os.close(fd)
        if exc.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            raise
        yield None
        return
    try:
        yield fd, leaf
    finally:
        os.close(fd)


_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2  # renameat2(2)


def _renameat2(src_fd: int, a: str | bytes, dst_fd: int, b: str | bytes, flags: int) -> bool:
    """``renameat2(src_fd, a, dst_fd, b, flags)``; False where the kernel or the filesystem
    cannot (no such call, or the flag unsupported); :class:`OSError` for any other failure."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(src_fd, os.fsencode(a), dst_fd, os.fsencode(b), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), os.fsdecode(b))


def exchange(dir_fd: int, a: str, b: str) -> bool:
    """Swap entries ``a`` and ``b`` of ``dir_fd`` in one step (``renameat2(RENAME_EXCHANGE)``,
    rename(2)); False where the kernel or the filesystem cannot."""
    return _renameat2(dir_fd, a, dir_fd, b, _RENAME_EXCHANGE)


def exchange_at(src_fd: int, a: str | bytes, dst_fd: int, b: str | bytes) -> bool:
    """Swap entry ``a`` of ``src_fd`` and entry ``b`` of ``dst_fd`` in one step (both must
    exist, on one filesystem); False where the kernel or the filesystem cannot exchange.
    Raises :class:`FileNotFoundError` when either is missing, ``OSError(EXDEV)`` across
    filesystems."""
    return _renameat2(src_fd, a, dst_fd, b, _RENAME_EXCHANGE)


def rename_new(src_fd: int, a: str | bytes, dst_fd: int, b: str | bytes) -> None:
    """Move entry ``a`` of ``src_fd`` to ``b`` of ``dst_fd`` only if nothing is there
    (``RENAME_NOREPLACE``; where the filesystem lacks it, a hard link, which never replaces
    either, then an unlink: for files and links only). Raises :class:`FileExistsError` when
    ``b`` exists."""
    if _renameat2(src_fd, a, dst_fd, b, _RENAME_NOREPLACE):
        return
    os.link(a, b, src_dir_fd=src_fd, dst_dir_fd=dst_fd, follow_symlinks=False)
    os.unlink(a, dir_fd=src_fd)


def place(src: Path, dir_fd: int, name: str) -> None:
    """Put directory ``src`` (watcherd's, in the state directory) at ``name`` of ``dir_fd``: a
    rename on the same filesystem, else a copy whose every directory and file is created
    through descriptors (``O_EXCL``, ``O_NOFOLLOW``), so a link planted meanwhile is never
    written through. Raises :class:`OSError` when ``name`` exists."""
    if os.stat(src).st_dev == os.fstat(dir_fd).st_dev:
        if exists(dir_fd, name):
            raise FileExistsError(errno.EEXIST, "exists", name)
        os.rename(src, name, dst_dir_fd=dir_fd)
    else:
        _copy_tree(src, dir_fd, name)


def _copy_tree(src: Path, parent_fd: int, name: str) -> None:
    os.mkdir(name, 0o777, dir_fd=parent_fd)
    with opened_at(parent_fd, name) as fd:
        for entry in os.scandir(src):
            if entry.is_dir(follow_symlinks=False):
                _copy_tree(Path(entry.path), fd, entry.name)
                continue
            mode = stat.S_IMODE(entry.stat(follow_symlinks=False).st_mode)
            out = os.open(entry.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW |
                          os.O_CLOEXEC, 0o600, dir_fd=fd)
            with open(entry.path, "rb") as f_in, os.fdopen(out, "wb") as f_out:
                shutil.copyfileobj(f_in, f_out, 1 << 20)
                os.fchmod(f_out.fileno(), mode)


def move_missing(src_fd: int, dst_fd: int, *, depth: int = 8) -> None:
    """Move every entry of directory ``src_fd`` that ``dst_fd`` lacks into it; directories both
    have are merged the same way (what ``dst_fd`` holds wins), up to ``depth`` levels."""
    for name in os.listdir(src_fd):
        if not exists(dst_fd, name):
            os.rename(name, name, src_dir_fd=src_fd, dst_dir_fd=dst_fd)
        elif depth > 0 and is_dir(src_fd, name) and is_dir(dst_fd, name):
            with opened_at(src_fd, name) as s, opened_at(dst_fd, name) as d:
                move_missing(s, d, depth=depth - 1)


def find(dir_fd: int, predicate, *, limit: int = 100_000, prefix: str = "",
         depth: int = 64) -> str | None:
    """The relative path of the first entry under ``dir_fd`` whose name satisfies
    ``predicate``, walking directories without following links, at most ``limit`` entries and
    ``depth`` levels (deeper ones are not looked into: the recursion stays bounded)."""
    budget = [limit]

    def walk(fd: int, at: str, level: int) -> str | None:
        for name in os.listdir(fd):
            budget[0] -= 1
            if budget[0] < 0:
                return None
            if predicate(name):
                return at + name
            if level < depth and is_dir(fd, name):
                try:
                    with opened_at(fd, name) as sub:
                        hit = walk(sub, f"{at}{name}/", level + 1)
                except OSError:
                    continue
                if hit:
                    return hit
        return None

    return walk(dir_fd, prefix, 0)


@contextmanager
def beneath(root_fd: int, rel: bytes) -> Iterator[int | None]:
    """A descriptor of directory ``rel`` of ``root_fd`` (``b""``, or '/'-separated components
    each followed by '/'), every component opened without following links; None when one is
    missing, a link or not a directory."""
    with parent(root_fd, rel + b"-") as found:
        yield None if found is None else found[0]


def release_fifos(root: Path, fifos: Iterable[str], *, for_s: float = 0.5) -> list[str]:
    """Let a reader blocked opening one of ``fifos`` (FIFOs under ``root``, by relative path: a
    git opening a ``.gitignore`` the agent made a FIFO) go on: each is opened for writing and
    closed at once, so the reader's open returns and it reads an empty file. Tried again for
    ``for_s`` seconds: a reader meets them one after another. Every directory on the way is
    opened without following links; nothing is ever written. Those that may not be opened for
    writing (``EACCES``, ``EPERM``, ``EROFS``: another uid's, a read-only mount), which a reader
    stays blocked on; one nobody reads now (``ENXIO``), gone, a link or no FIFO (a regular
    file is never opened for writing: a watcher would take it for an edit) is passed over."""
    fifos = list(fifos)
    denied: set[str] = set()
    deadline = time.monotonic() + for_s
    with opened(root) as rfd:
        while True:
            for rel in fifos:
                if time.monotonic() >= deadline:
                    break
                with parent(rfd, os.fsencode(rel)) as where:
                    if where is None:
                        continue
                    try:
                        if not stat.S_ISFIFO(os.stat(where[1], dir_fd=where[0],
                                                     follow_symlinks=False).st_mode):
                            continue  # a file opened for writing is a change to a watcher
                        fd = os.open(where[1], os.O_WRONLY | os.O_NONBLOCK | os.O_NOFOLLOW |
                                     os.O_CLOEXEC, dir_fd=where[0])
                    except OSError as exc:
                        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                            denied.add(rel)
                        continue  # ENXIO: nobody reads it now
                    os.close(fd)
            if time.monotonic() >= deadline:
                return sorted(denied)
            time.sleep(0.01)
