"""The promises every store backend keeps (see watcherd/store/base.py).

A backend's test module subclasses :class:`StoreContract` and provides a ``store`` fixture; the
same tests then run against a local directory and against S3 over real HTTP.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest

from watcherd.errors import ObjectMissing, PreconditionFailed, StoreError


def _file(tmp_path: Path, name: str, data: bytes) -> tuple[Path, int, str]:
    path = tmp_path / name
    path.write_bytes(data)
    return path, len(data), hashlib.sha256(data).hexdigest()


class StoreContract:
    def test_read_of_a_missing_object_is_none(self, store):
        assert store.read("k/manifest.json") is None

    def test_create_then_read_returns_the_bytes_and_a_version(self, store):
        version = store.write("k/manifest.json", b'{"a": 1}', if_version=None)
        blob = store.read("k/manifest.json")
        assert blob.data == b'{"a": 1}'
        assert blob.version == version

    def test_create_refuses_when_the_object_exists(self, store):
        store.write("k/manifest.json", b"first", if_version=None)
        with pytest.raises(PreconditionFailed):
            store.write("k/manifest.json", b"second", if_version=None)
        assert store.read("k/manifest.json").data == b"first"

    def test_replace_with_the_current_version_succeeds(self, store):
        v1 = store.write("k/manifest.json", b"one", if_version=None)
        v2 = store.write("k/manifest.json", b"two", if_version=v1)
        blob = store.read("k/manifest.json")
        assert blob.data == b"two" and blob.version == v2 and v2 != v1

    def test_replace_with_a_stale_version_is_refused_and_changes_nothing(self, store):
        v1 = store.write("k/manifest.json", b"one", if_version=None)
        store.write("k/manifest.json", b"two", if_version=v1)
        with pytest.raises(PreconditionFailed):
            store.write("k/manifest.json", b"three", if_version=v1)
        assert store.read("k/manifest.json").data == b"two"

    def test_replace_of_a_missing_object_is_refused(self, store):
        v = store.write("k/other.json", b"x", if_version=None)
        with pytest.raises(PreconditionFailed):
            store.write("k/manifest.json", b"y", if_version=v)
        assert store.read("k/manifest.json") is None

    def test_of_racing_replacers_exactly_one_wins(self, store):
        v1 = store.write("k/manifest.json", b"base", if_version=None)
        barrier = threading.Barrier(6)
        outcomes: list[str] = []

        def writer(i: int) -> None:
            barrier.wait()
            try:
                store.write("k/manifest.json", f"writer {i}".encode(), if_version=v1)
                outcomes.append(f"won {i}")
            except PreconditionFailed:
                outcomes.append("lost")

        threads = [threading.Thread(target=writer, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [o for o in outcomes if o.startswith("won")]
        assert len(winners) == 1, outcomes
        assert store.read("k/manifest.json").data == f"writer {winners[0].split()[1]}".encode()

    def test_of_racing_creators_exactly_one_wins(self, store):
        barrier = threading.Barrier(6)
        outcomes: list[str] = []

        def writer(i: int) -> None:
            barrier.wait()
            try:
                store.write("k/manifest.json", f"writer {i}".encode(), if_version=None)
                outcomes.append("won")
            except PreconditionFailed:
                outcomes.append("lost")

        threads = [threading.Thread(target=writer, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert outcomes.count("won") == 1, outcomes

    def test_upload_and_download_round_trip_large_binary(self, store, tmp_path):
        data = os.urandom(12 * 2**20 + 7)
        src, size, sha = _file(tmp_path, "b.bundle", data)
        store.upload("k/bundles/1-abc.bundle", src, size=size, sha256=sha)
        dest = tmp_path / "out"
        assert store.download("k/bundles/1-abc.bundle", dest) == size
        assert hashlib.sha256(dest.read_bytes()).hexdigest() == sha

    def test_upload_never_replaces_an_existing_object(self, store, tmp_path):
        src, size, sha = _file(tmp_path, "a", b"first bundle")
        store.upload("k/bundles/1-a.bundle", src, size=size, sha256=sha)
        src2, size2, sha2 = _file(tmp_path, "b", b"second bundle")
        with pytest.raises(PreconditionFailed):
            store.upload("k/bundles/1-a.bundle", src2, size=size2, sha256=sha2)
        dest = tmp_path / "out"
        store.download("k/bundles/1-a.bundle", dest)
        assert dest.read_bytes() == b"first bundle"

    def test_upload_whose_source_does_not_match_its_checksum_publishes_nothing(self, store, tmp_path):
        src, size, _ = _file(tmp_path, "a", b"bytes that changed")
        with pytest.raises(StoreError):
            store.upload("k/bundles/1-a.bundle", src, size=size, sha256="0" * 64)
        assert [o.name for o in store.list("k/")] == []

    def test_download_of_a_missing_object_raises_object_missing(self, store, tmp_path):
        with pytest.raises(ObjectMissing):
            store.download("k/bundles/nope.bundle", tmp_path / "out")

    def test_delete_removes_and_tolerates_missing(self, store, tmp_path):
        src, size, sha = _file(tmp_path, "a", b"x")
        store.upload("k/bundles/1-a.bundle", src, size=size, sha256=sha)
        store.delete("k/bundles/1-a.bundle")
        store.delete("k/bundles/1-a.bundle")
        assert store.list("k/") == []

    def test_list_is_recursive_sorted_and_limited_to_the_prefix(self, store, tmp_path):
        src, size, sha = _file(tmp_path, "a", b"12345")
        store.upload("k/bundles/2-b.bundle", src, size=size, sha256=sha)
        store.upload("k/bundles/1-a.bundle", src, size=size, sha256=sha)
        store.write("k/manifest.json", b"{}", if_version=None)
        store.write("k2/manifest.json", b"{}", if_version=None)
        listed = store.list("k/")
        assert [o.name for o in listed] == ["k/bundles/1-a.bundle", "k/bundles/2-b.bundle",
                                             "k/manifest.json"]
        assert listed[0].size == 5

    @pytest.mark.parametrize("name", ["../escape", "/abs/manifest.json", "k/../../x", "k//x", "",
                                      "k/.hidden", "k/sp ace"])
    def test_unsafe_names_are_refused(self, store, name):
        with pytest.raises(StoreError):
            store.write(name, b"x", if_version=None)
        with pytest.raises(StoreError):
            store.read(name)
