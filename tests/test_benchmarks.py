"""The benchmark command's own arithmetic and output (no timing is asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.__main__ import main
from benchmarks.stats import Figure, percentile, render_table
from benchmarks.synthetic import synthetic_inventory


@pytest.mark.parametrize(
    ("samples", "q", "expected"),
    [
        pytest.param([5.0], 99, 5.0, id="one sample"),
        pytest.param([float(i) for i in range(1, 101)], 99, 99.0, id="p99 of 1..100"),
        pytest.param([float(i) for i in range(1, 101)], 50, 50.0, id="p50 of 1..100"),
        pytest.param([3.0, 1.0, 2.0], 100, 3.0, id="p100 is the max"),
    ],
)
def test_percentile_is_nearest_rank(samples: list[float], q: float, expected: float) -> None:
    assert percentile(samples, q) == expected


def test_figure_target_met_only_when_every_bound_holds() -> None:
    fast = Figure.from_samples("x", "n", "ms", [0.1, 0.2, 0.3], target_median=0.5, target_p99=2)
    slow_tail = Figure.from_samples("x", "n", "ms", [0.1, 0.2, 3], target_median=0.5, target_p99=2)
    no_target = Figure.from_samples("x", "n", "ms", [1.0])
    assert (fast.met, slow_tail.met, no_target.met) == (True, False, None)
    assert "NO" in render_table([slow_tail])


def test_synthetic_inventory_links_boards_of_eight() -> None:
    inventory = synthetic_inventory(16)
    assert len(inventory.gpus) == 16
    assert inventory.link_score(0, 7) > inventory.link_score(0, 8) > 0


def test_command_prints_table_and_writes_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bench.json"
    assert main(["--quick", "--only", "plan", "preferred", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "build_plan 64 GPUs x 64 replicas" in printed
    assert "GetPreferredAllocation 8x64 size 8" in printed
    payload = json.loads(out.read_text())
    names = {f["name"] for f in payload["figures"]}
    assert len(names) == 12
    assert all(f["runs"] > 0 and f["p99"] >= f["median"] > 0 for f in payload["figures"])


def test_unknown_benchmark_name_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--only", "allocat"])
    assert exit_info.value.code == 2
    assert "unknown benchmark(s) ['allocat']" in capsys.readouterr().err


def test_mig_benchmarks_report_plan_and_apply(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bench.json"
    assert main(["--quick", "--only", "mig-plan", "mig-apply", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "mig plan, slowest of the 9 example configs" in printed
    assert "120 NVML mutations" in printed
    figures = json.loads(out.read_text())["figures"]
    assert [f["runs"] for f in figures] == [4, 2]
    assert all(f["met"] is not None for f in figures)
