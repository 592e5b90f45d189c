"""Logs: JSON lines off a TTY, readable lines on one, levels, and secrets that never appear."""

from __future__ import annotations

import collections
import errno
import io
import json
import logging
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest
import structlog
from helpers import read_until

from watcherd import log

TOKEN = "ctl-token-5d1e0f7a9b3c"
AWS_SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"
AWS_SESSION = "FwoGZXIvYXdzEXAMPLE-session-token-value"


@pytest.fixture(autouse=True)
def restore_structlog():
    """Each test configures logging for the process: put back what was there for the next one."""
    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    structlog.configure(**saved)
    root.handlers[:] = handlers
    root.setLevel(level)


def json_lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


@pytest.fixture
def tty():
    """A writable text stream that is a terminal, and the fd that reads what was written to it."""
    master, slave = os.openpty()
    stream = os.fdopen(slave, "w", encoding="utf-8")
    yield stream, master
    stream.close()
    os.close(master)


# -- format -----------------------------------------------------------------------------------------


def test_json_lines_when_not_a_tty_with_event_level_timestamp_and_facts():
    out = io.StringIO()
    log.configure("info", "auto", stream=out)
    before = datetime.now(UTC)
    log.get("watcherd.test").info("snapshot.done", commit="abc123", files=3, duration_ms=12)
    log.get("watcherd.test").warning("bundle.large", bytes=2**30)
    first, second = json_lines(out)
    assert first["event"] == "snapshot.done" and first["level"] == "info"
    assert (first["commit"], first["files"], first["duration_ms"]) == ("abc123", 3, 12)
    assert second["level"] == "warning"
    stamp = datetime.fromisoformat(first["timestamp"].replace("Z", "+00:00"))
    assert stamp.utcoffset() == timedelta(0)
    assert before - timedelta(seconds=5) < stamp < datetime.now(UTC) + timedelta(seconds=5)


def test_json_is_one_line_per_event_even_with_newlines_in_values():
    out = io.StringIO()
    log.configure("info", "json", stream=out)
    log.get("t").info("git.failed", stderr="fatal: one\nfatal: two\n")
    assert len(out.getvalue().splitlines()) == 1
    assert json_lines(out)[0]["stderr"] == "fatal: one\nfatal: two\n"


def test_readable_console_lines_on_a_tty(tty):
    stream, master = tty
    assert stream.isatty()
    log.configure("info", "auto", stream=stream)
    log.get("t").info("watch.ready", watches=51)
    text = read_until(master, b"watches").decode()
    assert "watch.ready" in text and "info" in text
    assert not text.lstrip().startswith("{"), f"JSON on a terminal: {text!r}"
    assert "\x1b[" in text  # colours, because it is a terminal


def test_json_format_can_be_forced_on_a_tty(tty):
    stream, master = tty
    log.configure("info", "json", stream=stream)
    log.get("t").info("watch.ready", watches=51)
    line = read_until(master, b"}").decode().strip()
    assert json.loads(line)["event"] == "watch.ready"


def test_console_format_can_be_forced_off_a_tty():
    out = io.StringIO()
    log.configure("info", "console", stream=out)
    log.get("t").info("watch.ready", watches=51)
    assert "watch.ready" in out.getvalue() and "watches=51" in out.getvalue()
    assert "\x1b[" not in out.getvalue()  # no colours into a file
    with pytest.raises(json.JSONDecodeError):
        json.loads(out.getvalue())


# -- levels -----------------------------------------------------------------------------------------


def test_debug_is_hidden_at_info_level():
    out = io.StringIO()
    log.configure("info", "json", stream=out)
    log.get("t").debug("s3.upload", key="k")
    log.get("t").info("generation.saved", generation=2)
    assert [e["event"] for e in json_lines(out)] == ["generation.saved"]


def test_debug_is_shown_at_debug_level():
    out = io.StringIO()
    log.configure("debug", "json", stream=out)
    log.get("t").debug("s3.upload", key="k")
    assert [e["level"] for e in json_lines(out)] == ["debug"]


def test_warning_level_hides_info_but_keeps_errors():
    out = io.StringIO()
    log.configure("warning", "json", stream=out)
    log.get("t").info("a")
    log.get("t").warning("b")
    log.get("t").error("c")
    assert [e["event"] for e in json_lines(out)] == ["b", "c"]


# -- configure again ---------------------------------------------------------------------------------


def test_configure_again_switches_stream_level_and_format_for_existing_loggers():
    logger = log.get("watcherd.module")  # module-level loggers are created once, at import
    first, second = io.StringIO(), io.StringIO()
    log.configure("info", "json", stream=first)
    logger.info("one")
    log.configure("debug", "console", stream=second)
    logger.debug("two")
    assert [e["event"] for e in json_lines(first)] == ["one"]
    assert "two" in second.getvalue() and "one" not in second.getvalue()


# -- secrets ----------------------------------------------------------------------------------------


@pytest.fixture
def secrets_in_env(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
    monkeypatch.setenv("AWS_SESSION_TOKEN", AWS_SESSION)


def log_every_kind_of_leak(logger) -> None:
    logger.info("plain", note=f"token {TOKEN} secret {AWS_SECRET} session {AWS_SESSION}")
    logger.info("nested", request={"headers": {"x": [f"Bearer {TOKEN}"]}, "items": [AWS_SECRET, (AWS_SESSION,)]})
    try:
        raise RuntimeError(f"S3 said no to {AWS_SECRET}")
    except RuntimeError as exc:
        logger.error("store.failed", error=str(exc))
        logger.error("store.failed_obj", error=exc)
        logger.exception("store.crashed")


LEAKS = (TOKEN, AWS_SECRET, AWS_SESSION)


def test_known_secrets_are_masked_in_json_everywhere(secrets_in_env):
    out = io.StringIO()
    log.configure("info", "json", stream=out, secrets=[TOKEN])
    log_every_kind_of_leak(log.get("t"))
    text = out.getvalue()
    for leak in LEAKS:
        assert leak not in text
    events = {e["event"]: e for e in json_lines(out)}
    assert events["plain"]["note"] == "token ******** secret ******** session ********"
    assert events["nested"]["request"] == {"headers": {"x": ["Bearer ********"]},
                                           "items": ["********", ["********"]]}
    assert events["store.failed"]["error"] == "S3 said no to ********"
    assert events["store.failed_obj"]["error"] == "S3 said no to ********"


def test_exception_tracebacks_are_rendered_then_masked(secrets_in_env):
    out = io.StringIO()
    log.configure("info", "json", stream=out, secrets=[TOKEN])
    log_every_kind_of_leak(log.get("t"))
    crashed = next(e for e in json_lines(out) if e["event"] == "store.crashed")
    # format_exc_info ran before the redaction: the traceback is a string, with the secret masked.
    assert "Traceback (most recent call last)" in crashed["exception"]
    assert "RuntimeError: S3 said no to ********" in crashed["exception"]
    assert "exc_info" not in crashed


def test_known_secrets_are_masked_on_a_tty(secrets_in_env, tty):
    stream, master = tty
    log.configure("info", "auto", stream=stream, secrets=[TOKEN])
    log_every_kind_of_leak(log.get("t"))
    log.get("t").info("the.end")
    text = read_until(master, b"the.end").decode()
    assert "Traceback (most recent call last)" in text and "S3 said no to ********" in text
    for leak in LEAKS:
        assert leak not in text


@pytest.mark.parametrize("name", ["token", "control_token", "secret", "aws_secret_access_key", "password",
                                  "db_password", "Authorization", "credentials"])
def test_fields_named_like_secrets_are_masked_whatever_they_hold(name):
    out = io.StringIO()
    log.configure("info", "json", stream=out)
    log.get("t").info("e", **{name: "not-registered-anywhere"}, nested={"inner": {name: "also-not-registered"}})
    event = json_lines(out)[0]
    assert event[name] == "********"
    assert event["nested"]["inner"][name] == "********"
    assert "registered" not in out.getvalue()


def test_fields_named_like_secrets_are_masked_in_console_output():
    out = io.StringIO()
    log.configure("info", "console", stream=out)
    log.get("t").info("e", token="not-registered-anywhere", password="hunter2-hunter2")
    assert "not-registered-anywhere" not in out.getvalue() and "hunter2" not in out.getvalue()
    assert "token=********" in out.getvalue()


def test_url_passwords_are_masked():
    out = io.StringIO()
    log.configure("info", "json", stream=out)
    log.get("t").info("template.clone", url="https://x-access-token:ghp_1234567890abcdef@github.com/a/b.git")
    assert json_lines(out)[0]["url"] == "https://x-access-token:********@github.com/a/b.git"


@pytest.mark.parametrize(("text", "shown"), [
    ("clone https://bot:p@ss@word@git.example.com/a.git failed",
     "clone https://bot:********@git.example.com/a.git failed"),
    ("http://minio:minio123@127.0.0.1:9000", "http://minio:********@127.0.0.1:9000"),
    ("a https://u:one@h/x and https://v:two@k/y", "a https://u:********@h/x and https://v:********@k/y"),
    ("http://127.0.0.1:9000/bucket@v2", "http://127.0.0.1:9000/bucket@v2"),
    ("ssh://git@github.com/org/repo.git", "ssh://git@github.com/org/repo.git"),
])
def test_url_credentials_masking_takes_the_whole_password_and_nothing_else(text, shown):
    assert log.mask_url_credentials(text) == shown


def test_secrets_inside_sets_and_other_objects_are_masked():
    # The JSON renderer str()s what it cannot encode after the redaction ran: check it before.
    out = io.StringIO()
    log.configure("info", "json", stream=out, secrets=[TOKEN])

    class Opaque:
        def __repr__(self) -> str:
            return f"Opaque(auth={TOKEN!r})"

    log.get("t").info("e", tags={TOKEN}, thing=Opaque())
    assert TOKEN not in out.getvalue()
    assert json_lines(out)[0]["thing"] == "Opaque(auth='********')"


def test_secrets_inside_namedtuples_are_masked():
    out = io.StringIO()
    log.configure("info", "json", stream=out, secrets=[TOKEN])
    Address = collections.namedtuple("Address", "host auth")
    log.get("t").info("e", where=Address("h", TOKEN))
    assert json_lines(out)[0]["where"] == ["h", "********"]


def test_namedtuples_and_paths_keep_their_shape_in_console_output(tmp_path):
    out = io.StringIO()
    log.configure("info", "console", stream=out)
    Address = collections.namedtuple("Address", "host port")
    log.get("t").info("e", where=Address("h", 1), path=tmp_path)
    assert "Address(host='h', port=1)" in out.getvalue()
    assert str(tmp_path) in out.getvalue()


def test_redact_knows_environment_secrets_before_logging_is_configured(monkeypatch):
    # The CLI prints configuration errors before it can configure logging.
    fresh = "never-registered-" + os.urandom(8).hex()
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", fresh)
    assert log.redact(f"store.url: {fresh!r} has no scheme") == "store.url: '********' has no scheme"


def test_short_values_are_not_treated_as_secrets():
    # Masking "ab" would mangle every line; config requires a control.token of 16 characters.
    log.add_secret("ab")
    assert log.redact("abc") == "abc"


# -- delivery ---------------------------------------------------------------------------------------


def test_each_line_reaches_a_pipe_at_once_while_the_process_keeps_running(tmp_path):
    script = (
        "import sys\n"
        "from watcherd import log\n"
        "log.configure('info', 'auto')\n"
        "log.get('t').info('daemon.started', pid=1)\n"
        "sys.stdin.read()\n"  # block: a buffered line would never arrive before the process ends
        "log.get('t').info('daemon.stopped')\n"
    )
    # Python block-buffers a pipe unless told otherwise: take that away, as a deployment would.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=tmp_path, env=env)
    try:
        first = read_until(proc.stdout.fileno(), b"\n")
        assert json.loads(first)["event"] == "daemon.started"
        assert proc.poll() is None, "the process should still be blocked on stdin"
    finally:
        proc.stdin.close()
        proc.wait(timeout=10)
    rest = proc.stdout.read()
    assert json.loads(rest)["event"] == "daemon.stopped"
    proc.stdout.close()
    proc.stderr.close()


# -- other libraries' records -----------------------------------------------------------------------


def test_a_library_warning_is_one_json_line_with_its_logger_level_and_secrets_masked():
    # In a process of its own: the root logger is process-wide state.
    script = (
        "import logging, sys\n"
        "from watcherd import log\n"
        "log.configure('info', 'json', stream=sys.stdout)\n"
        f"logging.getLogger('botocore.credentials').warning("
        f"'Refreshing temporary credentials failed: %s', {AWS_SECRET!r})\n"
        "logging.getLogger('urllib3.connectionpool').info('Starting new HTTPS connection')\n"
        "logging.getLogger('botocore.hooks').debug('Event before-call')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=30, env={**os.environ, "AWS_SECRET_ACCESS_KEY": AWS_SECRET})
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(lines) == 1, proc.stdout  # info and debug of libraries stay out
    line = lines[0]
    assert line["event"] == "Refreshing temporary credentials failed: ********"
    assert (line["level"], line["logger"]) == ("warning", "botocore.credentials")
    assert datetime.fromisoformat(line["timestamp"].replace("Z", "+00:00")).utcoffset() == timedelta(0)
    assert AWS_SECRET not in proc.stdout


def test_a_library_error_with_a_traceback_is_rendered_like_ours():
    out = io.StringIO()
    log.configure("info", "json", stream=out, secrets=[TOKEN])
    try:
        raise ConnectionError(f"reset while sending {TOKEN}")
    except ConnectionError:
        logging.getLogger("urllib3.connectionpool").exception("Retrying request")
    logging.getLogger("urllib3.connectionpool").warning("Connection pool is full")
    first, second = json_lines(out)
    assert (first["event"], first["level"], first["logger"]) == \
        ("Retrying request", "error", "urllib3.connectionpool")
    assert "ConnectionError: reset while sending ********" in first["exception"]
    assert second["event"] == "Connection pool is full" and second["level"] == "warning"
    assert TOKEN not in out.getvalue()


def test_a_library_warning_is_hidden_when_the_level_is_error():
    out = io.StringIO()
    log.configure("error", "json", stream=out)
    logging.getLogger("botocore").warning("a warning")
    logging.getLogger("botocore").error("an error")
    assert [e["event"] for e in json_lines(out)] == ["an error"]


def test_configure_again_moves_library_records_to_the_new_stream_without_duplicates():
    first, second = io.StringIO(), io.StringIO()
    log.configure("info", "json", stream=first)
    log.configure("info", "console", stream=second)
    logging.getLogger("botocore").warning("once")
    assert first.getvalue() == ""
    assert second.getvalue().count("once") == 1 and "botocore" in second.getvalue()


# -- a stream that cannot be written ------------------------------------------------------------------


class Failing(io.StringIO):
    """A stream whose writes fail as a closed pipe's or a full disk's do."""

    def __init__(self, error: OSError) -> None:
        super().__init__()
        self.error = error
        self.attempts = 0

    def write(self, text: str) -> int:
        self.attempts += 1
        raise self.error


@pytest.mark.parametrize("error", [BrokenPipeError(errno.EPIPE, "Broken pipe"),
                                   OSError(errno.EBADF, "Bad file descriptor"),
                                   OSError(errno.ENOSPC, "No space left on device")],
                         ids=["EPIPE", "EBADF", "ENOSPC"])
def test_a_failing_stream_never_raises_into_the_code_that_logs(error, capsys):
    stream = Failing(error)
    log.configure("info", "json", stream=stream)
    for n in range(3):
        log.get("t").info("snapshot.committed", n=n)
    logging.getLogger("botocore").warning("and a library's record")
    assert stream.attempts == 1  # given up after the first failure, silently
    said = capsys.readouterr().err
    assert said.count("\n") == 1 and error.strerror in said and "logging stops" in said


def test_a_closed_pipe_on_stdout_ends_logging_and_the_process_exits_0_quietly():
    # Python's own flush of stdout at exit would fail too and make the status 120.
    script = (
        "import sys\n"
        "from watcherd import log\n"
        "log.configure('info', 'json', stream=sys.stdout)\n"
        "for n in range(3):\n"
        "    log.get('t').info('line', n=n)\n"
        "print('still running', file=sys.stderr)\n"
    )
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first line
    try:
        proc = subprocess.run([sys.executable, "-c", script], stdout=write, stderr=subprocess.PIPE,
                              text=True, timeout=30)
    finally:
        os.close(write)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == [
        "watcherd: cannot write log lines to <stdout> (Broken pipe); logging stops there, "
        "watching and saving go on",
        "still running"]
