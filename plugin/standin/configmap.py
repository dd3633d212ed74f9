"""A ConfigMap volume the way the kubelet writes one: files updated by a `..data` symlink swap.

The kubelet's atomic writer puts every version of the files in a new timestamped directory
`<dir>/..<timestamp>/`, points `<dir>/..data_tmp` at it, renames `..data_tmp` over `..data`
(the one atomic step), and removes the old directory. Each visible file `<dir>/<name>` is a
symlink to `..data/<name>`, created once. A watch on the file itself misses the swap; a watch on
the directory sees the rename. Used by the tests and the benchmarks.
"""

from __future__ import annotations

import itertools
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path

DATA = "..data"
_counter = itertools.count()


def write_configmap(directory: Path, files: Mapping[str, str]) -> Path:
    """Publish `files` (name -> text) in `directory` as a new ConfigMap version; returns it.

    The first call creates the directory, the version and the visible symlinks; later calls
    swap `..data` to a new version and remove the previous one.
    """
    directory.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y_%m_%d_%H_%M_%S", time.gmtime())
    version = directory / f"..{stamp}.{os.getpid()}_{next(_counter)}"
    version.mkdir(mode=0o755)
    for name, text in files.items():
        (version / name).write_text(text, encoding="utf-8")
    data = directory / DATA
    previous = data.resolve() if data.is_symlink() else None
    temporary = directory / f"{DATA}_tmp"
    temporary.unlink(missing_ok=True)
    temporary.symlink_to(version.name)
    temporary.rename(data)
    for name in files:
        visible = directory / name
        if not visible.is_symlink():
            visible.symlink_to(f"{DATA}/{name}")
    if previous is not None and previous != version.resolve():
        shutil.rmtree(previous, ignore_errors=True)
    return version
