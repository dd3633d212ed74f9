"""mig-parted v1 files: the compat example, strictness (errors name the key path), bounds."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from sharing.errors import MigConfigError
from sharing.mig import DeviceFilter, parse_mig_parted, parse_profile_name
from sharing.mig.parted import config_from_json, config_to_json

COMPAT = Path(__file__).resolve().parent / "data" / "compat" / "mig-parted"
EXAMPLE = COMPAT / "example-config.yaml"


def _one(entry: str) -> str:
    """A file with one config `c` whose single entry is `entry` (YAML flow mapping)."""
    return f"version: v1\nmig-configs:\n  c:\n    - {entry}\n"


def test_compat_example_parses_every_config() -> None:
    parsed = parse_mig_parted(EXAMPLE.read_text(), source="example-config.yaml")
    assert parsed.names == (
        "all-disabled", "all-enabled", "all-1g.5gb", "all-1g.5gb.me", "all-1g.10gb",
        "all-2g.10gb", "all-3g.20gb", "all-balanced", "custom-config",
    )  # fmt: skip
    custom = parsed.select("custom-config")
    assert [e.devices for e in custom.entries] == [(0, 1, 2, 3), (4,), (5,), (6,), (7,)]
    assert [e.mig_enabled for e in custom.entries] == [False, True, True, True, True]
    last = custom.entries[-1]
    assert [(p.name, n) for p, n in last.mig_devices] == [
        ("1g.5gb", 2), ("2g.10gb", 1), ("3g.20gb", 1),
    ]  # fmt: skip
    assert last.where == "mig-configs.custom-config[4]"
    me = parsed.select("all-1g.5gb.me").entries[0]
    assert me.devices is None
    assert [(p.name, n) for p, n in me.mig_devices] == [("1g.5gb+me", 1)]
    assert parsed.select("all-enabled").entries[0].mig_devices == ()


def test_single_config_needs_no_name() -> None:
    parsed = parse_mig_parted(_one("{devices: all, mig-enabled: false}"), source="f.yaml")
    assert parsed.select(None).name == "c"


def test_selection_errors_list_the_configs() -> None:
    parsed = parse_mig_parted(EXAMPLE.read_text(), source="f.yaml")
    with pytest.raises(MigConfigError, match=r'^f\.yaml: no config "nope" in mig-configs '
                       r"\(has: all-disabled, all-enabled, .*custom-config\)$"):
        parsed.select("nope")
    with pytest.raises(MigConfigError, match=r"^f\.yaml: the file has 9 configs; name one"):
        parsed.select(None)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param(_one("{devices: all, mig-enabled: false, device_filter: '0x20B010DE'}"),
                     r'mig-configs.c\[0\].device_filter: unknown key; did you mean '
                     r"device-filter\?", id="unknown entry key with suggestion"),
        pytest.param("version: v1\nmig-config: {}\n",
                     r"mig-config: unknown key; did you mean mig-configs\?", id="unknown top key"),
        pytest.param("mig-configs: {c: [{devices: all, mig-enabled: false}]}\n",
                     r"version: required, but missing", id="version missing"),
        pytest.param("version: v2\nmig-configs: {c: [{devices: all, mig-enabled: false}]}\n",
                     r'version: must be "v1", got "v2"', id="wrong version"),
        pytest.param("version: v1\n", r"mig-configs: must map config names to entry lists, "
                     r"got missing", id="no configs"),
        pytest.param("version: v1\nmig-configs: {c: []}\n",
                     r"mig-configs.c: must be a list of entries, got \[\]", id="empty config"),
        pytest.param(_one("{mig-enabled: false}"), r"mig-configs.c\[0\].devices: required",
                     id="devices missing"),
        pytest.param(_one("{devices: some, mig-enabled: false}"),
                     r'devices: must be "all" or a list of GPU indices, got "some"',
                     id="devices word"),
        pytest.param(_one("{devices: [0, -1], mig-enabled: false}"),
                     r"devices\[1\]: must be a GPU index \(an integer >= 0\), got -1",
                     id="negative index"),
        pytest.param(_one("{devices: [true], mig-enabled: false}"),
                     r"devices\[0\]: must be a GPU index", id="bool index"),
        pytest.param(_one("{devices: [1, 1], mig-enabled: false}"),
                     r"devices: lists a GPU index twice", id="duplicate index"),
        pytest.param(_one("{devices: all, mig-enabled: yes please}"),
                     r'mig-enabled: must be true or false, got "yes please"', id="enabled word"),
        pytest.param(_one("{devices: all, mig-enabled: true}"),
                     r"mig-devices: required with mig-enabled: true", id="mig-devices missing"),
        pytest.param(_one("{devices: all, mig-enabled: false, mig-devices: {1g.5gb: 1}}"),
                     r"mig-devices: MIG devices need mig-enabled: true", id="devices when off"),
        pytest.param(_one("{devices: all, mig-enabled: true, mig-devices: {1g.5gb: -1}}"),
                     r'mig-devices\["1g.5gb"\]: must be a count \(an integer >= 0\), got -1',
                     id="negative count"),
        pytest.param(_one("{devices: all, mig-enabled: true, mig-devices: {1g.5gb: 65}}"),
                     r'mig-devices\["1g.5gb"\]: must be <= 64, got 65', id="count bound"),
        pytest.param(_one("{devices: all, mig-enabled: true, mig-devices: {1g.5gb: x}}"),
                     r'got "x"', id="count word"),
        pytest.param(_one("{devices: all, mig-enabled: true, mig-devices: {1g.5GB: 1}}"),
                     r"malformed MIG profile '1g.5GB'", id="profile upper case"),
        pytest.param(_one("{devices: all, mig-enabled: true, mig-devices: {1g.5gb+mig: 1}}"),
                     r"unknown or repeated attribute '\+mig'", id="unknown attribute"),
        pytest.param(_one("{devices: all, mig-enabled: true, mig-devices: {1g.5gb-gfx: 1}}"),
                     r"unknown attribute '-gfx' \(allowed: -me\)", id="unknown minus attribute"),
        pytest.param(_one("{devices: all, mig-enabled: true, mig-devices: {4c.3g.20gb: 1}}"),
                     r"compute instance of 4 slices does not fit a GPU instance of 3",
                     id="CI larger than GI"),
        pytest.param(_one("{devices: all, mig-enabled: true, "
                          "mig-devices: {3g.20gb: 1, 3c.3g.20gb: 1}}"),
                     r"names the same profile as another key \(3g.20gb\)", id="same profile twice"),
        pytest.param(_one("{devices: all, mig-enabled: false, device-filter: '0x20B0'}"),
                     r"device-filter: malformed device filter \"0x20B0\": expected "
                     r"0x<DEVICE><VENDOR>", id="short filter"),
        pytest.param(_one("{devices: all, mig-enabled: false, device-filter: ['0x20B010DE', "
                          "'20B210DE']}"),
                     r"device-filter\[1\]: malformed device filter \"20B210DE\"",
                     id="filter without 0x in a list"),
        pytest.param(_one("{devices: all, mig-enabled: false, device-filter: '0x20B010DE:12'}"),
                     r"malformed device filter", id="bad subsystem"),
        pytest.param(_one("{devices: all, mig-enabled: false, device-filter: []}"),
                     r"device-filter: must be a filter string or a list", id="empty filter list"),
        pytest.param("version: v1\nmig-configs:\n  c: [{devices: all, mig-enabled: false}]\n"
                     "  c: [{devices: all, mig-enabled: true}]\n",
                     r'line 4: duplicate key "c"', id="duplicate config name"),
        pytest.param("version: v1\nmig-configs: [\n", r"not valid YAML: line \d+", id="bad YAML"),
        pytest.param("", r"the file is empty", id="empty file"),
        pytest.param("- a\n", r"must be a mapping, got \['a'\]", id="not a mapping"),
    ],
)
def test_strict_errors_name_the_path(text: str, message: str) -> None:
    with pytest.raises(MigConfigError) as info:
        parse_mig_parted(text, source="bad.yaml")
    line = str(info.value)
    assert "\n" not in line
    assert line.startswith("bad.yaml: ")
    assert re.search(message, line), line


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param("'0x20B010DE'", (DeviceFilter(0x20B010DE),), id="string"),
        pytest.param("'0x20b010de'", (DeviceFilter(0x20B010DE),), id="lower-case hex"),
        pytest.param("['0x20B010DE', '0x233010DE']",
                     (DeviceFilter(0x20B010DE), DeviceFilter(0x233010DE)), id="list"),
        pytest.param("'0x20B010DE:0x134F10DE'", (DeviceFilter(0x20B010DE, 0x134F10DE),),
                     id="with subsystem"),
    ],
)  # fmt: skip
def test_device_filters(value: str, expected: tuple[DeviceFilter, ...]) -> None:
    text = _one(f"{{devices: all, mig-enabled: false, device-filter: {value}}}")
    entry = parse_mig_parted(text).select(None).entries[0]
    assert entry.device_filter == expected
    assert entry.selects(3, 0x20B010DE, 0x134F10DE)
    assert not entry.selects(3, 0x20B210DE, 0x134F10DE)


def test_subsystem_filter_must_match_too() -> None:
    text = _one("{devices: [0, 2], mig-enabled: false, device-filter: '0x20B010DE:0x00000001'}")
    entry = parse_mig_parted(text).select(None).entries[0]
    assert entry.selects(0, 0x20B010DE, 1)
    assert not entry.selects(0, 0x20B010DE, 2)
    assert not entry.selects(1, 0x20B010DE, 1)


@pytest.mark.parametrize(
    ("text", "name", "ci", "attrs"),
    [
        pytest.param("1g.5gb", "1g.5gb", None, "", id="plain"),
        pytest.param("1g.10gb+me", "1g.10gb+me", None, "+me", id="+me"),
        pytest.param("1g.24gb+me.all", "1g.24gb+me.all", None, "+me.all", id="+me.all"),
        pytest.param("2g.24gb+gfx", "2g.24gb+gfx", None, "+gfx", id="+gfx"),
        pytest.param("1g.24gb-me", "1g.24gb-me", None, "-me", id="-me"),
        pytest.param("1c.3g.20gb", "3g.20gb", 1, "", id="compute instance prefix"),
        pytest.param("1g.12gb+me,gfx", "1g.12gb+me,gfx", None, "+me,gfx", id="two attributes"),
    ],
)  # fmt: skip
def test_profile_names(text: str, name: str, ci: int | None, attrs: str) -> None:
    parsed = parse_profile_name(text)
    assert (parsed.name, parsed.ci_slices, parsed.attrs) == (name, ci, attrs)


def test_size_bound() -> None:
    text = "version: v1\n# " + "x" * (1024 * 1024) + "\n"
    expected = r"^big.yaml: the text is 1,048,5\d\d bytes; at most 1,048,576 are allowed$"
    with pytest.raises(MigConfigError, match=expected):
        parse_mig_parted(text, source="big.yaml")


def test_depth_bound() -> None:
    text = "version: v1\nmig-configs: " + "[" * 40 + "]" * 40 + "\n"
    with pytest.raises(MigConfigError, match=r"^deep.yaml: line 2: nested deeper than 12 levels$"):
        parse_mig_parted(text, source="deep.yaml")


def test_very_deep_nesting_is_refused_not_a_crash() -> None:
    text = "version: v1\nmig-configs: " + "[" * 5000 + "]" * 5000 + "\n"
    with pytest.raises(MigConfigError, match=r"nested deeper than 12 levels"):
        parse_mig_parted(text, source="deep.yaml")


def test_alias_expansion_is_bounded() -> None:
    lines = ["version: v1", "x0: &a0 [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]"]
    lines += [f"x{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]"
              for i in range(1, 9)]  # fmt: skip
    expected = r"more than 50,000 values \(aliases counted as often as they are used\)"
    with pytest.raises(MigConfigError, match=expected):
        parse_mig_parted("\n".join(lines) + "\n", source="bomb.yaml")


def test_config_count_bound() -> None:
    configs = "".join(f"  c{i}: [{{devices: all, mig-enabled: false}}]\n" for i in range(257))
    with pytest.raises(MigConfigError, match=r"mig-configs: more than 256 configs"):
        parse_mig_parted("version: v1\nmig-configs:\n" + configs, source="many.yaml")


def test_long_values_are_cut_in_messages() -> None:
    text = _one("{devices: all, mig-enabled: '" + "y" * 500 + "'}")
    with pytest.raises(MigConfigError) as info:
        parse_mig_parted(text, source="long.yaml")
    assert len(str(info.value)) < 200


def test_configs_go_through_json_and_back_unchanged() -> None:
    """What the config reader's child sends back: every example config, filters included."""
    text = EXAMPLE.read_text() + (
        "  filtered:\n    - devices: [0, 3]\n      device-filter: [\"0x20B010DE\", "
        "\"0x20B210DE:0x147E10DE\"]\n      mig-enabled: true\n"
        "      mig-devices: {1c.3g.20gb: 2, 1g.10gb+me: 1}\n"
    )
    parsed = parse_mig_parted(text, source="f.yaml")
    assert "filtered" in parsed.names
    for config in parsed.configs:
        assert config_from_json(json.loads(json.dumps(config_to_json(config)))) == config


@pytest.mark.parametrize(
    ("change", "message"),
    [
        pytest.param(lambda d: d.pop("source"), "expected an object with name, source",
                     id="missing key"),
        pytest.param(lambda d: d.update(entries=[]), "entries must be a list of 1-64",
                     id="no entries"),
        pytest.param(lambda d: d["entries"][0].update(devices=[-1]),
                     "devices must be a list of at most 256 integers >= 0", id="negative index"),
        pytest.param(lambda d: d["entries"][0].update(mig_devices=[["9z.1gb", 1]]),
                     "malformed MIG profile", id="bad profile"),
        pytest.param(lambda d: d["entries"][0].update(mig_devices=[["1g.5gb", 65]]),
                     "a MIG device count is 1-64", id="count too high"),
        pytest.param(lambda d: d["entries"][0].update(device_filter=[[None, 1]]),
                     "a device filter's device id must be", id="filter without device"),
        pytest.param(lambda d: d["entries"][0].update(mig_enabled="yes"),
                     "mig_enabled true or false", id="enabled not a bool"),
    ],
)
def test_json_not_written_by_config_to_json_is_refused(change: object, message: str) -> None:
    config = parse_mig_parted(EXAMPLE.read_text(), source="f.yaml").select("all-1g.5gb")
    data = json.loads(json.dumps(config_to_json(config)))
    change(data)  # type: ignore[operator]
    with pytest.raises(ValueError, match=re.escape(message)):
        config_from_json(data)
