"""sharing/ stays pure outside its NVML edge: no gRPC, NVML, processes, environment or sleeps."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARING = ROOT / "sharing"
FORBIDDEN_MODULES = ("grpc", "pynvml", "subprocess", "google.protobuf", "protobuf")
FORBIDDEN_ATTRIBUTES = {("os", "environ"), ("os", "getenv"), ("os", "environb"), ("time", "sleep")}


def _domain_files() -> list[Path]:
    return sorted(
        p for p in SHARING.rglob("*.py") if not p.relative_to(SHARING).parts[0] == "nvml"
    )


def _forbidden_module(name: str) -> bool:
    return any(name == m or name.startswith(f"{m}.") for m in FORBIDDEN_MODULES)


def problems(source: str) -> list[str]:
    """Every forbidden import or use in one module's source, as `line: what`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [f"{node.lineno}: import {a.name}" for a in node.names
                      if _forbidden_module(a.name)]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if _forbidden_module(node.module):
                found.append(f"{node.lineno}: from {node.module} import ...")
            found += [f"{node.lineno}: from {node.module} import {a.name}" for a in node.names
                      if (node.module, a.name) in FORBIDDEN_ATTRIBUTES]
        elif (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and (node.value.id, node.attr) in FORBIDDEN_ATTRIBUTES
        ):
            found.append(f"{node.lineno}: {node.value.id}.{node.attr}")
    return found


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        pytest.param("import grpc\n", ["1: import grpc"], id="grpc import"),
        pytest.param("import pynvml as n\n", ["1: import pynvml"], id="pynvml alias"),
        pytest.param("from subprocess import run\n", ["1: from subprocess import ..."],
                     id="subprocess from-import"),
        pytest.param("from google.protobuf import message\n",
                     ["1: from google.protobuf import ..."], id="protobuf"),
        pytest.param("import os\nx = os.environ['A']\n", ["2: os.environ"], id="os.environ"),
        pytest.param("from os import environ\n", ["1: from os import environ"],
                     id="environ from-import"),
        pytest.param("import time\ntime.sleep(1)\n", ["2: time.sleep"], id="time.sleep"),
        pytest.param("import os, time\nos.path.join('a')\ntime.monotonic()\n", [],
                     id="harmless os and time"),
    ],
)
def test_checker_finds_forbidden_uses(source: str, expected: list[str]) -> None:
    """The checker itself catches each forbidden form and lets harmless ones through."""
    assert problems(source) == expected


def test_sharing_outside_nvml_is_pure() -> None:
    """No module of sharing/ outside sharing/nvml/ imports grpc, pynvml, subprocess or protobuf,
    reads the environment or sleeps."""
    files = _domain_files()
    assert files, "sharing/ has no modules"
    found = {
        str(p.relative_to(ROOT)): problems(p.read_text(encoding="utf-8")) for p in files
    }
    assert {k: v for k, v in found.items() if v} == {}
