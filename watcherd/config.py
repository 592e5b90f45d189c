"""The configuration: one TOML file, every key overridable from the environment, strictly checked.

Precedence, highest first: ``WATCHERD_<SECTION>_<KEY>`` environment variables, the TOML file
(``--config``, else ``WATCHERD_CONFIG``, else ``/etc/watcherd/watcherd.toml``), the defaults below.
Every value remembers where it came from so ``watcherd config check`` can say so, and every error
names the key and the file or variable it came from.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from watcherd.errors import ConfigError
from watcherd.log import mask_url_credentials
from watcherd.units import format_duration, format_size, parse_duration, parse_size

DEFAULT_PATH = Path("/etc/watcherd/watcherd.toml")
DEFAULT_STORE_URL = "file:///var/lib/watcherd/store"
DEFAULT_STATE_DIR = "/var/lib/watcherd/state"

_KEY_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_RESERVED_SEGMENTS = {"bundles", "conflicts", "manifest.json"}
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
# The token travels in an HTTP header and must not be guessable; short values also could not be
# masked in the logs without masking every other occurrence of the same few characters.
_TOKEN = re.compile(r"[!-~]{16,}")
_MIN_TOKEN = 16


# -- value objects ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoreURL:
    """A parsed ``store.url``: ``file:///dir`` or ``s3://bucket/prefix``."""

    scheme: str
    path: Path | None = None  # file
    bucket: str = ""  # s3
    prefix: str = ""  # s3, without leading/trailing slash

    def __str__(self) -> str:
        if self.scheme == "file":
            return f"file://{self.path}"
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"


@dataclass(frozen=True)
class WorkspaceConfig:
    path: Path = Path("/app")
    state_dir: Path = Path(DEFAULT_STATE_DIR)
    mode: str = "shadow"
    author_name: str = "watcherd"
    author_email: str = "watcherd@localhost"


@dataclass(frozen=True)
class WatchConfig:
    quiet_period: float = 2.0
    max_commit_delay: float = 30.0
    idle_timeout: float = 60.0
    max_upload_interval: float = 600.0
    shutdown_timeout: float = 20.0
    backend: str = "auto"


@dataclass(frozen=True)
class S3Config:
    region: str = ""
    endpoint_url: str = ""
    force_path_style: bool = False
    sse: str = ""
    kms_key_id: str = ""
    storage_class: str = ""
    max_attempts: int = 8


@dataclass(frozen=True)
class StoreConfig:
    url: StoreURL = field(default_factory=lambda: parse_store_url(DEFAULT_STORE_URL))
    key: str = "default"
    keep: int = 10
    warn_bundle_size: int = 100 * 2**20
    max_bundle_size: int = 500 * 2**20
    max_increments: int = 50
    max_increment_ratio: float = 0.5
    keep_checkpoints: int = 20
    s3: S3Config = field(default_factory=S3Config)


@dataclass(frozen=True)
class RestoreConfig:
    on_missing: str = "empty"
    template_url: str = ""
    on_conflict: str = "move-aside"


@dataclass(frozen=True)
class ControlConfig:
    listen: str = "127.0.0.1:7781"
    token: str = ""

    @property
    def address(self) -> tuple[str, int] | None:
        """(host, port) to bind or call, None when the endpoint is off."""
        return _split_listen(self.listen) if self.listen else None


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"
    format: str = "auto"


@dataclass(frozen=True)
class Config:
    workspace: WorkspaceConfig = field(default_factory=WorkspaceConfig)
    watch: WatchConfig = field(default_factory=WatchConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    restore: RestoreConfig = field(default_factory=RestoreConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    log: LogConfig = field(default_factory=LogConfig)
    # "section.key" -> "default" | "file <path>" | "env WATCHERD_..."; what config check shows.
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)
    file: Path | None = None


# -- the schema -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Key:
    section: str  # "store.s3"
    name: str
    parse: Callable[[Any], Any]  # raises ValueError with a human reason
    show: Callable[[Any], str] = lambda v: _quoted(v)  # the value as TOML text
    secret: bool = False
    # Environment values are always strings: this turns one into what TOML would have held, so
    # ``parse`` can stay strict about types in the file (``keep = "10"`` is a mistake there).
    from_env: Callable[[str], Any] = lambda s: s

    @property
    def dotted(self) -> str:
        return f"{self.section}.{self.name}"

    @property
    def env(self) -> str:
        return "WATCHERD_" + f"{self.section}_{self.name}".replace(".", "_").upper()


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {_type(value)}")
    return value


def _choice(*allowed: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        s = _string(value)
        if s not in allowed:
            raise ValueError(f"{s!r} is not one of {', '.join(repr(a) for a in allowed)}")
        return s

    return parse


def _duration(value: Any) -> float:
    if not isinstance(value, str):
        raise ValueError(f"expected a duration string like \"2s\" or \"5m\", got {_type(value)}")
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError(f"{value!r} must be longer than zero")
    return seconds


def _size(value: Any) -> int:
    if not isinstance(value, str):
        raise ValueError(f"expected a size string like \"100MiB\", got {_type(value)}")
    n = parse_size(value)
    if n <= 0:
        raise ValueError(f"{value!r} must be larger than zero")
    return n


def _positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected a whole number, got {_type(value)}")
    if value < 1:
        raise ValueError(f"{value} must be 1 or more")
    return value


def _ratio(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"expected a number like 0.5, got {_type(value)}")
    if not 0 < value <= 10:
        raise ValueError(f"{value} must be above 0 and at most 10")
    return float(value)


def _env_float(text: str) -> Any:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"expected a number like 0.5, got {text!r}") from None


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {_type(value)}")
    return value


def _env_int(text: str) -> Any:
    if re.fullmatch(r"\s*-?\d+\s*", text):
        return int(text)
    raise ValueError(f"expected a whole number, got {text!r}")


def _env_bool(text: str) -> bool:
    word = text.strip().lower()
    if word in ("true", "1", "yes", "on"):
        return True
    if word in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"expected true or false (or 1 or 0), got {text!r}")


def _line(value: Any) -> str:
    """A non-empty single-line string: what git accepts as an author name or email."""
    s = _string(value)
    if not s.strip():
        raise ValueError("must not be empty")
    if any(c in s for c in "<>\n\r\0"):
        raise ValueError(f"{s!r} must not contain '<', '>' or line breaks")
    return s


def _token(value: Any) -> str:
    # Never put the value in the message: the CLI prints it, and it is not yet known as a secret.
    s = _string(value)
    if s and not _TOKEN.fullmatch(s):
        raise ValueError(f"must be at least {_MIN_TOKEN} printable ASCII characters without spaces "
                         f"(got {len(s)} characters); e.g. the output of `openssl rand -hex 16`")
    return s


def _path(value: Any) -> Path:
    s = _string(value)
    if not s:
        raise ValueError("must not be empty")
    p = Path(s)
    if not p.is_absolute():
        raise ValueError(f"{s!r} must be an absolute path")
    return p


def _listen(value: Any) -> str:
    s = _string(value)
    if s:
        _split_listen(s)
    return s


def _endpoint(value: Any) -> str:
    s = _string(value)
    if s:
        parts = urlsplit(s)
        if parts.username is not None or parts.password is not None:
            raise ValueError(f"{mask_url_credentials(s)!r}: credentials come from the AWS credential chain, "
                             "never the URL")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{s!r} is not an http(s) URL like \"http://127.0.0.1:9000\"")
    return s


_SCHEMA: tuple[_Key, ...] = (
    _Key("workspace", "path", _path),
    _Key("workspace", "state_dir", _path),
    _Key("workspace", "mode", _choice("shadow", "branch")),
    _Key("workspace", "author_name", _line),
    _Key("workspace", "author_email", _line),
    _Key("watch", "quiet_period", _duration, lambda v: _quoted(format_duration(v))),
    _Key("watch", "max_commit_delay", _duration, lambda v: _quoted(format_duration(v))),
    _Key("watch", "idle_timeout", _duration, lambda v: _quoted(format_duration(v))),
    _Key("watch", "max_upload_interval", _duration, lambda v: _quoted(format_duration(v))),
    _Key("watch", "shutdown_timeout", _duration, lambda v: _quoted(format_duration(v))),
    _Key("watch", "backend", _choice("auto", "inotify", "watchdog")),
    _Key("store", "url", lambda v: parse_store_url(_string(v))),
    _Key("store", "key", lambda v: validate_store_key(_string(v))),
    _Key("store", "keep", _positive_int, str, from_env=_env_int),
    _Key("store", "warn_bundle_size", _size, lambda v: _quoted(format_size(v, exact=True))),
    _Key("store", "max_bundle_size", _size, lambda v: _quoted(format_size(v, exact=True))),
    _Key("store", "max_increments", _positive_int, str, from_env=_env_int),
    _Key("store", "max_increment_ratio", _ratio, lambda v: f"{v:g}", from_env=_env_float),
    _Key("store", "keep_checkpoints", _positive_int, str, from_env=_env_int),
    _Key("store.s3", "region", _string),
    _Key("store.s3", "endpoint_url", _endpoint),
    _Key("store.s3", "force_path_style", _bool, lambda v: str(v).lower(), from_env=_env_bool),
    _Key("store.s3", "sse", _choice("", "AES256", "aws:kms")),
    _Key("store.s3", "kms_key_id", _string),
    _Key("store.s3", "storage_class", _string),
    _Key("store.s3", "max_attempts", _positive_int, str, from_env=_env_int),
    _Key("restore", "on_missing", _choice("empty", "template", "fail")),
    _Key("restore", "template_url", _string),
    _Key("restore", "on_conflict", _choice("move-aside", "fail")),
    _Key("control", "listen", _listen),
    _Key("control", "token", _token, secret=True),
    _Key("log", "level", _choice("debug", "info", "warning", "error")),
    _Key("log", "format", _choice("auto", "json", "console")),
)

_SECTIONS = {"workspace", "watch", "store", "store.s3", "restore", "control", "log"}


def schema() -> tuple[_Key, ...]:
    return _SCHEMA


# -- loading ----------------------------------------------------------------------------------------


def config_path(cli_path: str | None, environ: Mapping[str, str]) -> tuple[Path, bool]:
    """The file to read and whether it was asked for explicitly (then it must exist)."""
    if cli_path:
        return Path(cli_path), True
    if environ.get("WATCHERD_CONFIG"):
        return Path(environ["WATCHERD_CONFIG"]), True
    return DEFAULT_PATH, False


def load(cli_path: str | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Read, merge and validate the configuration; raise :class:`ConfigError` naming the key."""
    environ = os.environ if environ is None else environ
    path, explicit = config_path(cli_path, environ)
    raw: dict[str, Any] = {}
    file_used: Path | None = None
    try:
        present = path.exists()
    except OSError:  # a parent we may not search: let the read below say what is wrong
        present = True
    if present or explicit:
        given_by = "--config" if cli_path else "WATCHERD_CONFIG" if explicit else "the default path"
        raw = _read_toml(path, given_by)
        file_used = path
    return from_mapping(raw, environ, file_used)


def from_mapping(raw: Mapping[str, Any], environ: Mapping[str, str], file: Path | None) -> Config:
    """Validate ``raw`` (the parsed TOML) with the environment's overrides applied."""
    where = f"file {file}" if file else "config"
    flat = _flatten(raw, where)
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    known_env = {k.env: k for k in _SCHEMA}
    _check_env_names(environ, known_env)
    for key in _SCHEMA:
        try:
            if key.env in environ:
                source = f"env {key.env}"
                values[key.dotted] = key.parse(key.from_env(environ[key.env]))
            elif key.dotted in flat:
                source = where
                values[key.dotted] = key.parse(flat[key.dotted])
            else:
                continue
        except ValueError as exc:
            raise ConfigError(f"{key.dotted} ({source}): {exc}") from None
        sources[key.dotted] = source
    for key in _SCHEMA:
        sources.setdefault(key.dotted, "default")
    config = _build(values, sources, file)
    _check_together(config)
    return config


def _read_toml(path: Path, given_by: str) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} (from {given_by}) does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory, not a TOML file") from None
    except PermissionError:
        raise ConfigError(f"config file {path} is not readable (permission denied)") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror or exc}") from None


def _flatten(raw: Mapping[str, Any], where: str) -> dict[str, Any]:
    known = {k.dotted for k in _SCHEMA}
    flat: dict[str, Any] = {}

    def walk(table: Mapping[str, Any], section: str) -> None:
        for name, value in table.items():
            dotted = f"{section}.{name}" if section else name
            if dotted in _SECTIONS and not isinstance(value, dict):
                raise ConfigError(f"{dotted} ({where}): must be a table, written [{dotted}]")
            if isinstance(value, dict):
                if dotted not in _SECTIONS:
                    what = "a key, not a table" if dotted in known else "an unknown section"
                    raise ConfigError(f"{dotted} ({where}): [{dotted}] is {what}"
                                      f"{_suggest(dotted, _SECTIONS) if dotted not in known else ''}")
                walk(value, dotted)
            elif dotted in known:
                flat[dotted] = value
            elif not section:
                raise ConfigError(f"{dotted} ({where}): keys belong in a section such as [store]")
            else:
                raise ConfigError(f"{dotted} ({where}): unknown key{_suggest(dotted, known)}")

    walk(raw, "")
    return flat


def _check_env_names(environ: Mapping[str, str], known_env: Mapping[str, _Key]) -> None:
    """An unknown ``WATCHERD_<SECTION>_...`` variable is an error; so is any other
    ``WATCHERD_...`` close to a setting's name (``WATCHERD_STOR_KEY``): a typo there would
    silently leave the setting at its default. Other ``WATCHERD_`` names are not settings
    (``WATCHERD_CONFIG``; ``WATCHERD_TEST_*`` is the test suite's) and are left alone."""
    import difflib

    prefixes = tuple(
        "WATCHERD_" + s.replace(".", "_").upper() + "_" for s in _SECTIONS
    )
    known = sorted(known_env)
    for name in environ:
        if name in known_env or not name.startswith("WATCHERD_") or name == "WATCHERD_CONFIG" \
                or name.startswith("WATCHERD_TEST_"):
            continue
        if name.startswith(prefixes) or difflib.get_close_matches(name, known, n=1, cutoff=0.8):
            raise ConfigError(f"environment variable {name}: unknown setting"
                              f"{_suggest(name, set(known_env))}")


def _suggest(name: str, known: set[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name, sorted(known), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _build(values: Mapping[str, Any], sources: Mapping[str, str], file: Path | None) -> Config:
    def section(prefix: str) -> dict[str, Any]:
        return {k.rpartition(".")[2]: v for k, v in values.items() if k.rpartition(".")[0] == prefix}

    s3 = S3Config(**section("store.s3"))
    return Config(
        workspace=WorkspaceConfig(**section("workspace")),
        watch=WatchConfig(**section("watch")),
        store=StoreConfig(**section("store"), s3=s3),
        restore=RestoreConfig(**section("restore")),
        control=ControlConfig(**section("control")),
        log=LogConfig(**section("log")),
        sources=dict(sources),
        file=file,
    )


def _check_together(c: Config) -> None:
    """Rules that involve more than one key."""

    def fail(key: str, message: str, *, other: str | None = None) -> None:
        # Blame the key the user actually set: a default is rarely what needs changing.
        if other and c.sources[key] == "default" and c.sources[other] != "default":
            key = other
        raise ConfigError(f"{key} ({c.sources[key]}): {message}")

    if c.store.warn_bundle_size > c.store.max_bundle_size:
        warn = format_size(c.store.warn_bundle_size, exact=True)
        most = format_size(c.store.max_bundle_size, exact=True)
        fail("store.warn_bundle_size", f"store.warn_bundle_size ({warn}) is above "
             f"store.max_bundle_size ({most})", other="store.max_bundle_size")
    if c.watch.max_commit_delay < c.watch.quiet_period:
        delay, quiet = (format_duration(t) for t in (c.watch.max_commit_delay, c.watch.quiet_period))
        fail("watch.max_commit_delay", f"watch.max_commit_delay ({delay}) must not be shorter than "
             f"watch.quiet_period ({quiet})", other="watch.quiet_period")
    if _overlaps(c.workspace.state_dir, c.workspace.path):
        fail("workspace.state_dir", f"workspace.state_dir ({c.workspace.state_dir}) must not be "
             f"inside workspace.path ({c.workspace.path}) or contain it: whatever writes the "
             "workspace could then write watcherd's own state", other="workspace.path")
    if c.store.url.scheme == "file" and c.store.url.path is not None and \
            _overlaps(c.store.url.path, c.workspace.path):
        fail("store.url", f"store.url ({c.store.url}) must not be inside workspace.path "
             f"({c.workspace.path}) or contain it", other="workspace.path")
    if c.restore.on_missing == "template" and not c.restore.template_url:
        fail("restore.template_url", 'restore.template_url must be set when restore.on_missing = "template"',
             other="restore.on_missing")
    if c.store.s3.kms_key_id and c.store.s3.sse != "aws:kms":
        fail("store.s3.kms_key_id", 'store.s3.kms_key_id is only used with store.s3.sse = "aws:kms"',
             other="store.s3.sse")
    address = c.control.address
    if address and not _is_loopback(address[0]) and not c.control.token:
        fail("control.token", f"control.token is required when control.listen ({c.control.listen}) is not a "
             "loopback address: anyone who reaches the port could trigger snapshots",
             other="control.listen")


# -- store URL and key ------------------------------------------------------------------------------


def parse_store_url(text: str) -> StoreURL:
    """``file:///abs/dir`` or ``s3://bucket[/prefix]``; ValueError with the reason otherwise."""
    parts = urlsplit(text)
    shown = mask_url_credentials(text)  # messages are printed and logged: never with a password in them
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"{shown!r}: a store URL holds no credentials (S3 credentials come from "
                         "the AWS credential chain: environment, web identity, instance role)")
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"{shown!r}: a file URL has three slashes, "
                             "like \"file:///var/lib/watcherd/store\"")
        if not parts.path.startswith("/") or parts.query or parts.fragment:
            raise ValueError(f"{shown!r}: use an absolute path, like \"file:///var/lib/watcherd/store\"")
        return StoreURL("file", path=Path(parts.path))
    if parts.scheme == "s3":
        bucket = parts.netloc
        if not _BUCKET.fullmatch(bucket or "") or ".." in bucket:
            raise ValueError(f"{shown!r}: {bucket!r} is not a valid S3 bucket name (3 to 63 "
                             "lowercase letters, digits, '.' and '-')")
        prefix = parts.path.strip("/")
        for seg in prefix.split("/") if prefix else ():
            if seg in ("", ".", ".."):
                raise ValueError(f"{shown!r}: the prefix must not contain empty, '.' or '..' parts")
            if not _KEY_SEGMENT.fullmatch(seg):
                raise ValueError(f"{shown!r}: prefix part {seg!r} may only use letters, digits, "
                                 "'.', '_' and '-' and must start with a letter or digit")
        if parts.query or parts.fragment:
            raise ValueError(f"{shown!r}: an s3 URL is only s3://bucket/prefix")
        return StoreURL("s3", bucket=bucket, prefix=prefix)
    if not parts.scheme:
        raise ValueError(f"{shown!r} has no scheme: use \"file:///dir\" or \"s3://bucket/prefix\"")
    raise ValueError(f"{shown!r}: unknown scheme {parts.scheme!r} (use \"file\" or \"s3\")")


def validate_store_key(key: str) -> str:
    """A workspace key like ``acme/vmcp-123/main``: safe segments, nothing that could escape."""
    if not key:
        raise ValueError("must not be empty")
    if len(key) > 512:
        raise ValueError("is longer than 512 characters")
    if key.startswith("/"):
        raise ValueError(f"{key!r} must be relative, not an absolute path")
    for seg in key.split("/"):
        if seg in ("", ".", ".."):
            raise ValueError(f"{key!r} must not contain empty, '.' or '..' parts")
        if not _KEY_SEGMENT.fullmatch(seg):
            raise ValueError(f"{key!r}: part {seg!r} may only use letters, digits, '.', '_' and '-' "
                             "and must start with a letter or digit")
        if seg in _RESERVED_SEGMENTS:
            raise ValueError(f"{key!r}: {seg!r} is reserved for the store's own layout")
    return key


def _split_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r} is not host:port (e.g. \"127.0.0.1:7781\")")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not host:
        raise ValueError(f"{text!r} has no host (use 127.0.0.1 for loopback only)")
    return host, int(port)


def _overlaps(a: Path, b: Path) -> bool:
    """Whether one of two absolute paths is the other or inside it (as written, and resolved)."""
    for x, y in ((a, b), (Path(os.path.realpath(a)), Path(os.path.realpath(b)))):
        if x == y or x in y.parents or y in x.parents:
            return True
    return False


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _type(value: Any) -> str:
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string",
            list: "a list", dict: "a table"}.get(type(value), type(value).__name__)


# -- showing ----------------------------------------------------------------------------------------


def describe(config: Config) -> list[tuple[str, str, str]]:
    """(key, value as TOML text, source) for every key; secrets masked."""
    rows = []
    for key in _SCHEMA:
        section_obj: Any = config
        for part in key.section.split("."):
            section_obj = getattr(section_obj, part)
        value = getattr(section_obj, key.name)
        text = '"********"' if key.secret and value else mask_url_credentials(key.show(value))
        rows.append((key.dotted, text, config.sources.get(key.dotted, "default")))
    return rows


def _quoted(value: Any) -> str:
    # A JSON string is a valid TOML basic string, control characters and all.
    return json.dumps(str(value), ensure_ascii=False)
