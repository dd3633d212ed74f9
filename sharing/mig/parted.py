"""mig-parted `version: v1` files (facts §6.2), parsed strictly and within bounds.

`parse_mig_parted(text, source)` is pure. Every problem is one `MigConfigError` line naming the
source, the key path and the value: unknown keys (with a suggestion), wrong types, duplicate keys,
malformed device filters (upstream treats them as a silent non-match) and malformed profile names.
The input is bounded before it is built: file size, nesting depth, node count (alias expansion
included), number of configs, entries, device indices and profiles, and each count.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from sharing.errors import MigConfigError
from sharing.mig.names import ProfileName, parse_profile_name
from sharing.yaml_text import YamlLimitError, YamlLimits, parse_yaml, yaml_problem

MAX_FILE_BYTES = 1024 * 1024
MAX_DEPTH = 12
MAX_NODES = 50_000
MAX_CONFIGS = 256
MAX_ENTRIES = 64
MAX_DEVICE_INDICES = 256
MAX_FILTERS = 32
MAX_PROFILES = 32
MAX_COUNT = 64
MAX_NAME_CHARS = 128
MAX_SHOWN = 60

_TOP_KEYS = ("version", "mig-configs")
_ENTRY_KEYS = ("devices", "device-filter", "mig-enabled", "mig-devices")
_FILTER = re.compile(r"0x([0-9A-Fa-f]{8})(?::0x([0-9A-Fa-f]{8}))?")
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]+")
# libyaml's loader when PyYAML was built with it (7x faster), the pure-Python one otherwise.
MIG_YAML_LIMITS = YamlLimits(
    max_bytes=MAX_FILE_BYTES, max_depth=MAX_DEPTH, max_values=MAX_NODES, max_scalar_chars=1024
)


@dataclass(frozen=True)
class DeviceFilter:
    """`0x<DEVICE><VENDOR>[:0x<SUBSYSTEM>]`: the PCI ids a GPU must have to be selected."""

    device_id: int  # e.g. 0x20B010DE (device << 16 | vendor), as NVML's pciDeviceId
    subsystem_id: int | None = None  # NVML's pciSubSystemId, when given

    def matches(self, device_id: int, subsystem_id: int) -> bool:
        """Whether a GPU with these PCI ids passes the filter."""
        if device_id != self.device_id:
            return False
        return self.subsystem_id is None or subsystem_id == self.subsystem_id

    def __str__(self) -> str:
        sub = "" if self.subsystem_id is None else f":0x{self.subsystem_id:08X}"
        return f"0x{self.device_id:08X}{sub}"


@dataclass(frozen=True)
class MigEntry:
    """One entry of a named config: which GPUs, MIG on or off, and how many of each profile."""

    where: str  # key path, e.g. mig-configs.custom-config[4]
    devices: tuple[int, ...] | None  # None: `all`
    device_filter: tuple[DeviceFilter, ...]  # empty: every GPU
    mig_enabled: bool
    mig_devices: tuple[tuple[ProfileName, int], ...]  # as written, counts > 0

    def selects(self, index: int, device_id: int, subsystem_id: int) -> bool:
        """Whether this entry covers the GPU with this index and these PCI ids."""
        if self.devices is not None and index not in self.devices:
            return False
        if not self.device_filter:
            return True
        return any(f.matches(device_id, subsystem_id) for f in self.device_filter)


@dataclass(frozen=True)
class MigConfig:
    """One named config of a mig-parted file."""

    name: str
    source: str
    entries: tuple[MigEntry, ...]


@dataclass(frozen=True)
class MigPartedFile:
    """A parsed mig-parted file: its named configs in file order."""

    source: str
    configs: tuple[MigConfig, ...]

    @property
    def names(self) -> tuple[str, ...]:
        """The config names, in file order."""
        return tuple(c.name for c in self.configs)

    def select(self, name: str | None) -> MigConfig:
        """The config called `name`; a file with a single config needs no name.

        Raises:
            MigConfigError: no such config, or no name given and the file has several.
        """
        if name is None:
            if len(self.configs) == 1:
                return self.configs[0]
            raise MigConfigError(
                f"{self.source}: the file has {len(self.configs)} configs; name one with -c "
                f"({_listing(self.names)})"
            )
        for config in self.configs:
            if config.name == name:
                return config
        raise MigConfigError(
            f"{self.source}: no config {_shown(name)} in mig-configs (has: {_listing(self.names)})"
        )


def parse_mig_parted(text: str, *, source: str = "<mig-parted file>") -> MigPartedFile:
    """Parse a mig-parted `version: v1` file.

    Raises:
        MigConfigError: the text is too large, not YAML, or not a valid v1 file; one line that
            names `source`, the key path, the value and what is allowed.
    """
    data = _load_yaml(text, source)
    return _Parser(source).file(data)


def config_to_json(config: MigConfig) -> dict[str, Any]:
    """A parsed config as plain JSON values (`config_from_json` builds it back)."""
    return {
        "name": config.name,
        "source": config.source,
        "entries": [
            {
                "where": e.where,
                "devices": None if e.devices is None else list(e.devices),
                "device_filter": [[f.device_id, f.subsystem_id] for f in e.device_filter],
                "mig_enabled": e.mig_enabled,
                "mig_devices": [[name.text, count] for name, count in e.mig_devices],
            }
            for e in config.entries
        ],
    }


def config_from_json(data: object) -> MigConfig:
    """The MigConfig `config_to_json` wrote (sent by the process that parsed the file); its
    shape and bounds are checked again, profile names parsed again.

    Raises:
        ValueError: not what config_to_json writes, or past the parser's bounds.
    """
    top = _fields(data, ("name", "source", "entries"))
    name, source, entries = top["name"], top["source"], top["entries"]
    if not isinstance(name, str) or not isinstance(source, str):
        raise ValueError("name and source must be strings")
    if not isinstance(entries, list) or not 0 < len(entries) <= MAX_ENTRIES:
        raise ValueError(f"entries must be a list of 1-{MAX_ENTRIES}")
    return MigConfig(name, source, tuple(_entry_from_json(e) for e in entries))


def _fields(data: object, keys: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(data, dict) or set(data) != set(keys):
        raise ValueError(f"expected an object with {', '.join(keys)}")
    return data


def _ints(value: object, limit: int, what: str) -> list[int]:
    if not isinstance(value, list) or len(value) > limit or not all(
        isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value
    ):
        raise ValueError(f"{what} must be a list of at most {limit} integers >= 0")
    return value


def _entry_from_json(data: object) -> MigEntry:
    raw = _fields(data, ("where", "devices", "device_filter", "mig_enabled", "mig_devices"))
    if not isinstance(raw["where"], str) or not isinstance(raw["mig_enabled"], bool):
        raise ValueError("where must be a string, mig_enabled true or false")
    devices = raw["devices"]
    if devices is not None:
        devices = tuple(_ints(devices, MAX_DEVICE_INDICES, "devices"))
    filters = raw["device_filter"]
    if not isinstance(filters, list) or len(filters) > MAX_FILTERS:
        raise ValueError(f"device_filter must be a list of at most {MAX_FILTERS}")
    out_filters = []
    for item in filters:
        if not isinstance(item, list) or len(item) != 2:
            raise ValueError("a device filter is [device_id, subsystem_id or null]")
        [device_id] = _ints(item[:1], 1, "a device filter's device id")
        subsystem = None if item[1] is None else _ints(item[1:], 1, "a subsystem id")[0]
        out_filters.append(DeviceFilter(device_id, subsystem))
    profiles = raw["mig_devices"]
    if not isinstance(profiles, list) or len(profiles) > MAX_PROFILES:
        raise ValueError(f"mig_devices must be a list of at most {MAX_PROFILES}")
    out_profiles = []
    for item in profiles:
        if not isinstance(item, list) or len(item) != 2 or not isinstance(item[0], str):
            raise ValueError("a MIG device entry is [profile name, count]")
        [count] = _ints([item[1]], 1, "a MIG device count")
        if not 0 < count <= MAX_COUNT:
            raise ValueError(f"a MIG device count is 1-{MAX_COUNT}")
        out_profiles.append((parse_profile_name(item[0]), count))
    return MigEntry(raw["where"], devices, tuple(out_filters), raw["mig_enabled"],
                    tuple(out_profiles))


def _load_yaml(text: str, source: str) -> Any:
    """The file's value, parsed within MIG_YAML_LIMITS (aliases counted as often as used);
    duplicate keys are errors with their line, as in config files."""
    try:
        data = parse_yaml(text, limits=MIG_YAML_LIMITS)
    except YamlLimitError as err:
        raise MigConfigError(f"{source}: {err}") from None
    except (yaml.YAMLError, ValueError) as err:
        raise MigConfigError(f"{source}: not valid YAML: {yaml_problem(err)}") from None
    if data is None:
        raise MigConfigError(f'{source}: the file is empty; it needs "version: v1"')
    return data


def _shown(value: object) -> str:
    """A value as an error shows it: quoted strings, cut to MAX_SHOWN characters."""
    text = f'"{value}"' if isinstance(value, str) else repr(value)
    text = text.replace("\n", "\\n")
    return text if len(text) <= MAX_SHOWN else text[:MAX_SHOWN] + "…"


def _listing(names: tuple[str, ...]) -> str:
    shown = ", ".join(names[:20])
    return shown + (f", … ({len(names)} in all)" if len(names) > 20 else "")


def _same(a: ProfileName, b: ProfileName) -> bool:
    """Whether two spellings ask for the same MIG device (`3g.20gb` and `3c.3g.20gb`)."""
    return (a.name, a.ci_slices or a.slices) == (b.name, b.ci_slices or b.slices)


def _key_path(parent: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{parent}[{key}]"
    if _PLAIN_KEY.fullmatch(key):
        return f"{parent}.{key}" if parent else key
    return f'{parent}["{key}"]'


class _Parser:
    """Walks the loaded data, raising one MigConfigError at the first problem."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, path: str, problem: str) -> MigConfigError:
        return MigConfigError(
            f"{self.source}: {path}: {problem}" if path else f"{self.source}: {problem}"
        )

    def mapping(self, value: object, path: str, allowed: tuple[str, ...]) -> Mapping[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(path, f"must be a mapping, got {_shown(value)}")
        for key in value:
            if key not in allowed:
                close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
                hint = f"did you mean {close[0]}?" if close else f"valid keys: {', '.join(allowed)}"
                raise self.fail(_key_path(path, str(key)), f"unknown key; {hint}")
        return value

    def file(self, data: object) -> MigPartedFile:
        top = self.mapping(data, "", _TOP_KEYS)
        if "version" not in top:
            raise self.fail("version", 'required, but missing (this format is "version: v1")')
        if top["version"] != "v1":
            raise self.fail("version", f'must be "v1", got {_shown(top["version"])}')
        configs = top.get("mig-configs")
        if not isinstance(configs, dict) or not configs:
            got = "missing" if configs is None else _shown(configs)
            raise self.fail("mig-configs", f"must map config names to entry lists, got {got}")
        if len(configs) > MAX_CONFIGS:
            raise self.fail("mig-configs", f"more than {MAX_CONFIGS} configs")
        return MigPartedFile(
            self.source, tuple(self.config(name, value) for name, value in configs.items())
        )

    def config(self, name: object, value: object) -> MigConfig:
        path = _key_path("mig-configs", str(name))
        if not isinstance(name, str) or not name or len(name) > MAX_NAME_CHARS:
            raise self.fail(path, f"a config name is a string of 1-{MAX_NAME_CHARS} characters")
        if not name.isprintable():
            raise self.fail(path, "a config name must not contain control characters")
        if not isinstance(value, list) or not value:
            raise self.fail(path, f"must be a list of entries, got {_shown(value)}")
        if len(value) > MAX_ENTRIES:
            raise self.fail(path, f"more than {MAX_ENTRIES} entries")
        entries = tuple(self.entry(item, _key_path(path, i)) for i, item in enumerate(value))
        return MigConfig(name, self.source, entries)

    def entry(self, value: object, path: str) -> MigEntry:
        raw = self.mapping(value, path, _ENTRY_KEYS)
        for key in ("devices", "mig-enabled"):
            if key not in raw:
                raise self.fail(_key_path(path, key), "required, but missing")
        enabled = raw["mig-enabled"]
        if not isinstance(enabled, bool):
            raise self.fail(
                _key_path(path, "mig-enabled"), f"must be true or false, got {_shown(enabled)}"
            )
        if enabled and "mig-devices" not in raw:
            raise self.fail(
                _key_path(path, "mig-devices"),
                "required with mig-enabled: true ({} for no MIG devices)",
            )
        profiles = self.mig_devices(raw.get("mig-devices", {}), _key_path(path, "mig-devices"))
        if profiles and not enabled:
            raise self.fail(_key_path(path, "mig-devices"), "MIG devices need mig-enabled: true")
        return MigEntry(
            where=path,
            devices=self.devices(raw["devices"], _key_path(path, "devices")),
            device_filter=self.filters(raw.get("device-filter"), _key_path(path, "device-filter")),
            mig_enabled=enabled,
            mig_devices=profiles,
        )

    def devices(self, value: object, path: str) -> tuple[int, ...] | None:
        if value == "all":
            return None
        if not isinstance(value, list) or not value:
            raise self.fail(path, f'must be "all" or a list of GPU indices, got {_shown(value)}')
        if len(value) > MAX_DEVICE_INDICES:
            raise self.fail(path, f"more than {MAX_DEVICE_INDICES} GPU indices")
        for i, item in enumerate(value):
            if isinstance(item, bool) or not isinstance(item, int) or not 0 <= item < 10_000:
                raise self.fail(
                    _key_path(path, i), f"must be a GPU index (an integer >= 0), got {_shown(item)}"
                )
        if len(set(value)) != len(value):
            raise self.fail(path, f"lists a GPU index twice: {_shown(value)}")
        return tuple(value)

    def filters(self, value: object, path: str) -> tuple[DeviceFilter, ...]:
        if value is None:
            return ()
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not items:
            raise self.fail(path, f"must be a filter string or a list of them, got {_shown(value)}")
        if len(items) > MAX_FILTERS:
            raise self.fail(path, f"more than {MAX_FILTERS} filters")
        out = []
        for i, item in enumerate(items):
            where = path if isinstance(value, str) else _key_path(path, i)
            match = _FILTER.fullmatch(item) if isinstance(item, str) else None
            if match is None:
                raise self.fail(
                    where,
                    f"malformed device filter {_shown(item)}: expected "
                    "0x<DEVICE><VENDOR> with 8 hex digits, optionally "
                    ":0x<SUBSYSTEM>, e.g. 0x20B010DE",
                )
            sub = int(match[2], 16) if match[2] else None
            out.append(DeviceFilter(int(match[1], 16), sub))
        return tuple(out)

    def mig_devices(self, value: object, path: str) -> tuple[tuple[ProfileName, int], ...]:
        if not isinstance(value, dict):
            raise self.fail(path, f"must map profile names to counts, got {_shown(value)}")
        if len(value) > MAX_PROFILES:
            raise self.fail(path, f"more than {MAX_PROFILES} profiles")
        out: list[tuple[ProfileName, int]] = []
        for key, count in value.items():
            where = _key_path(path, str(key))
            if not isinstance(key, str):
                raise self.fail(where, f"a profile name is a string, got {_shown(key)}")
            try:
                name = parse_profile_name(key)
            except ValueError as err:
                raise self.fail(where, str(err)) from None
            if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count:
                raise self.fail(where, f"must be a count (an integer >= 0), got {_shown(count)}")
            if count > MAX_COUNT:
                raise self.fail(where, f"must be <= {MAX_COUNT}, got {count}")
            if any(_same(other, name) for other, _ in out):
                raise self.fail(where, f"names the same profile as another key ({name.name})")
            if count:
                out.append((name, count))
        return tuple(out)
