"""Blob stores: a local directory or S3, behind one small interface (:mod:`.base`)."""

from __future__ import annotations

from watcherd.config import StoreConfig
from watcherd.store.base import Blob, ObjectInfo, Store, check_name

__all__ = ["Blob", "ObjectInfo", "Store", "check_name", "open_store"]


def open_store(config: StoreConfig) -> Store:
    """The backend ``config.url`` names. boto3 is imported only for an S3 URL."""
    if config.url.scheme == "file":
        from watcherd.store.local import LocalStore

        assert config.url.path is not None
        return LocalStore(config.url.path)
    from watcherd.store.s3 import S3Store

    return S3Store(config.url, config.s3)
