"""examples/kubernetes/pod.yaml wires watcherd up the way DESIGN.md says it works.

The manifest is read as data (no cluster): restore before everything, the daemon as a native
sidecar, one workspace emptyDir, a config that watcherd would accept, and a grace period that
leaves the final save its time.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
POD_YAML = REPO / "examples" / "kubernetes" / "pod.yaml"
CONFIG_PATH = "/etc/watcherd/watcherd.toml"  # DESIGN.md's default, and WATCHERD_CONFIG below

# DESIGN.md's config keys, used only when config.example.toml (the maintained list) is absent.
DESIGN_KEYS = {
    "workspace.path", "workspace.mode", "workspace.author_name", "workspace.author_email",
    "watch.quiet_period", "watch.max_commit_delay", "watch.idle_timeout",
    "watch.max_upload_interval", "watch.shutdown_timeout",
    "store.url", "store.key", "store.keep", "store.warn_bundle_size", "store.max_bundle_size",
    "store.s3.region", "store.s3.endpoint_url", "store.s3.force_path_style", "store.s3.sse",
    "store.s3.kms_key_id", "store.s3.storage_class", "store.s3.max_attempts",
    "restore.on_missing", "restore.template_url", "restore.on_conflict",
    "control.listen", "control.token",
    "log.level", "log.format",
}  # fmt: skip
DEFAULT_SHUTDOWN_TIMEOUT = "20s"
DEFAULT_LISTEN = "127.0.0.1:7781"
DEFAULT_WORKSPACE = "/app"
Json = dict[str, Any]


def flatten(table: Json, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def seconds(duration: str) -> float:
    """watcherd's duration strings: "2s", "5m", "500ms", "1h"."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration)
    assert match, f"not a duration: {duration!r}"
    return float(match.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[match.group(2)]


def allowed_keys() -> set[str]:
    example = REPO / "config.example.toml"
    if example.exists():
        return set(flatten(tomllib.loads(example.read_text())))
    return DESIGN_KEYS


@pytest.fixture(scope="module")
def manifest() -> list[Json]:
    return [doc for doc in yaml.safe_load_all(POD_YAML.read_text()) if doc]


def the(manifest: list[Json], kind: str) -> Json:
    found = [doc for doc in manifest if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind} in {POD_YAML.name}, found {len(found)}"
    return found[0]


@pytest.fixture(scope="module")
def pod(manifest: list[Json]) -> Json:
    return the(manifest, "Pod")


def command(container: Json) -> list[str]:
    return [*container.get("command", []), *container.get("args", [])]


def watcherd_container(pod: Json, subcommand: str) -> tuple[int, Json]:
    matches = [
        (index, c)
        for index, c in enumerate(pod["spec"].get("initContainers", []))
        if command(c)[:2] == ["watcherd", subcommand]
    ]
    assert len(matches) == 1, f"expected one init container running `watcherd {subcommand}`"
    return matches[0]


@pytest.fixture(scope="module")
def config(manifest: list[Json], pod: Json) -> Json:
    """The TOML that the watcherd containers read, found through the volume mounted at its path."""
    _, sidecar = watcherd_container(pod, "run")
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    for mount in sidecar["volumeMounts"]:
        volume = volumes[mount["name"]]
        if "configMap" not in volume:
            continue
        key = mount.get("subPath") or CONFIG_PATH.rsplit("/", 1)[1]
        path = mount["mountPath"] if "subPath" in mount else f"{mount['mountPath']}/{key}"
        if path == CONFIG_PATH:
            config_map = the(manifest, "ConfigMap")
            assert config_map["metadata"]["name"] == volume["configMap"]["name"]
            return tomllib.loads(config_map["data"][key])
    pytest.fail(f"no ConfigMap is mounted at {CONFIG_PATH} in the sidecar")


def env(container: Json) -> dict[str, Json]:
    return {e["name"]: e for e in container.get("env", [])}


def effective_security(pod: Json, container: Json, field: str) -> Any:
    """A container's securityContext field, falling back to the pod's, as the kubelet does."""
    own = container.get("securityContext", {})
    return own[field] if field in own else pod["spec"].get("securityContext", {}).get(field)


def all_containers(pod: Json) -> list[Json]:
    return [*pod["spec"].get("initContainers", []), *pod["spec"]["containers"]]


def test_restore_runs_first_as_a_plain_init_container(pod: Json) -> None:
    index, restore = watcherd_container(pod, "restore")
    assert index == 0
    assert restore.get("restartPolicy") != "Always"  # it must run to completion


def test_daemon_is_a_native_sidecar_started_after_the_restore(pod: Json) -> None:
    restore_index, _ = watcherd_container(pod, "restore")
    sidecar_index, sidecar = watcherd_container(pod, "run")
    assert sidecar["restartPolicy"] == "Always"
    assert sidecar_index > restore_index
    assert all("watcherd" not in command(c) for c in pod["spec"]["containers"])


def test_workspace_is_one_emptydir_mounted_at_the_workspace_path_in_every_container(
    pod: Json, config: Json
) -> None:
    workspace = config.get("workspace", {}).get("path", DEFAULT_WORKSPACE)
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    mounted = {
        c["name"]: {m["name"] for m in c.get("volumeMounts", []) if m["mountPath"] == workspace}
        for c in all_containers(pod)
    }
    assert all(len(names) == 1 for names in mounted.values()), mounted
    (volume_name,) = set().union(*mounted.values())
    assert "emptyDir" in volumes[volume_name]


def test_config_map_holds_only_known_watcherd_keys(config: Json) -> None:
    unknown = set(flatten(config)) - allowed_keys()
    assert not unknown, f"watcherd rejects unknown keys: {sorted(unknown)}"
    assert config["store"]["url"].startswith("s3://")


def test_watcherd_environment_overrides_name_known_keys(pod: Json) -> None:
    # WATCHERD_<SECTION>_<KEY> is read as a config override, and unknown keys are errors.
    overrides = {"WATCHERD_" + key.replace(".", "_").upper() for key in allowed_keys()}
    for subcommand in ("restore", "run"):
        _, container = watcherd_container(pod, subcommand)
        names = {n for n in env(container) if n.startswith("WATCHERD_")}
        assert names - {"WATCHERD_CONFIG"} <= overrides, container["name"]
        if "WATCHERD_CONFIG" in names:
            assert env(container)["WATCHERD_CONFIG"]["value"] == CONFIG_PATH


def test_store_key_comes_from_the_pods_labels(pod: Json) -> None:
    labels = pod["metadata"]["labels"]
    for subcommand in ("restore", "run"):
        _, container = watcherd_container(pod, subcommand)
        variables = env(container)
        key = variables["WATCHERD_STORE_KEY"]["value"]
        referenced = re.findall(r"\$\((\w+)\)", key)
        assert referenced, f"WATCHERD_STORE_KEY is not built from the pod: {key!r}"
        for name in referenced:
            field = variables[name]["valueFrom"]["fieldRef"]["fieldPath"]
            label = re.fullmatch(r"metadata\.labels\['([^']+)'\]", field)
            assert label and label.group(1) in labels, field
    # Same key in both, or the daemon would upload where the next restore never looks.
    restore_env = env(watcherd_container(pod, "restore")[1])
    sidecar_env = env(watcherd_container(pod, "run")[1])
    assert restore_env == sidecar_env


def test_grace_period_leaves_the_final_save_its_shutdown_timeout(pod: Json, config: Json) -> None:
    timeout = seconds(config.get("watch", {}).get("shutdown_timeout", DEFAULT_SHUTDOWN_TIMEOUT))
    assert pod["spec"]["terminationGracePeriodSeconds"] > timeout + 10


def test_sidecar_probes_can_reach_the_control_endpoint(pod: Json, config: Json) -> None:
    _, sidecar = watcherd_container(pod, "run")
    assert "startupProbe" in sidecar and "livenessProbe" in sidecar
    host = config.get("control", {}).get("listen", DEFAULT_LISTEN).rsplit(":", 1)[0]
    loopback = host == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        probe = sidecar.get(kind)
        if probe is None:
            continue
        # The kubelet's httpGet and tcpSocket probes connect to the pod IP, never to loopback.
        if loopback:
            assert "exec" in probe, f"{kind} cannot reach {host} from the kubelet"
            assert probe["exec"]["command"][:2] == ["watcherd", "status"]


def test_store_role_reaches_watcherd_but_not_the_app(manifest: list[Json], pod: Json) -> None:
    account = the(manifest, "ServiceAccount")
    assert pod["spec"]["serviceAccountName"] == account["metadata"]["name"]
    role = account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
    assert role.startswith("arn:aws:iam::")
    skipped = pod["metadata"]["annotations"]["eks.amazonaws.com/skip-containers"].split(",")
    assert {c["name"] for c in pod["spec"]["containers"]} <= {s.strip() for s in skipped}


def test_app_and_watcherd_run_as_the_same_non_root_user(pod: Json) -> None:
    users = {c["name"]: effective_security(pod, c, "runAsUser") for c in all_containers(pod)}
    assert len(set(users.values())) == 1, users
    assert None not in users.values() and 0 not in users.values()


def test_every_container_is_locked_down(pod: Json) -> None:
    assert pod["spec"]["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    for container in all_containers(pod):
        assert effective_security(pod, container, "runAsNonRoot") is True, container["name"]
        own = container["securityContext"]
        assert own["readOnlyRootFilesystem"] is True, container["name"]
        assert own["allowPrivilegeEscalation"] is False, container["name"]
        assert own["capabilities"]["drop"] == ["ALL"], container["name"]
        assert not own["capabilities"].get("add"), container["name"]


def test_every_container_has_requests_and_a_memory_limit(pod: Json) -> None:
    for container in all_containers(pod):
        resources = container["resources"]
        assert {"cpu", "memory"} <= set(resources["requests"]), container["name"]
        assert "memory" in resources["limits"], container["name"]
