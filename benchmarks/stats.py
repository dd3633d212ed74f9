"""Figures: what was measured, where, how many runs, median and p99."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path


def percentile(samples: list[float], q: float) -> float:
    """The q-th percentile (0..100) by nearest rank on the sorted samples."""
    if not samples:
        raise ValueError("no samples")
    ordered = sorted(samples)
    rank = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[rank]


@dataclass(frozen=True)
class Figure:
    """One measured quantity with its distribution and target."""

    name: str
    node: str
    unit: str
    runs: int
    median: float
    p99: float
    target: str = ""
    met: bool | None = None
    detail: str = ""
    extra: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_samples(
        cls,
        name: str,
        node: str,
        unit: str,
        samples: list[float],
        *,
        target_median: float | None = None,
        target_p99: float | None = None,
        target_text: str = "",
        detail: str = "",
    ) -> Figure:
        """Summarise samples; a target is met when every given bound holds."""
        median = statistics.median(samples)
        p99 = percentile(samples, 99)
        met: bool | None = None
        if target_median is not None or target_p99 is not None:
            met = (target_median is None or median < target_median) and (
                target_p99 is None or p99 < target_p99
            )
        return cls(name, node, unit, len(samples), median, p99, target_text, met, detail)


def render_table(figures: list[Figure]) -> str:
    """A fixed-width table of the figures."""
    headers = ("measurement", "node", "runs", "median", "p99", "target", "met")
    rows = [
        (
            f.name,
            f.node,
            str(f.runs),
            f"{f.median:.3f} {f.unit}",
            f"{f.p99:.3f} {f.unit}",
            f.target or "-",
            {True: "yes", False: "NO", None: "-"}[f.met],
        )
        for f in figures
    ]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)


def write_json(figures: list[Figure], path: Path, meta: dict[str, object]) -> None:
    """Write the figures and run metadata as JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta, "figures": [asdict(f) for f in figures]}
    path.write_text(json.dumps(payload, indent=2) + "\n")
