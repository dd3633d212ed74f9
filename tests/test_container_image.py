"""deployments/container/Dockerfile: what it copies is what `pip install .` reads, and the image
it makes runs `gpushare run`, without installers, as a non-root user by default."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "deployments" / "container" / "Dockerfile"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(
        line for line in text.splitlines() if not line.lstrip().startswith("#")
    ))
    out = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def stages() -> list[list[tuple[str, str]]]:
    """The instructions of each build stage, in order."""
    found: list[list[tuple[str, str]]] = []
    for word, rest in instructions(DOCKERFILE.read_text()):
        if word == "FROM":
            found.append([])
        if found:
            found[-1].append((word, rest))
    return found


def pip_install_inputs() -> set[str]:
    """Top-level paths `pip install .` reads: pyproject, readme, packages and data files."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    include = re.search(r"^include = \[(.*)\]$", pyproject, re.MULTILINE)
    assert include is not None
    packages = {name.strip(' "*') for name in include.group(1).split(",")}
    data = re.findall(r'^"share/gpushare/[^"]*" = \["([^/"]+)/', pyproject, re.MULTILINE)
    readme = re.search(r'^readme = "([^"]+)"$', pyproject, re.MULTILINE)
    assert readme is not None
    return {"pyproject.toml", readme.group(1)} | packages | set(data)


def test_the_build_stage_copies_exactly_what_pip_install_reads():
    build = stages()[0]
    copied: set[str] = set()
    for word, rest in build:
        if word == "COPY":
            *sources, _dest = shlex.split(rest)
            copied |= {s.rstrip("/") for s in sources}
    assert copied == pip_install_inputs()
    assert all((ROOT / path).exists() for path in copied)
    run = " ".join(rest for word, rest in build if word == "RUN")
    assert "python -m venv /opt/gpushare" in run
    assert "/opt/gpushare/bin/pip install --no-cache-dir ." in run


def test_the_docker_ignore_file_lets_through_what_the_build_copies():
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert "*" in lines
    assert allowed == pip_install_inputs()


def test_the_final_stage_has_the_environment_only_and_runs_gpushare_run():
    final = stages()[-1]
    assert len(stages()) == 2
    copies = [rest for word, rest in final if word == "COPY"]
    assert copies == ["--from=build /opt/gpushare /opt/gpushare"]
    run = " ".join(rest for word, rest in final if word == "RUN")
    assert "pip uninstall --yes pip" in run
    (entrypoint,) = [rest for word, rest in final if word == "ENTRYPOINT"]
    assert entrypoint == '["gpushare", "run"]'
    (user,) = [rest for word, rest in final if word == "USER"]
    assert user.isdigit()
    assert int(user) != 0
    env = " ".join(rest for word, rest in final if word == "ENV")
    assert "PATH=/opt/gpushare/bin:$PATH" in env
    assert 'gpushare = "plugin.cli:main"' in (ROOT / "pyproject.toml").read_text()
