"""The configuration: TOML file, WATCHERD_<SECTION>_<KEY> overrides, strict checks that name the key."""

from __future__ import annotations

import dataclasses
import json
import re
import tomllib
from pathlib import Path

import pytest

from watcherd import config
from watcherd.config import Config
from watcherd.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "config.example.toml"
TOKEN = "tok-3f9a8b7c6d5e4f30"  # long enough to be accepted as control.token


def write(tmp_path: Path, text: str, name: str = "watcherd.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def load_text(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> Config:
    return config.load(str(write(tmp_path, text)), env or {})


def error_for(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text, env)
    message = str(info.value)
    assert "\n" not in message, f"error is not one line: {message!r}"
    return message


def sections(cfg: Config) -> dict[str, object]:
    """Every section of ``cfg``, for a field by field comparison (sources and file left out)."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
            if f.name not in ("sources", "file")}


def flatten(table: dict, prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# -- config.example.toml ----------------------------------------------------------------------------


def test_example_config_has_exactly_the_schema_keys():
    in_example = set(flatten(tomllib.loads(EXAMPLE.read_text())))
    in_schema = {key.dotted for key in config.schema()}
    assert in_example == in_schema


def test_example_config_loads_as_exactly_the_defaults():
    cfg = config.load(str(EXAMPLE), {})
    assert cfg.file == EXAMPLE
    assert sections(cfg) == sections(Config())
    assert set(cfg.sources.values()) == {f"file {EXAMPLE}"}


def test_example_config_says_what_each_key_does_in_a_comment_above_it():
    lines = EXAMPLE.read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"[a-z_0-9]+ = ", line):
            assert lines[i - 1].startswith("# "), f"no comment above {line!r}"


def test_example_config_explains_the_environment_override_names_at_the_top():
    head = EXAMPLE.read_text().split("[workspace]")[0]
    for name in ("WATCHERD_STORE_URL", "WATCHERD_STORE_S3_REGION", "WATCHERD_CONFIG", "--config"):
        assert name in head


def test_example_config_says_keep_counts_the_current_generation():
    text = EXAMPLE.read_text()
    comment = text[:text.index("\nkeep = ")].rsplit("\n", 1)[-1]
    assert "current one included" in comment


def test_defaults_match_the_design():
    cfg = Config()
    assert cfg.workspace.path == Path("/app") and cfg.workspace.mode == "shadow"
    assert (cfg.watch.quiet_period, cfg.watch.max_commit_delay, cfg.watch.idle_timeout,
            cfg.watch.max_upload_interval, cfg.watch.shutdown_timeout) == (2, 30, 60, 600, 20)
    assert str(cfg.store.url) == "file:///var/lib/watcherd/store"
    assert (cfg.store.key, cfg.store.keep) == ("default", 10)
    assert (cfg.store.warn_bundle_size, cfg.store.max_bundle_size) == (100 * 2**20, 500 * 2**20)
    assert cfg.store.s3.max_attempts == 8 and cfg.store.s3.force_path_style is False
    assert (cfg.restore.on_missing, cfg.restore.on_conflict) == ("empty", "move-aside")
    assert cfg.control.listen == "127.0.0.1:7781" and cfg.control.token == ""
    assert (cfg.log.level, cfg.log.format) == ("info", "auto")


# -- which file ----------------------------------------------------------------------------------


def test_missing_default_file_means_defaults_without_error(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "DEFAULT_PATH", tmp_path / "etc" / "watcherd.toml")
    cfg = config.load(None, {})
    assert cfg.file is None
    assert sections(cfg) == sections(Config())
    assert set(cfg.sources.values()) == {"default"}


def test_real_default_path_is_absent_here_so_loading_without_a_file_gives_defaults():
    assert config.DEFAULT_PATH == Path("/etc/watcherd/watcherd.toml")
    assert not config.DEFAULT_PATH.exists(), "this machine has a watcherd config; test assumes none"
    cfg = config.load(None, {"WATCHERD_TEST_X": "1"})
    assert cfg.file is None and sections(cfg) == sections(Config())


def test_default_file_is_read_when_it_exists(tmp_path, monkeypatch):
    path = write(tmp_path, '[store]\nkeep = 3\n')
    monkeypatch.setattr(config, "DEFAULT_PATH", path)
    cfg = config.load(None, {})
    assert cfg.file == path
    assert cfg.store.keep == 3
    assert cfg.sources["store.keep"] == f"file {path}"


def test_config_option_wins_over_environment_which_wins_over_default(tmp_path):
    assert config.config_path("/a.toml", {"WATCHERD_CONFIG": "/b.toml"}) == (Path("/a.toml"), True)
    assert config.config_path(None, {"WATCHERD_CONFIG": "/b.toml"}) == (Path("/b.toml"), True)
    assert config.config_path(None, {}) == (config.DEFAULT_PATH, False)


def test_explicit_config_file_that_is_missing_is_an_error_naming_it(tmp_path):
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=re.escape(str(missing))) as info:
        config.load(str(missing), {})
    assert "--config" in str(info.value) and "does not exist" in str(info.value)


def test_config_file_from_environment_that_is_missing_is_an_error_naming_the_variable(tmp_path):
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="WATCHERD_CONFIG") as info:
        config.load(None, {"WATCHERD_CONFIG": str(missing)})
    assert str(missing) in str(info.value)


def test_environment_config_file_is_read(tmp_path):
    path = write(tmp_path, '[log]\nlevel = "debug"\n')
    cfg = config.load(None, {"WATCHERD_CONFIG": str(path)})
    assert cfg.log.level == "debug" and cfg.file == path


def test_config_file_that_is_a_directory_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="is a directory") as info:
        config.load(str(tmp_path), {})
    assert str(tmp_path) in str(info.value)


def test_config_file_below_a_regular_file_is_an_error_not_a_crash(tmp_path):
    below = write(tmp_path, "") / "watcherd.toml"
    with pytest.raises(ConfigError, match="cannot be read") as info:
        config.load(str(below), {})
    assert str(below) in str(info.value)


def test_malformed_toml_is_an_error_naming_the_file_and_line(tmp_path):
    message = error_for(tmp_path, '[store]\nkeep = 10\nurl = "unterminated\n')
    assert "not valid TOML" in message
    assert str(tmp_path / "watcherd.toml") in message
    assert "line 3" in message


def test_config_file_that_is_not_utf8_is_an_error(tmp_path):
    path = tmp_path / "watcherd.toml"
    path.write_bytes(b'[store]\nkey = "caf\xe9"\n')
    with pytest.raises(ConfigError, match="not UTF-8"):
        config.load(str(path), {})


def test_empty_config_file_gives_defaults_from_the_file(tmp_path):
    cfg = load_text(tmp_path, "")
    assert sections(cfg) == sections(Config())
    assert cfg.file == tmp_path / "watcherd.toml"


# -- values from the file ---------------------------------------------------------------------------


def test_file_values_are_parsed_and_remember_their_source(tmp_path):
    cfg = load_text(tmp_path, """
        [workspace]
        path = "/srv/project"
        mode = "branch"
        [watch]
        quiet_period = "500ms"
        max_commit_delay = "1h30m"
        [store]
        url = "s3://my-bucket/watcherd/prod/"
        key = "acme/vmcp-123/main"
        keep = 3
        max_bundle_size = "1GiB"
        [store.s3]
        force_path_style = true
        endpoint_url = "http://127.0.0.1:9000"
        sse = "aws:kms"
        kms_key_id = "alias/watcherd"
        [restore]
        on_missing = "template"
        template_url = "https://github.com/example/starter.git"
    """.replace("\n        ", "\n"))
    path = tmp_path / "watcherd.toml"
    assert cfg.workspace.path == Path("/srv/project") and cfg.workspace.mode == "branch"
    assert cfg.watch.quiet_period == 0.5 and cfg.watch.max_commit_delay == 5400
    url = cfg.store.url
    assert (url.scheme, url.bucket, url.prefix) == ("s3", "my-bucket", "watcherd/prod")
    assert cfg.store.key == "acme/vmcp-123/main" and cfg.store.keep == 3
    assert cfg.store.max_bundle_size == 2**30
    assert cfg.store.s3.force_path_style is True and cfg.store.s3.sse == "aws:kms"
    assert cfg.restore.on_missing == "template"
    assert cfg.sources["store.keep"] == f"file {path}"
    assert cfg.sources["store.warn_bundle_size"] == "default"


def _bad(id: str, toml: str, key: str, *fragments: str):
    return pytest.param(toml, key, fragments, id=id)


BAD_FILES = [
    # unknown names
    _bad("unknown-key", "[store]\nkep = 3\n", "store.kep", "unknown key", "did you mean store.keep?"),
    _bad("unknown-s3-key", "[store.s3]\nregoin = 'x'\n", "store.s3.regoin", "did you mean store.s3.region?"),
    _bad("unknown-section", "[stor]\nkeep = 3\n", "stor", "unknown section", "did you mean store?"),
    _bad("unknown-subsection", "[store.s4]\nregion = 'x'\n", "store.s4", "unknown section",
         "did you mean store.s3?"),
    _bad("top-level-key", "keep = 3\n", "keep", "section"),
    _bad("section-not-a-table", "store = 'x'\n", "store", "must be a table"),
    _bad("key-as-a-table", "[store.url]\nx = 1\n", "store.url", "a key, not a table"),
    # wrong types
    _bad("keep-string", "[store]\nkeep = '10'\n", "store.keep", "whole number", "a string"),
    _bad("keep-float", "[store]\nkeep = 1.5\n", "store.keep", "whole number"),
    _bad("keep-bool", "[store]\nkeep = true\n", "store.keep", "whole number", "a boolean"),
    _bad("keep-zero", "[store]\nkeep = 0\n", "store.keep", "1 or more"),
    _bad("max-attempts-negative", "[store.s3]\nmax_attempts = -1\n", "store.s3.max_attempts", "1 or more"),
    _bad("quiet-period-number", "[watch]\nquiet_period = 2\n", "watch.quiet_period", "duration", "a number"),
    _bad("bool-as-string", "[store.s3]\nforce_path_style = 'true'\n", "store.s3.force_path_style",
         "true or false"),
    _bad("url-number", "[store]\nurl = 5\n", "store.url", "string"),
    _bad("mode-choice", "[workspace]\nmode = 'shadows'\n", "workspace.mode", "'shadow'", "'branch'"),
    _bad("level-choice", "[log]\nlevel = 'verbose'\n", "log.level", "'debug'"),
    _bad("format-choice", "[log]\nformat = 'yaml'\n", "log.format", "'json'"),
    _bad("sse-choice", "[store.s3]\nsse = 'aes'\n", "store.s3.sse", "'AES256'"),
    _bad("on-missing-choice", "[restore]\non_missing = 'clone'\n", "restore.on_missing", "'template'"),
    _bad("workspace-relative", "[workspace]\npath = 'app'\n", "workspace.path", "absolute"),
    _bad("workspace-empty", "[workspace]\npath = ''\n", "workspace.path", "empty"),
    _bad("author-empty", "[workspace]\nauthor_name = ' '\n", "workspace.author_name", "empty"),
    _bad("author-newline", "[workspace]\nauthor_email = \"a@b\\nc\"\n", "workspace.author_email",
         "line breaks"),
    # durations
    _bad("duration-zero", "[watch]\nquiet_period = '0s'\n", "watch.quiet_period", "longer than zero"),
    _bad("duration-negative", "[watch]\nidle_timeout = '-1s'\n", "watch.idle_timeout", "negative"),
    _bad("duration-no-unit", "[watch]\nshutdown_timeout = '2'\n", "watch.shutdown_timeout", "no unit", '"2s"'),
    _bad("duration-bad-unit", "[watch]\nmax_upload_interval = '10y'\n", "watch.max_upload_interval",
         "not a duration"),
    # sizes
    _bad("size-no-unit", "[store]\nmax_bundle_size = '500'\n", "store.max_bundle_size", "no unit"),
    _bad("size-number", "[store]\nmax_bundle_size = 500\n", "store.max_bundle_size", "size string"),
    _bad("size-bad-unit", "[store]\nwarn_bundle_size = '100XB'\n", "store.warn_bundle_size", "not a size"),
    _bad("size-zero", "[store]\nwarn_bundle_size = '0MiB'\n", "store.warn_bundle_size", "larger than zero"),
    _bad("size-negative", "[store]\nmax_bundle_size = '-1MiB'\n", "store.max_bundle_size", "negative"),
    # store URL
    _bad("url-ftp", "[store]\nurl = 'ftp://host/dir'\n", "store.url", "unknown scheme 'ftp'"),
    _bad("url-no-scheme", "[store]\nurl = '/var/lib/watcherd'\n", "store.url", "no scheme"),
    _bad("url-relative-file", "[store]\nurl = 'file:store'\n", "store.url", "absolute path"),
    _bad("url-file-two-slashes", "[store]\nurl = 'file://var/lib/store'\n", "store.url", "three slashes"),
    _bad("url-bucket-uppercase", "[store]\nurl = 's3://My_Bucket/x'\n", "store.url", "bucket name"),
    _bad("url-bucket-short", "[store]\nurl = 's3://ab'\n", "store.url", "bucket name"),
    _bad("url-bucket-dots", "[store]\nurl = 's3://a..b'\n", "store.url", "bucket name"),
    _bad("url-no-bucket", "[store]\nurl = 's3:///prefix'\n", "store.url", "bucket name"),
    _bad("url-credentials", "[store]\nurl = 's3://AKIAEXAMPLE:wJalrXUtnFEMI@bucket/x'\n", "store.url",
         "no credentials"),
    _bad("url-prefix-dotdot", "[store]\nurl = 's3://bucket/a/../b'\n", "store.url", "'..'"),
    _bad("url-prefix-odd", "[store]\nurl = 's3://bucket/a b'\n", "store.url", "prefix part"),
    _bad("url-query", "[store]\nurl = 's3://bucket/x?versionId=1'\n", "store.url", "only s3://bucket/prefix"),
    _bad("endpoint-not-http", "[store.s3]\nendpoint_url = 'minio:9000'\n", "store.s3.endpoint_url", "http(s)"),
    _bad("endpoint-credentials", "[store.s3]\nendpoint_url = 'http://minio:hunter2hunter2@minio:9000'\n",
         "store.s3.endpoint_url", "credential chain"),
    # store key
    _bad("key-dotdot", "[store]\nkey = '../other'\n", "store.key", "'..'"),
    _bad("key-dotdot-inside", "[store]\nkey = 'acme/../../etc'\n", "store.key", "'..'"),
    _bad("key-absolute", "[store]\nkey = '/etc/passwd'\n", "store.key", "absolute"),
    _bad("key-empty", "[store]\nkey = ''\n", "store.key", "empty"),
    _bad("key-empty-part", "[store]\nkey = 'acme//main'\n", "store.key", "empty"),
    _bad("key-space", "[store]\nkey = 'acme/my project'\n", "store.key", "letters, digits"),
    _bad("key-star", "[store]\nkey = 'acme/*'\n", "store.key", "letters, digits"),
    _bad("key-unicode", "[store]\nkey = 'acme/café'\n", "store.key", "letters, digits"),
    _bad("key-backslash", "[store]\nkey = 'acme\\\\main'\n", "store.key", "letters, digits"),
    _bad("key-hidden", "[store]\nkey = '.git'\n", "store.key", "start with a letter or digit"),
    _bad("key-reserved-bundles", "[store]\nkey = 'acme/bundles'\n", "store.key", "reserved"),
    _bad("key-reserved-conflicts", "[store]\nkey = 'conflicts/main'\n", "store.key", "reserved"),
    _bad("key-reserved-manifest", "[store]\nkey = 'acme/manifest.json'\n", "store.key", "reserved"),
    _bad("key-too-long", f"[store]\nkey = '{'a/' * 300}a'\n", "store.key", "longer than 512"),
    # control
    _bad("listen-public-no-token", "[control]\nlisten = '0.0.0.0:7781'\n", "control.listen",
         "control.token", "loopback"),
    _bad("listen-hostname-no-token", "[control]\nlisten = 'watcherd.internal:7781'\n", "control.listen",
         "loopback"),
    _bad("listen-not-host-port", "[control]\nlisten = 'localhost'\n", "control.listen", "host:port"),
    _bad("listen-port-zero", "[control]\nlisten = '127.0.0.1:0'\n", "control.listen", "host:port"),
    _bad("listen-no-host", "[control]\nlisten = ':7781'\n", "control.listen", "no host"),
    _bad("token-short", "[control]\ntoken = 'abc'\n", "control.token", "at least 16"),
    _bad("token-with-space", "[control]\ntoken = 'a token with spaces in it'\n", "control.token",
         "without spaces"),
    # keys that only make sense together
    _bad("template-without-url", "[restore]\non_missing = 'template'\n", "restore.on_missing",
         "restore.template_url", "must be set"),
    _bad("warn-above-max", "[store]\nwarn_bundle_size = '600MiB'\n", "store.warn_bundle_size",
         "above store.max_bundle_size"),
    _bad("max-below-default-warn", "[store]\nmax_bundle_size = '50MiB'\n", "store.max_bundle_size",
         "above store.max_bundle_size"),
    _bad("commit-delay-below-quiet", "[watch]\nmax_commit_delay = '1s'\n", "watch.max_commit_delay",
         "watch.quiet_period"),
    _bad("kms-key-without-kms", "[store.s3]\nkms_key_id = 'alias/x'\n", "store.s3.kms_key_id", "aws:kms"),
]


@pytest.mark.parametrize(("toml", "key", "fragments"), BAD_FILES)
def test_bad_config_file_is_one_line_naming_the_key_and_the_file(tmp_path, toml, key, fragments):
    message = error_for(tmp_path, toml)
    assert message.startswith(f"{key} (file {tmp_path / 'watcherd.toml'})"), message
    for fragment in fragments:
        assert fragment in message


def test_store_url_with_credentials_does_not_echo_the_secret(tmp_path):
    message = error_for(tmp_path, "[store]\nurl = 's3://AKIAEXAMPLE:wJalrXUtnFEMIK7MDENG@bucket/x'\n")
    assert "wJalrXUtnFEMIK7MDENG" not in message
    assert "s3://AKIAEXAMPLE:********@bucket/x" in message


def test_bad_control_token_does_not_echo_the_token(tmp_path):
    message = error_for(tmp_path, "[control]\ntoken = 'short-secret'\n")
    assert "short-secret" not in message
    message = error_for(tmp_path, "[control]\ntoken = 'long but has a space'\n")
    assert "long but has a space" not in message


def test_template_without_url_blames_template_url_when_on_missing_came_from_elsewhere(tmp_path):
    message = error_for(tmp_path, "[restore]\ntemplate_url = ''\n", {"WATCHERD_RESTORE_ON_MISSING": "template"})
    assert message.startswith(f"restore.template_url (file {tmp_path / 'watcherd.toml'})")


def test_loopback_listen_needs_no_token(tmp_path):
    for listen in ("127.0.0.1:7781", "localhost:7781", "[::1]:7781", "127.0.0.2:80"):
        assert load_text(tmp_path, f"[control]\nlisten = '{listen}'\n").control.listen == listen


def test_control_endpoint_can_be_turned_off(tmp_path):
    cfg = load_text(tmp_path, "[control]\nlisten = ''\n")
    assert cfg.control.address is None


def test_public_listen_is_accepted_with_a_token(tmp_path):
    cfg = load_text(tmp_path, f"[control]\nlisten = '0.0.0.0:7781'\ntoken = '{TOKEN}'\n")
    assert cfg.control.address == ("0.0.0.0", 7781)
    assert cfg.control.token == TOKEN


@pytest.mark.parametrize("url", ["file:///var/lib/watcherd/store", "file://localhost/srv/store",
                                 "s3://bucket", "s3://my.bucket-1/a/b_c/d-e.f", "s3://bucket/prefix/"])
def test_good_store_urls_are_accepted(tmp_path, url):
    parsed = load_text(tmp_path, f"[store]\nurl = '{url}'\n").store.url
    assert config.parse_store_url(str(parsed)) == parsed


@pytest.mark.parametrize("key", ["default", "acme/vmcp-123/main", "a.b_c-d/E9", "org/feature-x.y"])
def test_good_store_keys_are_accepted(tmp_path, key):
    assert load_text(tmp_path, f"[store]\nkey = '{key}'\n").store.key == key


# -- environment overrides --------------------------------------------------------------------------


def test_environment_overrides_the_file_and_says_so(tmp_path):
    path = write(tmp_path, "[store]\nurl = 'file:///srv/a'\nkeep = 4\n")
    cfg = config.load(str(path), {"WATCHERD_STORE_URL": "s3://bucket/p", "WATCHERD_STORE_S3_REGION": "eu-west-1"})
    assert str(cfg.store.url) == "s3://bucket/p"
    assert cfg.sources["store.url"] == "env WATCHERD_STORE_URL"
    assert cfg.store.s3.region == "eu-west-1"
    assert cfg.sources["store.s3.region"] == "env WATCHERD_STORE_S3_REGION"
    assert cfg.store.keep == 4 and cfg.sources["store.keep"] == f"file {path}"
    assert cfg.sources["store.key"] == "default"


def _env_text(key) -> str:
    """The default of ``key`` as an environment variable would spell it."""
    value = json.loads(key.show(getattr(getattr_path(Config(), key.section), key.name)))
    return str(value).lower() if isinstance(value, bool) else str(value)


def getattr_path(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize("key", config.schema(), ids=lambda k: k.dotted)
def test_every_key_can_be_overridden_by_its_environment_variable(key):
    assert key.env == "WATCHERD_" + key.dotted.replace(".", "_").upper()
    cfg = config.from_mapping({}, {key.env: _env_text(key)}, None)
    assert cfg.sources[key.dotted] == f"env {key.env}"
    assert sections(cfg) == sections(Config())


@pytest.mark.parametrize(("text", "expected"), [("true", True), ("1", True), ("yes", True), ("ON", True),
                                                ("false", False), ("0", False), ("no", False), ("off", False)])
def test_environment_booleans(text, expected):
    cfg = config.from_mapping({}, {"WATCHERD_STORE_S3_FORCE_PATH_STYLE": text}, None)
    assert cfg.store.s3.force_path_style is expected


def test_environment_boolean_that_is_not_one_is_an_error_naming_the_variable():
    with pytest.raises(ConfigError) as info:
        config.from_mapping({}, {"WATCHERD_STORE_S3_FORCE_PATH_STYLE": "maybe"}, None)
    assert str(info.value).startswith("store.s3.force_path_style (env WATCHERD_STORE_S3_FORCE_PATH_STYLE)")
    assert "'maybe'" in str(info.value)


def test_environment_integers():
    cfg = config.from_mapping({}, {"WATCHERD_STORE_KEEP": "3", "WATCHERD_STORE_S3_MAX_ATTEMPTS": " 12 "}, None)
    assert (cfg.store.keep, cfg.store.s3.max_attempts) == (3, 12)


@pytest.mark.parametrize(("text", "fragment"), [("three", "whole number"), ("1.5", "whole number"),
                                                ("", "whole number"), ("-1", "1 or more"), ("0", "1 or more")])
def test_environment_integer_that_is_not_one_is_an_error_naming_the_variable(text, fragment):
    with pytest.raises(ConfigError) as info:
        config.from_mapping({}, {"WATCHERD_STORE_KEEP": text}, None)
    assert str(info.value).startswith("store.keep (env WATCHERD_STORE_KEEP)")
    assert fragment in str(info.value)


def test_environment_duration_is_checked_like_the_file():
    with pytest.raises(ConfigError, match=r"watch\.quiet_period \(env WATCHERD_WATCH_QUIET_PERIOD\).*no unit"):
        config.from_mapping({}, {"WATCHERD_WATCH_QUIET_PERIOD": "2"}, None)


def test_unknown_variable_in_a_watcherd_section_is_an_error_with_a_suggestion():
    with pytest.raises(ConfigError) as info:
        config.from_mapping({}, {"WATCHERD_STORE_FOO": "x"}, None)
    assert "WATCHERD_STORE_FOO" in str(info.value) and "unknown setting" in str(info.value)
    with pytest.raises(ConfigError, match="did you mean WATCHERD_STORE_S3_REGION"):
        config.from_mapping({}, {"WATCHERD_STORE_S3_REGOIN": "x"}, None)


@pytest.mark.parametrize("name, meant", [("WATCHERD_STOR_KEY", "WATCHERD_STORE_KEY"),
                                         ("WATCHERD_CONTROLL_LISTEN", "WATCHERD_CONTROL_LISTEN"),
                                         ("WATCHERD_KEY", "WATCHERD_STORE_KEY")])
def test_a_typo_in_the_section_of_a_variable_is_an_error_not_a_silent_default(name, meant):
    # Left at its default, a mistyped control.listen would send a rollback to another daemon.
    with pytest.raises(ConfigError, match=f"{name}: unknown setting.*did you mean {meant}"):
        config.from_mapping({}, {name: "x"}, None)


def test_unrelated_watcherd_variables_are_ignored():
    cfg = config.from_mapping({}, {"WATCHERD_TEST_X": "1", "WATCHERD_TEST_S3_BUCKET": "b",
                                   "WATCHERD_CONFIG": "/x.toml", "WATCHERD_WATCHDOG": "1"}, None)
    assert set(cfg.sources.values()) == {"default"}


def test_environment_value_replaces_a_bad_file_value_for_the_same_key(tmp_path):
    # The file is still checked for unknown keys, but a key the environment overrides is not used.
    cfg = load_text(tmp_path, "[store]\nkeep = 0\n", {"WATCHERD_STORE_KEEP": "2"})
    assert cfg.store.keep == 2


def test_environment_token_is_accepted_for_a_public_listen(tmp_path):
    cfg = load_text(tmp_path, "[control]\nlisten = '0.0.0.0:7781'\n", {"WATCHERD_CONTROL_TOKEN": TOKEN})
    assert cfg.control.token == TOKEN
    assert cfg.sources["control.token"] == "env WATCHERD_CONTROL_TOKEN"


# -- describe (what config check prints) ----------------------------------------------------------


def test_describe_lists_every_key_with_value_and_source(tmp_path):
    cfg = load_text(tmp_path, "[store]\nkeep = 3\n", {"WATCHERD_LOG_LEVEL": "debug"})
    rows = {key: (value, source) for key, value, source in config.describe(cfg)}
    assert set(rows) == {k.dotted for k in config.schema()}
    assert rows["store.keep"] == ("3", f"file {tmp_path / 'watcherd.toml'}")
    assert rows["log.level"] == ('"debug"', "env WATCHERD_LOG_LEVEL")
    assert rows["watch.quiet_period"] == ('"2s"', "default")
    assert rows["store.max_bundle_size"] == ('"500MiB"', "default")


def test_describe_shows_values_that_read_back_as_the_same_config(tmp_path):
    cfg = load_text(tmp_path, "[watch]\nquiet_period = '1500ms'\n[store]\nwarn_bundle_size = '1.25MiB'\n"
                              "[workspace]\nauthor_name = 'Ann \"the\" Bot'\n")
    text = "\n".join(f"{k} = {v}" for k, v, _ in config.describe(cfg))
    # "store.s3.region = ..." lines are dotted keys: TOML reads them back as nested tables.
    again = config.from_mapping(tomllib.loads(text), {}, None)
    assert sections(again) == sections(cfg)


def test_describe_masks_the_token():
    cfg = config.from_mapping({}, {"WATCHERD_CONTROL_TOKEN": TOKEN}, None)
    rows = {key: value for key, value, _ in config.describe(cfg)}
    assert rows["control.token"] == '"********"'
    assert TOKEN not in repr(config.describe(cfg))


def test_describe_masks_a_password_in_the_template_url():
    url = "https://x-access-token:ghp_abcdefghij@github.com/a/b"
    cfg = config.from_mapping({"restore": {"template_url": url}}, {}, None)
    rows = {key: value for key, value, _ in config.describe(cfg)}
    assert "ghp_abcdefghij" not in rows["restore.template_url"]
    assert "https://x-access-token:********@github.com/a/b" in rows["restore.template_url"]
