"""The systemd units load cleanly and keep their hardening.

Least privilege (DESIGN.md, trust boundary point 4): the daemon runs as a user of its own, reads
the workspace through the app's group with the workspace read-only, and writes only its
StateDirectory=; the restore runs as the app's user, writes the workspace and shares that state
directory through watcherd's group.

These run the real `systemd-analyze`. CI installs it (Debian package `systemd`) and must not skip;
a developer machine without it skips with the reason.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SYSTEMD_DIR = REPO / "systemd"
APP_DROP_IN = SYSTEMD_DIR / "app.service.d" / "watcherd.conf"

# What `systemctl start` would load: templates as an instance, whose specifiers get resolved.
UNITS_TO_VERIFY = [
    "watcherd.service",
    "watcherd-restore.service",
    "watcherd@demo.service",
    "watcherd-restore@demo.service",
    "app.service",  # the stub below, with systemd/app.service.d/watcherd.conf applied
]
UNIT_FILES = [
    "watcherd.service",
    "watcherd-restore.service",
    "watcherd@.service",
    "watcherd-restore@.service",
]
MAX_EXPOSURE = 2.0
# Each template must say what its plain unit says, once its instance paths are mapped back.
TEMPLATE_PAIRS = [
    ("watcherd.service", "watcherd@.service"),
    ("watcherd-restore.service", "watcherd-restore@.service"),
]
# (daemon, restore): the plain units and the templates, read with as_plain().
DAEMON_AND_RESTORE = [
    ("watcherd.service", "watcherd-restore.service"),
    ("watcherd@.service", "watcherd-restore@.service"),
]
APP_USER = "app"  # the user the units assume for the app (the stub app.service below runs as it)
WORKSPACE = "/app"  # the plain units' workspace; the templates' /srv/%i maps to it
STATE_ROOT = "/var/lib"  # where systemd puts a system unit's StateDirectory=


def on_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false")


def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        if on_ci():
            pytest.fail("systemd-analyze is missing on CI: install it with `apt-get install -y systemd`")
        pytest.skip("systemd-analyze is not installed (Debian: apt-get install systemd); CI runs these")
    return path


def run_analyze(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": "", "LC_ALL": "C.UTF-8"}
    return subprocess.run(
        [systemd_analyze(), *args], capture_output=True, text=True, env=env, timeout=60
    )


def parse_unit(path: Path) -> dict[tuple[str, str], list[str]]:
    """(section, key) -> values in order; systemd allows a key more than once."""
    entries: dict[tuple[str, str], list[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        assert not line.endswith("\\"), f"{path.name}: continuation lines are not parsed here: {raw}"
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        entries.setdefault((section, key.strip()), []).append(value.strip())
    return entries


def as_plain(value: str) -> str:
    """A template's value with its instance paths mapped back to the plain unit's."""
    for instance, single in [
        ("/etc/watcherd/%i.toml", "/etc/watcherd/watcherd.toml"),
        ("/srv/%i", "/app"),
        ("watcherd/%i", "watcherd"),
        ("@%i", ""),
        (" (%i)", ""),
    ]:
        value = value.replace(instance, single)
    return value


def settings(name: str) -> dict[tuple[str, str], list[str]]:
    """A unit file's entries, a template's read as its plain unit (see :func:`as_plain`)."""
    return {key: [as_plain(v) for v in values]
            for key, values in parse_unit(SYSTEMD_DIR / name).items()}


def words(unit: dict[tuple[str, str], list[str]], key: str) -> list[str]:
    """A [Service] list setting (paths, groups) as its items, without the "-"/"+" prefixes."""
    return [w.lstrip("-+") for v in unit.get(("Service", key), []) for w in v.split()]


def environment(unit: dict[tuple[str, str], list[str]]) -> dict[str, str]:
    assignments = [a for v in unit.get(("Service", "Environment"), []) for a in shlex.split(v)]
    return dict(a.split("=", 1) for a in assignments)


def inside(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def seconds(span: str) -> float:
    """A systemd or watcherd time span like "40s", "2min", "5m" or "1min 30s", in seconds."""
    units = {"ms": 0.001, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", span):
        total += float(number) * units[unit or "s"]
    return total


def default_shutdown_timeout() -> float:
    example = REPO / "config.example.toml"
    if example.exists():
        watch = tomllib.loads(example.read_text()).get("watch", {})
        if "shutdown_timeout" in watch:
            return seconds(watch["shutdown_timeout"])
    return seconds("20s")  # DESIGN.md's default


@pytest.fixture
def unit_root(tmp_path: Path) -> Path:
    """A root directory where `systemd-analyze verify --root` sees the units as installed.

    verify checks that every ExecStart= binary exists and is executable. Rather than rewrite the
    units (and then verify something that is not shipped), the unit files are copied byte for
    byte and an executable stub is put at each ExecStart= path inside the root: the path the unit
    names is the one that gets checked. The host's own units (sysinit.target,
    network-online.target, ...) are copied in because --root hides the host's, and app.service is
    a stub standing in for the user's app, which the drop-in under test attaches to.
    """
    systemd_analyze()  # skip or fail first, with the reason
    unit_dir = tmp_path / "etc/systemd/system"
    unit_dir.mkdir(parents=True)
    for name in UNIT_FILES:
        shutil.copy2(SYSTEMD_DIR / name, unit_dir / name)
    (unit_dir / "app.service.d").mkdir()
    shutil.copy2(APP_DROP_IN, unit_dir / "app.service.d" / APP_DROP_IN.name)
    (unit_dir / "app.service").write_text(
        "[Unit]\nDescription=stand-in for the user's app\n\n"
        f"[Service]\nExecStart=/usr/local/bin/app\nUser={APP_USER}\n"
    )

    host_units = next(
        (p for p in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")) if p.is_dir()),
        None,
    )
    assert host_units is not None, "systemd-analyze is installed but its unit directory is not"
    shutil.copytree(host_units, tmp_path / "usr/lib/systemd/system", symlinks=True)

    executables = {"/usr/local/bin/app"}
    for name in UNIT_FILES:
        for command in parse_unit(SYSTEMD_DIR / name).get(("Service", "ExecStart"), []):
            executables.add(command.split()[0].lstrip("-+!@:"))
    for executable in executables:
        stub = tmp_path / executable.lstrip("/")
        stub.parent.mkdir(parents=True, exist_ok=True)
        stub.write_text("#!/bin/sh\nexit 0\n")
        stub.chmod(0o755)
    return tmp_path


@pytest.mark.parametrize("unit", UNITS_TO_VERIFY)
def test_unit_passes_systemd_analyze_verify_without_a_warning(unit_root: Path, unit: str) -> None:
    # verify exits 0 on unknown keys and bad values ("ignoring"): the warnings are on stderr.
    result = run_analyze("verify", f"--root={unit_root}", f"/etc/systemd/system/{unit}")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout == ""


@pytest.mark.parametrize("unit", UNIT_FILES)
def test_unit_exposure_is_at_most_two(unit: str) -> None:
    result = run_analyze("security", "--offline=yes", str(SYSTEMD_DIR / unit))
    assert result.returncode == 0, result.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", result.stdout)
    assert match, result.stdout
    assert float(match.group(1)) <= MAX_EXPOSURE, result.stdout


@pytest.mark.parametrize(("plain", "template"), TEMPLATE_PAIRS)
def test_template_has_the_same_settings_as_the_plain_unit(plain: str, template: str) -> None:
    plain_entries = parse_unit(SYSTEMD_DIR / plain)
    template_entries = settings(template)
    # The plain units also order themselves Before= app.service; a template can not know the
    # app's name and leaves that to the app's drop-in.
    for entries in (plain_entries, template_entries):
        entries[("Unit", "Before")] = [
            " ".join(u for u in v.split() if u != "app.service")
            for v in entries.get(("Unit", "Before"), [])
        ]
        entries[("Unit", "Before")] = [v for v in entries[("Unit", "Before")] if v]
    assert template_entries == plain_entries


@pytest.mark.parametrize(("daemon_unit", "restore_unit"), DAEMON_AND_RESTORE)
def test_daemon_runs_as_a_user_of_its_own_in_the_apps_group(daemon_unit: str,
                                                            restore_unit: str) -> None:
    daemon, restore = settings(daemon_unit), settings(restore_unit)
    # The restore is the app's user: the restored files are the app's.
    assert restore[("Service", "User")] == [APP_USER]
    # The daemon, which holds the store's credentials, is not; and not a dynamic user, whose
    # StateDirectory= would move to /var/lib/private, out of the restore's reach.
    (user,) = daemon[("Service", "User")]
    assert user not in (APP_USER, "root", "0")
    assert daemon.get(("Service", "DynamicUser"), ["no"]) == ["no"]
    # It reads the workspace through the app's group.
    (app_group,) = restore[("Service", "Group")]
    assert app_group in words(daemon, "SupplementaryGroups")
    assert daemon[("Service", "Group")] != [app_group]


@pytest.mark.parametrize("daemon_unit", [d for d, _ in DAEMON_AND_RESTORE])
def test_daemon_sees_the_workspace_read_only_and_writes_only_its_state_directory(
        daemon_unit: str) -> None:
    daemon = settings(daemon_unit)
    assert daemon[("Service", "ProtectSystem")] == ["strict"]
    assert WORKSPACE in words(daemon, "ReadOnlyPaths")
    assert not [p for p in words(daemon, "ReadWritePaths") if inside(WORKSPACE, p)]
    (state,) = daemon[("Service", "StateDirectory")]
    state_root = f"{STATE_ROOT}/{state}"
    assert not inside(WORKSPACE, state_root) and not inside(state_root, WORKSPACE)
    # workspace.state_dir lies inside the one directory the sandbox lets it write.
    assert inside(environment(daemon)["WATCHERD_WORKSPACE_STATE_DIR"], state_root)
    # Shared with the restore through the group: rwx and set-group-ID for it, nothing for others,
    # and a umask that leaves the group its read and write bits.
    mode = int(daemon[("Service", "StateDirectoryMode")][0], 8)
    assert mode & 0o2070 == 0o2070 and mode & 0o007 == 0
    umask = int(daemon[("Service", "UMask")][0], 8)
    assert umask & 0o060 == 0 and umask & 0o007 == 0o007


@pytest.mark.parametrize(("daemon_unit", "restore_unit"), DAEMON_AND_RESTORE)
def test_restore_writes_the_workspace_and_shares_the_daemons_state_directory(
        daemon_unit: str, restore_unit: str) -> None:
    daemon, restore = settings(daemon_unit), settings(restore_unit)
    state_dir = environment(daemon)["WATCHERD_WORKSPACE_STATE_DIR"]
    # The same state directory: the restore seeds watcherd's repository, the daemon carries on.
    assert environment(restore)["WATCHERD_WORKSPACE_STATE_DIR"] == state_dir
    writable = words(restore, "ReadWritePaths")
    assert WORKSPACE in writable
    assert [p for p in writable if inside(state_dir, p)], writable
    # Reached through the daemon's group; not a StateDirectory= of its own, which systemd would
    # hand to the restore's user at every start (and back to the daemon's at the next).
    assert daemon[("Service", "Group")][0] in words(restore, "SupplementaryGroups")
    assert ("Service", "StateDirectory") not in restore
    # The restored files stay readable by the app's group, through which the daemon reads them.
    assert int(restore[("Service", "UMask")][0], 8) & 0o040 == 0


def test_daemon_unit_stops_gracefully_with_time_for_the_final_save() -> None:
    service = parse_unit(SYSTEMD_DIR / "watcherd.service")
    assert service[("Service", "ExecStart")] == ["/usr/local/bin/watcherd run"]
    assert service[("Service", "Type")] == ["notify"]
    assert service[("Service", "NotifyAccess")] == ["main"]
    assert seconds(service[("Service", "WatchdogSec")][0]) > 0
    assert service[("Service", "Restart")] == ["always"]
    # SIGTERM to the daemon alone: its git children must survive to finish the final save.
    assert service[("Service", "KillSignal")] == ["SIGTERM"]
    assert service[("Service", "KillMode")] == ["mixed"]
    assert seconds(service[("Service", "TimeoutStopSec")][0]) > default_shutdown_timeout() + 10
    assert service[("Unit", "Requires")] == ["watcherd-restore.service"]
    assert "watcherd-restore.service" in " ".join(service[("Unit", "After")])


def test_restore_unit_runs_once_before_the_daemon_and_the_app() -> None:
    restore = parse_unit(SYSTEMD_DIR / "watcherd-restore.service")
    assert restore[("Service", "ExecStart")] == ["/usr/local/bin/watcherd restore"]
    assert restore[("Service", "Type")] == ["oneshot"]
    assert restore[("Service", "RemainAfterExit")] == ["yes"]
    assert set(" ".join(restore[("Unit", "Before")]).split()) >= {"watcherd.service", "app.service"}
    assert "network-online.target" in " ".join(restore[("Unit", "After")])
    assert "network-online.target" in " ".join(restore[("Unit", "Wants")])
    # Exit 1 and 2 must fail the unit (and so the app's start): no exit status counts as success.
    assert ("Service", "SuccessExitStatus") not in restore


def test_app_drop_in_requires_the_restore_and_wants_the_daemon() -> None:
    drop_in = parse_unit(APP_DROP_IN)
    assert drop_in[("Unit", "Requires")] == ["watcherd-restore.service"]
    assert drop_in[("Unit", "Wants")] == ["watcherd.service"]
    assert set(" ".join(drop_in[("Unit", "After")]).split()) == {
        "watcherd-restore.service",
        "watcherd.service",
    }
