"""Blob stores: a local directory or S3, behind one small interface (:mod:`.base`)."""

from __future__ import annotations

from watcherd.config import StoreConfig
from watcherd.errors import ConfigError
from watcherd.store.base import Blob, ObjectInfo, Store, check_name

__all__ = ["Blob", "ObjectInfo", "Store", "check_backend", "check_name", "open_store"]


def open_store(config: StoreConfig) -> Store:
    """The backend ``config.url`` names. boto3 is imported only for an S3 URL."""
    if config.url.scheme == "file":
        from watcherd.store.local import LocalStore

        assert config.url.path is not None
        return LocalStore(config.url.path)
    return _s3_backend(config)(config.url, config.s3)


def check_backend(config: StoreConfig) -> None:
    """Raise :class:`ConfigError` if this installation cannot open the store ``config.url``
    names, without contacting it (``config check``)."""
    if config.url.scheme == "s3":
        _s3_backend(config)


def _s3_backend(config: StoreConfig) -> type[Store]:
    """The S3 backend, or a ConfigError when the S3 extra is not installed.

    A missing optional dependency is a mistake of the installation that no restart repairs:
    exit status 2 and one line saying what to install, never an ImportError's traceback.
    """
    try:
        from watcherd.store.s3 import S3Store
    except ImportError as exc:
        if exc.name is None or exc.name.partition(".")[0] == "watcherd":
            raise  # watcherd's own module is broken: a bug, keep the traceback
        raise ConfigError(f"s3:// needs the S3 extra: pip install 'watcherd[s3]' (store.url "
                          f"{config.url}; module {exc.name} is not installed)") from None
    return S3Store
