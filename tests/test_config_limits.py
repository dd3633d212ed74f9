"""Hostile config input: bounded parsing, strictness on both YAML parsers, short messages."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from plugin.cli import main
from plugin.cli.config_file import read_config_text
from sharing.config import MAX_MESSAGE_CHARS, apply_overrides, default_config, load_config
from sharing.config_models import MAX_REPLICAS
from sharing.errors import ConfigError
from sharing.yaml_text import LOADERS, MAX_DEPTH, MAX_TEXT_BYTES, MAX_VALUES, parse_yaml

ROOT = Path(__file__).resolve().parents[1]


def alias_bomb(levels: int = 9, width: int = 9) -> str:
    """A few hundred bytes that expand to width**levels values: `&a`/`*a` nested."""
    lines = [f"a0: &a0 [{', '.join(['x'] * width)}]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]")
    return "version: v1\nflags:\n  migStrategy:\n" + "\n".join(
        "    " + line for line in lines
    ) + "\n"


def deep(levels: int) -> str:
    """A typed field nested `levels` deep in flow lists."""
    return "version: v1\nflags:\n  migStrategy: " + "[" * levels + "]" * levels + "\n"


def ts(replicas: object, name: str = "gpu") -> str:
    """A time-slicing config."""
    return (
        "version: v1\nsharing:\n  timeSlicing:\n    resources:\n"
        f"    - name: {name}\n      replicas: {replicas}\n"
    )


@pytest.fixture(params=list(LOADERS))
def loader(request: pytest.FixtureRequest) -> str:
    """Each YAML parser this PyYAML has (libyaml's and the pure-Python one)."""
    return request.param


HOSTILE = [
    pytest.param(alias_bomb(), f"more than {MAX_VALUES:,} values", id="alias bomb"),
    pytest.param(deep(1000), f"nested deeper than {MAX_DEPTH} levels", id="1000 levels deep"),
    pytest.param("a: &a [*a]\n", "refers to a collection that contains it", id="recursive alias"),
    pytest.param("version: v1\n" + "x" * (MAX_TEXT_BYTES + 1), "at most 262,144", id="too big"),
    pytest.param("version: v1\nflags: {mpsRoot: " + "a" * 100_000 + "}\n",
                 "a value of 100,000 characters; at most 4,096", id="long value"),
    pytest.param("version: v1\nflags:\n  migStrategy: none\n  migStrategy: mixed\n",
                 'line 4: duplicate key "migStrategy" (first given on line 3)', id="duplicate key"),
    pytest.param("version: v1\nversion: v1\n", 'line 2: duplicate key "version"',
                 id="duplicate top-level key"),
    pytest.param("version: v1\n---\nversion: v1\n", "another document", id="two documents"),
    pytest.param("version: !!python/object:os.system x\n", "could not determine a constructor",
                 id="python tag"),
]


@pytest.mark.parametrize(("text", "expected"), HOSTILE)
def test_hostile_yaml_is_refused_fast_with_a_short_message(
    loader: str, text: str, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each parser refuses the input quickly with one short line naming the limit."""
    monkeypatch.setattr("sharing.yaml_text.DEFAULT_LOADER", loader)
    monkeypatch.setattr("sharing.config.parse_yaml",
                        lambda text: parse_yaml(text, loader=loader))
    started = time.monotonic()
    with pytest.raises(ConfigError) as caught:
        load_config(text, source="config.yaml")
    took = time.monotonic() - started
    message = str(caught.value)
    assert expected in message
    assert message.startswith("config.yaml: ")
    assert "\n" not in message
    assert len(message) < 300
    assert took < 1.0, f"{loader} took {took:.2f}s"


def test_merge_keys_are_not_duplicates(loader: str) -> None:
    """`<<: *base` then an explicit key: YAML's merge, not a duplicate."""
    text = "base: &b {x: 1, y: 2}\nuse:\n  <<: *b\n  x: 3\n"
    assert parse_yaml(text, loader=loader) == {"base": {"x": 1, "y": 2}, "use": {"x": 3, "y": 2}}


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("version: v1\t# the format\n", id="tab before a comment"),
        pytest.param("version: v1   \t\n", id="trailing tab"),
        pytest.param("version: v1\nflags: {migStrategy:\tmixed}\n", id="tab in a flow mapping"),
    ],
)
def test_tabs_between_tokens_parse_on_both_parsers(loader: str, text: str) -> None:
    """`version: v1<TAB># comment` is valid YAML; libyaml reads it and so does our fallback."""
    data = parse_yaml(text, loader=loader)
    assert isinstance(data, dict)
    assert data["version"] == "v1"


def test_parsers_agree_on_the_example_configs(loader: str) -> None:
    """Every example and compat config gives the same value on each parser."""
    files = sorted((ROOT / "configs").glob("*.yaml")) + sorted(
        (ROOT / "tests" / "data" / "compat").rglob("*.yaml")
    )
    assert files
    for path in files:
        text = path.read_text()
        assert parse_yaml(text, loader=loader) == yaml.safe_load(text), path


def test_missing_version_loads_as_v1() -> None:
    """Upstream defaults a missing (or empty) `version` to v1; so does gpushare."""
    config = load_config("sharing:\n  timeSlicing:\n    resources:\n"
                         "    - {name: gpu, replicas: 4}\n")
    assert config.version == "v1"
    assert config.sharing.time_slicing.resources[0].replicas == 4  # type: ignore[union-attr]
    assert load_config('version: ""\nflags: {migStrategy: mixed}\n').flags.mig_strategy == "mixed"
    with pytest.raises(ConfigError, match="version: must be one of 'v1', got \"v2\""):
        load_config("version: v2\n", source="config.yaml")


def test_replicas_have_a_documented_maximum() -> None:
    """replicas: 1024 is the most; 1e9 is refused at once, naming the limit."""
    assert load_config(ts(MAX_REPLICAS)).sharing.time_slicing is not None
    started = time.monotonic()
    with pytest.raises(ConfigError) as caught:
        load_config(ts(1_000_000_000), source="c.yaml")
    assert time.monotonic() - started < 0.5
    assert str(caught.value) == (
        "c.yaml: sharing.timeSlicing.resources[0].replicas: must be <= 1024, got 1000000000"
    )


@pytest.mark.parametrize(
    ("value", "message"),
    [
        pytest.param("/run/nvidia/../../etc/mps", 'must not contain ".."', id="dot-dot"),
        pytest.param("../mps", 'must not contain ".."', id="relative dot-dot"),
        pytest.param("/run/nvidia/mps/..", 'must not contain ".."', id="trailing dot-dot"),
    ],
)
def test_mps_root_escaping_its_root_is_refused(value: str, message: str) -> None:
    """A `..` component in mpsRoot (file, env or flag) is refused, naming the value."""
    with pytest.raises(ConfigError) as caught:
        load_config(f"version: v1\nflags:\n  mpsRoot: {value}\n", source="c.yaml")
    assert str(caught.value) == f'c.yaml: flags.mpsRoot: {message} (a path escaping its root), ' \
        f'got "{value}"'


def test_path_flags_are_normalised() -> None:
    """Doubled slashes and `.` components are collapsed; an empty mpsRoot stays unset."""
    config = load_config("version: v1\nflags:\n  mpsRoot: //run//nvidia/./mps/\n"
                         "  nvidiaDriverRoot: /run/nvidia/driver/\n")
    assert config.flags.mps_root == "/run/nvidia/mps"
    assert config.flags.nvidia_driver_root == "/run/nvidia/driver"
    assert load_config("version: v1\n").flags.mps_root == ""


def test_long_values_are_shortened_in_messages_with_a_marker() -> None:
    """A 4,000-character name is quoted by its first 80 characters and the count left out."""
    name = "g" * 4000
    with pytest.raises(ConfigError) as caught:
        load_config(ts(4, name=name), source="c.yaml")
    message = str(caught.value)
    assert len(message) < 300
    assert re.search(r'"nvidia\.com/g{69}…\(\+3931 chars\)"', message), message


def test_many_problems_are_counted_not_all_listed() -> None:
    """Hundreds of bad entries: the message stays under its cap and says how many are left."""
    entries = "".join(f"    - {{name: gpu{i}, replicas: {i % 2}}}\n" for i in range(200))
    text = "version: v1\nsharing:\n  timeSlicing:\n    resources:\n" + entries
    with pytest.raises(ConfigError) as caught:
        load_config(text, source="c.yaml")
    message = str(caught.value)
    assert len(message) <= MAX_MESSAGE_CHARS + 40
    assert message.splitlines()[0] == (
        "c.yaml: sharing.timeSlicing.resources[0].replicas: must be >= 2, got 0"
    )
    assert re.fullmatch(r"\(and \d+ more problems\)", message.splitlines()[-1])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param(ts(4) + "      devices: " + str(list(range(2000))) + "\n",
                     "the device list has 2,000 entries; at most 1024", id="device list"),
        pytest.param(ts(4) + "      devices: 100000\n",
                     "a device count must be between 1 and 1024, got 100000", id="device count"),
        pytest.param("version: v1\nhealth:\n  probeInterval: 1e400\n",
                     "at most 7 days", id="infinite duration"),
        pytest.param("version: v1\nhealth:\n  probeInterval: .nan\n",
                     "at most 7 days", id="NaN duration"),
        pytest.param("version: v1\nhealth:\n  ignoredXids: [" + "1, " * 300 + "1]\n",
                     "must list at most 256 entries, got 301", id="XID list"),
        pytest.param("version: v1\nflags: {1: 2}\n",
                     "c.yaml: flags: keys must be strings, got 1", id="integer key"),
    ],
)
def test_every_field_is_bounded(text: str, message: str) -> None:
    """Counts, lists, durations, strings: each has a limit, named in its error."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(text, source="c.yaml")


def test_strings_from_the_environment_are_bounded_too() -> None:
    """A 5,000-character CDI_ANNOTATION_PREFIX: refused by length, not echoed in full."""
    with pytest.raises(ConfigError) as caught:
        apply_overrides(default_config(), {"CDI_ANNOTATION_PREFIX": "p" * 5000}, {})
    assert str(caught.value) == (
        "CDI_ANNOTATION_PREFIX: flags.plugin.cdiAnnotationPrefix: must be at most 4096 "
        "characters, got 5,000"
    )


@pytest.mark.parametrize(
    ("make", "message"),
    [
        pytest.param(lambda p: os.mkfifo(p), "not a regular file (a FIFO)", id="FIFO"),
        pytest.param(lambda p: p.symlink_to("/dev/zero"), "not a regular file (a character device)",
                     id="link to /dev/zero"),
        pytest.param(lambda p: p.mkdir(), "not a regular file (a directory)", id="directory"),
        pytest.param(lambda p: p.write_bytes(b"version: v1\n" + b"#" * MAX_TEXT_BYTES),
                     "the file is larger than 262,144 bytes", id="large file"),
        pytest.param(lambda p: p.write_bytes(b"version: v1\n\xff\xfe\x00"),
                     "not a text file (not UTF-8 at byte 12", id="binary"),
        pytest.param(lambda p: None, "cannot read the config file: No such file or directory",
                     id="missing"),
    ],
)
def test_config_paths_that_are_not_small_text_files_are_refused(
    tmp_path: Path, make: object, message: str
) -> None:
    """Read without blocking or reading past the limit; the error is one line naming the path."""
    path = tmp_path / "config.yaml"
    make(path)  # type: ignore[operator]
    started = time.monotonic()
    with pytest.raises(ConfigError) as caught:
        read_config_text(path)
    assert time.monotonic() - started < 1.0
    assert str(caught.value).startswith(f"{path}: {message}")
    assert "\n" not in str(caught.value)


def test_plan_on_a_fifo_exits_2_with_one_line(tmp_path: Path) -> None:
    """`gpushare plan --config FIFO` in a real process: exit 2 at once, one line on stderr."""
    fifo = tmp_path / "config.yaml"
    os.mkfifo(fifo)
    result = subprocess.run(
        [sys.executable, "-m", "plugin.cli", "plan", "--node", "dgx-a100", "--config", str(fifo)],
        capture_output=True, text=True, timeout=30, cwd=ROOT, check=False,
    )
    assert result.returncode == 2
    assert result.stderr == f"config error: {fifo}: not a regular file (a FIFO)\n"
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param(deep(1000), "nested deeper than 32 levels", id="deep nesting"),
        pytest.param(alias_bomb(), "more than 10,000 values", id="alias bomb"),
    ],
)
def test_plan_on_hostile_yaml_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, message: str
) -> None:
    """Deep nesting and alias bombs: exit 2 and one line, no traceback."""
    path = tmp_path / "config.yaml"
    path.write_text(text)
    assert main(["plan", "--node", "dgx-a100", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert message in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("make", "message"),
    [
        pytest.param(lambda p: p.write_text(deep(1000)), "line 3: nested deeper than 32 levels",
                     id="deep nesting"),
        pytest.param(lambda p: os.mkfifo(p), "not a regular file (a FIFO)", id="FIFO"),
        pytest.param(lambda p: p.symlink_to("/dev/zero"), "not a regular file (a character device)",
                     id="link to /dev/zero"),
    ],
)
def test_run_on_a_hostile_config_exits_2_with_one_line(
    tmp_path: Path, kubelet_dir: Path, capsys: pytest.CaptureFixture[str], make: object,
    message: str,
) -> None:
    """`gpushare run`: exit 2 at once, one line naming the file, nothing served."""
    path = tmp_path / "config.yaml"
    make(path)  # type: ignore[operator]
    assert main(["run", "--config", str(path), "--node", "dgx-a100",
                 "--kubelet-dir", str(kubelet_dir)]) == 2
    err = capsys.readouterr().err
    assert err == f"gpushare run: {path}: {message}\n"
    assert list(kubelet_dir.iterdir()) == []
