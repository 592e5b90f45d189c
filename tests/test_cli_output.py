"""Where watcherd's output goes, as a shell pipeline or a log collector sees it: a reader that
goes away (``| head``, a ``tee`` killed by Ctrl-C) never stops a save."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
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
from helpers import read_until, wait_for
from s3server import MotoS3, aws_env

KEY = "acme/output-1/main"

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify is Linux-only")


@pytest.fixture
def daemons() -> Iterator[list[subprocess.Popen]]:
    """Daemons a test starts by hand; any still running at teardown is killed."""
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        proc.stderr.close()


def test_the_daemon_whose_stdout_reader_left_after_ready_still_makes_its_final_save(tmp_path,
                                                                                   daemons):
    ws = make_workspace(tmp_path / "ws")
    store = tmp_path / "store"
    cfg = write_config(tmp_path / "run.toml", workspace=ws, store=store, key=KEY,
                       listen=f"127.0.0.1:{free_port()}")
    read, write = os.pipe()
    proc = subprocess.Popen([WATCHERD, "--config", str(cfg), "run"], stdout=write,
                            stderr=subprocess.PIPE, text=True, env=_env())
    daemons.append(proc)
    os.close(write)
    read_until(read, b'"daemon.ready"', timeout=20)
    os.close(read)  # `watcherd run | head -n 4`: the reader had its lines and left

    code, stderr = edit_then_stop(proc, ws, "print('written after the reader left')\n")

    assert code == 0, stderr
    assert "Traceback" not in stderr and "Exception ignored" not in stderr
    assert stderr.count("cannot write log lines to <stdout> (Broken pipe)") == 1
    assert restored(tmp_path, store) == "print('written after the reader left')\n"


def test_the_daemon_started_with_stdout_closed_still_saves(tmp_path, daemons):
    # `watcherd run >&-`, or a supervisor that gives it no stdout: Python has no sys.stdout.
    ws = make_workspace(tmp_path / "ws")
    store = tmp_path / "store"
    cfg = write_config(tmp_path / "run.toml", workspace=ws, store=store, key=KEY, listen="")
    proc = subprocess.Popen([WATCHERD, "--config", str(cfg), "run"], stderr=subprocess.PIPE,
                            text=True, env=_env(), preexec_fn=lambda: os.close(1))
    daemons.append(proc)
    wait_for(lambda: (store / KEY / "manifest.json").is_file() or proc.poll() is not None,
             timeout=20, message="the first save")

    code, stderr = edit_then_stop(proc, ws, "print('no stdout at all')\n")

    assert code == 0, stderr
    assert "Traceback" not in stderr
    assert restored(tmp_path, store) == "print('no stdout at all')\n"


def edit_then_stop(proc: subprocess.Popen, ws: Path, text: str) -> tuple[int, str]:
    """Edit ``src/app.py``, SIGTERM the daemon at once (its final save must hold the edit);
    its exit status and stderr."""
    (ws / "src" / "app.py").write_text(text)
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=30)
    return code, proc.stderr.read()


def restored(tmp_path: Path, store: Path) -> str:
    """``src/app.py`` as ``watcherd restore`` of the store's newest generation gives it back."""
    target = tmp_path / "restored"
    restore = write_config(tmp_path / "restore.toml", workspace=target, store=store, key=KEY,
                           listen="")
    result = subprocess.run([WATCHERD, "--config", str(restore), "restore"],
                            capture_output=True, text=True, timeout=60, env=_env())
    assert result.returncode == 0, result.stderr
    return (target / "src" / "app.py").read_text()


# -- one-shot commands: the result on stdout, the logs on stderr ---------------------------------------


def cli(config: Path, *args: str, env: dict[str, str] | None = None,
        stdout: int = subprocess.PIPE) -> subprocess.CompletedProcess:
    """``python -m watcherd --config <config> <args>``, as a script runs it."""
    return subprocess.run([sys.executable, "-m", "watcherd", "--config", str(config), *args],
                          stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=120,
                          env={**_env(), **(env or {})})


def log_lines(stderr: str) -> list[dict]:
    """Every line of ``stderr`` but the person's last one, each of them a JSON log line."""
    lines = stderr.splitlines()
    return [json.loads(line) for line in lines if not line.startswith("watcherd: ")]


@pytest.fixture
def saved(tmp_path) -> Path:
    """A config whose store holds one generation of its workspace (no daemon: listen is off)."""
    ws = make_workspace(tmp_path / "ws")
    cfg = write_config(tmp_path / "w.toml", workspace=ws, store=tmp_path / "store", key=KEY,
                       listen="")
    (ws / "src" / "app.py").write_text("print('saved')\n")
    r = cli(cfg, "snapshot")
    assert r.returncode == 0, r.stderr
    return cfg


def elsewhere(cfg: Path, workspace: Path) -> Path:
    """The same store and key, another workspace (a new pod, with a state directory of its own)."""
    new = cfg.with_name(f"{workspace.name}.toml")
    new.write_text(cfg.read_text()
                   .replace(f'path = "{cfg.parent / "ws"}"', f'path = "{workspace}"')
                   .replace(f'state_dir = "{cfg.with_name(f"{cfg.stem}-state")}"',
                            f'state_dir = "{workspace.with_name(f"{workspace.name}-state")}"'))
    return new


def test_list_json_against_s3_is_exactly_one_json_document_and_its_logs_go_to_stderr(tmp_path):
    moto = MotoS3().start()
    try:
        bucket = moto.new_bucket()
        ws = make_workspace(tmp_path / "ws")
        cfg = tmp_path / "s3.toml"
        cfg.write_text(f'[workspace]\npath = "{ws}"\nstate_dir = "{tmp_path / "state"}"\n'
                       f'[store]\nurl = "s3://{bucket}/p"\nkey = "{KEY}"\n'
                       f'[store.s3]\nendpoint_url = "{moto.endpoint}"\nforce_path_style = true\n'
                       '[control]\nlisten = ""\n[log]\nformat = "json"\n')
        env = aws_env(moto.endpoint)
        assert cli(cfg, "snapshot", env=env).returncode == 0
        r = cli(cfg, "list", "--json", env=env)
    finally:
        moto.stop()
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)  # the whole of stdout, nothing before or after it
    assert [g["generation"] for g in doc["generations"]] == [1] and doc["key"] == KEY
    assert "s3.client" in [line["event"] for line in log_lines(r.stderr)]


def test_restore_and_verify_print_one_line_on_stdout_and_log_on_stderr(tmp_path, saved):
    verified = cli(saved, "verify")
    assert verified.returncode == 0, verified.stderr
    assert len(verified.stdout.splitlines()) == 1
    assert verified.stdout.startswith("verify: generation 1 restores: ")
    assert "bundle.downloaded" in [line["event"] for line in log_lines(verified.stderr)]

    target = tmp_path / "new-pod"
    restored = cli(elsewhere(saved, target), "restore")
    assert restored.returncode == 0, restored.stderr
    assert restored.stdout == f"restore: restored generation 1 into {target}\n"
    done = [line for line in log_lines(restored.stderr) if line["event"] == "restore.done"]
    assert done and done[0]["generation"] == 1


def test_restore_json_is_one_document_naming_what_was_moved_aside(tmp_path, saved):
    target = tmp_path / "occupied"
    target.mkdir()
    (target / "mine.txt").write_text("not the stored history\n")
    r = cli(elsewhere(saved, target), "restore", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert {k: doc[k] for k in ("action", "generation", "workspace", "key")} == \
        {"action": "restored", "generation": 1, "workspace": str(target), "key": KEY}
    assert (Path(doc["moved_aside"]) / "mine.txt").read_text() == "not the stored history\n"
    again = cli(elsewhere(saved, target), "restore", "--json")
    assert json.loads(again.stdout)["action"] == "skipped"
    assert json.loads(again.stdout)["moved_aside"] is None


def test_verify_json_is_one_document_saying_whether_the_generation_restores(tmp_path, saved):
    good = cli(saved, "verify", "--json")
    assert good.returncode == 0, good.stderr
    doc = json.loads(good.stdout)
    assert (doc["ok"], doc["generation"], doc["key"]) == (True, 1, KEY)
    assert doc["files"] >= 3 and len(doc["sha256"]) == 64

    manifest = json.loads((tmp_path / "store" / KEY / "manifest.json").read_bytes())
    bundle = tmp_path / "store" / KEY / "bundles" / manifest["bundle"]
    bundle.write_bytes(bundle.read_bytes()[:-64])
    bad = cli(saved, "verify", "--json")
    assert bad.returncode == 1
    doc = json.loads(bad.stdout)
    assert (doc["ok"], doc["generation"]) == (False, 1) and manifest["bundle"] in doc["error"]


# -- a reader that left before the result ------------------------------------------------------------


def closed_pipe() -> int:
    """The write end of a pipe whose reader has already gone: every write fails with EPIPE."""
    read, write = os.pipe()
    os.close(read)
    return write


def quietly(proc: subprocess.CompletedProcess) -> None:
    for sign in ("Traceback", "Exception ignored", "BrokenPipeError", "watcherd: "):
        assert sign not in proc.stderr, proc.stderr


@pytest.mark.parametrize("args", [["list"], ["list", "--json"], ["verify", "--json"],
                                  ["config", "check"], ["--help"], ["restore", "--help"]])
def test_a_one_shot_command_whose_reader_left_ends_quietly_with_its_own_status(saved, args):
    out = closed_pipe()
    try:
        proc = cli(saved, *args, stdout=out)
    finally:
        os.close(out)
    assert proc.returncode == 0, proc.stderr
    quietly(proc)


def test_a_restore_whose_reader_left_still_restores_and_exits_0(tmp_path, saved):
    target = tmp_path / "new-pod"
    out = closed_pipe()
    try:
        proc = cli(elsewhere(saved, target), "restore", stdout=out)
    finally:
        os.close(out)
    assert proc.returncode == 0, proc.stderr
    quietly(proc)
    assert (target / "src" / "app.py").read_text() == "print('saved')\n"


def test_status_whose_reader_left_ends_quietly(watcherd):
    d = watcherd().start()
    for args in (["status"], ["status", "--json"]):
        out = closed_pipe()
        try:
            proc = cli(d.config, *args, stdout=out)
        finally:
            os.close(out)
        assert proc.returncode == 0, proc.stderr
        quietly(proc)
    assert d.stop() == 0
