"""sharing.nvml.atomic.write_atomic: one rename, its mode and mtime, nothing left on failure."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from sharing.nvml.atomic import write_atomic


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
