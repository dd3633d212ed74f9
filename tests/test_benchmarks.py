"""The benchmark command's own arithmetic and output (no timing is asserted)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import grpc
import pytest

from benchmarks import kubelet_client
from benchmarks.__main__ import main
from benchmarks.measure import GPU, NODE, _ratio_figure, ts_config
from benchmarks.node import DaemonUnderTest
from benchmarks.stats import Figure, percentile, render_table
from benchmarks.synthetic import synthetic_inventory
from plugin.api import pb_grpc
from plugin.daemon import convert


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


def test_help_names_every_benchmark(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README sends readers to --help for the names --only takes."""
    monkeypatch.setenv("COLUMNS", "1000")  # no line break inside a hyphenated name
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    names = ("allocate preferred plan inventory health reregister coldstart memory reload"
             " mig-plan mig-apply idle mig-job mig-file-load")
    assert f"run only these benchmarks: {', '.join(names.split())}" in text


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


# --- Allocate as the kubelet makes it: the Go client and the Go baseline --------------------


@pytest.fixture(scope="module")
def go_tools() -> kubelet_client.GoTools:
    """The Go client and baseline, built from benchmarks/go; skipped only where Go is missing."""
    tools = kubelet_client.go_tools()
    if isinstance(tools, str):
        pytest.skip(f"Go part of the benchmark: {tools}")
    return tools


def test_ratio_figure_met_only_at_or_under_the_target() -> None:
    under = _ratio_figure("r", [1.5, 2.5, 2.0], 2.0)
    over = _ratio_figure("r", [2.1, 1.9, 2.4], 2.0)
    assert (under.median, under.p99, under.met) == (2.0, 2.5, True)
    assert (over.median, over.met) == (2.1, False)
    assert over.detail == "per run 2.10, 1.90, 2.40"


def test_without_go_the_python_client_is_used_and_the_table_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no go here
    out = tmp_path / "bench.json"
    assert main(["--runs", "20", "--only", "allocate", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Allocate: gpushare (Python client, no Go baseline: go not on PATH)" in printed
    assert "machine: " in printed
    assert "load average" in printed
    assert "ratio" not in printed
    figures = json.loads(out.read_text())["figures"]
    client_rows = [f for f in figures if "Python client" in f["name"]]
    assert [f["name"].split(":")[0] for f in client_rows] == [
        "Allocate", "GetPreferredAllocation", "admission (preferred + Allocate)", "empty RPC",
    ]  # fmt: skip
    assert all(f["runs"] == 3 * 20 and f["p99"] >= f["median"] > 0 for f in client_rows)
    assert [f["name"] for f in figures[len(client_rows) :]] == [
        "Allocate 1 device, envvar, metrics off (alternating)",
        "Allocate 1 device, envvar, metrics on (alternating)",
    ]


def test_a_failing_go_build_is_a_reason_not_a_crash(tmp_path: Path) -> None:
    failing_go = tmp_path / "go"
    failing_go.write_text("#!/bin/sh\necho 'go: no module proxy here' >&2\nexit 1\n")
    failing_go.chmod(0o755)
    reason = kubelet_client.go_tools(str(failing_go), bin_dir=tmp_path / "bin")
    assert isinstance(reason, str)
    assert reason.startswith("go build in ")
    assert reason.endswith("failed: go: no module proxy here")


def _check_minimal_plugin(plugin: kubelet_client.BaselinePlugin) -> None:
    """The baseline's API: 6 healthy IDs, preferred IDs, one env var, unknown IDs refused."""
    with plugin, grpc.insecure_channel(f"unix://{plugin.socket}") as channel:
        assert stat.S_IMODE(plugin.socket.stat().st_mode) == 0o600
        stub = pb_grpc.DevicePluginStub(channel)
        options = stub.GetDevicePluginOptions(convert.empty(), timeout=5)
        assert options.get_preferred_allocation_available
        stream = stub.ListAndWatch(convert.empty(), timeout=5)
        first = next(stream)
        ids = [d.ID for d in first.devices]
        assert len(set(ids)) == 6
        assert {d.health for d in first.devices} == {"Healthy"}
        preferred = stub.GetPreferredAllocation(
            convert.to_pb_preferred_request([(ids, [ids[4]], 2)]), timeout=5
        )
        assert list(preferred.container_responses[0].deviceIDs) == [ids[4], ids[0]]
        answer = stub.Allocate(convert.to_pb_allocate_request([ids[:2], ids[2:3]]), timeout=5)
        assert [dict(r.envs) for r in answer.container_responses] == [
            {"NVIDIA_VISIBLE_DEVICES": ",".join(ids[:2])},
            {"NVIDIA_VISIBLE_DEVICES": ids[2]},
        ]
        with pytest.raises(grpc.RpcError) as refused:
            stub.Allocate(convert.to_pb_allocate_request([["GPU-nope::0"]]), timeout=5)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        stream.cancel()
    assert plugin.proc is not None
    assert plugin.proc.returncode is not None  # stopped
    assert not plugin.root.exists()


def test_go_baseline_serves_the_api_and_refuses_unknown_ids(
    go_tools: kubelet_client.GoTools,
) -> None:
    _check_minimal_plugin(kubelet_client.go_baseline(go_tools, gpus=2, replicas=3))


def test_grpcio_baseline_is_the_same_plugin_on_grpcio() -> None:
    _check_minimal_plugin(kubelet_client.grpcio_baseline(gpus=2, replicas=3))


def test_go_client_admits_containers_on_gpushare_and_baseline(
    go_tools: kubelet_client.GoTools,
) -> None:
    with (
        DaemonUnderTest(NODE, ts_config(4)) as node,
        kubelet_client.go_baseline(go_tools) as baseline,
    ):
        kubelet = node.serve([GPU])
        for socket in (node.socket("gpu"), baseline.socket):
            samples = kubelet_client.go_client(go_tools, socket, 50, warmup=5, size=2)
            assert len(samples.allocate) == len(samples.preferred) == len(samples.empty) == 50
            assert all(x > 0 for x in samples.admission + samples.empty)
        # The Go client read the same list the kubelet stand-in holds, and asked for IDs in it.
        assert len(kubelet.latest(GPU).healthy_ids) == 8 * 4  # type: ignore[union-attr]


def test_go_client_reports_a_plugin_error(
    go_tools: kubelet_client.GoTools, tmp_path: Path
) -> None:
    with pytest.raises(RuntimeError, match="kubeletclient against .* failed: .*dial"):
        kubelet_client.go_client(
            go_tools, tmp_path / "nothing.sock", 1, warmup=0, dial_timeout_s=0.5
        )


def test_command_compares_gpushare_with_the_go_baseline(
    go_tools: kubelet_client.GoTools, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bench.json"
    assert main(["--runs", "20", "--only", "allocate", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    figures = {f["name"]: f for f in json.loads(out.read_text())["figures"]}
    pinned = f"gpushare --cpu-affinity {max(os.sched_getaffinity(0))}"
    plugins = ["gpushare", pinned] if len(os.sched_getaffinity(0)) > 1 else ["gpushare"]
    plugins.append("grpcio baseline")
    for label in ("Allocate", "GetPreferredAllocation", "admission (preferred + Allocate)",
                  "empty RPC"):  # fmt: skip
        baseline = figures[f"{label}: Go baseline"]
        assert baseline["runs"] == 3 * 20
        for plugin in plugins:
            assert figures[f"{label}: {plugin}"]["runs"] == 3 * 20
            ratio = figures[f"{label}: median ratio {plugin} / Go baseline"]
            assert ratio["runs"] == 3
            assert ratio["unit"] == "x"
            assert ratio["median"] > 0
    assert figures["Allocate: median ratio gpushare / Go baseline"]["target"] == "<=2"
    assert figures["Allocate: median ratio grpcio baseline / Go baseline"]["target"] == ""
    assert "Allocate: median ratio gpushare / Go baseline: per run " in printed
    assert "Python client" not in printed
