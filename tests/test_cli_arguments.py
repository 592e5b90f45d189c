"""The command line as people type it: ``--config`` on either side of the command, help that
says what each command does and what its exit statuses mean."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from daemon_fixture import _env, free_port, make_workspace, write_config
from helpers import read_until, said

KEY = "acme/args-1/main"

# DESIGN.md's table, and 2 wherever a person may have to fix the config.
EXIT_STATUSES = {
    ("run",): {0, 1, 2, 3},
    ("restore",): {0, 1, 2},
    ("snapshot",): {0, 1, 2, 3},
    ("status",): {0, 1, 2},
    ("list",): {0, 1, 2},
    ("verify",): {0, 1, 2},
    ("config", "check"): {0, 2},
}


def cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "watcherd", *args], capture_output=True,
                          text=True, timeout=60, env=_env(), **kwargs)


@pytest.fixture
def cfg(tmp_path) -> Path:
    ws = make_workspace(tmp_path / "ws")
    return write_config(tmp_path / "w.toml", workspace=ws, store=tmp_path / "store", key=KEY,
                        listen="")


@pytest.mark.parametrize("command", [["list"], ["config", "check"], ["verify"]])
def test_config_after_the_command_is_the_same_as_before_it(cfg, command):
    before = cli("--config", str(cfg), *command)
    after = cli(*command, "--config", str(cfg))
    assert after.returncode == before.returncode, after.stderr
    assert after.stdout == before.stdout and str(cfg.parent / "store") in after.stdout


def test_run_with_config_after_the_command_watches_that_workspace(cfg):
    proc = subprocess.Popen([sys.executable, "-m", "watcherd", "run", "--config", str(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
    try:
        ready = read_until(proc.stdout.fileno(), b'"daemon.ready"', timeout=20)
        assert str(cfg.parent / "ws").encode() in ready
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        proc.stdout.close()
        proc.stderr.close()


def test_every_commands_help_shows_the_config_option():
    top = cli("--help")
    assert top.returncode == 0
    for command in EXIT_STATUSES:
        assert re.search(r"--config PATH\s+TOML config file", cli(*command, "--help").stdout)
    assert re.search(r"--config PATH\s+TOML config file", top.stdout)


@pytest.mark.parametrize("command", list(EXIT_STATUSES), ids=" ".join)
def test_every_commands_help_says_what_it_does_and_its_exit_statuses(command):
    proc = cli(*command, "--help")
    assert proc.returncode == 0, proc.stderr
    usage, description, *rest = proc.stdout.split("\n\n")
    assert usage.startswith(f"usage: watcherd {' '.join(command)}")
    assert len(description.split()) >= 12, f"no description: {description!r}"
    statuses = proc.stdout.split("exit status:\n", 1)[1]
    codes = {int(m) for m in re.findall(r"^  (\d)  \S", statuses, re.MULTILINE)}
    assert codes == EXIT_STATUSES[command]


def test_snapshot_says_on_stderr_that_no_daemon_answered_and_saves_by_itself(tmp_path):
    port = free_port()  # nothing listens there
    ws = make_workspace(tmp_path / "ws")
    cfg = write_config(tmp_path / "w.toml", workspace=ws, store=tmp_path / "store", key=KEY,
                       listen=f"127.0.0.1:{port}")
    proc = cli("--config", str(cfg), "snapshot")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("snapshot: saved generation 1")
    assert said(proc.stderr) == [
        f"watcherd: no watcherd answers on http://127.0.0.1:{port} ([Errno 111] Connection "
        "refused); snapshotting in this process instead"]
    assert (tmp_path / "store" / KEY / "manifest.json").is_file()


def test_snapshot_with_the_control_endpoint_off_saves_by_itself_without_a_word(cfg):
    proc = cli("--config", str(cfg), "snapshot")
    assert proc.returncode == 0, proc.stderr
    assert said(proc.stderr) == []
