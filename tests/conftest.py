"""Shared fixtures: simulated nodes, the NVML adapter over them, their inventories, and a kubelet.

The simulated NVML is injected as the library object (`Nvml(SimNvml(state_dir))`), never patched
in. Each fixture call creates a fresh state directory under the test's tmp_path.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sharing.devices import Inventory
from sharing.errors import NvmlUnavailable
from sharing.nvml import Nvml, nvml_session, read_inventory
from sharing.nvml.sim import SimNvml, create_state
from tests.fakes.kubelet import FakeKubelet
from tests.fakes.sockets import short_dir


@pytest.fixture(autouse=True)
def no_host_side_effects(monkeypatch: pytest.MonkeyPatch) -> None:
    """`gpushare run` in a test (in process or a child) serves no metrics port and writes no
    labels file unless the test asks (a flag wins over these variables): no port clash with
    another run, nothing written under /etc."""
    monkeypatch.setenv("METRICS_ADDRESS", "")
    monkeypatch.setenv("GFD_OUTPUT_FILE", "")


@pytest.fixture
def kubelet_dir() -> Iterator[Path]:
    """A short kubelet directory under /tmp (unix socket paths are limited to ~107 bytes)."""
    with short_dir() as path:
        yield path


@pytest.fixture
def mps_root() -> Iterator[Path]:
    """A short, absolute mpsRoot under /tmp for MPS control daemons (the stand-in's sockets),
    0755 as MPS servers of clients that are not root need it."""
    with short_dir("gs-mps-") as path:
        path.chmod(0o755)
        yield path


@pytest.fixture
def kubelet(kubelet_dir: Path) -> Iterator[FakeKubelet]:
    """The kubelet stand-in serving kubelet.sock in `kubelet_dir`."""
    fake = FakeKubelet(kubelet_dir)
    yield fake
    fake.stop()


@pytest.fixture
def sim_state(tmp_path: Path) -> Callable[..., Path]:
    """Factory: `sim_state("dgx-a100") -> Path`, a fresh state directory of a node."""
    made: list[Path] = []

    def make(node: str | Path = "dgx-a100") -> Path:
        slug = re.sub(r"[^A-Za-z0-9.-]+", "-", Path(str(node)).stem)
        path = tmp_path / f"sim-{slug}-{len(made)}"
        made.append(create_state(node, path))
        return path

    return make


@pytest.fixture
def sim_nvml(sim_state: Callable[..., Path]) -> Iterator[Callable[..., tuple[Nvml, Path]]]:
    """Factory: `sim_nvml("dgx-a100") -> (Nvml, state_dir)`, initialised; shut down after."""
    opened: list[Nvml] = []

    def make(node: str | Path = "dgx-a100", state_dir: Path | None = None) -> tuple[Nvml, Path]:
        path = state_dir if state_dir is not None else sim_state(node)
        nvml = Nvml(SimNvml(path))
        nvml.init()
        opened.append(nvml)
        return nvml, path

    yield make
    for nvml in opened:
        nvml.shutdown()


@pytest.fixture
def inventory_of(sim_nvml: Callable[..., tuple[Nvml, Path]]) -> Callable[..., Inventory]:
    """Factory: `inventory_of("dgx-a100") -> Inventory` of a fresh simulated node."""

    def make(node: str | Path = "dgx-a100") -> Inventory:
        nvml, _ = sim_nvml(node)
        return read_inventory(nvml)

    return make


@pytest.fixture(scope="module")
def real_nvml() -> Iterator[Nvml]:
    """The adapter over the real pynvml (`gpu` tests); skips when NVML cannot be initialised."""
    import pynvml

    try:
        with nvml_session(pynvml) as nvml:
            yield nvml
    except NvmlUnavailable as err:
        pytest.skip(f"no NVIDIA GPU/driver: {err}")

