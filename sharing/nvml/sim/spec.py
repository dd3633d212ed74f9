"""Node descriptions for the simulated NVML (configs/nodes/*.yaml): strict models and loading.

A description names the node, its driver (versions; `recovery_action_field: false` for a driver
without the GPU recovery action field), an optional NVSwitch fabric or direct NVLink pairs, and one
entry per GPU (model key from `sharing.nvml.profiles.CARDS`, PCI bus id, NUMA node, PCIe path,
initial MIG mode and instances, compute mode, initial processes). Unknown keys are errors; every
error names the file, the field path and the value.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Literal

import pynvml
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sharing.errors import ConfigError
from sharing.nvml.profiles import CARDS, CardModel
from sharing.text import short_repr

_UUID_NAMESPACE = uuid.UUID("6f1d2a5e-43c8-4b7e-9a55-2b1f0c6d8e11")
COMPUTE_MODES = {
    "Default": pynvml.NVML_COMPUTEMODE_DEFAULT,
    "Prohibited": pynvml.NVML_COMPUTEMODE_PROHIBITED,
    "ExclusiveProcess": pynvml.NVML_COMPUTEMODE_EXCLUSIVE_PROCESS,
}
_STRICT = ConfigDict(extra="forbid", frozen=True)


class MigInstanceSpec(BaseModel):
    """One initial MIG device: a GI of `profile` at memory slot `start` plus its full CI."""

    model_config = _STRICT
    profile: str
    start: int = Field(ge=0)


class MigSpec(BaseModel):
    """Initial MIG state of a GPU; `pending` defaults to `enabled` (set it to model Ampere)."""

    model_config = _STRICT
    enabled: bool = False
    pending: bool | None = None
    instances: tuple[MigInstanceSpec, ...] = ()


class ProcessSpec(BaseModel):
    """One initial compute process; `mig: "GI:CI"` places it on a MIG device."""

    model_config = _STRICT
    used_mib: int = Field(default=256, ge=0)
    mig: str | None = None


class GpuSpec(BaseModel):
    """One GPU of a simulated node."""

    model_config = _STRICT
    model: str
    bus_id: str = Field(pattern=r"^[0-9A-F]{8}:[0-9A-F]{2}:[0-9A-F]{2}\.0$")
    numa_node: int | None = None
    pcie_path: tuple[str, ...] = ()
    board: str | None = None
    uuid: str | None = Field(default=None, pattern=r"^GPU-[0-9a-f-]{36}$")
    minor: int | None = Field(default=None, ge=0)
    compute_mode: Literal["Default", "Prohibited", "ExclusiveProcess"] = "Default"
    mig: MigSpec = MigSpec()
    processes: tuple[ProcessSpec, ...] = ()


class NvSwitchSpec(BaseModel):
    """An NVSwitch fabric: every GPU has `links_per_switch[s]` links to switch s."""

    model_config = _STRICT
    links_per_switch: tuple[int, ...] = Field(min_length=1)


class NodeSpec(BaseModel):
    """A simulated node."""

    model_config = _STRICT
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9.-]*$")
    description: str = ""
    driver_version: str = "550.54.15"
    cuda_driver_version: int = 12040
    init_error: str | None = None  # NVML error constant suffix nvmlInit fails with
    recovery_action_field: bool = True  # NVML_FI_DEV_GET_GPU_RECOVERY_ACTION supported
    nvswitch: NvSwitchSpec | None = None
    nvlink_pairs: tuple[tuple[int, int, int], ...] = ()
    gpus: tuple[GpuSpec, ...] = Field(min_length=1)

    def card(self, index: int) -> CardModel:
        """The card model of GPU `index`."""
        return CARDS[self.gpus[index].model]

    def gpu_uuid(self, index: int) -> str:
        """UUID of GPU `index` (from the file, else stable for node name and index)."""
        given = self.gpus[index].uuid
        return given or f"GPU-{uuid.uuid5(_UUID_NAMESPACE, f'{self.name}/{index}')}"

    def minor(self, index: int) -> int:
        """Minor number of GPU `index` (/dev/nvidia<minor>)."""
        given = self.gpus[index].minor
        return index if given is None else given

    def init_error_code(self) -> int | None:
        """The NVML error code nvmlInit fails with, or None."""
        return None if self.init_error is None else getattr(pynvml, f"NVML_ERROR_{self.init_error}")


def mig_device_uuid(gpu_uuid: str, gi: int, ci: int) -> str:
    """A MIG device UUID, stable for (parent GPU, GI, CI)."""
    return f"MIG-{uuid.uuid5(_UUID_NAMESPACE, f'{gpu_uuid}/{gi}/{ci}')}"


def switch_bus_id(switch: int) -> str:
    """PCI bus id of NVSwitch `switch` (its NVLink remote end)."""
    return f"00000000:{0xC0 + switch:02X}:00.0"


def parse_node(text: str, source: str) -> NodeSpec:
    """Parse and check a node description; ConfigError names `source`, field path and value."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{source}: a node description must be a mapping, got {type(raw).__name__}"
        )
    try:
        spec = NodeSpec.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        path = ".".join(str(p) if isinstance(p, str) else f"[{p}]" for p in first["loc"])
        path = path.replace(".[", "[")
        got = "" if first["type"] == "missing" else f", got {short_repr(first.get('input'))}"
        raise ConfigError(f"{source}: {path}: {first['msg']}{got}") from err
    _check(spec, source)
    return spec


def load_node_file(path: Path) -> NodeSpec:
    """Read and parse a node description file."""
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read node description: {err.strerror}") from err
    return parse_node(text, str(path))


def _check(spec: NodeSpec, source: str) -> None:
    if spec.init_error is not None and not hasattr(pynvml, f"NVML_ERROR_{spec.init_error}"):
        raise ConfigError(f"{source}: init_error: unknown NVML error name {spec.init_error!r}")
    bus_ids: set[str] = set()
    for i, gpu in enumerate(spec.gpus):
        where = f"{source}: gpus[{i}]"
        if gpu.model not in CARDS:
            known = ", ".join(sorted(CARDS))
            raise ConfigError(f"{where}.model: unknown model {gpu.model!r} (known: {known})")
        if gpu.bus_id in bus_ids:
            raise ConfigError(f"{where}.bus_id: duplicate PCI bus id {gpu.bus_id!r}")
        bus_ids.add(gpu.bus_id)
        card = CARDS[gpu.model]
        if (gpu.mig.enabled or gpu.mig.pending or gpu.mig.instances) and not card.mig_capable:
            raise ConfigError(f"{where}.mig: {card.name} is not MIG capable")
        if gpu.mig.instances and not gpu.mig.enabled:
            raise ConfigError(f"{where}.mig.instances: MIG instances need mig.enabled: true")
    _check_links(spec, source)


def _check_links(spec: NodeSpec, source: str) -> None:
    count = len(spec.gpus)
    links = [0] * count
    for k, (a, b, n) in enumerate(spec.nvlink_pairs):
        if not (0 <= a < count and 0 <= b < count) or a == b or n <= 0:
            raise ConfigError(
                f"{source}: nvlink_pairs[{k}]: needs two different GPU indices below {count} "
                f"and a positive link count, got {[a, b, n]}"
            )
        links[a] += n
        links[b] += n
    if spec.nvswitch is not None:
        links = [n + sum(spec.nvswitch.links_per_switch) for n in links]
    for i, n in enumerate(links):
        limit = spec.card(i).nvlink_links
        if n > limit:
            raise ConfigError(
                f"{source}: gpus[{i}]: {n} NVLink links configured, {spec.card(i).name} has {limit}"
            )
