"""The only door to git.

Every git call of watcherd goes through :class:`Git`: no shell, a fixed environment that keeps the
user's global config, pager, prompts and hooks out of the way, ``-c`` options instead of writing the
user's config, and an exit status that is always checked. Callers get text or typed values back.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from watcherd.errors import GitError

# Options that make every call predictable whatever the user's config says: no pager, no prompts,
# no hooks or fsmonitor command (a bundle, a template or the agent's .git/config must never run code
# through us), no automatic gc in the middle of a snapshot, stable quoting of paths in porcelain
# output.
_BASE_OPTIONS = (
    "-c", "core.hooksPath=/dev/null",
    "-c", "core.fsmonitor=false",
    "-c", "commit.gpgSign=false",
    "-c", "tag.gpgSign=false",
    "-c", "protocol.ext.allow=never",
    "-c", "core.quotePath=false",
    "-c", "gc.auto=0",
    "-c", "maintenance.auto=false",
    "-c", "advice.detachedHead=false",
    "-c", "init.defaultBranch=main",
    "-c", "protocol.file.allow=always",
)

_ENV_DROP = ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_OBJECT_DIRECTORY", "GIT_PREFIX",
             "GIT_NAMESPACE", "GIT_CEILING_DIRECTORIES", "GIT_ALTERNATE_OBJECT_DIRECTORIES")


def _base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _ENV_DROP}
    env.update(
        GIT_TERMINAL_PROMPT="0",
        GIT_ASKPASS="/bin/true",
        SSH_ASKPASS="/bin/true",
        GIT_PAGER="cat",
        PAGER="cat",
        LC_ALL="C",
        GIT_OPTIONAL_LOCKS="0",
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


class Git:
    """git bound to one work tree (or a bare repository when ``bare`` is true)."""

    def __init__(self, path: Path, *, bare: bool = False, identity: Identity | None = None) -> None:
        self.path = Path(path)
        self.bare = bare
        self.identity = identity or Identity()
        self._filters: tuple[tuple[int, int] | None, tuple[str, ...]] = (None, ())

    def __repr__(self) -> str:
        return f"Git({str(self.path)!r})"

    # -- running ---------------------------------------------------------------------------------

    def run(
        self,
        *args: str,
        input: bytes | None = None,
        env: Mapping[str, str] | None = None,
        check: bool = True,
        timeout: float | None = None,
        ok: Sequence[int] = (0,),
    ) -> Result:
        """Run ``git <args>`` in this repository and return its output.

        ``check`` raises :class:`GitError` unless the exit status is in ``ok``.
        """
        full_env = _base_env()
        full_env.update(
            GIT_AUTHOR_NAME=self.identity.name,
            GIT_AUTHOR_EMAIL=self.identity.email,
            GIT_COMMITTER_NAME=self.identity.name,
            GIT_COMMITTER_EMAIL=self.identity.email,
        )
        if env:
            full_env.update(env)
        argv = ("git", *self._options(), *self._work_tree(args), *args)
        try:
            proc = subprocess.run(
                argv,
                cwd=self.path,
                input=input,
                capture_output=True,
                env=full_env,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise GitError(f"git {_show(args)} in {self.path} timed out after {timeout:g}s") from exc
        except FileNotFoundError as exc:
            if not self.path.is_dir():
                raise GitError(f"{self.path} is not a directory") from exc
            raise GitError("git is not installed (no 'git' on PATH)") from exc
        result = Result(tuple(args), proc.returncode, proc.stdout, proc.stderr)
        if check and proc.returncode not in ok:
            raise GitError(_failure(self.path, args, proc.returncode, proc.stderr))
        return result

    def out(self, *args: str, **kwargs) -> str:
        """Run and return stdout as stripped text."""
        return self.run(*args, **kwargs).text

    def popen(self, *args: str, env: Mapping[str, str] | None = None) -> subprocess.Popen:
        """Start a long-lived git process with pipes (e.g. ``check-ignore --stdin``)."""
        full_env = _base_env()
        if env:
            full_env.update(env)
        try:
            return subprocess.Popen(
                ("git", *self._options(), *self._work_tree(args), *args),
                cwd=self.path,
                env=full_env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
        except FileNotFoundError as exc:
            if not self.path.is_dir():
                raise GitError(f"{self.path} is not a directory") from exc
            raise GitError("git is not installed (no 'git' on PATH)") from exc

    def _work_tree(self, args: Sequence[str]) -> tuple[str, ...]:
        """``--work-tree`` for commands in an existing work tree.

        The workspace's config is the agent's to write: ``core.worktree`` pointed at another
        directory would have our ``git add --all`` snapshot it (the sidecar's own files, its service
        account token) into a bundle, and ``core.bare`` would stop every snapshot. ``init`` and
        ``clone`` refuse the option, and need no protection.
        """
        if self.bare or (args[:1] and args[0] in ("init", "clone")) \
                or not (self.path / ".git").exists():
            return ()
        return (f"--work-tree={self.path.absolute()}",)

    def _options(self) -> tuple[str, ...]:
        # The workspace is often a volume owned by another uid (a Kubernetes emptyDir is root's);
        # git would refuse it as "dubious ownership". We were told to work on exactly this path.
        return (*_BASE_OPTIONS, "-c", f"safe.directory={self.path.absolute()}", *self._no_filters())

    def _no_filters(self) -> tuple[str, ...]:
        """``-c`` options that turn off every filter driver the repository's config defines.

        Any git command that reads file contents through the index (``add``, and ``write-tree``
        re-checking a racily clean entry) runs the ``clean`` command of a driver that
        ``.gitattributes`` names, and both are writable by whoever edits the workspace (an agent).
        watcherd holds store credentials, so it must never run their commands; storing the bytes
        as they are is also the faithful choice (an LFS pointer is not the file). Cached on the
        config file's stat, so it costs one ``git config`` call per change of the config.
        """
        if self.bare:
            return ()
        try:
            st = (self.path / ".git" / "config").stat()
        except OSError:
            return ()  # not a repository yet, or .git is a link file: no config of its own here
        key = (st.st_mtime_ns, st.st_size)
        if self._filters[0] != key:
            proc = subprocess.run(
                ("git", *_BASE_OPTIONS, "-c", f"safe.directory={self.path.absolute()}", "config",
                 "--name-only", "--get-regexp", r"^filter\."),
                cwd=self.path, env=_base_env(), capture_output=True, check=False)
            names = proc.stdout.decode("utf-8", "replace").split()
            drivers = sorted({n.rsplit(".", 1)[0] for n in names if n.count(".") >= 2})
            options = [opt for d in drivers
                       for setting in (f"{d}.clean=", f"{d}.smudge=", f"{d}.process=",
                                       f"{d}.required=false")
                       for opt in ("-c", setting)]
            self._filters = (key, tuple(options))
        return self._filters[1]

    # -- typed questions -------------------------------------------------------------------------

    def is_repo(self) -> bool:
        """True when ``path`` is the top of a git work tree (not merely inside one)."""
        r = self.run("rev-parse", "--show-toplevel", check=False)
        if r.returncode != 0:
            return False
        return Path(r.text).resolve() == self.path.resolve()

    def git_dir(self) -> Path:
        return Path(self.out("rev-parse", "--absolute-git-dir"))

    def rev(self, ref: str) -> str | None:
        """The commit ``ref`` names, or None when it does not exist (e.g. HEAD of an empty repo)."""
        r = self.run("rev-parse", "--verify", "--quiet", "--end-of-options", f"{ref}^{{commit}}",
                     check=False)
        return r.text if r.returncode == 0 and r.text else None

    def has_commit(self, sha: str) -> bool:
        r = self.run("cat-file", "-e", f"{sha}^{{commit}}", check=False)
        return r.returncode == 0

    def head_ref(self) -> str | None:
        """The branch HEAD points at (``refs/heads/main``), or None when HEAD is detached."""
        r = self.run("symbolic-ref", "--quiet", "HEAD", check=False)
        return r.text if r.returncode == 0 else None

    def is_ancestor(self, ancestor: str, descendant: str) -> bool:
        """True when ``ancestor`` is reachable from ``descendant`` (equal counts)."""
        r = self.run("merge-base", "--is-ancestor", ancestor, descendant, check=False, ok=(0, 1))
        if r.returncode == 0:
            return True
        if r.returncode == 1:
            return False
        # 128: one of them is not a commit here, so it cannot be in this history.
        return False

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


def retrying(call, *, attempts: int = 8, first_delay: float = 0.05, lock_hint: str = "index.lock"):
    """Run ``call()`` again while git says another git process holds ``lock_hint``.

    A user's own ``git commit`` and our snapshot can meet on a lock file; waiting a little is the
    polite answer. Any other failure is raised at once.
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


def _show(args: Sequence[str]) -> str:
    return " ".join(args[:4]) + (" ..." if len(args) > 4 else "")


def _failure(path: Path, args: Sequence[str], code: int, stderr: bytes) -> str:
    lines = [w.strip() for w in stderr.decode("utf-8", "replace").splitlines() if w.strip()]
    # git puts the reason on its "fatal:"/"error:" lines and explains below them ("Another git
    # process seems to be running..."): keep the reasons first, then the explanation, briefly.
    reasons = [w for w in lines if w.startswith(("fatal:", "error:"))]
    said = "; ".join((reasons + [w for w in lines if w not in reasons])[:3]) or "no message"
    return f"git {_show(args)} failed in {path} (exit {code}): {said}"
