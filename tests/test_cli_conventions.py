"""CLI conventions: --version, logging options anywhere, JSON log lines, `sim kubelet`,
and `run` creating a missing kubelet directory only when asked."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from plugin import version
from plugin.cli import build_parser, main
from plugin.cli.logs import JsonFormatter
from sharing.nvml.sim import create_state
from tests.test_metrics import wait_until
from tests.test_reload import time_slicing

ROOT = Path(__file__).resolve().parents[1]


def child_env() -> dict[str, str]:
    """The environment for a child, read now: with conftest's METRICS_ADDRESS and
    GFD_OUTPUT_FILE, so a child `gpushare run` binds no port and writes no labels file."""
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def gpushare(*args: str, **kwargs: object) -> subprocess.Popen[str]:
    """`gpushare ARGS` as a child process (`python -m plugin.cli`), output captured."""
    return subprocess.Popen(
        [sys.executable, "-m", "plugin.cli", *args], cwd=ROOT, env=child_env(), text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs,  # type: ignore[arg-type]
    )


def test_version_is_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    declared = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    assert declared is not None
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"gpushare {declared.group(1)}\n"


@pytest.mark.parametrize(
    ("argv", "level", "fmt"),
    [
        pytest.param(["run"], "INFO", "text", id="defaults"),
        pytest.param(["--log-level", "DEBUG", "run"], "DEBUG", "text", id="before the command"),
        pytest.param(["run", "--log-level", "DEBUG"], "DEBUG", "text", id="after the command"),
        pytest.param(["--log-level", "ERROR", "run", "--log-format", "json"], "ERROR", "json",
                     id="one before, one after"),
        pytest.param(["sim", "show", "--node", "x", "--log-level", "WARNING"], "WARNING", "text",
                     id="after a nested command"),
    ],
)
def test_logging_options_anywhere(argv: list[str], level: str, fmt: str) -> None:
    args = build_parser().parse_args(argv)
    assert (args.log_level, args.log_format) == (level, fmt)


def test_log_level_after_the_command_takes_effect() -> None:
    """`gpushare sim create … --log-level WARNING` vs DEBUG: what reaches stderr changes."""
    loud = subprocess.run(
        [sys.executable, "-c", "import logging, sys; from plugin.cli import main;"
         "sys.exit(main(sys.argv[1:]) or logging.getLogger('gpushare.x').debug('shown'))",
         "sim", "nodes", "--log-level", "DEBUG", "--log-format", "json"],
        cwd=ROOT, env=child_env(), capture_output=True, text=True, check=True,
    )  # fmt: skip
    [record] = [json.loads(line) for line in loud.stderr.splitlines()]
    assert (record["level"], record["logger"], record["message"]) == (
        "DEBUG", "gpushare.x", "shown"
    )
    quiet = subprocess.run(
        [sys.executable, "-c", "import logging, sys; from plugin.cli import main;"
         "sys.exit(main(sys.argv[1:]) or logging.getLogger('gpushare.x').debug('shown'))",
         "sim", "nodes", "--log-level", "INFO"],
        cwd=ROOT, env=child_env(), capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert quiet.stderr == ""


def test_json_formatter_fields_and_exception() -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        record = logging.getLogger("gpushare.t").makeRecord(
            "gpushare.t", logging.ERROR, __file__, 1, "gpu %d lost", (3,), sys.exc_info(),
            extra={"gpu": 3, "resource": "nvidia.com/gpu"},
        )
    line = JsonFormatter().format(record)
    assert "\n" not in line
    out = json.loads(line)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", out["time"])
    assert {k: out[k] for k in ("level", "logger", "message", "gpu", "resource")} == {
        "level": "ERROR", "logger": "gpushare.t", "message": "gpu 3 lost", "gpu": 3,
        "resource": "nvidia.com/gpu",
    }
    assert "RuntimeError: boom" in out["exception"]
    assert "device" not in out


def test_sim_kubelet_and_run_in_two_terminals(tmp_path: Path) -> None:
    """The README's trial: `sim kubelet --dir D` in one process, `run --kubelet-dir D` in
    another; the stand-in prints the registration and the lists; SIGTERM stops both cleanly."""
    node = create_state("dgx-a100", tmp_path / "node")
    config = tmp_path / "config.yaml"
    config.write_text(time_slicing(4))
    kubelet_dir = Path(f"/tmp/gs-kub-{os.getpid()}")  # short: unix socket paths
    standin = gpushare("sim", "kubelet", "--dir", str(kubelet_dir))
    run = None
    try:
        wait_until(lambda: (kubelet_dir / "kubelet.sock").exists(), timeout_s=20)
        run = gpushare("run", "--node", str(node), "--config", str(config), "--kubelet-dir",
                       str(kubelet_dir))
        wait_until(lambda: (kubelet_dir / "gpushare-gpu.sock").exists(), timeout_s=20)
        subprocess.run([sys.executable, "-m", "plugin.cli", "sim", "inject-xid", "--node",
                        str(node), "--gpu", "2", "--xid", "79"], cwd=ROOT, env=child_env(),
                       check=True, capture_output=True)
        run.send_signal(signal.SIGTERM)
        assert run.wait(10) == 0
    finally:
        standin.send_signal(signal.SIGTERM)
        out, err = standin.communicate(timeout=10)
        if run is not None and run.poll() is None:
            run.kill()
    assert standin.returncode == 0, err
    lines = out.splitlines()
    assert lines[0] == f"kubelet stand-in serving {kubelet_dir}/kubelet.sock; Ctrl-C stops it"
    assert "registered nvidia.com/gpu (endpoint gpushare-gpu.sock)" in lines
    assert "nvidia.com/gpu: 32 devices, 32 healthy" in lines
    assert any(line.startswith("nvidia.com/gpu: 32 devices, 28 healthy, 4 unhealthy (GPU-")
               for line in lines)
    assert lines[-1] == "kubelet stand-in stopped"
    assert not (kubelet_dir / "kubelet.sock").exists()
    kubelet_dir.rmdir()


def test_run_says_how_to_create_a_missing_kubelet_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    node = create_state("dgx-a100", tmp_path / "node")
    missing = tmp_path / "device-plugins"
    assert main(["run", "--node", str(node), "--kubelet-dir", str(missing)]) == 1
    err = capsys.readouterr().err
    assert f"kubelet directory {missing} does not exist" in err
    assert "--create-kubelet-dir creates it" in err
    assert not missing.exists()


def test_run_creates_the_kubelet_dir_when_asked(tmp_path: Path) -> None:
    node = create_state("dgx-a100", tmp_path / "node")
    kubelet_dir = Path(f"/tmp/gs-new-{os.getpid()}") / "device-plugins"
    run = gpushare("run", "--node", str(node), "--kubelet-dir", str(kubelet_dir),
                   "--create-kubelet-dir")
    try:
        wait_until(lambda: (kubelet_dir / "gpushare-gpu.sock").exists(), timeout_s=20)
        assert oct(kubelet_dir.stat().st_mode & 0o777) == "0o750"
        run.send_signal(signal.SIGTERM)
        _, err = run.communicate(timeout=10)
        assert run.returncode == 0
        assert f"created the kubelet directory {kubelet_dir}" in err
        assert (f"INFO gpushare.daemon: gpushare {version()} starting: 8 GPUs"
                f" (NVIDIA A100-SXM4-40GB), config none (every default), kubelet directory"
                f" {kubelet_dir}\n") in err
    finally:
        if run.poll() is None:
            run.kill()
        for path in (kubelet_dir, kubelet_dir.parent):
            if path.exists():
                path.rmdir()


def test_log_in_the_config_directory_does_not_feed_itself(tmp_path: Path) -> None:
    """`run`'s log written beside its config: the watched directory changes with every log
    line, and each change must not log another line (watchfiles' "1 change detected" at INFO
    did, without end); a reload still says what it did, and json lines parse."""
    node = create_state("dgx-a100", tmp_path / "node")
    config = tmp_path / "etc" / "config.yaml"
    config.parent.mkdir()
    config.write_text(time_slicing(4))
    log_path = config.parent / "run.log"
    kubelet_dir = Path(f"/tmp/gs-log-{os.getpid()}")
    kubelet_dir.mkdir()
    with log_path.open("w") as log_file:
        run = subprocess.Popen(
            [sys.executable, "-m", "plugin.cli", "run", "--node", str(node), "--config",
             str(config), "--kubelet-dir", str(kubelet_dir), "--log-format", "json"],
            cwd=ROOT, env=child_env(), text=True, stdout=subprocess.DEVNULL, stderr=log_file,
        )  # fmt: skip
        try:
            wait_until(lambda: (kubelet_dir / "gpushare-gpu.sock").exists(), timeout_s=20)
            config.write_text(time_slicing(2))
            wait_until(lambda: "now has 16 devices" in log_path.read_text(), timeout_s=20)
            (config.parent / "unrelated").write_text("x")
            size = log_path.stat().st_size
            time.sleep(1.0)  # a feeding log would grow by several lines a second
            assert log_path.stat().st_size == size
            run.send_signal(signal.SIGTERM)
            assert run.wait(10) == 0
        finally:
            if run.poll() is None:
                run.kill()
                run.wait(10)
            shutil.rmtree(kubelet_dir, ignore_errors=True)
    records = [json.loads(line) for line in log_path.read_text().splitlines()]
    loggers = {record["logger"] for record in records}
    assert not {name for name in loggers if not name.startswith("gpushare.")}, loggers
    [changed] = [r for r in records if "now has" in r["message"]]
    assert changed["resource"] == "nvidia.com/gpu"


def test_chatty_libraries_speak_at_debug(tmp_path: Path) -> None:
    """watchfiles' and apscheduler's INFO lines show with --log-level DEBUG only."""
    script = (
        "import logging, sys; from plugin.cli import main; main(sys.argv[1:]);"
        "logging.getLogger('watchfiles.main').info('1 change detected');"
        "logging.getLogger('apscheduler.scheduler').info('Scheduler started')"
    )
    for level, shown in (("INFO", False), ("DEBUG", True)):
        out = subprocess.run(
            [sys.executable, "-c", script, "sim", "nodes", "--log-level", level],
            cwd=ROOT, env=child_env(), capture_output=True, text=True, check=True,
        )  # fmt: skip
        assert ("1 change detected" in out.stderr) is shown
        assert ("Scheduler started" in out.stderr) is shown


def run_help_options(capsys: pytest.CaptureFixture[str]) -> dict[str, set[str]]:
    """`gpushare run --help`: each option string with the environment variables its help names
    (`$CONFIG_FILE`, `[... env MIG_STRATEGY]`)."""
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = capsys.readouterr().out.split("\noptions:\n", 1)[1]
    out: dict[str, set[str]] = {}
    for entry in re.split(r"\n(?=  -)", text):
        head = re.split(r"\s{2,}", entry.strip(), maxsplit=1)[0]
        words = " ".join(entry.split())
        envs = set(re.findall(r"\benv ([A-Z_]+)", words)) | set(re.findall(r"\$([A-Z_]+)", words))
        for flag in re.findall(r"--[a-z][a-z-]*", head):
            out[flag] = envs
    return out


def readme_table(header: str) -> list[list[str]]:
    """The cells of the README table whose header row is `header` (the one such table)."""
    lines = (ROOT / "README.md").read_text().splitlines()
    assert lines.count(header) == 1, header
    rows = []
    for line in lines[lines.index(header) + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]])
    return rows


def test_every_run_option_is_in_the_readme_table(capsys: pytest.CaptureFixture[str]) -> None:
    """The README's option table lists every `run` option, no other, each with the
    environment variable its --help names."""
    documented: dict[str, set[str]] = {}
    for option, env, _ in readme_table("| option | environment | meaning |"):
        names = set(re.findall(r"`([A-Z_]+)`", env))
        for flag in re.findall(r"--(?:\[no-\])?[a-z][a-z-]*", option):
            for spelled in ({flag.replace("[no-]", ""), flag.replace("[no-]", "no-")}
                            if "[no-]" in flag else {flag}):
                documented[spelled] = names
    offered = run_help_options(capsys)
    offered.pop("--help")
    assert sorted(set(offered) - set(documented)) == [], "run options missing from the README"
    assert sorted(set(documented) - set(offered)) == [], "README options run does not have"
    wrong = {flag: (envs, documented[flag]) for flag, envs in offered.items()
             if envs != documented[flag]}
    assert wrong == {}, "environment variables: --help's, the README's"


def test_every_chart_value_is_in_the_readme() -> None:
    """Each top-level key of the chart's values.yaml is named in the README's values table."""
    import yaml

    values = yaml.safe_load((ROOT / "deployments/helm/gpushare/values.yaml").read_text())
    named = {
        re.split(r"[.\[]", name)[0]
        for row in readme_table("| value | default | meaning |")
        for name in re.findall(r"`([A-Za-z][\w.]*)`", row[0])
    }
    assert sorted(set(values) - named) == []


@pytest.mark.parametrize(
    ("option", "where", "message"),
    [
        pytest.param("--control-socket", "afile/run/control.sock",
                     "control socket {path}: cannot create its directory: Not a directory",
                     id="control socket under a file"),
        pytest.param("--control-socket", "afile/control.sock",
                     "control socket {path}: Not a directory", id="control socket in a file"),
        pytest.param("--state-dir", "afile/state", "state directory {path}: Not a directory",
                     id="state directory under a file"),
    ],
)
def test_run_says_which_path_it_cannot_use(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str, where: str, message: str
) -> None:
    """A path given on the command line that cannot be used stops the start with one line
    naming the option's path and the reason; no socket is left behind."""
    node = create_state("dgx-a100", tmp_path / "node")
    (tmp_path / "afile").write_text("")
    kubelet_dir = tmp_path / "kubelet"
    kubelet_dir.mkdir()
    path = tmp_path / where
    status = main(["run", "--node", str(node), "--kubelet-dir", str(kubelet_dir), option,
                   str(path)])  # fmt: skip
    assert status == 1
    assert capsys.readouterr().err.splitlines() == [f"gpushare run: {message.format(path=path)}"]
    assert list(kubelet_dir.iterdir()) == []


@pytest.fixture
def unreadable_node() -> Iterator[Path]:
    """A simulated node's state directory whose files (mode 0) this user cannot open; as root,
    children run without capabilities (see unprivileged), so mode 0 holds for them too."""
    top = Path(f"/tmp/gs-perm-{os.getpid()}")
    top.mkdir(mode=0o755)
    try:
        state = create_state("dgx-a100", top / "node")
        for name in ("state.json", "lock"):
            (state / name).chmod(0)
        yield state
    finally:
        shutil.rmtree(top)


def unprivileged() -> list[str]:
    """A command prefix that takes every capability from root (which ignores file modes through
    CAP_DAC_OVERRIDE); none otherwise. The child stays uid 0, so it can still read the checkout
    and its .venv wherever they are (a clone in a private 0700 directory, as CI makes)."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv (util-linux): cannot drop root's rights")
    return [setpriv, "--bounding-set=-all", "--inh-caps=-all"]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        pytest.param(["plan", "--node", "{node}"],
                     "cannot read the node: {node}/state.json: Permission denied", id="plan"),
        pytest.param(["mig", "plan", "-f", "configs/mig-parted.yaml", "-c", "all-balanced",
                      "--node", "{node}"],
                     "gpushare mig plan: {node}/state.json: Permission denied", id="mig plan"),
        pytest.param(["mig", "export", "--node", "{node}"],
                     "gpushare mig export: {node}/state.json: Permission denied", id="mig export"),
        pytest.param(["sim", "lose", "--node", "{node}", "--gpu", "1"],
                     "gpushare sim lose: {node}/lock: Permission denied", id="sim lose"),
        pytest.param(["run", "--node", "dgx-a100", "--kubelet-dir", "{kubelet}"],
                     "gpushare run: kubelet directory {kubelet}: no permission to create sockets"
                     " there (the kubelet's directory belongs to root: run gpushare as root)",
                     id="run, kubelet directory not writable"),
    ],
)
def test_no_permission_is_one_line_naming_the_path(
    unreadable_node: Path, argv: list[str], expected: str
) -> None:
    """Files the user may not open: one line naming the file, a non-zero exit, no traceback."""
    kubelet = unreadable_node.parent / "kubelet"
    kubelet.mkdir(mode=0o555)
    fill = {"node": str(unreadable_node), "kubelet": str(kubelet)}
    result = subprocess.run(
        [*unprivileged(), sys.executable, "-m", "plugin.cli",
         *(arg.format(**fill) for arg in argv)],
        cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0
    assert result.stderr.splitlines() == [expected.format(**fill)]


def test_run_refuses_a_name_too_long_for_its_socket(
    tmp_path: Path, kubelet_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`plan` cannot know the kubelet directory; `run` checks the socket paths before serving:
    exit 2 (a config error) with one line naming the resource, no socket made."""
    from tests.test_reload import long_name

    node = create_state("dgx-a100", tmp_path / "node")
    kubelet_dir = kubelet_dir / ("d" * 30)  # as long as /var/lib/kubelet/device-plugins
    kubelet_dir.mkdir()
    name = long_name(kubelet_dir)
    config = tmp_path / "config.yaml"
    config.write_text(time_slicing(2).replace(
        "- name: nvidia.com/gpu\n", f"- name: nvidia.com/gpu\n        rename: {name}\n"))
    status = main(["run", "--node", str(node), "--config", str(config), "--kubelet-dir",
                   str(kubelet_dir)])  # fmt: skip
    assert status == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"gpushare run: {config}: {name}: its socket {kubelet_dir}/gpushare-g")
    assert list(kubelet_dir.iterdir()) == []


def test_a_simulated_node_keeps_its_labels_under_its_host_directory(tmp_path: Path) -> None:
    """`run --node DIR` without a labels path or CDI spec directory writes the default files
    under DIR/host/, as its journal and control socket, never the machine's NFD or CDI
    directory; a stop removes them."""
    node = create_state("dgx-a100", tmp_path / "node")
    labels = node / "host/etc/kubernetes/node-feature-discovery/features.d/gfd"
    cdi_spec = node / "host/var/run/cdi/k8s.device-plugin.nvidia.com-gpu.yaml"
    config = tmp_path / "config.yaml"
    config.write_text("version: v1\nflags:\n  plugin:\n    deviceListStrategy: cdi-annotations\n")
    kubelet_dir = Path(f"/tmp/gs-lab-{os.getpid()}")
    kubelet_dir.mkdir()
    env = {k: v for k, v in child_env().items() if k not in ("GFD_OUTPUT_FILE", "CDI_SPEC_DIR")}
    run = subprocess.Popen(
        [sys.executable, "-m", "plugin.cli", "run", "--node", str(node), "--kubelet-dir",
         str(kubelet_dir), "--config", str(config)],
        cwd=ROOT, env=env, text=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        wait_until(labels.exists, timeout_s=20)
        assert "nvidia.com/gpu.count=8" in labels.read_text().splitlines()
        wait_until(cdi_spec.exists, timeout_s=20)
        run.send_signal(signal.SIGTERM)
        _, err = run.communicate(timeout=10)
        assert run.returncode == 0, err
        assert f"node labels written to {labels} (8 labels)" in err
        assert not labels.exists()
        assert not cdi_spec.exists()
    finally:
        if run.poll() is None:
            run.kill()
            run.wait(10)
        shutil.rmtree(kubelet_dir, ignore_errors=True)
