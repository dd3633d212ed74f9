"""What a CDI-enabled container runtime does with a spec directory: load, validate, resolve.

Like the CDI library's cache: every `*.yaml` / `*.json` file in the directory is one spec; a spec
that fails validation is not loaded (its devices do not resolve); a qualified device name defined
by two specs is a conflict and resolves to neither. `resolve` fails the way the runtime refuses a
container: "unresolvable CDI devices".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from plugin.daemon.cdi_spec import SpecValidator


@dataclass
class CdiCache:
    """The devices the spec files of one directory define, by qualified name."""

    spec_dir: Path
    devices: dict[str, dict[str, Any]] = field(default_factory=dict)
    specs: dict[str, dict[str, Any]] = field(default_factory=dict)  # file name -> spec
    invalid: dict[str, list[str]] = field(default_factory=dict)  # file name -> problems
    conflicts: set[str] = field(default_factory=set)

    @classmethod
    def load(cls, spec_dir: Path) -> CdiCache:
        """Read and validate every spec file in `spec_dir` (none when it does not exist)."""
        cache = cls(spec_dir)
        validator = SpecValidator.vendored()
        files = sorted(spec_dir.iterdir()) if spec_dir.is_dir() else []
        for path in files:
            if path.suffix not in (".yaml", ".json"):
                continue
            spec = yaml.safe_load(path.read_text(encoding="utf-8"))
            problems = validator.problems(spec)
            if problems:
                cache.invalid[path.name] = problems
                continue
            cache.specs[path.name] = spec
            for device in spec["devices"]:
                qualified = f"{spec['kind']}={device['name']}"
                if qualified in cache.devices:
                    cache.conflicts.add(qualified)
                cache.devices[qualified] = device
        return cache

    def resolve(self, names: list[str]) -> list[dict[str, Any]]:
        """The device entries of qualified names; AssertionError naming any that do not resolve."""
        bad = [n for n in names if n not in self.devices or n in self.conflicts]
        assert not bad, (
            f"unresolvable CDI devices {bad} in {self.spec_dir} "
            f"(defined: {sorted(self.devices)[:6]}..., invalid files: {self.invalid})"
        )
        return [self.devices[n] for n in names]


def device_nodes(device: dict[str, Any]) -> set[str]:
    """The container paths of a device entry's device nodes."""
    return {n["path"] for n in device["containerEdits"].get("deviceNodes", [])}
