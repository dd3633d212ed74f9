"""MIG state reading against the real pynvml (tests marked `gpu`); read-only: nothing is changed.

On a real node: every GPU's MIG state reads, a MIG-capable GPU lists its profiles (from NVML, or
from the card table when the driver lists no placements with MIG off), the profiles of a known
card match facts §6.3, and the node's exported layout plans with no change (export round-trips).
"""

from __future__ import annotations

from collections.abc import Iterator

import pynvml
import pytest

from sharing.errors import NvmlUnavailable
from sharing.mig import export_config
from sharing.nvml import Nvml, nvml_session
from sharing.nvml.mig_apply import plan_mig
from sharing.nvml.mig_state import read_node_mig_state
from sharing.nvml.profiles import card_by_pci_id


@pytest.fixture(scope="module")
def real_nvml() -> Iterator[Nvml]:
    """The adapter over the real pynvml; skips when NVML cannot be initialised."""
    try:
        with nvml_session(pynvml) as nvml:
            yield nvml
    except NvmlUnavailable as err:
        pytest.skip(f"no NVIDIA GPU/driver: {err}")


@pytest.mark.gpu
def test_real_mig_state_reads_and_exports_without_change(real_nvml: Nvml) -> None:
    states = read_node_mig_state(real_nvml)
    assert states
    for state in states:
        assert state.uuid.startswith("GPU-")
        assert not state.lost_reason
        if not state.mig_capable:
            continue
        assert state.profiles, f"{state.label}: MIG capable but no profiles read"
        card = card_by_pci_id(state.pci_device_id)
        if card is not None:
            assert {(p.name, p.size, p.max_count, p.starts) for p in state.profiles} == \
                {(p.name, p.size, p.max_count, p.starts) for p in card.profiles}
        assert all(gi.placement.size > 0 for gi in state.instances)
    plan = plan_mig(real_nvml, export_config(states), None)
    assert plan.changed_gpus == ()
