"""The node labels file: NFD local-source text, atomic rewrites, MIG state, removal, paths."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from plugin.daemon.core import Daemon
from plugin.daemon.labels_file import LabelsFile, render, write_atomically
from sharing.nvml import load_library
from sharing.nvml.sim import create_state
from tests.fakes.kubelet import FakeKubelet
from tests.test_reload import time_slicing


def many_labels(replicas: int, count: int = 2000) -> tuple[tuple[str, str], ...]:
    """A large label set, so each rewrite takes several write() calls."""
    return tuple((f"example.com/gpu-{i:04d}.replicas", str(replicas)) for i in range(count))


def test_render_is_one_sorted_key_value_per_line() -> None:
    assert render([("b.io/x", "2"), ("a.io/y", "1")]) == "a.io/y=1\nb.io/x=2\n"


def test_concurrent_reader_never_sees_a_half_written_file(tmp_path: Path) -> None:
    """A reader looping on the file while it is rewritten 200 times sees only whole versions."""
    path = tmp_path / "features.d" / "gfd"
    versions = {replicas: many_labels(replicas) for replicas in (4, 8)}
    texts = {render(labels) for labels in versions.values()}
    labels = LabelsFile(path)
    labels.update(versions[4], path)
    done = threading.Event()
    seen: list[str] = []

    def read() -> None:
        while not done.is_set():
            seen.append(path.read_text())

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for n in range(200):
            labels.update(versions[8 if n % 2 == 0 else 4], path)
    finally:
        done.set()
        reader.join()
    assert len(seen) > 10
    assert {text for text in seen if text not in texts} == set()
    assert [p.name for p in path.parent.iterdir()] == ["gfd"]  # no temporary file left


def test_unchanged_labels_are_not_rewritten(tmp_path: Path) -> None:
    path = tmp_path / "gfd"
    labels = LabelsFile(path)
    labels.update((("a.io/x", "1"),), path)
    inode = path.stat().st_ino
    labels.update((("a.io/x", "1"),), path)
    assert path.stat().st_ino == inode
    labels.update((("a.io/x", "2"),), path)
    assert path.stat().st_ino != inode
    assert path.read_text() == "a.io/x=2\n"


def test_new_path_moves_the_file_and_none_disables(tmp_path: Path) -> None:
    first, second = tmp_path / "one" / "gfd", tmp_path / "two" / "gfd"
    labels = LabelsFile(first)
    labels.update((("a.io/x", "1"),), first)
    labels.update((("a.io/x", "1"),), second)
    assert (first.exists(), second.read_text()) == (False, "a.io/x=1\n")
    labels.update((("a.io/x", "1"),), None)
    assert not second.exists()
    labels.remove()


def test_mig_state_is_added_and_validated(tmp_path: Path) -> None:
    path = tmp_path / "gfd"
    labels = LabelsFile(path)
    labels.update((("nvidia.com/gpu.count", "8"),), path)
    labels.set_mig_state("all-1g.5gb", "pending")
    assert path.read_text() == (
        "nvidia.com/gpu.count=8\nnvidia.com/mig.config=all-1g.5gb\n"
        "nvidia.com/mig.config.state=pending\n"
    )
    labels.update((("nvidia.com/gpu.count", "7"),), path)  # a new plan keeps the MIG state
    assert "nvidia.com/mig.config.state=pending\n" in path.read_text()
    with pytest.raises(ValueError, match="'done'"):
        labels.set_mig_state("all-1g.5gb", "done")
    with pytest.raises(ValueError, match="not a valid label value"):
        labels.set_mig_state("all 1g", "success")


def test_unwritable_directory_is_logged_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    labels = LabelsFile(None)
    with caplog.at_level(logging.ERROR, logger="gpushare.labels"):
        labels.update((("a.io/x", "1"),), blocker / "gfd")
    assert f"cannot write the node labels to {blocker / 'gfd'}" in caplog.text


def test_write_atomically_leaves_no_temporary_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "gfd"
    target.mkdir()  # a directory in the way: the rename fails
    with pytest.raises(IsADirectoryError):
        write_atomically(target, "a=1\n")
    assert [p.name for p in tmp_path.iterdir()] == ["gfd"]


# --- the path a daemon uses ------------------------------------------------------------------


@pytest.fixture
def started(tmp_path: Path, kubelet_dir: Path, kubelet: FakeKubelet) -> Iterator:
    """Factory: a daemon with node labels on, a config text, env and overrides."""
    daemons: list[Daemon] = []

    def start(text: str, env: dict[str, str], overrides: dict[str, object]) -> Daemon:
        config = tmp_path / "config.yaml"
        config.write_text(text)
        state = create_state("dgx-a100", tmp_path / "node")
        daemon = Daemon(config_path=config, kubelet_dir=kubelet_dir,
                        nvml_lib=load_library(str(state)), env=env, overrides=overrides,
                        node_labels=True)
        daemons.append(daemon)
        daemon.start()
        return daemon

    yield start
    for daemon in daemons:
        daemon.stop()


FILE = "version: v1\nflags:\n  gfd:\n    outputFile: {path}\n" + time_slicing(4).split("\n", 1)[1]


@pytest.mark.parametrize(
    ("in_file", "in_env", "flag", "expected"),
    [
        pytest.param("file", None, None, "file", id="flags.gfd.outputFile"),
        pytest.param("file", "env", None, "env", id="GFD_OUTPUT_FILE wins over the file"),
        pytest.param("file", "env", "flag", "flag", id="--labels-file wins over both"),
        pytest.param("file", "", None, None, id="empty disables"),
    ],
)
def test_labels_path_precedence(
    started: object, tmp_path: Path, in_file: str, in_env: str | None, flag: str | None,
    expected: str | None,
) -> None:
    where = {name: tmp_path / name / "gfd" for name in ("file", "env", "flag")}
    env = {} if in_env is None else {"GFD_OUTPUT_FILE": str(where[in_env]) if in_env else ""}
    overrides = {} if flag is None else {"labels-file": str(where[flag])}
    daemon = started(FILE.format(path=where[in_file]), env, overrides)  # type: ignore[operator]
    assert [n for n, p in where.items() if p.exists()] == ([expected] if expected else [])
    daemon.stop()
    assert not any(p.exists() for p in where.values())


def test_daemon_publishes_mig_state_and_keeps_it_across_a_reload(
    started: object, tmp_path: Path, kubelet: FakeKubelet
) -> None:
    path = tmp_path / "gfd"
    daemon = started(time_slicing(4), {}, {"labels-file": str(path)})  # type: ignore[operator]
    daemon.set_mig_state("all-3g.20gb", "success")
    assert "nvidia.com/mig.config.state=success\n" in path.read_text()
    daemon.config_path.write_text(time_slicing(8))
    assert daemon.reload()
    text = path.read_text()
    assert "nvidia.com/gpu.replicas=8\n" in text
    assert "nvidia.com/mig.config=all-3g.20gb\n" in text
