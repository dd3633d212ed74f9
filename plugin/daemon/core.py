"""The node daemon: Plan -> one gRPC server per resource -> kubelet registration, kept current.

Composition only: config, NVML session, inventory, Plan, servers, the kubelet link, the config
file watch and the background components (health monitor, MPS supervisor, ...) are wired here.
A change (config file edited, SIGHUP) builds a new Plan and applies the diff: new resources are
served and registered, vanished ones stopped, changed device lists pushed on the open streams.
A file that fails to load or validate changes nothing. Metrics, /healthz, /readyz and the
node labels file are composed in from `observe`.

A reload never delays serving or stopping: it runs on its own thread (ReloadLoop), and the file
is read and validated in a child process (ConfigReader) in bounded time and memory; SIGTERM
abandons a reload in flight.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from mps_daemon import MANAGE_COMPUTE_MODE
from plugin import version
from plugin.cli.config_file import build_plan_from, load_config_file
from plugin.daemon.allocate import ResourceAllocator, build_allocators
from plugin.daemon.cdi import CdiSpecs, CdiUpdate, generator_argv
from plugin.daemon.config_reader import ConfigReader, ReadCancelled
from plugin.daemon.health_monitor import HealthMonitor, create_health_monitor, health_policy
from plugin.daemon.kubelet import KubeletLink
from plugin.daemon.observe import Observability
from plugin.daemon.reloads import ReloadLoop
from plugin.daemon.server import PluginServer, create_server
from plugin.daemon.signals import install_signals, restore_signals
from plugin.daemon.state import NodeState
from plugin.daemon.unix_socket import MAX_SOCKET_PATH
from plugin.daemon.watch import FileWatcher
from sharing.config import Config, apply_overrides, default_config
from sharing.devices import Inventory
from sharing.errors import NvmlError, PlanError, SharingError
from sharing.nvml import Nvml, nvml_session, read_inventory
from sharing.plan_types import Plan

log = logging.getLogger("gpushare.daemon")

SIGNAL_CHECK_S = 0.1  # how often run_forever lets pending signal handlers run
SUPERSEDED_WAIT_S = 5.0  # a superseded reload waits this long for the newer plan's listeners


class Component(Protocol):
    """A background part the daemon starts after its servers and stops before them."""

    def start(self) -> None:
        """Begin work (on its own thread)."""

    def stop(self) -> None:
        """End work; safe to call twice."""


PlanListener = Callable[[Plan, Inventory], None]
StartupHook = Callable[[Nvml | None], None]


class Daemon:
    """gpushare's node daemon for one kubelet directory."""

    def __init__(
        self,
        *,
        config_path: Path | None,
        kubelet_dir: Path,
        nvml_lib: Any,
        env: Mapping[str, str],
        overrides: Mapping[str, object],
        config_poll_s: float = 0.2,
        kubelet_poll_s: float = 0.05,
        mps_control: str | Sequence[str] | None = None,
        cdi_spec_dir: Path | None = None,
        cdi_toolkit_dirs: Sequence[Path] | None = None,
        mps_compute_mode: str = MANAGE_COMPUTE_MODE,
        metrics_address: str | None = None,
        node_labels: bool = False,
        inotify: bool = True,
        config_reader: ConfigReader | None = None,
    ) -> None:
        """`metrics_address` serves /metrics, /healthz, /readyz (None: not served); with
        `node_labels` the labels file named by flags.gfd.outputFile is kept; `inotify=False`
        polls the kubelet directory and the config file instead."""
        self.config_path = config_path
        self.kubelet_dir = Path(kubelet_dir)
        self.state = NodeState()
        self.inventory: Inventory | None = None
        self.config: Config | None = None
        self.nvml: Nvml | None = None
        self.reload_failures = 0
        self.reload_error = ""  # why the last reload failed ("" after one that applied)
        self._nvml_lib = nvml_lib
        self._env = dict(env)
        self._overrides = dict(overrides)
        self._mps_control = mps_control
        self._mps_compute_mode = mps_compute_mode
        self.mps_supervisor: Any = None
        self.mps_held: frozenset[str] = frozenset()  # GPUs a MIG job drains: no MPS daemon
        self.mig_jobs: Any = None  # plugin.daemon.mig_jobs.MigJobRunner, when added
        self._servers: dict[str, PluginServer] = {}
        self._restart_errors: dict[str, str] = {}  # resource -> last restart error logged
        self._allocators: dict[str, ResourceAllocator] = {}
        self._lock = threading.RLock()
        self._components: list[Component] = []
        self._listeners: list[PlanListener] = []
        self._startup_hooks: list[StartupHook] = []
        self._overlays: dict[str, dict[str, str]] = {}  # source -> its part of the overlay
        self._overlay_lock = threading.Lock()
        self._exit = contextlib.ExitStack()
        self._started = False
        self._stopping = False  # set by stop(): a reload still in flight then serves nothing
        self._reload_seq = 0  # reloads begun; a plan applies only if no later one applied yet
        self._applied_seq = 0
        self._notified_seq = 0
        self._notify_lock = threading.Condition()  # listeners hear plans in the order applied
        self._wake = threading.Event()
        self._stop_requested = False
        self._reader = config_reader or ConfigReader()
        self._reloads = ReloadLoop(lambda: self.reload(abandonable=True), self._reader.cancel)
        self.cdi = (  # None: no CDI spec is written (`gpushare run` always gives a directory)
            CdiSpecs(spec_dir=cdi_spec_dir, toolkit_dirs=cdi_toolkit_dirs, env=self._env,
                     generator=lambda config: generator_argv(nvml_lib, config))
            if cdi_spec_dir is not None else None
        )
        self.observe = Observability(self, metrics_address=metrics_address)
        self.metrics = self.observe.metrics
        self.link = KubeletLink(
            self.kubelet_dir,
            sockets=self.socket_names,
            restart_servers=self.restart_servers,
            poll_s=kubelet_poll_s,
            inotify=inotify,
            on_registered=self.metrics.registered,
        )
        self.observe.add_liveness("kubelet-watch", lambda: self.link.alive)
        self._config_watch = None
        if config_path:
            watch = FileWatcher(config_path, self.request_reload, poll_s=config_poll_s,
                                inotify=inotify)
            self.observe.add_liveness("config-watch", lambda: watch.alive)
            self._config_watch = watch
        if node_labels:
            self.add_plan_listener(self.observe.write_labels)

    # --- seams for other parts ----------------------------------------------------------------

    @property
    def plan(self) -> Plan:
        """The Plan now served."""
        return self.state.plan

    @property
    def host_root(self) -> Path:
        """Where host paths live: `/` on a real node, a simulated node's `host/` directory."""
        return self.nvml.host.root if self.nvml is not None else Path("/")

    @property
    def phase(self) -> str:
        """`starting` (until start() is done), `running`, or `stopping` (from stop() on)."""
        if self._stopping:
            return "stopping"
        return "running" if self._started else "starting"

    def set_mig_state(self, config: str, state: str) -> None:
        """Publish the MIG job state in the labels file (`nvidia.com/mig.config{,.state}`).

        Raises:
            ValueError: an unknown state or a config name that is not a label value.
        """
        self.observe.labels.set_mig_state(config, state)

    @property
    def components(self) -> tuple[Component, ...]:
        """The background components run with the daemon."""
        return tuple(self._components)

    def add_component(self, component: Component) -> None:
        """Run a background component with the daemon (started after the servers)."""
        self._components.append(component)
        if self._started:
            component.start()

    def add_plan_listener(self, listener: PlanListener) -> None:
        """Call `listener(plan, inventory)` after every applied Plan (and now, if running)."""
        self._listeners.append(listener)
        if self._started and self.inventory is not None:
            listener(self.plan, self.inventory)

    def set_health_overlay(self, overlay: Mapping[str, str], *, source: str = "health") -> None:
        """Publish one source's health overlay (physical ID, GPU UUID or `mps:<resource>` ->
        reason); the kubelet sees the union of every source's (the first reason of a key wins).
        """
        with self._overlay_lock:
            self._overlays[source] = dict(overlay)
            self.state.set_overlay(self._merged_overlay())

    def _merged_overlay(self) -> dict[str, str]:
        """The union of every source's overlay (under _overlay_lock)."""
        merged: dict[str, str] = {}
        for part in self._overlays.values():
            for key, reason in part.items():
                merged.setdefault(key, reason)
        return merged

    def add_startup_hook(self, hook: StartupHook) -> None:
        """Call `hook(nvml)` in start(), after the NVML session opens and before serving."""
        self._startup_hooks.append(hook)

    def socket_names(self) -> dict[str, str]:
        """Socket file name of each served resource."""
        with self._lock:
            return {name: s.socket_path.name for name, s in self._servers.items()}

    def allocator(self, resource_name: str) -> ResourceAllocator | None:
        """The allocator of a served resource, or None."""
        return self._allocators.get(resource_name)

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Load the config, read the node, serve every resource and register with the kubelet.

        Raises:
            ConfigError: the config file or a flag is invalid.
            NvmlError: NVML cannot be used and failOnInitError is on.
            OSError: a socket cannot be bound.
        """
        if not self.kubelet_dir.is_dir():
            raise FileNotFoundError(
                f"kubelet directory {self.kubelet_dir} does not exist (is the kubelet's "
                "device-plugins directory mounted? see --kubelet-dir; --create-kubelet-dir "
                "creates it)"
            )
        if not os.access(self.kubelet_dir, os.W_OK | os.X_OK,
                         effective_ids=os.access in os.supports_effective_ids):
            raise PermissionError(
                f"kubelet directory {self.kubelet_dir}: no permission to create sockets there"
                " (the kubelet's directory belongs to root: run gpushare as root)"
            )
        config = self._load_config()
        self.config = config
        self.observe.start_server()
        try:
            self.nvml = self._exit.enter_context(nvml_session(self._nvml_lib))
        except NvmlError as err:
            if config.flags.fail_on_init_error:
                raise
            log.error("NVML unavailable (%s); failOnInitError is false: serving nothing", err)
        try:
            for hook in self._startup_hooks:
                hook(self.nvml)
            plan, inventory = self._build(config)
            gpus = len(inventory.gpus)
            log.info("gpushare %s starting: %d GPU%s (%s), config %s, kubelet directory %s",
                     version(), gpus, "" if gpus == 1 else "s",
                     ", ".join(sorted({g.name for g in inventory.gpus})) or "none",
                     self.config_path or "none (every default)", self.kubelet_dir)
            self._apply(plan, inventory, config=config, seq=0, cdi=self._cdi_for(plan, config))
            monitor = self._add_health_monitor(config)
            if monitor is not None:
                self._add_mps_supervisor(monitor)
            self.link.start()
            if self._config_watch is not None:
                self._config_watch.start()
            self._reloads.start()
            for component in self._components:
                component.start()
        except BaseException:
            self.stop()
            raise
        self.metrics.config_loaded()
        self._started = True

    def stop(self) -> None:
        """Stop watches, components and servers, removing our sockets; safe to call twice."""
        with self._lock:
            self._started = False
            self._stopping = True
        self._reloads.stop()
        self._reader.close()
        if self._config_watch is not None:
            self._config_watch.stop()
        self.link.stop()
        for component in reversed(self._components):
            component.stop()
        with self._lock:
            servers, self._servers = list(self._servers.values()), {}
        for server in servers:
            server.stop()
        if self.cdi is not None:
            self.cdi.remove()
        self.state.close()
        self._exit.close()
        self.observe.stop()

    def request_stop(self) -> None:
        """Ask run_forever to stop (safe from signal handlers and other threads)."""
        self._stop_requested = True
        self._wake.set()
        if self.mps_supervisor is not None:
            self.mps_supervisor.abandon()  # MPS starts still in start() give up at once

    def request_reload(self) -> None:
        """Ask for a reload on the reload thread (safe from signal handlers and other threads).

        A reload still reading the file is abandoned for this newer one.
        """
        self._reloads.request()

    def run_forever(self) -> int:
        """Start if needed, then serve until SIGTERM or SIGINT (clean stop); SIGHUP reloads.

        The signal handlers are installed before starting, so a SIGTERM that arrives while the
        daemon starts still ends in a clean stop. Returns 0; start() errors propagate.
        """
        previous = install_signals(self)
        try:
            if not self._started:
                self.start()
            while not self._stop_requested:
                # A signal may land on any thread; Python runs its handler on the main thread
                # only once that thread runs bytecode again, so never block without a timeout.
                self._wake.wait(SIGNAL_CHECK_S)
                self._wake.clear()
        finally:
            restore_signals(previous)
            self.stop()
        log.info("stopped; sockets removed")
        return 0

    def reload(
        self, *, abandonable: bool = False, drop_overlay: str | None = None,
        node_changed: bool = False,
    ) -> bool:
        """Read config and node again and apply the diff; a bad file changes nothing.

        `drop_overlay` names a health overlay source dropped together with the new Plan (one
        device list per resource: a MIG job's Unhealthy marks end exactly when its new devices
        are served); a reload not applied leaves it. With `node_changed` (a MIG job changed the
        GPUs) a bad file does not stop the node from being read again: the config in effect
        serves the new devices, so no destroyed device stays advertised.

        Reloads may overlap (the reload thread, MIG jobs, direct calls): one that finishes after
        a later one has applied its plan is dropped, so the newest read always wins. The file is
        read in the config reader's child process (bounded time and memory). An `abandonable`
        read (the reload thread's) is abandoned for a newer change; stop() abandons any; an
        abandoned reload changes nothing and returns False.
        """
        source = self.config_path or "the default config"
        with self._lock:
            self._reload_seq += 1
            seq = self._reload_seq
        config_read = True
        try:
            try:
                config = self._read_config(abandonable)
            except (SharingError, OSError) as err:
                if not node_changed or self.config is None:
                    raise
                self.reload_failures += 1
                self.metrics.config_reload(False)
                log.error("reload of %s failed: %s; the node changed: serving its devices with "
                          "the config in effect", source, err)
                config, config_read = self.config, False
            plan, inventory = self._build(config)
        except ReadCancelled:
            log.info("reload of %s abandoned: a newer reload or stop came first", source)
            return False
        except (SharingError, OSError) as err:
            self.reload_failures += 1
            self.reload_error = str(err)
            self.metrics.config_reload(False)
            # A config error starts with the file's path, which this line names already.
            log.error("reload of %s failed: %s", source,
                      str(err).removeprefix(f"{source}: ").replace(f"\n{source}: ", "\n"))
            return False
        self.reload_error = ""
        self._apply(plan, inventory, config=config, seq=seq, cdi=self._cdi_for(plan, config),
                    drop_overlay=drop_overlay)
        if config_read:
            self.metrics.config_reload(True)
        return True

    def restart_servers(self, names: Sequence[str]) -> None:
        """Stop and start these resources' servers again (the kubelet deleted their sockets).

        A server that fails to start is logged (once per distinct error) and left to the next
        look at the kubelet directory, which finds its socket still missing and tries again.
        """
        restarted = []
        with self._lock:
            for name in names:
                server = self._servers.get(name)
                if server is None:
                    continue
                server.stop(grace_s=0.05)
                try:
                    server.start()
                except (OSError, TimeoutError) as err:
                    repeat = self._restart_errors.get(name) == str(err)
                    log.log(logging.DEBUG if repeat else logging.ERROR,
                            "restarting the server of %s failed: %s; retrying", name, err,
                            extra={"resource": name})
                    self._restart_errors[name] = str(err)
                else:
                    self._restart_errors.pop(name, None)
                    restarted.append(name)
        if restarted:
            log.info("restarted the servers of %s", ", ".join(restarted))

    # --- composition --------------------------------------------------------------------------

    def _load_config(self) -> Config:
        """The config from the file (or defaults), with environment and flags applied."""
        if self.config_path is not None:
            return load_config_file(self.config_path, env=self._env, overrides=self._overrides)
        return apply_overrides(default_config(), self._env, self._overrides)

    def _read_config(self, abandonable: bool = False) -> Config:
        """_load_config for a reload: the file is read in the config reader's child process."""
        if self.config_path is not None:
            return self._reader.read(self.config_path, env=self._env, overrides=self._overrides,
                                     cancellable=abandonable)
        return self._load_config()

    def _build(self, config: Config) -> tuple[Plan, Inventory]:
        """Read the node and build the Plan (empty when NVML is unavailable)."""
        if self.nvml is None:
            return Plan(resources=()), Inventory(gpus=())
        inventory = read_inventory(self.nvml)
        plan = build_plan_from(inventory, config, self.config_path)
        self._check_socket_paths(plan)
        return plan, inventory

    def _check_socket_paths(self, plan: Plan) -> None:
        """Refuse a plan whose socket paths a unix socket cannot have (a long resource name).

        Raises:
            PlanError: a path is longer than sun_path holds; the message names the resource.
        """
        for resource in plan.resources:
            path = self.kubelet_dir / resource.socket_name
            size = len(os.fsencode(path))
            if size > MAX_SOCKET_PATH:
                where = f"{self.config_path}: " if self.config_path else ""
                raise PlanError(
                    f"{where}{resource.name}: its socket {path} would be {size} bytes, and unix"
                    f" socket paths hold at most {MAX_SOCKET_PATH}: shorten the resource name"
                    " (rename) or the kubelet directory"
                )

    def _cdi_for(self, plan: Plan, config: Config) -> CdiUpdate | None:
        """The CDI spec that goes with `plan` (may run nvidia-ctk: never under the lock)."""
        return self.cdi.prepare(plan, config) if self.cdi is not None else None

    def _apply(
        self, plan: Plan, inventory: Inventory, *, config: Config, seq: int, cdi: CdiUpdate | None,
        drop_overlay: str | None = None,
    ) -> None:
        """Serve `plan`: CDI spec first, then stop vanished resources, push changed lists,
        serve and register new ones.

        Nothing happens once stop() began, or when a later reload (`seq`) applied already; then
        this returns once that later plan's listeners have heard it (at most SUPERSEDED_WAIT_S),
        so after any reload returns, a plan at least as new as the one it read is in effect.
        At start (seq 0) a CDI spec that cannot be written fails the start; later it is logged.
        """
        with self._lock:
            if self._stopping:
                log.info("reload finished after stop began: not applied")
                return
            newer = self._applied_seq
            if seq >= newer:
                self._apply_locked(plan, inventory, config=config, seq=seq, cdi=cdi,
                                   drop_overlay=drop_overlay)
        if seq < newer:
            log.info("reload superseded by a later one: not applied")
            with self._notify_lock:
                self._notify_lock.wait_for(
                    lambda: self._notified_seq >= newer or self._stopping, SUPERSEDED_WAIT_S
                )
            return
        with self._notify_lock:
            if seq < self._notified_seq:
                return
            self._notified_seq = seq
            try:
                for listener in self._listeners:
                    listener(plan, inventory)
            finally:
                self._notify_lock.notify_all()

    def _apply_locked(
        self, plan: Plan, inventory: Inventory, *, config: Config, seq: int, cdi: CdiUpdate | None,
        drop_overlay: str | None = None,
    ) -> None:
        """The serving part of _apply, under the daemon's lock."""
        if self.cdi is not None and cdi is not None:
            self.cdi.commit(cdi, strict=seq == 0)
        self._applied_seq = seq
        self.config = config
        diff = self.state.plan.diff(plan)
        if diff.empty and seq > 0:  # say so: a SIGHUP or a touched file otherwise logs nothing
            log.info("reload: nothing changed (%s)", ", ".join(plan.names) or "no resources")
        self.link.forget(diff.removed)
        for name in diff.removed:
            self._servers.pop(name).stop()
            log.info("stopped serving %s", name, extra={"resource": name})
        self._allocators = build_allocators(plan.resources, plan.options)
        for name in diff.changed:  # said before the streams wake, so it precedes the new lists
            count = len(plan.resource(name).devices)  # type: ignore[union-attr]
            log.info("%s now has %d devices: new list sent to the kubelet", name, count,
                     extra={"resource": name})
        if drop_overlay is None:
            self.state.set_plan(plan)
        else:
            with self._overlay_lock:
                self._overlays.pop(drop_overlay, None)
                self.state.set_plan(plan, overlay=self._merged_overlay())
        self.inventory = inventory
        if diff.options_changed and self._servers:
            log.info("serve options changed: %s", plan.options)
        for name in diff.added:
            self._serve(plan, name)
        self.link.request(diff.added)
        if not plan.resources:
            log.warning("the plan has no resources: nothing is advertised to the kubelet")

    def _add_health_monitor(self, config: Config) -> HealthMonitor | None:
        """Watch NVML events and probes; the monitor follows every applied Plan."""
        if self.nvml is None or self.inventory is None:
            return None
        monitor = create_health_monitor(
            nvml=self.nvml, env=self._env, health=config.health, plan=self.plan,
            inventory=self.inventory, publish=self.set_health_overlay,
            on_xid=self.metrics.xid_event,
        )

        def follow(plan: Plan, inventory: Inventory) -> None:
            monitor.configure(*health_policy(self._env, self.config.health))
            monitor.update(plan, inventory)

        self.add_component(monitor)
        self.add_plan_listener(follow)
        self.observe.add_liveness("health-monitor", lambda: monitor.alive)
        return monitor

    def _add_mps_supervisor(self, monitor: HealthMonitor | None) -> None:
        """One MPS control daemon per MPS resource; its failures mark the devices Unhealthy."""
        from plugin.daemon.mps_wiring import add_mps_supervisor, mps_control_for

        control = mps_control_for(self._nvml_lib, self._mps_control, self._env)
        supervisor = add_mps_supervisor(
            self, monitor, control=control, env=self._env,
            compute_mode=self._mps_compute_mode, restarted=self.metrics.mps_restarted,
        )
        self.mps_supervisor = supervisor
        self.metrics.watch_mps(supervisor.healthy)
        self.observe.add_liveness("mps-supervisor", lambda: supervisor.alive)
        supervisor.start()  # daemons answer before the kubelet hears of the resources

    def _serve(self, plan: Plan, name: str) -> None:
        """Start the server of one resource."""
        resource = plan.resource(name)
        assert resource is not None
        server = create_server(
            name,
            self.kubelet_dir / resource.socket_name,
            state=self.state,
            allocator=self.allocator,
            recorder=self.metrics.allocate_recorder(name),
        )
        server.start()
        self._servers[name] = server
        count = len(resource.devices)
        log.info("serving %s (%d device%s) on %s", name, count, "" if count == 1 else "s",
                 resource.socket_name, extra={"resource": name})


__all__ = ["Component", "Daemon", "PlanListener", "StartupHook"]
