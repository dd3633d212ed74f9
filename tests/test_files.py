"""sharing.nvml.files: write_atomic (one rename, its mode and mtime, nothing left on failure)
and the bounded, non-blocking readers of the files gpushare is given or keeps."""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from plugin.daemon.mig_history import JobStore
from sharing.errors import MigConfigError, MigJournalError
from sharing.nvml.files import UnreadableFile, read_regular_text, write_atomic
from sharing.nvml.mig_apply import load_mig_file
from sharing.nvml.mig_journal import read_journal


def test_replaces_the_file_with_mode_mtime_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "state.json"
    write_atomic(target, "old")
    write_atomic(target, b"new", mode=0o644, durable=True, mtime_ns=1_000_000_000)
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert target.stat().st_mtime_ns == 1_000_000_000
    assert sorted(p.name for p in target.parent.iterdir()) == ["state.json"]


def test_default_mode_is_private(tmp_path: Path) -> None:
    target = tmp_path / "journal.json"
    write_atomic(target, "{}")
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


def test_a_failed_rename_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "labels"
    target.mkdir()  # a directory where the file should go: the rename fails
    (target / "keep").write_text("x")
    with pytest.raises(IsADirectoryError):
        write_atomic(target, "a=1\n")
    assert (target / "keep").read_text() == "x"
    assert [p.name for p in tmp_path.iterdir()] == ["labels"]


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        pytest.param(lambda p: os.mkfifo(p), "not a regular file (a FIFO)", id="FIFO"),
        pytest.param(lambda p: p.symlink_to("/dev/zero"),
                     "not a regular file (a character device)", id="link to /dev/zero"),
        pytest.param(lambda p: p.write_bytes(b"x" * 101),
                     "the file is larger than 100 bytes, the limit for a mig-parted file",
                     id="too large"),
        pytest.param(lambda p: p.write_bytes(b"\xff\xfe"), "not a text file (not UTF-8 at byte 0",
                     id="binary"),
        pytest.param(lambda p: None, "cannot read the mig-parted file: No such file or directory",
                     id="missing"),
    ],
)
def test_read_regular_text_refuses_in_one_line(tmp_path: Path, make, expected) -> None:
    path = tmp_path / "f.yaml"
    make(path)
    with pytest.raises(UnreadableFile) as caught:
        read_regular_text(path, 100, "mig-parted file")
    assert str(caught.value).startswith(expected)


def test_a_mig_parted_fifo_is_refused_not_waited_on(tmp_path: Path) -> None:
    fifo = tmp_path / "mig.yaml"
    os.mkfifo(fifo)
    with pytest.raises(MigConfigError, match=r"mig.yaml: not a regular file \(a FIFO\)$"):
        load_mig_file(fifo)


def _returns_promptly(call: Callable[[], object], fifo: Path) -> object:
    """The result (or exception) of `call`; fails when it blocks. A reader left waiting on the
    FIFO is released by opening its other end."""
    out: list[object] = []

    def target() -> None:
        try:
            out.append(call())
        except Exception as err:  # noqa: BLE001 - handed to the test
            out.append(err)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(5)
    if thread.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(5)
        pytest.fail(f"reading {fifo.name} waited on the FIFO")
    return out[0]


def test_a_fifo_as_the_mig_journal_is_refused_not_waited_on(tmp_path: Path) -> None:
    """The journal is read at every start and MIG apply: a FIFO there blocked them forever."""
    fifo = tmp_path / "mig-journal.json"
    os.mkfifo(fifo)
    err = _returns_promptly(lambda: read_journal(fifo), fifo)
    assert isinstance(err, MigJournalError)
    assert "cannot read the MIG journal: not a regular file (a FIFO)" in str(err)


def test_a_fifo_as_the_job_history_is_moved_aside_not_waited_on(tmp_path: Path) -> None:
    """The job history is read before serving: a FIFO there blocked the start forever."""
    fifo = tmp_path / "mig-jobs.json"
    os.mkfifo(fifo)
    store = JobStore(tmp_path)
    assert _returns_promptly(store.open, fifo) is None
    assert stat.S_ISFIFO(os.lstat(tmp_path / "mig-jobs.json.corrupt").st_mode)
    assert store.new_id() == 1


def test_a_fifo_as_the_active_job_file_is_refused_not_waited_on(tmp_path: Path) -> None:
    fifo = tmp_path / "mig-job-active.json"
    os.mkfifo(fifo)
    err = _returns_promptly(JobStore(tmp_path).active, fifo)
    assert isinstance(err, ValueError)
    assert "unreadable (not a regular file (a FIFO))" in str(err)


def test_a_state_directory_others_can_write_is_refused(tmp_path: Path) -> None:
    """Whoever can write the state directory could plant a MIG journal the next start acts
    on: such a directory is refused (the daemon stops, or disables MIG jobs for the default
    path, saying why)."""
    shared = tmp_path / "state"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(OSError, match=r"writable by group or others \(mode 0777\)"):
        JobStore(shared).open()
    os.chown(shared, 65534, 65534)
    shared.chmod(0o700)
    with pytest.raises(OSError, match="owned by uid 65534, not by root or us"):
        JobStore(shared).open()


def test_write_atomic_never_replaces_a_fifo_device_or_directory(tmp_path: Path) -> None:
    """An output path naming a FIFO (or /dev/null, or a directory) is refused in one line and
    left as it was; a symbolic link is replaced like a file."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(OSError, match=r"exists and is a FIFO, not a regular file: not replaced"):
        write_atomic(fifo, "x=1\n")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    directory = tmp_path / "dir"
    directory.mkdir()
    with pytest.raises(OSError, match="exists and is a directory"):
        write_atomic(directory, "x=1\n")
    assert directory.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "fifo"]  # no temporary left
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "target")
    write_atomic(link, "x=1\n")
    assert not link.is_symlink()
    assert link.read_text() == "x=1\n"


def test_write_atomic_under_a_file_says_which_is_not_a_directory(tmp_path: Path) -> None:
    """A file where the target's directory must be: `... is not a directory`, not mkdir's
    `File exists`."""
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match=f"{tmp_path}/file is not a directory"):
        write_atomic(tmp_path / "file" / "gfd", "x=1\n")
