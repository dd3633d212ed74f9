"""Where the `nvidia-cuda-mps-control` stand-in lives, and the argv that runs it."""

from __future__ import annotations

import sys
from pathlib import Path

STANDIN = Path(__file__).resolve().with_name("standin.py")


def standin_argv() -> tuple[str, ...]:
    """Run the stand-in with this interpreter (no PATH or shebang lookup needed)."""
    return (sys.executable, str(STANDIN))
