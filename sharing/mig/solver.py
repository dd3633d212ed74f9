"""Placement solver (facts §6.3): a multiset of profiles -> explicit, non-overlapping placements.

A GPU instance occupies memory slots [start, start+size); instances must not overlap; each profile
has allowed starts and a maximum count. `place` searches every combination of allowed starts (the
space is tiny: at most 8 slots), so it finds a placement whenever one exists, and among them the
one that keeps the most instances the GPU already has. When none exists, `Unplaceable` says why:
which requested instances conflict (a minimal conflicting subset) and on which slots.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from itertools import combinations

from sharing.mig.layout import Placement, slot_ranges
from sharing.nvml.profiles import MigProfile

_TIMES = {2: "twice", 3: "three times"}


class Unplaceable(ValueError):
    """The requested profiles do not fit on the GPU; the message says why (no GPU label)."""


def slot_count(profiles: Sequence[MigProfile]) -> int:
    """Memory slots of a GPU, from its profiles' placements (8 on A100/H100/H200, 4 on A30)."""
    return max((s + p.size for p in profiles for s in p.starts), default=0)


def place(
    request: Sequence[tuple[MigProfile, int]], keep: Collection[Placement] = ()
) -> tuple[Placement, ...]:
    """Placements for `count` instances of each profile, keeping as many of `keep` as possible.

    Raises:
        Unplaceable: a profile's count is over its maximum, or the profiles cannot be placed
            without overlap; the message names the profiles, slots and allowed starts.
    """
    request = [(p, n) for p, n in request if n > 0]
    for profile, count in request:
        alone = _most_disjoint(profile)
        if count > alone:
            raise Unplaceable(_no_fit_message([profile] * (alone + 1)))
        if count > profile.max_count:
            raise Unplaceable(
                f"{profile.name}: {count} requested but the profile allows at most "
                f"{profile.max_count} per GPU"
            )
    found = _Search(request, keep).best()
    if found is None:
        items = [p for p, n in request for _ in range(n)]
        raise Unplaceable(_no_fit_message(_minimal_conflict(items)))
    return tuple(sorted(found))


def fits(items: Sequence[MigProfile]) -> bool:
    """Whether these GPU instances (one entry per instance) can all be placed at once."""
    request: dict[MigProfile, int] = {}
    for profile in items:
        request[profile] = request.get(profile, 0) + 1
    if any(n > p.max_count for p, n in request.items()):
        return False
    return _Search(list(request.items()), ()).best() is not None


class _Search:
    """Depth-first search over combinations of allowed starts, biggest profiles first."""

    def __init__(
        self, request: Sequence[tuple[MigProfile, int]], keep: Collection[Placement]
    ) -> None:
        self.request = sorted(request, key=lambda pn: (-pn[0].size, len(pn[0].starts)))
        self.keep = {(p.profile, p.start) for p in keep}
        # Most kept placements still reachable from each position of the request.
        reachable = [
            min(n, sum(1 for s in p.starts if (p.name, s) in self.keep)) for p, n in self.request
        ]
        self.bound_after = [sum(reachable[i:]) for i in range(len(reachable) + 1)]
        self.best_score = -1
        self.best_found: list[Placement] | None = None

    def best(self) -> list[Placement] | None:
        self._visit(0, 0, [], 0)
        return self.best_found

    def _visit(self, i: int, used: int, chosen: list[Placement], score: int) -> bool:
        """Explore from request position i; True once the best possible score is reached."""
        if score + self.bound_after[i] <= self.best_score:
            return False
        if i == len(self.request):
            self.best_score, self.best_found = score, list(chosen)
            return score == self.bound_after[0]
        profile, count = self.request[i]
        free = [s for s in profile.starts if not used & _mask(s, profile.size)]
        # Kept starts first, so the first complete placement is already a good one.
        free.sort(key=lambda s: ((profile.name, s) not in self.keep, s))
        for starts in combinations(free, count):
            mask = 0
            for s in starts:
                bits = _mask(s, profile.size)
                if mask & bits:
                    break
                mask |= bits
            else:
                gained = sum(1 for s in starts if (profile.name, s) in self.keep)
                chosen += [Placement(s, profile.size, profile.name) for s in starts]
                done = self._visit(i + 1, used | mask, chosen, score + gained)
                del chosen[len(chosen) - count :]
                if done:
                    return True
        return False


def _mask(start: int, size: int) -> int:
    return ((1 << size) - 1) << start


def _most_disjoint(profile: MigProfile) -> int:
    """How many instances of this profile alone fit side by side (same size: greedy is exact)."""
    count, end = 0, -1
    for start in sorted(profile.starts):
        if start >= end:
            count, end = count + 1, start + profile.size
    return count


def _minimal_conflict(items: list[MigProfile]) -> list[MigProfile]:
    """A subset of `items` that does not fit but fits after removing any one of its members."""
    conflict = list(items)
    for i in range(len(conflict) - 1, -1, -1):
        trial = conflict[:i] + conflict[i + 1 :]
        if not fits(trial):
            conflict = trial
    return conflict


def _items(items: Sequence[MigProfile]) -> str:
    """`4g.20gb + 4g.20gb`, `1g.5gb x 8 + 2g.10gb`: instances in request order."""
    order: list[MigProfile] = []
    for p in items:
        if p not in order:
            order.append(p)
    parts = []
    for p in order:
        n = sum(1 for q in items if q == p)
        parts += [p.name] * n if n <= 2 else [f"{p.name} x {n}"]
    return " + ".join(parts)


def _starts(profile: MigProfile) -> str:
    starts = sorted(profile.starts)
    return f"slot {starts[0]}" if len(starts) == 1 else "slots " + ", ".join(map(str, starts))


def _no_fit_message(conflict: Sequence[MigProfile]) -> str:
    """Why these instances cannot share the GPU, naming the slots they compete for."""
    distinct: list[MigProfile] = []
    for p in conflict:
        if p not in distinct:
            distinct.append(p)
    only = distinct[0]
    if len(distinct) == 1 and len(only.starts) == 1:
        times = _TIMES.get(len(conflict), f"{len(conflict)} times")
        reason = f"needs {slot_ranges(only.slots(only.starts[0]))} {times}"
    else:
        reachable = {slot for p in distinct for s in p.starts for slot in p.slots(s)}
        needed = sum(p.size for p in conflict)
        if needed > len(reachable):
            reason = f"needs {needed} slots but can only use {slot_ranges(reachable)}"
        else:
            reason = "cannot be placed without overlapping"
    allowed = ", ".join(
        f"{p.name} can only start at {_starts(p)}" if i == 0 else f"{p.name} at {_starts(p)}"
        for i, p in enumerate(distinct)
    )
    return f"{_items(conflict)} {reason}; {allowed}"
