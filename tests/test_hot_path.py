"""Allocate and GetPreferredAllocation answer from the Plan in memory: no NVML call, no file opened.

The daemon runs in this process on a simulated node, its NVML library wrapped by a recorder at
the pynvml boundary, and a process-wide audit hook records every file opened. Only what happens
inside the two gRPC handlers counts: the health monitor may call NVML on its own thread.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

from plugin.daemon.core import Daemon
from sharing.nvml import load_library
from sharing.nvml.sim import create_state
from tests.fakes.kubelet import FakeKubelet
from tests.fakes.sockets import short_dir

HOT = {"Allocate", "GetPreferredAllocation"}
CONFIG = """\
version: v1
flags:
  plugin:
    passDeviceSpecs: true
    deviceListStrategy: [envvar, volume-mounts, cdi-annotations, cdi-cri]
sharing:
  timeSlicing:
    resources:
      - name: nvidia.com/gpu
        replicas: 4
"""


class HotPathRecorder:
    """Records NVML calls and file opens made while a hot gRPC handler is on the stack."""

    def __init__(self) -> None:
        self.nvml_calls: list[str] = []
        self.opens: list[str] = []
        self.armed = threading.Event()

    @staticmethod
    def in_handler(frame: FrameType | None) -> bool:
        while frame is not None:
            if frame.f_code.co_name in HOT and "plugin" in frame.f_code.co_filename:
                return True
            frame = frame.f_back
        return False

    def audit(self, event: str, args: tuple[Any, ...]) -> None:
        if event == "open" and self.armed.is_set() and self.in_handler(sys._getframe(1)):
            self.opens.append(str(args[0]))


class RecordingLibrary:
    """The simulated pynvml module, with every function call noted when made from a handler."""

    def __init__(self, lib: Any, recorder: HotPathRecorder) -> None:
        self._lib = lib
        self._recorder = recorder

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._lib, name)
        if not callable(value) or not name.startswith("nvml"):
            return value
        recorder = self._recorder

        def recorded(*args: Any, **kwargs: Any) -> Any:
            if recorder.armed.is_set() and recorder.in_handler(sys._getframe(1)):
                recorder.nvml_calls.append(name)
            return value(*args, **kwargs)

        return recorded


_RECORDER = HotPathRecorder()
sys.addaudithook(_RECORDER.audit)


@pytest.fixture
def daemon_and_kubelet(tmp_path: Path) -> Iterator[tuple[Daemon, FakeKubelet]]:
    state = create_state("dgx-a100", tmp_path / "node")
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG)
    with short_dir() as kubelet_dir:
        kubelet = FakeKubelet(kubelet_dir)
        daemon = Daemon(
            config_path=config,
            kubelet_dir=kubelet_dir,
            nvml_lib=RecordingLibrary(load_library(str(state)), _RECORDER),
            env={},
            overrides={},
        )
        daemon.start()
        try:
            yield daemon, kubelet
        finally:
            _RECORDER.armed.clear()
            daemon.stop()
            kubelet.stop()


def test_recorder_sees_nvml_calls_and_opens_made_in_a_handler() -> None:
    """The detector itself works: a call from a function named Allocate in plugin/ is caught."""
    recorder = HotPathRecorder()
    lib = RecordingLibrary(load_library("laptop"), recorder)
    lib.nvmlInit()
    recorder.armed.set()
    code = compile(
        "def Allocate(lib, path):\n    lib.nvmlDeviceGetCount()\n    open(path).close()\n",
        "plugin/fake_server.py",
        "exec",
    )
    namespace: dict[str, Any] = {}
    exec(code, namespace)  # noqa: S102
    previous = list(_RECORDER.opens)
    _RECORDER.armed.set()
    try:
        namespace["Allocate"](lib, __file__)
    finally:
        _RECORDER.armed.clear()
    lib.nvmlShutdown()
    assert recorder.nvml_calls == ["nvmlDeviceGetCount"]
    assert _RECORDER.opens[len(previous):][-1] == __file__
    _RECORDER.opens[:] = previous


def test_allocate_and_preferred_allocation_touch_neither_nvml_nor_disk(
    daemon_and_kubelet: tuple[Daemon, FakeKubelet],
) -> None:
    _daemon, kubelet = daemon_and_kubelet
    kubelet.wait_for_list("nvidia.com/gpu", lambda lst: len(lst.devices) == 32)
    _RECORDER.nvml_calls.clear()
    _RECORDER.opens.clear()
    _RECORDER.armed.set()
    for size in (1, 2, 4):
        allocation = kubelet.allocate("nvidia.com/gpu", size, container_count=2)
        assert len(allocation.response.container_responses) == 2
        first = allocation.response.container_responses[0]
        assert first.envs["NVIDIA_VISIBLE_DEVICES"]
        assert len(first.cdi_devices) >= 1
    _RECORDER.armed.clear()
    assert _RECORDER.nvml_calls == []
    assert _RECORDER.opens == []
