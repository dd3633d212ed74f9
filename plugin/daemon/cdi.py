"""Every CDI name gpushare hands out resolves: its CDI spec, kept in the CDI spec directory.

With deviceListStrategy cdi-annotations or cdi-cri, Allocate names devices `<kind>=<id>`. For the
default kind `k8s.device-plugin.nvidia.com/gpu`, gpushare writes
`<spec dir>/k8s.device-plugin.nvidia.com-gpu.yaml` at start and after every plan change
(validated, then atomically replaced) and removes it on a clean stop. The container edits come
from `nvidia-ctk cdi generate` when it runs (no shell, bounded time and output, JSON parsed, its
edits reused by UUID for gpushare's names); otherwise each device gets its nodes and
`NVIDIA_VISIBLE_DEVICES`, and the driver libraries come from the NVIDIA runtime hook.
With `cdiKind: nvidia.com/gpu` gpushare names the toolkit's own devices and writes nothing; it
checks that each name it hands out is defined by a spec file in the CDI directories.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from plugin.daemon.allocate import existing_control_nodes
from plugin.daemon.cdi_spec import (
    KIND_PLUGIN,
    KIND_TOOLKIT,
    CdiError,
    NamedDevice,
    SpecDoc,
    SpecValidator,
    ToolkitSpec,
    advertised_devices,
    build_spec,
    parse_toolkit_spec,
    spec_file_name,
)
from sharing.config import Config
from sharing.nvml.files import UnreadableFile, read_regular_text, write_atomic
from sharing.plan_types import Plan
from sharing.text import shorten
from sharing.yaml_text import YamlLimits, parse_yaml

log = logging.getLogger("gpushare.cdi")

DEFAULT_SPEC_DIR = Path("/var/run/cdi")
CDI_SPEC_DIR_ENV = "CDI_SPEC_DIR"
ETC_CDI = Path("/etc/cdi")  # CDI's other default directory (static specs)
CDI_STRATEGIES = frozenset({"cdi-annotations", "cdi-cri"})
STANDIN = Path(__file__).resolve().parents[1] / "standin" / "nvidia_ctk.py"
GENERATOR_TIMEOUT_S = 60.0
MAX_GENERATOR_OUTPUT_BYTES = 16 << 20
MAX_STDERR_BYTES = 64 << 10
MAX_SPEC_FILE_BYTES = 16 << 20
# A toolkit spec of a large node lists a few thousand mounts and device nodes.
CDI_YAML_LIMITS = YamlLimits(
    max_bytes=MAX_SPEC_FILE_BYTES, max_depth=32, max_values=1_000_000, max_scalar_chars=4096
)
NAMES_QUOTED = 5  # device names quoted in one message


@dataclass(frozen=True)
class GeneratorRun:
    """Exit status and output of one generator run."""

    returncode: int
    stdout: str
    stderr: str


def run_bounded(
    argv: Sequence[str], *, env: Mapping[str, str], timeout_s: float, max_bytes: int
) -> GeneratorRun:
    """Run `argv` without a shell, killed (with its session) past `timeout_s` or `max_bytes`.

    Raises:
        OSError: argv[0] cannot be executed.
        CdiError: it ran too long or printed too much.
    """
    proc = subprocess.Popen(  # noqa: S603 - argv list, no shell
        list(argv), env=dict(env), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, close_fds=True, start_new_session=True,
    )
    out, err = bytearray(), bytearray()
    deadline = time.monotonic() + timeout_s
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ, out)  # type: ignore[arg-type]
            sel.register(proc.stderr, selectors.EVENT_READ, err)  # type: ignore[arg-type]
            while sel.get_map():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CdiError(f"timed out after {timeout_s:g} s")
                for key, _ in sel.select(left):
                    chunk = os.read(key.fd, 1 << 16)
                    if not chunk:
                        sel.unregister(key.fileobj)
                    key.data.extend(chunk)
                if len(out) > max_bytes:
                    raise CdiError(f"printed more than {max_bytes} bytes")
                del err[:-MAX_STDERR_BYTES]
        returncode = proc.wait(max(deadline - time.monotonic(), 0.01))
    except (CdiError, subprocess.TimeoutExpired) as problem:
        _kill(proc)
        if isinstance(problem, CdiError):
            raise
        raise CdiError(f"timed out after {timeout_s:g} s") from problem
    except BaseException:
        _kill(proc)
        raise
    finally:
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
    return GeneratorRun(returncode, out.decode(errors="replace"), err.decode(errors="replace"))


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL our child's session (the generator and anything it started) and reap it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def generator_argv(nvml_lib: object, config: Config) -> tuple[str, ...]:
    """The toolkit program: nvidiaCTKPath; on a simulated node, unless set, the stand-in."""
    from sharing.nvml.sim import SimNvml

    plugin = config.flags.plugin
    if "nvidia_ctk_path" not in plugin.model_fields_set and isinstance(nvml_lib, SimNvml):
        return (sys.executable, str(STANDIN), "--node", str(nvml_lib.state_dir))
    return (plugin.nvidia_ctk_path,)


def defined_devices(dirs: Sequence[Path], kind: str) -> set[str]:
    """Device names that the spec files (*.yaml, *.json) in `dirs` define for `kind`."""
    names: set[str] = set()
    for folder in dirs:
        with contextlib.suppress(OSError):
            files = sorted(p for p in folder.iterdir() if p.suffix in (".yaml", ".json"))
            for path in files:
                doc = _read_spec_file(path)
                if isinstance(doc, dict) and doc.get("kind") == kind:
                    devices = doc.get("devices") if isinstance(doc.get("devices"), list) else []
                    names.update(
                        str(d["name"]) for d in devices if isinstance(d, dict) and "name" in d
                    )
    return names


def _read_spec_file(path: Path) -> Any:
    """A spec file's parsed content, or None when it is not a regular file, too large, or not
    YAML/JSON within CDI_YAML_LIMITS (a FIFO or an alias bomb in the spec directory is skipped,
    not waited on or expanded)."""
    try:
        return parse_yaml(read_regular_text(path, MAX_SPEC_FILE_BYTES, "CDI spec file"),
                          limits=CDI_YAML_LIMITS)
    except (UnreadableFile, yaml.YAMLError, ValueError) as err:
        log.debug("CDI spec file %s skipped: %s", path, shorten(str(err), 200))
        return None


def write_atomically(path: Path, text: str) -> None:
    """Replace `path` by a file holding `text` (mode 0644) in one rename; no partial file."""
    write_atomic(path, text, mode=0o644, durable=True)


@dataclass(frozen=True)
class CdiUpdate:
    """What `CdiSpecs.commit` does: write `spec`, else remove gpushare's file; report `problem`."""

    spec: SpecDoc | None = None
    problem: str = ""
    source: str = ""  # where the edits came from, for the log


class CdiSpecs:
    """gpushare's CDI spec: built for each Plan (`prepare`), written with it (`commit`)."""

    def __init__(
        self,
        *,
        spec_dir: Path,
        generator: Callable[[Config], Sequence[str]],
        env: Mapping[str, str],
        toolkit_dirs: Sequence[Path] | None = None,
        timeout_s: float = GENERATOR_TIMEOUT_S,
    ) -> None:
        self.spec_dir = Path(spec_dir)
        self.path = self.spec_dir / spec_file_name(KIND_PLUGIN)
        self.toolkit_dirs = tuple(toolkit_dirs) if toolkit_dirs else (ETC_CDI, self.spec_dir)
        self._generator = generator
        self._env = dict(env)
        self._timeout_s = timeout_s
        self._validator = SpecValidator.vendored()
        self._lock = threading.Lock()
        self._cache: tuple[tuple[str, ...], ToolkitSpec] | None = None
        self._fallback_reason: str | None = None

    def prepare(self, plan: Plan, config: Config) -> CdiUpdate:
        """The spec for `plan` (may run the generator; call it off the serving path)."""
        options = plan.options
        if not CDI_STRATEGIES & set(options.device_list_strategy):
            return CdiUpdate()
        named = advertised_devices(plan)
        if options.cdi_kind == KIND_TOOLKIT:
            return CdiUpdate(problem=self._missing_in_toolkit_specs(named))
        if not named:
            return CdiUpdate()
        with self._lock:
            toolkit = self._toolkit_spec(config, named)
        control = existing_control_nodes(options.nvidia_dev_root)
        build = {"dev_root": options.nvidia_dev_root, "control_nodes": control}
        spec, not_found = build_spec(KIND_PLUGIN, named, toolkit=toolkit, **build)
        if not_found:
            log.warning("CDI: nvidia-ctk's spec has no device for %s: their own nodes are used",
                        _quote(not_found))
        problems = self._validator.problems(spec)
        if problems and toolkit is not None:
            self._note_fallback(f"the spec built from its output is invalid: {problems[0]}")
            spec, _ = build_spec(KIND_PLUGIN, named, toolkit=None, **build)
            toolkit, problems = None, self._validator.problems(spec)
        if problems:
            return CdiUpdate(problem=f"CDI spec for {KIND_PLUGIN} is invalid: {problems[0]}")
        return CdiUpdate(spec=spec, source="nvidia-ctk" if toolkit else "device nodes")

    def commit(self, update: CdiUpdate, *, strict: bool) -> None:
        """Write (or remove) the spec file; problems raise when `strict`, else are logged.

        Raises:
            CdiError: with `strict`, the spec cannot be written or names will not resolve.
        """
        if update.problem:
            self._report(update.problem, strict)
        if update.spec is None:
            self.remove()
            return
        text = "---\n" + yaml.safe_dump(update.spec, sort_keys=False, default_flow_style=False)
        try:
            write_atomically(self.path, text)
        except OSError as err:
            self._report(f"cannot write the CDI spec {self.path}: {err}; every CDI name "
                         f"{KIND_PLUGIN}=… is unresolvable (see --cdi-spec-dir)", strict)
            return
        count = len(update.spec["devices"]) - 1
        log.info("CDI spec %s written: %d devices and `all` (edits from %s)",
                 self.path, count, update.source)
        twin = self.path.with_suffix(".json")
        if twin.exists():
            log.warning("CDI: %s also defines %s devices; the runtime refuses devices defined "
                        "twice: remove it", twin, KIND_PLUGIN)

    def remove(self) -> None:
        """Remove gpushare's spec file, if there is one."""
        try:
            self.path.unlink()
        except FileNotFoundError:
            return
        except OSError as err:
            log.error("cannot remove the CDI spec %s: %s", self.path, err)
            return
        log.info("CDI spec %s removed", self.path)

    # --- internals ----------------------------------------------------------------------------

    def _report(self, problem: str, strict: bool) -> None:
        if strict:
            raise CdiError(problem)
        log.error("%s", problem)

    def _missing_in_toolkit_specs(self, named: Sequence[NamedDevice]) -> str:
        """'' when each name is defined for nvidia.com/gpu in the CDI directories, else why not."""
        defined = defined_devices(self.toolkit_dirs, KIND_TOOLKIT)
        missing = [n.name for n in named if n.name not in defined]
        if not missing:
            return ""
        dirs = ", ".join(str(d) for d in self.toolkit_dirs)
        return (f"cdiKind {KIND_TOOLKIT}: no CDI spec in {dirs} defines {_quote(missing)}; "
                "generate the toolkit's spec (nvidia-ctk cdi generate --output="
                f"{ETC_CDI}/nvidia.yaml) or use the default cdiKind {KIND_PLUGIN}")

    def _toolkit_spec(self, config: Config, named: Sequence[NamedDevice]) -> ToolkitSpec | None:
        """The toolkit's spec with host paths, rerun when a planned UUID is not in the last one."""
        argv, to_host = _generate_args(self._generator(config), config)
        uuids = {n.device.physical_id for n in named}
        cached = self._cache
        if cached is not None and cached[0] == argv and uuids <= set(cached[1].devices):
            return cached[1]
        try:
            run = run_bounded(argv, env=self._env, timeout_s=self._timeout_s,
                              max_bytes=MAX_GENERATOR_OUTPUT_BYTES)
            if run.returncode != 0:
                raise CdiError(f"exited with status {run.returncode}: {_last_line(run.stderr)}")
            spec = to_host(parse_toolkit_spec(run.stdout, self._validator))
        except FileNotFoundError:
            self._note_fallback(f"{argv[0]} is not installed")
            return None
        except (OSError, CdiError) as err:
            self._note_fallback(f"`{' '.join(argv[:3])} …` failed: {err}")
            return None
        if self._fallback_reason is not None:
            log.info("CDI: nvidia-ctk works again: its container edits are used")
        self._fallback_reason = None
        self._cache = (argv, spec)
        return spec

    def _note_fallback(self, reason: str) -> None:
        """One log line until the generator works again: what fell back, and why."""
        if self._fallback_reason is not None:
            log.debug("CDI: still no container edits from nvidia-ctk (%s)", reason)
            return
        self._fallback_reason = reason
        log.warning("CDI: no container edits from nvidia-ctk (%s): %s lists each device's nodes "
                    "and NVIDIA_VISIBLE_DEVICES; driver libraries come from the NVIDIA runtime "
                    "hook", reason, self.path)


def _generate_args(
    program: Sequence[str], config: Config
) -> tuple[tuple[str, ...], Callable[[ToolkitSpec], ToolkitSpec]]:
    """argv of `cdi generate`, and the rewrite of its host paths to the host's driver root.

    Inside gpushare's container the host's driver root is mounted at containerDriverRoot: the
    generator reads it there, and the host paths it prints are moved back to nvidiaDriverRoot.
    """
    flags = config.flags
    host_root = flags.nvidia_driver_root
    ctr_root = flags.plugin.container_driver_root
    root = ctr_root if ctr_root and os.path.isdir(ctr_root) else host_root
    argv = [*program, "cdi", "generate", "--format=json", "--device-name-strategy=uuid",
            f"--driver-root={root}"]
    if flags.nvidia_dev_root and flags.nvidia_dev_root != host_root:
        argv.append(f"--dev-root={flags.nvidia_dev_root}")
    if root == host_root:
        return tuple(argv), lambda spec: spec
    return tuple(argv), lambda spec: _rebase(spec, root, host_root)


def _rebase(spec: ToolkitSpec, old: str, new: str) -> ToolkitSpec:
    """The spec with every hostPath under `old` moved under `new`."""

    def move(path: str) -> str:
        if path == old or path.startswith(old.rstrip("/") + "/"):
            return os.path.join(new, os.path.relpath(path, old)).rstrip("/") or "/"
        return path

    def edits(e: Mapping[str, Any]) -> dict[str, Any]:
        out = dict(e)
        for key in ("deviceNodes", "mounts"):
            if key in out:
                out[key] = [dict(i, hostPath=move(i["hostPath"])) if "hostPath" in i else i
                            for i in out[key]]
        return out

    return ToolkitSpec(spec.version, edits(spec.common),
                       {name: edits(e) for name, e in spec.devices.items()})


def _last_line(text: str) -> str:
    """The last non-empty line of a program's stderr, shortened."""
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no message"


def _quote(names: Sequence[str]) -> str:
    """`a, b, c and 4 more`."""
    shown = ", ".join(names[:NAMES_QUOTED])
    return shown + (f" and {len(names) - NAMES_QUOTED} more" if len(names) > NAMES_QUOTED else "")
