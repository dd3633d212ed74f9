"""The MIG rules of facts §6.3 as the simulated NVML enforces them, over one GPU's state dict.

Every refusal raises the real `pynvml.NVMLError` subclass the hardware answers with:
- a profile the card lacks, a start the profile does not allow: NVML_ERROR_INVALID_ARGUMENT
- overlapping slots, more GIs of a profile than its maximum, no room:
  NVML_ERROR_INSUFFICIENT_RESOURCES
- destroying a GI that still has CIs, or a GI/CI with running processes: NVML_ERROR_IN_USE
- MIG calls on a GPU without MIG (capability or current mode): NVML_ERROR_NOT_SUPPORTED
Without an explicit placement the driver picks the highest free allowed start, which is why some
creation orders fail where explicit placements succeed (facts §6.3: the 3g of 3g+2g+1g+1g first).

MIG mode (the simulator's model of "needs a reset"): a mode change with no processes on the GPU is
applied at once and wipes the GI/CI layout, as the reset NVML performs does. With processes
running, Ampere (A100, A30) records the new mode as *pending* and reports activation status
NVML_ERROR_IN_USE; `reset_gpu` applies it. Hopper and later refuse with NVML_ERROR_IN_USE.
"""

from __future__ import annotations

from typing import Any

import pynvml

from sharing.nvml.profiles import CardModel, MigProfile, gpu_instance_id
from sharing.nvml.sim import recovery

_CI_SIZES = (1, 2, 3, 4, 7)
GpuState = dict[str, Any]


def fail(code: int) -> None:
    """Raise the real pynvml exception class for an NVML return code."""
    raise pynvml.NVMLError(code)


def require_mig(card: CardModel, gpu: GpuState) -> None:
    """Refuse MIG operations on a GPU without MIG capability or with MIG mode off."""
    if not card.mig_capable or not gpu["mig_current"]:
        fail(pynvml.NVML_ERROR_NOT_SUPPORTED)


def find_gi(gpu: GpuState, gi_id: int) -> dict[str, Any]:
    """The GI with this id; NVML_ERROR_NOT_FOUND if there is none."""
    for gi in gpu["gis"]:
        if gi["id"] == gi_id:
            return gi
    fail(pynvml.NVML_ERROR_NOT_FOUND)
    raise AssertionError  # unreachable


def find_ci(gi: dict[str, Any], ci_id: int) -> dict[str, Any]:
    """The CI with this id in a GI; NVML_ERROR_NOT_FOUND if there is none."""
    for ci in gi["cis"]:
        if ci["id"] == ci_id:
            return ci
    fail(pynvml.NVML_ERROR_NOT_FOUND)
    raise AssertionError  # unreachable


def _used_slots(card: CardModel, gpu: GpuState) -> set[int]:
    used: set[int] = set()
    for gi in gpu["gis"]:
        profile = card.profile_by_id(gi["profile_id"])
        assert profile is not None
        used.update(profile.slots(gi["start"]))
    return used


def _driver_start(profile: MigProfile, used: set[int]) -> int | None:
    for start in sorted(profile.starts, reverse=True):
        if used.isdisjoint(profile.slots(start)):
            return start
    return None


def create_gi(
    card: CardModel, gpu: GpuState, profile_id: int, start: int | None, size: int | None = None
) -> dict[str, Any]:
    """Create a GI (driver-chosen start when `start` is None); returns its state entry."""
    require_mig(card, gpu)
    profile = card.profile_by_id(profile_id)
    if profile is None:
        fail(pynvml.NVML_ERROR_INVALID_ARGUMENT)
    assert profile is not None
    if start is not None and (start not in profile.starts or size not in (None, profile.size)):
        fail(pynvml.NVML_ERROR_INVALID_ARGUMENT)
    if sum(1 for gi in gpu["gis"] if gi["profile_id"] == profile_id) >= profile.max_count:
        fail(pynvml.NVML_ERROR_INSUFFICIENT_RESOURCES)
    used = _used_slots(card, gpu)
    if start is None:
        start = _driver_start(profile, used)
        if start is None:
            fail(pynvml.NVML_ERROR_INSUFFICIENT_RESOURCES)
    assert start is not None
    if not used.isdisjoint(profile.slots(start)):
        fail(pynvml.NVML_ERROR_INSUFFICIENT_RESOURCES)
    gi = {
        "id": gpu_instance_id(card.mig_slots, start, profile.size),
        "profile_id": profile_id,
        "start": start,
        "cis": [],
    }
    gpu["gis"].append(gi)
    gpu["gis"].sort(key=lambda entry: entry["id"])
    return gi


def _procs_on(gpu: GpuState, gi_id: int, ci_id: int | None = None) -> bool:
    return any(p["gi"] == gi_id and (ci_id is None or p["ci"] == ci_id) for p in gpu["procs"])


def destroy_gi(card: CardModel, gpu: GpuState, gi_id: int) -> None:
    """Destroy a GI; IN_USE while it has CIs or processes."""
    require_mig(card, gpu)
    gi = find_gi(gpu, gi_id)
    if gi["cis"] or _procs_on(gpu, gi_id):
        fail(pynvml.NVML_ERROR_IN_USE)
    gpu["gis"].remove(gi)


def ci_profiles(card: CardModel, gi: dict[str, Any]) -> dict[int, tuple[int, int, int]]:
    """CI profiles a GI offers: {CI profile index: (slices, instance count, SM count)}."""
    profile = card.profile_by_id(gi["profile_id"])
    assert profile is not None
    g = profile.slices
    out = {}
    for size in _CI_SIZES:
        if size <= g and (g % size == 0 or g in (3, 7)):
            index = _ci_index(size)
            out[index] = (size, g // size, profile.multiprocessor_count * size // g)
    return out


def _ci_index(size: int) -> int:
    return getattr(pynvml, f"NVML_COMPUTE_INSTANCE_PROFILE_{size}_SLICE")


def create_ci(card: CardModel, gpu: GpuState, gi_id: int, ci_profile_id: int) -> dict[str, Any]:
    """Create a CI of the given CI profile (ids equal indices) in a GI; returns its entry."""
    require_mig(card, gpu)
    gi = find_gi(gpu, gi_id)
    offered = ci_profiles(card, gi)
    if ci_profile_id not in offered:
        fail(pynvml.NVML_ERROR_INVALID_ARGUMENT)
    size, count, _ = offered[ci_profile_id]
    g = max(s for s, _, _ in offered.values())
    used = {slot for ci in gi["cis"] for slot in range(ci["start"], ci["start"] + ci["slices"])}
    same = sum(1 for ci in gi["cis"] if ci["profile_id"] == ci_profile_id)
    starts = [s for s in range(0, g - size + 1, size) if used.isdisjoint(range(s, s + size))]
    if same >= count or not starts:
        fail(pynvml.NVML_ERROR_INSUFFICIENT_RESOURCES)
    ids = {ci["id"] for ci in gi["cis"]}
    ci = {
        "id": min(set(range(len(ids) + 1)) - ids),
        "profile_id": ci_profile_id,
        "slices": size,
        "start": starts[0],
    }
    gi["cis"].append(ci)
    gi["cis"].sort(key=lambda entry: entry["id"])
    return ci


def destroy_ci(card: CardModel, gpu: GpuState, gi_id: int, ci_id: int) -> None:
    """Destroy a CI; IN_USE while processes run on it."""
    require_mig(card, gpu)
    gi = find_gi(gpu, gi_id)
    ci = find_ci(gi, ci_id)
    if _procs_on(gpu, gi_id, ci_id):
        fail(pynvml.NVML_ERROR_IN_USE)
    gi["cis"].remove(ci)


def set_mig_mode(card: CardModel, gpu: GpuState, mode: int) -> int:
    """Change MIG mode (see the module docstring); returns NVML's activation status."""
    if not card.mig_capable:
        fail(pynvml.NVML_ERROR_NOT_SUPPORTED)
    if mode not in (pynvml.NVML_DEVICE_MIG_DISABLE, pynvml.NVML_DEVICE_MIG_ENABLE):
        fail(pynvml.NVML_ERROR_INVALID_ARGUMENT)
    if gpu["mig_current"] == mode and gpu["mig_pending"] == mode:
        return pynvml.NVML_SUCCESS
    if gpu["procs"]:
        if not card.mig_needs_reset:
            fail(pynvml.NVML_ERROR_IN_USE)
        gpu["mig_pending"] = mode
        return pynvml.NVML_ERROR_IN_USE
    gpu["mig_current"] = gpu["mig_pending"] = mode
    gpu["gis"] = []
    return pynvml.NVML_SUCCESS


def reset(gpu: GpuState) -> None:
    """GPU reset: clear lost, recovery action; apply pending MIG mode; wipe GIs, CIs, processes."""
    gpu["lost"] = False
    gpu["lost_reason"] = ""
    gpu["recovery_action"] = recovery.ACTION_NONE
    gpu["mig_current"] = gpu["mig_pending"]
    gpu["gis"] = []
    gpu["procs"] = []


def mig_devices(gpu: GpuState) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(GI, CI) pairs in MIG device handle index order."""
    return [(gi, ci) for gi in gpu["gis"] for ci in gi["cis"]]
