"""The only door to git.

Every git call of watcherd goes through :class:`Git`: no shell, an explicit repository
(``--git-dir``, never discovered from the working directory), an environment built from an
allowlist (no credentials, no inherited ``GIT_*``, no system or global config, ``HOME`` in
watcherd's state directory), ``-c`` options that turn off everything in git that can run a program
or open a connection, a timeout on every call, and an exit status that is always checked.

The repository is watcherd's own (in ``workspace.state_dir``) or one watcherd just created (a
restore's staging tree): a config only watcherd writes. The one exception is ``branch`` mode, which
commits on the user's branch and so must run git in the workspace itself; :func:`for_workspace`
builds that door, for trusted workspaces only.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from watcherd.errors import GitError

#: Seconds a git call may take unless the caller says otherwise. A wedged git (an object file that
#: is a FIFO, a hung filesystem) ends as a GitError instead of holding the daemon for ever.
DEFAULT_TIMEOUT = 60.0
#: Seconds between the checks of a git call given a ``stalled`` check (:meth:`Git.run`).
STALL_CHECK = 1.0

# What every call runs with, whatever a repository's config says. Most of it only matters for a
# repository watcherd did not write (a bundle's refs, branch mode's workspace), but it costs
# nothing and keeps each promise in one place: no hooks, no fsmonitor command, no connection
# (protocol.allow=never; a call that must fetch allows one protocol for itself), no submodule
# recursion, no lazy fetch, no signing program, no automatic gc, exact names (case-sensitive, no
# Unicode folding), raw bytes (no CRLF conversion), no caches or index formats that read state
# outside the index file.
_BASE_OPTIONS = (
    "-c", "core.hooksPath=/dev/null",
    "-c", "core.fsmonitor=false",
    "-c", "core.untrackedCache=false",
    "-c", "core.splitIndex=false",
    "-c", "index.sparse=false",
    "-c", "core.sparseCheckout=false",
    "-c", "core.ignoreCase=false",
    "-c", "core.precomposeUnicode=false",
    "-c", "core.autocrlf=false",
    "-c", "core.safecrlf=false",
    "-c", "core.symlinks=true",
    "-c", "core.fileMode=true",
    "-c", "core.quotePath=false",
    "-c", "protocol.allow=never",
    "-c", "fetch.recurseSubmodules=false",
    "-c", "submodule.recurse=false",
    "-c", "credential.helper=",
    "-c", "commit.gpgSign=false",
    "-c", "tag.gpgSign=false",
    "-c", "gc.auto=0",
    "-c", "maintenance.auto=false",
    "-c", "advice.detachedHead=false",
    "-c", "init.defaultBranch=main",
    # Every repository git is pointed at is named explicitly; ownership checks guard discovery.
    "-c", "safe.directory=*",
)

# The environment variables that may reach git from watcherd's own: what finds programs and what
# says the time zone. Everything else (AWS_*, tokens, GIT_*, XDG_*) stays behind.
_ENV_PASSED = ("PATH", "TZ")


def scrubbed_env(home: Path) -> dict[str, str]:
    """The whole environment of a git child: an allowlist plus fixed settings.

    ``home`` is a directory of watcherd's (git reads ``~/.config/git/*`` from it: nothing there).
    """
    env = {k: os.environ[k] for k in _ENV_PASSED if k in os.environ}
    env.setdefault("PATH", os.defpath)
    env.update(
        HOME=str(home),
        LC_ALL="C",
        GIT_CONFIG_NOSYSTEM="1",
        GIT_CONFIG_GLOBAL="/dev/null",
        GIT_ATTR_NOSYSTEM="1",
        GIT_TERMINAL_PROMPT="0",
        GIT_NO_LAZY_FETCH="1",
        GIT_PROTOCOL_FROM_USER="0",
        GIT_OPTIONAL_LOCKS="0",
        GIT_PAGER="cat",
        PAGER="cat",
        GIT_FLUSH="1",
    )
    return env


@dataclass(frozen=True)
class Result:
    """What a finished git command produced."""

    args: tuple[str, ...]
    returncode: int
    stdout: bytes
    stderr: bytes

    @property
    def text(self) -> str:
        return self.stdout.decode("utf-8", "surrogateescape").strip()


@dataclass(frozen=True)
class Identity:
    """Author and committer of the commits watcherd writes."""

    name: str = "watcherd"
    email: str = "watcherd@localhost"


class GitTimeout(GitError):
    """A git call ran past its timeout and was killed."""


class GitStalled(GitError):
    """A git call was killed early because its caller's ``stalled`` check found why it could
    not finish (:meth:`Git.run`)."""


class LocalIOError(GitError):
    """git failed on the local disk (full, read-only, I/O error): not a property of the data.

    A restore must not take it for a corrupt generation and fall back to an older one.
    """


# How git (through strerror) says the disk, not the data, is at fault.
_LOCAL_IO = ("No space left on device", "Disk quota exceeded", "Input/output error",
             "Read-only file system")


def object_id(fmt: str, kind: str, body: bytes) -> str:
    """The id git gives the ``kind`` object ``body`` in a ``fmt`` ("sha1", "sha256")
    repository: the hash of ``<kind> <size>``, a NUL, then the body (gitformat-loose(5))."""
    algo = hashlib.sha256 if fmt == "sha256" else hashlib.sha1
    return algo(b"%s %d\0" % (kind.encode(), len(body)) + body).hexdigest()


@dataclass(frozen=True)
class Inherited:
    """What each git child gets besides its environment: variables and descriptors
    (``pass_fds``, same numbers in the child), for what only this process holds open (the
    workspace's pack files: :meth:`watcherd.repo.Repo.attach`)."""

    env: Mapping[str, str] = field(default_factory=dict)
    fds: tuple[int, ...] = ()


class Shared:
    """The :class:`Inherited` of every :class:`Git` made from one (:meth:`Git.with_work_tree`,
    ``shared=``), replaced whole, given to the children that read the workspace's objects.
    Children are started under :attr:`lock`, so whoever replaces it and then closes descriptors
    no longer named knows no child is being given them (:meth:`readers_running`)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.current = Inherited()
        self._readers: set[subprocess.Popen] = set()

    def started_reader(self, proc: subprocess.Popen) -> None:
        """Note a child given :attr:`current`. Call under :attr:`lock`."""
        self._readers.add(proc)

    def readers_running(self) -> bool:
        """Whether a child given :attr:`current` (or an earlier one) may still run. Call under
        :attr:`lock`."""
        self._readers = {p for p in self._readers if p.poll() is None}
        return bool(self._readers)


class Git:
    """git bound to one repository (``git_dir``), optionally with a work tree.

    ``home`` is where git's ``HOME`` points (a directory of watcherd's); ``identity`` signs the
    commits; ``timeout`` bounds every call unless a call gives its own.
    """

    def __init__(self, git_dir: Path, *, home: Path, work_tree: Path | None = None,
                 identity: Identity | None = None, timeout: float = DEFAULT_TIMEOUT,
                 options: Sequence[str] = (), shared: Shared | None = None,
                 workspace_objects: bool = False) -> None:
        self.git_dir = Path(git_dir)
        self.work_tree = Path(work_tree) if work_tree is not None else None
        self.home = Path(home)
        self.identity = identity or Identity()
        self.timeout = timeout
        self._options = tuple(options)
        self.shared = shared or Shared()
        self.workspace_objects = workspace_objects

    def __repr__(self) -> str:
        return f"Git({str(self.git_dir)!r}, work_tree={str(self.work_tree) if self.work_tree else None!r})"

    def with_work_tree(self, work_tree: Path | None) -> Git:
        """The same repository with another (or no) work tree."""
        return Git(self.git_dir, home=self.home, work_tree=work_tree, identity=self.identity,
                   timeout=self.timeout, options=self._options, shared=self.shared,
                   workspace_objects=self.workspace_objects)

    def reading_workspace_objects(self) -> Git:
        """The same repository, whose git children also read the workspace's objects (what
        :class:`Shared` names to them): for reading the user's history, never for writing a
        snapshot (git skips writing an object it finds there, and the workspace's bytes behind
        an id are the agent's)."""
        return Git(self.git_dir, home=self.home, work_tree=self.work_tree,
                   identity=self.identity, timeout=self.timeout, options=self._options,
                   shared=self.shared, workspace_objects=True)

    # -- running ---------------------------------------------------------------------------------

    def argv(self, args: Sequence[str]) -> list[str]:
        where = [f"--git-dir={self.git_dir}"]
        if self.work_tree is not None:
            where.append(f"--work-tree={self.work_tree}")
        return ["git", *_BASE_OPTIONS, *self._options, *where, *args]

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        env = scrubbed_env(self.home)
        env.update(
            GIT_AUTHOR_NAME=self.identity.name,
            GIT_AUTHOR_EMAIL=self.identity.email,
            GIT_COMMITTER_NAME=self.identity.name,
            GIT_COMMITTER_EMAIL=self.identity.email,
        )
        if extra:
            env.update(extra)
        return env

    def run(
        self,
        *args: str,
        input: bytes | None = None,
        env: Mapping[str, str] | None = None,
        check: bool = True,
        timeout: float | None = None,
        ok: Sequence[int] = (0,),
        stalled: Callable[[int], bool] | None = None,
    ) -> Result:
        """Run ``git <args>`` and return its output.

        ``stalled``: asked, with git's process id, every :data:`STALL_CHECK` seconds while git
        still runs; True kills git at once (a check that finds git blocked on something it will
        never finish, rather than a timeout's whole wait; it paces its own costly looks).

        Raises :class:`GitTimeout` when it runs past ``timeout`` seconds (default: the door's),
        :class:`GitStalled` when ``stalled`` said so, :class:`GitError` when ``check`` and the
        exit status is not in ``ok``.
        """
        limit = self.timeout if timeout is None else timeout
        cwd = self.work_tree if self.work_tree is not None and self.work_tree.is_dir() \
            else self.home
        try:
            code, out, err = _communicate(self.argv(args), cwd, self.env(env), input, limit,
                                          self.shared, self.workspace_objects, stalled)
        except _Stalled:
            raise GitStalled(f"git {_show(args)} was stopped: its caller found it blocked "
                             f"({self.work_tree or self.git_dir})") from None
        if code is None:
            raise GitTimeout(f"git {_show(args)} timed out after {limit:g}s "
                             f"({self.work_tree or self.git_dir})")
        result = Result(tuple(args), code, out, err)
        if check and code not in ok:
            said = _failure(self.work_tree or self.git_dir, args, code, err)
            if any(m.encode() in err for m in _LOCAL_IO):
                raise LocalIOError(said)
            raise GitError(said)
        return result

    def out(self, *args: str, **kwargs) -> str:
        """Run and return stdout as stripped text."""
        return self.run(*args, **kwargs).text

    def popen(self, *args: str, env: Mapping[str, str] | None = None) -> subprocess.Popen:
        """Start a long-lived git process with pipes (``check-ignore --stdin``); the caller owns
        it and must end it. It is registered, so :func:`kill_all` ends it too."""
        cwd = self.work_tree if self.work_tree is not None and self.work_tree.is_dir() \
            else self.home
        return _start(self.argv(args), cwd, self.env(env), self.shared, self.workspace_objects)

    # -- typed questions -------------------------------------------------------------------------

    def rev(self, ref: str) -> str | None:
        """The commit ``ref`` names, or None when it does not exist."""
        r = self.run("rev-parse", "--verify", "--quiet", "--end-of-options", f"{ref}^{{commit}}",
                     check=False)
        return r.text if r.returncode == 0 and r.text else None

    def has_commit(self, sha: str) -> bool:
        r = self.run("cat-file", "-e", f"{sha}^{{commit}}", check=False)
        return r.returncode == 0

    def is_ancestor(self, ancestor: str, descendant: str) -> bool:
        """True when ``ancestor`` is reachable from ``descendant`` (equal counts); False also when
        either is not a commit here."""
        r = self.run("merge-base", "--is-ancestor", ancestor, descendant, check=False)
        return r.returncode == 0

    def cat_objects(self, names: Sequence[str]) -> list[tuple[str, str, bytes] | None]:
        """Each object ``names`` names, in order, read by one ``git cat-file --batch``:
        ``(id, type, body)``, or None for a name that names nothing here (git-cat-file(1),
        "BATCH OUTPUT": ``<id> <type> <size>`` then the body, or ``<name> missing``).

        The names are watcherd's own (object ids, ``<id>:<fixed path>``): none may hold a newline.
        """
        out = self.run("cat-file", "--batch",
                       input="".join(f"{n}\n" for n in names).encode()).stdout
        found: list[tuple[str, str, bytes] | None] = []
        pos = 0
        for _ in names:
            nl = out.index(b"\n", pos)
            header = out[pos:nl].decode("utf-8", "replace").rsplit(" ", 2)
            if len(header) != 3 or not header[2].isdigit():  # "<name> missing", "... ambiguous"
                found.append(None)
                pos = nl + 1
                continue
            size = int(header[2])
            found.append((header[0], header[1], out[nl + 1:nl + 1 + size]))
            pos = nl + 1 + size + 1
        return found

    def is_shallow(self) -> bool:
        return self.out("rev-parse", "--is-shallow-repository") == "true"

    def object_format(self) -> str:
        r = self.run("rev-parse", "--show-object-format", check=False)
        return r.text if r.returncode == 0 and r.text else "sha1"

    def update_ref(self, ref: str, new: str, old: str | None, message: str) -> None:
        """Move ``ref`` to ``new`` only if it still points at ``old`` (None: must not exist)."""
        zero = "0" * len(new)
        self.run("update-ref", "-m", message, ref, new, old or zero)

    def loose_object_count(self) -> int:
        for line in self.out("count-objects", "-v").splitlines():
            name, _, value = line.partition(":")
            if name == "count":
                return int(value)
        return 0


def for_workspace(work_tree: Path, git_dir: Path, *, home: Path,
                  identity: Identity | None = None) -> Git:
    """A door into the workspace's own repository: ``branch`` mode only (trusted workspaces).

    git reads the workspace's config here, so every filter driver it defines is turned off by
    name (``.gitattributes`` could route every file through one): a branch-mode commit stores the
    bytes as they are, and no program of the workspace's runs inside watcherd.
    """
    base = Git(git_dir, home=home, work_tree=work_tree, identity=identity)
    r = base.run("config", "--name-only", "--get-regexp", r"^filter\.", check=False)
    names = r.stdout.decode("utf-8", "replace").split()
    drivers = sorted({n.rsplit(".", 1)[0] for n in names if n.count(".") >= 2})
    options = [opt for d in drivers
               for setting in (f"{d}.clean=", f"{d}.smudge=", f"{d}.process=",
                               f"{d}.required=false")
               for opt in ("-c", setting)]
    return Git(git_dir, home=home, work_tree=work_tree, identity=identity, options=options)


def retrying(call, *, attempts: int = 8, first_delay: float = 0.05, lock_hint: str = "index.lock"):
    """Run ``call()`` again while git says another git process holds ``lock_hint``.

    A user's own ``git commit`` and a branch-mode snapshot can meet on a lock file; waiting a
    little is the polite answer. Any other failure is raised at once.
    """
    delay = first_delay
    for attempt in range(attempts):
        try:
            return call()
        except GitError as exc:
            if lock_hint not in str(exc) or attempt == attempts - 1:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
    raise AssertionError("unreachable")


# -- children ------------------------------------------------------------------------------------

_live: set[subprocess.Popen] = set()
_live_lock = threading.Lock()


def _register(proc: subprocess.Popen) -> None:
    with _live_lock:
        _live.add(proc)
        for done in [p for p in _live if p.poll() is not None]:
            _live.discard(done)


def _not_started(cwd: Path | None) -> GitError:
    """Why git could not start: its directory is gone, or there is no git."""
    if cwd is not None and not os.path.isdir(cwd):
        return GitError(f"git cannot start in {cwd}: the directory does not exist")
    return GitError("git is not installed (no 'git' on PATH)")


def _start(argv: list[str], cwd: Path, env: dict[str, str], shared: Shared,
           workspace_objects: bool) -> subprocess.Popen:
    """Start one git child with pipes, in a session of its own; with ``workspace_objects``,
    given the descriptors and variables ``shared`` holds (a variable the call sets itself
    wins)."""
    with shared.lock:
        given = shared.current if workspace_objects else Inherited()
        try:
            proc = subprocess.Popen(argv, cwd=cwd, env={**given.env, **env}, stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    start_new_session=True, pass_fds=given.fds)
        except FileNotFoundError as exc:
            raise _not_started(cwd) from exc
        _register(proc)
        if workspace_objects:
            shared.started_reader(proc)
    return proc


def _communicate(argv: list[str], cwd: Path, env: dict[str, str], input: bytes | None,
                 timeout: float, shared: Shared, workspace_objects: bool,
                 stalled: Callable[[int], bool] | None = None) -> tuple[int | None, bytes, bytes]:
    """Run one git child to its end, or kill its whole process group after ``timeout``, or
    when ``stalled(pid)`` says so (asked as :meth:`Git.run` says).

    (None, out, err) on a timeout; raises :class:`_Stalled` when stopped as stalled. git's own
    children (``index-pack``, a remote helper) live in the same process group, so they go
    with it.
    """
    proc = _start(argv, cwd, env, shared, workspace_objects)
    deadline = time.monotonic() + timeout
    wait = STALL_CHECK if stalled is not None else timeout
    try:
        while True:
            try:
                # Asked again after a timeout, communicate() goes on where it was: no output is
                # lost and the input is not written twice (subprocess's documentation).
                out, err = proc.communicate(input, timeout=max(0.0, min(
                    wait, deadline - time.monotonic())))
                break
            except subprocess.TimeoutExpired:
                if time.monotonic() >= deadline:
                    _kill(proc)
                    out, err = proc.communicate()
                    return None, out, err
                if stalled is not None and stalled(proc.pid):
                    _kill(proc)
                    proc.communicate()
                    raise _Stalled() from None
    except BaseException:
        _kill(proc)
        proc.wait()
        raise
    finally:
        with _live_lock:
            _live.discard(proc)
    return proc.returncode, out, err


class _Stalled(Exception):
    """:func:`_communicate`'s "stopped: the ``stalled`` check said so"."""


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass


def kill_all() -> int:
    """Kill every git child still running (a shutdown that cannot wait for them); the count."""
    with _live_lock:
        procs = [p for p in _live if p.poll() is None]
    for p in procs:
        _kill(p)
    return len(procs)


def _show(args: Sequence[str]) -> str:
    return " ".join(args[:4]) + (" ..." if len(args) > 4 else "")


def _failure(path: Path, args: Sequence[str], code: int, stderr: bytes) -> str:
    lines = [w.strip() for w in stderr.decode("utf-8", "replace").splitlines() if w.strip()]
    # git puts the reason on its "fatal:"/"error:" lines and explains below them ("Another git
    # process seems to be running..."): keep the reasons first, then the explanation, briefly.
    reasons = [w for w in lines if w.startswith(("fatal:", "error:"))]
    said = "; ".join((reasons + [w for w in lines if w not in reasons])[:3]) or "no message"
    return f"git {_show(args)} failed in {path} (exit {code}): {_printable(said)[:500]}"


def _printable(text: str) -> str:
    """``text`` with control characters escaped: git repeats names that came from the workspace."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
