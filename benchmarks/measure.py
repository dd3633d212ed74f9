"""The measurements. Each returns Figures; none asserts anything (benchmarks are not tests)."""

from __future__ import annotations

import dataclasses
import os
import socket
import statistics
import sys
import time
import urllib.request
from collections.abc import Callable
from contextlib import ExitStack
from functools import partial

import psutil
from prometheus_client.parser import text_string_to_metric_families

from benchmarks import kubelet_client
from benchmarks.node import DaemonUnderTest
from benchmarks.stats import Figure
from benchmarks.synthetic import synthetic_inventory, time_slicing_config
from plugin.daemon import convert
from plugin.standin.configmap import write_configmap
from sharing.allocation import preferred_allocation
from sharing.nvml import load_library, nvml_session, read_inventory, sim
from sharing.plan import build_plan

NODE = "dgx-a100"
GPU = "nvidia.com/gpu"
GPUSHARE = "gpushare"
BASELINE = "Go baseline"
GRPCIO = "grpcio baseline"  # the same minimal plugin on grpcio: the floor under gpushare
ALTERNATING_RUNS = 3
RATIO_TARGET = 2.0  # median Allocate, gpushare / Go baseline
# The client (the kubelet's part) runs on one CPU and the plugins wherever the kernel puts them:
# on a node the kubelet has cores of its own, and on a 2-CPU machine a client free to move
# lands on the plugin's CPU and the two take turns. Both plugins see the same placement.
CLIENT_ON_ONE_CPU = True
ALLOCATE_TARGET: dict = {"target_median": 0.5, "target_p99": 2.0, "target_text": "median<0.5 p99<2"}

# What each client run yields, by row label.
_QUANTITIES: tuple[tuple[str, Callable[[kubelet_client.Samples], list[float]]], ...] = (
    ("Allocate", lambda s: s.allocate),
    ("GetPreferredAllocation", lambda s: s.preferred),
    ("admission (preferred + Allocate)", lambda s: s.admission),
    ("empty RPC", lambda s: s.empty),
)


def ts_config(replicas: int, strategies: str = "envvar", extra: str = "") -> str:
    """Time-slicing ×replicas on every GPU, requests of several replicas allowed."""
    return (
        "version: v1\n"
        f"flags:\n  plugin:\n    deviceListStrategy: [{strategies}]\n"
        f"{extra}"
        "sharing:\n  timeSlicing:\n    resources:\n"
        f"    - name: {GPU}\n      replicas: {replicas}\n"
    )


def _ms(start_ns: int, end_ns: int) -> float:
    return (end_ns - start_ns) / 1e6


def _timed(fn: Callable[[], object], runs: int) -> list[float]:
    """Wall time of each of `runs` calls, in milliseconds."""
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter_ns()
        fn()
        samples.append(_ms(t0, time.perf_counter_ns()))
    return samples


def allocate_latency(calls: int) -> list[Figure]:
    """Pod admission over the unix socket as the kubelet makes it, against the Go baseline.

    With Go: the kubelet-style Go client admits containers (GetPreferredAllocation, then
    Allocate) on gpushare, on gpushare pinned to one CPU (--cpu-affinity), on the minimal plugin
    written on grpcio and on the minimal Go plugin, in turn, ALTERNATING_RUNS times; then
    gpushare alone with 8 replicas and with CDI.
    Without Go: the same calls from a Python client, gpushare only, and the rows say so.
    Then, either way, Allocate with metrics off and on (allocate_metrics_overhead).
    """
    tools = kubelet_client.go_tools()
    if isinstance(tools, str):
        print(f"[allocate] Python client: {tools}", file=sys.stderr, flush=True)
        figures = _allocate_python_client(calls, tools)
    else:
        figures = _allocate_against_baseline(tools, calls) + _allocate_variants(tools, calls)
    return figures + allocate_metrics_overhead(calls)


def _placement() -> tuple[set[int] | None, int | None]:
    """The client's CPUs and the CPU of the pinned daemon: first and last, with two or more."""
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2 or not CLIENT_ON_ONE_CPU:
        return None, None
    return {allowed[0]}, allowed[-1]


def _allocate_against_baseline(tools: kubelet_client.GoTools, calls: int) -> list[Figure]:
    """gpushare (as started, and pinned to one CPU), the grpcio and the Go baselines, in turn."""
    client_cpus, daemon_cpu = _placement()
    pinned = f"{GPUSHARE} --cpu-affinity {daemon_cpu}"
    with ExitStack() as stack:
        node = stack.enter_context(DaemonUnderTest(NODE, ts_config(8)))
        node.serve([GPU])
        sockets = {GPUSHARE: node.socket("gpu")}
        if daemon_cpu is not None:
            args = ("--cpu-affinity", str(daemon_cpu))
            pinned_node = stack.enter_context(DaemonUnderTest(NODE, ts_config(8), args=args))
            pinned_node.serve([GPU])
            sockets[pinned] = pinned_node.socket("gpu")
        sockets[GRPCIO] = stack.enter_context(kubelet_client.grpcio_baseline()).socket
        sockets[BASELINE] = stack.enter_context(kubelet_client.go_baseline(tools)).socket
        names = list(sockets)
        runs: dict[str, list[kubelet_client.Samples]] = {name: [] for name in names}
        for run in range(ALTERNATING_RUNS):
            for name in names[run % len(names) :] + names[: run % len(names)]:
                runs[name].append(
                    kubelet_client.go_client(tools, sockets[name], calls, cpus=client_cpus)
                )
    figures = []
    for label, pick in _QUANTITIES:
        for name in names:
            samples = [x for r in runs[name] for x in pick(r)]
            gpushare = name not in (GRPCIO, BASELINE)
            node_text = f"Go client -> {NODE} ts x8" if gpushare else "Go client -> 64 IDs"
            target = ALLOCATE_TARGET if label == "Allocate" and gpushare else {}
            figures.append(
                Figure.from_samples(f"{label}: {name}", node_text, "ms", samples, **target)
            )
    for name in names[:-1]:
        for label, pick in _QUANTITIES:
            ratios = [
                statistics.median(pick(g)) / statistics.median(pick(b))
                for g, b in zip(runs[name], runs[BASELINE], strict=True)
            ]
            target = RATIO_TARGET if label == "Allocate" and name != GRPCIO else None
            figures.append(_ratio_figure(f"{label}: median ratio {name} / Go baseline", ratios,
                                         target))  # fmt: skip
    return figures


def _ratio_figure(name: str, ratios: list[float], target: float | None) -> Figure:
    """The median of per-run ratios; met when it is at most `target`."""
    median = statistics.median(ratios)
    per_run = ", ".join(f"{r:.2f}" for r in ratios)
    return Figure(
        name, "alternating runs", "x", len(ratios), median, max(ratios),
        target=f"<={target:g}" if target else "",
        met=None if target is None else median <= target,
        detail=f"per run {per_run}",
    )  # fmt: skip


def _allocate_variants(tools: kubelet_client.GoTools, calls: int) -> list[Figure]:
    """gpushare alone: 8 replicas per container, and the CDI strategies, via the Go client."""
    figures = []
    cpus, _ = _placement()
    for label, strategies in (("envvar", "envvar"), ("CDI", "cdi-annotations, cdi-cri")):
        with DaemonUnderTest(NODE, ts_config(8, strategies)) as node:
            node.serve([GPU])
            for size in (1, 8) if label == "CDI" else (8,):
                samples = kubelet_client.go_client(
                    tools, node.socket("gpu"), calls, size=size, cpus=cpus
                ).allocate
                what = "1 device" if size == 1 else f"{size} replicas"
                figures.append(
                    Figure.from_samples(
                        f"Allocate {what}, {label}: gpushare", f"Go client -> {NODE} ts x8", "ms",
                        samples, **ALLOCATE_TARGET,
                    )
                )  # fmt: skip
    return figures


def _allocate_python_client(calls: int, reason: str) -> list[Figure]:
    """gpushare through the Python client: no Go, so no Go client and no baseline."""
    figures = []
    suffix = f"gpushare (Python client, no Go baseline: {reason})"
    with DaemonUnderTest(NODE, ts_config(8)) as node:
        node.serve([GPU])
        runs = [
            kubelet_client.python_client(node.socket("gpu"), calls)
            for _ in range(ALTERNATING_RUNS)
        ]
    for label, pick in _QUANTITIES:
        samples = [x for r in runs for x in pick(r)]
        node_text = f"Python client -> {NODE} ts x8"
        target = ALLOCATE_TARGET if label == "Allocate" else {}
        figures.append(
            Figure.from_samples(f"{label}: {suffix}", node_text, "ms", samples, **target)
        )
    return figures


def preferred(runs: int) -> list[Figure]:
    """preferred_allocation on the Plan at 8x16, 8x64 and 64x128, sizes 1, 4 and 8."""
    figures = []
    for gpus, replicas in ((8, 16), (8, 64), (64, 128)):
        plan = build_plan(synthetic_inventory(gpus), time_slicing_config(replicas))
        resource = plan.resources[0]
        available = [d.id for d in resource.devices]
        for size in (1, 4, 8):
            call = partial(preferred_allocation, plan, resource.name, available, [], size)
            _timed(call, 20)
            samples = _timed(call, runs)
            target = (gpus, replicas, size) == (8, 64, 8)
            figures.append(
                Figure.from_samples(
                    f"GetPreferredAllocation {gpus}x{replicas} size {size}",
                    f"synthetic {gpus} GPUs", "ms", samples,
                    target_median=1.0 if target else None,
                    target_text="<1" if target else "",
                )
            )  # fmt: skip
    return figures


def plan_build(runs: int) -> list[Figure]:
    """build_plan at 8, 64 and 256 GPUs with 64 replicas each."""
    figures = []
    config = time_slicing_config(64)
    for gpus in (8, 64, 256):
        inventory = synthetic_inventory(gpus)
        samples = _timed(partial(build_plan, inventory, config), runs)
        figures.append(
            Figure.from_samples(
                f"build_plan {gpus} GPUs x 64 replicas", f"synthetic {gpus} GPUs", "ms", samples,
                target_median=100.0 if gpus == 64 else None,
                target_text="<100" if gpus == 64 else "",
            )
        )  # fmt: skip
    return figures


def inventory_read(runs: int) -> list[Figure]:
    """read_inventory of dgx-a100 through the simulated NVML (all GPUs, links, MIG, processes)."""
    with nvml_session(load_library(NODE)) as nvml:
        read_inventory(nvml)
        samples = _timed(partial(read_inventory, nvml), runs)
    return [
        Figure.from_samples(
            "read_inventory", NODE, "ms", samples, target_median=50.0, target_text="<50"
        )
    ]


def _gpu_uuids(node: DaemonUnderTest) -> list[str]:
    """The simulated node's GPU UUIDs, read through NVML as the daemon reads them."""
    with nvml_session(load_library(str(node.state_dir))) as nvml:
        return [gpu.uuid for gpu in read_inventory(nvml).gpus]


def health_propagation(runs: int) -> list[Figure]:
    """XID injected in the simulated NVML -> updated list received by the kubelet stand-in."""
    health = "health:\n  recoveryQuietPeriod: 100ms\n  probeInterval: 50ms\n"
    samples = []
    with DaemonUnderTest(NODE, ts_config(4, extra=health)) as node:
        kubelet = node.serve([GPU])
        uuids = _gpu_uuids(node)
        for run in range(runs):
            gpu = run % len(uuids)
            replicas = {f"{uuids[gpu]}::{n}" for n in range(4)}
            t0 = time.monotonic()
            sim.inject_xid(node.state_dir, gpu, 94)  # contained ECC error: recoverable
            seen = kubelet.wait_for_list(
                GPU, lambda lst, want=replicas: want <= set(lst.unhealthy_ids)
            )
            samples.append((seen.at - t0) * 1000)
            kubelet.wait_for_list(GPU, lambda lst: not lst.unhealthy_ids, timeout_s=10)
    return [
        Figure.from_samples(
            "health propagation (XID 94 -> Unhealthy at kubelet)", f"{NODE} ts x4", "ms",
            samples, target_median=100.0, target_text="<100",
        )
    ]  # fmt: skip


def reregistration(runs: int) -> list[Figure]:
    """Kubelet restart (sockets wiped, kubelet.sock re-created) -> Register received."""
    samples = []
    with DaemonUnderTest(NODE, ts_config(8)) as node:
        kubelet = node.serve([GPU])
        for _ in range(runs):
            before = len(kubelet.registrations_of(GPU))
            kubelet.restart()
            t0 = time.monotonic()
            kubelet.wait_for(lambda b=before: len(kubelet.registrations_of(GPU)) > b, 10)
            samples.append((kubelet.registrations_of(GPU)[-1].at - t0) * 1000)
    return [
        Figure.from_samples(
            "kubelet restart -> re-registered", f"{NODE} ts x8", "ms", samples,
            target_median=200.0, target_text="<200",
        )
    ]  # fmt: skip


def cold_start(runs: int) -> list[Figure]:
    """Process start -> every resource registered and its first list received."""
    samples = []
    for _ in range(runs):
        with DaemonUnderTest(NODE, ts_config(8)) as node:
            started = node.spawn()
            registered = node.wait_registered([GPU])
            samples.append((registered - started) * 1000)
    return [
        Figure.from_samples(
            "cold start -> all resources registered", f"{NODE} ts x8", "ms", samples,
            target_median=1000.0, target_text="<1000",
        )
    ]  # fmt: skip


def resident_memory(calls: int) -> list[Figure]:
    """Daemon RSS after start and after `calls` Allocate calls."""
    with DaemonUnderTest(NODE, ts_config(8)) as node:
        kubelet = node.serve([GPU])
        process = psutil.Process(node.pid)
        time.sleep(0.5)
        after_start = process.memory_info().rss / 2**20
        stub = node.stub("gpu")
        ids = kubelet.latest(GPU).healthy_ids  # type: ignore[union-attr]
        requests = [convert.to_pb_allocate_request([[i]]) for i in ids]
        for n in range(calls):
            stub.Allocate(requests[n % len(requests)], timeout=5)
        after_calls = process.memory_info().rss / 2**20
    growth = after_calls - after_start
    return [
        Figure.from_samples(
            "daemon RSS after start", f"{NODE} ts x8", "MiB", [after_start],
            target_median=80.0, target_text="<80",
        ),
        Figure.from_samples(
            f"daemon RSS after {calls} Allocate calls", f"{NODE} ts x8", "MiB", [after_calls],
            target_median=80.0, target_text="<80, growth <5",
            detail=f"growth {growth:.1f} MiB",
        ),
    ]  # fmt: skip


def config_reload(runs: int) -> list[Figure]:
    """Config file changed -> new device list received by the kubelet stand-in."""
    samples = []
    with DaemonUnderTest(NODE, ts_config(4)) as node:
        kubelet = node.serve([GPU])
        for run in range(runs):
            replicas = 8 if run % 2 == 0 else 4
            t0 = time.monotonic()
            node.config_path.write_text(ts_config(replicas))
            seen = kubelet.wait_for_list(GPU, lambda lst, n=replicas: len(lst.devices) == 8 * n)
            samples.append((seen.at - t0) * 1000)
    return [
        Figure.from_samples(
            "config reload -> new list at kubelet", f"{NODE} ts 4<->8", "ms", samples,
            target_median=1000.0, target_p99=1000.0, target_text="<1000",
        )
    ] + configmap_swap(runs)  # fmt: skip


def _free_port() -> int:
    """A TCP port nothing listens on now, on 127.0.0.1."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _allocate_histogram_count(port: int) -> float:
    """gpushare_allocate_seconds_count summed over resources, scraped from /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "gpushare_allocate_seconds_count"
    )


def allocate_metrics_overhead(calls: int) -> list[Figure]:
    """Allocate 1 device with metrics off and on: two daemons, calls alternated in blocks.

    Alternating blocks of 100 calls spreads the machine's drift over both; the scrape at the end
    checks that the daemon with metrics on recorded every call.
    """
    port = _free_port()
    timed: dict[str, list[float]] = {"off": [], "on": []}
    with DaemonUnderTest(NODE, ts_config(8)) as off, DaemonUnderTest(NODE, ts_config(8)) as on:
        on.metrics_address = f"127.0.0.1:{port}"
        call = {}
        for label, node in (("off", off), ("on", on)):
            ids = node.serve([GPU]).latest(GPU).healthy_ids  # type: ignore[union-attr]
            request = convert.to_pb_allocate_request([[ids[0]]])
            call[label] = partial(node.stub("gpu").Allocate, request, timeout=5)
            _timed(call[label], 200)  # warm-up
        for block in range(max(1, calls // 100)):
            for label in ("off", "on") if block % 2 == 0 else ("on", "off"):
                timed[label] += _timed(call[label], 100)
        recorded = _allocate_histogram_count(port)
    off_median, on_median = statistics.median(timed["off"]), statistics.median(timed["on"])
    change = (on_median - off_median) / off_median * 100
    on = Figure.from_samples(
        "Allocate 1 device, envvar, metrics on (alternating)", f"{NODE} ts x8", "ms",
        timed["on"], target_text="median +5% of off at most",
        detail=f"median {change:+.1f}% with metrics on; {recorded:.0f} calls recorded",
    )  # fmt: skip
    return [
        Figure.from_samples(
            "Allocate 1 device, envvar, metrics off (alternating)", f"{NODE} ts x8", "ms",
            timed["off"],
        ),
        dataclasses.replace(on, met=change <= 5.0),
    ]  # fmt: skip


def configmap_swap(runs: int) -> list[Figure]:
    """ConfigMap-style update (`..data` symlink swapped) -> new device list at the kubelet."""
    samples = []
    with DaemonUnderTest(NODE, ts_config(4)) as node:
        configmap = node.root / "cm"
        write_configmap(configmap, {"config.yaml": ts_config(4)})
        node.config_path = configmap / "config.yaml"
        kubelet = node.serve([GPU])
        for run in range(runs):
            replicas = 8 if run % 2 == 0 else 4
            t0 = time.monotonic()
            write_configmap(configmap, {"config.yaml": ts_config(replicas)})
            seen = kubelet.wait_for_list(GPU, lambda lst, n=replicas: len(lst.devices) == 8 * n)
            samples.append((seen.at - t0) * 1000)
    return [
        Figure.from_samples(
            "ConfigMap ..data swap -> new list at kubelet", f"{NODE} ts 4<->8", "ms", samples,
            target_median=1000.0, target_p99=1000.0, target_text="<1000",
        )
    ]  # fmt: skip


def idle_cpu(windows: int, window_s: float = 5.0) -> list[Figure]:
    """CPU time the daemon uses while nothing happens, per second of wall time (% of one core).

    Windows of 5 s: the kernel counts CPU time in 10 ms ticks, too coarse for shorter ones.
    """
    samples = []
    with DaemonUnderTest(NODE, ts_config(8)) as node:
        node.serve([GPU])
        process = psutil.Process(node.pid)
        time.sleep(2.0)  # start-up work done
        for _ in range(windows):
            before, t0 = process.cpu_times(), time.monotonic()
            time.sleep(window_s)
            after, t1 = process.cpu_times(), time.monotonic()
            used = (after.user - before.user) + (after.system - before.system)
            samples.append(used / (t1 - t0) * 100)
    return [
        Figure.from_samples(
            f"daemon CPU while idle ({window_s:.0f} s windows)", f"{NODE} ts x8", "%", samples,
            detail=f"mean {statistics.mean(samples):.2f}% of one core over "
            f"{windows * window_s:.0f} s",
        )
    ]  # fmt: skip


def summary(samples: list[float]) -> str:
    """Median and spread of samples, for logs."""
    return f"median {statistics.median(samples):.3f} over {len(samples)}"
