"""The systemd launcher, against a stand-in org.freedesktop.systemd1 on a private bus.

A stand-in, because systemd cannot run as PID 1 on this machine.  It answers
StartTransientUnit the way systemd does for the properties cprd sends (it starts
ExecStart's argv as a detached process, with User=, Group=, SupplementaryGroups=,
WorkingDirectory= and Environment= applied) and StopUnit (it kills it).  Everything else is
real: the dbus-daemon with the project's policy, QEMU, the guest and its counter.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pytest
from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus
from dbus_fast.auth import AuthExternal
from fixtures_bus import BusDaemon
from harness import GuestFactory, GuestSpec
from test_cycle import make_config

from cprd.inventory import Inventory
from cprd.launch import SystemdLauncher
from cprd.manifest import Outcome, Phase
from cprd.restore import Restorer
from cprd.save import Saver

pytestmark = pytest.mark.qemu


@dataclass
class StandInSystemd:
    bus: MessageBus
    units: dict[str, dict[str, Any]] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def handle(self, msg: Message) -> Message | None:
        if msg.message_type != MessageType.METHOD_CALL or msg.interface != (
            "org.freedesktop.systemd1.Manager"
        ):
            return None
        if msg.member == "StartTransientUnit":
            name, _mode, props, _aux = msg.body
            values = {key: variant.value for key, variant in props}
            self.units[name] = values
            ((path, argv, _ignore),) = values["ExecStart"]
            # User=, Group=, SupplementaryGroups= (numeric, as cprd sends them),
            # WorkingDirectory= (default /) and Environment=, as systemd applies them.
            creds: dict[str, Any] = {}
            if "User" in values:
                creds.update(user=int(values["User"]), extra_groups=[])
            if "Group" in values:
                creds["group"] = int(values["Group"])
            if "SupplementaryGroups" in values:
                creds["extra_groups"] = [int(g) for g in values["SupplementaryGroups"]]
            env = values.get("Environment")
            self.procs[name] = subprocess.Popen(
                argv,
                executable=path,
                start_new_session=True,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                cwd=values.get("WorkingDirectory", "/"),
                env=dict(e.split("=", 1) for e in env) if env is not None else None,
                **creds,
            )
            return Message.new_method_return(msg, "o", ["/org/freedesktop/systemd1/job/1"])
        if msg.member == "StopUnit":
            proc = self.procs.pop(msg.body[0], None)
            if proc is not None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
            return Message.new_method_return(msg, "o", ["/org/freedesktop/systemd1/job/2"])
        return None


class StandInPID1Like(Protocol):
    procs: dict[str, subprocess.Popen[bytes]]

    def handle(self, msg: Message) -> Message | None: ...


S = TypeVar("S", bound=StandInPID1Like)


@contextlib.asynccontextmanager
async def serving_as_systemd(address: str, make: Callable[[MessageBus], S]) -> AsyncIterator[S]:
    """A stand-in (``make(bus)``) owning org.freedesktop.systemd1 on the test bus; on the
    way out, what it started is killed."""
    bus = await asyncio.wait_for(MessageBus(bus_address=address, auth=AuthExternal()).connect(), 5)
    stand_in = make(bus)
    bus.add_message_handler(stand_in.handle)
    await bus.request_name("org.freedesktop.systemd1")
    try:
        yield stand_in
    finally:
        bus.disconnect()
        for proc in stand_in.procs.values():  # stop what the stand-in started
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)


@pytest.fixture
async def systemd(dbus_daemon: BusDaemon) -> AsyncIterator[StandInSystemd]:
    async with serving_as_systemd(dbus_daemon.address, StandInSystemd) as stand_in:
        yield stand_in


async def test_restore_through_a_transient_unit(
    guests: GuestFactory, vm_dir_root: Path, dbus_daemon: BusDaemon, systemd: StandInSystemd
) -> None:
    (vm,) = guests(GuestSpec("sd"))
    vm.wait_tick_above(2)
    cfg = make_config(vm_dir_root, "restore: {launcher: systemd}\n")
    inventory = Inventory(cfg)
    try:
        saver = Saver(cfg, inventory)
        await saver.prepare()
        last = vm.last_tick()
        await saver.commit()
    finally:
        await inventory.close()
    vm.released()

    launcher = SystemdLauncher(dbus_daemon.address)
    result = await Restorer(cfg, launcher=launcher).run()
    assert result.phase is Phase.RESTORED
    assert [(r.name, r.outcome, r.reason) for r in result.vms] == [
        ("sd", Outcome.RESTORED, "running")
    ]
    unit = systemd.units["cprd-vm-sd.service"]
    ((path, argv, _),) = unit["ExecStart"]
    assert path == os.path.realpath("/usr/bin/qemu-system-x86_64")
    assert argv[-2:] == ["-incoming", "defer"]
    assert unit["KillMode"] == "mixed"
    assert unit["Description"] == "QEMU VM sd (restored by cprd)"
    assert vm.pid == systemd.procs["cprd-vm-sd.service"].pid
    assert last is not None
    vm.wait_tick_above(last)  # asserts it continued
