"""Security: secrets never reach an output, the control endpoint stays on loopback, and nothing an
agent can write (the workspace's ``.git/config``, hooks, a template, a crafted bundle) makes
watcherd run a command or write outside the workspace and its state directory.

watcherd holds the store's credentials and the agent edits the workspace, including ``.git/config``.
Shadow mode never runs git with the workspace's repository (its config is data, see
``test_trust_boundary.py``); branch mode does, through a door that turns the commands off. Each
case plants a command that would leave a marker file, proves where it can that plain git does run
it, then runs watcherd and checks the marker never appears. Filter drivers are covered in
``test_trust_boundary.py``, signing programs in ``test_snapshot.py``.
"""

from __future__ import annotations

import http.server
import ipaddress
import json
import os
import shutil
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest
from structlog.testing import capture_logs

import daemon_fixture
from daemon_fixture import Daemon, free_port, run_cli, watcherd  # noqa: F401 (fixture)
from helpers import git, make_repo, publish, sgit, state_repo, tree_state, wait_for
from s3server import MotoS3, aws_env
from watcherd import config as wconfig
from watcherd import snapshot, state
from watcherd.config import Config, RestoreConfig, StoreConfig, WorkspaceConfig, parse_store_url
from watcherd.errors import RestoreError
from watcherd.generations import Generations
from watcherd.repo import SNAPSHOT_REF
from watcherd.restore import restore
from watcherd.store.local import LocalStore

KEY = "acme/security/main"
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify is Linux-only")


# -- helpers -------------------------------------------------------------------------------------------



def config_for(ws: Path, store_dir: Path, **restore_options) -> Config:
    """The config of the pod whose workspace is ``ws``: its state directory is beside it (the one
    ``helpers.state_repo`` names)."""
    return Config(workspace=WorkspaceConfig(path=ws, state_dir=ws.parent / f"{ws.name}-state"),
                  store=StoreConfig(url=parse_store_url(f"file://{store_dir}"), key=KEY),
                  restore=RestoreConfig(**restore_options))


def gens_for(store_dir: Path) -> Generations:
    return Generations(LocalStore(store_dir), KEY)


def take(ws: Path, mode: str = "shadow") -> snapshot.Snapshot:
    repo = state_repo(ws, KEY)
    snapshot.prepare(repo)
    return snapshot.take(repo, mode)


def save(ws: Path, store_dir: Path, mode: str = "shadow", **options):
    take(ws, mode)
    return gens_for(store_dir).save(state_repo(ws, KEY), **options)


def in_state(ws: Path, *args: str, input: bytes | None = None) -> str:
    """git in watcherd's own repository for ``ws`` (``helpers.sgit``, with stdin)."""
    return git(ws.parent, f"--git-dir={state_repo(ws, KEY).git_dir}", *args, input=input)


class Marker:
    """A script that records each run in a marker file; ``ran`` says whether anything ran it."""

    def __init__(self, base: Path, name: str = "hostile") -> None:
        self.file = base / f"{name}-ran"
        self.script = base / f"{name}.sh"
        # Prints nothing and fails: whatever git expected from it, it gets nothing useful.
        self.script.write_text(f'#!/bin/sh\necho "$0 $*" >> "{self.file}"\nexit 1\n')
        self.script.chmod(0o755)

    @property
    def ran(self) -> str:
        return self.file.read_text() if self.file.exists() else ""

    def hooks_dir(self, path: Path) -> Path:
        """A hooks directory where every hook git knows runs this marker."""
        path.mkdir(parents=True, exist_ok=True)
        for hook in ("pre-commit", "prepare-commit-msg", "commit-msg", "post-commit",
                     "post-checkout", "post-merge", "post-rewrite", "reference-transaction",
                     "pre-auto-gc", "post-index-change", "fsmonitor-watchman", "pre-push",
                     "push-to-checkout", "sendemail-validate", "p4-pre-submit"):
            (path / hook).write_text(f'#!/bin/sh\necho "{hook} $*" >> "{self.file}"\n')
            (path / hook).chmod(0o755)
        return path


def events(logs: list[dict], name: str) -> list[dict]:
    return [e for e in logs if e["event"] == name]


# -- secrets never reach an output ---------------------------------------------------------------------

SECRET = "wrong-secret-" + uuid.uuid4().hex  # the secret key the daemon holds (wrong for the store)
SESSION = "session-token-" + uuid.uuid4().hex
CONTROL = "control-token-" + uuid.uuid4().hex
TEMPLATE_PASSWORD = "template-pw-" + uuid.uuid4().hex
SECRETS = (SECRET, SESSION, CONTROL, TEMPLATE_PASSWORD)


def assert_no_secret(where: str, text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"{where} shows a secret: {text[:2000]}"


@pytest.fixture(scope="module")
def moto():
    server = MotoS3().start()
    yield server
    server.stop()


def s3_daemon(make, moto: MotoS3, bucket: str, token: str) -> Daemon:
    """A daemon on a moto S3 store, with debug logs (everything the store says is logged)."""
    d = make(token=token, log_level="debug", watch={"shutdown_timeout": "1s"})
    text = d.config.read_text()
    text = text.replace(f'url = "file://{d.store}"', f'url = "s3://{bucket}/pre"')
    text += (f'\n[store.s3]\nendpoint_url = "{moto.endpoint}"\nforce_path_style = true\n'
             'region = "us-east-1"\nmax_attempts = 1\n')
    d.config.write_text(text)
    return d


@linux_only
def test_no_secret_reaches_logs_status_metrics_or_cli_output_while_s3_refuses_them(
        watcherd, moto, tmp_path):
    bucket = moto.new_bucket()
    key_id, _real_secret = moto.iam_user()
    env = aws_env(AWS_ACCESS_KEY_ID=key_id, AWS_SECRET_ACCESS_KEY=SECRET, AWS_SESSION_TOKEN=SESSION)
    d = s3_daemon(watcherd, moto, bucket, CONTROL)
    outputs: dict[str, str] = {}
    with moto.auth():
        d.start(env=env)
        failed = d.log.wait("upload.failed", timeout=20)
        assert "store" in failed["error"] or "s3://" in failed["error"]
        for path in ("/status", "/metrics"):
            code, body = d.request("GET", path)
            assert code == 200
            outputs[f"GET {path}"] = body.decode()
        assert json.loads(outputs["GET /status"])["last_error"]["op"] == "upload"
        # The CLI without the session token: the store answers SignatureDoesNotMatch instead of
        # InvalidToken, another error text to search.
        cli_env = {**os.environ, **env}
        del cli_env["AWS_SESSION_TOKEN"]
        for args in (["status", "--json"], ["status"], ["snapshot"], ["list"], ["verify"],
                     ["config", "check"]):
            r = subprocess.run([daemon_fixture.WATCHERD, "--config", str(d.config), *args],
                               capture_output=True, text=True, env=cli_env, timeout=60)
            outputs[" ".join(args)] = r.stdout + r.stderr
        assert "********" in outputs["config check"]  # the token is there, masked
        target = tmp_path / "restore-target"
        restore_cfg = tmp_path / "restore.toml"
        # Another pod: its own workspace and its own state directory.
        restore_cfg.write_text(d.config.read_text().replace(str(d.workspace), str(target))
                               .replace(str(d.state_dir), str(tmp_path / "restore-state")))
        r = subprocess.run([daemon_fixture.WATCHERD, "--config", str(restore_cfg), "restore"],
                           capture_output=True, text=True, env=cli_env, timeout=120)
        assert r.returncode == 1
        outputs["restore"] = r.stdout + r.stderr
        assert d.stop() == 1  # the final save could not reach the store, and it says so
    outputs["daemon log"] = "\n".join(json.dumps(line) for line in d.log.lines)
    outputs["daemon stderr"] = d.runs[-1][1].read_text()
    assert any("SignatureDoesNotMatch" in text or "InvalidToken" in text or "denied" in text
               for text in outputs.values()), "the store never refused: the test proves nothing"
    for where, text in outputs.items():
        assert_no_secret(where, text)


@pytest.mark.parametrize("userinfo", [f"deploy:{TEMPLATE_PASSWORD}", TEMPLATE_PASSWORD],
                         ids=["user-and-password", "password-only"])
def test_a_password_in_template_url_never_reaches_an_error_a_log_or_config_check(tmp_path, userinfo):
    # Both forms carry a secret: user:password, and a token as the user name (GitHub's form).
    store_dir = tmp_path / "store"
    port = free_port()  # nothing listens: the clone fails, with the URL in git's words
    cfg = tmp_path / "w.toml"
    cfg.write_text(f'[workspace]\npath = "{tmp_path / "ws"}"\n'
                   f'state_dir = "{tmp_path / "state"}"\n'
                   f'[store]\nurl = "file://{store_dir}"\nkey = "{KEY}"\n'
                   f'[restore]\non_missing = "template"\n'
                   f'template_url = "http://{userinfo}@127.0.0.1:{port}/t.git"\n'
                   '[control]\nlisten = ""\n[log]\nformat = "json"\nlevel = "debug"\n')

    restored = run_cli(cfg, "restore")
    checked = run_cli(cfg, "config", "check")

    assert restored.returncode == 1 and "restore.template_url" in restored.stderr
    assert "127.0.0.1" in restored.stderr  # the URL is named, without its password
    assert checked.returncode == 0 and "template_url" in checked.stdout
    for where, text in (("restore", restored.stdout + restored.stderr),
                        ("config check", checked.stdout + checked.stderr)):
        assert_no_secret(where, text)


@pytest.mark.parametrize("variable,value", [
    ("WATCHERD_STORE_S3_ENDPOINT_URL", f"http://AKIAEXAMPLE:{SECRET}@127.0.0.1:9000"),
    ("WATCHERD_STORE_URL", f"s3://AKIAEXAMPLE:{SECRET}@bucket/prefix"),
    ("WATCHERD_CONTROL_TOKEN", f"{CONTROL} with a space"),
], ids=["endpoint_url", "store url", "control token"])
def test_a_secret_in_a_refused_setting_is_not_printed(tmp_path, variable, value):
    cfg = tmp_path / "w.toml"
    cfg.write_text('[control]\nlisten = ""\n')
    for command in (["config", "check"], ["restore"], ["run"]):
        r = subprocess.run([daemon_fixture.WATCHERD, "--config", str(cfg), *command],
                           capture_output=True, text=True, timeout=30,
                           env={**os.environ, variable: value})
        assert r.returncode == 2 and variable in r.stderr, r
        assert_no_secret(" ".join(command), r.stdout + r.stderr)


# -- the control endpoint -----------------------------------------------------------------------------


def listening_addresses(pid: int) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket process ``pid`` listens on, from /proc."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table, width in (("tcp", 8), ("tcp6", 32)):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != "0A" or inode not in inodes:  # 0A: LISTEN
                continue
            hex_addr, hex_port = local.split(":")
            raw = bytes.fromhex(hex_addr)
            # /proc shows each 32-bit word in host (little-endian) order.
            words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            addr = ipaddress.ip_address(words) if width == 8 else ipaddress.IPv6Address(words)
            found.append((str(addr), int(hex_port, 16)))
    return found


def test_the_control_endpoint_defaults_to_loopback(tmp_path):
    cfg = tmp_path / "w.toml"
    cfg.write_text("[log]\nlevel = \"info\"\n")
    assert wconfig.load(str(cfg), {}).control.address == ("127.0.0.1", 7781)


@linux_only
@pytest.mark.parametrize("listen", ["127.0.0.1", "localhost", "[::1]"])
def test_the_control_endpoint_listens_on_loopback_only(watcherd, listen):
    port = free_port()
    d = watcherd(listen=f"{listen}:{port}")
    if listen == "[::1]":
        d.request = _request_v6(d)
    d.start()
    addresses = listening_addresses(d.pid)
    assert addresses and all(a in ("127.0.0.1", "::1") for a, _ in addresses), addresses
    assert {p for _, p in addresses} == {port}
    assert d.stop() == 0


def _request_v6(d: Daemon):
    import urllib.error
    import urllib.request

    def request(method, path, *, token=None, timeout=20.0):
        req = urllib.request.Request(f"http://[::1]:{d.port}{path}", method=method,
                                     data=b"" if method == "POST" else None)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()
    return request


@linux_only
def test_a_loopback_endpoint_with_a_token_still_answers_401_without_it(watcherd):
    d = watcherd(token=CONTROL).start()
    for method, path in (("GET", "/status"), ("GET", "/metrics"), ("POST", "/snapshot"),
                         ("POST", "/activity")):
        code, body = d.request(method, path, token="")
        assert code == 401, path
        assert_no_secret(path, body.decode())
    assert d.request("GET", "/status")[0] == 200
    assert d.stop() == 0


# -- restore runs no hooks and writes nothing outside ----------------------------------------------------


@pytest.fixture
def hostile_git_template(tmp_path):
    """The host's git template directory (init.templateDir) carries hooks: every `git init` and
    `git clone` copies them into the new repository, where git would run them."""
    marker = Marker(tmp_path, "template-hook")
    template = tmp_path / "git-template"
    marker.hooks_dir(template / "hooks")
    with open(os.environ["GIT_CONFIG_GLOBAL"], "a") as f:
        f.write(f"[init]\n\ttemplateDir = {template}\n")
    return marker


def test_restore_from_a_template_runs_none_of_its_hooks(tmp_path, hostile_git_template):
    marker = hostile_git_template
    source = make_repo(tmp_path / "template-src")
    # The template repository's own hooks and config (never copied by a clone, but hostile anyway).
    Marker(tmp_path, "template-hook").hooks_dir(source / ".git" / "hooks")
    git(source, "config", "core.fsmonitor", str(marker.script))
    template = tmp_path / "template.git"
    git(tmp_path, "clone", "-q", "--bare", str(source), str(template))
    # Proof the hooks are live: a plain clone runs post-checkout.
    git(tmp_path, "clone", "-q", str(template), str(tmp_path / "plain-clone"))
    assert "post-checkout" in marker.ran
    marker.file.unlink()

    outcome = restore(config_for(tmp_path / "ws", tmp_path / "store", on_missing="template",
                                 template_url=str(template)), gens_for(tmp_path / "store"))

    assert outcome.action == "template" and (tmp_path / "ws" / "readme.md").exists()
    assert marker.ran == ""


def test_restore_from_a_bundle_runs_no_hook(tmp_path, hostile_git_template):
    marker = hostile_git_template
    ws = make_repo(tmp_path / "ws")
    (ws / "readme.md").write_text("saved\n")
    (ws / "untracked.txt").write_text("untracked\n")
    save(ws, tmp_path / "store")
    marker.file.unlink(missing_ok=True)  # the test's own git calls above may have run them

    restore(config_for(tmp_path / "restored", tmp_path / "store"), gens_for(tmp_path / "store"))

    assert tree_state(tmp_path / "restored") == tree_state(ws)
    assert marker.ran == ""


def _literal_tree(run, entries: list[tuple[str, bytes, str]]) -> str:
    """A tree object git's porcelain would never write (".." names, ".git", duplicates), written
    by ``run`` (git in some repository)."""
    data = b"".join(mode.encode() + b" " + name + b"\0" + bytes.fromhex(oid)
                    for mode, name, oid in entries)
    return run("hash-object", "-w", "--literally", "-t", "tree", "--stdin", input=data)


def _hostile_tree(run, entry: str, marker: Marker, outside: Path) -> str:
    """A top-level tree with ``readme.md`` and an ``entry`` that would write a hook or a file
    outside the tree it is checked out into."""
    payload = run("hash-object", "-w", "--stdin",
                  input=f'#!/bin/sh\necho escaped >> "{marker.file}"\n'.encode())
    ok = run("hash-object", "-w", "--stdin", input=b"fine\n")
    inner = _literal_tree(run, [("100755", b"post-checkout", payload), ("100644", b"x", payload)])
    if entry in ("..", ".git", ".GIT"):
        hooks = _literal_tree(run, [("40000", b"hooks", inner)])
        top = [("40000", entry.encode(), hooks if entry != ".." else inner)]
    elif entry == "link-then-dir":  # "d" is a link to the outside, and also a directory
        link = run("hash-object", "-w", "--stdin", input=str(outside).encode())
        top = [("120000", b"d", link), ("40000", b"d", inner)]
    elif entry == "dot-dot-dir":
        top = [("40000", b"a", _literal_tree(run, [("40000", b"..", _literal_tree(
            run, [("40000", b"..", inner)]))]))]
    else:
        top = [("100644", entry.encode(), payload)]
    return _literal_tree(run, [*top, ("100644", b"readme.md", ok)])


def _with_index_tree(ws: Path, s_commit: str, index_tree: str) -> str:
    """State commit ``s_commit`` with its recorded index replaced by ``index_tree`` (as a
    tampered store could hand it back: a well-formed state commit, a hostile staged tree)."""
    listing = in_state(ws, "ls-tree", s_commit).splitlines()
    entries = [line for line in listing if not line.endswith("\tindex")]
    entries.append(f"040000 tree {index_tree}\tindex")
    tree = in_state(ws, "mktree", input=("\n".join(entries) + "\n").encode())
    parents = in_state(ws, "rev-list", "--parents", "-n", "1", s_commit).split()[1:]
    args = [a for p in parents for a in ("-p", p)]
    return in_state(ws, "commit-tree", tree, *args, "-m", state.SUBJECT)


@pytest.mark.parametrize("entry", ["..", ".git", ".GIT", "../escaped", "/abs-escaped",
                                   "link-then-dir", "dot-dot-dir"])
@pytest.mark.parametrize("in_commit", ["snapshot", "HEAD", "index"])
def test_a_tree_with_entries_that_escape_is_refused_and_nothing_is_written_outside(
        tmp_path, entry, in_commit):
    # A store that hands back a well-formed generation whose trees are hostile: the snapshot's
    # working tree, the user's branch (and the snapshot of its checkout), or the recorded index.
    marker = Marker(tmp_path, "tree-hook")
    ws = make_repo(tmp_path / "ws")
    store_dir = tmp_path / "store"
    first = save(ws, store_dir)  # generation 1, good
    head = git(ws, "rev-parse", "HEAD")
    prev = first.snapshot
    s_commit = state.state_parent(state_repo(ws, KEY).bare, prev)
    if in_commit == "HEAD":  # the user's own branch carries it; a snapshot records it
        tree = _hostile_tree(lambda *a, **k: git(ws, *a, **k), entry, marker, tmp_path)
        head = git(ws, "commit-tree", tree, "-p", head, "-m", "hostile")
        git(ws, "update-ref", "refs/heads/main", head)
        prev = take(ws).commit
        s_commit = state.state_parent(state_repo(ws, KEY).bare, prev)
        assert state.read(state_repo(ws, KEY).bare, s_commit).head.oid == head
    else:
        tree = _hostile_tree(lambda *a, **k: in_state(ws, *a, **k), entry, marker, tmp_path)
    if in_commit == "index":
        s_commit = _with_index_tree(ws, s_commit, tree)
        tree = in_state(ws, "rev-parse", f"{prev}^{{tree}}")
    snap = in_state(ws, "commit-tree", tree, "-p", prev, "-p", head, "-p", s_commit,
                    "-m", "watcherd: snapshot (hostile)")
    in_state(ws, "update-ref", SNAPSHOT_REF, snap)
    bundle = tmp_path / "hostile.bundle"
    in_state(ws, "bundle", "create", "-q", str(bundle), SNAPSHOT_REF)
    publish(store_dir, KEY, bundle, snapshot_commit=snap, head=head, head_ref="refs/heads/main")
    target = tmp_path / "deep" / "restored"
    target.parent.mkdir()
    before = sorted(p.name for p in tmp_path.iterdir())

    with capture_logs() as logs:
        outcome = restore(config_for(target, store_dir), gens_for(store_dir))

    assert sorted(p.name for p in tmp_path.iterdir()) == before
    # The restored tree and its pod's state directory, nothing else.
    assert sorted(p.name for p in target.parent.iterdir()) == ["restored", "restored-state"]
    assert not (target / ".git" / "hooks" / "post-checkout").exists()
    assert marker.ran == ""
    if entry == "link-then-dir":
        # git takes the later of two entries with one name: a real directory, nothing followed.
        assert outcome.generation == 2
        assert not (target / "d").is_symlink()
        if in_commit == "index":  # staged, not in the working tree: restored as staged
            assert git(target, "ls-files", "--stage", "d", "d/x").split("\n")[-1].endswith("\td/x")
            assert not os.path.lexists(target / "d")
        else:
            assert (target / "d" / "x").is_file()
    else:
        assert (outcome.action, outcome.generation) == ("restored", 1)
        assert [e["generation"] for e in events(logs, "restore.generation_bad")] == [2]
        assert (target / "readme.md").read_text() == "hello\n"


# -- the workspace's .git/config runs nothing through watcherd -------------------------------------------


def plant(ws: Path, marker: Marker, case: str) -> None:
    """Write the hostile ``case`` into the workspace's own config (and hooks, attributes)."""
    cmd = str(marker.script)
    settings: list[tuple[str, str]] = []
    if case == "core.fsmonitor":
        settings = [("core.fsmonitor", cmd)]
    elif case == "core.hooksPath":
        settings = [("core.hooksPath", str(marker.hooks_dir(ws.parent / "hooks")))]
    elif case == ".git/hooks":
        marker.hooks_dir(ws / ".git" / "hooks")
    elif case == "gc.auto":
        settings = [("gc.auto", "1"), ("gc.autoDetach", "false"), ("gc.autoPackLimit", "1")]
        marker.hooks_dir(ws / ".git" / "hooks")
    elif case == "core.editor":
        settings = [("core.editor", cmd), ("sequence.editor", cmd)]
    elif case == "diff.external":
        settings = [("diff.external", cmd), ("diff.evil.textconv", cmd), ("diff.evil.command", cmd)]
        (ws / ".gitattributes").write_text("* diff=evil\n")
    elif case == "core.alternateRefsCommand":
        settings = [("core.alternateRefsCommand", cmd)]
    elif case == "credential.helper":
        settings = [("credential.helper", f"!{cmd}"), ("core.askPass", cmd)]
    else:
        raise AssertionError(case)
    for name, value in settings:
        git(ws, "config", name, value)


# What a snapshot and a save can reach: plain `git status`, `git add -A` and `git commit -m` run
# each of these (checked below). Editors, pagers, external diffs and textconv are never reached by
# the commands watcherd runs (commit -m, plumbing, no TTY); the daemon test plants them anyway.
SNAPSHOT_CASES = ["core.fsmonitor", "core.hooksPath", ".git/hooks", "gc.auto"]
ALL_CASES = [*SNAPSHOT_CASES, "core.editor", "diff.external", "core.alternateRefsCommand",
             "credential.helper"]


@pytest.mark.parametrize("case", SNAPSHOT_CASES)
@pytest.mark.parametrize("mode", ["shadow", "branch"])
def test_commands_in_the_workspace_config_never_run_during_snapshot_and_save(tmp_path, case, mode):
    marker = Marker(tmp_path)
    ws = make_repo(tmp_path / "ws")
    for i in range(3):  # loose objects and several commits: gc and repack have work to do
        (ws / f"f{i}.txt").write_text(f"{i}\n")
        git(ws, "add", "-A")
        git(ws, "commit", "-q", "-m", f"c{i}")
    plant(ws, marker, case)
    probe = tmp_path / "probe"
    shutil.copytree(ws, probe, symlinks=True)
    (probe / "x.txt").write_text("x\n")
    for args in (["status"], ["add", "-A"], ["commit", "-q", "-m", "probe"]):
        subprocess.run(["git", *args], cwd=probe, capture_output=True, check=False)
    assert marker.ran, f"plain git did not run the {case} command: the test proves nothing"
    marker.file.unlink()
    (ws / "readme.md").write_text("edited under a hostile config\n")
    (ws / "new.txt").write_text("new\n")

    result = save(ws, tmp_path / "store", mode)
    (ws / "readme.md").write_text("edited again\n")
    again = save(ws, tmp_path / "store", mode)

    assert (result.generation, again.generation) == (1, 2)
    assert marker.ran == ""


@linux_only
def test_the_daemon_runs_nothing_the_workspace_config_names(watcherd, tmp_path):
    marker = Marker(tmp_path)
    d = watcherd()
    for case in ALL_CASES:
        if case != "core.hooksPath":  # one hooks source at a time: .git/hooks is planted
            plant(d.workspace, marker, case)
    marker.file.unlink(missing_ok=True)
    d.start()
    d.settle()
    (d.workspace / "src" / "app.py").write_text("print('edited under a hostile config')\n")
    git_user = ["git", "-c", "core.hooksPath=/dev/null", "-c", "core.fsmonitor=false"]
    subprocess.run([*git_user, "commit", "-q", "-am", "the user's commit"], cwd=d.workspace,
                   check=True, capture_output=True)
    (d.workspace / "src" / "more.py").write_text("x = 1\n")
    # Right after the writes the daemon may not have read their events yet and still say "idle":
    # the file being in the snapshot is what counts.
    wait_for(lambda: d.shown("src/more.py") == "x = 1" and d.status()["state"] == "idle",
             timeout=15, message="everything saved")
    assert d.stop() == 0
    assert marker.ran == ""


# -- the fetch that completes a shallow history --------------------------------------------------------


@pytest.fixture
def upstream(tmp_path) -> Path:
    up = make_repo(tmp_path / "upstream")
    for i in range(3):
        (up / "readme.md").write_text(f"version {i}\n")
        git(up, "commit", "-q", "-am", f"v{i}")
    return up


def shallow_clone(tmp_path: Path, upstream: Path) -> Path:
    ws = tmp_path / "ws"
    git(tmp_path, "clone", "-q", "--depth", "1", f"file://{upstream}", str(ws))
    assert git(ws, "rev-parse", "--is-shallow-repository") == "true"
    return ws


class _Unauthorised(http.server.BaseHTTPRequestHandler):
    """Every request needs credentials: git asks its credential helpers, then askpass."""

    def do_GET(self):  # noqa: N802
        self.send_response(401)
        self.send_header("WWW-Authenticate", 'Basic realm="x"')
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def needs_credentials():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Unauthorised)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/repo.git"
    server.shutdown()
    server.server_close()


def hostile_origin(ws: Path, marker: Marker, case: str, upstream: Path, http_url: str) -> str:
    """Point ``origin`` (and the config around it) at a command; returns what plain git runs."""
    cmd = str(marker.script)
    if case == "remote.origin.uploadpack":
        git(ws, "config", "remote.origin.uploadpack", f"{cmd} uploadpack; git-upload-pack")
    elif case == "core.sshCommand":
        git(ws, "config", "remote.origin.url", "ssh://git@127.0.0.1:1/repo.git")
        git(ws, "config", "core.sshCommand", cmd)
    elif case == "core.gitProxy":
        git(ws, "config", "remote.origin.url", "git://127.0.0.1:1/repo.git")
        git(ws, "config", "core.gitProxy", cmd)
    elif case == "url.insteadOf ext::":
        git(ws, "config", "remote.origin.url", "https://example.invalid/repo.git")
        git(ws, "config", f"url.ext::sh -c {cmd}% #.insteadOf", "https://example.invalid/")
    elif case == "remote.origin.vcs":
        git(ws, "config", "remote.origin.vcs", "ext")
        git(ws, "config", "remote.origin.url", f"sh -c {cmd}")
    elif case == "credential.helper":
        git(ws, "config", "remote.origin.url", http_url)
        git(ws, "config", "credential.helper", f"!{cmd}")
        git(ws, "config", f"credential.{http_url}.helper", f"!{cmd}")
        git(ws, "config", "credential.username", "someone")
    elif case == "core.askPass":
        git(ws, "config", "remote.origin.url", http_url)
        git(ws, "config", "core.askPass", cmd)
    elif case == "core.alternateRefsCommand":
        alternate = upstream / ".git" / "objects"
        (ws / ".git" / "objects" / "info" / "alternates").write_text(f"{alternate}\n")
        git(ws, "config", "core.alternateRefsCommand", cmd)
    else:
        raise AssertionError(case)
    return case


ORIGIN_CASES = ["remote.origin.uploadpack", "core.sshCommand", "core.gitProxy",
                "url.insteadOf ext::", "remote.origin.vcs", "credential.helper", "core.askPass",
                "core.alternateRefsCommand"]
# Cases where plain git (as the user runs it) does run the command: proof the trap is live.
LIVE_WITH_PLAIN_GIT = {"remote.origin.uploadpack", "core.sshCommand", "core.gitProxy",
                       "credential.helper", "core.askPass", "core.alternateRefsCommand"}


@pytest.mark.parametrize("case", ORIGIN_CASES)
def test_the_unshallow_fetch_goes_to_the_operators_url_and_runs_no_command_of_the_workspace(
        tmp_path, upstream, needs_credentials, case):
    # The history a shallow clone lacks is fetched only from restore.template_url (the operator's
    # setting), never from the origin the workspace names, and the workspace's config (which could
    # rewrite any URL or name a program for any transport) is never read as config. Without a
    # template_url nothing is fetched at all: test_trust_boundary.py covers that.
    marker = Marker(tmp_path)
    ws = shallow_clone(tmp_path, upstream)
    hostile_origin(ws, marker, case, upstream, needs_credentials)
    operator_url = f"file://{upstream}"
    if case == "url.insteadOf ext::":  # would hijack the operator's URL too, if it were read
        git(ws, "config", "--add", f"url.ext::sh -c {marker.script}% #.insteadOf", operator_url)
    if case in LIVE_WITH_PLAIN_GIT:
        probe = tmp_path / "probe"
        shutil.copytree(ws, probe, symlinks=True)
        subprocess.run(["git", "fetch", "-q", "--unshallow", "origin"], cwd=probe,
                       capture_output=True, timeout=60,
                       env={**os.environ, "GIT_TERMINAL_PROMPT": "0"})
        assert marker.ran, f"plain git did not run the {case} command: the test proves nothing"
        marker.file.unlink()
    (ws / "readme.md").write_text("edited in a shallow clone\n")

    with capture_logs() as logs:
        result = save(ws, tmp_path / "store", template_url=operator_url)

    assert result.status == "saved"
    assert marker.ran == ""
    assert [e["origin"] for e in events(logs, "history.unshallowed")] == [operator_url]
    assert not events(logs, "history.self_contained")  # the real history, not a rewrite
    # The history was completed in watcherd's repository; the workspace is left as it was.
    assert git(ws, "rev-parse", "--is-shallow-repository") == "true"
    target = tmp_path / "restored"
    restore(config_for(target, tmp_path / "store"), gens_for(tmp_path / "store"))
    assert (target / "readme.md").read_text() == "edited in a shallow clone\n"
    assert git(target, "rev-parse", "--is-shallow-repository") == "false"
    assert git(target, "rev-list", "--count", "HEAD") == "4"  # initial, v0, v1, v2
    assert marker.ran == ""


def test_protocol_ext_stays_refused_for_a_template_url(tmp_path):
    marker = Marker(tmp_path)
    cfg = config_for(tmp_path / "ws", tmp_path / "store", on_missing="template",
                     template_url=f"ext::sh -c {marker.script}% x")
    with pytest.raises(RestoreError, match="template_url"):
        restore(cfg, gens_for(tmp_path / "store"))
    assert marker.ran == ""


# -- core.worktree: the snapshot is of the workspace, never of another directory -----------------------


def test_a_core_worktree_in_the_workspace_config_cannot_point_snapshots_elsewhere(tmp_path):
    secrets_dir = tmp_path / "sidecar-secrets"
    secrets_dir.mkdir()
    (secrets_dir / "token").write_text("the sidecar's service account token\n")
    ws = make_repo(tmp_path / "ws")
    git(ws, "config", "core.worktree", str(secrets_dir))
    (ws / "readme.md").write_text("the workspace's own edit\n")

    snap = take(ws)

    files = sgit(ws, "ls-tree", "-r", "--name-only", snap.commit, key=KEY).splitlines()
    assert "token" not in files
    assert files == ["readme.md"]
    assert sgit(ws, "show", f"{snap.commit}:readme.md", key=KEY) == "the workspace's own edit"
    blob = git(ws, "hash-object", str(secrets_dir / "token"))
    assert subprocess.run(["git", f"--git-dir={state_repo(ws, KEY).git_dir}", "cat-file", "-e",
                           blob]).returncode != 0


@pytest.mark.parametrize("mode", ["shadow", "branch"])
def test_core_bare_in_the_workspace_config_does_not_stop_snapshots(tmp_path, mode):
    ws = make_repo(tmp_path / "ws")
    git(ws, "config", "core.bare", "true")
    (ws / "readme.md").write_text("edited after core.bare was set\n")

    result = save(ws, tmp_path / "store", mode)

    assert result.status == "saved"
    assert sgit(ws, "show", f"{result.snapshot}:readme.md", key=KEY) == \
        "edited after core.bare was set"


def test_shallow_swapped_for_a_link_during_the_unshallow_fetch_is_never_read(
        tmp_path, upstream, monkeypatch):
    """While the unshallow fetch runs, the agent swaps the workspace's ``.git/shallow`` for a
    link to a file only watcherd's uid may read. The fetch works on watcherd's own copy of the
    boundary (taken as data at the snapshot): the file's first line appears in no log line, no
    status, no snapshot; the next snapshot refuses the link and still saves."""
    from watcherd.git import Git

    secret = tmp_path / "sidecar-only.txt"
    secret.write_text("TOPSECRET-first-line\n")
    ws = shallow_clone(tmp_path, upstream)
    (ws / "readme.md").write_text("edited in a shallow clone\n")
    run, swapped = Git.run, []

    def swap_during_fetch(self, *args, **kwargs):
        if "fetch" in args and not swapped:
            (ws / ".git" / "shallow").unlink()
            os.symlink(secret, ws / ".git" / "shallow")
            swapped.append(args)
        return run(self, *args, **kwargs)

    monkeypatch.setattr(Git, "run", swap_during_fetch)
    with capture_logs() as logs:
        result = save(ws, tmp_path / "store", template_url=f"file://{upstream}")
        assert swapped, "no unshallow fetch ran: the test proves nothing"
        (ws / "readme.md").write_text("edited again\n")
        again = save(ws, tmp_path / "store", template_url=f"file://{upstream}")
    assert result.status == "saved" and again.status == "saved"
    assert events(logs, "history.unshallowed")
    assert "TOPSECRET" not in repr(logs)
    repo = state_repo(ws, KEY)
    shallow = repo.git_dir / "shallow"
    assert not shallow.exists() or "TOPSECRET" not in shallow.read_text()
    history = git(tmp_path, f"--git-dir={repo.git_dir}", "log", "--all", "--format=%B")
    assert "TOPSECRET" not in history
    target = tmp_path / "restored"
    restore(config_for(target, tmp_path / "store"), gens_for(tmp_path / "store"))
    assert (target / "readme.md").read_text() == "edited again\n"
