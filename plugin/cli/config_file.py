"""Reading the config file: the I/O side of `sharing.config` (which only parses text)."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path

from sharing.config import OVERRIDES, Config, apply_overrides, load_config
from sharing.devices import Inventory
from sharing.errors import ConfigError, PlanError
from sharing.nvml.files import UnreadableFile, read_regular_text
from sharing.plan import build_plan
from sharing.plan_types import Plan
from sharing.text import shorten
from sharing.yaml_text import MAX_TEXT_BYTES

CONFIG_FILE_ENV = "CONFIG_FILE"


def config_path(explicit: str | None, env: Mapping[str, str]) -> str | None:
    """The config file to use: the --config flag, else $CONFIG_FILE, else None (defaults)."""
    return explicit or env.get(CONFIG_FILE_ENV) or None


def load_config_file(
    path: str | Path, *, env: Mapping[str, str], overrides: Mapping[str, object]
) -> Config:
    """Read, parse and validate a config file, then apply env and flags (flag > env > file).

    Raises:
        ConfigError: the file cannot be read or is invalid; the message starts with the path.
    """
    text = read_config_text(path)
    return apply_overrides(load_config(text, source=str(path)), env, overrides)


def read_config_text(path: str | Path) -> str:
    """The text of a config file: a regular file (links followed) of at most MAX_TEXT_BYTES.

    Opening never blocks (a FIFO is refused, not waited on) and at most MAX_TEXT_BYTES + 1
    bytes are read, whatever the path names (a link to /dev/zero is refused too).

    Raises:
        ConfigError: missing, unreadable, not a regular file, too large or not UTF-8 text; one
            line naming the path.
    """
    try:
        return read_regular_text(path, MAX_TEXT_BYTES, "config file")
    except UnreadableFile as err:
        raise ConfigError(f"{shorten(str(path), 160)}: {err}") from None


def build_plan_from(inventory: Inventory, config: Config, path: str | Path | None) -> Plan:
    """build_plan, with the config file (when there is one) named in front of a PlanError.

    Raises:
        PlanError: the config cannot be applied to this node; the message starts with the path.
    """
    try:
        return build_plan(inventory, config)
    except PlanError as err:
        if path is None:
            raise
        raise PlanError(f"{path}: {err}") from err


OVERRIDE_HELP = {
    "mig-strategy": "how MIG devices are advertised: none (ignored; every GPU is nvidia.com/gpu),"
    " single (MIG devices as nvidia.com/gpu) or mixed (nvidia.com/mig-<profile>)",
    "fail-on-init-error": "exit when NVML cannot be used (default); with --no-fail-on-init-error"
    " the daemon stays up and serves nothing",
    "mps-root": "host directory of the MPS control daemons' pipes, logs and shm"
    " (e.g. /run/nvidia/mps); required for MPS sharing",
    "nvidia-driver-root": "where the NVIDIA driver is installed on the host (default /)",
    "nvidia-dev-root": "root under which the /dev/nvidia* device nodes are found"
    " (default: the driver root)",
    "pass-device-specs": "also hand the device nodes (/dev/nvidia*, MIG caps) to the container"
    " runtime as DeviceSpecs",
    "device-list-strategy": "how containers learn their devices, comma list of envvar,"
    " volume-mounts, cdi-annotations, cdi-cri (default envvar)",
    "device-id-strategy": "device IDs handed to the runtime: uuid (default) or index",
    "cdi-annotation-prefix": "annotation prefix for the cdi-annotations strategy"
    " (default cdi.k8s.io/)",
    "cdi-kind": "CDI kind of the device names in CDI answers: k8s.device-plugin.nvidia.com/gpu"
    " (default; gpushare writes its spec into --cdi-spec-dir) or nvidia.com/gpu (the NVIDIA"
    " Container Toolkit's own spec, which must define every name)",
    "nvidia-ctk-path": "the NVIDIA Container Toolkit CLI whose `cdi generate` gives the CDI"
    " spec's container edits (default /usr/bin/nvidia-ctk; with --node, the stand-in"
    " plugin/standin/nvidia_ctk.py); without it, device nodes only",
    "container-driver-root": "where the driver root is mounted inside gpushare's container"
    " (default /driver-root)",
    "shared-devices-allocation-policy": "which replicas GetPreferredAllocation picks:"
    " distributed (spread over GPUs, default) or packed",
    "labels-file": "node labels file for node-feature-discovery's local source (default"
    " /etc/kubernetes/node-feature-discovery/features.d/gfd, with --node under the simulated"
    " node's host/ directory); empty disables it",
}


OVERRIDE_METAVAR = {
    "mig-strategy": "none|single|mixed",
    "mps-root": "DIR",
    "nvidia-driver-root": "DIR",
    "nvidia-dev-root": "DIR",
    "device-list-strategy": "A,B",
    "device-id-strategy": "uuid|index",
    "cdi-annotation-prefix": "PREFIX",
    "cdi-kind": "KIND",
    "nvidia-ctk-path": "PATH",
    "container-driver-root": "DIR",
    "shared-devices-allocation-policy": "distributed|packed",
    "labels-file": "PATH",
}


def add_override_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one option per overridable config field (--mig-strategy, --mps-root, …)."""
    group = parser.add_argument_group("config overrides (win over the environment and the file)")
    for override in OVERRIDES:
        where = ".".join(override.path)
        text = f"{OVERRIDE_HELP.get(override.flag, where)} [{where}, env {override.env}]"
        if override.kind == "bool":
            group.add_argument(
                f"--{override.flag}",
                action=argparse.BooleanOptionalAction,
                default=None,
                help=text,
            )
        else:
            metavar = OVERRIDE_METAVAR.get(override.flag, "VALUE")
            group.add_argument(f"--{override.flag}", default=None, metavar=metavar, help=text)


def overrides_from_args(args: argparse.Namespace) -> dict[str, object]:
    """The override options that were given, by flag name; lists split on commas."""
    out: dict[str, object] = {}
    for override in OVERRIDES:
        value = getattr(args, override.flag.replace("-", "_"), None)
        if value is None:
            continue
        if override.kind == "list" and isinstance(value, str):
            value = [item.strip() for item in value.split(",") if item.strip()]
        out[override.flag] = value
    return out
