"""Child processes find gpushare in this checkout, whether or not it is installed."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.checkout import ROOT, checkout_env, gpushare_argv, python_argv

WHERE = "import plugin.cli; print(plugin.cli.__file__)"


def test_child_imports_the_checkout_from_any_directory(tmp_path: Path) -> None:
    done = subprocess.run(python_argv(WHERE), env=checkout_env(), cwd=tmp_path,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.splitlines()[0]).resolve().is_relative_to(ROOT)


def test_existing_pythonpath_is_kept_after_the_checkout(monkeypatch, tmp_path: Path) -> None:
    """Dependencies carried on PYTHONPATH (a GPU node without an install) stay reachable."""
    deps = tmp_path / "site"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(deps), str(ROOT)]))
    env = checkout_env({"EXTRA": "1"})
    assert env["PYTHONPATH"].split(os.pathsep) == [str(ROOT), str(deps)]
    assert env["EXTRA"] == "1"


def test_gpushare_command_runs_from_the_checkout(tmp_path: Path) -> None:
    done = subprocess.run(gpushare_argv("run", "--help"), env=checkout_env(), cwd=tmp_path,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert "--kubelet-dir" in done.stdout
