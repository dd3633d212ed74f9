"""The Helm chart, rendered by a real helm and validated against the Kubernetes schemas.

helm is the pinned version that scripts/install-helm builds with Go (once per machine, into a
cache outside the checkout). Every scenario of deployments/helm/values/ is linted, rendered and
validated (strict) against Kubernetes 1.30 to 1.34, and what the daemon depends on is checked
on the rendered objects: the mounts, the config path the container reads, MPS's hostPID and
mps root, privileges, probes and the static manifest's freshness.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from plugin.cli import build_parser
from plugin.cli.config_file import load_config_file, overrides_from_args
from sharing.plan import build_plan
from tests.helm import CHART, ROOT, Helm, install_helm

SCENARIOS_DIR = ROOT / "deployments" / "helm" / "values"
STATIC = ROOT / "deployments" / "static" / "gpushare.yaml"
K8S_VERSIONS = ("1.30", "1.31", "1.32", "1.33", "1.34")
CONFIG_MOUNT = "/etc/gpushare"
# Custom resources that the Kubernetes schemas do not describe; checked field by field below.
CUSTOM_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}

# name -> (values file under deployments/helm/values/ or None for the defaults, --set items)
SCENARIOS = {
    "default": (None, ()),
    "time-slicing": ("time-slicing.yaml", ()),
    "mps": ("mps.yaml", ()),
    "mps-compute-mode-leave": ("mps.yaml", ("mps.computeMode=leave",)),
    "json-logs": (None, ("logFormat=json",)),
    "mig-mixed": ("mig-mixed.yaml", ()),
    "existing-configmap": ("existing-configmap.yaml", ()),
    "metrics-service-and-servicemonitor": (None, ("metrics.serviceMonitor.enabled=true",)),
    "exec-probes-without-metrics": (None, ("metrics.enabled=false", "probes.mode=exec")),
    "cdi-without-node-labels": (None, ("cdi.enabled=true", "nodeLabels.enabled=false")),
    "config-as-text": (None, ("config.content=version: v1\nflags:\n  migStrategy: single\n",)),
}


def scenario_args(name: str) -> tuple[Path | None, tuple[str, ...]]:
    """The values file and --set items of a scenario."""
    values, sets = SCENARIOS[name]
    return (SCENARIOS_DIR / values if values else None), sets


@pytest.fixture(scope="session")
def helm(pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> Helm:
    """The pinned helm, built on first use; a missing Go fails here with the reason."""
    capture = pytestconfig.pluginmanager.getplugin("capturemanager")
    try:
        with capture.global_and_fixture_disabled():
            binary = install_helm(echo=True)
    except RuntimeError as err:
        pytest.fail(str(err), pytrace=False)
    return Helm(binary=binary, home=tmp_path_factory.mktemp("helm-home"))


@pytest.fixture(scope="session")
def rendered(helm: Helm) -> dict[str, list[dict]]:
    """Every scenario rendered once."""
    return {name: helm.render(*scenario_args(name)) for name in SCENARIOS}


def kind(docs: list[dict], kind_name: str) -> list[dict]:
    """The documents of one kind."""
    return [doc for doc in docs if doc["kind"] == kind_name]


def daemonset(docs: list[dict]) -> dict:
    """The one DaemonSet of a rendering."""
    (found,) = kind(docs, "DaemonSet")
    return found


def pod_spec(docs: list[dict]) -> dict:
    """The DaemonSet's pod spec."""
    return daemonset(docs)["spec"]["template"]["spec"]


def container(docs: list[dict]) -> dict:
    """The gpushare container."""
    (found,) = pod_spec(docs)["containers"]
    return found


def mounts_by_path(docs: list[dict]) -> dict[str, tuple[dict, dict]]:
    """mountPath -> (volumeMount, volume) of the gpushare container."""
    volumes = {v["name"]: v for v in pod_spec(docs)["volumes"]}
    return {m["mountPath"]: (m, volumes[m["name"]]) for m in container(docs)["volumeMounts"]}


def host_path_mounts(docs: list[dict]) -> dict[str, tuple[str, bool]]:
    """mountPath -> (host path, read-only) for every hostPath volume mounted."""
    return {
        path: (volume["hostPath"]["path"], bool(mount.get("readOnly", False)))
        for path, (mount, volume) in mounts_by_path(docs).items()
        if "hostPath" in volume
    }


def container_env(docs: list[dict]) -> dict[str, str]:
    """The container's literal environment variables."""
    return {e["name"]: e["value"] for e in container(docs).get("env", []) if "value" in e}


def parsed_command(docs: list[dict]):
    """The container's command line, parsed by gpushare's own argument parser."""
    spec = container(docs)
    command = spec["command"] + spec.get("args", [])
    assert command[0] == "gpushare", command
    return build_parser().parse_args(command[1:])


# --- helm lint and helm template ------------------------------------------------------------


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_helm_lint_strict_passes(helm: Helm, name: str):
    proc = helm.run("lint", "--strict", str(CHART), *helm.template_args(*scenario_args(name)))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 chart(s) linted, 0 chart(s) failed" in proc.stdout


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_every_rendered_document_validates_strictly_against_kubernetes(rendered, name: str):
    docs = rendered[name]
    assert {d["kind"] for d in docs} >= {"DaemonSet"}
    checked = 0
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in CUSTOM_KINDS:
            continue
        for version in K8S_VERSIONS:
            validate(doc, version)
            checked += 1
    assert checked >= len(K8S_VERSIONS)


def validate(doc: dict, version: str) -> None:
    """kubernetes-validate, strict (unknown fields are errors), with the path in the message."""
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as err:
        where = ".".join(str(p) for p in err.path)
        pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} on {version}: {where}: {err.message}")


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        pytest.param(lambda pod: pod.update(hostPid=True), "'hostPid' was unexpected",
                     id="misspelt pod field"),
        pytest.param(lambda pod: pod["containers"][0]["ports"][0].update(containerPort="9402"),
                     "is not of type 'integer'", id="port as a string"),
        pytest.param(lambda pod: pod["volumes"][0]["hostPath"].pop("path"),
                     "'path' is a required property", id="hostPath without path"),
    ],
)
def test_the_validator_rejects_a_broken_daemonset(rendered, mutate, expected):
    docs = yaml.safe_load(yaml.safe_dump(rendered["default"]))
    mutate(pod_spec(docs))
    for version in K8S_VERSIONS:
        with pytest.raises(kubernetes_validate.ValidationError, match=expected):
            kubernetes_validate.validate(daemonset(docs), version, strict=True)


# --- what the daemon depends on -------------------------------------------------------------


def test_mps_has_host_pid_and_the_mps_root_mount_and_the_default_has_neither(rendered):
    mps, default = rendered["mps"], rendered["default"]
    assert pod_spec(mps).get("hostPID") is True
    assert host_path_mounts(mps)["/run/nvidia/mps"] == ("/run/nvidia/mps", False)
    assert parsed_command(mps).mps_root == "/run/nvidia/mps"
    assert "hostPID" not in pod_spec(default)
    assert all("mps" not in path for path in host_path_mounts(default))
    assert parsed_command(default).mps_root is None


def test_logs_are_text_by_default_and_json_when_asked(rendered):
    assert parsed_command(rendered["default"]).log_format == "text"
    assert parsed_command(rendered["json-logs"]).log_format == "json"


def test_mps_compute_mode_is_managed_by_default_and_left_when_asked(rendered):
    assert parsed_command(rendered["mps"]).mps_compute_mode == "manage"
    assert parsed_command(rendered["mps-compute-mode-leave"]).mps_compute_mode == "leave"
    assert parsed_command(rendered["default"]).mps_compute_mode is None


@pytest.mark.parametrize(
    ("name", "privileged"),
    [
        ("default", False),
        ("time-slicing", False),
        ("existing-configmap", False),
        ("mps", True),  # MPS control daemons set the compute mode
        ("mig-mixed", True),  # MIG changes need CAP_SYS_ADMIN
    ],
)
def test_privileged_only_with_mps_or_mig_reconfiguration(rendered, name, privileged):
    security = container(rendered[name])["securityContext"]
    assert security["privileged"] is privileged
    if not privileged:
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"] == {"drop": ["ALL"]}
        assert security["readOnlyRootFilesystem"] is True
    assert "hostPID" not in pod_spec(rendered[name]) or name == "mps"


def test_node_labels_file_is_in_the_mounted_feature_directory_unless_off(rendered):
    features = "/etc/kubernetes/node-feature-discovery/features.d"
    default = rendered["default"]
    assert host_path_mounts(default)[features] == (features, False)
    assert container_env(default)["GFD_OUTPUT_FILE"] == f"{features}/gfd"
    off = rendered["cdi-without-node-labels"]
    assert features not in host_path_mounts(off)
    assert container_env(off)["GFD_OUTPUT_FILE"] == ""  # empty disables


def test_cdi_spec_directory_only_when_asked_for(rendered):
    assert host_path_mounts(rendered["cdi-without-node-labels"])["/var/run/cdi"] == (
        "/var/run/cdi", False,
    )
    assert host_path_mounts(rendered["cdi-without-node-labels"])["/etc/cdi"] == ("/etc/cdi", True)
    assert "/var/run/cdi" not in host_path_mounts(rendered["default"])


def test_mig_reconfiguration_gets_the_mig_config_capability_and_a_state_dir(rendered):
    env = container_env(rendered["mig-mixed"])
    assert env["NVIDIA_MIG_CONFIG_DEVICES"] == "all"
    assert host_path_mounts(rendered["mig-mixed"])["/var/lib/gpushare"] == (
        "/var/lib/gpushare", False,
    )
    assert "NVIDIA_MIG_CONFIG_DEVICES" not in container_env(rendered["default"])


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_host_mounts_the_device_plugin_needs(rendered, name):
    mounts = host_path_mounts(rendered[name])
    assert mounts["/var/lib/kubelet/device-plugins"] == ("/var/lib/kubelet/device-plugins", False)
    assert mounts["/dev"] == ("/dev", True)
    assert mounts["/driver-root"] == ("/", True)
    assert mounts["/run/gpushare"] == ("/run/gpushare", False)  # control socket
    assert mounts["/var/lib/gpushare"] == ("/var/lib/gpushare", False)  # MIG journal, history
    args = parsed_command(rendered[name])
    assert str(args.kubelet_dir) == "/var/lib/kubelet/device-plugins"
    assert args.container_driver_root == "/driver-root"
    # /dev is read-only: the termination log must live elsewhere.
    assert container(rendered[name])["terminationMessagePath"].startswith("/tmp/")
    assert "/tmp" in mounts_by_path(rendered[name])


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_node_critical_on_gpu_nodes_with_resources(rendered, name):
    spec = pod_spec(rendered[name])
    assert spec["priorityClassName"] == "system-node-critical"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec[
        "tolerations"
    ]
    terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]
    keys = {expr["key"] for term in terms for expr in term["matchExpressions"]}
    assert keys == {"feature.node.kubernetes.io/pci-10de.present", "nvidia.com/gpu.present"}
    resources = container(rendered[name])["resources"]
    assert set(resources) == {"requests", "limits"}
    assert resources["limits"]["memory"]


# --- the config the container reads ---------------------------------------------------------


def config_files(docs: list[dict]) -> Iterator[tuple[str, str]]:
    """(key, text) of the chart's ConfigMap; none for a scenario with an existing ConfigMap."""
    for config_map in kind(docs, "ConfigMap"):
        yield from config_map["data"].items()


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_the_config_path_the_container_reads_is_the_mounted_config_map(rendered, name):
    docs = rendered[name]
    mount, volume = mounts_by_path(docs)[CONFIG_MOUNT]
    # A directory mount, not subPath: the kubelet swaps ConfigMap updates in; subPath never
    # sees them.
    assert "subPath" not in mount
    assert mount["readOnly"] is True
    config = Path(parsed_command(docs).config)
    assert config.parent == Path(CONFIG_MOUNT)
    if name == "existing-configmap":
        assert volume["configMap"] == {"name": "gpu-sharing"}
        assert config.name == "config.yaml"
        assert kind(docs, "ConfigMap") == []
        return
    (config_map,) = kind(docs, "ConfigMap")
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    assert config.name in config_map["data"]


@pytest.mark.parametrize(
    ("name", "resource", "count", "mps_root"),
    [
        ("default", "nvidia.com/gpu", 8, None),
        ("time-slicing", "nvidia.com/gpu.shared", 80, None),
        ("mps", "nvidia.com/gpu", 32, "/run/nvidia/mps"),
        ("config-as-text", "nvidia.com/gpu", 8, None),
    ],
)
def test_the_mounted_config_with_the_container_args_plans_on_a_simulated_node(
    rendered, inventory_of, tmp_path, name, resource, count, mps_root
):
    """The ConfigMap written out as the kubelet mounts it, read with the container's args, env."""
    docs = rendered[name]
    for key, text in config_files(docs):
        (tmp_path / key).write_text(text)
    args = parsed_command(docs)
    mounted = tmp_path / Path(args.config).relative_to(CONFIG_MOUNT)
    config = load_config_file(mounted, env=container_env(docs), overrides=overrides_from_args(args))
    plan = build_plan(inventory_of("dgx-a100"), config)
    by_name = {r.name: r for r in plan.resources}
    assert list(by_name) == [resource]
    assert len(by_name[resource].devices) == count
    assert plan.options.mps_root == (mps_root or "")
    if mps_root is not None:
        assert by_name[resource].mps.pipe_dir.startswith(mps_root + "/")
    assert plan.options.container_driver_root == "/driver-root"


def test_config_given_as_text_is_mounted_verbatim(rendered):
    files = dict(config_files(rendered["config-as-text"]))
    assert files == {"config.yaml": "version: v1\nflags:\n  migStrategy: single\n"}


def test_mig_scenario_ships_the_mig_parted_file_its_config_names(rendered):
    """migReconfiguration.configFile is in the mounted ConfigMap and names its scheduled configs."""
    docs = rendered["mig-mixed"]
    files = dict(config_files(docs))
    config = yaml.safe_load(files[Path(parsed_command(docs).config).name])
    assert config["flags"]["migStrategy"] == "mixed"
    section = config["migReconfiguration"]
    parted_path = Path(section["configFile"])
    assert parted_path.parent == Path(CONFIG_MOUNT)
    parted = yaml.safe_load(files[parted_path.name])
    assert parted["version"] == "v1"
    scheduled = {entry["config"] for entry in section["schedule"]}
    assert scheduled <= set(parted["mig-configs"])


def test_mig_scenario_config_loads_and_every_scheduled_layout_plans_on_an_h100_node(
    rendered, sim_nvml, tmp_path
):
    """The mounted config passes gpushare's own loader (migReconfiguration included), and each
    config its schedule names is a feasible layout on a simulated HGX H100 node."""
    from sharing.nvml.mig_apply import plan_mig

    docs = rendered["mig-mixed"]
    for key, text in config_files(docs):
        (tmp_path / key).write_text(text)
    args = parsed_command(docs)
    mounted = tmp_path / Path(args.config).relative_to(CONFIG_MOUNT)
    config = load_config_file(mounted, env=container_env(docs), overrides=overrides_from_args(args))
    section = config.mig_reconfiguration
    assert section.drain_timeout_s == 600.0
    assert section.kill_processes is False
    assert [entry.config for entry in section.schedule] == ["all-1g.10gb", "all-3g.40gb"]
    parted = tmp_path / Path(section.config_file).relative_to(CONFIG_MOUNT)
    nvml, _ = sim_nvml("hgx-h100")
    for entry in section.schedule:
        plan = plan_mig(nvml, parted, entry.config)
        assert len(plan.changed_gpus) == 8, entry.config


# --- probes, metrics --------------------------------------------------------------------------


def test_probes_are_http_on_the_health_endpoints_of_the_metrics_port(rendered):
    spec = container(rendered["default"])
    assert spec["ports"] == [{"name": "metrics", "containerPort": 9402, "protocol": "TCP"}]
    assert container_env(rendered["default"])["METRICS_ADDRESS"] == ":9402"
    assert spec["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert spec["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}


def test_exec_probes_without_metrics_check_the_daemon_sockets(rendered):
    docs = rendered["exec-probes-without-metrics"]
    spec = container(docs)
    assert container_env(docs)["METRICS_ADDRESS"] == ""  # empty disables
    assert "ports" not in spec
    for probe in (spec["livenessProbe"], spec["readinessProbe"]):
        assert "httpGet" not in probe
        command = probe["exec"]["command"]
        assert command[:2] == ["python", "-c"]
        assert "/var/lib/kubelet/device-plugins/gpushare-*.sock" in command[2]


def test_the_service_monitor_scrapes_the_metrics_service_of_the_pods(rendered):
    docs = rendered["metrics-service-and-servicemonitor"]
    (service,) = kind(docs, "Service")
    (monitor,) = kind(docs, "ServiceMonitor")
    pod_labels = daemonset(docs)["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["clusterIP"] == "None"
    (port,) = service["spec"]["ports"]
    assert (port["port"], port["targetPort"]) == (9402, "metrics")
    service_labels = service["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service_labels.items()
    namespace = service["metadata"]["namespace"]
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [namespace]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert (endpoint["port"], endpoint["path"]) == (port["name"], "/metrics")
    assert kind(rendered["default"], "Service") == []
    assert kind(rendered["default"], "ServiceMonitor") == []


# --- values that must fail ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        pytest.param({"metrics": {"port": "9402"}}, "at '/metrics/port': got string, want integer",
                     id="port as a string"),
        pytest.param({"mps": {"enabled": "yes"}}, "at '/mps/enabled': got string, want boolean",
                     id="mps.enabled as a string"),
        pytest.param({"mps": {"root": "run/nvidia/mps"}}, "at '/mps/root'",
                     id="relative mps root"),
        pytest.param({"config": {"content": ["version: v1"]}},
                     "at '/config/content': got array, want",
                     id="config as a list"),
        pytest.param({"probes": {"mode": "tcp"}}, "at '/probes/mode'", id="unknown probe mode"),
        pytest.param({"logFormat": "yaml"}, "at '/logFormat'", id="unknown log format"),
        pytest.param({"mps": {"computeMode": "exclusive"}}, "at '/mps/computeMode'",
                     id="unknown MPS compute mode"),
        pytest.param({"metrcs": {"enabled": False}}, "additional properties 'metrcs' not allowed",
                     id="misspelt key"),
    ],
)
def test_wrong_values_fail_lint_and_template_through_the_schema(helm, tmp_path, values, expected):
    bad = tmp_path / "values.yaml"
    bad.write_text(yaml.safe_dump(values))
    lint = helm.run("lint", "--strict", str(CHART), *helm.template_args(bad, ()))
    template = helm.template(bad)
    for proc in (lint, template):
        assert proc.returncode != 0
        assert "values don't meet the specifications of the schema" in proc.stdout + proc.stderr
        assert expected in proc.stdout + proc.stderr


@pytest.mark.parametrize(
    ("sets", "expected"),
    [
        pytest.param(("config.content.sharing.mps.resources[0].name=nvidia.com/gpu",
                      "config.content.sharing.mps.resources[0].replicas=2"),
                     "set mps.enabled=true", id="MPS config without mps.enabled"),
        pytest.param(("config.content.migReconfiguration.configFile=/etc/gpushare/m.yaml",),
                     "set migReconfiguration.enabled=true", id="MIG jobs without the switch"),
        pytest.param(("config.content.flags.plugin.deviceListStrategy=cdi-cri",),
                     "set cdi.enabled=true", id="CDI strategy without the spec directory"),
        pytest.param(("config.content.flags.plugin.deviceListStrategy={envvar,cdi-annotations}",),
                     "set cdi.enabled=true", id="CDI strategy in a list"),
        pytest.param(("metrics.enabled=false",), "set metrics.enabled=true, or probes.mode=exec",
                     id="http probes without metrics"),
        pytest.param(("metrics.enabled=false", "probes.mode=none",
                      "metrics.serviceMonitor.enabled=true"),
                     "metrics.serviceMonitor.enabled needs metrics.enabled=true",
                     id="ServiceMonitor without metrics"),
    ],
)
def test_contradicting_values_fail_with_the_value_to_change(helm, sets, expected):
    proc = helm.template(sets=sets)
    assert proc.returncode != 0
    assert expected in proc.stderr


# --- the static manifest --------------------------------------------------------------------


def test_the_static_manifest_is_the_chart_rendered_with_default_values(helm, tmp_path):
    fresh = tmp_path / "gpushare.yaml"
    proc = subprocess.run(
        [str(ROOT / "scripts" / "render-manifest"), str(fresh)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert STATIC.read_text() == fresh.read_text(), (
        "deployments/static/gpushare.yaml is stale: run ./scripts/render-manifest and commit it"
    )


def test_the_static_manifest_validates_and_runs_in_kube_system():
    docs = [doc for doc in yaml.safe_load_all(STATIC.read_text()) if doc]
    assert sorted(d["kind"] for d in docs) == ["ConfigMap", "DaemonSet"]
    for doc in docs:
        assert doc["metadata"]["namespace"] == "kube-system"
        for version in K8S_VERSIONS:
            validate(doc, version)


def test_install_helm_without_go_says_so(tmp_path):
    """On a machine without Go the chart tests fail with the reason, never skip."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "dirname", "mkdir"):
        found = shutil.which(tool)
        assert found is not None
        (bin_dir / tool).symlink_to(found)
    proc = subprocess.run(
        [str(ROOT / "scripts" / "install-helm")],
        capture_output=True, text=True, timeout=60,
        env={"PATH": str(bin_dir), "HOME": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path / "c")},
    )
    assert proc.returncode == 3
    assert "'go' is not on PATH: install Go 1.26 or newer" in proc.stderr
    assert proc.stdout == ""
