"""Golden output of `gpushare plan` for every example config on every simulated node.

A combination the node cannot serve is recorded too: its golden file holds the exit status and
the error message. Regenerate after an intended change with
`GPUSHARE_UPDATE_GOLDEN=1 ./scripts/test -k golden`, then read the diff before committing.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from plugin.cli import main
from sharing.config import OVERRIDES
from sharing.nvml import shipped_nodes

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "golden" / "plan"
UPDATE = os.environ.get("GPUSHARE_UPDATE_GOLDEN") == "1"


def plugin_configs() -> list[str]:
    """Device plugin configs in configs/ (mig-parted files, with `mig-configs`, left out)."""
    out = []
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        if isinstance(data, dict) and "mig-configs" not in data:
            out.append(path.name)
    return out


CASES = [
    pytest.param(config, node, "table", id=f"{Path(config).stem}@{node}")
    for config in plugin_configs()
    for node in shipped_nodes()
] + [
    pytest.param("mps-limits.yaml", "a30x4", "json", id="mps-limits@a30x4 json"),
    pytest.param("time-slicing-mig.yaml", "mixed", "json", id="time-slicing-mig@mixed json"),
]


def run_plan(config: str, node: str, fmt: str, capsys: pytest.CaptureFixture[str]) -> str:
    """`gpushare plan` output: stdout on success, else the exit status and stderr."""
    rc = main(["plan", "--config", f"configs/{config}", "--node", node, "--format", fmt])
    out, err = capsys.readouterr()
    return out if rc == 0 else f"exit {rc}\n{err}"


@pytest.mark.parametrize(("config", "node", "fmt"), CASES)
def test_plan_golden(
    config: str,
    node: str,
    fmt: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(ROOT)
    for override in OVERRIDES:
        monkeypatch.delenv(override.env, raising=False)
    monkeypatch.delenv("CONFIG_FILE", raising=False)
    got = run_plan(config, node, fmt, capsys)
    suffix = "json" if fmt == "json" else "txt"
    golden = GOLDEN / f"{Path(config).stem}@{node}.{suffix}"
    if UPDATE:
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(got, encoding="utf-8")
    assert golden.is_file(), f"no golden file {golden}; run GPUSHARE_UPDATE_GOLDEN=1"
    assert got == golden.read_text(encoding="utf-8")


def test_every_golden_file_belongs_to_a_case() -> None:
    expected = {
        f"{Path(c.values[0]).stem}@{c.values[1]}.{'json' if c.values[2] == 'json' else 'txt'}"
        for c in CASES
    }
    assert {p.name for p in GOLDEN.glob("*")} <= expected
