"""CDI specs as values: the spec gpushare writes for its kind, built from the Plan, and its checks.

The spec names one device per physical GPU or MIG device the Plan advertises, under the name
Allocate hands to the runtime for the deviceIDStrategy in force (`GPU-…`/`MIG-…`, or `3`/`3:1`),
plus `all`. A device's container edits are the NVIDIA Container Toolkit's for the same device
(its generated spec, looked up by UUID) when there is one; otherwise the device's own nodes and
`NVIDIA_VISIBLE_DEVICES=<name>`, so the runtime hook adds the driver libraries.
`SpecValidator` checks a spec against the CDI JSON schema and the rules the CDI library adds.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jsonschema import Draft7Validator

from plugin.daemon.allocate import VISIBLE_DEVICES_ENV, host_path, runtime_id
from sharing.errors import SharingError
from sharing.plan_types import Plan, VirtualDevice

KIND_PLUGIN = "k8s.device-plugin.nvidia.com/gpu"  # gpushare writes this kind's spec
KIND_TOOLKIT = "nvidia.com/gpu"  # the toolkit's own spec (`nvidia-ctk cdi generate`)
ALL_DEVICE = "all"
SCHEMA_DIR = Path(__file__).resolve().with_name("cdi_schema")
# Released CDI spec versions, oldest first (container-device-interface specs-go/version.go).
CDI_VERSIONS = ("0.3.0", "0.4.0", "0.5.0", "0.6.0", "0.7.0", "0.8.0", "1.0.0", "1.1.0")
HOOK_NAMES = frozenset(
    {"prestart", "createRuntime", "createContainer", "startContainer", "poststart", "poststop"}
)
_VENDOR_OR_CLASS = re.compile(r"[A-Za-z]([A-Za-z0-9_.-]*[A-Za-z0-9])?")
_DEVICE_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9_.:-]*[A-Za-z0-9])?")
_NODE_TYPES = frozenset({"", "b", "c", "u", "p"})
MAX_PROBLEMS = 5  # problems quoted in one error message

Edits = dict[str, Any]
SpecDoc = dict[str, Any]


class CdiError(SharingError):
    """A CDI spec cannot be built, validated, written or found."""


def spec_file_name(kind: str) -> str:
    """`<vendor>-<class>.yaml`, the file name the CDI convention gives a kind's spec."""
    vendor, _, cls = kind.partition("/")
    return f"{vendor}-{cls}.yaml"


@dataclass(frozen=True)
class NamedDevice:
    """A physical device the Plan advertises, with the CDI device name Allocate gives it."""

    name: str
    device: VirtualDevice


def advertised_devices(plan: Plan) -> tuple[NamedDevice, ...]:
    """One entry per physical GPU / MIG device of any resource, in plan order."""
    seen: dict[str, NamedDevice] = {}
    for resource in plan.resources:
        for device in resource.devices:
            if device.physical_id not in seen:
                seen[device.physical_id] = NamedDevice(runtime_id(device, plan.options), device)
    return tuple(seen.values())


@dataclass(frozen=True)
class ToolkitSpec:
    """What the toolkit's generated spec gives: its version, common edits, device edits by name."""

    version: str
    common: Mapping[str, Any]
    devices: Mapping[str, Mapping[str, Any]]


def parse_toolkit_spec(text: str, validator: SpecValidator) -> ToolkitSpec:
    """Parse `nvidia-ctk cdi generate --format=json` output.

    Raises:
        CdiError: not JSON, or not a valid CDI spec (the message says what is wrong).
    """
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as err:
        raise CdiError(f"output is not a JSON CDI spec ({str(err)[:200]})") from err
    if not isinstance(doc, dict):
        raise CdiError(f"output is not a CDI spec (a JSON {type(doc).__name__})")
    problems = validator.problems(doc)
    if problems:
        raise CdiError(f"output is not a valid CDI spec: {'; '.join(problems[:MAX_PROBLEMS])}")
    return ToolkitSpec(
        version=doc["cdiVersion"],
        common=doc.get("containerEdits") or {},
        devices={d["name"]: d["containerEdits"] for d in doc["devices"]},
    )


def _node(path: str, dev_root: str) -> dict[str, str]:
    """A CDI device node; `hostPath` only when the device root moves it."""
    host = host_path(dev_root, path)
    return {"path": path} if host == path else {"path": path, "hostPath": host}


def fallback_edits(named: NamedDevice, dev_root: str) -> Edits:
    """Edits without the toolkit: the device's nodes and NVIDIA_VISIBLE_DEVICES=<name>."""
    return {
        "env": [f"{VISIBLE_DEVICES_ENV}={named.name}"],
        "deviceNodes": [_node(p, dev_root) for p in named.device.dev_paths],
    }


def build_spec(
    kind: str,
    devices: Sequence[NamedDevice],
    *,
    toolkit: ToolkitSpec | None,
    dev_root: str,
    control_nodes: Sequence[str] = (),
) -> tuple[SpecDoc, tuple[str, ...]]:
    """The spec for `kind`, and the names whose edits fell back although the toolkit ran.

    With `toolkit`, each device reuses the toolkit's edits for its UUID and the spec its common
    edits (driver libraries, hooks, control nodes); without, device nodes and the variable.
    """
    entries: list[SpecDoc] = []
    not_in_toolkit: list[str] = []
    for named in devices:
        edits = toolkit.devices.get(named.device.physical_id) if toolkit else None
        if edits is None:
            if toolkit is not None:
                not_in_toolkit.append(named.name)
            edits = fallback_edits(named, dev_root)
        entries.append({"name": named.name, "containerEdits": copy.deepcopy(dict(edits))})
    if entries:
        merged = merge_edits(e["containerEdits"] for e in entries)
        entries.append({"name": ALL_DEVICE, "containerEdits": merged})
    if toolkit is not None:
        common = copy.deepcopy(dict(toolkit.common))
    else:
        common = {"deviceNodes": [_node(p, dev_root) for p in control_nodes]}
    spec: SpecDoc = {"cdiVersion": CDI_VERSIONS[0], "kind": kind, "devices": entries}
    if any(common.values()):
        spec["containerEdits"] = common
    base = toolkit.version if toolkit is not None else CDI_VERSIONS[0]
    spec["cdiVersion"] = newest_version(base, required_version(spec))
    return spec, tuple(not_in_toolkit)


def merge_edits(all_edits: Iterable[Mapping[str, Any]]) -> Edits:
    """The union of several devices' edits (the `all` device); NVIDIA_VISIBLE_DEVICES joined."""
    out: Edits = {}
    visible: list[str] = []
    for edits in all_edits:
        for key, items in edits.items():
            if not isinstance(items, list):
                out.setdefault(key, copy.deepcopy(items))
                continue
            bucket = out.setdefault(key, [])
            for item in items:
                if key == "env" and item.startswith(f"{VISIBLE_DEVICES_ENV}="):
                    visible.append(item.partition("=")[2])
                elif item not in bucket:
                    bucket.append(copy.deepcopy(item))
    if visible:
        joined = ",".join(dict.fromkeys(visible))
        out.setdefault("env", []).append(f"{VISIBLE_DEVICES_ENV}={joined}")
    return {k: v for k, v in out.items() if v != []}


def _all_edits(spec: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    edits = [d.get("containerEdits") or {} for d in spec.get("devices") or ()]
    return [spec.get("containerEdits") or {}, *edits]


def required_version(spec: Mapping[str, Any]) -> str:
    """The oldest CDI version whose features cover the spec (as the CDI library decides)."""
    edits = _all_edits(spec)
    rdt = [e["intelRdt"] for e in edits if e.get("intelRdt") is not None]
    if any(e.get("netDevices") for e in edits) or any(
        r.get("schemata") is not None or r.get("enableMonitoring") for r in rdt
    ):
        return "1.1.0"
    if rdt or any(e.get("additionalGids") for e in edits):
        return "0.7.0"
    devices = spec.get("devices") or ()
    cls = spec.get("kind", "").partition("/")[2]
    if spec.get("annotations") or any(d.get("annotations") for d in devices) or "." in cls:
        return "0.6.0"
    nodes = [n for e in edits for n in e.get("deviceNodes") or ()]
    if any(str(d.get("name", "x"))[:1].isdigit() for d in devices) or any(
        n.get("hostPath") for n in nodes
    ):
        return "0.5.0"
    if any(m.get("type") for e in edits for m in e.get("mounts") or ()):
        return "0.4.0"
    return "0.3.0"


def newest_version(*versions: str) -> str:
    """The newest of known CDI versions (`v` prefix allowed)."""
    return max((v.removeprefix("v") for v in versions), key=CDI_VERSIONS.index)


class SpecValidator:
    """The CDI JSON schema plus the CDI library's checks beyond it (names, version, edits)."""

    def __init__(self, schema: Mapping[str, Any], defs: Mapping[str, Any]) -> None:
        self._schema = Draft7Validator(_inline_defs(schema, defs))

    @classmethod
    def vendored(cls) -> SpecValidator:
        """The validator over the schema files shipped in plugin/daemon/cdi_schema."""
        schema, defs = (
            json.loads((SCHEMA_DIR / name).read_text(encoding="utf-8"))
            for name in ("schema.json", "defs.json")
        )
        return cls(schema, defs)

    def problems(self, spec: Mapping[str, Any]) -> list[str]:
        """Every problem found, as `<where>: <what>`; empty when the spec is valid."""
        errors = sorted(self._schema.iter_errors(spec), key=lambda e: list(map(str, e.path)))
        if errors:
            return [f"{_where(e.path)}: {e.message[:200]}" for e in errors]
        return _rule_problems(spec)

    def check(self, spec: Mapping[str, Any]) -> None:
        """Raise when the spec is invalid.

        Raises:
            CdiError: the first problems, with where they are.
        """
        problems = self.problems(spec)
        if problems:
            raise CdiError("invalid CDI spec: " + "; ".join(problems[:MAX_PROBLEMS]))


def _inline_defs(schema: Mapping[str, Any], defs: Mapping[str, Any]) -> dict[str, Any]:
    """One self-contained schema: defs.json's definitions in it, `defs.json#/…` refs local."""

    def local(node: Any) -> Any:
        if isinstance(node, dict):
            return {
                k: (v.replace("defs.json#", "#", 1) if k == "$ref" else local(v))
                for k, v in node.items()
            }
        if isinstance(node, list):
            return [local(v) for v in node]
        return node

    out = local(copy.deepcopy(dict(schema)))
    out["definitions"] = copy.deepcopy(defs["definitions"])
    return out


def _where(path: Iterable[Any]) -> str:
    """`devices[3].containerEdits` from a jsonschema error path."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text.lstrip(".") or "spec"


def _rule_problems(spec: Mapping[str, Any]) -> list[str]:
    """The CDI library's checks the schema does not express."""
    out: list[str] = []
    version = spec["cdiVersion"].removeprefix("v")
    if version not in CDI_VERSIONS:
        out.append(f"cdiVersion: unknown version {version!r}")
    elif CDI_VERSIONS.index(version) < CDI_VERSIONS.index(required_version(spec)):
        out.append(f"cdiVersion: {version} is older than the {required_version(spec)} it needs")
    vendor, _, cls = spec["kind"].partition("/")
    if not (_VENDOR_OR_CLASS.fullmatch(vendor) and _VENDOR_OR_CLASS.fullmatch(cls)):
        out.append(f"kind: {spec['kind']!r} is not <vendor>/<class>")
    if not spec["devices"]:
        out.append("devices: no devices")
    seen: set[str] = set()
    for i, device in enumerate(spec["devices"]):
        name = device["name"]
        if not _DEVICE_NAME.fullmatch(name):
            out.append(f"devices[{i}].name: invalid device name {name!r}")
        if name in seen:
            out.append(f"devices[{i}].name: {name!r} appears twice")
        seen.add(name)
        if not any(device["containerEdits"].values()):
            out.append(f"devices[{i}].containerEdits: empty")
        out += _edit_problems(device["containerEdits"], f"devices[{i}].containerEdits")
    out += _edit_problems(spec.get("containerEdits") or {}, "containerEdits")
    return out


def _edit_problems(edits: Mapping[str, Any], where: str) -> list[str]:
    out = [f"{where}.env: {e!r} is not NAME=VALUE" for e in edits.get("env") or () if
           not isinstance(e, str) or e.find("=") <= 0]
    for j, node in enumerate(edits.get("deviceNodes") or ()):
        if not node["path"]:
            out.append(f"{where}.deviceNodes[{j}].path: empty")
        if node.get("type", "") not in _NODE_TYPES:
            out.append(f"{where}.deviceNodes[{j}].type: invalid {node['type']!r}")
        if node.get("permissions", "").strip("rwm"):
            out.append(f"{where}.deviceNodes[{j}].permissions: invalid {node['permissions']!r}")
    for j, hook in enumerate(edits.get("hooks") or ()):
        if hook["hookName"] not in HOOK_NAMES or not hook["path"]:
            out.append(f"{where}.hooks[{j}]: invalid hook {hook['hookName']!r} ({hook['path']!r})")
    for j, mount in enumerate(edits.get("mounts") or ()):
        if not mount["hostPath"] or not mount["containerPath"]:
            out.append(f"{where}.mounts[{j}]: empty hostPath or containerPath")
    return out
