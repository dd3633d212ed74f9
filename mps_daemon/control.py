"""One `nvidia-cuda-mps-control` daemon for one MPS resource (facts §4).

start(): check the paths stay under mpsRoot, prepare the directories, put the resource's GPUs
in EXCLUSIVE_PROCESS compute mode through NVML (compute mode policy `manage`; with `leave` the
modes are only read and logged, for nodes where the operator owns them), run `<control> -f` as
our child with CUDA_MPS_PIPE_DIRECTORY, CUDA_MPS_LOG_DIRECTORY and CUDA_VISIBLE_DEVICES (only
this resource's GPUs), wait until it answers, then set the default limits through the control
client.
probe(): `get_default_active_thread_percentage` must answer the planned value.
stop(): `quit`, wait, then SIGTERM / SIGKILL; compute modes we changed are restored.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import posixpath
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mps_daemon.runner import CommandRunner, Process, SubprocessRunner
from sharing.devices import ComputeMode
from sharing.errors import NvmlError, SharingError
from sharing.mps import format_mem_limit
from sharing.nvml.files import UnreadableFile, read_regular_text
from sharing.plan_types import MpsSpec

log = logging.getLogger("gpushare.mps")

PID_FILE = "nvidia-cuda-mps-control.pid"
MAX_PID_FILE = 64  # bytes of a pid file worth reading
MAX_ENVIRON = 1 << 20  # bytes of /proc/<pid>/environ read to identify a stale daemon
OUTPUT_FILE = "control-daemon.out"  # the daemon's own stdout/stderr, in the log directory
OUTPUT_TAIL = 4096  # bytes read from its end when a start fails
MPS_LOGS = ("control.log", "server.log")  # written by MPS itself in the log directory
MAX_MPS_LOG = 16 << 20  # bytes of one before it is moved aside at the next start
# Directory modes. The pipe directory is mounted into client containers, whose processes may
# run under any uid and must reach the pipes: readable and searchable, writable by root only.
# The log directory is the daemon's alone. The shm directory becomes the clients' /dev/shm,
# where clients of any uid create shared memory segments: world-writable with the sticky bit,
# exactly as /dev/shm itself.
PIPE_DIR_MODE = 0o755
LOG_DIR_MODE = 0o700
SHM_DIR_MODE = 0o1777
RESOURCE_DIR_MODE = 0o755
# Who owns the GPUs' compute mode: gpushare (`manage`: EXCLUSIVE_PROCESS while the daemon runs,
# the old mode restored on stop) or the operator (`leave`: never changed).
MANAGE_COMPUTE_MODE = "manage"
LEAVE_COMPUTE_MODE = "leave"
COMPUTE_MODE_POLICIES = (MANAGE_COMPUTE_MODE, LEAVE_COMPUTE_MODE)


class MpsDaemonError(SharingError):
    """An MPS control daemon could not be started, configured, probed or stopped."""


def checked_dirs(spec: MpsSpec, mps_root: str) -> tuple[str, str, str]:
    """(pipe, log, shm) of `spec`, each proven to resolve inside `mps_root`.

    Raises:
        MpsDaemonError: mpsRoot is not absolute, or a directory resolves outside it.
    """
    if not mps_root or not posixpath.isabs(mps_root):
        raise MpsDaemonError(f"flags.mpsRoot must be an absolute path, got {mps_root!r}")
    root = os.path.realpath(mps_root)
    dirs = (spec.pipe_dir, spec.log_dir, spec.shm_dir)
    for path in dirs:
        real = os.path.realpath(path)
        if real == root or os.path.commonpath([root, real]) != root:
            raise MpsDaemonError(
                f"MPS directory {path!r} of {spec.resource} resolves to {real!r}, "
                f"outside mpsRoot {mps_root!r}"
            )
    shm = os.path.realpath(spec.shm_dir)
    for path in dirs[:2]:
        if os.path.commonpath([shm, os.path.realpath(path)]) == shm:
            raise MpsDaemonError(
                f"MPS directory {path!r} of {spec.resource} is inside the shared memory "
                f"directory {spec.shm_dir!r}, which every client can write"
            )
    return dirs


def _check_root(mps_root: str) -> str | None:
    """mpsRoot must be a directory only its owner (us or root) can change.

    Otherwise another user could swap a resource directory for a link between our checks
    and the daemon's use of it. Returns a warning when other users cannot search it.

    Raises:
        OSError: mpsRoot is owned by another user or writable by group or others.
    """
    if not os.path.isdir(mps_root):
        os.makedirs(mps_root, mode=RESOURCE_DIR_MODE, exist_ok=True)
        os.chmod(mps_root, RESOURCE_DIR_MODE)  # ours: exactly 0755, whatever the umask
    info = os.stat(mps_root)
    if info.st_uid not in (0, os.geteuid()):
        raise OSError(f"mpsRoot {mps_root} is owned by uid {info.st_uid}, not by root or us")
    if stat.S_IMODE(info.st_mode) & 0o022:
        raise OSError(f"mpsRoot {mps_root} is writable by group or others "
                      f"(mode {stat.S_IMODE(info.st_mode):04o})")
    closed = _unsearchable(mps_root)
    if closed is None:
        return None
    return (f"mpsRoot {mps_root}: {closed} is not searchable by other users (mode "
            f"{stat.S_IMODE(os.stat(closed).st_mode):04o}); the MPS server of a client that is "
            "not root runs as that user and cannot reach its pipe directory")


def _unsearchable(path: str) -> str | None:
    """The first directory from / down to `path` that other users cannot search, or None."""
    current = "/"
    for part in [p for p in os.path.realpath(path).split("/") if p]:
        current = os.path.join(current, part)
        if not os.stat(current).st_mode & stat.S_IXOTH:
            return current
    return None


def _make_dir(path: str, mode: int) -> None:
    """Create `path` (and missing parents) and set its mode exactly, whatever the umask.

    The mode is set through a descriptor opened without following links, and only on a
    directory we own: a link or another user's directory planted at `path` is refused, never
    followed or adopted.

    Raises:
        OSError: `path` is a link, not a directory, or owned by another user.
    """
    os.makedirs(path, mode=mode, exist_ok=True)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.ENOTDIR):
            raise OSError(f"{path} is a link or not a directory; refusing to use it") from None
        raise
    try:
        owner = os.fstat(fd).st_uid
        if owner != os.geteuid():
            raise OSError(f"{path} is owned by uid {owner}, not by us; refusing to use it")
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def _stale_daemon_pid(pid_file: Path, pipe_dir: str) -> int | None:
    """The pid in `pid_file` when that process runs a control daemon of `pipe_dir`, else None."""
    try:
        text = read_regular_text(pid_file, MAX_PID_FILE, "pid file").strip()
    except UnreadableFile:
        return None
    if not text.isdigit() or int(text) in (0, os.getpid()):
        return None
    pid = int(text)
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            environ = f.read(MAX_ENVIRON).split(b"\0")
    except OSError:
        return None
    wanted = b"CUDA_MPS_PIPE_DIRECTORY=" + os.fsencode(pipe_dir)
    return pid if wanted in environ else None


def _gone(pid: int, timeout_s: float) -> bool:
    """Wait up to `timeout_s` for `pid` to exit (a zombie counts as gone); True when it did."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                state = f.read(4096).rpartition(b")")[2].split()[:1]
        except OSError:
            return True
        if state == [b"Z"]:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


class MpsControlDaemon:
    """Owns one control daemon process and the compute modes of its GPUs."""

    def __init__(
        self,
        spec: MpsSpec,
        *,
        control_binary: str | Sequence[str],
        mps_root: str,
        nvml: Any = None,
        env: Mapping[str, str] | None = None,
        runner: CommandRunner | None = None,
        compute_mode: str = MANAGE_COMPUTE_MODE,
        ready_timeout_s: float = 5.0,
        command_timeout_s: float = 5.0,
        stop_timeout_s: float = 2.0,
        cancel: threading.Event | None = None,
    ) -> None:
        if compute_mode not in COMPUTE_MODE_POLICIES:
            raise ValueError(f"compute mode policy must be manage or leave, got {compute_mode!r}")
        self.spec = spec
        self.mps_root = mps_root
        self.compute_mode_policy = compute_mode
        control = [control_binary] if isinstance(control_binary, str) else list(control_binary)
        self._control = control
        self._nvml = nvml
        self._base_env = {
            k: v for k, v in (env or {}).items()
            if not k.startswith("CUDA_MPS_") and k != "CUDA_VISIBLE_DEVICES"
        }
        self._runner: CommandRunner = runner or SubprocessRunner()
        self._ready_s = ready_timeout_s
        self._command_s = command_timeout_s
        self._stop_s = stop_timeout_s
        self._cancel = cancel  # set: a start in progress gives up at its next step
        self._root_warned = False
        self._process: Process | None = None
        self._answered = False  # the child has answered a command since it was spawned
        self._restore_modes: dict[int, ComputeMode] = {}

    # -- queries -------------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """The control daemon's pid while it runs."""
        return self._process.pid if self.running else None  # type: ignore[union-attr]

    @property
    def running(self) -> bool:
        """True while our child process has not exited."""
        return self._process is not None and self._process.poll() is None

    def exit_status(self) -> int | None:
        """The child's exit status once it exited (None while running or never started)."""
        return None if self._process is None else self._process.poll()

    @property
    def daemon_env(self) -> dict[str, str]:
        """Environment of the control daemon."""
        return {
            **self._base_env,
            "CUDA_MPS_PIPE_DIRECTORY": self.spec.pipe_dir,
            "CUDA_MPS_LOG_DIRECTORY": self.spec.log_dir,
            "CUDA_VISIBLE_DEVICES": ",".join(self.spec.gpu_uuids),
        }

    def limit_commands(self) -> list[str]:
        """The control commands that set the spec's default limits."""
        ordinal = {index: n for n, index in enumerate(self.spec.gpu_indices)}
        lines = [f"set_default_active_thread_percentage {self.spec.active_thread_percentage}"]
        lines += [
            f"set_default_device_pinned_mem_limit {ordinal[index]} {format_mem_limit(mib)}"
            for index, mib in self.spec.pinned_mem_limit_mib
        ]
        return lines

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Prepare, set EXCLUSIVE_PROCESS, spawn `-f`, wait until it answers, set the limits.

        Raises:
            MpsDaemonError: any step failed (the child, if spawned, is stopped again).
        """
        pipe, log_dir, shm = checked_dirs(self.spec, self.mps_root)
        try:
            warning = _check_root(self.mps_root)
            if warning is not None and not self._root_warned:
                log.warning("%s", warning, extra={"resource": self.spec.resource})  # once
                self._root_warned = True
            _make_dir(os.path.dirname(pipe), RESOURCE_DIR_MODE)
            _make_dir(pipe, PIPE_DIR_MODE)
            _make_dir(log_dir, LOG_DIR_MODE)
            _make_dir(shm, SHM_DIR_MODE)
        except OSError as err:
            raise MpsDaemonError(
                f"preparing the MPS directories of {self.spec.resource}: {err}"
            ) from err
        self._exclusive_process()
        self._quit_stale()
        if self._cancel is not None and self._cancel.is_set():
            raise MpsDaemonError("start abandoned: gpushare is stopping")
        self._rotate_logs()
        self._spawn()
        try:
            self._wait_ready()
            self.command(self.limit_commands())
        except MpsDaemonError:
            self.stop_process()
            raise

    def probe(self) -> None:
        """Ask the thread percentage; it must match the spec.

        Raises:
            MpsDaemonError: the process exited, the client failed, or the answer differs.
        """
        status = self.exit_status()
        if status is not None or self._process is None:
            raise MpsDaemonError(f"control daemon exited with status {status}")
        answer = self.command(["get_default_active_thread_percentage"]).strip()
        try:
            value = float(answer)
        except ValueError:
            value = None
        if value != float(self.spec.active_thread_percentage):
            raise MpsDaemonError(
                f"active thread percentage is {answer!r}, "
                f"expected {self.spec.active_thread_percentage}"
            )

    def stop(self) -> None:
        """Send `quit`, wait, then terminate or kill; restore compute modes; safe to call twice."""
        self.stop_process()
        self._restore_compute_modes()

    def command(self, lines: Sequence[str]) -> str:
        """Run the control program as a client with `lines` on stdin; returns its output.

        Raises:
            MpsDaemonError: the client could not run, timed out, or exited non-zero.
        """
        env = {**self._base_env, "CUDA_MPS_PIPE_DIRECTORY": self.spec.pipe_dir,
               "CUDA_MPS_LOG_DIRECTORY": self.spec.log_dir}
        stdin = "".join(f"{line}\n" for line in lines)
        try:
            done = self._runner.run(self._control, env=env, stdin=stdin, timeout_s=self._command_s)
        except OSError as err:
            raise MpsDaemonError(f"cannot run {self._control[-1]}: {err}") from err
        if done.returncode != 0:
            why = (done.stderr or done.stdout).strip() or f"exit status {done.returncode}"
            raise MpsDaemonError(f"`{lines[0]}`{' ...' if len(lines) > 1 else ''}: {why}")
        return done.stdout

    # -- steps ---------------------------------------------------------------------------------

    def _spawn(self) -> None:
        argv = [*self._control, "-f"]
        self._answered = False
        try:
            self._process = self._runner.spawn(
                argv, env=self.daemon_env, output=Path(self.spec.log_dir) / OUTPUT_FILE
            )
        except OSError as err:
            raise MpsDaemonError(
                f"cannot start the MPS control daemon {argv[-2]!r}: {err.strerror or err} "
                "(is the NVIDIA driver installed? see --mps-control)"
            ) from err
        log.info("%s: MPS control daemon started (pid %d) on GPUs %s", self.spec.resource,
                 self._process.pid, ",".join(self.spec.gpu_uuids),
                 extra={"resource": self.spec.resource})

    def _rotate_logs(self) -> None:
        """MPS appends to its logs and never trims them: before each start (no daemon writes
        them then), one larger than MAX_MPS_LOG is moved to `<name>.1`, replacing the last."""
        for name in MPS_LOGS:
            path = os.path.join(self.spec.log_dir, name)
            try:
                if os.lstat(path).st_size > MAX_MPS_LOG:
                    os.replace(path, f"{path}.1")
                    log.info("%s: %s moved to %s.1 (larger than %d MiB)", self.spec.resource,
                             path, name, MAX_MPS_LOG >> 20, extra={"resource": self.spec.resource})
            except FileNotFoundError:
                continue
            except OSError as err:
                log.warning("%s: cannot rotate %s: %s", self.spec.resource, path, err,
                            extra={"resource": self.spec.resource})

    def _wait_ready(self) -> None:
        """Wait for the pid file, then for an answer; fail early when the child exits."""
        deadline = time.monotonic() + self._ready_s
        pid_file = Path(self.spec.pipe_dir) / PID_FILE
        last = "no pid file yet"
        while time.monotonic() < deadline:
            if self._cancel is not None and self._cancel.is_set():
                raise MpsDaemonError("start abandoned: gpushare is stopping")
            status = self.exit_status()
            if status is not None:
                raise MpsDaemonError(f"control daemon exited with status {status} while "
                                     f"starting: {self._output_tail()}")
            if pid_file.exists():
                try:
                    self.command(["get_server_list"])
                    self._answered = True
                    return
                except MpsDaemonError as err:
                    last = str(err)
            time.sleep(0.02)
        raise MpsDaemonError(f"control daemon did not answer within {self._ready_s}s: {last}")

    def _output_tail(self) -> str:
        """The last lines of the daemon's output file (only its end is read, whatever its size)."""
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(Path(self.spec.log_dir) / OUTPUT_FILE, flags)
            try:
                size = os.fstat(fd).st_size
                os.lseek(fd, max(0, size - OUTPUT_TAIL), os.SEEK_SET)
                data = os.read(fd, OUTPUT_TAIL)
            finally:
                os.close(fd)
        except OSError:
            return "no output"
        return data.decode(errors="replace").strip()[-300:] or "no output"

    def _quit_stale(self) -> None:
        """A pid file left by an earlier run (gpushare killed): ask that daemon to quit, and
        make sure it is gone before ours starts on the same pipe directory.

        The pid is signalled only when that process is a control daemon of this very pipe
        directory (its CUDA_MPS_PIPE_DIRECTORY says so): a pid file naming a reused pid or
        another program is never acted on.
        """
        pid_file = Path(self.spec.pipe_dir) / PID_FILE
        if self.running or not pid_file.exists():
            return
        stale = _stale_daemon_pid(pid_file, self.spec.pipe_dir)
        try:
            self.command(["quit"])
            log.info("%s: asked a control daemon left by an earlier run to quit",
                     self.spec.resource, extra={"resource": self.spec.resource})
        except MpsDaemonError as err:
            if stale is not None:
                log.warning("%s: control daemon %d left by an earlier run did not take `quit` "
                            "(%s)", self.spec.resource, stale, err,
                            extra={"resource": self.spec.resource})
        if stale is None or _gone(stale, self._stop_s):
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            log.warning("%s: control daemon %d left by an earlier run still runs; sending %s",
                        self.spec.resource, stale, sig.name, extra={"resource": self.spec.resource})
            with contextlib.suppress(ProcessLookupError):
                os.kill(stale, sig)
            if _gone(stale, self._stop_s):
                return
        raise MpsDaemonError(f"control daemon {stale} left by an earlier run survives SIGKILL")

    def stop_process(self) -> None:
        """Stop the child only (`quit`, then signals); compute modes stay, for a restart."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        if not self._answered:
            # Stopped while starting (a start that failed or was abandoned): it has never
            # answered, so `quit` would only wait for its timeout and fail; nothing went wrong
            # in the stop itself, so no warning (a crash loop reports its ERROR once).
            log.info("%s: control daemon (pid %d) had not answered yet; terminating it",
                     self.spec.resource, process.pid, extra={"resource": self.spec.resource})
        else:
            try:
                self.command(["quit"])
                process.wait(timeout=self._stop_s)
                return
            except (MpsDaemonError, subprocess.TimeoutExpired) as err:
                log.warning("%s: control daemon did not quit (%s); terminating it",
                            self.spec.resource, err, extra={"resource": self.spec.resource})
        process.terminate()
        try:
            process.wait(timeout=self._stop_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=self._stop_s)

    # -- compute mode --------------------------------------------------------------------------

    def _exclusive_process(self) -> None:
        """Put each GPU in EXCLUSIVE_PROCESS, remembering the modes we changed."""
        if self._nvml is None:
            return
        from sharing.nvml import compute_mode, set_compute_mode

        if self.compute_mode_policy == LEAVE_COMPUTE_MODE:
            self._log_modes_left(compute_mode)
            return
        for index in self.spec.gpu_indices:
            try:
                mode = compute_mode(self._nvml, index)
                if mode != ComputeMode.EXCLUSIVE_PROCESS:
                    set_compute_mode(self._nvml, index, ComputeMode.EXCLUSIVE_PROCESS)
                    self._restore_modes.setdefault(index, mode)
            except NvmlError as err:
                raise MpsDaemonError(
                    f"setting GPU {index} to EXCLUSIVE_PROCESS compute mode: {err}"
                ) from err

    def _log_modes_left(self, read: Any) -> None:
        """Compute mode `leave`: say what each GPU's mode is; nothing is changed."""
        found = []
        for index in self.spec.gpu_indices:
            try:
                found.append(f"GPU {index} {read(self._nvml, index).name}")
            except NvmlError as err:
                found.append(f"GPU {index} unknown ({err})")
        log.info("%s: compute mode left as it is (policy leave): %s", self.spec.resource,
                 ", ".join(found), extra={"resource": self.spec.resource})

    def _restore_compute_modes(self) -> None:
        if self._nvml is None:
            return
        from sharing.nvml import set_compute_mode

        modes, self._restore_modes = self._restore_modes, {}
        for index, mode in modes.items():
            try:
                set_compute_mode(self._nvml, index, mode)
            except NvmlError as err:
                log.warning("%s: restoring GPU %d compute mode %s: %s", self.spec.resource,
                            index, mode.name, err, extra={"resource": self.spec.resource,
                                                          "gpu": index})
