"""What every store backend provides: a few object operations with conditional writes.

The generation logic (manifests, fast-forward checks, pruning) lives above this, in
:mod:`watcherd.generations`, and does not know which backend it has. A backend only has to keep the
promises written on :class:`Store`; ``tests/store_contract.py`` checks every backend against them.

Object names are ``/``-separated paths relative to the store's root (``acme/app/manifest.json``);
:func:`check_name` refuses anything that could escape it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

_NAME_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+-]{0,200}")


@dataclass(frozen=True)
class Blob:
    """A small object read whole, with the version token a conditional write compares against."""

    data: bytes
    version: str


@dataclass(frozen=True)
class ObjectInfo:
    name: str
    size: int


class Store(Protocol):
    """A blob store for one watcherd deployment (a directory, or a bucket and prefix).

    Promises (checked by the contract suite):

    - ``write`` with ``if_version=None`` creates the object only if it does not exist; with a
      version, replaces it only if it still has that version. Otherwise it raises
      :class:`~watcherd.errors.PreconditionFailed` and changes nothing. Of two racing writers
      exactly one wins.
    - ``upload`` creates an immutable object from a local file, only if the name is free, and the
      object is visible only once complete (a reader never sees a partial object under the name).
    - ``download`` streams an object to a local file and returns the byte count;
      :class:`~watcherd.errors.ObjectMissing` when it does not exist.
    - ``read`` returns ``None`` for a missing object; with ``limit``, at most ``limit + 1`` bytes of
      it (more than ``limit`` tells the caller the object is too large, without reading it all);
      ``delete`` of a missing object is not an error.
    - Transient failures raise :class:`~watcherd.errors.StoreUnavailable`, all others
      :class:`~watcherd.errors.StoreError`, with a message that names the object.
    """

    url: str
    #: False when the backend was found to ignore conditional writes (some S3-compatibles):
    #: split-brain protection is then best-effort. ``None`` until probed.
    conditional_writes: bool | None

    def read(self, name: str, *, limit: int | None = None) -> Blob | None: ...

    def write(self, name: str, data: bytes, *, if_version: str | None) -> str: ...

    def upload(self, name: str, path: Path, *, size: int, sha256: str) -> None: ...

    def download(self, name: str, dest: Path) -> int: ...

    def delete(self, name: str) -> None: ...

    def list(self, prefix: str) -> list[ObjectInfo]: ...

    def close(self) -> None: ...


def check_name(name: str) -> str:
    """``name`` if it is a safe relative object name; ValueError otherwise.

    Object names come partly from stored data (a manifest names its bundle), so a hostile manifest
    must not be able to reach ``../other-key`` or an absolute path.
    """
    parts = name.split("/")
    if not name or any(not _NAME_PART.fullmatch(p) for p in parts):
        raise ValueError(f"unsafe object name {name!r}")
    return name
