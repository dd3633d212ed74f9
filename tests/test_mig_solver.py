"""Placement solver (facts §6.3), table-driven on A100-40GB, A100-80GB, H100-80GB, H200 and A30,
each case asserting the message; plus a randomized comparison with a brute-force search.

Cases name profiles by shape ("1g", "1g+me", "1g.2slot", "2g", "3g", "4g", "7g"); `{shape}` in a
message stands for that card's profile name. Plans go through `plan_config` on a one-GPU node
built from the card's table, so messages carry the GPU label as `gpushare mig plan` prints them.
"""

from __future__ import annotations

import re
from collections import Counter

import pynvml
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sharing.errors import MigPlanError
from sharing.mig import GpuMigState, Placement, parse_mig_parted, place, plan_config
from sharing.nvml.profiles import CARDS, CardModel, MigProfile

P = pynvml
SHAPES = {
    "1g": P.NVML_GPU_INSTANCE_PROFILE_1_SLICE,
    "1g+me": P.NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV1,
    "1g.2slot": P.NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV2,
    "2g": P.NVML_GPU_INSTANCE_PROFILE_2_SLICE,
    "2g+me": P.NVML_GPU_INSTANCE_PROFILE_2_SLICE_REV1,
    "3g": P.NVML_GPU_INSTANCE_PROFILE_3_SLICE,
    "4g": P.NVML_GPU_INSTANCE_PROFILE_4_SLICE,
    "7g": P.NVML_GPU_INSTANCE_PROFILE_7_SLICE,
}
EIGHT_SLOT_CARDS = ["A100-SXM4-40GB", "A100-SXM4-80GB", "H100-SXM5-80GB", "H200-SXM-141GB"]

EIGHT_SLOT_CASES = [
    pytest.param({"3g": 2}, None, id="3g+3g fills the GPU"),
    pytest.param({"3g": 2, "1g": 1},
                 "{3g} + {3g} + {1g} needs 9 slots but can only use slots 0-7; {3g} can only "
                 "start at slots 0, 4, {1g} at slots 0, 1, 2, 3, 4, 5, 6", id="3g+3g+1g invalid"),
    pytest.param({"4g": 1, "3g": 1}, None, id="4g+3g valid"),
    pytest.param({"4g": 2}, "{4g} + {4g} needs slots 0-3 twice; {4g} can only start at slot 0",
                 id="4g+4g invalid"),
    pytest.param({"4g": 1, "2g": 1, "1g": 1}, None, id="4g+2g+1g valid"),
    pytest.param({"4g": 1, "2g": 2},
                 "{4g} + {2g} + {2g} needs 8 slots but can only use slots 0-5; {4g} can only "
                 "start at slot 0, {2g} at slots 0, 2, 4", id="4g+2g+2g invalid"),
    pytest.param({"3g": 1, "2g": 2}, None, id="3g+2g+2g valid"),
    pytest.param({"3g": 1, "2g": 1, "1g": 2}, None, id="3g+2g+1g+1g valid"),
    pytest.param({"2g": 3, "1g": 1}, None, id="2gx3+1g valid"),
    pytest.param({"1g": 7}, None, id="1gx7 valid"),
    pytest.param({"1g": 8}, "{1g} x 8 needs 8 slots but can only use slots 0-6; {1g} can only "
                 "start at slots 0, 1, 2, 3, 4, 5, 6", id="1gx8 invalid: slot 7 unusable"),
    pytest.param({"7g": 1}, None, id="7g valid"),
    pytest.param({"7g": 1, "1g": 1}, "{7g} + {1g} needs 9 slots but can only use slots 0-7; "
                 "{7g} can only start at slot 0, {1g} at slots 0, 1, 2, 3, 4, 5, 6",
                 id="7g+1g invalid"),
    pytest.param({"7g": 2}, "{7g} + {7g} needs slots 0-7 twice; {7g} can only start at slot 0",
                 id="7g twice"),
    pytest.param({"1g+me": 1, "1g": 6}, None, id="1g+me beside six 1g"),
    pytest.param({"1g+me": 2}, "{1g+me}: 2 requested but the profile allows at most 1 per GPU",
                 id="1g+me over its maximum"),
    pytest.param({"1g.2slot": 4}, None, id="two-slot 1g x4 valid"),
    pytest.param({"1g.2slot": 5}, "{1g.2slot} x 5 needs 10 slots but can only use slots 0-7; "
                 "{1g.2slot} can only start at slots 0, 2, 4, 6", id="two-slot 1g x5 invalid"),
    pytest.param({"1g.2slot": 1, "3g": 1, "2g": 1}, None, id="two-slot 1g+3g+2g valid"),
    pytest.param({"3g": 3}, "{3g} x 3 needs 12 slots but can only use slots 0-7; {3g} can only "
                 "start at slots 0, 4", id="3g x3 invalid"),
    pytest.param({"2g": 4}, "{2g} x 4 needs 8 slots but can only use slots 0-5; {2g} can only "
                 "start at slots 0, 2, 4", id="2g x4 invalid: 2g never at 6"),
    pytest.param({"3g": 1, "2g": 1, "1g": 3},
                 "{3g} + {2g} + {1g} x 3 needs 9 slots but can only use slots 0-7; {3g} can only "
                 "start at slots 0, 4, {2g} at slots 0, 2, 4, {1g} at slots 0, 1, 2, 3, 4, 5, 6",
                 id="3g+2g+1gx3 invalid"),
    pytest.param({"4g": 1, "1g": 4}, "{4g} + {1g} x 4 needs 8 slots but can only use slots 0-6; "
                 "{4g} can only start at slot 0, {1g} at slots 0, 1, 2, 3, 4, 5, 6",
                 id="4g+1gx4 invalid: slot 7 unusable"),
    pytest.param({"2g": 3, "1g.2slot": 1}, None, id="2gx3 + two-slot 1g at 6"),
]  # fmt: skip

A30_CASES = [
    pytest.param({"1g": 4}, None, id="1gx4 valid"),
    pytest.param({"1g": 5}, "{1g} x 5 needs 5 slots but can only use slots 0-3; {1g} can only "
                 "start at slots 0, 1, 2, 3", id="1gx5 invalid"),
    pytest.param({"2g": 2}, None, id="2g+2g fills"),
    pytest.param({"2g": 1, "1g": 2}, None, id="2g+1g+1g valid"),
    pytest.param({"4g": 1}, None, id="4g valid"),
    pytest.param({"4g": 1, "1g": 1}, "{4g} + {1g} needs 5 slots but can only use slots 0-3; {4g} "
                 "can only start at slot 0, {1g} at slots 0, 1, 2, 3", id="4g+1g invalid"),
    pytest.param({"2g": 3}, "{2g} x 3 needs 6 slots but can only use slots 0-3; {2g} can only "
                 "start at slots 0, 2", id="2gx3 invalid"),
    pytest.param({"2g+me": 2}, "{2g+me}: 2 requested but the profile allows at most 1 per GPU",
                 id="2g+me over its maximum"),
    pytest.param({"2g+me": 1, "2g": 1}, None, id="2g+me beside 2g"),
    pytest.param({"1g+me": 1, "1g": 3}, None, id="1g+me beside three 1g"),
    pytest.param({"2g": 2, "1g": 1}, "{2g} + {2g} + {1g} needs 5 slots but can only use slots "
                 "0-3; {2g} can only start at slots 0, 2, {1g} at slots 0, 1, 2, 3",
                 id="2g+2g+1g invalid"),
]  # fmt: skip


def _name(card: CardModel, shape: str) -> str:
    profile = card.profile_by_index(SHAPES[shape])
    assert profile is not None, f"{card.key} has no {shape}"
    return profile.name


def _gpu(card: CardModel, index: int = 0) -> GpuMigState:
    return GpuMigState(
        index, f"GPU-{index}", card.name, card.pci_device_id, mig_capable=True,
        mig_current=True, mig_pending=True, profiles=card.profiles,
    )  # fmt: skip


def _plan(card: CardModel, counts: dict[str, int]):
    devices = ", ".join(f"{name}: {n}" for name, n in counts.items())
    text = f"version: v1\nmig-configs:\n  c: [{{devices: all, mig-enabled: true, " \
           f"mig-devices: {{{devices}}}}}]\n"
    return plan_config(parse_mig_parted(text, source="t.yaml").select(None), [_gpu(card)])


def _check(card: CardModel, shapes: dict[str, int], message: str | None) -> None:
    counts = {_name(card, s): n for s, n in shapes.items()}
    if message is None:
        plan = _plan(card, counts)
        placements = plan.gpus[0].desired.placements
        assert Counter(p.profile for p in placements) == counts
        _assert_valid(card, placements)
        return
    expected = message
    for shape in SHAPES:
        if f"{{{shape}}}" in expected:
            expected = expected.replace(f"{{{shape}}}", _name(card, shape))
    with pytest.raises(MigPlanError) as info:
        _plan(card, counts)
    assert str(info.value) == f"t.yaml: config 'c': GPU 0 ({card.name}): {expected}"


def _assert_valid(card: CardModel, placements: tuple[Placement, ...]) -> None:
    used: set[int] = set()
    for p in placements:
        profile = card.profile_by_name(p.profile)
        assert p.start in profile.starts
        assert p.size == profile.size
        assert used.isdisjoint(p.slots)
        used.update(p.slots)
    for profile, n in Counter(p.profile for p in placements).items():
        assert n <= card.profile_by_name(profile).max_count


@pytest.mark.parametrize("model", EIGHT_SLOT_CARDS)
@pytest.mark.parametrize(("shapes", "message"), EIGHT_SLOT_CASES)
def test_eight_slot_cards(model: str, shapes: dict[str, int], message: str | None) -> None:
    _check(CARDS[model], shapes, message)


@pytest.mark.parametrize(("shapes", "message"), A30_CASES)
def test_a30(shapes: dict[str, int], message: str | None) -> None:
    _check(CARDS["A30"], shapes, message)


def test_issue_example_message_on_gpu_2() -> None:
    card = CARDS["A100-SXM4-40GB"]
    text = "version: v1\nmig-configs:\n  c:\n    - devices: [2]\n      mig-enabled: true\n" \
           "      mig-devices: {4g.20gb: 2}\n"
    gpus = [_gpu(card, i) for i in range(4)]
    with pytest.raises(MigPlanError) as info:
        plan_config(parse_mig_parted(text, source="f.yaml").select(None), gpus)
    assert str(info.value) == (
        "f.yaml: config 'c': GPU 2 (NVIDIA A100-SXM4-40GB): 4g.20gb + 4g.20gb needs slots 0-3 "
        "twice; 4g.20gb can only start at slot 0"
    )


@pytest.mark.parametrize(
    ("model", "name", "message"),
    [
        pytest.param("H100-SXM5-80GB", "1g.5gb", "unknown MIG profile '1g.5gb'; valid profiles: "
                     "1g.10gb, 1g.10gb+me, 1g.20gb, 2g.20gb, 3g.40gb, 4g.40gb, 7g.80gb",
                     id="A100 name on H100"),
        pytest.param("A30", "3g.12gb", "unknown MIG profile '3g.12gb'; valid profiles: 1g.6gb, "
                     "1g.6gb+me, 2g.12gb, 2g.12gb+me, 4g.24gb", id="no 3g on A30"),
        pytest.param("A100-SXM4-40GB", "1g.35gb", "unknown MIG profile '1g.35gb'; valid "
                     "profiles: 1g.5gb, 1g.5gb+me, 1g.10gb, 2g.10gb, 3g.20gb, 4g.20gb, 7g.40gb",
                     id="H200 name on A100"),
        pytest.param("H100-SXM5-80GB", "1g.10gb-me", "unknown MIG profile '1g.10gb-me'",
                     id="-me not offered"),
    ],
)  # fmt: skip
def test_unknown_profiles_list_the_gpus_profiles(model: str, name: str, message: str) -> None:
    with pytest.raises(MigPlanError, match=re.escape(message)):
        _plan(CARDS[model], {name: 1})


@pytest.mark.parametrize(
    ("model", "size", "ok"),
    [
        pytest.param("A100-SXM4-40GB", 2, False, id="1g.10gb is the two-slot profile on A100-40GB"),
        pytest.param("H100-SXM5-80GB", 1, True, id="1g.10gb is the one-slot profile on H100-80GB"),
        pytest.param("A100-SXM4-80GB", 1, True, id="1g.10gb is the one-slot profile on A100-80GB"),
    ],
)  # fmt: skip
def test_same_name_means_different_profiles(model: str, size: int, ok: bool) -> None:
    card = CARDS[model]
    assert card.profile_by_name("1g.10gb").size == size
    if ok:
        assert len(_plan(card, {"1g.10gb": 7}).gpus[0].desired.placements) == 7
    else:
        with pytest.raises(MigPlanError, match=r"1g.10gb x 5 needs 10 slots"):
            _plan(card, {"1g.10gb": 7})


def test_h200_one_slice_35gb_is_two_slots() -> None:
    card = CARDS["H200-SXM-141GB"]
    placements = _plan(card, {"1g.35gb": 4}).gpus[0].desired.placements
    assert [(p.start, p.size) for p in placements] == [(0, 2), (2, 2), (4, 2), (6, 2)]


def test_keeps_the_instances_a_gpu_has() -> None:
    card = CARDS["A100-SXM4-40GB"]
    one = card.profile_by_name("1g.5gb")
    keep = [Placement(5, 1, "1g.5gb"), Placement(3, 1, "1g.5gb"), Placement(0, 4, "4g.20gb")]
    assert place([(one, 2)], keep) == (Placement(3, 1, "1g.5gb"), Placement(5, 1, "1g.5gb"))


# --- randomized: the solver finds a placement whenever brute force does --------------------------


def _brute_force(items: list[MigProfile], keep: set[tuple[str, int]]) -> int | None:
    """Most kept instances over every assignment of allowed starts; None when none fits."""
    best: int | None = None

    def visit(i: int, used: int, kept: int) -> None:
        nonlocal best
        if i == len(items):
            best = kept if best is None else max(best, kept)
            return
        profile = items[i]
        for start in profile.starts:
            mask = ((1 << profile.size) - 1) << start
            if not used & mask:
                visit(i + 1, used | mask, kept + ((profile.name, start) in keep))

    if all(n <= p.max_count for p, n in Counter(items).items()):
        visit(0, 0, 0)
    return best


_ALL_CARDS = [*EIGHT_SLOT_CARDS, "A30"]


@st.composite
def _requests(draw: st.DrawFn) -> tuple[CardModel, list[tuple[MigProfile, int]], list[Placement]]:
    card = CARDS[draw(st.sampled_from(_ALL_CARDS))]
    slots = max(s + p.size for p in card.profiles for s in p.starts)
    request = []
    total = 0
    for profile in card.profiles:
        n = draw(st.integers(0, min(profile.max_count + 1, slots // profile.size + 1)))
        if n and total + n * profile.size <= slots + 2:
            request.append((profile, n))
            total += n * profile.size
    keep = [Placement(s, p.size, p.name) for p in card.profiles for s in p.starts
            if draw(st.integers(0, 9)) == 0]  # fmt: skip
    return card, request, keep


@settings(max_examples=400, deadline=None)
@given(_requests())
def test_solver_agrees_with_brute_force(case) -> None:
    card, request, keep = case
    items = [p for p, n in request for _ in range(n)]
    best_kept = _brute_force(items, {(p.profile, p.start) for p in keep})
    try:
        placements = place(request, keep)
    except ValueError:
        assert best_kept is None, f"solver found nothing, brute force keeps {best_kept}"
        return
    assert best_kept is not None, f"solver placed {placements}, brute force found nothing"
    assert Counter(p.profile for p in placements) == Counter(p.name for p in items)
    _assert_valid(card, placements)
    kept = sum(1 for p in placements if p in set(keep))
    assert kept == best_kept
