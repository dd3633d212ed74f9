"""Host files NVML does not answer: a GPU's NUMA node (sysfs) and MIG capability minors (procfs).

Both are read under a root directory: `/` on a real node, the state directory's `host/` for a
simulated one (the simulator writes the same files there), so the reading code is the same.
"""

from __future__ import annotations

import os
from pathlib import Path

MIG_MINORS = "proc/driver/nvidia-caps/mig-minors"


def sysfs_bus_id(pci_bus_id: str) -> str:
    """NVML's `00000000:07:00.0` as sysfs names it: `0000:07:00.0` (4+ hex domain, lower case)."""
    domain, _, rest = pci_bus_id.partition(":")
    return f"{int(domain, 16):04x}:{rest.lower()}"


class HostFiles:
    """Reads NUMA nodes and MIG capability minors under `root`."""

    def __init__(self, root: Path = Path("/")) -> None:
        self.root = Path(root)
        self._minors_key: tuple[int, int] | None = None
        self._minors: dict[str, int] = {}

    def numa_node(self, pci_bus_id: str) -> int | None:
        """NUMA node of a PCI device; None when sysfs has no answer or says -1."""
        path = self.root / "sys/bus/pci/devices" / sysfs_bus_id(pci_bus_id) / "numa_node"
        try:
            value = int(path.read_text().strip())
        except (OSError, ValueError):
            return None
        return None if value < 0 else value

    def mig_minors(self) -> dict[str, int]:
        """`gpu<G>/gi<I>/access` and `gpu<G>/gi<I>/ci<C>/access` -> minor; {} without the file."""
        path = self.root / MIG_MINORS
        try:
            st = os.stat(path)
        except OSError:
            return {}
        key = (st.st_mtime_ns, st.st_size)
        if key != self._minors_key:
            minors = {}
            for line in path.read_text().splitlines():
                name, _, minor = line.rpartition(" ")
                if name and minor.isdigit():
                    minors[name] = int(minor)
            self._minors, self._minors_key = minors, key
        return self._minors

    def gi_minor(self, gpu_minor: int, gi: int) -> int | None:
        """Capability minor of a GI's access file."""
        return self.mig_minors().get(f"gpu{gpu_minor}/gi{gi}/access")

    def ci_minor(self, gpu_minor: int, gi: int, ci: int) -> int | None:
        """Capability minor of a CI's access file."""
        return self.mig_minors().get(f"gpu{gpu_minor}/gi{gi}/ci{ci}/access")
