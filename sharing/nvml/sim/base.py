"""Shared plumbing of the simulated NVML: init state, handle resolution, state access."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pynvml

from sharing.nvml.profiles import CardModel
from sharing.nvml.sim import handles
from sharing.nvml.sim.engine import fail
from sharing.nvml.sim.spec import NodeSpec, load_node_file, mig_device_uuid, switch_bus_id
from sharing.nvml.sim.state import HOST_DIR, NODE_FILE, State, StateStore


class Target:
    """A resolved device handle: the GPU index, its state, card, and the MIG (GI, CI) if any."""

    __slots__ = ("index", "gpu", "card", "gi", "ci")

    def __init__(
        self,
        index: int,
        gpu: dict[str, Any],
        card: CardModel,
        gi: dict[str, Any] | None = None,
        ci: dict[str, Any] | None = None,
    ) -> None:
        self.index = index
        self.gpu = gpu
        self.card = card
        self.gi = gi
        self.ci = ci

    @property
    def is_mig(self) -> bool:
        """Whether the handle names a MIG device."""
        return self.gi is not None


class SimBase:
    """Node description, state store and the helpers every simulated NVML call uses."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self.spec: NodeSpec = load_node_file(self.state_dir / NODE_FILE)
        self.store = StateStore(self.state_dir)
        self.host_root = self.state_dir / HOST_DIR
        self._init_count = 0
        self._event_sets: dict[int, Any] = {}
        self._next_event_set = 1
        self._cards = [self.spec.card(i) for i in range(len(self.spec.gpus))]
        self._uuids = [self.spec.gpu_uuid(i) for i in range(len(self.spec.gpus))]
        self._links = [self._link_table(i) for i in range(len(self.spec.gpus))]

    def _link_table(self, index: int) -> list[str | None]:
        """Remote PCI bus id of each NVLink of GPU `index` (None: link not connected)."""
        remotes: list[str | None] = []
        if self.spec.nvswitch is not None:
            for switch, count in enumerate(self.spec.nvswitch.links_per_switch):
                remotes.extend([switch_bus_id(switch)] * count)
        for a, b, count in self.spec.nvlink_pairs:
            if index in (a, b):
                peer = b if index == a else a
                remotes.extend([self.spec.gpus[peer].bus_id] * count)
        limit = self._cards[index].nvlink_links
        return remotes + [None] * (limit - len(remotes))

    def _state(self) -> State:
        if self._init_count == 0:
            fail(pynvml.NVML_ERROR_UNINITIALIZED)
        return self.store.read()

    @contextlib.contextmanager
    def _mutating(self) -> Iterator[State]:
        if self._init_count == 0:
            fail(pynvml.NVML_ERROR_UNINITIALIZED)
        with self.store.mutate() as state:
            yield state

    def _resolve(self, state: State, handle: object, *, alive: bool = True) -> Target:
        """Resolve a device handle; GPU_IS_LOST for a lost GPU unless `alive` is False."""
        ref = handles.decode_device(handle)
        if ref.gpu >= len(state["gpus"]):
            fail(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        gpu = state["gpus"][ref.gpu]
        if alive and gpu["lost"]:
            fail(pynvml.NVML_ERROR_GPU_IS_LOST)
        target = Target(ref.gpu, gpu, self._cards[ref.gpu])
        if ref.is_mig:
            for gi in gpu["gis"]:
                for ci in gi["cis"]:
                    if gi["id"] == ref.gi and ci["id"] == ref.ci:
                        target.gi, target.ci = gi, ci
            if target.gi is None:
                fail(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return target

    def _device(self, handle: object, *, alive: bool = True) -> Target:
        return self._resolve(self._state(), handle, alive=alive)

    def _gpu_only(self, handle: object, *, alive: bool = True) -> Target:
        target = self._device(handle, alive=alive)
        if target.is_mig:
            fail(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return target

    def _mig_uuid(self, index: int, gi: int, ci: int) -> str:
        return mig_device_uuid(self._uuids[index], gi, ci)

    def _gi_of(self, state: State, handle: object) -> tuple[int, dict[str, Any]]:
        """GPU index and GI entry behind a GI handle."""
        ref = handles.decode_gpu_instance(handle)
        if ref.gpu >= len(state["gpus"]):
            fail(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        gpu = state["gpus"][ref.gpu]
        if gpu["lost"]:
            fail(pynvml.NVML_ERROR_GPU_IS_LOST)
        for gi in gpu["gis"]:
            if gi["id"] == ref.gi:
                return ref.gpu, gi
        fail(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        raise AssertionError  # unreachable
