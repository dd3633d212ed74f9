"""The simulated NVML with a gate on GPU instance creation, at the pynvml boundary.

`GatedSim(state_dir)` is a SimNvml (so the daemon treats it as a simulated node) whose
`nvmlDeviceCreateGpuInstanceWithPlacement` can, on one GPU and its n-th call there:
- pause until the test calls `release()` (`pause_at(gpu, n)`; `paused` is set meanwhile), so a
  test can act while an apply is half-way;
- raise the real `pynvml.NVMLError` for an NVML return code (`fail_at(gpu, n, code)`), as a
  driver refusing one instance would.
"""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

import pynvml

from sharing.nvml.sim import SimNvml, handles


class GatedSim(SimNvml):
    """SimNvml whose GPU instance creation can pause or fail on a chosen GPU and call."""

    def __init__(self, state_dir: Path) -> None:
        super().__init__(state_dir)
        self._calls: Counter[int] = Counter()
        self._pause: tuple[int, int] | None = None
        self._fail: tuple[int, int, int] | None = None
        self.paused = threading.Event()
        self._released = threading.Event()

    def pause_at(self, gpu: int, call: int) -> None:
        """Pause the `call`-th GI creation on `gpu` (1-based) until release()."""
        self._pause = (gpu, call)

    def fail_at(self, gpu: int, call: int, code: int) -> None:
        """Fail the `call`-th GI creation on `gpu` (1-based) with NVML return `code`."""
        self._fail = (gpu, call, code)

    def release(self) -> None:
        """Let a paused creation go on."""
        self._released.set()

    def nvmlDeviceCreateGpuInstanceWithPlacement(
        self, device: object, profileId: int, placement: object
    ) -> object:
        """The simulator's call, gated."""
        gpu = handles.decode_device(device).gpu
        self._calls[gpu] += 1
        if self._pause == (gpu, self._calls[gpu]):
            self.paused.set()
            if not self._released.wait(30):
                raise AssertionError("the paused GI creation was never released")
        if self._fail is not None and self._fail[:2] == (gpu, self._calls[gpu]):
            raise pynvml.NVMLError(self._fail[2])
        return super().nvmlDeviceCreateGpuInstanceWithPlacement(device, profileId, placement)
