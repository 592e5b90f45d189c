"""watcherd's own repository, and everything else of watcherd's, in the state directory.

Per workspace key, ``<workspace.state_dir>/<key>/`` holds::

    repo.git/            the repository: the snapshot history (refs/watcherd/snapshots), its packs,
                         a config only watcherd writes
    workspace-objects/   the workspace's loose objects as git may read them (copies, taken
                         through descriptors and checked against their names)
    packs/<pid>-<token>/ a process's links to the workspace's pack files it holds open
                         (``/proc/self/fd/N``), named to its git children only
    index                the private index of snapshots (the working tree as git sees it)
    nested/<digest>/     the same for each repository nested in the workspace (its repo.git
                         shares this one's objects: its snapshots belong to this history)
    spool/               bundles being written
    lock                 one watcherd process at a time per key (flock)
    pairing.json         which workspace directory this history belongs to
    stored.json          the generation the store last held for it (a vanished store is noticed)
    bad-generations.json the generations the last restore found corrupt (the next save supersedes)
    restore.json         the journal of a restore that is moving trees into place
    home/                HOME of every git child (empty: no user config is read)

Nothing of watcherd's lives under the workspace, so nothing planted there is ever acted on.

The workspace's objects are read, by :attr:`Repo.reader` only (the git calls that copy the
user's history), through ``workspace-objects/``, a directory of watcherd's holding a copy of each
loose object (read through descriptors opened without following links, regular files only,
checked against its name), and through the pack files the process holds open, shown to its own
git children as ``/proc/self/fd/N`` (:meth:`Repo.attach`); both are named to those children in
``GIT_ALTERNATE_OBJECT_DIRECTORIES``, never in an alternates file. So git never reads the
workspace's own ``objects/info/alternates`` (which could chain to another repository) or its
commit-graph, never follows an object, a fan-out directory or ``objects/pack`` swapped for a link
to another repository's, and a FIFO posing as an object (which would block git for ever) is left
out. Every other git call sees watcherd's objects alone: a snapshot writes every blob and tree
from the files themselves, and the user's history is copied in with each object indexed by its
content, as a fetch does (:func:`watcherd.state.copy_objects`): the workspace's bytes behind an
object id are the agent's. A user's ``git gc --prune=now`` cannot break a later save or restore.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import resource
import secrets
import shutil
import stat
import threading
import time
import weakref
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from watcherd import dirfd, log
from watcherd.config import Config
from watcherd.errors import GitError, WorkspaceError
from watcherd.git import Git, Identity, Inherited, LocalIOError, Shared, object_id
from watcherd.manifest import Fork
from watcherd.protocol import BadGenerations
from watcherd.workspace import Layout, is_plain_dir

_log = log.get(__name__)

SNAPSHOT_REF = "refs/watcherd/snapshots"
#: Above this many packs in watcherd's repository, :meth:`Repo.maintain` merges the small ones (a
#: geometric repack), as ``gc.autoPackLimit`` has ``git gc --auto`` do.
AUTO_PACK_LIMIT = 8
# Files above 1 MiB are streamed by `git add` straight into a pack (bulk checkin) and never
# delta-compressed: without it each big blob is written loose, then inflated, delta-searched and
# deflated again by the repack before a bundle (100 MB of new files: the repack alone took 6.7 s
# of a 9.7 s first save). Raw git's fastest way to save big files does the same.
_REPO_OPTIONS = ("-c", "core.bigFileThreshold=1m")
_FANOUT = tuple(f"{i:02x}" for i in range(256))
_LINKED = (*_FANOUT, "pack")  # what workspace-objects/ links to, in objects/
_LINKED_SET = frozenset(_LINKED)
# Pack files git reads; ".promisor" (lazy fetch) and ".keep" are of no use to a reader here.
_PACK_SUFFIXES = (".pack", ".idx", ".rev", ".bitmap")
# A loose object larger than git writes loose by default (core.bigFileThreshold: bigger files go
# to a pack) is not copied; and one snapshot inflates at most this much of new loose objects to
# check them (the rest waits for the next; a file counts its size too): a planted zlib bomb
# costs seconds, once (one found wrong is not read again while it is unchanged).
_MAX_LOOSE = 512 << 20
_INFLATE_BUDGET = 1 << 30
# Where a git child finds the descriptors it was given as files of their own (Linux's procfs: each
# open is a new open file of the same inode; BSD's /dev/fd would share one file offset).
_FD_DIR = "/proc/self/fd"
#: Descriptors of the workspace's pack files (``.idx``, ``.pack``, ``.rev``: 2 or 3 a pack) the
#: whole process holds open at most, for its repository and every nested one together (git's own
#: reader bounds its ``pack_max_fds`` the same way); never more than a quarter of the soft limit
#: of open files (:meth:`PackBudget.limit`).
PACK_MAX_FDS = 384
_LOOSE = re.compile(r"[0-9a-f]{38}|[0-9a-f]{62}")  # a loose object's name in its fan-out dir
# Files of ours in the state directory are shared with `watcherd restore`, which may run as
# another uid of the same group (the app's): group-writable, not world-readable.
_FILE_MODE = 0o660
_DIR_MODE = 0o2770
# watcherd's repository: group-writable (restore may run as the app's uid), never a gc of git's
# own choosing, no reflogs, reverse indexes for bundles.
_OWN_CONFIG = """[core]
\tsharedRepository = group
\tlogAllRefUpdates = false
[gc]
\tauto = 0
[pack]
\twriteReverseIndex = true
"""


class PackBudget:
    """The descriptors of the workspace's pack files held open in this process, counted against
    one bound for every :class:`Repo`: each repository nested in the workspace has a Repo of its
    own, and hundreds of them holding their packs would take every descriptor the process has
    (then nothing at all could be saved)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.held = 0

    def limit(self) -> int:
        """:data:`PACK_MAX_FDS`, or a quarter of the soft ``RLIMIT_NOFILE`` when that is less."""
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        return PACK_MAX_FDS if soft == resource.RLIM_INFINITY else min(PACK_MAX_FDS, soft // 4)

    def claim(self, count: int) -> bool:
        """Count ``count`` more descriptors as held, if the bound leaves room for them all;
        whether it did."""
        with self._lock:
            if self.held + count > self.limit():
                return False
            self.held += count
            return True

    def release(self, count: int) -> None:
        """Count ``count`` descriptors claimed before as closed."""
        with self._lock:
            self.held -= count


#: The one budget of every Repo of this process.
PACK_BUDGET = PackBudget()


@dataclass(frozen=True)
class Pairing:
    """Which workspace directory the history in the state directory belongs to."""

    path: str
    device: int
    inode: int


class Repo:
    """The state directory of one workspace key, and the git door to its repository.

    ``git`` is bound to the repository with the workspace as its work tree (shadow snapshots add
    the workspace's files through the private index); ``bare`` has no work tree.
    """

    def __init__(self, state_dir: Path, key: str, workspace: Path,
                 identity: Identity | None = None, *, objects: Path | None = None) -> None:
        self.dir = Path(state_dir) / key
        self.shared_objects = objects
        self.workspace = Path(os.path.realpath(workspace))
        self.git_dir = self.dir / "repo.git"
        self.index = self.dir / "index"
        self.spool = self.dir / "spool"
        self.scratch = self.dir / "scratch"  # scratch indexes and packs; each lock() empties it
        self.home = self.dir / "home"
        self.objects_link = self.dir / "workspace-objects"
        self.identity = identity or Identity()
        self.git = Git(self.git_dir, home=self.home, work_tree=self.workspace,
                       identity=self.identity, options=_REPO_OPTIONS, shared=Shared())
        self.bare = self.git.with_work_tree(None)
        # The only view that reads the workspace's objects: the user's history, to copy it.
        self.reader = self.bare.reading_workspace_objects()
        self._linked: dict[str, tuple] = {}
        self._format: str | None = None
        self._ident: str | None = None
        self._packs: dict[str, int] = {}  # the workspace's pack files held open, by name
        self._retired: list[int] = []  # descriptors of packs gone, closed once no git child runs
        self._held: set[int] = set()  # both, claimed from PACK_BUDGET
        # Packs of the workspace PACK_BUDGET left out at the last attach (looked at again at the
        # next one; what was recorded without them is recorded again once they are held).
        self.packs_skipped = 0
        # A Repo dropped without close() (a Cache thrown away) gives its descriptors back.
        weakref.finalize(self, _forget_packs, self._held, self.git.shared)
        self._packs_token: str | None = None
        self._attached = False  # the workspace's objects are named to this Repo's git children
        self._refused_loose: set[tuple] = set()  # loose objects found not to be what they say

    def __repr__(self) -> str:
        return f"Repo({str(self.dir)!r})"

    # -- the repository --------------------------------------------------------------------------

    def ensure_dirs(self) -> None:
        """Create the state directory of this key. Raises :class:`WorkspaceError` when it cannot
        be written (a person must give watcherd a writable ``workspace.state_dir``), or when the
        process is out of file descriptors (said as such)."""
        try:
            for d in (self.dir, self.home, self.spool, self.scratch):
                _mkdir(d)
        except OSError as exc:
            raise _cannot_create(self.dir, exc) from None

    def scratch_file(self, name: str) -> Path:
        """A path in :attr:`scratch` for ``name`` (a scratch index), this thread's own; use it
        under :meth:`lock` only (the next lock removes what a killed process left there)."""
        return self.scratch / f"{name}-{os.getpid()}-{threading.get_ident()}"

    def exists(self) -> bool:
        """Whether the repository has been created (:meth:`ensure`)."""
        return (self.git_dir / "HEAD").exists()

    def ensure(self, object_format: str = "sha1") -> None:
        """Create the state directory and the repository (in ``object_format``, the workspace's)
        if they do not exist yet; see :meth:`ensure_dirs` for the errors."""
        self.ensure_dirs()
        if self.exists():
            return
        try:
            tmp = self.dir / f"repo.git.new-{os.getpid()}"
            _remove(tmp)  # a killed creation's leftover, whatever it is
            # --shared=group from the start: `watcherd restore` may create this repository as
            # the app's uid, and the daemon (another uid of the same group) must write it.
            Git(tmp, home=self.home).run("init", "--bare", "--quiet", "--template=",
                                         "--shared=group", f"--object-format={object_format}",
                                         str(tmp))
            # Appended to what init wrote (a later section's value wins, git-config(1)) rather
            # than four `git config` processes: a restore waits for this repository.
            with open(tmp / "config", "a") as f:
                f.write(_OWN_CONFIG)
            if self.shared_objects is not None:
                # A nested repository's: its objects are the snapshot history's it belongs to.
                shutil.rmtree(tmp / "objects")
                os.symlink(os.path.relpath(self.shared_objects, tmp.parent / self.git_dir.name),
                           tmp / "objects")
            _mkdir(tmp / "info")
            _mkdir(tmp / Path(SNAPSHOT_REF).parent)  # so the first snapshot needs no git
            # The workspace's .gitattributes never change what is stored: raw bytes, no filter,
            # no end-of-line conversion, no working-tree-encoding (info/attributes wins over the
            # tree's own files; gitattributes(5), "precedence").
            _write_atomic(tmp / "info" / "attributes", RAW_ATTRIBUTES.encode())
            try:
                os.rename(tmp, self.git_dir)
            except OSError:
                if not (self.git_dir / "HEAD").exists():
                    raise
                # Another watcherd process of this pod (a daemon starting, a standalone
                # `watcherd snapshot`) created it first: use theirs.
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError as exc:
            raise _cannot_create(self.dir, exc) from None

    def close(self) -> None:
        """Let go of the workspace's pack files held open (once no git child reads them): this
        Repo is not used again (a nested repository that went away)."""
        if self._packs or self._retired:
            self._show_packs({})

    def nested(self, rel: str) -> Repo:
        """The state of the repository nested at ``rel`` ('/'-separated, relative to the
        workspace): a Repo of its own in ``nested/<sha256 of rel>/`` whose repository shares
        this one's objects (its snapshots belong to this history and travel in its bundles)."""
        return Repo(self.dir / "nested", hashlib.sha256(rel.encode("utf-8", "surrogateescape"))
                    .hexdigest()[:32], self.workspace / rel, self.identity,
                    objects=self.git_dir / "objects")

    def object_format(self) -> str:
        if self._format is None:
            self._format = self.bare.object_format()
        return self._format

    def snapshot_head(self) -> str | None:
        """The newest snapshot commit, None before the first one.

        Read from the ref's file: this repository is watcherd's own and its refs are never
        packed (no gc, no pack-refs); git answers only when there is no such file.
        """
        try:
            text = (self.git_dir / SNAPSHOT_REF).read_text().strip()
        except FileNotFoundError:
            if not (self.git_dir / "HEAD").exists():
                return None  # no repository yet (a machine that never snapshotted this key)
            return self.bare.rev(SNAPSHOT_REF)
        except OSError:
            return self.bare.rev(SNAPSHOT_REF)
        return text if len(text) in (40, 64) else self.bare.rev(SNAPSHOT_REF)

    def move_snapshot_head(self, new: str, old: str | None, message: str) -> None:
        """Move ``refs/watcherd/snapshots`` from ``old`` to ``new`` (``git update-ref`` with
        ``old`` as the expected value; None: the ref must not exist).

        A snapshot does this each time, and a git process costs more than the rest of the
        update: when the ref is a loose file with no reflog (``core.logAllRefUpdates`` is false
        here, so git writes none), the file is replaced the way git replaces it: ``<ref>.lock``
        created exclusively (a git updating the ref at the same moment fails on it, as it would
        against another git), the expected value checked under that lock, the lock renamed over
        the ref. Not fsynced, as git does not fsync refs by default. The first snapshot of a
        repository with no ``packed-refs`` is created the same way (under the lock, the ref must
        not exist yet). Anything else (a packed ref, a reflog someone created, a repository
        older than ``refs/watcherd/``) goes through git, which also appends to the reflog.
        ``message`` is the reflog's, when there is one.
        """
        ref = self.git_dir / SNAPSHOT_REF
        if (self.git_dir / "logs" / SNAPSHOT_REF).exists() or (old is None and (
                (self.git_dir / "packed-refs").exists() or not ref.parent.is_dir())):
            self.bare.update_ref(SNAPSHOT_REF, new, old, message)
            return
        lock = ref.with_name(f"{ref.name}.lock")
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        except FileExistsError:
            raise GitError(f"cannot lock ref '{SNAPSHOT_REF}': {lock} exists: another process "
                           "is updating it") from None
        except (FileNotFoundError, NotADirectoryError):
            # refs/watcherd/ is not a directory (any more): git knows what to make of that.
            self.bare.update_ref(SNAPSHOT_REF, new, old, message)
            return
        except OSError as exc:
            raise LocalIOError(f"cannot lock ref '{SNAPSHOT_REF}' in {self.git_dir}: "
                               f"{exc.strerror}") from None
        try:
            try:
                # What git gives a ref with core.sharedRepository = group: the group may write.
                os.fchmod(fd, stat.S_IMODE(os.fstat(fd).st_mode) | 0o660)
                os.write(fd, f"{new}\n".encode())
            finally:
                os.close(fd)
            try:
                current: str | None = ref.read_text().strip()
            except FileNotFoundError:
                current = None
            except IsADirectoryError:  # git removes an empty directory in a ref's way
                current = ""
            if current == "" or (current is None and old is not None):
                lock.unlink()
                self.bare.update_ref(SNAPSHOT_REF, new, old, message)  # packed, gone, odd
                return
            if current != old:
                raise GitError(f"cannot lock ref '{SNAPSHOT_REF}': is at {current} but expected "
                               f"{old}")
            os.rename(lock, ref)
        except OSError as exc:
            lock.unlink(missing_ok=True)
            raise LocalIOError(f"cannot update ref '{SNAPSHOT_REF}' in {self.git_dir}: "
                               f"{exc.strerror}") from None
        except BaseException:
            lock.unlink(missing_ok=True)
            raise

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Serialise watcherd processes on this key (the daemon and a standalone snapshot).

        Under the lock any git lock file in watcherd's repositories (this key's and its nested
        repositories'), and anything in their :attr:`scratch`, is stale by definition: only a
        watcherd process that was killed can have left it, so it is removed (with the
        half-written state files of processes gone, :func:`_left_by_the_killed`). What cannot be
        removed (another uid's, closed to this one) is said once and left: it blocks nothing.
        """
        self.ensure_dirs()
        try:
            fd = os.open(self.dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, _FILE_MODE)
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                raise _out_of_descriptors(exc, f"opening {self.dir / 'lock'}") from None
            # A read-only or full disk: one line that says so (the daemon retries later).
            raise WorkspaceError(f"workspace.state_dir: cannot write watcherd's lock "
                                 f"{self.dir / 'lock'}: {exc.strerror}; nothing can be "
                                 "snapshotted until the state directory is writable") from None
        try:
            _share(fd)
            fcntl.flock(fd, fcntl.LOCK_EX)
            for stale in _left_by_the_killed(self.dir):
                try:
                    _remove(stale)
                except OSError as exc:  # never a reason to stop saving: its name is its own
                    if str(stale) not in _KEPT:
                        _KEPT.add(str(stale))
                        _log.warning("state.stale_file_kept", path=str(stale),
                                     error=exc.strerror, reason="left by a watcherd process "
                                     "that did not finish, and this one cannot remove it")
                    continue
                _log.warning("state.stale_lock_removed", lock=str(stale),
                             reason="left by a watcherd process that did not finish")
            yield
        finally:
            os.close(fd)

    # -- the workspace's objects -----------------------------------------------------------------

    def attach(self, layout: Layout, shallow: tuple[str, ...] = ()) -> str | None:
        """Make the workspace's objects readable to :attr:`reader`'s git children (copies of its
        loose objects, its pack files held open), and its shallow boundary known.

        Returns None when attached, else why the workspace's objects are not read this time
        (no repository, or its ``objects/`` is not a plain directory inside the workspace);
        watcherd's own objects stay readable either way.
        """
        # Named only to the git children of this process that read the user's history
        # (Repo.reader, in GIT_ALTERNATE_OBJECT_DIRECTORIES), never in the alternates file: every
        # other call sees watcherd's own objects alone. An older watcherd wrote the file.
        (self.git_dir / "objects" / "info" / "alternates").unlink(missing_ok=True)
        objects = layout.common_dir / "objects" if layout.common_dir else None
        if objects is None or not is_plain_dir(layout.top, objects):
            self._linked.clear()
            self._attached = False
            self._show_packs({})
            self._write_shallow(())
            if objects is None:
                return layout.problem or "the workspace is not a git repository"
            return f"{objects} is not a plain directory inside the workspace"
        self._attached = True
        self._link_objects(layout.top, objects)
        self._write_shallow(shallow)
        return None

    def _link_objects(self, root: Path, objects: Path) -> None:
        """Bring ``workspace-objects/`` up to date with the workspace's ``objects/``.

        Only the directories whose modification time changed are looked at again: a snapshot pays
        for listing ``objects/`` and an ``lstat`` of each fan-out directory there, then for what
        is new in those that changed, not for every loose object.
        """
        link = self.objects_link
        if link.is_symlink() or not link.is_dir():
            _remove(link)
            _mkdir(link)
            _mkdir(link / "info")
        if self._linked.get("") != (str(objects),):
            self._linked = {"": (str(objects),)}
        present = _present(objects)
        linked = self._linked
        fmt, budget = self.object_format(), [_INFLATE_BUDGET]
        rel = os.fsencode(os.path.relpath(objects, root))
        for name in _LINKED:
            st = present.get(name)
            key = (st.st_ino, st.st_mtime_ns, st.st_mode) if st else None
            if linked.get(name, "unset") == key and not (name == "pack" and self.packs_skipped):
                continue
            dest = link / name
            if name == "pack":
                _remove(dest)  # an older watcherd linked the pack files here by path
                self._open_packs(root, rel + b"/pack")
            else:
                _copy_loose(root, rel + b"/" + name.encode(), dest, fmt, budget,
                            self._refused_loose)
            self._linked[name] = key

    def _open_packs(self, root: Path, rel: bytes) -> None:
        """Hold the workspace's pack files open, and show those very files to this process's
        git children.

        Each pack file is opened through descriptors without following links (regular files
        only; a name seen before keeps its descriptor, pack names never change content), and
        ``packs/<pid>-<token>/pack/<name>`` links to ``/proc/self/fd/<n>``: in a git child
        given descriptor ``n`` (:class:`~watcherd.git.Shared`), the file opened here, whatever
        the workspace's directory holds by the time git reads it (a link to another
        repository's packs swapped in is never followed). That directory reaches the children
        of :attr:`reader` in ``GIT_ALTERNATE_OBJECT_DIRECTORIES``, not in an alternates file:
        another process's children hold other descriptors. A pack gone from the workspace is
        let go once no such child runs (one may still be reading it).

        Every descriptor is claimed from :data:`PACK_BUDGET`, shared with every other Repo of
        the process: the workspace's own repository attaches first in each snapshot, nested
        ones after it. Packs the budget has no room for are left out (``state.packs_skipped``,
        said again only when their number changes) and looked at again at the next attach."""
        found_names: dict[str, int] = {}
        skipped = 0
        if not os.path.isdir(_FD_DIR):
            self._link_packs_by_path(root / os.fsdecode(rel))  # macOS: see docs/security.md
            self._show_packs({})
            return
        with dirfd.opened(root) as rfd, dirfd.parent(rfd, rel + b"/-") as found:
            if found is not None:
                pfd = found[0]
                names = set(os.listdir(pfd))
                # A pack git can use has its index: a lone .pack (or a thousand empty ones) is
                # not opened, nor is a pack of no object. Its reverse index, if any, comes with it.
                packs = sorted(n[:-4] for n in names if n.startswith("pack-") and
                               n.endswith(".idx") and f"{n[:-4]}.pack" in names and
                               _holds_objects(pfd, n[:-4], self.object_format()))
                held: dict[str, dict[str, int]] = {}
                for name, fd in self._packs.items():
                    held.setdefault(name.rsplit(".", 1)[0], {})[name] = fd
                if held.keys() - set(packs):
                    # The packs the workspace dropped go first: what is new may need their share.
                    self._show_packs({name: fd for pack in packs
                                      for name, fd in held.get(pack, {}).items()})
                for pack in packs:
                    opened = held.get(pack) or self._open_pack(
                        pfd, [f"{pack}{suffix}" for suffix in (".idx", ".pack", ".rev")
                              if f"{pack}{suffix}" in names])
                    if opened is None:
                        skipped += 1
                    else:
                        found_names.update(opened)
        if skipped and skipped != self.packs_skipped:
            _log.warning("state.packs_skipped", count=skipped, limit=PACK_BUDGET.limit(),
                         note="watcherd holds this many descriptors of pack files open in all, "
                              "for the workspace's repository first, then each nested one: "
                              "objects only in the packs left out count as missing (a `git gc` "
                              "in the repository merges them)")
        self.packs_skipped = skipped
        self._show_packs(found_names)

    def _open_pack(self, pfd: int, files: list[str]) -> dict[str, int] | None:
        """One pack's ``files`` in directory ``pfd`` (its ``.idx`` and ``.pack``, then its
        ``.rev`` if any), by name, opened without following links, regular files only, each
        descriptor claimed from :data:`PACK_BUDGET`. {} when one of them cannot be opened (a
        link, unreadable, gone: none is held); None when the budget or the process's
        descriptors run out."""
        if not PACK_BUDGET.claim(len(files)):
            return None
        opened: dict[str, int] = {}
        try:
            for name in files:
                opened[name] = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK |
                                       os.O_CLOEXEC, dir_fd=pfd)
                if not stat.S_ISREG(os.fstat(opened[name]).st_mode):
                    raise OSError(errno.EINVAL, "not a regular file")
        except OSError as exc:
            for fd in opened.values():
                os.close(fd)
            PACK_BUDGET.release(len(files))
            return None if exc.errno in (errno.EMFILE, errno.ENFILE) else {}
        self._held.update(opened.values())
        return opened

    def _link_packs_by_path(self, src: Path) -> None:
        """Where no ``/proc/self/fd`` is: link the pack files by path, after checking them."""
        dest = self.objects_link / "pack"
        try:
            with os.scandir(src) as it:
                entries = [e for e in it if e.is_file(follow_symlinks=False)
                           and e.name.endswith(_PACK_SUFFIXES)]
        except OSError:
            return
        _mkdir(dest)
        for e in entries:
            os.symlink(e.path, dest / e.name)

    def _show_packs(self, found_names: dict[str, int]) -> None:
        """Make ``found_names`` (name: descriptor) the pack files this Repo's git children see;
        the descriptors of the others are closed once no child runs."""
        mine = self._packs_dir()
        shown = mine / "pack"
        _mkdir(shown)
        linked = set(os.listdir(shown))
        for name in linked - found_names.keys():
            (shown / name).unlink(missing_ok=True)
        for name in found_names.keys() - linked:
            os.symlink(f"{_FD_DIR}/{found_names[name]}", shown / name)
        retired = [fd for name, fd in self._packs.items() if name not in found_names]
        self._packs = found_names
        shared = self.git.shared
        alternates = ([str(self.objects_link)] if self._attached else []) + \
            ([str(mine)] if found_names else [])
        with shared.lock:  # no child is being started meanwhile
            shared.current = Inherited(
                {"GIT_ALTERNATE_OBJECT_DIRECTORIES": ":".join(alternates)} if alternates else {},
                tuple(sorted(found_names.values())))
            self._retired += retired
            if self._retired and not shared.readers_running():
                _let_go(self._held, self._retired)
                self._retired = []

    def _packs_dir(self) -> Path:
        """This Repo's own directory of links to pack descriptors, made empty the first time;
        those of processes gone for a day are removed then too."""
        if self._packs_token is None:
            self._packs_token = f"{os.getpid()}-{secrets.token_hex(4)}"
            top = self.dir / "packs"
            _mkdir(top)
            for entry in top.iterdir():
                pid = entry.name.split("-")[0]
                try:
                    stale = time.time() - entry.lstat().st_mtime > 86400 and \
                        not (pid.isdigit() and _alive(int(pid)))
                except FileNotFoundError:
                    continue
                if stale:
                    shutil.rmtree(entry, ignore_errors=True)
        return self.dir / "packs" / self._packs_token

    def commit_tree(self, tree: str, parents: list[str], message: str, *,
                    when: int | None = None) -> str:
        """The id of a new commit of ``tree`` with ``parents`` and ``message``, by watcherd's
        identity, at ``when`` (Unix seconds, local time zone; default now): what ``git
        commit-tree TREE -p P... -m MESSAGE`` writes (a loose object, gitformat-commit(5)),
        without starting git for it: on a snapshot's path a git process is a fifth of the cost.
        A parent named twice is one parent, as git has it.
        The identity line is git's own (``git var GIT_COMMITTER_IDENT``, asked once), so names
        are trimmed exactly as the installed git does."""
        if self._ident is None:
            self._ident = self.bare.out("var", "GIT_COMMITTER_IDENT").rsplit(" ", 2)[0]
        ts = int(time.time()) if when is None else when
        off = time.localtime(ts).tm_gmtoff // 60
        stamp = f"{ts} {'-' if off < 0 else '+'}{abs(off) // 60:02d}{abs(off) % 60:02d}"
        body = "".join([f"tree {tree}\n", *(f"parent {p}\n" for p in dict.fromkeys(parents)),
                        f"author {self._ident} {stamp}\n", f"committer {self._ident} {stamp}\n",
                        "\n", message, "" if message.endswith("\n") else "\n"])
        return self._write_loose(b"commit", body.encode())

    def _write_loose(self, kind: bytes, body: bytes) -> str:
        """Write one object into watcherd's repository as git does (Pro Git, "Git Internals -
        Git Objects": ``<kind> <size>`` and a NUL, then the body, deflated and named by its
        hash; written aside, then linked into place); its id."""
        oid = object_id(self.object_format(), kind.decode(), body)
        data = b"%s %d\0" % (kind, len(body)) + body
        fanout = self.git_dir / "objects" / oid[:2]
        final = fanout / oid[2:]
        if final.exists():
            return oid
        _mkdir(fanout)
        tmp = fanout / f"tmp_obj_{os.getpid()}_{threading.get_ident()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o444)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(zlib.compress(data, 1))  # git's core.looseCompression default
            try:
                os.link(tmp, final)
            except FileExistsError:
                pass
        finally:
            tmp.unlink(missing_ok=True)
        return oid

    def _write_shallow(self, shallow: tuple[str, ...]) -> None:
        """The workspace's shallow boundary, less the commits whose parents watcherd fetched."""
        path = self.git_dir / "shallow"
        done = set(self.unshallowed())
        want = "".join(f"{c}\n" for c in shallow if c not in done)
        have = path.read_text() if path.exists() else ""
        if want != have:
            if want:
                _write_atomic(path, want.encode())
            else:
                path.unlink(missing_ok=True)

    def unshallowed(self) -> list[str]:
        """Shallow boundary commits whose history watcherd fetched from ``restore.template_url``."""
        try:
            return json.loads((self.dir / "unshallowed.json").read_text())
        except (OSError, ValueError):
            return []

    def record_unshallowed(self, commits: list[str]) -> None:
        merged = sorted(set(self.unshallowed()) | set(commits))
        _write_atomic(self.dir / "unshallowed.json", json.dumps(merged).encode())

    def size_estimate(self) -> int:
        """Bytes a full bundle of this repository may take at most: its packs and loose objects
        (git-count-objects(1), sizes in KiB)."""
        sizes = dict(line.split(": ", 1) for line in
                     self.bare.out("count-objects", "-v").splitlines() if ": " in line)
        return (int(sizes.get("size", 0)) + int(sizes.get("size-pack", 0))) * 1024

    def maintain(self) -> None:
        """Keep the number of packs bounded: each snapshot that copies objects adds one, and a
        bundle of hundreds of packs is several times slower. A geometric repack (git-repack(1),
        ``--geometric``) merges only the small ones, so its cost follows what is new. Never with
        ``-l``: that would drop the copies of the workspace's objects this history needs."""
        packs = list((self.git_dir / "objects" / "pack").glob("pack-*.pack"))
        if len(packs) <= AUTO_PACK_LIMIT:
            return
        r = self.bare.run("repack", "-d", "-q", "--geometric=2", check=False, timeout=1800)
        if r.returncode != 0:
            _log.warning("state.repack_failed",
                         error=r.stderr.decode("utf-8", "replace").strip()[:300])

    # -- the daemon ------------------------------------------------------------------------------

    def hold_daemon_lock(self) -> int:
        """Take the daemon's lock of this key's state for the life of the process; its fd.

        Raises :class:`WorkspaceError` (naming the holder) when another daemon holds it: two
        daemons on one state directory would race on one history.
        """
        self.ensure_dirs()
        path = self.dir / "daemon.lock"
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, _FILE_MODE))
        # Held through a read-only descriptor: a file open for writing for the daemon's whole
        # life would keep its filesystem from being remounted read-only.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise WorkspaceError(f"another watcherd (pid {self.daemon_running()}) runs on "
                                 f"{self.dir}; one daemon per workspace and key") from None
        _overwrite_inplace(path, f"{os.getpid()}\n".encode())
        return fd

    def daemon_running(self) -> int | None:
        """The pid of the daemon that holds this key's state, None when none runs."""
        try:
            fd = os.open(self.dir / "daemon.lock", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                text = os.read(fd, 32).decode("ascii", "replace").strip()
                return int(text) if text.isdigit() else -1
            return None
        finally:
            os.close(fd)

    # -- what the store held ----------------------------------------------------------------------

    def stored(self) -> tuple[int, str] | None:
        """The generation and snapshot the store last held for this history (as last seen)."""
        try:
            doc = json.loads((self.dir / "stored.json").read_text())
            return int(doc["generation"]), str(doc["snapshot"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def record_stored(self, generation: int, snapshot: str) -> None:
        """Remember what the store holds now. Best effort: the save it follows is done, and a
        read-only or full state disk must not turn it into a failure (the next save rewrites
        it; without it, a vanished store is only not noticed)."""
        if self.stored() == (generation, snapshot):
            return
        try:
            _write_atomic(self.dir / "stored.json",
                          json.dumps({"generation": generation, "snapshot": snapshot}).encode())
        except OSError as exc:
            _log.warning("state.not_written", file=str(self.dir / "stored.json"),
                         error=exc.strerror, note="the save itself is done")

    def bad_generations(self) -> BadGenerations | None:
        """The generations the last restore found corrupt (:mod:`watcherd.protocol`)."""
        try:
            doc = json.loads((self.dir / "bad-generations.json").read_text())
            return BadGenerations(frozenset(int(g) for g in doc["generations"]),
                                  int(doc["current"]),
                                  tuple((int(g), str(r)) for g, r in doc["reasons"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def record_bad_generations(self, bad: BadGenerations) -> None:
        doc = {"generations": sorted(bad.generations), "current": bad.current,
               "reasons": [list(r) for r in bad.reasons],
               "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        _write_atomic(self.dir / "bad-generations.json", json.dumps(doc).encode())

    def clear_bad_generations(self) -> None:
        (self.dir / "bad-generations.json").unlink(missing_ok=True)

    # -- forks and rollbacks -----------------------------------------------------------------------

    def read_journal(self, name: str) -> dict | None:
        """Journal ``name`` of this state directory (what a restore or a rollback was doing
        when it was killed), None when there is none or it does not parse as an object."""
        try:
            doc = json.loads((self.dir / name).read_text())
        except (OSError, ValueError):
            return None
        return doc if isinstance(doc, dict) else None

    def write_journal(self, name: str, doc: dict | None) -> None:
        """Write journal ``name`` whole (None: remove it, the operation is over)."""
        path = self.dir / name
        if doc is None:
            path.unlink(missing_ok=True)
        else:
            _write_atomic(path, json.dumps(doc).encode())

    def forked_from(self) -> Fork | None:
        """Where the restored history came from, when it was forked from another key and not
        saved under this one yet."""
        try:
            doc = json.loads((self.dir / "fork.json").read_text())
            return Fork(str(doc["key"]), int(doc["generation"]), str(doc["snapshot"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def record_fork(self, fork: Fork) -> None:
        _write_atomic(self.dir / "fork.json", json.dumps(
            {"key": fork.key, "generation": fork.generation, "snapshot": fork.snapshot}).encode())

    def clear_fork(self) -> None:
        (self.dir / "fork.json").unlink(missing_ok=True)

    # -- pairing ---------------------------------------------------------------------------------

    def pairing(self) -> Pairing | None:
        try:
            doc = json.loads((self.dir / "pairing.json").read_text())
            return Pairing(str(doc["path"]), int(doc["device"]), int(doc["inode"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def paired_with(self, root: Path) -> bool:
        # (``root`` is the workspace directory, as configured or resolved: its identity counts.)
        """Whether the history here belongs to the workspace directory at ``root`` now.

        The directory's identity (device and inode) is what counts: a workspace replaced by
        another tree (a restore elsewhere, an operator's copy) is not the history's any more,
        while ``rm -rf .git && git init`` inside it still is.
        """
        p = self.pairing()
        if p is None:
            return False
        try:
            st = os.stat(root)
        except OSError:
            return False
        return (p.device, p.inode) == (st.st_dev, st.st_ino)

    def paired_elsewhere(self) -> str | None:
        """The path of another workspace directory this history belongs to, when that directory
        still exists as it was (two workspaces configured with one state directory and key);
        None when the history is this workspace's, unpaired, or its old directory is gone."""
        p = self.pairing()
        if p is None or self.paired_with(self.workspace):
            return None
        try:
            st = os.stat(p.path)
        except OSError:
            return None
        return p.path if (st.st_dev, st.st_ino) == (p.device, p.inode) else None

    def unpair(self) -> None:
        (self.dir / "pairing.json").unlink(missing_ok=True)

    def pair(self) -> None:
        """Record that the history here belongs to the workspace directory as it is now."""
        st = os.stat(self.workspace)
        doc = {"path": str(self.workspace), "device": st.st_dev, "inode": st.st_ino,
               "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        _write_atomic(self.dir / "pairing.json", json.dumps(doc).encode())

    def forget_history(self, reason: str, *, expected: bool = False) -> None:
        """Start a new line of history (the workspace is not this history's any more).

        ``expected`` logs ``state.new_history`` at info instead of warning: restore replacing the
        workspace with a stored generation is the normal case, not a surprise.
        """
        old = self.snapshot_head()
        if old:
            # Kept under another name: nothing watcherd recorded is deleted.
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            self.bare.run("update-ref", f"refs/watcherd/previous/{stamp}", old)
            self.bare.run("update-ref", "-d", SNAPSHOT_REF)
        self.index.unlink(missing_ok=True)
        for name in ("stored.json", "bad-generations.json"):
            (self.dir / name).unlink(missing_ok=True)
        (_log.info if expected else _log.warning)("state.new_history", previous=old, reason=reason)


def open_repo(config: Config) -> Repo:
    """watcherd's state for ``config``'s workspace and store key (nothing is created yet)."""
    ws = config.workspace
    return Repo(ws.state_dir, config.store.key, ws.path, Identity(ws.author_name, ws.author_email))


RAW_ATTRIBUTES = "* -text -filter -ident !eol !working-tree-encoding\n"


def write_private(path: Path, data: bytes) -> None:
    """Write a state file of watcherd's whole or not at all (group-shared, see the module)."""
    _write_atomic(path, data)


def _write_atomic(path: Path, data: bytes) -> None:
    # Unique per thread too: the watcher's thread and a snapshot's may write the same file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, _FILE_MODE)
    try:
        os.fchmod(fd, _FILE_MODE)  # the umask would take the group's write away
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _overwrite_inplace(path: Path, data: bytes) -> None:
    """Overwrite a small file in place (the lock's inode must stay the one that is locked); not
    atomic: a reader may find it empty for a moment, and must take that for "no pid"."""
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
    try:
        _share(fd)
        os.write(fd, data)
    finally:
        os.close(fd)


def _share(fd: int) -> None:
    """Give a state file the group's read and write whatever the umask took (owner only: another
    uid may not chmod it, and need not)."""
    try:
        if os.fstat(fd).st_uid == os.geteuid():
            os.fchmod(fd, _FILE_MODE)
    except OSError:
        pass


def _present(objects: Path) -> dict[str, os.stat_result]:
    """The ``lstat`` of each entry of ``objects`` that ``workspace-objects/`` links to.

    One listing, then an ``lstat`` of what is there (a packed repository has few fan-out
    directories; 256 failing ``lstat`` calls cost ten times more); by name when the directory
    cannot be listed.
    """
    present: dict[str, os.stat_result] = {}
    try:
        with os.scandir(objects) as it:
            names = [e.name for e in it if e.name in _LINKED_SET]
    except (FileNotFoundError, NotADirectoryError):
        return present
    except OSError:
        names = list(_LINKED)  # searchable, not readable: look each one up
    base = f"{objects}{os.sep}"
    for name in names:
        try:
            present[name] = os.lstat(base + name)
        except (FileNotFoundError, NotADirectoryError):
            pass
    return present


def _copy_loose(root: Path, rel: bytes, dest: Path, fmt: str, budget: list[int],
                refused: set[tuple]) -> None:
    """Make ``dest`` hold a copy of each loose object of the workspace's fan-out directory
    ``rel`` (relative to the workspace ``root``) and nothing else: new ones copied, gone ones
    removed. Read through descriptors opened without following links (:mod:`watcherd.dirfd`),
    regular files only: a directory or an object swapped for a link to outside, at any moment,
    is never followed (git reading through a link to the directory would have read, by id,
    another repository's objects). What is not a regular file is left out with a warning (a
    FIFO posing as an object would block git for ever), and so is what is not the object its
    name says (:func:`_object_named`): a sparse file or a hard link under many names costs
    nothing, and a planted object never reaches git as another's."""
    with dirfd.opened(root) as rfd, dirfd.parent(rfd, rel + b"/-") as found:
        if found is None:
            _remove(dest)
            return
        src = found[0]
        names = {n for n in os.listdir(src) if _LOOSE.fullmatch(n)}
        if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
            _remove(dest)
        _mkdir(dest)
        have = set(os.listdir(dest))
        odd: list[str] = []
        bad: list[str] = []
        for name in sorted(names - have):
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                             dir_fd=src)
            except FileNotFoundError:
                continue  # packed meanwhile
            except OSError:
                odd.append(name)  # a link (ELOOP), or unreadable
                continue
            with os.fdopen(fd, "rb") as f_in:
                st = os.fstat(f_in.fileno())
                if not stat.S_ISREG(st.st_mode):
                    odd.append(name)
                    continue
                seen_before = (rel, name, st.st_ino, st.st_size, st.st_mtime_ns)
                if seen_before in refused:
                    continue  # found not to be its object already: not read again
                verdict = _object_named(f_in.fileno(), os.fsdecode(rel[-2:]) + name, fmt, budget)
                if verdict is None:
                    continue  # over this round's inflation budget: looked at again next time
                if not verdict:
                    if len(refused) > 100_000:
                        refused.clear()
                    refused.add(seen_before)
                    bad.append(name)
                    continue
                os.lseek(f_in.fileno(), 0, os.SEEK_SET)
                tmp = dest / f".{name}.tmp"
                with open(tmp, "wb") as f_out:
                    shutil.copyfileobj(f_in, f_out, 1 << 20)
                os.replace(tmp, dest / name)
        for name in have - names:
            (dest / name).unlink(missing_ok=True)
    if odd:
        _log.warning("state.objects_skipped", directory=os.fsdecode(rel), entries=odd[:10],
                     count=len(odd), reason="not regular files: git would block on them or "
                     "follow them, so they are not read (objects in them count as missing)")
    if bad:
        _log.warning("state.objects_skipped", directory=os.fsdecode(rel), entries=bad[:10],
                     count=len(bad), reason="not the object their name says (or over "
                     f"{_MAX_LOOSE >> 20} MiB): not read (objects in them count as missing)")


def _object_named(fd: int, oid: str, fmt: str, budget: list[int]) -> bool | None:
    """Whether file ``fd`` is a loose object whose content hashes to ``oid`` (deflated
    ``<kind> <size>``, a NUL and the body: Pro Git, "Git Internals - Git Objects"), inflated
    in bounded steps: a size over :data:`_MAX_LOOSE`, bytes that do not inflate (a sparse
    file's zeros), or more than the header says are a no at once. None when ``budget`` (bytes
    left to inflate in this round, decreased) would run out first."""
    inflater, digest = zlib.decompressobj(), hashlib.new(fmt)
    header, expected, seen = b"", None, 0
    while not inflater.eof:
        data = inflater.unconsumed_tail or os.read(fd, 1 << 20)
        try:
            out = inflater.decompress(data, 1 << 20)
        except zlib.error:
            return False
        if not data and not out:
            return False  # the file ends before the stream does
        if expected is None:
            header += out
            if b"\0" not in header:
                if len(header) > 64:
                    return False
                continue
            head, _, out = header.partition(b"\0")
            kind, _, size = head.partition(b" ")
            if kind not in (b"blob", b"tree", b"commit", b"tag") or not size.isdigit() or \
                    int(size) > _MAX_LOOSE:
                return False
            expected = int(size)
            # Deflate never grows data by more than a few bytes per block: a file much bigger
            # than what it says it holds is padding (empty blocks), read for nothing.
            stored = os.fstat(fd).st_size
            if stored > expected + expected // 100 + 1024:
                return False
            if max(expected, stored) > budget[0]:
                return None
            budget[0] -= max(expected, stored)
            digest.update(head + b"\0")
        seen += len(out)
        if seen > expected:
            return False
        digest.update(out)
    if inflater.unused_data or os.read(fd, 1):
        return False  # bytes after the stream: git refuses such an object
    return expected is not None and seen == expected and digest.hexdigest() == oid


def _cannot_create(path: Path, exc: OSError) -> WorkspaceError:
    """Why state directory ``path`` could not be created: the directory, unless ``exc`` says the
    process is out of file descriptors."""
    if exc.errno in (errno.EMFILE, errno.ENFILE):
        return _out_of_descriptors(exc, f"creating {path}")
    return WorkspaceError(f"workspace.state_dir: cannot create {path} ({exc.strerror}); "
                          "watcherd keeps its own repository there, give it a writable directory")


def _out_of_descriptors(exc: OSError, doing: str) -> WorkspaceError:
    """The error of ``doing`` (what failed, "creating /x") on EMFILE or ENFILE: the process (or
    the whole system) has no file descriptor left, whatever the state directory is."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return WorkspaceError(f"out of file descriptors while {doing} ({exc.strerror}; this process "
                          f"may open {soft} files): the state directory is not at fault; raise "
                          "watcherd's limit of open files (LimitNOFILE= in systemd, ulimit -n)")


def _let_go(held: set[int], fds: Iterable[int]) -> None:
    """Close pack descriptors ``fds`` of a Repo's ``held``, taken out of it and given back to
    :data:`PACK_BUDGET`."""
    fds = list(fds)
    for fd in fds:
        os.close(fd)
        held.discard(fd)
    PACK_BUDGET.release(len(fds))


def _forget_packs(held: set[int], shared: Shared) -> None:
    """Let go of every pack descriptor of a Repo nobody uses any more: ``held``, no longer
    given to a git child of ``shared``."""
    with shared.lock:
        shared.current = Inherited()
    _let_go(held, held)


def _holds_objects(pfd: int, pack: str, fmt: str) -> bool:
    """Whether pack ``pack`` (its name without a suffix) in directory ``pfd`` may hold an object,
    by the sizes of its ``.pack`` and ``.idx`` (``lstat``: a link is refused when opened). A pack
    of none is its 12-byte header and its hash (gitformat-pack(5)), its index a header, the
    256-entry fan-out table and two hashes (version 1 has no header): an agent's thousand empty
    packs are not worth a descriptor each. False when either file is gone."""
    hash_size = 32 if fmt == "sha256" else 20
    try:
        pack_size = os.stat(f"{pack}.pack", dir_fd=pfd, follow_symlinks=False).st_size
        idx_size = os.stat(f"{pack}.idx", dir_fd=pfd, follow_symlinks=False).st_size
    except OSError:
        return False
    return pack_size > 12 + hash_size and idx_size > 8 + 256 * 4 + 2 * hash_size


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _mkdir(path: Path) -> None:
    try:
        path.mkdir(parents=True)
    except FileExistsError:
        if not path.is_dir() or path.is_symlink():
            raise
        return
    path.chmod(_DIR_MODE)


_KEPT: set[str] = set()  # leftovers this process could not remove, said once each


def _left_by_the_killed(top: Path) -> list[Path]:
    """What a killed watcherd process can leave in the state of the Repo at ``top`` and of its
    nested repositories (``nested/<id>/``, at any depth): git's lock files on the private index
    and on the refs git writes there, every scratch file, and the half-written state files of
    processes gone."""
    git_dir = top / "repo.git"
    ref_lock = git_dir / f"{SNAPSHOT_REF}.lock"
    found = [ref_lock] if os.path.lexists(ref_lock) else []
    found += _entries(top / "scratch")
    for where in (top, git_dir, git_dir / "info"):  # each listed once: this runs at each snapshot
        found += [p for p in _entries(where) if p.name in _STALE_LOCKS or
                  p.name.startswith(_OLDER_SCRATCH) or _dead_tmp(p.name)]
    for nested in _entries(top / "nested"):
        if nested.is_dir() and not nested.is_symlink():
            found += _left_by_the_killed(nested)
    return sorted(found)


_STALE_LOCKS = ("index.lock", "shallow.lock", "packed-refs.lock")
# Where a watcherd before scratch/ kept its scratch files (left by a kill before an upgrade):
# rollback-index-<pid>, rollback-rescue-index-<pid> and config-* in the key's directory,
# index-check-<pid>-<tid> and tmp-copy-* in repo.git.
_OLDER_SCRATCH = ("rollback-index-", "rollback-rescue-index-", "config-", "index-check-",
                  "tmp-copy-")


def _dead_tmp(name: str) -> bool:
    """Whether ``name`` is a file :func:`_write_atomic` was writing (``.NAME.PID.TID.tmp``) for
    a process gone: it writes outside the lock too, so a live one's is its own."""
    parts = name.rsplit(".", 3)
    return name.startswith(".") and name.endswith(".tmp") and len(parts) == 4 and \
        parts[1].isdigit() and not _alive(int(parts[1]))


def _entries(directory: Path) -> list[Path]:
    try:
        return list(directory.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)
