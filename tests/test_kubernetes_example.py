"""examples/kubernetes/pod.yaml wires watcherd up the way DESIGN.md says it works.

The manifest is read as data (no cluster): restore before everything, the daemon as a native
sidecar, one workspace emptyDir, a config that watcherd would accept, and a grace period that
leaves the final save its time. Least privilege (DESIGN.md, trust boundary point 4): the daemon
reads the workspace through a read-only mount, as a uid of its own in the app's group; the
restore writes it as the app's uid; watcherd's state is an emptyDir of the two watcherd
containers only.
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
    "workspace.path", "workspace.state_dir", "workspace.mode", "workspace.author_name", "workspace.author_email",
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
DEFAULT_STATE_DIR = "/var/lib/watcherd/state"
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


def app_container(pod: Json) -> Json:
    (app,) = pod["spec"]["containers"]
    return app


def mount_holding(container: Json, path: str) -> Json | None:
    """The mount ``path`` lives on in ``container`` (the longest mountPath above it), if any."""
    holding = [m for m in container.get("volumeMounts", [])
               if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")]
    return max(holding, key=lambda m: len(m["mountPath"]), default=None)


def effective_groups(pod: Json, container: Json) -> set[int]:
    """The gids a container's processes have: its group, the pod's supplementalGroups and the
    pod's fsGroup (the kubelet adds it to every container)."""
    pod_security = pod["spec"].get("securityContext", {})
    groups = {effective_security(pod, container, "runAsGroup"),
              *pod_security.get("supplementalGroups", []), pod_security.get("fsGroup")}
    return groups - {None}


def state_dir(config: Json, container: Json) -> str:
    """workspace.state_dir as ``container`` sees it: its environment's override, else the file's."""
    override = env(container).get("WATCHERD_WORKSPACE_STATE_DIR")
    if override is not None:
        return override["value"]
    return config.get("workspace", {}).get("state_dir", DEFAULT_STATE_DIR)


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


def test_only_the_restore_and_the_app_can_write_the_workspace(pod: Json, config: Json) -> None:
    # Shadow mode's `watcherd run` only reads the workspace: the sidecar's mount says so.
    workspace = config.get("workspace", {}).get("path", DEFAULT_WORKSPACE)
    assert config.get("workspace", {}).get("mode", "shadow") == "shadow"
    writable = {c["name"]: not mount_holding(c, workspace).get("readOnly", False)
                for c in all_containers(pod)}
    sidecar = watcherd_container(pod, "run")[1]["name"]
    restore = watcherd_container(pod, "restore")[1]["name"]
    assert writable == {restore: True, sidecar: False, app_container(pod)["name"]: True}


def test_state_dir_is_an_emptydir_of_the_two_watcherd_containers_only(
    manifest: list[Json], pod: Json, config: Json
) -> None:
    # Set explicitly in the ConfigMap: the mounts below must match it, not a default that moves.
    assert "state_dir" in config["workspace"]
    workspace = config.get("workspace", {}).get("path", DEFAULT_WORKSPACE)
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    _, restore = watcherd_container(pod, "restore")
    _, sidecar = watcherd_container(pod, "run")
    held = {}
    for container in (restore, sidecar):
        path = state_dir(config, container)
        assert not (path + "/").startswith(workspace.rstrip("/") + "/"), path
        mount = mount_holding(container, path)
        assert mount is not None, f"{container['name']}: nothing is mounted at {path}"
        assert not mount.get("readOnly", False), container["name"]
        held[container["name"]] = (path, mount["name"])
    # The same path on the same volume in both: the restore seeds it, the daemon carries on.
    assert len(set(held.values())) == 1, held
    ((_, volume),) = set(held.values())
    assert "emptyDir" in volumes[volume]
    assert volume != mount_holding(sidecar, workspace)["name"]
    # Not in the app: nothing the user's code runs may write what watcherd acts on.
    assert volume not in {m["name"] for m in app_container(pod).get("volumeMounts", [])}


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


def test_the_control_token_reaches_watcherd_but_not_the_app(pod: Json) -> None:
    """The app's containers share the loopback with the daemon: only the token keeps its POST
    routes (checkpoint, rollback) from the agent."""
    def token_env(container: Json) -> list[Json]:
        return [e for e in container.get("env", []) if e["name"] == "WATCHERD_CONTROL_TOKEN"]

    for kind in ("restore", "run"):
        _, container = watcherd_container(pod, kind)
        [env] = token_env(container)
        assert "secretKeyRef" in env["valueFrom"], "a token belongs in a Secret, not the manifest"
    assert token_env(app_container(pod)) == []


def test_restore_runs_as_the_apps_user_and_the_daemon_as_a_user_of_its_own(pod: Json) -> None:
    users = {c["name"]: effective_security(pod, c, "runAsUser") for c in all_containers(pod)}
    assert None not in users.values() and 0 not in users.values(), users
    app = app_container(pod)
    _, restore = watcherd_container(pod, "restore")
    _, sidecar = watcherd_container(pod, "run")
    # Restored files belong to the app, which goes on editing them.
    assert users[restore["name"]] == users[app["name"]]
    app_group = effective_security(pod, app, "runAsGroup")
    assert effective_security(pod, restore, "runAsGroup") == app_group
    # The process holding the store's credentials is not the app's uid.
    assert users[sidecar["name"]] != users[app["name"]]


def test_daemon_reads_the_workspace_through_the_apps_group(pod: Json) -> None:
    app = app_container(pod)
    _, restore = watcherd_container(pod, "restore")
    _, sidecar = watcherd_container(pod, "run")
    app_group = effective_security(pod, app, "runAsGroup")
    assert app_group not in (None, 0)
    # fsGroup makes the emptyDirs group-owned (and setgid) by it: the app's files are this group's.
    fs_group = pod["spec"]["securityContext"]["fsGroup"]
    assert fs_group == app_group
    assert app_group in effective_groups(pod, sidecar)
    # The state volume is written by both watcherd containers: both are in its group.
    assert fs_group in effective_groups(pod, restore) & effective_groups(pod, sidecar)


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
