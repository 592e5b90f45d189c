"""The local-directory store (``file:///var/lib/watcherd/store``).

Atomicity comes from the filesystem: an object is written to a temp file in the same directory
(for uploads an unnamed one, ``O_TMPFILE``, so a killed upload leaves nothing behind), fsynced,
then published with ``link`` (exclusive: fails if the name exists) or ``rename`` (replace), and the
directory is fsynced. Conditional replaces are serialised by an ``flock`` on a
lock file beside the object, which the kernel releases if the holder dies.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from watcherd.errors import ObjectMissing, PreconditionFailed, StoreError
from watcherd.store.base import Blob, ObjectInfo, check_name

_TMP_PREFIX = ".tmp-"
# Objects are readable by the group: `watcherd restore` may run as the app's uid, a member of
# the daemon's group (the shipped systemd units), and must read what the daemon wrote.
_MODE = 0o640
_LOCK_SUFFIX = ".lock"
_CHUNK = 1 << 20


class LocalStore:
    """A :class:`~watcherd.store.base.Store` in a directory of the local filesystem."""

    conditional_writes: bool | None = True

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.url = f"file://{self.root}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"store {self.url}: cannot create the directory: {exc.strerror}") from exc
        # Read access is enough to restore; a writer that may not write hears it at its first
        # write, naming the object.
        if not os.access(self.root, os.R_OK | os.X_OK):
            raise StoreError(f"store {self.url}: the directory is not readable by this user")
        st = self.root.stat()
        self._identity = (st.st_dev, st.st_ino)

    # -- Store -----------------------------------------------------------------------------------

    def read(self, name: str, *, limit: int | None = None) -> Blob | None:
        path = self._path(name)
        try:
            with open(path, "rb") as f:
                data = f.read() if limit is None else f.read(limit + 1)
                if limit is not None and len(data) > limit:
                    return Blob(data, f"oversized-{os.fstat(f.fileno()).st_size}")
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise self._error("read", name, exc) from exc
        return Blob(data, _version(data))

    def write(self, name: str, data: bytes, *, if_version: str | None) -> str:
        path = self._path(name)
        self._mkdirs(path.parent, name)
        with self._locked(path, name):
            try:
                current = path.read_bytes()
            except FileNotFoundError:
                current = None
            except OSError as exc:
                raise self._error("read", name, exc) from exc
            if if_version is None and current is not None:
                raise PreconditionFailed(f"{self.url}/{name} already exists")
            if if_version is not None and (current is None or _version(current) != if_version):
                raise PreconditionFailed(f"{self.url}/{name} changed since it was read")
            # Under the lock, a temp file of this object is one a killed writer left behind.
            prefix = f"{_TMP_PREFIX}{path.name}-"
            for dead in path.parent.glob(f"{prefix}*"):
                dead.unlink(missing_ok=True)
            with self._temp(path.parent, name, prefix=prefix) as (tmp, f):
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
                os.replace(tmp, path)
            _fsync_dir(path.parent)
        return _version(data)

    def upload(self, name: str, path: Path, *, size: int, sha256: str) -> None:
        dest = self._path(name)
        self._mkdirs(dest.parent, name)
        if dest.exists():
            raise PreconditionFailed(f"{self.url}/{name} already exists")
        with self._temp(dest.parent, name, anonymous=True) as (tmp, f):
            digest = hashlib.sha256()
            written = 0
            try:
                with open(path, "rb") as src:
                    while chunk := src.read(_CHUNK):
                        f.write(chunk)
                        digest.update(chunk)
                        written += len(chunk)
                f.flush()
                os.fsync(f.fileno())
            except OSError as exc:
                raise self._error("write", name, exc) from exc
            if written != size or digest.hexdigest() != sha256:
                raise StoreError(f"{self.url}/{name}: the source changed while uploading "
                                 f"({written} bytes, expected {size}); nothing was published")
            try:
                _link(tmp, dest)  # exclusive publish: never replaces
            except FileExistsError:
                raise PreconditionFailed(f"{self.url}/{name} already exists") from None
            except OSError as exc:
                raise self._error("write", name, exc) from exc
        _fsync_dir(dest.parent)

    def download(self, name: str, dest: Path) -> int:
        path = self._path(name)
        try:
            with open(path, "rb") as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out, _CHUNK)
                return out.tell()
        except FileNotFoundError:
            if not path.exists():
                raise ObjectMissing(f"{self.url}/{name} does not exist") from None
            raise
        except OSError as exc:
            raise self._error("download", name, exc) from exc

    def delete(self, name: str) -> None:
        path = self._path(name)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise self._error("delete", name, exc) from exc
        _fsync_dir(path.parent)

    def list(self, prefix: str) -> list[ObjectInfo]:
        base = self._path(prefix.rstrip("/")) if prefix.strip("/") else self.root
        found = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for fn in filenames:
                if fn.startswith(".") or fn.endswith(_LOCK_SUFFIX):
                    continue
                full = Path(dirpath, fn)
                rel = full.relative_to(self.root).as_posix()
                try:
                    found.append(ObjectInfo(rel, full.stat().st_size))
                except FileNotFoundError:
                    continue  # deleted while listing
        return sorted(found, key=lambda o: o.name)

    def close(self) -> None:
        pass

    # -- helpers ---------------------------------------------------------------------------------

    def _path(self, name: str) -> Path:
        try:
            check_name(name)
        except ValueError as exc:
            raise StoreError(f"{self.url}: {exc}") from None
        return self.root / name

    def _mkdirs(self, directory: Path, name: str) -> None:
        self._check_root()
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise self._error("create a directory for", name, exc) from exc

    def _check_root(self) -> None:
        """Refuse to write into a store directory that is not the one opened: a removed directory
        or an unmounted volume must not be quietly recreated on the disk beneath it."""
        try:
            st = self.root.stat()
            same = (st.st_dev, st.st_ino) == self._identity
        except FileNotFoundError:
            same = False
        if not same:
            raise StoreError(f"store {self.url}: the directory vanished or was replaced (removed, "
                             "or its volume unmounted) since watcherd opened it; not recreating "
                             "it. Put the store back (or restart watcherd to start a new store "
                             "there)")

    @contextmanager
    def _locked(self, path: Path, name: str) -> Iterator[None]:
        lock_path = path.with_name("." + path.name + _LOCK_SUFFIX)
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, _MODE)
        except OSError as exc:
            raise self._error("lock", name, exc) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    @contextmanager
    def _temp(self, directory: Path, name: str, *, prefix: str = _TMP_PREFIX,
              anonymous: bool = False) -> Iterator[tuple[str, object]]:
        """A temp file in ``directory``; ``anonymous``: one with no name until it is linked.

        A bundle upload killed half way must not leave megabytes under a temp name that nothing
        removes: with ``O_TMPFILE`` the kernel frees the file when its writer dies.
        """
        fd = _anonymous_file(directory) if anonymous else None
        if fd is not None:
            tmp = f"/proc/self/fd/{fd}"  # _link(tmp, dest) gives it its one and only name
        else:
            try:
                fd, tmp = tempfile.mkstemp(prefix=prefix, dir=directory)
            except OSError as exc:
                raise self._error("write", name, exc) from exc
        try:
            os.fchmod(fd, _MODE)  # mkstemp's 0600, or the umask, would keep the group out
            with os.fdopen(fd, "wb") as f:
                try:
                    yield tmp, f
                except OSError as exc:
                    raise self._error("write", name, exc) from exc
        finally:
            try:
                if not tmp.startswith("/proc/"):
                    os.unlink(tmp)
            except FileNotFoundError:
                pass

    def _error(self, action: str, name: str, exc: OSError) -> StoreError:
        reason = exc.strerror or str(exc)
        hint = {
            errno.ENOSPC: " (the store's disk is full: free space or lower store.keep)",
            errno.EDQUOT: " (disk quota exceeded)",
            errno.EACCES: " (permission denied: check the owner of the store directory)",
            errno.EROFS: " (the store is on a read-only filesystem)",
        }.get(exc.errno or 0, "")
        return StoreError(f"cannot {action} {self.url}/{name}: {reason}{hint}")


def _version(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _link(src: str, dest: Path) -> None:
    """``link(2)`` that also names an ``O_TMPFILE`` file given as ``/proc/self/fd/N``."""
    if not src.startswith("/proc/"):
        os.link(src, dest)
        return
    # os.link calls link(2), which links the /proc symlink itself (EXDEV) unless a directory fd
    # makes it use linkat(2) with AT_SYMLINK_FOLLOW: that links the open file.
    dirfd = os.open(dest.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.link(src, dest.name, dst_dir_fd=dirfd, follow_symlinks=True)
    finally:
        os.close(dirfd)


def _anonymous_file(directory: Path) -> int | None:
    """An unnamed file in ``directory`` (``O_TMPFILE``); None where the filesystem has none."""
    if not hasattr(os, "O_TMPFILE") or not os.path.isdir("/proc/self/fd"):
        return None
    try:
        return os.open(directory, os.O_TMPFILE | os.O_WRONLY, _MODE)
    except OSError:
        return None  # not supported here: a named temp file, as everywhere else


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
