"""The inventory on real QEMUs: new sockets, a QEMU that dies and comes back."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest
from harness import GuestFactory, GuestSpec
from test_cycle import make_config

from cprd.inventory import Inventory

pytestmark = pytest.mark.qemu


async def scan_until(inventory: Inventory, ok: object, timeout: float = 20) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not ok():  # type: ignore[operator]
        assert loop.time() < deadline, {h.name: h.facts.pid for h in inventory.vms()}
        await inventory.scan()
        await asyncio.sleep(0.2)


async def test_restart_and_new_socket(guests: GuestFactory, vm_dir_root: Path) -> None:
    (vm,) = guests(GuestSpec("one"))
    inventory = Inventory(make_config(vm_dir_root))
    try:
        await inventory.scan()
        (handle,) = inventory.vms()
        facts = handle.facts
        assert (facts.name, facts.pid, facts.runstate) == ("one", vm.pid, "running")
        assert facts.machine_type.startswith("pc-q35-") and facts.argv[0].endswith(
            "qemu-system-x86_64"
        )
        assert facts.executable == os.path.realpath("/usr/bin/qemu-system-x86_64")
        assert facts.qemu_version >= (10, 0, 0)
        assert facts.agent_socket == str(vm.qga_path)

        # QEMU dies: the VM is released; it comes back with a new pid: held again.
        old_pid = vm.pid
        os.kill(old_pid, signal.SIGKILL)
        vm.released()
        await scan_until(inventory, lambda: not inventory.vms())
        vm.start()
        await scan_until(inventory, lambda: [h.facts.pid for h in inventory.vms()] == [vm.pid])
        assert vm.pid != old_pid

        # A runstate change arrives as an event and is picked up on the next scan.
        vm.qmp("stop")
        await scan_until(inventory, lambda: inventory.vms()[0].facts.runstate == "paused")
        vm.qmp("cont")

        # A new QEMU whose socket matches the globs is noticed.
        guests(GuestSpec("two"))
        await scan_until(inventory, lambda: [h.name for h in inventory.vms()] == ["one", "two"])
    finally:
        await inventory.close()
