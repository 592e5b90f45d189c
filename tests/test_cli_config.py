"""``watcherd config check`` and how every command reports a bad configuration, run as a user would."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import said

from watcherd import config

TOKEN = "ctl-token-8c4b2a1f9e7d6c5b"
AWS_SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"
WATCHERD = Path(sys.executable).parent / "watcherd"  # the console script of this environment


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    # conftest removed every WATCHERD_* variable of the machine; the test adds its own.
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([str(WATCHERD), *args], capture_output=True, text=True, env=full_env,
                          timeout=60, check=False)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "watcherd.toml"
    path.write_text(text)
    return path


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {proc.stderr!r}"
    assert lines[0].startswith("watcherd: ")
    for fragment in fragments:
        assert fragment in lines[0]
    assert proc.stdout == ""
    return lines[0]


def shown(stdout: str) -> dict[str, tuple[str, str]]:
    """``config check`` output as {"section.key": (value, source)}."""
    rows: dict[str, tuple[str, str]] = {}
    section = ""
    for line in stdout.splitlines():
        if m := re.fullmatch(r"\[(.+)\]", line):
            section = m.group(1)
        elif m := re.fullmatch(r"(\w+) = (.*?)\s+# (.+)", line):
            rows[f"{section}.{m.group(1)}"] = (m.group(2), m.group(3))
    return rows


# -- config check -----------------------------------------------------------------------------------


def test_config_check_shows_each_value_and_whether_it_came_from_default_file_or_env(tmp_path):
    path = write(tmp_path, "[store]\nurl = 'file:///srv/store'\nkeep = 3\n[watch]\nquiet_period = '5s'\n")
    env = {"WATCHERD_STORE_URL": "s3://acme-workspaces/prod", "WATCHERD_STORE_S3_REGION": "eu-west-1"}
    proc = run_cli("--config", str(path), "config", "check", env=env)
    assert proc.returncode == 0, proc.stderr
    assert said(proc.stderr) == []  # the S3 probe's log lines, nothing else
    assert proc.stdout.splitlines()[0] == f"# config file: {path}"
    rows = shown(proc.stdout)
    assert set(rows) == {key.dotted for key in config.schema()}
    assert rows["store.url"] == ('"s3://acme-workspaces/prod"', "env WATCHERD_STORE_URL")
    assert rows["store.s3.region"] == ('"eu-west-1"', "env WATCHERD_STORE_S3_REGION")
    assert rows["store.keep"] == ("3", f"file {path}")
    assert rows["watch.quiet_period"] == ('"5s"', f"file {path}")
    assert rows["watch.idle_timeout"] == ('"1m"', "default")
    assert rows["store.s3.force_path_style"] == ("false", "default")


def test_config_check_masks_the_token_from_env_and_from_file(tmp_path):
    path = write(tmp_path, f"[control]\nlisten = '0.0.0.0:7781'\ntoken = '{TOKEN}'\n")
    from_file = run_cli("--config", str(path), "config", "check")
    assert from_file.returncode == 0, from_file.stderr
    assert shown(from_file.stdout)["control.token"] == ('"********"', f"file {path}")
    from_env = run_cli("--config", str(path), "config", "check", env={"WATCHERD_CONTROL_TOKEN": TOKEN + "-env"})
    assert shown(from_env.stdout)["control.token"] == ('"********"', "env WATCHERD_CONTROL_TOKEN")
    for proc in (from_file, from_env):
        assert TOKEN not in proc.stdout + proc.stderr


def test_config_check_masks_a_password_in_a_url(tmp_path):
    path = write(tmp_path, "[restore]\ntemplate_url = 'https://bot:ghp_s3cr3tv4lu3xyz@github.com/a/b.git'\n")
    proc = run_cli("--config", str(path), "config", "check")
    assert proc.returncode == 0, proc.stderr
    assert "ghp_s3cr3tv4lu3xyz" not in proc.stdout
    assert shown(proc.stdout)["restore.template_url"][0] == '"https://bot:********@github.com/a/b.git"'


def test_config_check_reads_the_file_named_by_watcherd_config(tmp_path):
    path = write(tmp_path, "[log]\nlevel = 'debug'\n")
    proc = run_cli("config", "check", env={"WATCHERD_CONFIG": str(path)})
    assert proc.returncode == 0, proc.stderr
    assert shown(proc.stdout)["log.level"] == ('"debug"', f"file {path}")


def test_config_check_without_any_file_shows_the_defaults(tmp_path):
    assert not config.DEFAULT_PATH.exists(), "this machine has a watcherd config; test assumes none"
    proc = run_cli("config", "check")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == "# config file: none (defaults and environment only)"
    assert {source for _, source in shown(proc.stdout).values()} == {"default"}


def test_example_config_passes_config_check():
    example = Path(__file__).resolve().parent.parent / "config.example.toml"
    proc = run_cli("--config", str(example), "config", "check")
    assert proc.returncode == 0, proc.stderr
    assert {source for _, source in shown(proc.stdout).values()} == {f"file {example}"}


BRANCH_WARNING = "workspace.mode = branch runs git in the workspace: trusted workspaces only"


def test_config_check_warns_that_branch_mode_is_for_trusted_workspaces_only(tmp_path):
    path = write(tmp_path, "[workspace]\nmode = 'branch'\n")
    proc = run_cli("--config", str(path), "config", "check")
    # A warning, not an error: branch mode is valid for a workspace the operator trusts.
    assert proc.returncode == 0, proc.stderr
    assert shown(proc.stdout)["workspace.mode"] == ('"branch"', f"file {path}")
    warned = [line for line in proc.stdout.splitlines() if BRANCH_WARNING in line]
    assert len(warned) == 1 and warned[0].startswith("# warning: "), proc.stdout


def test_config_check_says_nothing_of_branch_mode_in_shadow_mode(tmp_path):
    for text in ("", "[workspace]\nmode = 'shadow'\n"):
        proc = run_cli("--config", str(write(tmp_path, text)), "config", "check")
        assert proc.returncode == 0, proc.stderr
        assert "warning" not in proc.stdout and "trusted" not in proc.stdout


def test_python_dash_m_runs_the_same_check(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "watcherd", "--config", str(tmp_path / "nope.toml"), "config",
                           "check"], capture_output=True, text=True, timeout=60, check=False)
    assert_one_line_error(proc, str(tmp_path / "nope.toml"))


# -- errors: exit 2, one line, the key and where it came from, no traceback ------------------------


BAD = [  # (id, file, key named, something the message must say)
    ("unknown-key", "[store]\nkep = 3\n", "store.kep", "did you mean store.keep?"),
    ("unknown-section", "[stor]\nkeep = 3\n", "stor", "unknown section"),
    ("keep-string", "[store]\nkeep = '10'\n", "store.keep", "whole number"),
    ("quiet-period-number", "[watch]\nquiet_period = 2\n", "watch.quiet_period", "duration"),
    ("duration-zero", "[watch]\nquiet_period = '0s'\n", "watch.quiet_period", "longer than zero"),
    ("size-no-unit", "[store]\nmax_bundle_size = '500'\n", "store.max_bundle_size", "no unit"),
    ("url-ftp", "[store]\nurl = 'ftp://host/x'\n", "store.url", "unknown scheme"),
    ("key-dotdot", "[store]\nkey = '../escape'\n", "store.key", "'..'"),
    ("public-listen-no-token", "[control]\nlisten = '0.0.0.0:7781'\n", "control.listen", "control.token"),
    ("template-no-url", "[restore]\non_missing = 'template'\n", "restore.on_missing", "restore.template_url"),
    ("warn-above-max", "[store]\nwarn_bundle_size = '1GiB'\n", "store.warn_bundle_size", "max_bundle_size"),
]


@pytest.mark.parametrize(("toml", "key", "fragment"), [pytest.param(*case[1:], id=case[0]) for case in BAD])
def test_bad_config_exits_2_with_one_line_naming_key_and_file(tmp_path, toml, key, fragment):
    path = write(tmp_path, toml)
    proc = run_cli("--config", str(path), "config", "check")
    assert_one_line_error(proc, key, str(path), fragment)


def test_malformed_toml_exits_2_naming_the_file(tmp_path):
    path = write(tmp_path, "[store\nkeep = 3\n")
    assert_one_line_error(run_cli("--config", str(path), "config", "check"), str(path), "not valid TOML")


def test_bad_config_stops_every_command_not_only_config_check(tmp_path):
    path = write(tmp_path, "[store]\nkep = 3\n")
    assert_one_line_error(run_cli("--config", str(path), "list"), "store.kep", str(path))


def test_missing_explicit_config_file_exits_2(tmp_path):
    assert_one_line_error(run_cli("--config", "/nope", "config", "check"), "/nope", "does not exist")


def test_config_file_that_is_a_directory_exits_2(tmp_path):
    assert_one_line_error(run_cli("--config", str(tmp_path), "config", "check"), str(tmp_path), "directory")


def test_config_file_below_a_regular_file_exits_2_without_traceback(tmp_path):
    below = write(tmp_path, "") / "x.toml"
    assert_one_line_error(run_cli("--config", str(below), "config", "check"), str(below))


def test_bad_environment_value_exits_2_naming_the_variable():
    proc = run_cli("config", "check", env={"WATCHERD_STORE_KEEP": "ten"})
    assert_one_line_error(proc, "store.keep", "WATCHERD_STORE_KEEP", "whole number")


def test_unknown_environment_variable_exits_2_and_unrelated_ones_are_ignored():
    assert_one_line_error(run_cli("config", "check", env={"WATCHERD_STORE_FOO": "1"}), "WATCHERD_STORE_FOO")
    proc = run_cli("config", "check", env={"WATCHERD_TEST_X": "1"})
    assert proc.returncode == 0, proc.stderr


# -- errors never print a secret ----------------------------------------------------------------------


def test_store_url_with_credentials_is_refused_without_printing_them(tmp_path):
    path = write(tmp_path, f"[store]\nurl = 's3://AKIAEXAMPLE:{AWS_SECRET}@bucket/x'\n")
    line = assert_one_line_error(run_cli("--config", str(path), "config", "check"), "store.url", "credentials")
    assert AWS_SECRET not in line


def test_bad_token_is_refused_without_printing_it(tmp_path):
    proc = run_cli("config", "check", env={"WATCHERD_CONTROL_TOKEN": "tiny-tok"})
    line = assert_one_line_error(proc, "control.token", "WATCHERD_CONTROL_TOKEN")
    assert "tiny-tok" not in line


def test_secret_pasted_into_the_wrong_key_is_masked_in_the_error(tmp_path):
    # The error echoes the bad value; the value is the token (or an AWS key) from the environment.
    path = write(tmp_path, f"[store]\nurl = '{TOKEN}'\n[store.s3]\nregion = 'x'\n")
    proc = run_cli("--config", str(path), "config", "check", env={"WATCHERD_CONTROL_TOKEN": TOKEN})
    line = assert_one_line_error(proc, "store.url", "no scheme")
    assert TOKEN not in line and "********" in line
    path = write(tmp_path, f"[store]\nurl = '{AWS_SECRET}'\n")
    proc = run_cli("--config", str(path), "config", "check", env={"AWS_SECRET_ACCESS_KEY": AWS_SECRET})
    line = assert_one_line_error(proc, "store.url")
    assert AWS_SECRET not in line and "********" in line
