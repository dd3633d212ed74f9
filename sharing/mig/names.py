"""MIG profile names as mig-parted files write them, resolved against one GPU's own profiles.

Grammar (facts §6.2): `[<C>c.]<G>g.<GB>gb[+attr[,attr]|-attr]` with attrs `me`, `me.all`, `gfx`.
A name means nothing on its own: `1g.10gb` is the 1-slice profile of an H100-80GB and the 2-slot
REV2 profile of an A100-40GB, so a name is only ever looked up in the profile list NVML reports
for the GPU at hand (`resolve`), never in a global table.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from sharing.nvml.profiles import MigProfile

PLUS_ATTRS = ("me", "me.all", "gfx")
MINUS_ATTRS = ("me",)
MAX_NAME_CHARS = 64
_NAME = re.compile(
    r"(?:(?P<c>[1-9][0-9]?)c\.)?(?P<g>[1-9][0-9]?)g\.(?P<gb>[1-9][0-9]{0,3})gb"
    r"(?:\+(?P<plus>[a-z.]+(?:,[a-z.]+)*)|-(?P<minus>[a-z.]+))?"
)


@dataclass(frozen=True)
class ProfileName:
    """A parsed profile name; `name` is the canonical GI profile name it asks for."""

    text: str  # as written in the file
    slices: int  # G
    memory_gb: int  # GB
    ci_slices: int | None  # C, when written
    attrs: str  # "" or "+me", "+me.all", "+gfx", "+me,gfx", "-me"

    @property
    def name(self) -> str:
        """`<G>g.<GB>gb[attrs]`, the name NVML's profile list uses for the GPU instance."""
        return f"{self.slices}g.{self.memory_gb}gb{self.attrs}"

    @property
    def partial_compute(self) -> bool:
        """Whether it asks for a compute instance smaller than its GPU instance (`1c.3g.20gb`)."""
        return self.ci_slices is not None and self.ci_slices != self.slices


def parse_profile_name(text: str) -> ProfileName:
    """Parse one profile name.

    Raises:
        ValueError: the text does not follow the grammar; the message says what is allowed.
    """
    shown = text if len(text) <= MAX_NAME_CHARS else text[:MAX_NAME_CHARS] + "…"
    match = _NAME.fullmatch(text) if len(text) <= MAX_NAME_CHARS else None
    if match is None:
        raise ValueError(
            f"malformed MIG profile {shown!r}: expected [<C>c.]<G>g.<GB>gb[+attr|-attr], "
            "e.g. 1g.5gb, 3g.20gb, 1g.10gb+me, 1c.3g.20gb"
        )
    plus, minus = match["plus"], match["minus"]
    attrs = ""
    if plus is not None:
        parts = plus.split(",")
        bad = [a for a in parts if a not in PLUS_ATTRS]
        if bad or len(set(parts)) != len(parts):
            raise ValueError(
                f"malformed MIG profile {shown!r}: unknown or repeated attribute "
                f"'+{plus}' (allowed: +me, +me.all, +gfx)"
            )
        attrs = "+" + ",".join(parts)
    elif minus is not None:
        if minus not in MINUS_ATTRS:
            raise ValueError(
                f"malformed MIG profile {shown!r}: unknown attribute '-{minus}' (allowed: -me)"
            )
        attrs = f"-{minus}"
    c = int(match["c"]) if match["c"] else None
    g = int(match["g"])
    if c is not None and c > g:
        raise ValueError(
            f"malformed MIG profile {shown!r}: a compute instance of {c} slices does not fit "
            f"a GPU instance of {g}"
        )
    return ProfileName(text, g, int(match["gb"]), c, attrs)


def resolve(name: ProfileName, profiles: Sequence[MigProfile]) -> MigProfile | None:
    """The GPU instance profile `name` means among this GPU's profiles, or None."""
    wanted = name.name
    return next((p for p in profiles if p.name == wanted), None)


def profile_names(profiles: Sequence[MigProfile]) -> str:
    """The GPU's valid profile names, for messages: `1g.5gb, 1g.5gb+me, ...`."""
    ordered = sorted(profiles, key=lambda p: (p.slices, p.memory_mib, p.name))
    return ", ".join(p.name for p in ordered) or "none"
