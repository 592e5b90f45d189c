"""What ships beside the package: the image the Kubernetes example runs, the licence
pyproject.toml names, and a test run that keeps only what a person must look at."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from watcherd.cli import parser

REPO = Path(__file__).resolve().parent.parent
CONTAINERFILE = REPO / "Containerfile"
POD_YAML = REPO / "examples" / "kubernetes" / "pod.yaml"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def instructions() -> list[tuple[str, str]]:
    """The Containerfile as (INSTRUCTION, arguments), continuation lines joined."""
    joined = re.sub(r"\\\n", " ", CONTAINERFILE.read_text())
    found = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            found.append((word.upper(), rest.strip()))
    return found


def the(name: str) -> list[str]:
    return [rest for word, rest in instructions() if word == name]


@pytest.fixture(scope="module")
def pod() -> dict:
    docs = [d for d in yaml.safe_load_all(POD_YAML.read_text()) if d]
    return next(d for d in docs if d["kind"] == "Pod")


def watcherd_containers(pod: dict) -> list[dict]:
    spec = pod["spec"]
    return [c for c in spec.get("initContainers", []) + spec["containers"]
            if c["image"].split(":")[0].endswith("/watcherd")]


def test_the_image_the_example_runs_is_this_version_of_watcherd(pod):
    images = {c["image"] for c in watcherd_containers(pod)}
    assert len(watcherd_containers(pod)) == 2 and len(images) == 1
    assert images.pop().rpartition(":")[2] == PYPROJECT["project"]["version"]
    assert f"-t {next(iter({c['image'] for c in watcherd_containers(pod)}))} " in \
        CONTAINERFILE.read_text()  # the build command in its header makes that image


def test_the_image_has_python_git_and_watcherd_with_the_s3_extra():
    (base,) = the("FROM")
    match = re.fullmatch(r"(?:docker\.io/library/)?python:3\.(\d+)-slim", base)
    minimum = int(PYPROJECT["project"]["requires-python"].removeprefix(">=3."))
    assert match and int(match.group(1)) >= minimum, base
    runs = [shlex.split(r.replace("&&", " && ")) for r in the("RUN")]
    assert any("apt-get" in r and "install" in r and "git" in r for r in runs)
    installs = [r for r in runs if "pip" in r and "install" in r]
    assert installs and any(".[s3]" in r for r in installs), installs
    assert PYPROJECT["project"]["optional-dependencies"]["s3"]
    for copy in the("COPY"):
        *sources, _ = copy.split()
        for source in sources:
            assert (REPO / source).exists(), f"COPY {source}: not in the repository"


def test_the_image_runs_as_the_pods_user_and_its_commands_are_watcherds(pod):
    (user,) = the("USER")
    context = pod["spec"]["securityContext"]
    assert user == f"{context['runAsUser']}:{context['runAsGroup']}" and context["runAsUser"] != 0
    (entrypoint,) = the("ENTRYPOINT")
    assert json.loads(entrypoint) == ["watcherd"]
    commands = []
    for c in watcherd_containers(pod):
        commands.append(c["command"])
        commands += [c[probe]["exec"]["command"] for probe in ("startupProbe", "livenessProbe")
                     if probe in c]
    assert {tuple(c) for c in commands} == {("watcherd", "restore"), ("watcherd", "run"),
                                            ("watcherd", "status")}
    for command in commands:  # each is a command this watcherd knows
        assert parser().parse_args(command[1:]).command == command[1]
    (default,) = the("CMD")
    assert json.loads(default) == ["run"]


def test_the_licence_pyproject_names_is_the_full_apache_2_text():
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    text = (REPO / "LICENSE").read_text()
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    assert "END OF TERMS AND CONDITIONS" in text and "APPENDIX" in text
    assert len(re.findall(r"^\s+\d\. \w", text, re.MULTILINE)) == 9  # sections 1 to 9


def test_the_test_run_keeps_the_temporary_directories_of_failed_tests_only(tmp_path):
    (tmp_path / "test_two.py").write_text(
        "def test_passes(tmp_path):\n    (tmp_path / 'f').write_text('x')\n\n"
        "def test_fails(tmp_path):\n    (tmp_path / 'f').write_text('x')\n    assert False\n")
    base = tmp_path / "base"
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "-c", str(REPO / "pyproject.toml"), "--rootdir", str(tmp_path),
                          "--basetemp", str(base), str(tmp_path / "test_two.py")],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "1 failed, 1 passed" in run.stdout
    # Under each xdist worker's directory (popen-gw<N>/) when the run is spread over workers.
    kept = [p.name for p in base.rglob("test_*") if p.is_dir() and not p.is_symlink()]
    assert kept == ["test_fails0"]
