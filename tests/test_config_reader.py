"""The config reader's child process: answers, time limit, cancel, close, and a stuck reload
that neither serving nor SIGTERM waits for."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.mig_jobs import large_mig_file
from plugin.daemon.config_reader import ConfigReader, ReadCancelled
from plugin.daemon.core import Daemon
from sharing.errors import ConfigError, MigConfigError
from sharing.mig import parse_mig_parted
from tests.fakes.kubelet import FakeKubelet
from tests.test_reload import make_daemon, time_slicing

# A reader that never answers: a real process that reads nothing and sleeps.
STUCK = [sys.executable, "-c", "import time; time.sleep(600)"]
EXAMPLE = Path(__file__).parent / "data" / "compat" / "mig-parted" / "example-config.yaml"


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """The config file, first with 4 replicas per GPU."""
    path = tmp_path / "config.yaml"
    path.write_text(time_slicing(4))
    return path


@pytest.fixture
def reader() -> Iterator[ConfigReader]:
    made = ConfigReader()
    yield made
    made.close()


def test_reads_a_config_with_env_and_flags(tmp_path: Path, reader: ConfigReader) -> None:
    """The child applies env and flags like the daemon; the answer is a validated Config."""
    path = tmp_path / "c.yaml"
    path.write_text(time_slicing(4))
    config = reader.read(path, env={"MPS_ROOT": "/run/nvidia/mps", "HOME": "/root"},
                         overrides={"mig-strategy": "mixed"})
    assert config.flags.mps_root == "/run/nvidia/mps"
    assert config.flags.mig_strategy == "mixed"
    assert config.sharing.time_slicing.resources[0].replicas == 4  # type: ignore[union-attr]


def test_errors_come_back_as_config_errors_and_the_child_goes_on(
    tmp_path: Path, reader: ConfigReader
) -> None:
    """An invalid file: ConfigError with the file's message; the same child answers next."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(time_slicing(1))
    with pytest.raises(ConfigError, match=r"bad\.yaml: sharing\.timeSlicing\.resources\[0\]"):
        reader.read(bad, env={}, overrides={})
    child = reader._child
    good = tmp_path / "good.yaml"
    good.write_text(time_slicing(2))
    assert reader.read(good, env={}, overrides={}).version == "v1"
    assert reader._child is child


def test_a_read_past_the_time_limit_is_refused_and_the_child_killed(tmp_path: Path) -> None:
    """A child that never answers: ConfigError after the limit, and that process is gone."""
    reader = ConfigReader(command=STUCK, timeout_s=0.5)
    path = tmp_path / "c.yaml"
    path.write_text(time_slicing(2))
    began = time.monotonic()
    with pytest.raises(ConfigError, match=r"took longer than 0\.5s"):
        reader.read(path, env={}, overrides={})
    assert time.monotonic() - began < 2.0
    assert reader._child is None
    reader.close()


@pytest.mark.parametrize("end", ["cancel", "close"])
def test_cancel_and_close_end_a_read_in_flight_at_once(tmp_path: Path, end: str) -> None:
    """A newer reload (cancel) or stop (close) ends a stuck read within a fraction of a second."""
    reader = ConfigReader(command=STUCK, timeout_s=60)
    path = tmp_path / "c.yaml"
    path.write_text(time_slicing(2))
    outcome: list[BaseException] = []

    def read() -> None:
        try:
            reader.read(path, env={}, overrides={}, cancellable=True)
        except BaseException as err:  # noqa: BLE001 - recorded for the assertion
            outcome.append(err)

    thread = threading.Thread(target=read)
    thread.start()
    time.sleep(0.3)
    began = time.monotonic()
    getattr(reader, end)()
    thread.join(5)
    assert not thread.is_alive()
    assert time.monotonic() - began < 1.5
    assert [type(e) for e in outcome] == [ReadCancelled]
    reader.close()


def test_cancel_spares_a_read_that_is_not_cancellable(tmp_path: Path) -> None:
    """A direct reload (a MIG job's) is not abandoned by a newer change; close() still ends it."""
    reader = ConfigReader(command=STUCK, timeout_s=60)
    path = tmp_path / "c.yaml"
    path.write_text(time_slicing(2))
    outcome: list[BaseException] = []

    def read() -> None:
        try:
            reader.read(path, env={}, overrides={})
        except BaseException as err:  # noqa: BLE001 - recorded for the assertion
            outcome.append(err)

    thread = threading.Thread(target=read)
    thread.start()
    time.sleep(0.3)
    reader.cancel()
    thread.join(0.5)
    assert thread.is_alive()
    reader.close()
    thread.join(5)
    assert [type(e) for e in outcome] == [ReadCancelled]


def test_stuck_reload_neither_blocks_allocate_nor_sigterm(
    config: Path, kubelet_dir: Path, tmp_path: Path, kubelet: FakeKubelet
) -> None:
    """run_forever with a reader that never answers: Allocate answers during the reload, the
    next edit abandons it, and SIGTERM (a real signal to this process) ends run_forever < 2 s."""
    reader = ConfigReader(command=STUCK, timeout_s=600)
    daemon: Daemon = make_daemon(config, kubelet_dir, tmp_path)
    daemon._reader = reader
    daemon._reloads._cancel = reader.cancel
    results: list[object] = []

    def drive() -> None:
        try:
            kubelet.wait_for_list("nvidia.com/gpu", lambda d: len(d.devices) == 32, 10)
            config.write_text(time_slicing(3))  # its reload is stuck in the reader
            time.sleep(0.6)
            began = time.perf_counter()
            kubelet.allocate("nvidia.com/gpu", 1)
            results.append(time.perf_counter() - began)
            results.append(time.monotonic())
            os.kill(os.getpid(), signal.SIGTERM)
        except BaseException as err:  # noqa: BLE001 - reported by the main thread
            results.append(err)
            daemon.request_stop()

    driver = threading.Thread(target=drive)
    driver.start()
    assert daemon.run_forever() == 0
    stopped = time.monotonic()
    driver.join(10)
    assert len(results) == 2, results
    allocate_s, signalled = results
    assert allocate_s < 0.5  # type: ignore[operator]
    assert stopped - signalled < 2.0  # type: ignore[operator]
    assert sorted(p.name for p in kubelet_dir.iterdir()) == ["kubelet.sock"]


def test_mig_parted_files_are_parsed_in_the_child(
    reader: ConfigReader, monkeypatch: pytest.MonkeyPatch
) -> None:
    """read_mig parses and validates in the child (the YAML parser of this process is
    disabled): the config comes back equal to an in-process parse; the parser's errors come
    back word for word as MigConfigError; one child answers all of them."""
    text = EXAMPLE.read_text()
    expected = parse_mig_parted(text, source="ex.yaml").select("custom-config")
    monkeypatch.setattr("sharing.mig.parted.parse_yaml", _parsed_here)
    assert reader.read_mig(text, source="ex.yaml", config="custom-config") == expected
    child = reader._child
    assert child is not None
    with pytest.raises(MigConfigError, match='^ex.yaml: version: must be "v1", got "v2"$'):
        reader.read_mig("version: v2\n", source="ex.yaml", config="a")
    with pytest.raises(MigConfigError, match='^ex.yaml: no config "nope" in mig-configs'):
        reader.read_mig(text, source="ex.yaml", config="nope")
    assert reader._child is child


def _parsed_here(*_args: object, **_kwargs: object) -> object:
    raise AssertionError("a mig-parted file was parsed in the daemon's own process")


def test_a_large_mig_parted_file_to_a_stuck_reader_is_refused_in_time() -> None:
    """A 287 KB file for a child that reads nothing: more than a pipe holds, so writing the
    request is bounded by the time limit too; a one-line MigConfigError naming the file."""
    reader = ConfigReader(command=STUCK, timeout_s=0.5)
    began = time.monotonic()
    with pytest.raises(MigConfigError, match=r"^big\.yaml: reading the mig-parted file took "
                       r"longer than 0\.5s or stopped its reader; nothing was applied$"):
        reader.read_mig(large_mig_file(), source="big.yaml", config="all-disabled")
    assert time.monotonic() - began < 2.0
    assert reader._child is None
    reader.close()
