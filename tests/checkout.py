"""Child processes that run gpushare from this checkout, installed or not.

A test that starts Python code of the project as a subprocess (`python -m plugin.cli run`, a
snippet importing `sharing`) must not depend on gpushare being installed in the interpreter:
on a GPU node the project is often only a checkout, its dependencies on PYTHONPATH. So the
child gets the checkout first on PYTHONPATH, with whatever PYTHONPATH already held kept after it
(where the dependencies may live), and this interpreter.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def checkout_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment, the checkout first on PYTHONPATH, then `extra`."""
    env = dict(os.environ)
    kept = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(ROOT)]
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *kept])
    env.update(extra or {})
    return env


def gpushare_argv(*args: str) -> list[str]:
    """argv of the `gpushare` command line from the checkout, with this interpreter."""
    return [sys.executable, "-m", "plugin.cli", *args]


def python_argv(code: str, *args: str) -> list[str]:
    """argv running a Python snippet with this interpreter."""
    return [sys.executable, "-c", code, *args]
