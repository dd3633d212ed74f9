#!/usr/bin/env python3
"""A stand-in for the NVIDIA Container Toolkit CLI (`nvidia-ctk`) on a simulated node.

`nvidia_ctk.py --node STATE_DIR cdi generate [options]` prints the CDI spec the real
`nvidia-ctk cdi generate` would print for the simulated node in STATE_DIR, read through the
simulated NVML as the real one reads the driver's: a device per GPU and per MIG device under
each `--device-name-strategy` (index, uuid, type-index; default index and uuid) and `all`, device
nodes (with the DRM nodes and their by-path links for full GPUs, the MIG capability nodes for MIG
devices), and common edits with the driver libraries, binaries and hooks of the node's driver
version, host paths under `--driver-root`. Options as the real command: `--format json|yaml`
(default yaml), `--output FILE` (default stdout), `--driver-root`, `--dev-root`, `--vendor`,
`--class`, `--nvidia-cdi-hook-path`. Log lines go to stderr in the real tool's format; without a
usable node it fails as the real tool does without a driver (exit 1).
"""

from __future__ import annotations

import argparse
import json
import posixpath
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: the checkout holds the packages it imports
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import yaml  # noqa: E402

from plugin.daemon.cdi_spec import required_version  # noqa: E402
from sharing.devices import Gpu, Inventory, MigDevice  # noqa: E402
from sharing.errors import SharingError  # noqa: E402

VERSION = "1.17.8"
LIB_DIR = "/usr/lib/x86_64-linux-gnu"
MOUNT_OPTIONS = ["ro", "nosuid", "nodev", "rbind", "rprivate"]
CONTROL_NODES = (
    "/dev/nvidia-modeset", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "/dev/nvidiactl",
)
LIBRARIES = (
    "libcuda.so", "libcudadebugger.so", "libnvidia-ml.so", "libnvidia-nvvm.so",
    "libnvidia-ptxjitcompiler.so", "libnvidia-opencl.so", "libnvidia-gpucomp.so",
    "libnvidia-allocator.so", "libnvidia-cfg.so",
)
BINARIES = (
    "nvidia-smi", "nvidia-debugdump", "nvidia-persistenced", "nvidia-cuda-mps-control",
    "nvidia-cuda-mps-server",
)


def _log(level: str, msg: str) -> None:
    """One log line on stderr, as the real tool writes when stderr is not a terminal."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    print(f'time="{stamp}" level={level} msg={json.dumps(msg)}', file=sys.stderr)


def _under(root: str, path: str) -> str:
    return posixpath.join(root or "/", path.lstrip("/"))


def _node(path: str, dev_root: str) -> dict[str, str]:
    host = _under(dev_root, path)
    return {"path": path} if host == path else {"path": path, "hostPath": host}


def _hook(hook_path: str, *args: str) -> dict[str, Any]:
    return {"hookName": "createContainer", "path": hook_path,
            "args": ["nvidia-cdi-hook", *args], "env": ["NVIDIA_CTK_DEBUG=false"]}


def _gpu_edits(gpu: Gpu, dev_root: str, hook_path: str) -> dict[str, Any]:
    """A full GPU: its node, its DRM card and render nodes, and their by-path links."""
    card, render = f"card{gpu.minor + 1}", f"renderD{128 + gpu.minor}"
    bus = gpu.pci_bus_id.lower()[-12:]
    nodes = [f"/dev/nvidia{gpu.minor}", f"/dev/dri/{card}", f"/dev/dri/{render}"]
    return {
        "deviceNodes": [_node(p, dev_root) for p in nodes],
        "hooks": [
            _hook(hook_path, "create-symlinks",
                  "--link", f"../{card}::/dev/dri/by-path/pci-{bus}-card",
                  "--link", f"../{render}::/dev/dri/by-path/pci-{bus}-render"),
            _hook(hook_path, "chmod", "--mode", "755", "--path", "/dev/dri"),
        ],
    }


def _mig_edits(gpu: Gpu, mig: MigDevice, dev_root: str) -> dict[str, Any]:
    """A MIG device: the parent's node and the GPU and compute instance access nodes."""
    nodes = [f"/dev/nvidia{gpu.minor}"] + [
        f"/dev/nvidia-caps/nvidia-cap{m}" for m in (mig.gi_cap_minor, mig.ci_cap_minor)
        if m is not None
    ]
    return {"deviceNodes": [_node(p, dev_root) for p in nodes]}


def _names(strategies: list[str], index: str, uuid: str, mig: bool) -> list[str]:
    out = []
    for strategy in strategies:
        if strategy == "index":
            out.append(index)
        elif strategy == "uuid":
            out.append(uuid)
        else:
            out.append(("mig" if mig else "gpu") + index)
    return out


def _common_edits(inventory: Inventory, args: argparse.Namespace) -> dict[str, Any]:
    """Driver libraries, binaries, control nodes and the hooks that wire them up."""
    version = inventory.driver_version
    mounts = [f"{LIB_DIR}/{lib}.{version}" for lib in LIBRARIES]
    mounts += [f"/usr/bin/{b}" for b in BINARIES]
    mounts += ["/run/nvidia-persistenced/socket", f"/lib/firmware/nvidia/{version}/gsp_ga10x.bin"]
    hook = args.nvidia_cdi_hook_path
    return {
        "env": [f"NVIDIA_CTK_LIBCUDA_DIR={LIB_DIR}", "NVIDIA_VISIBLE_DEVICES=void"],
        "deviceNodes": [_node(p, args.dev_root or args.driver_root) for p in CONTROL_NODES],
        "hooks": [
            _hook(hook, "enable-cuda-compat", f"--host-driver-version={version}"),
            _hook(hook, "create-symlinks", "--link", f"libcuda.so.1::{LIB_DIR}/libcuda.so"),
            _hook(hook, "update-ldcache", "--folder", LIB_DIR),
            _hook(hook, "disable-device-node-modification"),
        ],
        "mounts": [
            {"hostPath": _under(args.driver_root, p), "containerPath": p, "options": MOUNT_OPTIONS}
            for p in mounts
        ],
    }


def generate(inventory: Inventory, args: argparse.Namespace) -> dict[str, Any]:
    """The CDI spec of the node, as `nvidia-ctk cdi generate` builds it."""
    dev_root = args.dev_root or args.driver_root
    strategies = args.device_name_strategy or ["index", "uuid"]
    devices: list[dict[str, Any]] = []
    for gpu in inventory.gpus:
        edits = _gpu_edits(gpu, dev_root, args.nvidia_cdi_hook_path)
        for name in _names(strategies, str(gpu.index), gpu.uuid, mig=False):
            devices.append({"name": name, "containerEdits": edits})
        for mig in gpu.mig_devices:
            edits = _mig_edits(gpu, mig, dev_root)
            for name in _names(strategies, f"{gpu.index}:{mig.index}", mig.uuid, mig=True):
                devices.append({"name": name, "containerEdits": edits})
    all_nodes: list[dict[str, str]] = []
    for device in devices:
        for node in device["containerEdits"]["deviceNodes"]:
            if node not in all_nodes:
                all_nodes.append(node)
    devices.append({"name": "all", "containerEdits": {"deviceNodes": all_nodes}})
    spec: dict[str, Any] = {"cdiVersion": "0.3.0", "kind": f"{args.vendor}/{args.cls}",
                            "devices": devices, "containerEdits": _common_edits(inventory, args)}
    spec["cdiVersion"] = required_version(spec)
    return json.loads(json.dumps(spec))  # plain data: no shared sub-objects (YAML anchors)


def read_node(state_dir: str | None) -> Inventory:
    """The simulated node's inventory through the simulated NVML (SharingError when unusable)."""
    from sharing.nvml import nvml_session, read_inventory
    from sharing.nvml.sim import SimNvml

    if not state_dir:
        raise SharingError("failed to initialize NVML: ERROR_LIBRARY_NOT_FOUND")
    try:
        lib = SimNvml(Path(state_dir))
    except (OSError, SharingError) as err:
        raise SharingError(f"failed to initialize NVML: ERROR_LIBRARY_NOT_FOUND ({err})") from err
    with nvml_session(lib) as nvml:
        return read_inventory(nvml)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nvidia-ctk", description=__doc__.split("\n\n")[0])
    parser.add_argument("--node", help="simulated node state directory (stand-in only)")
    parser.add_argument("--version", action="store_true")
    sub = parser.add_subparsers(dest="command")
    cdi = sub.add_parser("cdi").add_subparsers(dest="cdi_command", required=True)
    gen = cdi.add_parser("generate")
    gen.add_argument("--format", choices=["json", "yaml"], default="yaml")
    gen.add_argument("--output", default="")
    gen.add_argument("--device-name-strategy", action="append",
                     choices=["index", "uuid", "type-index"])
    gen.add_argument("--driver-root", default="/")
    gen.add_argument("--dev-root", default="")
    gen.add_argument("--vendor", default="nvidia.com")
    gen.add_argument("--class", dest="cls", default="gpu")
    gen.add_argument("--nvidia-cdi-hook-path", "--nvidia-ctk-path",
                     default="/usr/bin/nvidia-cdi-hook")
    return parser


def main(argv: list[str]) -> int:
    """Run one command; 0 on success, 1 on failure."""
    args = _parser().parse_args(argv)
    if args.version:
        print(f"NVIDIA Container Toolkit CLI version {VERSION}")
        return 0
    if args.command != "cdi":
        _parser().print_help(sys.stderr)
        return 1
    _log("info", 'Auto-detected mode as "nvml"')
    try:
        spec = generate(read_node(args.node), args)
    except SharingError as err:
        _log("error", f"failed to generate CDI spec: failed to create device CDI specs: {err}")
        return 1
    if args.format == "json":
        text = json.dumps(spec, indent=2) + "\n"
    else:
        text = "---\n" + yaml.safe_dump(spec, sort_keys=False)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text, encoding="utf-8")
        _log("info", f"Generated CDI spec with version {spec['cdiVersion']}")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
