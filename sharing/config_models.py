"""Pydantic models of the config file: NVIDIA device plugin `version: v1` plus gpushare extensions.

Every model forbids unknown keys and is frozen. Field aliases are the camelCase keys of the file.
Values are normalised while parsing (resource names get their `nvidia.com/` prefix, durations
become seconds, memory sizes MiB), and each normalised value is valid input again, so a dumped
config (`model_dump(by_alias=True)`) validates to the same config.

Every field is bounded (see the MAX_* constants): replicas, counts, list lengths, string lengths,
durations and sizes, so no value can make planning or serving unbounded. Values quoted in
error messages are shortened.
"""

from __future__ import annotations

import posixpath
import re
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from sharing.cron import cron_trigger
from sharing.text import short_repr

DEFAULT_PREFIX = "nvidia.com"
MAX_RESOURCE_NAME = 63
DEVICE_LIST_STRATEGIES = ("envvar", "volume-mounts", "cdi-annotations", "cdi-cri")
_DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS_SUBDOMAIN = re.compile(rf"{_DNS_LABEL}(\.{_DNS_LABEL})*")
_UUID = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
_GPU_UUID = re.compile(rf"GPU-{_UUID}")
_MIG_UUID = re.compile(rf"MIG-{_UUID}|MIG-GPU-{_UUID}/\d{{1,4}}/\d{{1,4}}")
_MIG_INDEX = re.compile(r"\d{1,4}:\d{1,4}")
_GPU_INDEX = re.compile(r"\d{1,4}")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_MEMORY = re.compile(r"(\d{1,9})([MG])")
MAX_MIG_CONFIG_NAME = 128
MAX_CRON = 256

# Bounds of every field. Replicas: with at most MAX_DEVICES_PER_RESOURCE IDs per resource
# (sharing.message_budget) the largest ListAndWatch message stays far below the kubelet's 4 MiB.
MAX_REPLICAS = 1024  # replicas of one physical device
MAX_DEVICE_REFS = 1024  # entries of one `devices` list, and the largest `devices` count
MAX_GPU_INDEX = 9999
MAX_ENTRIES = 256  # entries of each `resources` list and each XID / channel list
MAX_TEXT = 4096  # characters of any string (PATH_MAX)
MAX_PATTERN = 256  # characters of a `resources.gpus[].pattern`
MAX_DURATION_S = 7 * 24 * 3600.0
MAX_MEMORY_MIB = 1 << 24  # 16 TiB
MAX_ID = 2**32 - 1  # XIDs and IMEX channel IDs


class FieldIssue(ValueError):
    """A validation problem below the field being validated (e.g. one item of a list)."""

    def __init__(self, subpath: str, message: str) -> None:
        super().__init__(message)
        self.subpath = subpath
        self.message = message


def _quote(value: object) -> str:
    """A value as it appears in error messages: quoted, shortened, bounded."""
    return short_repr(value)


def resource_name(value: object) -> str:
    """Normalise and check an extended resource name (facts §2)."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"must be a non-empty resource name, got {_quote(value)}")
    full = value if "/" in value else f"{DEFAULT_PREFIX}/{value}"
    domain, _, name = full.partition("/")
    if len(full) > MAX_RESOURCE_NAME:
        raise ValueError(
            f"resource name {_quote(full)} is {len(full)} characters; "
            f"at most {MAX_RESOURCE_NAME} are allowed"
        )
    for part, what in ((domain, "domain"), (name, "name")):
        if not _DNS_SUBDOMAIN.fullmatch(part):
            raise ValueError(
                f"resource {what} {_quote(part)} of {_quote(full)} must be a DNS subdomain "
                "(lower-case letters, digits, '-' and '.', starting and ending with a letter "
                "or digit)"
            )
    return full


def device_ref(value: object) -> str:
    """Check one entry of a `devices` list and return it as a string."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_GPU_INDEX:
        return str(value)
    if isinstance(value, str) and (
        _GPU_INDEX.fullmatch(value)
        or _MIG_INDEX.fullmatch(value)
        or _GPU_UUID.fullmatch(value)
        or _MIG_UUID.fullmatch(value)
    ):
        return value
    raise ValueError(
        f'must be a GPU index (0-{MAX_GPU_INDEX}), a MIG index "<gpu>:<mig>", a GPU-<uuid> '
        f"or a MIG-<uuid>, got {_quote(value)}"
    )


def devices_spec(value: object) -> str | int | tuple[str, ...]:
    """Parse `devices`: "all", a positive count, or a list of device references."""
    if isinstance(value, str):
        if value != "all":
            raise ValueError(f'must be "all", a count or a list of devices, got {_quote(value)}')
        return value
    if isinstance(value, bool):
        raise ValueError(f'must be "all", a count or a list of devices, got {value!r}')
    if isinstance(value, int):
        if not 1 <= value <= MAX_DEVICE_REFS:
            raise ValueError(
                f"a device count must be between 1 and {MAX_DEVICE_REFS}, got {_quote(value)}"
            )
        return value
    if isinstance(value, list | tuple):
        if not value:
            raise ValueError('the device list is empty; list at least one device or use "all"')
        if len(value) > MAX_DEVICE_REFS:
            raise ValueError(
                f"the device list has {len(value):,} entries; at most {MAX_DEVICE_REFS} "
                "are allowed"
            )
        refs = []
        for i, item in enumerate(value):
            try:
                refs.append(device_ref(item))
            except ValueError as err:
                raise FieldIssue(f"[{i}]", str(err)) from err
        return tuple(refs)
    raise ValueError(f'must be "all", a count or a list of devices, got {_quote(value)}')


def duration_s(value: object) -> float:
    """Parse a duration: seconds as a number, or a string like "250ms", "30s", "5m", "1h30m".

    At most MAX_DURATION_S (7 days); NaN and infinity are refused.
    """
    seconds: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value) if abs(value) < 1e300 else None
    elif isinstance(value, str) and value and len(value) <= 64:
        parts = _DURATION_PART.findall(value)
        if "".join(n + u for n, u in parts) == value:
            seconds = sum(float(n) * _DURATION_UNITS[u] for n, u in parts)
    if seconds is None or not 0 <= seconds <= MAX_DURATION_S:  # NaN fails both comparisons
        raise ValueError(
            f'must be a duration such as "250ms", "30s", "5m" or a number of seconds, '
            f"at most 7 days, got {_quote(value)}"
        )
    return seconds


def memory_mib(value: object) -> int:
    """Parse a per-replica memory limit: "4096M", "4G" or a number of MiB (at most 16 TiB)."""
    mib = 0
    if isinstance(value, int) and not isinstance(value, bool):
        mib = value
    elif isinstance(value, str) and (match := _MEMORY.fullmatch(value)):
        mib = int(match[1]) * (1024 if match[2] == "G" else 1)
    if not 0 < mib <= MAX_MEMORY_MIB:
        raise ValueError(
            f'must be a memory size such as "4096M", "4G" or MiB, at most 16 TiB, '
            f"got {_quote(value)}"
        )
    return mib


def device_list_strategy(value: object) -> tuple[str, ...]:
    """Parse `deviceListStrategy`: one strategy or a list of them."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not items or len(items) > MAX_ENTRIES:
        raise ValueError(f"must be a strategy or a list of strategies, got {_quote(value)}")
    for i, item in enumerate(items):
        if item not in DEVICE_LIST_STRATEGIES:
            raise FieldIssue(
                f"[{i}]",
                f"must be one of {', '.join(DEVICE_LIST_STRATEGIES)}, got {_quote(item)}",
            )
    return tuple(items)


def host_path(value: object) -> str:
    """A path flag: `..` components refused (no escaping a root), `//` and `/./` collapsed.

    The empty string stays empty (unset).
    """
    if not isinstance(value, str):
        raise ValueError(f"must be a path, got {_quote(value)}")
    if "\0" in value:
        raise ValueError(f"must be a path without NUL characters, got {_quote(value)}")
    if ".." in value.split("/"):
        raise ValueError(f'must not contain ".." (a path escaping its root), got {_quote(value)}')
    if not value:
        return value
    normal = posixpath.normpath(value)
    if value.startswith("//"):  # normpath keeps a leading "//"; one slash means the same
        normal = "/" + normal.lstrip("/")
    return normal


def _version(value: object) -> object:
    """`version` as upstream reads it: missing or empty means v1."""
    return "v1" if value == "" else value


def _nonempty(value: tuple[object, ...]) -> tuple[object, ...]:
    """Reject an empty resources list."""
    if not value:
        raise ValueError("no resources specified; list at least one entry")
    return value


ResourceName = Annotated[str, BeforeValidator(resource_name)]
Devices = Annotated[str | int | tuple[str, ...], BeforeValidator(devices_spec)]
DurationS = Annotated[float, BeforeValidator(duration_s)]
MemoryMiB = Annotated[int, BeforeValidator(memory_mib)]
DeviceListStrategies = Annotated[tuple[str, ...], BeforeValidator(device_list_strategy)]
Xid = Annotated[StrictInt, Field(ge=0, le=MAX_ID)]
Text = Annotated[StrictStr, Field(max_length=MAX_TEXT)]
HostPath = Annotated[str, Field(max_length=MAX_TEXT), BeforeValidator(host_path)]
Replicas = Annotated[StrictInt, Field(ge=2, le=MAX_REPLICAS)]


class StrictModel(BaseModel):
    """Base of every config model: unknown keys are errors, instances are frozen."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, alias_generator=to_camel, populate_by_name=False
    )

    @model_validator(mode="before")
    @classmethod
    def _drop_nulls(cls, data: object) -> object:
        """A key set to null (`key:` with nothing after it) means the key is unset."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data


class PluginFlags(StrictModel):
    """`flags.plugin`: how devices are handed to containers."""

    pass_device_specs: StrictBool = False
    device_list_strategy: DeviceListStrategies = ("envvar",)
    device_id_strategy: Literal["uuid", "index"] = Field("uuid", alias="deviceIDStrategy")
    cdi_annotation_prefix: Text = "cdi.k8s.io/"
    # gpushare extension: the CDI kind Allocate names; the default one's spec gpushare writes,
    # nvidia.com/gpu names the devices of the NVIDIA Container Toolkit's own spec.
    cdi_kind: Literal["k8s.device-plugin.nvidia.com/gpu", "nvidia.com/gpu"] = (
        "k8s.device-plugin.nvidia.com/gpu"
    )
    nvidia_ctk_path: HostPath = Field("/usr/bin/nvidia-ctk", alias="nvidiaCTKPath")
    container_driver_root: HostPath = "/driver-root"
    shared_devices_allocation_policy: Literal["distributed", "packed"] = "distributed"


class GfdFlags(StrictModel):
    """`flags.gfd`: only `outputFile` is used (the node labels file; empty disables it)."""

    oneshot: StrictBool = False
    no_timestamp: StrictBool = False
    sleep_interval: DurationS = 60.0
    output_file: HostPath = "/etc/kubernetes/node-feature-discovery/features.d/gfd"
    machine_type_file: HostPath = "/sys/class/dmi/id/product_name"


class Flags(StrictModel):
    """`flags`: the NVIDIA device plugin's command-line flags, as a file section."""

    mig_strategy: Literal["none", "single", "mixed"] = "none"
    fail_on_init_error: StrictBool = True
    restart_on_device_unhealthy: StrictBool = False
    mps_root: HostPath = ""
    nvidia_driver_root: HostPath = "/"
    nvidia_dev_root: HostPath = ""  # empty: same as nvidiaDriverRoot
    gdrcopy_enabled: StrictBool = False
    gds_enabled: StrictBool = False
    mofed_enabled: StrictBool = False
    use_node_feature_api: StrictBool = Field(False, alias="useNodeFeatureAPI")
    device_discovery_strategy: Literal["auto", "nvml", "tegra"] = "auto"
    plugin: PluginFlags = PluginFlags()
    gfd: GfdFlags = GfdFlags()

    @property
    def dev_root(self) -> str:
        """Root of the device nodes on the host: nvidiaDevRoot, else nvidiaDriverRoot."""
        return self.nvidia_dev_root or self.nvidia_driver_root


class NamedPattern(StrictModel):
    """`resources.gpus[]` / `resources.mig[]`: devices whose name matches `pattern` get `name`."""

    pattern: Annotated[StrictStr, Field(max_length=MAX_PATTERN)]
    name: ResourceName

    def matches(self, text: str) -> bool:
        """Wildcard match (`*` = any run), anchored at both ends."""
        regex = ".*".join(re.escape(part) for part in self.pattern.split("*"))
        return re.fullmatch(regex, text) is not None


class Resources(StrictModel):
    """`resources`: custom names for full GPUs (by product name) and MIG devices (by profile)."""

    gpus: tuple[NamedPattern, ...] = Field((), max_length=MAX_ENTRIES)
    mig: tuple[NamedPattern, ...] = Field((), max_length=MAX_ENTRIES)


class ReplicatedResource(StrictModel):
    """One entry of `sharing.<strategy>.resources`.

    `failRequestsGreaterThanOne` here (gpushare extension) overrides the section's value for the
    entry's resource; unset, the section's value applies.
    """

    name: ResourceName
    rename: ResourceName | None = None
    devices: Devices = "all"
    replicas: Replicas
    fail_requests_greater_than_one: StrictBool | None = None


class MpsReplicatedResource(ReplicatedResource):
    """An MPS entry, with optional per-replica limits overriding the defaults."""

    active_thread_percentage: StrictInt | None = Field(None, ge=1, le=100)
    pinned_memory_limit_mib: MemoryMiB | None = Field(None, alias="pinnedMemoryLimit")


class TimeSlicing(StrictModel):
    """`sharing.timeSlicing`."""

    strategy: Literal[""] = ""
    rename_by_default: StrictBool = False
    fail_requests_greater_than_one: StrictBool = False
    resources: tuple[ReplicatedResource, ...] = Field(max_length=MAX_ENTRIES)

    @field_validator("resources")
    @classmethod
    def _some_resources(cls, value: tuple[object, ...]) -> tuple[object, ...]:
        return _nonempty(value)


class Mps(StrictModel):
    """`sharing.mps`; failRequestsGreaterThanOne defaults to true, as upstream."""

    rename_by_default: StrictBool = False
    fail_requests_greater_than_one: StrictBool = True
    resources: tuple[MpsReplicatedResource, ...] = Field(max_length=MAX_ENTRIES)

    @field_validator("resources")
    @classmethod
    def _some_resources(cls, value: tuple[object, ...]) -> tuple[object, ...]:
        return _nonempty(value)


class Sharing(StrictModel):
    """`sharing`: at most one section per strategy."""

    time_slicing: TimeSlicing | None = None
    mps: Mps | None = None


class Imex(StrictModel):
    """`imex`: accepted for compatibility with the NVIDIA format; not used by gpushare."""

    channel_ids: tuple[Xid, ...] = Field((), alias="channelIDs", max_length=MAX_ENTRIES)
    required: StrictBool = False


class Health(StrictModel):
    """`health` (gpushare extension): XID policy and recovery timing."""

    disabled: StrictBool = False
    ignored_xids: tuple[Xid, ...] = Field((13, 31, 43, 45, 68, 109), max_length=MAX_ENTRIES)
    reset_required_xids: tuple[Xid, ...] = Field((48, 79, 95), max_length=MAX_ENTRIES)
    recovery_quiet_period_s: DurationS = Field(300.0, alias="recoveryQuietPeriod")
    probe_interval_s: DurationS = Field(10.0, alias="probeInterval")


def cron_expression(value: object) -> str:
    """Check a `schedule[].cron` expression (crontab meaning; 5 fields, or 6 with seconds)."""
    if isinstance(value, str) and len(value) > MAX_CRON:
        raise ValueError(
            f"must be a cron expression of at most {MAX_CRON} characters, got {len(value):,}"
        )
    cron_trigger(value, timezone="UTC")  # type: ignore[arg-type]
    return " ".join(str(value).split())


def mig_config_name(value: object) -> str:
    """Check the name of a mig-parted config (a key of `mig-configs`)."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"must be the name of a mig-parted config, got {_quote(value)}")
    if len(value) > MAX_MIG_CONFIG_NAME or any(c.isspace() or not c.isprintable() for c in value):
        raise ValueError(
            f"must be a mig-parted config name of at most {MAX_MIG_CONFIG_NAME} printable"
            f" characters without spaces, got {_quote(value[:MAX_MIG_CONFIG_NAME])}"
        )
    return value


CronExpression = Annotated[str, BeforeValidator(cron_expression)]
MigConfigName = Annotated[str, BeforeValidator(mig_config_name)]


class MigScheduleEntry(StrictModel):
    """One `migReconfiguration.schedule[]` entry: when (cron), and which mig-parted config."""

    cron: CronExpression
    config: MigConfigName


class MigReconfiguration(StrictModel):
    """`migReconfiguration` (gpushare extension): MIG reconfiguration jobs run by the daemon.

    `configFile` is the mig-parted `version: v1` file the jobs read; `schedule` fires jobs by
    cron; a job waits up to `drainTimeout` for compute processes to leave the GPUs it changes,
    and with `killProcesses` kills the ones still there instead of failing.
    """

    config_file: HostPath | None = None
    schedule: tuple[MigScheduleEntry, ...] = Field((), max_length=MAX_ENTRIES)
    drain_timeout_s: DurationS = Field(300.0, alias="drainTimeout", le=86400.0)
    kill_processes: StrictBool = False

    @model_validator(mode="after")
    def _schedule_needs_file(self) -> MigReconfiguration:
        if self.schedule and not self.config_file:
            raise ValueError(
                "schedule needs configFile: the mig-parted file whose configs the entries name"
            )
        first: dict[str, int] = {}
        for i, entry in enumerate(self.schedule):
            cron = " ".join(entry.cron.split())
            if cron in first:
                raise ValueError(
                    f"schedule[{i}] fires at the same times as schedule[{first[cron]}] "
                    f'("{cron}"): only one job runs at a time, so one of them would be skipped; '
                    "keep one entry per time"
                )
            first[cron] = i
        return self


class Config(StrictModel):
    """A whole config file (`version: v1`; missing or empty means v1, as upstream)."""

    version: Annotated[Literal["v1"], BeforeValidator(_version)] = "v1"
    flags: Flags = Flags()
    resources: Resources = Resources()
    sharing: Sharing = Sharing()
    imex: Imex = Imex()
    health: Health = Health()
    mig_reconfiguration: MigReconfiguration = MigReconfiguration()
