"""build_plan: resources, virtual devices and their parents from an inventory and a config."""

from __future__ import annotations

import re
import textwrap
from dataclasses import replace

import pytest

from sharing.config import apply_overrides, load_config
from sharing.config_models import Config
from sharing.devices import Inventory
from sharing.errors import PlanError
from sharing.plan import build_plan
from sharing.plan_types import Plan
from tests.fakes.inventories import dgx_a100, make_gpu, pcie_gpus, with_mig

A100 = dgx_a100()
MIG_MIXED = with_mig(
    A100,
    {
        0: [("1g.5gb", s) for s in range(7)],
        1: [("3g.20gb", 0), ("2g.10gb", 4), ("1g.5gb", 6)],
    },
)
MIG_ALL_1G = with_mig(A100, {i: [("1g.5gb", s) for s in range(7)] for i in range(8)})


def cfg(text: str, **env: str) -> Config:
    """A dedented config with environment overrides."""
    return apply_overrides(load_config(textwrap.dedent(text), source="c.yaml"), env, {})


def plan_of(text: str, inventory: Inventory = A100, **env: str) -> Plan:
    """build_plan of a dedented config text."""
    return build_plan(inventory, cfg(text, **env))


def shared(strategy: str, *entries: str, section: str = "", flags: str = "") -> str:
    """A config with one sharing section made of the given entry lines."""
    body = "".join(f"    - {e}\n" for e in entries)
    return f"version: v1\n{flags}sharing:\n  {strategy}:\n{section}    resources:\n{body}"


def test_no_sharing_gives_one_device_per_gpu() -> None:
    plan = plan_of("version: v1\n")
    (res,) = plan.resources
    assert (res.name, res.strategy, len(res.devices)) == ("nvidia.com/gpu", "none", 8)
    first = res.devices[0]
    assert first.id == first.physical_id == first.gpu_uuid == A100.gpus[0].uuid
    assert (first.replica, first.index_id, first.numa_node) == (None, "0", 0)
    assert res.devices[7].numa_node == 1
    assert first.dev_paths == ("/dev/nvidia0",)
    assert plan.topology == A100.link_scores


def test_time_slicing_replicas_and_ids() -> None:
    plan = plan_of(shared("timeSlicing", "{name: gpu, replicas: 3}"))
    (res,) = plan.resources
    assert res.name == "nvidia.com/gpu"
    assert [d.id for d in res.devices[:4]] == [
        f"{A100.gpus[0].uuid}::0",
        f"{A100.gpus[0].uuid}::1",
        f"{A100.gpus[0].uuid}::2",
        f"{A100.gpus[1].uuid}::0",
    ]
    assert res.devices[4].replica == 1
    assert res.devices[4].physical_id == A100.gpus[1].uuid
    assert res.replicas == tuple((g.uuid, 3) for g in A100.gpus)
    assert res.fail_requests_greater_than_one is False


def test_per_gpu_replica_counts_in_one_resource() -> None:
    plan = plan_of(
        shared(
            "timeSlicing",
            "{name: gpu, devices: [0, 1, 2, 3], replicas: 4}",
            "{name: gpu, devices: [4, 5, 6, 7], replicas: 8}",
        )
    )
    (res,) = plan.resources
    assert len(res.devices) == 4 * 4 + 4 * 8
    assert dict(res.replicas) == {g.uuid: 4 if g.index < 4 else 8 for g in A100.gpus}


@pytest.mark.parametrize(
    ("devices", "selected"),
    [
        pytest.param("all", [0, 1, 2, 3, 4, 5, 6, 7], id="all"),
        pytest.param("3", [0, 1, 2], id="count takes the first GPUs"),
        pytest.param("[5, '1']", [1, 5], id="indices, int or string"),
        pytest.param(f"[{A100.gpus[6].uuid}]", [6], id="GPU UUID"),
    ],
)
def test_device_selection(devices: str, selected: list[int]) -> None:
    plan = plan_of(
        shared(
            "timeSlicing",
            f"{{name: gpu, devices: {devices}, replicas: 2}}",
            section="    renameByDefault: true\n",
        )
    )
    res = plan.resource("nvidia.com/gpu.shared")
    assert [A100.gpu_by_uuid(pid).index for pid in res.physical_ids] == selected
    rest = plan.resource("nvidia.com/gpu")
    unselected = [i for i in range(8) if i not in selected]
    if unselected:
        assert rest.strategy == "none"
        assert [d.gpu_index for d in rest.devices] == unselected
    else:
        assert rest is None


def test_rename_wins_over_rename_by_default() -> None:
    plan = plan_of(
        shared(
            "timeSlicing",
            "{name: gpu, rename: gpu-ts, replicas: 2}",
            section="    renameByDefault: true\n",
        )
    )
    assert plan.names == ("nvidia.com/gpu-ts",)
    assert plan.resources[0].original_name == "nvidia.com/gpu"


def test_mig_none_ignores_mig_devices() -> None:
    plan = plan_of("version: v1\n", MIG_MIXED)
    assert plan.names == ("nvidia.com/gpu",)
    assert len(plan.resources[0].devices) == 8


def test_mig_mixed_names_each_profile() -> None:
    plan = plan_of("version: v1\nflags: {migStrategy: mixed}\n", MIG_MIXED)
    counts = {r.name: len(r.devices) for r in plan.resources}
    assert counts == {
        "nvidia.com/gpu": 6,
        "nvidia.com/mig-1g.5gb": 8,
        "nvidia.com/mig-2g.10gb": 1,
        "nvidia.com/mig-3g.20gb": 1,
    }
    mig = plan.resource("nvidia.com/mig-3g.20gb").devices[0]
    assert mig.id == mig.physical_id == MIG_MIXED.gpus[1].mig_devices[0].uuid
    assert (mig.gpu_uuid, mig.gpu_index, mig.index_id) == (MIG_MIXED.gpus[1].uuid, 1, "1:0")
    gi, ci = mig.mig.gi_cap_minor, mig.mig.ci_cap_minor
    assert mig.dev_paths == (
        "/dev/nvidia1",
        f"/dev/nvidia-caps/nvidia-cap{gi}",
        f"/dev/nvidia-caps/nvidia-cap{ci}",
    )


def test_mig_me_profile_name() -> None:
    inventory = with_mig(A100, {0: [("1g.5gb+me", 0)]})
    plan = plan_of("version: v1\nflags: {migStrategy: mixed}\n", inventory)
    assert "nvidia.com/mig-1g.5gb.me" in plan.names


def test_mig_single_advertises_mig_devices_as_gpu() -> None:
    plan = plan_of("version: v1\nflags: {migStrategy: single}\n", MIG_ALL_1G)
    (res,) = plan.resources
    assert (res.name, len(res.devices)) == ("nvidia.com/gpu", 56)
    assert all(d.mig is not None for d in res.devices)


def test_time_slicing_on_mig_devices() -> None:
    plan = plan_of(
        shared(
            "timeSlicing",
            "{name: mig-1g.5gb, replicas: 4}",
            flags="flags: {migStrategy: mixed}\n",
            section="    renameByDefault: true\n",
        ),
        MIG_MIXED,
    )
    res = plan.resource("nvidia.com/mig-1g.5gb.shared")
    assert len(res.devices) == 8 * 4
    assert res.devices[0].id == f"{MIG_MIXED.gpus[0].mig_devices[0].uuid}::0"
    assert res.devices[0].gpu_uuid == MIG_MIXED.gpus[0].uuid
    assert plan.resource("nvidia.com/mig-3g.20gb").strategy == "none"


@pytest.mark.parametrize(
    ("devices", "expected"),
    [
        pytest.param("['0:3', '1:2']", ["0:3", "1:2"], id="MIG indices"),
        pytest.param("[1]", ["1:2"], id="GPU index selects its MIG devices of the resource"),
        pytest.param(f"[{MIG_MIXED.gpus[0].mig_devices[5].uuid}]", ["0:5"], id="MIG UUID"),
        pytest.param(
            f"['MIG-{MIG_MIXED.gpus[0].uuid}/{MIG_MIXED.gpus[0].mig_devices[1].gi_id}/0']",
            ["0:1"],
            id="legacy MIG UUID",
        ),
    ],
)
def test_mig_device_references(devices: str, expected: list[str]) -> None:
    plan = plan_of(
        shared(
            "timeSlicing",
            f"{{name: mig-1g.5gb, devices: {devices}, replicas: 2}}",
            flags="flags: {migStrategy: mixed}\n",
            section="    renameByDefault: true\n",
        ),
        MIG_MIXED,
    )
    res = plan.resource("nvidia.com/mig-1g.5gb.shared")
    assert sorted({d.index_id for d in res.devices}) == expected


def test_custom_resource_names_by_pattern() -> None:
    inventory = Inventory(
        gpus=(make_gpu(0), make_gpu(1, name="Tesla T4", memory_mib=15360, cc=(7, 5), tag="t4")),
    )
    plan = plan_of(
        "version: v1\nresources:\n  gpus:\n  - {pattern: '*A100*', name: a100}\n", inventory
    )
    assert {r.name: [d.gpu_index for d in r.devices] for r in plan.resources} == {
        "nvidia.com/a100": [0],
        "nvidia.com/gpu": [1],
    }


def test_time_slicing_and_mps_on_disjoint_gpus() -> None:
    text = """\
        version: v1
        flags: {mpsRoot: /run/nvidia/mps}
        sharing:
          timeSlicing:
            renameByDefault: true
            resources: [{name: gpu, devices: [0, 1, 2, 3], replicas: 8}]
          mps:
            resources: [{name: gpu, devices: [4, 5, 6, 7], replicas: 4}]
        """
    plan = plan_of(text)
    ts, mps = plan.resource("nvidia.com/gpu.shared"), plan.resource("nvidia.com/gpu")
    assert (ts.strategy, len(ts.devices), ts.fail_requests_greater_than_one) == (
        "time-slicing",
        32,
        False,
    )
    assert (mps.strategy, len(mps.devices), mps.fail_requests_greater_than_one) == ("mps", 16, True)
    assert mps.mps.gpu_indices == (4, 5, 6, 7)


def test_mps_spec_defaults() -> None:
    plan = plan_of(shared("mps", "{name: gpu, replicas: 10}"), MPS_ROOT="/run/nvidia/mps")
    spec = plan.resources[0].mps
    assert spec.resource == "nvidia.com/gpu"
    assert spec.gpu_indices == tuple(range(8))
    assert spec.gpu_uuids == tuple(g.uuid for g in A100.gpus)
    assert spec.active_thread_percentage == 10
    assert spec.pinned_mem_limit_mib == tuple((i, 4096) for i in range(8))
    assert spec.max_clients_per_gpu == 48
    assert (spec.pipe_dir, spec.log_dir, spec.shm_dir) == (
        "/run/nvidia/mps/gpu/pipe",
        "/run/nvidia/mps/gpu/log",
        "/run/nvidia/mps/shm",
    )


def test_mps_limits_overridden_per_entry() -> None:
    plan = plan_of(
        shared(
            "mps", "{name: gpu, replicas: 4, activeThreadPercentage: 40, pinnedMemoryLimit: 2G}"
        ),
        MPS_ROOT="/mps",
    )
    spec = plan.resources[0].mps
    assert spec.active_thread_percentage == 40
    assert set(spec.pinned_mem_limit_mib) == {(i, 2048) for i in range(8)}


def test_mps_below_compute_capability_7_5_allows_16_clients() -> None:
    inventory = pcie_gpus(2, name="Tesla V100", memory_mib=16384, cc=(7, 0), tag="v100")
    plan = plan_of(shared("mps", "{name: gpu, replicas: 16}"), inventory, MPS_ROOT="/mps")
    assert plan.resources[0].mps.max_clients_per_gpu == 16


def test_device_paths_are_container_paths_and_dev_root_is_an_option() -> None:
    plan = plan_of("version: v1\nflags: {nvidiaDriverRoot: /run/nvidia/driver}\n")
    assert plan.resources[0].devices[3].dev_paths == ("/dev/nvidia3",)
    assert plan.options.nvidia_dev_root == "/run/nvidia/driver"
    plan = plan_of("version: v1\nflags: {nvidiaDriverRoot: /x, nvidiaDevRoot: /}\n")
    assert plan.options.nvidia_dev_root == "/"


def test_serve_options_come_from_flags() -> None:
    plan = plan_of(
        "version: v1\nflags:\n  plugin: {deviceListStrategy: [cdi-cri], deviceIDStrategy: index,"
        " passDeviceSpecs: true, sharedDevicesAllocationPolicy: packed}\n",
        MIG_STRATEGY="none",
    )
    opts = plan.options
    assert opts.device_list_strategy == ("cdi-cri",)
    assert (opts.device_id_strategy, opts.pass_device_specs) == ("index", True)
    assert opts.shared_devices_allocation_policy == "packed"


def test_plan_is_deterministic_and_frozen() -> None:
    text = shared("timeSlicing", "{name: gpu, replicas: 2}")
    assert plan_of(text) == plan_of(text)
    with pytest.raises(AttributeError):
        plan_of(text).resources = ()  # type: ignore[misc]


def test_diff_names_added_removed_and_changed_resources() -> None:
    before = plan_of(shared("timeSlicing", "{name: gpu, replicas: 2}"))
    after = plan_of(
        shared(
            "timeSlicing",
            "{name: gpu, devices: [0, 1], replicas: 4}",
            section="    renameByDefault: true\n",
        )
    )
    diff = before.diff(after)
    assert diff.added == ("nvidia.com/gpu.shared",)
    assert diff.changed == ("nvidia.com/gpu",)  # now the 6 unshared GPUs
    assert diff.removed == ()
    assert before.diff(before).empty
    lost = replace(A100, gpus=A100.gpus[:7])
    assert build_plan(lost, cfg("version: v1\n")).diff(plan_of("version: v1\n")).changed == (
        "nvidia.com/gpu",
    )


def _busy(inventory: Inventory) -> Inventory:
    """The inventory with a process running on every GPU and every MIG device."""
    gpus = tuple(
        replace(
            g,
            processes=(100 + g.index,),
            mig_devices=tuple(replace(m, processes=(200 + m.index,)) for m in g.mig_devices),
        )
        for g in inventory.gpus
    )
    return replace(inventory, gpus=gpus)


MIXED_TEXT = "version: v1\nflags: {migStrategy: mixed}\n"
MPS_TEXT = "version: v1\nflags: {mpsRoot: /run/nvidia/mps}\n"


@pytest.mark.parametrize(
    ("before", "after", "changed"),
    [
        pytest.param(
            (MIG_MIXED, MIXED_TEXT),
            (_busy(MIG_MIXED), MIXED_TEXT),
            (),
            id="processes starting on GPUs and MIG devices change nothing served",
        ),
        pytest.param(
            (
                MIG_MIXED,
                MIXED_TEXT
                + "sharing: {timeSlicing: {resources: [{name: mig-1g.5gb, replicas: 2}]}}\n",
            ),
            (
                _busy(MIG_MIXED),
                MIXED_TEXT
                + "sharing: {timeSlicing: {resources: [{name: mig-1g.5gb, replicas: 2}]}}\n",
            ),
            (),
            id="processes on shared MIG devices change nothing served",
        ),
        pytest.param(
            (A100, shared("timeSlicing", "{name: gpu, replicas: 2}")),
            (A100, shared("timeSlicing", "{name: gpu, replicas: 3}")),
            ("nvidia.com/gpu",),
            id="replica count",
        ),
        pytest.param(
            (A100, shared("timeSlicing", "{name: gpu, replicas: 2}")),
            (
                A100,
                shared("timeSlicing", "{name: gpu, replicas: 2, failRequestsGreaterThanOne: true}"),
            ),
            ("nvidia.com/gpu",),
            id="failRequestsGreaterThanOne",
        ),
        pytest.param(
            (A100, shared("mps", "{name: gpu, replicas: 2}", flags="flags: {mpsRoot: /r}\n")),
            (
                A100,
                shared(
                    "mps",
                    "{name: gpu, replicas: 2, activeThreadPercentage: 30}",
                    flags="flags: {mpsRoot: /r}\n",
                ),
            ),
            ("nvidia.com/gpu",),
            id="MPS thread limit",
        ),
        pytest.param(
            (MIG_MIXED, MIXED_TEXT),
            (
                with_mig(
                    A100,
                    {
                        0: [("1g.5gb", s) for s in range(6)],
                        1: [("3g.20gb", 0), ("2g.10gb", 4), ("1g.5gb", 6)],
                    },
                ),
                MIXED_TEXT,
            ),
            ("nvidia.com/mig-1g.5gb",),
            id="one MIG device fewer changes only its resource",
        ),
        pytest.param(
            (A100, MPS_TEXT),
            (_busy(A100), MPS_TEXT),
            (),
            id="unshared GPUs with processes",
        ),
    ],
)
def test_diff_marks_exactly_the_resources_whose_served_details_changed(
    before: tuple[Inventory, str], after: tuple[Inventory, str], changed: tuple[str, ...]
) -> None:
    old = build_plan(before[0], cfg(before[1]))
    new = build_plan(after[0], cfg(after[1]))
    diff = old.diff(new)
    assert (diff.added, diff.removed, diff.changed) == ((), (), changed)


# --- errors --------------------------------------------------------------------------------

OLD = pcie_gpus(2, name="Tesla V100", memory_mib=16384, cc=(7, 0), tag="v100")
MIG_HALF = with_mig(A100, {0: [("1g.5gb", 0)], 1: [("1g.5gb", 0)]})
MIG_TWO_PROFILES = with_mig(A100, {i: [("1g.5gb" if i else "2g.10gb", 0)] for i in range(8)})
MIG_EMPTY = with_mig(A100, {i: [("1g.5gb", 0)] if i else [] for i in range(8)})
MIXED = "flags: {migStrategy: mixed}\n"
RBD = "    renameByDefault: true\n"

PLAN_ERRORS = [
    pytest.param(
        shared(
            "timeSlicing",
            "{name: gpu, replicas: 2}",
            "{name: gpu, devices: [0, 1, 9], replicas: 2}",
        ),
        A100,
        {},
        "sharing.timeSlicing.resources[1].devices[2]: no GPU with index 9 on this node "
        "(indices 0-7)",
        id="unknown GPU index",
    ),
    pytest.param(
        shared(
            "timeSlicing",
            "{name: gpu, devices: [GPU-00000000-0000-0000-0000-000000000000], replicas: 2}",
            section=RBD,
        ),
        A100,
        {},
        "sharing.timeSlicing.resources[0].devices[0]: no GPU with UUID "
        "GPU-00000000-0000-0000-0000-000000000000 on this node",
        id="unknown GPU UUID",
    ),
    pytest.param(
        shared(
            "timeSlicing",
            "{name: mig-1g.5gb, devices: [MIG-00000000-0000-0000-0000-000000000000], replicas: 2}",
            flags=MIXED,
            section=RBD,
        ),
        MIG_MIXED,
        {},
        "sharing.timeSlicing.resources[0].devices[0]: no MIG device with UUID "
        "MIG-00000000-0000-0000-0000-000000000000 on this node",
        id="unknown MIG UUID",
    ),
    pytest.param(
        shared(
            "timeSlicing",
            "{name: mig-1g.5gb, devices: ['0:9'], replicas: 2}",
            flags=MIXED,
            section=RBD,
        ),
        MIG_MIXED,
        {},
        "sharing.timeSlicing.resources[0].devices[0]: GPU 0 has no MIG device 0:9 (its MIG "
        "devices are 0:0, 0:1, 0:2, 0:3, 0:4, 0:5, 0:6)",
        id="unknown MIG index",
    ),
    pytest.param(
        shared(
            "timeSlicing",
            "{name: mig-1g.5gb, devices: ['3:0'], replicas: 2}",
            flags=MIXED,
            section=RBD,
        ),
        MIG_MIXED,
        {},
        "sharing.timeSlicing.resources[0].devices[0]: GPU 3 has no MIG device 3:0 (it has no "
        "MIG devices)",
        id="MIG index on a full GPU",
    ),
    pytest.param(
        shared(
            "timeSlicing",
            "{name: mig-1g.5gb, devices: ['1:0'], replicas: 2}",
            flags=MIXED,
            section=RBD,
        ),
        MIG_MIXED,
        {},
        "sharing.timeSlicing.resources[0].devices[0]: MIG device 1:0 ("
        f'{MIG_MIXED.gpus[1].mig_devices[0].uuid}, 3g.20gb) is not a "nvidia.com/mig-1g.5gb" '
        'device (it is advertised as "nvidia.com/mig-3g.20gb")',
        id="MIG device of another profile",
    ),
    pytest.param(
        shared("timeSlicing", "{name: gpu, devices: [0], replicas: 2}", flags=MIXED, section=RBD),
        MIG_MIXED,
        {},
        f"sharing.timeSlicing.resources[0].devices[0]: GPU 0 ({MIG_MIXED.gpus[0].uuid}) has "
        'no "nvidia.com/gpu" devices (it is advertised as nvidia.com/mig-1g.5gb)',
        id="MIG-enabled GPU named as a full GPU",
    ),
    pytest.param(
        shared("timeSlicing", "{name: gpu, devices: 9, replicas: 2}"),
        A100,
        {},
        "sharing.timeSlicing.resources[0].devices: asks for 9 devices but this node has 8 "
        '"nvidia.com/gpu" devices',
        id="count larger than the node",
    ),
    pytest.param(
        shared(
            "timeSlicing",
            "{name: gpu, devices: [0, 1, 2], replicas: 2}",
            "{name: gpu, devices: [2, 3], replicas: 4}",
            section=RBD,
        ),
        A100,
        {},
        "sharing.timeSlicing.resources[0] and sharing.timeSlicing.resources[1] both select "
        f"GPU 2 ({A100.gpus[2].uuid}); a device can be shared by one entry only",
        id="overlapping entries",
    ),
    pytest.param(
        "version: v1\nflags: {mpsRoot: /m}\nsharing:\n  timeSlicing:\n    resources: "
        "[{name: gpu, rename: x, replicas: 2}]\n  mps:\n    resources: "
        "[{name: gpu, devices: [7], rename: y, replicas: 2}]\n",
        A100,
        {},
        "sharing.timeSlicing.resources[0] and sharing.mps.resources[0] both select GPU 7 "
        f"({A100.gpus[7].uuid}); a device can be shared by one entry only",
        id="time-slicing and MPS overlap",
    ),
    pytest.param(
        "version: v1\nflags: {mpsRoot: /m}\nsharing:\n  timeSlicing:\n    resources: "
        "[{name: gpu, devices: [0], rename: s, replicas: 2}]\n  mps:\n    resources: "
        "[{name: gpu, devices: [1], rename: s, replicas: 2}]\n",
        A100,
        {},
        'sharing.timeSlicing.resources[0] (time-slicing, "nvidia.com/gpu") and '
        'sharing.mps.resources[0] (mps, "nvidia.com/gpu") both advertise "nvidia.com/s"; '
        "give one of them another name with rename",
        id="one name from two strategies",
    ),
    pytest.param(
        shared("timeSlicing", "{name: gpu, devices: [0, 1], replicas: 2}"),
        A100,
        {},
        'sharing.timeSlicing.resources[0]: advertises "nvidia.com/gpu" with time-slicing '
        "replicas, but 6 devices it does not select (GPU 2 (",
        id="shared and unshared devices under one name",
    ),
    pytest.param(
        shared(
            "timeSlicing",
            "{name: gpu, devices: [0], rename: 'nvidia.com/gpu', replicas: 2}",
            "{name: gpu, devices: [1], rename: 'example.com/gpu', replicas: 2}",
        ),
        pcie_gpus(2),
        {},
        'resources "example.com/gpu" and "nvidia.com/gpu" would share the socket '
        "gpushare-gpu.sock; rename one of them",
        id="two resources with one socket name",
    ),
    pytest.param(
        shared("timeSlicing", "{name: " + "g" * 50 + ", replicas: 2}", section=RBD),
        A100,
        {},
        "sharing.timeSlicing.resources[0].name: with renameByDefault, resource name "
        f'"nvidia.com/{"g" * 50}.shared" is 68 characters; at most 63 are allowed',
        id="renameByDefault makes the name too long",
    ),
    pytest.param(
        shared("mps", "{name: gpu, replicas: 4}"),
        A100,
        {},
        "sharing.mps: MPS needs flags.mpsRoot (or MPS_ROOT / --mps-root), e.g. /run/nvidia/mps; "
        "it is not set",
        id="MPS without mpsRoot",
    ),
    pytest.param(
        shared("mps", "{name: mig-1g.5gb, replicas: 4}"),
        A100,
        {},
        "sharing.mps: MPS needs flags.mpsRoot (or MPS_ROOT / --mps-root), e.g. /run/nvidia/mps; "
        "it is not set",
        id="MPS without mpsRoot on a node without the shared resource",
    ),
    pytest.param(
        shared("mps", "{name: gpu, replicas: 4}", flags=MIXED),
        MIG_MIXED,
        {"MPS_ROOT": "/m"},
        'sharing.mps: MPS cannot be used with flags.migStrategy "mixed"',
        id="MPS with migStrategy mixed",
    ),
    pytest.param(
        shared("mps", "{name: gpu, replicas: 4}", flags="flags: {migStrategy: single}\n"),
        MIG_ALL_1G,
        {"MPS_ROOT": "/m"},
        "sharing.mps.resources[0]: MPS is not supported for MIG devices; it selects MIG device 0:0",
        id="MPS on MIG devices",
    ),
    pytest.param(
        shared("mps", "{name: gpu, replicas: 49}"),
        A100,
        {"MPS_ROOT": "/m"},
        f"sharing.mps.resources[0].replicas: 49 MPS clients on GPU 0 ({A100.gpus[0].uuid}) "
        "exceed the limit of 48 per GPU (compute capability 8.0)",
        id="too many MPS clients",
    ),
    pytest.param(
        shared("mps", "{name: gpu, replicas: 17}"),
        OLD,
        {"MPS_ROOT": "/m"},
        f"sharing.mps.resources[0].replicas: 17 MPS clients on GPU 0 ({OLD.gpus[0].uuid}) "
        "exceed the limit of 16 per GPU (compute capability 7.0)",
        id="too many MPS clients before 7.5",
    ),
    pytest.param(
        shared("mps", "{name: gpu, replicas: 2, pinnedMemoryLimit: 64G}"),
        A100,
        {"MPS_ROOT": "/m"},
        "sharing.mps.resources[0].pinnedMemoryLimit: 65536 MiB per client exceeds the 40960 MiB "
        f"of GPU 0 ({A100.gpus[0].uuid})",
        id="pinned memory above the GPU's",
    ),
    pytest.param(
        "version: v1\nflags: {migStrategy: single}\n",
        MIG_HALF,
        {},
        "migStrategy single: GPUs 0, 1 have MIG enabled and GPUs 2, 3, 4, 5, 6, 7 do not; "
        "enable MIG on every GPU or use migStrategy mixed",
        id="single with MIG and full GPUs",
    ),
    pytest.param(
        "version: v1\nflags: {migStrategy: single}\n",
        MIG_EMPTY,
        {},
        "migStrategy single: GPUs 0 have MIG enabled but no MIG devices",
        id="single with an empty MIG GPU",
    ),
    pytest.param(
        "version: v1\nflags: {migStrategy: single}\n",
        MIG_TWO_PROFILES,
        {},
        "migStrategy single needs one MIG profile on the whole node, found 1g.5gb on GPUs "
        "1, 2, 3, 4, 5, 6, 7; 2g.10gb on GPUs 0; use migStrategy mixed",
        id="single with two profiles",
    ),
]


@pytest.mark.parametrize(("text", "inventory", "env", "message"), PLAN_ERRORS)
def test_plan_errors(text: str, inventory: Inventory, env: dict[str, str], message: str) -> None:
    config = cfg(text, **env)
    with pytest.raises(PlanError, match="^" + re.escape(message)):
        build_plan(inventory, config)


@pytest.mark.parametrize(
    ("section", "entry", "expected"),
    [
        pytest.param("", "", False, id="time-slicing default"),
        pytest.param("    failRequestsGreaterThanOne: true\n", "", True, id="section value"),
        pytest.param(
            "    failRequestsGreaterThanOne: true\n",
            ", failRequestsGreaterThanOne: false",
            False,
            id="entry wins",
        ),
        pytest.param("", ", failRequestsGreaterThanOne: true", True, id="entry only"),
    ],
)
def test_fail_requests_per_resource(section: str, entry: str, expected: bool) -> None:
    plan = plan_of(shared("timeSlicing", f"{{name: gpu, replicas: 2{entry}}}", section=section))
    assert plan.resources[0].fail_requests_greater_than_one is expected


def test_entries_of_one_resource_must_agree_on_fail_requests() -> None:
    text = shared(
        "timeSlicing",
        "{name: gpu, devices: [0, 1, 2, 3], replicas: 2, failRequestsGreaterThanOne: true}",
        "{name: gpu, devices: [4, 5, 6, 7], replicas: 4}",
    )
    with pytest.raises(
        PlanError,
        match=re.escape(
            "sharing.timeSlicing.resources[0] and sharing.timeSlicing.resources[1] both serve "
            '"nvidia.com/gpu" but disagree on failRequestsGreaterThanOne'
        ),
    ):
        plan_of(text)
