"""The test guest itself: boots, ticks, answers its agent, suspends and wakes up."""

from __future__ import annotations

import time

import pytest
from harness import GuestFactory, GuestSpec, GuestVM, Memory

pytestmark = pytest.mark.qemu

MIB = 1024 * 1024


def assert_ticks_consecutive(vm: GuestVM) -> list[int]:
    ticks = vm.ticks()
    assert ticks == list(range(1, len(ticks) + 1)), f"{vm.name}: ticks {ticks}"
    return ticks


def test_agent_suspend_and_wakeup(guests: GuestFactory) -> None:
    (vm,) = guests(GuestSpec("s3"))

    assert vm.agent("guest-ping") == {}
    assert vm.runstate() == "running"
    vm.wait_tick_above(0, timeout=10)

    assert vm.agent("guest-suspend-ram", expect_reply=False) is None
    vm.wait_runstate("suspended", timeout=10)

    # Suspended: the counter stands still.
    frozen = vm.last_tick()
    assert frozen is not None
    time.sleep(2.5)
    assert vm.last_tick() == frozen
    assert vm.runstate() == "suspended"

    assert vm.qmp("system_wakeup") == {}
    vm.wait_runstate("running", timeout=10)
    at_wakeup = vm.last_tick()
    assert at_wakeup is not None
    vm.wait_tick_above(at_wakeup, timeout=10)  # asserts it continued
    assert vm.agent("guest-ping") == {}

    # One guest life: the counter went on, it never restarted.
    ticks = assert_ticks_consecutive(vm)
    assert ticks[-1] > at_wakeup >= frozen


def test_suspend_twice(guests: GuestFactory) -> None:
    # QEMU's wake-up resets the chipset's ACPI PM registers; the guest's pm-suspend puts
    # them back, else the second suspend would return at once without suspending.
    (vm,) = guests(GuestSpec("s3twice"))
    vm.wait_tick_above(0, timeout=10)

    last = 0
    for _ in range(2):
        assert vm.agent("guest-suspend-ram", expect_reply=False) is None
        vm.wait_runstate("suspended", timeout=10)
        frozen = vm.last_tick()
        assert frozen is not None and frozen >= last

        assert vm.qmp("system_wakeup") == {}
        vm.wait_runstate("running", timeout=10)
        last = vm.wait_tick_above(frozen, timeout=10)
        assert last > frozen
        assert vm.agent("guest-ping") == {}

    assert vm.runstate() == "running"
    ticks = assert_ticks_consecutive(vm)
    assert ticks[-1] >= last


def test_machines_and_memory_backends(guests: GuestFactory) -> None:
    pc, file_vm, shm_vm, memfd_vm = guests(
        GuestSpec("pc", machine="pc", fill_mib=16),
        GuestSpec("file", memory=Memory.FILE),
        GuestSpec("shm", memory=Memory.SHM),
        GuestSpec("memfd", memory=Memory.MEMFD, agent=False),
    )
    vms = (pc, file_vm, shm_vm, memfd_vm)
    for vm in vms:
        vm.wait_tick_above(2, timeout=15)
        assert vm.runstate() == "running"
        assert_ticks_consecutive(vm)

    machine_types = {vm.name: vm.qmp("qom-get", path="/machine", property="type") for vm in vms}
    assert machine_types["pc"].startswith("pc-i440fx-"), machine_types
    for name in ("file", "shm", "memfd"):
        assert machine_types[name].startswith("pc-q35-"), machine_types

    # The shared backends are what the command line asked for.
    for vm, backing in ((file_vm, "file"), (shm_vm, "shm"), (memfd_vm, "memfd")):
        memdevs = {d["id"]: d for d in vm.qmp("query-memdev")}
        assert memdevs["ram0"]["size"] == 128 * MIB, (backing, memdevs)
        assert memdevs["ram0"]["share"] is True, (backing, memdevs)
    assert "ram0" not in {d["id"] for d in pc.qmp("query-memdev")}
    assert file_vm.mem_path == file_vm.dir / "ram0.mem"
    assert file_vm.mem_path.stat().st_size == 128 * MIB
    assert shm_vm.mem_path is not None
    assert shm_vm.mem_path.parent.as_posix() == "/dev/shm"
    assert shm_vm.mem_path.stat().st_size == 128 * MIB

    # cprd.fill=16 put 16 MiB of random data into the pc guest's tmpfs.
    res = pc.exec(["/bin/stat", "-c", "%s", "/fill/data"])
    assert (res.exitcode, res.stdout.strip()) == (0, str(16 * MIB))

    # Cleanup kills the VM and removes its /dev/shm file.
    shm_vm.cleanup()
    assert shm_vm.running_pids() == []
    assert not shm_vm.mem_path.exists()
