"""`0-3, 6`: integers (GPU indices, memory slots) written as runs, as messages show them."""

from __future__ import annotations

from collections.abc import Iterable


def index_ranges(numbers: Iterable[int], sep: str = ", ") -> str:
    """`0-3, 6` for {0, 1, 2, 3, 6}; duplicates are dropped and the order does not matter."""
    runs: list[list[int]] = []
    for n in sorted(set(numbers)):
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return sep.join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
