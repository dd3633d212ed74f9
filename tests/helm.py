"""A real `helm` for the chart tests: the pinned binary that scripts/install-helm builds."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "deployments" / "helm" / "gpushare"
INSTALL_HELM = ROOT / "scripts" / "install-helm"
# Chart.yaml asks for Kubernetes >= 1.30; helm built with `go install` assumes an older one.
KUBE_VERSION = "1.30.0"


def install_helm(echo: bool) -> Path:
    """Run scripts/install-helm (builds helm with Go once per machine) and return the binary.

    Raises:
        RuntimeError: the script failed (for example Go is missing); its message is included.
    """
    proc = subprocess.Popen(
        [str(INSTALL_HELM)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stderr is not None
    assert proc.stdout is not None
    err_lines = []
    for line in proc.stderr:
        err_lines.append(line)
        if echo:
            sys.stderr.write(line)
    out = proc.stdout.read().strip()
    if proc.wait() != 0 or not out:
        raise RuntimeError(
            f"scripts/install-helm failed with exit status {proc.returncode}:\n"
            + "".join(err_lines[-30:])
        )
    return Path(out)


@dataclass(frozen=True)
class Helm:
    """The helm binary with its own empty config, cache and data directories."""

    binary: Path
    home: Path

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        """`helm ARGS`; never raises on a non-zero exit."""
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.home),
            "HELM_CACHE_HOME": str(self.home / "cache"),
            "HELM_CONFIG_HOME": str(self.home / "config"),
            "HELM_DATA_HOME": str(self.home / "data"),
        }
        return subprocess.run(
            [str(self.binary), *args], capture_output=True, text=True, env=env, timeout=120
        )

    def template_args(self, values: Path | None, sets: tuple[str, ...]) -> list[str]:
        """Arguments after `helm template|lint` for one scenario."""
        args = ["--kube-version", KUBE_VERSION]
        if values is not None:
            args += ["--values", str(values)]
        for item in sets:
            args += ["--set", item]
        return args

    def template(
        self, values: Path | None = None, sets: tuple[str, ...] = (), namespace: str = "gpushare"
    ) -> subprocess.CompletedProcess[str]:
        """`helm template gpushare CHART` for one scenario."""
        return self.run(
            "template", "gpushare", str(CHART), "--namespace", namespace,
            *self.template_args(values, sets),
        )

    def render(self, values: Path | None = None, sets: tuple[str, ...] = ()) -> list[dict]:
        """The rendered documents of one scenario; AssertionError with helm's message on failure."""
        proc = self.template(values, sets)
        assert proc.returncode == 0, f"helm template failed:\n{proc.stderr}"
        assert proc.stderr == "", f"helm template warned:\n{proc.stderr}"
        return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]
