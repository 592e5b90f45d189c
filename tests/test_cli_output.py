"""Where watcherd's output goes, as a shell pipeline or a log collector sees it: a reader that
goes away (``| head``, a ``tee`` killed by Ctrl-C) never stops a save."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from daemon_fixture import WATCHERD, _env, free_port, make_workspace, write_config
from helpers import read_until

KEY = "acme/output-1/main"

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify is Linux-only")


def test_the_daemon_whose_stdout_reader_left_after_ready_still_makes_its_final_save(tmp_path):
    ws = make_workspace(tmp_path / "ws")
    store = tmp_path / "store"
    cfg = write_config(tmp_path / "run.toml", workspace=ws, store=store, key=KEY,
                       listen=f"127.0.0.1:{free_port()}")
    read, write = os.pipe()
    proc = subprocess.Popen([WATCHERD, "--config", str(cfg), "run"], stdout=write,
                            stderr=subprocess.PIPE, text=True, env=_env())
    os.close(write)
    try:
        read_until(read, b'"daemon.ready"', timeout=20)
        os.close(read)  # `watcherd run | head -n 4`: the reader had its lines and left
        (ws / "src" / "app.py").write_text("print('written after the reader left')\n")
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    stderr = proc.stderr.read()
    proc.stderr.close()

    assert code == 0, stderr
    assert "Traceback" not in stderr and "Exception ignored" not in stderr
    assert stderr.count("cannot write log lines to <stdout> (Broken pipe)") == 1
    target = tmp_path / "restored"
    restore = write_config(tmp_path / "restore.toml", workspace=target, store=store, key=KEY,
                           listen="")
    restored = subprocess.run([WATCHERD, "--config", str(restore), "restore"],
                              capture_output=True, text=True, timeout=60, env=_env())
    assert restored.returncode == 0, restored.stderr
    assert (target / "src" / "app.py").read_text() == "print('written after the reader left')\n"
