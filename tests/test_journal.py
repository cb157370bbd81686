"""The step journal and the always-running rollback, on real guests (issue 12's list).

Real QEMU (TCG) and qemu-ga throughout; no fakes.
"""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import pytest
from harness import GuestFactory, GuestSpec
from test_cycle import make_config, runstates, save_and_commit

from cprd import manifest as mf
from cprd.controller import Controller, PrepareOptions, State
from cprd.errors import SaveError
from cprd.inventory import Inventory
from cprd.manifest import Phase
from cprd.restore import Restorer
from cprd.save import Saver
from cprd.steps import Step

pytestmark = pytest.mark.qemu


async def test_prepare_records_every_step_before_it_is_taken(
    guests: GuestFactory, vm_dir_root: Path
) -> None:
    """The manifest's history per VM is the steps in the order taken, each stamped."""
    sus, plain = guests(GuestSpec("sus"), GuestSpec("plain"))
    cfg = make_config(vm_dir_root, "vms: {sus: {suspend: always}}\n")
    inventory = Inventory(cfg)
    try:
        saver = Saver(cfg, inventory)
        manifest = await saver.prepare()
        steps = {r.name: [h[0] for h in r.history] for r in manifest.vms}
        # plain is saved live: cprd records `stopping` before it stops it, unless QEMU
        # finished on its own first (an idle guest: nothing dirtied after the first pass).
        assert steps["plain"] in (["migrating", "saved"], ["migrating", "stopping", "saved"])
        assert steps["sus"] == ["suspending", "migrating", "saved"]
        assert all(r.step is Step.SAVED and r.state_size for r in manifest.vms)
        outcomes = await saver.resume()
    finally:
        await inventory.close()
    assert outcomes == {
        "plain": "resumed (running)",
        "sus": "resumed from its state file (running (woken))",
    }
    assert runstates([sus, plain]) == {"sus": "running", "plain": "running"}
    assert not cfg.manifest_path.exists()


async def test_a_commit_that_fails_puts_every_vm_back(
    guests: GuestFactory, vm_dir_root: Path
) -> None:
    """PrepareKexec(commit=true) whose commit fails must not leave the VMs saved and stopped:
    here one saved VM is continued behind cprd's back (its state is stale), so it cannot be
    committed, and every VM is put back, the one already quit too (from its state file)."""
    a, b = guests(GuestSpec("a"), GuestSpec("b"))
    cfg = make_config(vm_dir_root)
    controller = Controller(cfg)
    await controller.start()
    try:
        await controller.saver.prepare()
        b.qmp("cont")  # someone resumes b between the save and the commit
        with pytest.raises(SaveError) as err:
            await controller.saver.commit()
        assert "commit failed: b: its QEMU is running, not postmigrate" in str(err.value)
        assert err.value.pending == ()
    finally:
        await controller.close()
    a.released()
    assert runstates([a, b]) == {"a": "running", "b": "running"}
    assert err.value.outcomes["a"].startswith("resumed from its state file"), err.value.outcomes
    tick = a.last_tick()
    assert tick is not None
    a.wait_tick_above(tick)
    assert not cfg.manifest_path.exists()
    assert os.listdir(cfg.state_dir) == [] or all(
        n.endswith(".log") for n in os.listdir(cfg.state_dir)
    )


async def test_check_during_a_save_changes_nothing(guests: GuestFactory, vm_dir_root: Path) -> None:
    """Check while a prepare runs answers from the last result, marked stale, and sends
    QEMU nothing (it used to flip the migration mode under a running save)."""
    (vm,) = guests(GuestSpec("big", fill_mib=60, mem_mib=160))
    cfg = make_config(vm_dir_root)
    controller = Controller(cfg)
    await controller.start()
    try:
        first = await controller.check()
        assert [r["name"] for r in first] == ["big"] and "stale" not in first[0]
        preparing = asyncio.Event()

        def on_state(state: State) -> None:
            if state is State.PREPARING:
                preparing.set()

        controller.on_state = on_state
        # A Check in flight (any member of group cprd may start one) is waited for: it
        # must not make root's prepare fail with Busy.
        checking = asyncio.create_task(controller.check())
        await asyncio.sleep(0)  # it takes the lock and waits on QEMU
        assert controller._lock.locked() and not controller.busy
        prepare = asyncio.create_task(controller.prepare(PrepareOptions()))
        await asyncio.wait_for(preparing.wait(), 30)
        during = await controller.check()
        assert during == [dict(first[0], stale=True)]
        await prepare
        assert (await checking)[0]["name"] == "big"
        assert controller.state.value == "prepared"
        # The mode the save set (saved live: normal), not one a check flipped it to.
        assert vm.qmp("query-migrate-parameters")["mode"] == "normal"
        await controller.resume()
    finally:
        await controller.close()
    assert vm.runstate() == "running"


async def test_concurrent_scans_keep_the_inventory_whole(
    guests: GuestFactory, vm_dir_root: Path
) -> None:
    """Scans from the background loop, Check, plan and upgrade used to race: a lost race
    left a VM marked busy for ever, and a double drop killed the inventory task."""
    vms = guests(GuestSpec("s1"), GuestSpec("s2"))
    inventory = Inventory(make_config(vm_dir_root))
    try:
        await asyncio.gather(*(inventory.scan() for _ in range(8)))
        assert sorted(h.name for h in inventory.vms()) == ["s1", "s2"]
        assert inventory.unreachable() == {}
        vms[1].kill()
        vms[1].released()
        # Its link closes a moment after the process dies: scan (8 at once) until then.
        for _ in range(100):
            await asyncio.gather(*(inventory.scan() for _ in range(8)))
            if len(inventory.vms()) == 1:
                break
            await asyncio.sleep(0.1)
        assert [h.name for h in inventory.vms()] == ["s1"]
        assert inventory.unreachable() == {}
    finally:
        await inventory.close()


async def test_restore_never_starts_a_second_qemu_beside_a_busy_monitor(
    guests: GuestFactory, vm_dir_root: Path
) -> None:
    """A live QEMU whose cprd socket another client holds is running all the same: restore
    must refuse, not start a second QEMU on the same disks."""
    (vm,) = guests(GuestSpec("live"))
    cfg = make_config(vm_dir_root)
    inventory = Inventory(cfg)
    try:
        manifest = await Saver(cfg, inventory).prepare()
    finally:
        await inventory.close()
    # Pretend the commit happened and the VM runs again (a manifest from a commit whose
    # kexec was called off, restored by hand), while another client holds its monitor.
    vm.qmp("cont")
    rec = manifest.vm("live")
    mf.write(
        cfg.manifest_path,
        manifest.replace(phase=Phase.COMMITTED, boot_id="elsewhere", vms=(rec.at(Step.COMMITTED),)),
    )
    holder = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    holder.connect(str(vm.qmp_path))
    try:
        holder.recv(4096)  # the greeting: this client holds the monitor now
        result = await Restorer(cfg).run()
    finally:
        holder.close()
    (out,) = result.vms
    assert out.outcome.value == "failed"
    assert "a QEMU already serves its socket" in out.reason
    assert vm.running_pids() == [vm.pid]
    assert Path(rec.state_file).exists()  # the state is kept


def _uids(pid: int) -> list[int]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return [int(u) for u in line.split()[1:]]
    raise AssertionError(f"no Uid line for pid {pid}")


async def test_a_qemu_that_dropped_root_is_saved_and_restored(
    guests: GuestFactory, vm_dir_root: Path
) -> None:
    """QEMU opens no state file itself: cprd creates it in its root-only state_dir and
    hands it over (add-fd, file:/dev/fdset/N).  A QEMU that dropped root with
    ``-run-with user=nobody`` is saved, committed and restored, and runs as nobody again
    (its argv drops root again)."""
    (vm,) = guests(GuestSpec("drop", extra_args=["-run-with", "user=nobody"]))
    assert _uids(vm.pid)[0] == 65534
    # Relaunched as root (it drops again) from an argv nobody could rewrite: trusted.
    cfg = make_config(vm_dir_root, trusted_uids=(65534,))
    await save_and_commit(cfg)
    vm.released()
    assert oct(os.stat(cfg.state_dir).st_mode & 0o777) == "0o700"
    tick = vm.last_tick()
    result = await Restorer(cfg).run()
    assert [(r.name, r.outcome.value) for r in result.vms] == [("drop", "restored")]
    (pid,) = vm.running_pids()
    assert _uids(pid)[0] == 65534
    assert tick is not None
    vm.wait_tick_above(tick)
