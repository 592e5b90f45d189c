"""Exit status 2 means "a person must fix the config or the invocation; retrying will not help",
so that systemd and Kubernetes stop restarting a command that can only fail again. Each case runs
the real command in its own process, as a supervisor would."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from daemon_fixture import (  # noqa: F401 (watcherd is a fixture)
    WATCHERD,
    _env,
    free_port,
    make_workspace,
    watcherd,
    write_config,
)
from helpers import said

KEY = "acme/exit-1/main"
S3_EXTRA = "s3:// needs the S3 extra: pip install 'watcherd[s3]'"

# What a machine without boto3 looks like to Python: `import boto3` fails as for a missing
# module. A sitecustomize on PYTHONPATH runs before watcherd in every process started with it.
_NO_BOTO3 = "import sys\nsys.modules['boto3'] = None\nsys.modules['botocore'] = None\n"


def run(config: Path, *args: str, env: dict[str, str] | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([WATCHERD, "--config", str(config), *args], capture_output=True,
                          text=True, timeout=timeout, env={**_env(), **(env or {})})


def refused(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit 2, no traceback, and one line for the person that says all of ``fragments``."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = said(proc.stderr)
    assert len(lines) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def without_boto3(tmp_path) -> dict[str, str]:
    site = tmp_path / "no-boto3"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_NO_BOTO3)
    env = {"PYTHONPATH": str(site)}
    probe = subprocess.run([sys.executable, "-c", "import boto3"], capture_output=True,
                           text=True, env={**_env(), **env}, timeout=30)
    assert probe.returncode == 1 and "ModuleNotFoundError" in probe.stderr, "boto3 not blocked"
    return env


@pytest.mark.parametrize("command", [["run"], ["restore"], ["snapshot"], ["snapshot", "--standalone"],
                                     ["list"], ["list", "--json"], ["verify"], ["config", "check"],
                                     ["config", "check", "--no-store"]])
def test_an_s3_store_without_the_s3_extra_exits_2_in_one_line_from_every_command(
        tmp_path, without_boto3, command):
    ws = make_workspace(tmp_path / "ws")
    cfg = tmp_path / "s3.toml"
    cfg.write_text(f'[workspace]\npath = "{ws}"\nstate_dir = "{tmp_path / "state"}"\n'
                   f'[store]\nurl = "s3://bucket/prefix"\n'
                   f'key = "{KEY}"\n[control]\nlisten = ""\n[log]\nformat = "json"\n')

    proc = run(cfg, *command, env=without_boto3)

    line = refused(proc, S3_EXTRA, "s3://bucket/prefix")
    assert line.startswith(f"watcherd: {S3_EXTRA}")
    assert proc.stdout == ""


def test_run_on_a_workspace_path_that_does_not_exist_exits_2_naming_it(tmp_path):
    missing = tmp_path / "not-mounted"
    cfg = write_config(tmp_path / "w.toml", workspace=missing, store=tmp_path / "store", key=KEY,
                       listen=f"127.0.0.1:{free_port()}")
    refused(run(cfg, "run"), f"workspace.path {missing} does not exist")
    assert not missing.exists() and not (tmp_path / "store").exists()


def test_run_on_a_workspace_path_that_is_a_file_exits_2(tmp_path):
    file = tmp_path / "app"
    file.write_text("not a directory\n")
    cfg = write_config(tmp_path / "w.toml", workspace=file, store=tmp_path / "store", key=KEY,
                       listen="")
    refused(run(cfg, "run"), f"workspace.path {file} is not a directory")


def test_restore_into_a_workspace_whose_parent_does_not_exist_exits_2_and_creates_nothing(
        tmp_path):
    target = tmp_path / "no-volume" / "app"
    cfg = write_config(tmp_path / "w.toml", workspace=target, store=tmp_path / "store", key=KEY,
                       listen="")
    refused(run(cfg, "restore"), str(target), f"parent directory {target.parent} does not exist")
    assert not target.parent.exists()


def test_status_with_the_control_endpoint_off_exits_2_naming_the_setting(tmp_path):
    # No daemon of this config can ever answer: a config to fix, not a daemon to wait for.
    cfg = write_config(tmp_path / "w.toml", workspace=tmp_path / "ws", store=tmp_path / "store",
                       key=KEY, listen="")
    proc = run(cfg, "status")
    refused(proc, "control.listen", "control endpoint is off")
    assert proc.stdout == ""


def test_status_and_snapshot_with_a_token_the_daemon_refuses_exit_2(watcherd):
    token = "the-daemons-token-0123456789"
    d = watcherd(listen=f"0.0.0.0:{free_port()}", token=token).start()
    d.settle()
    wrong = write_config(d.base / "wrong.toml", workspace=d.workspace, store=d.store, key=d.key,
                         listen=d.listen, token="not-the-token-0123456789")
    for command in (["status"], ["snapshot"]):
        proc = run(wrong, *command)
        refused(proc, "HTTP 401", "control.token")
        assert proc.stdout == ""
    assert d.generation() == 1  # the refused snapshot did not go standalone either
    assert not list(d.store.glob("*/*/*/conflicts"))
    assert d.stop() == 0
