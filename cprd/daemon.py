"""The long-running daemon: the controller on the bus, as a systemd Type=notify service.

READY=1 once the bus name is owned and the first inventory is done; STATUS= with the VM
count and phase; WATCHDOG=1 from the event loop when WATCHDOG_USEC is set;
EXTEND_TIMEOUT_USEC while an operation runs; STOPPING=1.  SIGTERM exits cleanly without
touching the VMs (an operation in flight finishes first).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal

from dbus_fast import BusType, RequestNameReply
from dbus_fast.aio import MessageBus
from dbus_fast.auth import AuthExternal

from cprd.config import Config
from cprd.config import Launcher as LauncherKind
from cprd.controller import Controller, State
from cprd.errors import CprdError, TransportError
from cprd.launch import Launcher, SystemdLauncher, make_launcher
from cprd.service import NAME, PATH, BusGlue, Manager

logger = logging.getLogger(__name__)


def notify(message: str) -> None:
    """sd_notify; a no-op when not run by systemd."""
    if not os.environ.get("NOTIFY_SOCKET"):
        return
    from systemd import daemon

    daemon.notify(message)


async def connect(bus_address: str | None) -> MessageBus:
    try:
        if bus_address:
            bus = MessageBus(bus_address=bus_address, auth=AuthExternal(), negotiate_unix_fd=True)
        else:
            bus = MessageBus(bus_type=BusType.SYSTEM, negotiate_unix_fd=True)
        return await asyncio.wait_for(bus.connect(), 10)
    except (OSError, TimeoutError, Exception) as err:
        if isinstance(err, asyncio.CancelledError):
            raise
        raise TransportError(
            f"cannot connect to the D-Bus {bus_address or 'system bus'}: "
            f"{err or type(err).__name__}"
        ) from err


async def _watchdog() -> None:
    usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
    if usec <= 0:
        return
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(usec / 2e6)


def daemon_launcher(config: Config, bus_address: str | None) -> Launcher:
    """How the daemon itself starts a QEMU (a reload during rollback, a Restore call).

    Under systemd the daemon runs sandboxed, and a QEMU it spawned directly would inherit
    the sandbox and die with the daemon: it asks systemd for a transient unit instead.
    """
    if os.environ.get("INVOCATION_ID") and config.restore.launcher is not LauncherKind.SYSTEMD:
        logger.info("running under systemd: QEMUs the daemon starts get transient units")
        return SystemdLauncher(bus_address)
    return make_launcher(config, bus_address)


async def run_daemon(config: Config, bus_address: str | None) -> int:
    controller = Controller(config, daemon_launcher(config, bus_address))
    bus = await connect(bus_address)
    manager = Manager(controller)
    glue = BusGlue(bus, manager)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def status(state: State | None = None) -> None:
        state = state or controller.state
        notify(f"STATUS={state.value}, {len(controller.vms())} VMs")
        if state in (State.PREPARING, State.COMMITTING, State.RESUMING):
            notify(f"EXTEND_TIMEOUT_USEC={config.save.timeout_s * 1_000_000}")

    on_state = manager._state_changed

    def state_changed(state: State) -> None:
        on_state(state)
        status(state)

    controller.on_state = state_changed
    watchdog = asyncio.create_task(_watchdog(), name="watchdog")
    try:
        await controller.start()
        bus.export(PATH, manager)
        reply = await bus.request_name(NAME)
        if reply not in (RequestNameReply.PRIMARY_OWNER, RequestNameReply.ALREADY_OWNER):
            raise CprdError(f"cannot own {NAME} on the bus ({reply.name}): is cprd running?")
        await glue.start()
        notify("READY=1")
        status()
        logger.info("cprd ready: %d VMs, %s", len(controller.vms()), controller.state.value)
        await stop.wait()
        # Stopping: a second SIGTERM (systemd's, a test's) must not kill the process
        # half-way through its clean exit, once the loop's handlers are gone.
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
            signal.signal(sig, signal.SIG_IGN)
        notify("STOPPING=1")
        if controller.busy:
            # An operation in flight finishes first (controller.close waits for it).
            notify(f"EXTEND_TIMEOUT_USEC={config.save.timeout_s * 1_000_000}")
            logger.info("stopping once the operation in flight (%s) ends", controller.state.value)
        logger.info("stopping; the VMs are left as they are")
    finally:
        watchdog.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watchdog
        await glue.close()
        await controller.close()
        bus.disconnect()
    return 0
