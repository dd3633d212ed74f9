"""Config parsing: the NVIDIA v1 format read unchanged, strict validation with precise messages."""

from __future__ import annotations

import re
import textwrap

import pytest
from pydantic import ValidationError

from sharing.config import apply_overrides, default_config, load_config
from sharing.config_models import Config
from sharing.errors import ConfigError


def cfg(text: str) -> Config:
    """Load a dedented config with source name `config.yaml`."""
    return load_config(textwrap.dedent(text), source="config.yaml")


TS = """\
version: v1
sharing:
  timeSlicing:
    resources:
    - name: gpu
      replicas: 4
{extra}"""


def ts_entry(extra: str) -> str:
    """A one-entry time-slicing config with extra lines in the entry."""
    return TS.format(extra=textwrap.indent(textwrap.dedent(extra), "      "))


INVALID = [
    pytest.param(
        "version: v2\n",
        "config.yaml: version: must be one of 'v1', got \"v2\"",
        id="unknown version",
    ),
    pytest.param(
        "", 'config.yaml: the file is empty; write at least "version: v1"', id="empty file"
    ),
    pytest.param("- a\n", "config.yaml: must be a mapping of keys, got list", id="not a mapping"),
    pytest.param("version: v1\nflags: [1\n", "config.yaml: not valid YAML: line 3:", id="bad yaml"),
    pytest.param(
        "version: v1\nflags:\n  renameByDefault: true\n",
        "config.yaml: flags.renameByDefault: unknown key; "
        "did you mean sharing.timeSlicing.renameByDefault?",
        id="misplaced renameByDefault",
    ),
    pytest.param(
        "version: v1\nflags:\n  migStratgy: mixed\n",
        "config.yaml: flags.migStratgy: unknown key; did you mean flags.migStrategy?",
        id="misspelt key",
    ),
    pytest.param(
        "version: v1\nfoo: 1\n",
        "config.yaml: foo: unknown key; valid keys here: version, flags, resources, sharing, "
        "imex, health",
        id="unknown top-level key",
    ),
    pytest.param(
        "version: v1\nflags:\n  migStrategy: both\n",
        "config.yaml: flags.migStrategy: must be one of 'none', 'single' or 'mixed', got \"both\"",
        id="unknown migStrategy",
    ),
    pytest.param(
        "version: v1\nflags:\n  failOnInitError: 'yes'\n",
        'config.yaml: flags.failOnInitError: must be true or false, got "yes"',
        id="bool as string",
    ),
    pytest.param(
        "version: v1\nflags:\n  plugin:\n    deviceIDStrategy: serial\n",
        "config.yaml: flags.plugin.deviceIDStrategy: must be one of 'uuid' or 'index', "
        'got "serial"',
        id="unknown deviceIDStrategy",
    ),
    pytest.param(
        "version: v1\nflags:\n  plugin:\n    deviceListStrategy: [envvar, cdi]\n",
        "config.yaml: flags.plugin.deviceListStrategy[1]: must be one of envvar, volume-mounts, "
        'cdi-annotations, cdi-cri, got "cdi"',
        id="unknown deviceListStrategy",
    ),
    pytest.param(
        "version: v1\nflags:\n  plugin:\n    cdiKind: example.com/gpu\n",
        "config.yaml: flags.plugin.cdiKind: must be one of 'k8s.device-plugin.nvidia.com/gpu' "
        "or 'nvidia.com/gpu', got \"example.com/gpu\"",
        id="unknown cdiKind",
    ),
    pytest.param(
        "version: v1\nflags:\n  plugin:\n    sharedDevicesAllocationPolicy: spread\n",
        "config.yaml: flags.plugin.sharedDevicesAllocationPolicy: must be one of 'distributed' "
        "or 'packed', got \"spread\"",
        id="unknown allocation policy",
    ),
    pytest.param(
        "version: v1\nsharing:\n  timeSlicing:\n    resources: []\n",
        "config.yaml: sharing.timeSlicing.resources: no resources specified; list at least one "
        "entry",
        id="no resources",
    ),
    pytest.param(
        "version: v1\nsharing:\n  mps:\n    renameByDefault: true\n",
        "config.yaml: sharing.mps.resources: required, but missing",
        id="mps without resources",
    ),
    pytest.param(
        "version: v1\nsharing:\n  timeSlicing:\n    resources:\n    - replicas: 2\n",
        "config.yaml: sharing.timeSlicing.resources[0].name: required, but missing",
        id="missing name",
    ),
    pytest.param(
        "version: v1\nsharing:\n  timeSlicing:\n    resources:\n    - name: gpu\n",
        "config.yaml: sharing.timeSlicing.resources[0].replicas: required, but missing",
        id="missing replicas",
    ),
    pytest.param(
        TS.replace("replicas: 4", "replicas: 1").format(extra=""),
        "config.yaml: sharing.timeSlicing.resources[0].replicas: must be >= 2, got 1",
        id="replicas below 2",
    ),
    pytest.param(
        TS.replace("replicas: 4", "replicas: '4'").format(extra=""),
        'config.yaml: sharing.timeSlicing.resources[0].replicas: must be an integer, got "4"',
        id="replicas as string",
    ),
    pytest.param(
        ts_entry("devices: some\n"),
        'config.yaml: sharing.timeSlicing.resources[0].devices: must be "all", a count or a '
        'list of devices, got "some"',
        id="devices string other than all",
    ),
    pytest.param(
        ts_entry("devices: 0\n"),
        "config.yaml: sharing.timeSlicing.resources[0].devices: a device count must be between 1 "
        "and 1024, got 0",
        id="device count zero",
    ),
    pytest.param(
        ts_entry("devices: []\n"),
        "config.yaml: sharing.timeSlicing.resources[0].devices: the device list is empty",
        id="empty device list",
    ),
    pytest.param(
        ts_entry("devices: [0, GPU-123]\n"),
        "config.yaml: sharing.timeSlicing.resources[0].devices[1]: must be a GPU index (0-9999), "
        'a MIG index "<gpu>:<mig>", a GPU-<uuid> or a MIG-<uuid>, got "GPU-123"',
        id="malformed device reference",
    ),
    pytest.param(
        ts_entry("devices: [-1]\n"),
        "config.yaml: sharing.timeSlicing.resources[0].devices[0]: must be a GPU index",
        id="negative device index",
    ),
    pytest.param(
        TS.replace("name: gpu", "name: GPU_Big").format(extra=""),
        'config.yaml: sharing.timeSlicing.resources[0].name: resource name "GPU_Big" of '
        '"nvidia.com/GPU_Big" must be a DNS subdomain',
        id="resource name not a DNS subdomain",
    ),
    pytest.param(
        TS.replace("name: gpu", "name: " + "g" * 60).format(extra=""),
        "config.yaml: sharing.timeSlicing.resources[0].name: resource name "
        f'"nvidia.com/{"g" * 60}" is 71 characters; at most 63 are allowed',
        id="resource name too long",
    ),
    pytest.param(
        ts_entry("rename: Shared!\n"),
        'config.yaml: sharing.timeSlicing.resources[0].rename: resource name "Shared!"',
        id="bad rename",
    ),
    pytest.param(
        ts_entry("activeThreadPercentage: 50\n"),
        "config.yaml: sharing.timeSlicing.resources[0].activeThreadPercentage: unknown key; "
        "did you mean sharing.mps.resources[].activeThreadPercentage?",
        id="MPS limit on a time-slicing entry",
    ),
    pytest.param(
        "version: v1\nsharing:\n  timeSlicing:\n    strategy: round-robin\n"
        "    resources: [{name: gpu, replicas: 2}]\n",
        "config.yaml: sharing.timeSlicing.strategy: must be one of '', got \"round-robin\"",
        id="unknown time-slicing strategy",
    ),
    pytest.param(
        "version: v1\nsharing:\n  mps:\n    resources:\n    - name: gpu\n      replicas: 4\n"
        "      activeThreadPercentage: 0\n",
        "config.yaml: sharing.mps.resources[0].activeThreadPercentage: must be >= 1, got 0",
        id="thread percentage zero",
    ),
    pytest.param(
        "version: v1\nsharing:\n  mps:\n    resources:\n    - name: gpu\n      replicas: 4\n"
        "      activeThreadPercentage: 101\n",
        "config.yaml: sharing.mps.resources[0].activeThreadPercentage: must be <= 100, got 101",
        id="thread percentage above 100",
    ),
    pytest.param(
        "version: v1\nsharing:\n  mps:\n    resources:\n    - name: gpu\n      replicas: 4\n"
        "      pinnedMemoryLimit: 4T\n",
        "config.yaml: sharing.mps.resources[0].pinnedMemoryLimit: must be a memory size such as "
        '"4096M", "4G" or MiB, at most 16 TiB, got "4T"',
        id="bad pinned memory limit",
    ),
    pytest.param(
        "version: v1\nresources:\n  gpus:\n  - name: a100\n",
        "config.yaml: resources.gpus[0].pattern: required, but missing",
        id="resource pattern missing",
    ),
    pytest.param(
        "version: v1\nhealth:\n  probeInterval: soon\n",
        'config.yaml: health.probeInterval: must be a duration such as "250ms", "30s", "5m" or '
        'a number of seconds, at most 7 days, got "soon"',
        id="bad duration",
    ),
    pytest.param(
        "version: v1\nhealth:\n  ignoredXids: [13, -1]\n",
        "config.yaml: health.ignoredXids[1]: must be >= 0, got -1",
        id="negative XID",
    ),
    pytest.param(
        "version: v1\nhealth:\n  ignoreXids: [13]\n",
        "config.yaml: health.ignoreXids: unknown key; did you mean health.ignoredXids?",
        id="misspelt health key",
    ),
]


@pytest.mark.parametrize(("text", "message"), INVALID)
def test_invalid_config_is_rejected_with_a_precise_message(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(text, source="config.yaml")
    assert str(info.value).startswith(message), str(info.value)


def test_every_problem_is_listed_on_its_own_line() -> None:
    text = "version: v1\nflags:\n  migStrategy: x\n  foo: 1\n"
    with pytest.raises(ConfigError) as info:
        load_config(text, source="c.yaml")
    assert str(info.value).splitlines() == [
        "c.yaml: flags.migStrategy: must be one of 'none', 'single' or 'mixed', got \"x\"",
        "c.yaml: flags.foo: unknown key; valid keys here: migStrategy, failOnInitError, "
        "restartOnDeviceUnhealthy, mpsRoot, nvidiaDriverRoot, nvidiaDevRoot, gdrcopyEnabled, "
        "gdsEnabled, mofedEnabled, useNodeFeatureAPI, deviceDiscoveryStrategy, plugin, gfd",
    ]


DEVICES = [
    pytest.param("", "all", id="default all"),
    pytest.param("devices: all\n", "all", id="all"),
    pytest.param("devices: 3\n", 3, id="count"),
    pytest.param("devices: [0, '1', '2:3']\n", ("0", "1", "2:3"), id="indices and MIG index"),
    pytest.param(
        "devices: [GPU-b1028956-cfa2-0990-bf4a-5da9abb51763, "
        "MIG-b1028956-cfa2-0990-bf4a-5da9abb51763, "
        "MIG-GPU-b1028956-cfa2-0990-bf4a-5da9abb51763/3/0]\n",
        (
            "GPU-b1028956-cfa2-0990-bf4a-5da9abb51763",
            "MIG-b1028956-cfa2-0990-bf4a-5da9abb51763",
            "MIG-GPU-b1028956-cfa2-0990-bf4a-5da9abb51763/3/0",
        ),
        id="UUIDs",
    ),
]


@pytest.mark.parametrize(("extra", "expected"), DEVICES)
def test_devices_forms(extra: str, expected: object) -> None:
    assert cfg(ts_entry(extra)).sharing.time_slicing.resources[0].devices == expected


def test_resource_names_get_the_nvidia_prefix_and_keep_others() -> None:
    config = cfg(ts_entry("rename: example.com/shared-gpu\n"))
    entry = config.sharing.time_slicing.resources[0]
    assert (entry.name, entry.rename) == ("nvidia.com/gpu", "example.com/shared-gpu")


def test_defaults() -> None:
    config = default_config()
    assert config.flags.mig_strategy == "none"
    assert config.flags.fail_on_init_error is True
    assert config.flags.plugin.device_list_strategy == ("envvar",)
    assert config.flags.plugin.device_id_strategy == "uuid"
    assert config.flags.plugin.cdi_annotation_prefix == "cdi.k8s.io/"
    assert config.flags.plugin.shared_devices_allocation_policy == "distributed"
    assert config.flags.dev_root == "/"
    assert config.sharing.time_slicing is None
    assert config.sharing.mps is None
    assert config.health.ignored_xids == (13, 31, 43, 45, 68, 109)
    assert config.health.reset_required_xids == (48, 79, 95)
    assert (config.health.recovery_quiet_period_s, config.health.probe_interval_s) == (300, 10)


def test_fail_requests_default_differs_between_time_slicing_and_mps() -> None:
    ts = cfg(TS.format(extra=""))
    mps = cfg(TS.replace("timeSlicing", "mps").format(extra=""))
    assert ts.sharing.time_slicing.fail_requests_greater_than_one is False
    assert mps.sharing.mps.fail_requests_greater_than_one is True


def test_upstream_flags_are_all_accepted() -> None:
    config = cfg(
        """\
        version: v1
        flags:
          migStrategy: mixed
          failOnInitError: false
          restartOnDeviceUnhealthy: false
          mpsRoot: /run/nvidia/mps
          nvidiaDriverRoot: /run/nvidia/driver
          nvidiaDevRoot: /
          gdrcopyEnabled: true
          gdsEnabled: false
          mofedEnabled: false
          useNodeFeatureAPI: false
          deviceDiscoveryStrategy: auto
          plugin:
            passDeviceSpecs: true
            deviceListStrategy: [envvar, cdi-cri]
            deviceIDStrategy: index
            cdiAnnotationPrefix: cdi.k8s.io/
            nvidiaCTKPath: /usr/bin/nvidia-ctk
            containerDriverRoot: /driver-root
            sharedDevicesAllocationPolicy: packed
          gfd:
            oneshot: false
            noTimestamp: false
            sleepInterval: 60s
            outputFile: /etc/kubernetes/node-feature-discovery/features.d/gfd
            machineTypeFile: /sys/class/dmi/id/product_name
        imex:
          channelIDs: [0]
          required: false
        """
    )
    assert config.flags.gdrcopy_enabled is True
    assert config.flags.plugin.device_list_strategy == ("envvar", "cdi-cri")
    assert config.flags.dev_root == "/"


def test_health_section_durations_are_seconds() -> None:
    config = cfg("version: v1\nhealth:\n  recoveryQuietPeriod: 1m30s\n  probeInterval: 250ms\n")
    assert config.health.recovery_quiet_period_s == 90.0
    assert config.health.probe_interval_s == 0.25
    assert cfg("version: v1\nhealth:\n  probeInterval: 5\n").health.probe_interval_s == 5.0


@pytest.mark.parametrize(
    ("value", "mib"),
    [
        pytest.param("4096M", 4096, id="M"),
        pytest.param("4G", 4096, id="G"),
        pytest.param(2048, 2048, id="MiB int"),
    ],
)
def test_pinned_memory_limit_forms(value: object, mib: int) -> None:
    text = TS.replace("timeSlicing", "mps").format(extra=f"      pinnedMemoryLimit: {value}\n")
    assert cfg(text).sharing.mps.resources[0].pinned_memory_limit_mib == mib


def test_null_keys_mean_unset() -> None:
    config = cfg(
        "version: v1\nflags:\nsharing:\n  timeSlicing:\n    renameByDefault:\n"
        "    resources: [{name: gpu, replicas: 2}]\n"
    )
    assert config.flags.mig_strategy == "none"
    assert config.sharing.time_slicing.rename_by_default is False


def test_json_is_accepted() -> None:
    config = load_config('{"version": "v1", "flags": {"migStrategy": "single"}}')
    assert config.flags.mig_strategy == "single"


def test_config_is_frozen() -> None:
    config = default_config()
    with pytest.raises(ValidationError, match="frozen"):
        config.flags.mig_strategy = "mixed"  # type: ignore[misc]


def test_dump_round_trips() -> None:
    config = cfg(ts_entry("devices: [0, '1:2']\nrename: shared\n"))
    again = Config.model_validate(config.model_dump(by_alias=True, exclude_unset=True))
    assert again == config


# --- precedence: flag > env > file > default -----------------------------------------------

FILE = "version: v1\nflags:\n  migStrategy: single\n  plugin:\n    passDeviceSpecs: true\n"


@pytest.mark.parametrize(
    ("env", "flags", "mig", "pass_specs"),
    [
        pytest.param({}, {}, "single", True, id="file over default"),
        pytest.param({"MIG_STRATEGY": "mixed"}, {}, "mixed", True, id="env over file"),
        pytest.param(
            {"MIG_STRATEGY": "mixed"}, {"mig-strategy": "none"}, "none", True, id="flag over env"
        ),
        pytest.param(
            {},
            {"mig_strategy": "none", "pass_device_specs": False},
            "none",
            False,
            id="flag names with underscores",
        ),
        pytest.param(
            {"PASS_DEVICE_SPECS": "false"},
            {"mig-strategy": None},
            "single",
            False,
            id="env bool and unset flag",
        ),
    ],
)
def test_override_precedence(
    env: dict[str, str], flags: dict[str, object], mig: str, pass_specs: bool
) -> None:
    config = apply_overrides(load_config(FILE), env, flags)
    assert config.flags.mig_strategy == mig
    assert config.flags.plugin.pass_device_specs is pass_specs


def test_env_names_from_the_nvidia_plugin() -> None:
    env = {
        "FAIL_ON_INIT_ERROR": "false",
        "MPS_ROOT": "/run/nvidia/mps",
        "NVIDIA_DRIVER_ROOT": "/run/nvidia/driver",
        "DEVICE_LIST_STRATEGY": "envvar, cdi-annotations",
        "DEVICE_ID_STRATEGY": "index",
        "CDI_ANNOTATION_PREFIX": "example.com/",
        "SHARED_DEVICES_ALLOCATION_POLICY": "packed",
        "CDI_KIND": "nvidia.com/gpu",
        "NVIDIA_CTK_PATH": "/usr/local/bin/nvidia-ctk",
        "UNRELATED": "x",
    }
    flags = apply_overrides(default_config(), env, {}).flags
    assert flags.fail_on_init_error is False
    assert flags.mps_root == "/run/nvidia/mps"
    assert flags.dev_root == "/run/nvidia/driver"
    assert flags.plugin.device_list_strategy == ("envvar", "cdi-annotations")
    assert flags.plugin.device_id_strategy == "index"
    assert flags.plugin.cdi_annotation_prefix == "example.com/"
    assert flags.plugin.shared_devices_allocation_policy == "packed"
    assert flags.plugin.cdi_kind == "nvidia.com/gpu"
    assert flags.plugin.nvidia_ctk_path == "/usr/local/bin/nvidia-ctk"


@pytest.mark.parametrize(
    ("env", "flags", "message"),
    [
        pytest.param(
            {"MIG_STRATEGY": "all"},
            {},
            "MIG_STRATEGY: flags.migStrategy: must be one of 'none', 'single' or "
            "'mixed', got \"all\"",
            id="bad env value",
        ),
        pytest.param(
            {},
            {"device-list-strategy": ["envvar", "nope"]},
            "flag --device-list-strategy: flags.plugin.deviceListStrategy[1]: must be "
            'one of envvar, volume-mounts, cdi-annotations, cdi-cri, got "nope"',
            id="bad flag value",
        ),
        pytest.param(
            {"PASS_DEVICE_SPECS": "maybe"},
            {},
            'PASS_DEVICE_SPECS: flags.plugin.passDeviceSpecs: must be true or false, got "maybe"',
            id="bad env bool",
        ),
        pytest.param(
            {},
            {"mig-stratgy": "mixed"},
            "flag --mig-stratgy: unknown flag; did you mean --mig-strategy?",
            id="unknown flag",
        ),
    ],
)
def test_override_errors_name_their_source(
    env: dict[str, str], flags: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        apply_overrides(default_config(), env, flags)


def test_overrides_keep_the_file_values_they_do_not_touch() -> None:
    base = cfg(ts_entry("devices: [0, 1]\n"))
    config = apply_overrides(base, {"MPS_ROOT": "/run/mps"}, {})
    assert config.sharing == base.sharing
    assert config.flags.mps_root == "/run/mps"
    assert apply_overrides(base, {}, {}) is base
