"""The local-directory backend: the contract suite, plus what only a filesystem has."""

from __future__ import annotations

import pytest

from store_contract import StoreContract
from watcherd.errors import StoreError
from watcherd.store.local import LocalStore


class TestLocalStore(StoreContract):
    @pytest.fixture
    def store(self, tmp_path):
        return LocalStore(tmp_path / "store")


def test_local_store_leaves_no_temp_files_after_a_failed_upload(tmp_path):
    store = LocalStore(tmp_path / "store")
    src = tmp_path / "src"
    src.write_bytes(b"abc")
    with pytest.raises(StoreError):
        store.upload("k/bundles/1-a.bundle", src, size=3, sha256="0" * 64)
    leftovers = [p for p in (tmp_path / "store").rglob("*") if p.is_file()]
    assert leftovers == []


def test_local_store_whose_root_is_a_file_says_so(tmp_path):
    root = tmp_path / "store"
    root.write_text("not a directory")
    with pytest.raises(StoreError, match="cannot create the directory"):
        LocalStore(root)
