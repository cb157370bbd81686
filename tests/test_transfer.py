"""QEMU-only upgrades on real guests: cpr-transfer, and the file path for the rest."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from fixtures_daemon import Daemon
from harness import GuestFactory, GuestSpec, Memory
from test_cycle import make_config

from cprd.inventory import Inventory
from cprd.save import Saver
from cprd.transfer import Upgrader, transfer_argv

pytestmark = pytest.mark.qemu

AUX = ["-machine", "aux-ram-share=on"]


def test_transfer_argv() -> None:
    argv = ("qemu", "-machine", "q35", "-incoming", "defer", "-m", "1G")
    assert transfer_argv(argv, "pc-q35-10.0", Path("/run/c.sock")) == [
        "qemu",
        "-machine",
        "pc-q35-10.0",
        "-m",
        "1G",
        "-incoming",
        '{"channel-type": "cpr", "addr": {"transport": "socket", "type": "unix", '
        '"path": "/run/c.sock"}}',
        "-incoming",
        "defer",
    ]


async def test_upgrade_moves_every_vm_to_a_new_process(
    guests: GuestFactory, vm_dir_root: Path
) -> None:
    memfd, shared, private = guests(
        GuestSpec("memfd", memory=Memory.MEMFD, extra_args=AUX),
        GuestSpec("shared", memory=Memory.FILE, extra_args=AUX),
        GuestSpec("private"),
    )
    vms = [memfd, shared, private]
    for vm in vms:
        vm.wait_tick_above(2)
    old = {vm.name: vm.pid for vm in vms}
    inventory = Inventory(make_config(vm_dir_root))
    upgrader = Upgrader(inventory.config, inventory)
    try:
        paths = {h.name: (ok, why) for h, _, ok, why in await upgrader.paths(None, None)}
        assert paths == {
            "memfd": (True, "all RAM shareable and aux-ram-share=on: cpr-transfer"),
            "shared": (True, "all RAM shareable and aux-ram-share=on: cpr-transfer"),
            "private": (False, "RAM not shareable (pc.ram): saved to a file instead"),
        }
        last = {vm.name: vm.last_tick() for vm in vms}
        results = await upgrader.upgrade()
        assert results == {
            "memfd": "cpr-transfer: running",
            "shared": "cpr-transfer: running",
            "private": "file: restored: running",
        }
        for vm in vms:
            vm.released()
            (pid,) = vm.running_pids()
            assert pid != old[vm.name]
            tick = last[vm.name]
            assert tick is not None
            vm.wait_tick_above(tick)  # asserts it continued
            assert vm.ticks() == list(range(1, len(vm.ticks()) + 1))
            assert vm.agent("guest-ping") == {}
        # The daemon's inventory holds the new processes.
        await inventory.scan()
        assert {h.name: h.facts.pid for h in inventory.vms()} == {vm.name: vm.pid for vm in vms}
        for name in ("memfd", "shared"):
            print(f"{name}: cpr-transfer blackout {upgrader.blackout[name] * 1000:.0f} ms")
            assert upgrader.blackout[name] < 30
    finally:
        await inventory.close()


async def test_a_new_qemu_that_fails_leaves_the_old_one_running(
    guests: GuestFactory, vm_dir_root: Path
) -> None:
    (vm,) = guests(GuestSpec("stay", memory=Memory.MEMFD, extra_args=AUX))
    # Probed as nobody (issue 14): the binary must lie where nobody may reach it, in a
    # directory only root writes (vm_dir_root is root's 0700).
    bin_dir = Path(tempfile.mkdtemp(prefix="cprd-test-bin-", dir="/run"))
    bin_dir.chmod(0o755)
    bad = bin_dir / "qemu-broken"
    bad.write_text(
        "#!/bin/sh\ncase \"$1\" in --version) echo 'QEMU emulator version 10.0.9';; "
        "*) echo 'broken qemu' >&2; exit 1;; esac\n"
    )
    bad.chmod(0o755)
    inventory = Inventory(make_config(vm_dir_root))
    try:
        results = await Upgrader(inventory.config, inventory).upgrade(binary=str(bad))
    finally:
        await inventory.close()
        shutil.rmtree(bin_dir)
    assert list(results) == ["stay"]
    assert results["stay"].startswith("failed, still in its old QEMU: stay: the new QEMU exited")
    assert vm.running_pids() == [vm.pid] and vm.runstate() == "running"
    last = vm.last_tick()
    assert last is not None
    vm.wait_tick_above(last)  # asserts it continued
    # The transfer made state_dir (its sockets live there) and left none of them behind.
    left = [p.name for p in (vm_dir_root / "state").iterdir()]
    assert not [n for n in left if n.endswith((".cpr.sock", ".mig.sock"))], left
    assert os.path.exists(vm.qmp_path)


def test_cprdctl_upgrade_qemu_over_the_bus(guests: GuestFactory, daemon: Daemon) -> None:
    (vm,) = guests(GuestSpec("up", memory=Memory.MEMFD, extra_args=AUX))
    daemon.wait_state("idle")
    deadline = time.monotonic() + 20
    while "QEMU-only upgrade: cpr-transfer" not in daemon.ctl("check").stdout:
        assert time.monotonic() < deadline, daemon.ctl("check").stdout
        time.sleep(0.2)
    old_pid, last = vm.pid, vm.last_tick()
    unknown = daemon.ctl("upgrade-qemu", "nosuchvm")
    assert (unknown.returncode, unknown.stderr.strip()) == (
        1,
        "cprdctl: Failed: no VM named 'nosuchvm'",
    )
    out = daemon.ctl("upgrade-qemu", "--binary", "/usr/bin/qemu-system-x86_64", "up")
    assert (out.returncode, out.stdout) == (0, "up: cpr-transfer: running\n"), out.stderr
    vm.released()
    assert vm.pid != old_pid
    assert last is not None
    vm.wait_tick_above(last)  # asserts it continued
    assert vm.agent("guest-ping") == {}
    daemon.wait_state("idle")


async def test_upgrade_after_a_save_and_resume(guests: GuestFactory, vm_dir_root: Path) -> None:
    """A save leaves mapped-ram and multifd on in the QEMU it resumes, and mapped-ram needs
    a seekable file: cpr-transfer failed with "Migration requires seekable transport"
    until it switched cprd's capabilities off itself."""
    (vm,) = guests(GuestSpec("again", memory=Memory.MEMFD, extra_args=AUX))
    inventory = Inventory(make_config(vm_dir_root))
    try:
        saver = Saver(inventory.config, inventory)
        await saver.prepare()
        await saver.resume()
        assert vm.qmp("query-migrate-capabilities") and any(
            c["capability"] == "mapped-ram" and c["state"]
            for c in vm.qmp("query-migrate-capabilities")
        )
        last = vm.last_tick()
        results = await Upgrader(inventory.config, inventory).upgrade()
    finally:
        await inventory.close()
    assert results == {"again": "cpr-transfer: running"}, results
    vm.released()
    assert last is not None
    vm.wait_tick_above(last)
