"""Bugs that ``make faults`` (tests/fault_matrix.py) found, each pinned by a real-guest test.

Every QEMU and guest agent here is real (TCG, the test guest's qemu-ga).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from pathlib import Path

import pytest
from harness import GuestFactory, GuestSpec
from test_cycle import make_config
from test_live import make_config as live_config
from test_live import stops_of

from cprd import failpoint
from cprd import manifest as mf
from cprd.hosts import relaunch_argv
from cprd.inventory import Inventory
from cprd.manifest import Journal, Manifest, Phase
from cprd.save import Saver
from cprd.steps import Action, Facts, Intent, Qemu, Seen, Step, decide

# Fault-style: run by `make faults`, not `make check` (its 15-minute budget).
pytestmark = [pytest.mark.qemu, pytest.mark.faults]


async def test_interrupted_between_suspend_and_s3_is_woken(
    guests: GuestFactory, vm_dir_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The cell prepare/saved/enospc: another VM's failure cancelled s3's save after
    guest-suspend-ram was sent but before the guest reached S3.  The rollback saw it
    "running" and called it put back; a moment later it went to sleep and stayed there.

    Set up exactly that moment (as cprd leaves it when it is killed or cancelled right
    after sending the command): the journal says ``suspending``, guest-suspend-ram has just
    been sent (by the test, through the real qemu-ga), the guest still runs.  Resume must
    wait for S3 and wake the guest, not call it running."""
    (vm,) = guests(GuestSpec("s3"))
    cfg = make_config(vm_dir_root, "save: {suspend_timeout_s: 10}\nvms: {s3: {suspend: always}}\n")
    vm.wait_tick_above(1)
    inventory = Inventory(cfg)
    saver = Saver(cfg, inventory)
    try:
        (plan,), problems = await saver.plan()
        assert problems == {}
        work = saver._work(*plan, "")
        mf.ensure_state_dir(cfg.state_dir)
        journal = Journal.create(cfg.manifest_path, Manifest.new(Phase.PREPARING, (work.record,)))
        journal.step("s3", Step.SUSPENDING)
    finally:
        await inventory.close()
    vm.agent("guest-suspend-ram", expect_reply=False)
    assert vm.runstate() == "running"  # not yet: S3 takes the guest about a second

    caplog.set_level(logging.INFO)
    inventory = Inventory(cfg)
    try:
        outcomes = await Saver(cfg, inventory).resume()
    finally:
        await inventory.close()
    assert outcomes == {"s3": "resumed (running)"}
    woken = [r for r in caplog.records if r.getMessage() == "put back: woken"]
    assert len(woken) == 1, [r.getMessage() for r in caplog.records]
    # Still running seconds later (not asleep in S3): its counter goes on.
    last = vm.last_tick() or 0
    vm.wait_tick_above(last + 3, timeout=15)
    assert vm.runstate() == "running"
    assert not cfg.manifest_path.exists()
    assert os.listdir(cfg.state_dir) == []


async def test_qemu_left_waiting_by_an_interrupted_reload_is_replaced(
    guests: GuestFactory, vm_dir_root: Path
) -> None:
    """The cell resume/resumed/kill-cprd: cprd was killed while it reloaded a VM, after
    its new QEMU (``-incoming defer``) started and before ``migrate-incoming``.  That QEMU
    waits in ``inmigrate`` forever; every later resume said "another QEMU serves its
    socket (inmigrate): kept", so the VM never came back without an operator's kill.

    Set up that moment for real: a prepared save, the journal at ``restoring``, the old
    QEMU quit, and the new one started with the argv cprd uses (by the test, as cprd's
    launcher would).  Resume must replace it and load the complete state."""
    (vm,) = guests(GuestSpec("r"))
    cfg = make_config(vm_dir_root)
    vm.wait_tick_above(1)
    inventory = Inventory(cfg)
    try:
        manifest = await Saver(cfg, inventory).prepare()
    finally:
        await inventory.close()
    (rec,) = manifest.vms
    before = vm.last_tick() or 0
    journal = Journal.load(cfg.manifest_path)
    journal.step("r", Step.RESTORING)
    vm.qmp("quit")
    vm.released()
    orphan = subprocess.Popen(
        relaunch_argv(rec.argv, rec.machine_type),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        vm.wait_sockets()
        vm.wait_runstate("inmigrate")
        inventory = Inventory(cfg)
        try:
            outcomes = await Saver(cfg, inventory).resume()
        finally:
            await inventory.close()
        assert orphan.wait(timeout=10) == -signal.SIGKILL
    finally:
        if orphan.poll() is None:
            orphan.kill()
            orphan.wait()
    assert outcomes == {"r": "resumed from its state file (running)"}
    assert vm.runstate() == "running"
    vm.wait_tick_above(before, timeout=15)
    assert vm.serial_text().count("cprd-guest-ready") == 1  # the same boot, going on
    assert not cfg.manifest_path.exists()


def test_an_interrupted_shutdown_is_taken_up_again() -> None:
    """The cells anyway/shutting-down/* (raise, cancel, enospc, kill-cprd): the shutdown of
    a VM that could not be saved was interrupted; its guest still runs.  commit(anyway) only
    waited ("shutting down") until its deadline (save.timeout_s + restore.timeout_s: 20
    minutes by default, longer than logind's delay) instead of shutting it down again.
    Pure: decide() alone."""
    f = Facts(Step.SHUTTING_DOWN, "running", cprd_suspended=False, on_kexec_failure="shutdown")
    d = decide(f, Seen(Qemu.UP, "running"), Intent.COMMIT_ANYWAY)
    assert (d.action, d.to) == (Action.SHUTDOWN, Step.SHUTTING_DOWN)
    d = decide(f, Seen(Qemu.HUNG), Intent.COMMIT_ANYWAY)
    assert (d.action, d.to) == (Action.KILL, Step.SHUTTING_DOWN)
    leave = Facts(Step.SHUTTING_DOWN, "running", cprd_suspended=False, on_kexec_failure="leave")
    assert decide(leave, Seen(Qemu.UP, "running"), Intent.COMMIT_ANYWAY).action is Action.DONE
    # The kexec can still be stopped: nothing is shut down there.
    assert decide(f, Seen(Qemu.UP, "running"), Intent.COMMIT).action is Action.WAIT


async def test_a_live_save_cancelled_on_the_anyway_path_is_put_back(
    guests: GuestFactory, vm_dir_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cell anyway/stopping/cancel: on the save-what-can-be-saved path one VM's save
    task was cancelled at the end of its live phase (before its ``stop``).  The gather of
    the isolated saves returned that CancelledError as a result, no error was noted for
    the VM, and its live migration was left running with nobody to cancel it: the prepare
    called it done, QEMU stopped the guest when a pass found nothing dirty, and commit
    took it for saved.  A save cancelled on its own is that VM's failure: put back (its
    migration cancelled, never stopped), to be shut down at commit."""
    (vm,) = guests(GuestSpec("live", dirty_mib=8))
    vm.wait_tick_above(2)
    cfg = live_config(vm_dir_root)
    monkeypatch.setenv(failpoint.ENV, "stopping:cancel:live")
    monkeypatch.setattr(failpoint, "_armed", None)
    inventory = Inventory(cfg)
    try:
        async with stops_of(vm) as stops:
            manifest = await Saver(cfg, inventory).prepare(anyway=True)
        assert stops.at["live"] == []
    finally:
        await inventory.close()
    (rec,) = manifest.vms
    assert manifest.phase is Phase.PREPARED
    assert (rec.step, rec.reason) == (Step.RESUMED, "its save was cancelled")
    assert vm.qmp("query-migrate")["status"] == "cancelled"
    assert vm.runstate() == "running"
    vm.wait_tick_above(vm.last_tick() or 0)
