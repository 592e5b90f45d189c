"""The production path end to end: a real daemon saving to S3 over HTTP, a new pod restoring it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from daemon_fixture import LogLines
from helpers import git, tree_state, wait_for
from s3server import MotoS3, aws_env

WATCHERD = str(Path(sys.executable).with_name("watcherd"))
KEY = "acme/vmcp-123/main"
PREFIX = "sandboxes"


@pytest.fixture(scope="module")
def moto():
    server = MotoS3().start()
    yield server
    server.stop()


def _config(path: Path, workspace: Path, bucket: str) -> Path:
    """A pod's config; its state directory (an emptyDir of the watcherd containers) is
    ``<config name>-state`` beside it."""
    state_dir = path.with_name(f"{path.stem}-state")
    path.write_text(
        f'[workspace]\npath = "{workspace}"\nstate_dir = "{state_dir}"\n'
        '[watch]\nquiet_period = "200ms"\nidle_timeout = "1s"\nshutdown_timeout = "10s"\n'
        f'[store]\nurl = "s3://{bucket}/{PREFIX}"\nkey = "{KEY}"\n'
        '[control]\nlisten = ""\n'
        '[log]\nformat = "json"\n')
    return path


def _env(moto: MotoS3) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "WATCHERD_"))}
    return {**env, **aws_env(moto.endpoint)}


def _manifest(moto: MotoS3, bucket: str) -> dict | None:
    key = f"{PREFIX}/{KEY}/manifest.json"
    if key not in moto.keys(bucket, f"{PREFIX}/{KEY}/"):
        return None
    return json.loads(moto.client().get_object(Bucket=bucket, Key=key)["Body"].read())


def test_edits_reach_the_bucket_when_idle_and_a_new_pod_restores_them_exactly(tmp_path, moto):
    bucket = moto.new_bucket()
    ws = tmp_path / "pod1" / "app"
    ws.mkdir(parents=True)
    git(ws, "init", "-q")
    (ws / ".gitignore").write_text("node_modules/\n")
    (ws / "src").mkdir()
    (ws / "src" / "app.py").write_text("print('hello')\n")
    git(ws, "add", "-A")
    git(ws, "commit", "-q", "-m", "template")
    cfg = _config(tmp_path / "pod1.toml", ws, bucket)
    repo = tmp_path / "pod1-state" / KEY / "repo.git"  # watcherd's own repository
    daemon = subprocess.Popen([WATCHERD, "--config", str(cfg), "run"], env=_env(moto),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = LogLines(daemon.stdout)
    try:
        log.wait("daemon.ready", timeout=20)
        # What an agent does: edit a tracked file, add files, make one executable, link one.
        (ws / "src" / "app.py").write_text("print('hello, world')\n")
        (ws / "src" / "ünïcode name.txt").write_text("spaces and accents\n")
        (ws / "run.sh").write_text("#!/bin/sh\nexec python src/app.py\n")
        (ws / "run.sh").chmod(0o755)
        (ws / "latest").symlink_to("src/app.py")
        (ws / "data.bin").write_bytes(os.urandom(3 * 2**20))
        (ws / "node_modules" / "pkg").mkdir(parents=True)
        (ws / "node_modules" / "pkg" / "index.js").write_text("ignored\n")

        def saved_with_everything() -> dict | None:
            m = _manifest(moto, bucket)
            local = subprocess.run(["git", f"--git-dir={repo}", "rev-parse", "-q", "--verify",
                                    "refs/watcherd/snapshots"],
                                   capture_output=True, text=True).stdout.strip()
            if m and local and m["snapshot"] == local and \
                    "data.bin" in git(tmp_path, f"--git-dir={repo}", "ls-tree", "-r",
                                      "--name-only", local):
                return m
            return None

        manifest = wait_for(saved_with_everything, timeout=30, message="a generation in the bucket")
        bundles = moto.keys(bucket, f"{PREFIX}/{KEY}/bundles/")
        assert bundles == [f"{PREFIX}/{KEY}/bundles/{manifest['bundle']}"]

        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=20) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
    log.join()
    assert log.events("generation.saved")
    assert not (ws / ".git" / "watcherd").exists()  # nothing of watcherd's in the workspace

    # A new pod: an empty emptyDir, the same store key, a state directory of its own.
    new_ws = tmp_path / "pod2" / "app"
    new_ws.parent.mkdir()
    cfg2 = _config(tmp_path / "pod2.toml", new_ws, bucket)
    restored = subprocess.run([WATCHERD, "--config", str(cfg2), "restore"], env=_env(moto),
                              capture_output=True, text=True, timeout=60)
    assert restored.returncode == 0, restored.stderr
    expected = {p: v for p, v in tree_state(ws).items() if not p.startswith("node_modules")}
    assert tree_state(new_ws) == expected
    assert git(new_ws, "symbolic-ref", "HEAD") == git(ws, "symbolic-ref", "HEAD")
    assert git(new_ws, "rev-parse", "HEAD") == git(ws, "rev-parse", "HEAD")
    assert git(new_ws, "status", "--porcelain") == git(ws, "status", "--porcelain")
