"""Change the workspace's files from one tree to another, through descriptors.

What ``git read-tree -m -u`` does for a checkout, done by watcherd for a rollback: git opens
every path of the work tree by name, so a directory the agent swaps for a link while git runs
has git write the target's files wherever the link points, outside the workspace. Here every
directory is opened from the workspace root's descriptor with ``O_NOFOLLOW``
(:mod:`watcherd.dirfd`): a link planted at any moment is refused, never followed.

Nothing a change replaces or removes is deleted: each new file is written in watcherd's rescue
directory (in the workspace root, so on its filesystem) and exchanged with the entry it replaces
in one ``renameat2(RENAME_EXCHANGE)``; what comes back, and what a removal moves away, is kept
there under the change's number for the caller to compare with what the snapshot held (an edit
made in between is then kept, never lost). Where a directory is on another filesystem than the
root, the exchange happens in that directory, under the rescue directory's name and the number
(:func:`aside`).
"""

from __future__ import annotations

import errno
import hashlib
import os
import select
import stat
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from watcherd import dirfd
from watcherd.git import Git, object_id

NONE = "000000"  # git's mode of a path one side of a diff lacks (git-diff-tree(1), "RAW OUTPUT")
LINK, GITLINK, EXECUTABLE = "120000", "160000", "100755"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Change:
    """One path a change writes or removes: its git mode and blob id in the old tree and in the
    new (:data:`NONE` and a zero id on the side that lacks it)."""

    path: bytes
    old_mode: str
    old_oid: str
    new_mode: str
    new_oid: str

    @property
    def added(self) -> bool:
        return self.old_mode == NONE

    @property
    def removed(self) -> bool:
        return self.new_mode == NONE


class Blocked(Exception):
    """Something the change cannot put aside stands in its way (a directory holding files
    where a file goes, a link or file where a directory goes). ``path`` is the change's."""

    def __init__(self, path: bytes, why: str) -> None:
        super().__init__(why)
        self.path = path


def diff(git: Git, old: str, new: str) -> list[Change]:
    """Every path whose entry differs between trees ``old`` and ``new`` (``git diff-tree -r``,
    no rename detection), in git's path order."""
    raw = git.run("diff-tree", "-r", "-z", "--no-renames", old, new).stdout
    fields = raw.split(b"\0")
    out = []
    for meta, path in zip(fields[0::2], fields[1::2]):
        old_mode, new_mode, old_oid, new_oid, _status = meta.lstrip(b":").decode().split(" ")
        out.append(Change(path, old_mode, old_oid, new_mode, new_oid))
    return out


def first_edited(root_fd: int, changes: list[Change], object_format: str, *,
                 refuse: Callable[[os.stat_result], bool] | None = None) -> bytes | None:
    """The first path of ``changes`` whose entry in the work tree is not what the old tree
    holds (content, mode, kind; for an added path: anything there but what the change writes,
    or a file or link where one of its directories goes), or None. Reads through descriptors,
    hashing as git does (git-hash-object(1)). Raises :class:`PermissionError` naming a file
    watcherd cannot read, and :class:`OSError` ``EFBIG`` naming one ``refuse`` says not to read
    (as looked at)."""
    removed = {c.path for c in changes if not c.added}
    for change in changes:
        if change.added:
            if not free_for(root_fd, change, removed, object_format, refuse=refuse):
                return change.path
            continue
        try:
            found = entry_id(root_fd, change.path, object_format, refuse=refuse)
        except PermissionError:
            raise PermissionError(errno.EACCES, "cannot be read",
                                  os.fsdecode(change.path)) from None
        if change.old_mode == GITLINK:  # a submodule's directory: its files are not the change's
            if found is None or found[0] != GITLINK:
                return change.path
        elif found != (change.old_mode, change.old_oid):
            return change.path
    return None


def in_nested_repository(root_fd: int, path: bytes) -> bool:
    """Whether a leading directory of ``path`` (relative to the work tree's root, ``root_fd``)
    holds a ``.git``: maybe a nested repository, whose files git add never records as the work
    tree's (it stops at a valid one). Any ``.git`` counts, a planted one too: for a caller that
    errs on leaving a path to git. Each directory opened without following links; False where
    one is missing, a link or not a directory (nothing is read there)."""
    fd = os.dup(root_fd)
    try:
        for part in path.split(b"/")[:-1]:
            nfd = os.open(part, dirfd.DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nfd
            if dirfd.exists(fd, b".git"):
                return True
        return False
    except OSError:
        return False
    finally:
        os.close(fd)


def free_for(root_fd: int, change: Change, removed: set[bytes], object_format: str, *,
             refuse: Callable[[os.stat_result], bool] | None = None) -> bool:
    """Whether added ``change`` writes its path without replacing anything but itself: nothing
    is there (each leading directory a directory, absent, or in ``removed``, the paths the
    change removes), or what is there is already what it writes (mode and blob id). ``refuse``:
    as for :func:`entry_id`."""
    return _way_clear(root_fd, change.path, removed) or \
        entry_id(root_fd, change.path, object_format, refuse=refuse) == (change.new_mode,
                                                                          change.new_oid)


def entry_id(dir_fd: int, path: bytes, object_format: str, *,
             refuse: Callable[[os.stat_result], bool] | None = None
             ) -> tuple[str, str | None] | None:
    """(git mode, object id) of work-tree entry ``path`` under ``dir_fd`` as git would record
    it: a file's blob, a link's target's blob; a directory is a gitlink with no id, and a file
    or link that changed while read (its size, its kind, or gone) has no id either. None when
    nothing (or something else: a fifo, a socket) is there. Raises :class:`OSError` ``EFBIG``,
    nothing read, for a file whose ``lstat`` ``refuse`` is true of (a sparse file of
    terabytes: minutes of reading zeros)."""
    with dirfd.parent(dir_fd, path) as found:
        if found is None:
            return None
        fd, leaf = found
        try:
            st = os.stat(leaf, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        if stat.S_ISDIR(st.st_mode):
            return GITLINK, None
        if stat.S_ISLNK(st.st_mode):
            try:
                target = os.fsencode(os.readlink(leaf, dir_fd=fd))
            except OSError as exc:
                if exc.errno not in _CHANGED_KIND:
                    raise
                return LINK, None  # no longer a link
            return LINK, object_id(object_format, "blob", target)
        if not stat.S_ISREG(st.st_mode):
            return None
        if refuse is not None and refuse(st):
            raise OSError(errno.EFBIG, "refused as looked at", os.fsdecode(path))
        mode = EXECUTABLE if st.st_mode & 0o100 else "100644"
        try:
            return mode, _file_id(fd, leaf, object_format)
        except OSError as exc:
            if exc.errno not in _CHANGED_KIND:
                raise
            return mode, None  # no longer a file


# What reading an entry meets when it is replaced between its stat and its read (by another
# kind, or by nothing): a link (ELOOP, O_NOFOLLOW), a directory (EISDIR), a file (EINVAL,
# readlink), nothing (ENOENT).
_CHANGED_KIND = (errno.ELOOP, errno.EISDIR, errno.EINVAL, errno.ENOENT)


def store_entry(git: Git, spool: Path, dir_fd: int, name: str | bytes, *,
                accept: Callable[[os.stat_result], bool] | None = None) -> tuple[str, str]:
    """(git mode, blob id) of file or link ``name`` of ``dir_fd``, written into ``git``'s
    repository itself (never skipped for the workspace's objects claiming it): read through a
    descriptor (never by path, no link followed), streamed through a file of ``spool``
    (watcherd's; never whole in memory), as large as it was when opened; ``accept``: asked
    with the opened file's status (not a path's: it may be swapped or grown meanwhile). Raises
    :class:`OSError` when ``accept`` refuses it, or when it is
    missing, unreadable, or neither a file nor a link."""
    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    if stat.S_ISLNK(st.st_mode):
        target = os.fsencode(os.readlink(name, dir_fd=dir_fd))
        return LINK, git.out("hash-object", "-w", "--stdin", input=target)
    if not stat.S_ISREG(st.st_mode):
        raise OSError(errno.EINVAL, "neither a file nor a link", os.fsdecode(name))
    mode = EXECUTABLE if st.st_mode & 0o100 else "100644"
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    copy = spool / f"entry-{os.getpid()}-{threading.get_ident()}"
    try:
        with os.fdopen(fd, "rb") as f_in, open(copy, "wb") as f_out:
            opened = os.fstat(f_in.fileno())
            if accept is not None and not accept(opened):
                raise OSError(errno.EFBIG, "refused as opened", os.fsdecode(name))
            _copy_data(f_in.fileno(), f_out.fileno(), opened.st_size)
        return mode, git.out("hash-object", "-w", "--no-filters", "--", str(copy))
    finally:
        copy.unlink(missing_ok=True)


def _copy_data(src: int, dst: int, size: int | None = None) -> None:
    """Copy file ``src`` into the empty file ``dst``, holes kept as holes (lseek(2),
    ``SEEK_DATA``/``SEEK_HOLE``): a sparse file of terabytes the agent made costs watcherd's disk
    what it holds, not its size. Where the filesystem cannot tell, every byte is copied.
    ``size``: bytes copied at most (the file as it was when checked; it may grow meanwhile)."""
    size = os.fstat(src).st_size if size is None else size
    pos = 0
    while pos < size:
        try:
            start = os.lseek(src, pos, os.SEEK_DATA)
            end = os.lseek(src, start, os.SEEK_HOLE)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                break  # no data after pos: the rest is a hole
            if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                raise
            start, end = pos, size
        if start >= size:
            break
        end = min(end, size)
        while start < end:
            chunk = os.pread(src, min(_CHUNK, end - start), start)
            if not chunk:
                break
            os.pwrite(dst, chunk, start)
            start += len(chunk)
        pos = end
    os.ftruncate(dst, size)


def _file_id(dir_fd: int, name: bytes | str, object_format: str) -> str | None:
    """The blob id of regular file ``name``, or None when it changed size while read."""
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        h = hashlib.new(object_format)
        h.update(b"blob %d\0" % size)
        left = size
        while left > 0:
            chunk = f.read(min(left, _CHUNK))
            if not chunk:
                return None
            h.update(chunk)
            left -= len(chunk)
        return h.hexdigest() if not f.read(1) else None


def _way_clear(root_fd: int, path: bytes, removed: set[bytes]) -> bool:
    """True when nothing is at ``path`` and each of its leading directories is a directory,
    absent, or an entry the change removes."""
    fd = os.dup(root_fd)
    try:
        parts = path.split(b"/")
        for i, part in enumerate(parts):
            try:
                st = os.stat(part, dir_fd=fd, follow_symlinks=False)
            except (FileNotFoundError, NotADirectoryError):
                return True
            if i == len(parts) - 1:
                return False
            if not stat.S_ISDIR(st.st_mode):
                return b"/".join(parts[:i + 1]) in removed
            nfd = os.open(part, dirfd.DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nfd
        return True
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.ENOENT):
            return False  # changed under the walk: not clear
        raise
    finally:
        os.close(fd)


@contextmanager
def aside(root_fd: int, rescue_fd: int, rescue: str, n: int, path: bytes
          ) -> Iterator[tuple[int, str] | None]:
    """Where change ``n`` (of ``path``) put what it replaced or removed: (directory
    descriptor, name), in the rescue directory, or beside ``path`` where that is on another
    filesystem; None when neither holds anything. A ``.new`` name is an entry a kill caught
    between its writing and its exchange: either the new content or what it replaced (``.old``:
    the link that keeps it where the filesystem cannot exchange)."""
    for name in (str(n), f"{n}.new", f"{n}.new.old"):
        if dirfd.exists(rescue_fd, name):
            yield rescue_fd, name
            return
    with dirfd.parent(root_fd, path) as found:
        for name in (f"{rescue}.{n}", f"{rescue}.{n}.new", f"{rescue}.{n}.new.old"):
            if found is not None and dirfd.exists(found[0], name):
                yield found[0], name
                return
        yield None


class Checkout:
    """Apply a list of :class:`Change` to the work tree under ``root_fd``; the blobs come from
    ``git``'s repository through one ``git cat-file --batch``. Use as a context manager. An
    added path already holding what it writes (:func:`entry_id` in ``object_format``, files
    ``refuse`` is true of not read) is left as it is.
    ``on_beside`` is called once, before the first entry is put aside beside its path (a
    directory on another filesystem than the root): the caller's journal must say so."""

    def __init__(self, git: Git, root_fd: int, rescue_fd: int, rescue: str,
                 on_beside: Callable[[], None], *, object_format: str = "sha1",
                 refuse: Callable[[os.stat_result], bool] | None = None) -> None:
        self._git, self._root, self._rescue_fd, self._rescue = git, root_fd, rescue_fd, rescue
        self._on_beside, self._beside = on_beside, False
        self._format, self._refuse = object_format, refuse
        self._cat = None
        self._buf = bytearray()

    def __enter__(self) -> Checkout:
        self._cat = self._git.popen("cat-file", "--batch")
        return self

    def __exit__(self, *exc) -> None:
        proc, self._cat = self._cat, None
        try:
            proc.stdin.close()
            proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()

    def apply(self, changes: list[Change]) -> None:
        """Removals first (deepest first), then the directories they emptied that the new tree
        does not need, then every write in path order; change ``i``'s old entry is left
        :func:`aside` as ``i``. Raises :class:`Blocked` (what was done stays done, and aside)
        or :class:`OSError`."""
        needed = {p for c in changes if not c.removed for p in leading(c.path)}
        emptied: set[bytes] = set()
        order = sorted(range(len(changes)), key=lambda i: -changes[i].path.count(b"/"))
        for i in order:
            if changes[i].removed:
                self._remove(i, changes[i])
                emptied.update(leading(changes[i].path))
        for d in sorted(emptied - needed, key=lambda p: -p.count(b"/")):
            with dirfd.parent(self._root, d) as found:
                if found is not None:
                    try:
                        os.rmdir(found[1], dir_fd=found[0])
                    except OSError:
                        pass  # holds what the old tree did not (ignored files): it stays
        for i, change in enumerate(changes):
            if not change.removed:
                self._write(i, change)

    def _remove(self, n: int, change: Change) -> None:
        with dirfd.parent(self._root, change.path) as found:
            if found is None:
                return
            fd, leaf = found
            if not dirfd.exists(fd, leaf):
                return
            if dirfd.is_dir(fd, leaf):
                if change.old_mode == GITLINK:
                    try:
                        os.rmdir(leaf, dir_fd=fd)  # git leaves a submodule that holds files
                    except OSError:
                        pass
                return  # a directory where a file was: made since, not the change's to remove
            self._put_aside(n, fd, leaf, change.path)

    def _put_aside(self, n: int, fd: int, leaf: bytes, path: bytes) -> None:
        where, name = self._rescue_fd, str(n)
        dirfd.remove(where, name)
        try:
            os.rename(leaf, name, src_dir_fd=fd, dst_dir_fd=where)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            where, name = fd, self._beside_name(n)
            _unlink(where, name, path)
            os.rename(leaf, name, src_dir_fd=fd, dst_dir_fd=where)
        if dirfd.is_dir(where, name):  # became a directory meanwhile: not the change's
            dirfd.rename_new(where, name, fd, leaf)

    def _beside_name(self, n: int, suffix: str = "") -> str:
        if not self._beside:
            self._on_beside()
            self._beside = True
        return f"{self._rescue}.{n}{suffix}"

    def _write(self, n: int, change: Change) -> None:
        if change.added and change.new_mode != GITLINK:
            try:
                if entry_id(self._root, change.path, self._format, refuse=self._refuse) == \
                        (change.new_mode, change.new_oid):
                    # Already what it writes (an ignored file left as it was saved): its
                    # permissions, links and open readers stay as they are.
                    return
            except OSError:
                pass  # written, what is there put aside, as for any other entry
        *dirs, leaf = change.path.split(b"/")
        fd = self._directory(dirs, change.path)
        try:
            if change.new_mode == GITLINK:  # as git checks a submodule out: a directory
                if dirfd.exists(fd, leaf) and not dirfd.is_dir(fd, leaf):
                    self._put_aside(n, fd, leaf, change.path)
                if not dirfd.exists(fd, leaf):
                    os.mkdir(leaf, 0o777, dir_fd=fd)
                return
            where, new = self._rescue_fd, f"{n}.new"
            dirfd.remove(where, new)
            try:
                self._create(where, new, change)
                self._place(where, new, fd, leaf, change.path)
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
                dirfd.remove(where, new)
                where, new = fd, self._beside_name(n, ".new")
                _unlink(where, new, change.path)
                self._create(where, new, change)
                self._place(where, new, fd, leaf, change.path)
            old = str(n) if where == self._rescue_fd else f"{self._rescue}.{n}"
            if dirfd.exists(where, new):  # what was replaced: kept under the change's number
                if dirfd.is_dir(where, new):
                    self._directory_in_the_way(where, new, fd, leaf, change)
                else:
                    if where == self._rescue_fd:
                        dirfd.remove(where, old)
                    else:
                        _unlink(where, old, change.path)
                    os.rename(new, old, src_dir_fd=where, dst_dir_fd=where)
        finally:
            os.close(fd)

    def _directory_in_the_way(self, where: int, name: str, fd: int, leaf: bytes,
                              change: Change) -> None:
        """The entry exchanged out is a directory: gone if empty, else exchanged back."""
        try:
            os.rmdir(name, dir_fd=where)
        except OSError:
            dirfd.exchange_at(where, name, fd, leaf)
            dirfd.remove(where, name)
            raise Blocked(change.path, "a directory holding files is where the target has a "
                                       "file") from None

    def _place(self, where: int, new: str, fd: int, leaf: bytes, path: bytes) -> None:
        """Put ``new`` at ``leaf``: exchanged with what is there (which is left at ``new``),
        or moved where nothing is."""
        for _ in range(3):
            try:
                if dirfd.exchange_at(where, new, fd, leaf):
                    return
                # No exchange here: keep the old entry by a link, then replace it.
                if where == self._rescue_fd:
                    dirfd.remove(where, f"{new}.old")
                else:
                    _unlink(where, f"{new}.old", path)
                try:
                    os.link(leaf, f"{new}.old", src_dir_fd=fd, dst_dir_fd=where,
                            follow_symlinks=False)
                except (FileNotFoundError, IsADirectoryError, PermissionError):
                    pass
                os.rename(new, leaf, src_dir_fd=where, dst_dir_fd=fd)
                if dirfd.exists(where, f"{new}.old"):
                    os.rename(f"{new}.old", new, src_dir_fd=where, dst_dir_fd=where)
                return
            except FileNotFoundError:
                pass  # nothing at leaf (or our new entry taken): place it where nothing is
            try:
                dirfd.rename_new(where, new, fd, leaf)
                return
            except FileExistsError:
                continue  # made meanwhile: exchange with it
        raise Blocked(path, "an entry kept appearing and disappearing under the rollback")

    def _directory(self, dirs: list[bytes], path: bytes) -> int:
        """A descriptor of the directory ``dirs`` names under the root, each component opened
        without following links and made when missing. Raises :class:`Blocked` when one is a
        file or a link."""
        fd = os.dup(self._root)
        try:
            for part in dirs:
                try:
                    nfd = os.open(part, dirfd.DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    try:
                        os.mkdir(part, 0o777, dir_fd=fd)
                    except FileExistsError:
                        pass
                    nfd = os.open(part, dirfd.DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = nfd
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise Blocked(path, "a file or link is where the target has a directory") \
                    from None
            raise
        return fd

    def _create(self, dir_fd: int, name: str, change: Change) -> None:
        if change.new_mode == LINK:
            os.symlink(self._blob(change.new_oid), name, dir_fd=dir_fd)
            return
        mode = 0o777 if change.new_mode == EXECUTABLE else 0o666  # less the umask, as git
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     mode, dir_fd=dir_fd)
        with os.fdopen(fd, "wb") as out:
            self._blob(change.new_oid, out)

    def _blob(self, oid: str, out=None) -> bytes:
        """Blob ``oid``'s bytes, streamed into ``out`` when given (never whole in memory then)
        (git-cat-file(1), "BATCH OUTPUT": ``<oid> blob <size>``, the body, a newline). Raises
        :class:`OSError` when git has no such blob, or says nothing for the door's timeout (a
        pack file of the workspace's swapped for a FIFO blocks it): it is killed then."""
        cat = self._cat
        cat.stdin.write(f"{oid}\n".encode())
        cat.stdin.flush()
        header = self._read(None).split()
        if len(header) != 3 or header[1] != b"blob" or not header[2].isdigit():
            raise OSError(errno.EIO, f"blob {oid} is not in watcherd's repository: "
                                     f"{b' '.join(header).decode(errors='replace')}")
        left, parts = int(header[2]) + 1, []  # the body, then a newline
        while left > 0:
            chunk = self._read(min(left, _CHUNK))
            left -= len(chunk)
            if left == 0:
                chunk = chunk[:-1]
            if out is None:
                parts.append(chunk)
            else:
                out.write(chunk)
        return b"".join(parts)

    def _read(self, size: int | None) -> bytes:
        """Up to ``size`` bytes of cat-file's answer (a line when None), waiting at most the
        door's timeout for each piece."""
        fd = self._cat.stdout.fileno()
        while (b"\n" not in self._buf) if size is None else not self._buf:
            if not select.select([fd], [], [], self._git.timeout)[0]:
                self._cat.kill()
                raise OSError(errno.ETIMEDOUT, f"git cat-file said nothing for "
                                               f"{self._git.timeout:g}s (a file it reads blocks)")
            data = os.read(fd, _CHUNK)
            if not data:
                raise OSError(errno.EIO, "git cat-file ended in the middle of an answer")
            self._buf += data
        if size is None:
            line, _, rest = bytes(self._buf).partition(b"\n")
            self._buf = bytearray(rest)
            return line
        piece = bytes(self._buf[:size])
        del self._buf[:size]
        return piece


def discard_beside(root_fd: int, rescue: str, paths: list[bytes]) -> None:
    """Remove what :func:`aside` kept beside each of ``paths`` (change ``n`` is ``paths[n]``),
    once the caller has what it needs of it."""
    for n, path in enumerate(paths):
        with dirfd.parent(root_fd, path) as found:
            if found is not None:
                for name in (f"{rescue}.{n}", f"{rescue}.{n}.new", f"{rescue}.{n}.new.old"):
                    try:
                        os.unlink(name, dir_fd=found[0])
                    except (FileNotFoundError, IsADirectoryError, PermissionError):
                        pass


def _unlink(dir_fd: int, name: str, path: bytes) -> None:
    """Make way for watcherd's own entry ``name``: a file or link there goes; a directory (no
    entry of watcherd's) stops the change."""
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except (IsADirectoryError, PermissionError):
        raise Blocked(path, f"a directory is where watcherd keeps what it replaces ({name})") \
            from None


def leading(path: bytes) -> list[bytes]:
    """The leading directories of ``path`` ('/'-separated), outermost first: ``a/b/c`` gives
    ``a``, ``a/b``."""
    parts = path.split(b"/")
    return [b"/".join(parts[:i]) for i in range(1, len(parts))]
