"""Save and restore on real guests: the whole cycle, rollback, refusals.

Every QEMU here is real (TCG) with a real qemu-ga.  The "reboot" is simulated: commit
quits every QEMU, and the restore starts them again from the manifest.
"""

from __future__ import annotations

import logging
import os
import signal
import stat
from pathlib import Path

import pytest
from harness import GuestFactory, GuestSpec, GuestVM, Memory

from cprd import cli, config
from cprd import manifest as mf
from cprd.errors import PreflightError, SaveError
from cprd.inventory import Inventory
from cprd.manifest import Outcome, Phase
from cprd.restore import Restorer
from cprd.save import Saver

pytestmark = pytest.mark.qemu

MIB = 2**20


def make_config(root: Path, extra: str = "", trusted_uids: tuple[int, ...] = ()) -> config.Config:
    cfg = root / "cprd.yaml"
    cfg.write_text(
        f"state_dir: {root}/state\n"
        f"discovery: {{qmp_sockets: ['{root}/*/qmp.sock'], trusted_uids: {list(trusted_uids)},\n"
        f"            agent_socket: '{root}/{{name}}/qga.sock'}}\n"
        "save: {space_margin_mib: 16, timeout_s: 120}\n"
        "restore: {timeout_s: 120}\n" + extra
    )
    return config.load(cfg)


def runstates(vms: list[GuestVM]) -> dict[str, str]:
    return {vm.name: vm.runstate() for vm in vms}


def assert_counting(vm: GuestVM) -> None:
    last = vm.last_tick() or 0
    vm.wait_tick_above(last, timeout=15)


async def save_and_commit(cfg: config.Config) -> None:
    """prepare + commit of every VM cfg finds, as the daemon would run them."""
    inventory = Inventory(cfg)
    try:
        saver = Saver(cfg, inventory)
        await saver.prepare()
        await saver.commit()
    finally:
        await inventory.close()


async def test_whole_cycle(
    guests: GuestFactory, vm_dir_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    priv, disk, shm, s3 = guests(
        GuestSpec("priv", fill_mib=32),
        GuestSpec("disk", memory=Memory.FILE),
        GuestSpec("shm", memory=Memory.SHM),
        GuestSpec("s3"),
    )
    vms = [priv, disk, shm, s3]
    cfg = make_config(vm_dir_root, "vms: {s3: {suspend: always}}\n")
    for vm in vms:
        vm.wait_tick_above(2)
    inventory = Inventory(cfg)
    saver = Saver(cfg, inventory)
    caplog.set_level(logging.INFO)
    try:
        manifest = await saver.prepare()
        assert manifest.phase is Phase.PREPARED
        assert runstates(vms) == dict.fromkeys(("priv", "disk", "shm", "s3"), "postmigrate")
        recs = {r.name: r for r in manifest.vms}
        # Private RAM: copied with the fast settings.
        assert recs["priv"].settings.capabilities == {
            "x-ignore-shared": False,
            "mapped-ram": True,
            "multifd": True,
        }
        assert recs["priv"].settings.parameters["max-bandwidth"] == 2**63 - 1
        assert recs["priv"].state_size is not None and recs["priv"].state_size > 128 * MIB
        # Shared RAM on a file on disk: stays in place, the state file is small.
        assert recs["disk"].settings.capabilities["x-ignore-shared"] is True
        assert recs["disk"].state_size is not None and recs["disk"].state_size < 4 * MIB
        assert [f.path for f in recs["disk"].in_place] == [str(disk.mem_path)]
        # /dev/shm does not survive a reboot: copied, and the log says why.
        assert recs["shm"].settings.capabilities["x-ignore-shared"] is False
        assert recs["shm"].state_size is not None and recs["shm"].state_size > 128 * MIB
        assert any(
            "shared memory lost at a reboot" in r.getMessage() and "tmpfs" in r.getMessage()
            for r in caplog.records
            if getattr(r, "CPRD_VM", None) == "shm"
        )
        # suspend: always: suspended through its agent, then saved.
        assert recs["s3"].cprd_suspended is True and recs["priv"].cprd_suspended is False
        for rec in manifest.vms:
            assert rec.machine_type.startswith("pc-q35-")
            assert stat.S_IMODE(os.stat(rec.state_file).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(cfg.state_dir).st_mode) == 0o700
        assert mf.read(cfg.manifest_path) == manifest

        before = {vm.name: vm.last_tick() for vm in vms}
        committed = await saver.commit()
        assert committed.phase is Phase.COMMITTED
    finally:
        await inventory.close()
    for vm in vms:  # the simulated reboot: every QEMU is gone
        vm.released()
        assert vm.running_pids() == []

    restored = await Restorer(cfg).run()
    assert restored.phase is Phase.RESTORED
    assert {r.name: (r.outcome, r.reason) for r in restored.vms} == {
        "priv": (Outcome.RESTORED, "running"),
        "disk": (Outcome.RESTORED, "running"),
        "shm": (Outcome.RESTORED, "running"),
        "s3": (Outcome.RESTORED, "running (woken)"),
    }
    for vm in vms:
        tick = before[vm.name]
        assert tick is not None and tick > 2
        # The counter continues: the first tick after the restore follows the last one.
        vm.wait_tick_above(tick, timeout=20)  # asserts the counter continued from tick
        assert vm.ticks() == list(range(1, len(vm.ticks()) + 1)), vm.ticks()
        (pid,) = vm.running_pids()
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert b"-incoming" in argv and argv[argv.index(b"-incoming") + 1] == b"defer"
        machine = argv[argv.index(b"-machine") + 1].decode()
        assert machine.startswith("pc-q35-10."), machine
    assert s3.agent("guest-ping") == {}
    # State files are deleted once their VM is confirmed back.
    assert sorted(os.listdir(cfg.state_dir)) == sorted(
        ["manifest.yaml", "priv.log", "disk.log", "shm.log", "s3.log"]
    )

    # Idempotent: a second restore does nothing to restored VMs.
    pids = {vm.name: vm.running_pids() for vm in vms}
    again = await Restorer(cfg).run()
    assert again == restored
    assert {vm.name: vm.running_pids() for vm in vms} == pids


async def test_rollback_when_a_qemu_dies_mid_save(guests: GuestFactory, vm_dir_root: Path) -> None:
    a, b, victim = guests(GuestSpec("a"), GuestSpec("b", memory=Memory.FILE), GuestSpec("victim"))
    cfg = make_config(vm_dir_root, "save: {concurrency: 1, space_margin_mib: 16}\n")
    inventory = Inventory(cfg)

    def kill_victim(name: str, phase: str, done: int, total: int) -> None:
        # A copied VM is saved live: its first progress is "live" (running), not "saving".
        if name == "victim" and phase in ("live", "saving") and done == 0:
            os.kill(victim.pid, signal.SIGKILL)

    try:
        with pytest.raises(SaveError) as err:
            await Saver(cfg, inventory, kill_victim).prepare()
    finally:
        await inventory.close()
    outcomes = err.value.outcomes
    assert outcomes["a"] == "resumed (running)"
    assert outcomes["b"] == "resumed (running)"
    # The victim's QEMU died on its own: cprd says so, it does not call it put back.
    assert outcomes["victim"].startswith("failed ("), outcomes
    assert "LOST: its QEMU exited" in outcomes["victim"], outcomes
    assert "not every VM could be put back (victim LOST" in str(err.value)
    assert runstates([a, b]) == {"a": "running", "b": "running"}
    for vm in (a, b):
        assert_counting(vm)
    assert os.listdir(cfg.state_dir) == []  # no state file, no manifest left


async def test_not_enough_space_stops_nothing(guests: GuestFactory, vm_dir_root: Path) -> None:
    (vm,) = guests(GuestSpec("big"))
    cfg = make_config(vm_dir_root, "save: {space_margin_mib: 100000000}\n")
    inventory = Inventory(cfg)
    try:
        with pytest.raises(PreflightError) as err:
            await Saver(cfg, inventory).prepare()
    finally:
        await inventory.close()
    assert list(err.value.problems) == ["state_dir"]
    assert err.value.problems["state_dir"].startswith("not enough space in state_dir: 144 MiB")
    assert str(err.value).startswith("preflight failed, nothing was stopped: state_dir: ")
    assert vm.runstate() == "running"
    assert not cfg.manifest_path.exists()


async def test_prepare_resume_prepare_commit(guests: GuestFactory, vm_dir_root: Path) -> None:
    vm, s3 = guests(GuestSpec("one"), GuestSpec("s3"))
    cfg = make_config(vm_dir_root, "vms: {s3: {suspend: always}}\n")
    inventory = Inventory(cfg)
    saver = Saver(cfg, inventory)
    try:
        first = await saver.prepare()
        assert mf.read(cfg.manifest_path).phase is Phase.PREPARED
        assert runstates([vm, s3]) == {"one": "postmigrate", "s3": "postmigrate"}
        outcomes = await saver.resume()
        # QEMU 10.0 aborts on `cont` for a guest saved while suspended: cprd reloads
        # that one from its state file instead, and wakes it.
        assert outcomes == {
            "one": "resumed (running)",
            "s3": "resumed from its state file (running (woken))",
        }
        s3.released()
        assert not cfg.manifest_path.exists()
        assert sorted(os.listdir(cfg.state_dir)) == ["s3.log"]  # the reloaded QEMU's log
        assert_counting(vm)
        assert_counting(s3)
        assert s3.agent("guest-ping") == {}
        # The reloaded s3 guest is woken and running again; prepare once more.
        second = await saver.prepare()
        assert [r.name for r in second.vms] == [r.name for r in first.vms]
        committed = await saver.commit()
        assert mf.read(cfg.manifest_path) == committed
        assert committed.phase is Phase.COMMITTED
    finally:
        await inventory.close()
    vm.released()
    s3.wait_exit()


def test_restore_refusals_keep_state(
    guests: GuestFactory, vm_dir_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ok, short, gone = guests(
        GuestSpec("ok"), GuestSpec("short"), GuestSpec("gone", memory=Memory.FILE)
    )
    cfg_path = vm_dir_root / "cprd.yaml"
    make_config(vm_dir_root)
    assert cli.main(["--config", str(cfg_path), "prepare", "--commit"]) == 0
    for vm in (ok, short, gone):
        vm.released()
    cfg = config.load(cfg_path)
    manifest = mf.read(cfg.manifest_path)
    short_state = Path(manifest.vm("short").state_file)
    with open(short_state, "r+b") as f:
        f.truncate(1000)
    assert gone.mem_path is not None
    gone.mem_path.unlink()
    capsys.readouterr()

    assert cli.main(["--config", str(cfg_path), "restore"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "gone: failed: in-place memory " + str(gone.mem_path) + (
        " (ram0) is gone: its RAM is lost, refusing to start the VM from half a state"
    )
    assert out[1] == "ok: restored: running"
    assert out[2].startswith(f"short: failed: state file {short_state} has 1000 bytes, expected ")
    assert short.running_pids() == [] and gone.running_pids() == []
    assert short_state.exists() and Path(manifest.vm("gone").state_file).exists()
    assert not Path(manifest.vm("ok").state_file).exists()
    assert_counting(ok)
    after = mf.read(cfg.manifest_path)
    assert after.phase is Phase.COMMITTED
    assert [r.outcome for r in after.vms] == [Outcome.FAILED, Outcome.RESTORED, Outcome.FAILED]

    # A re-run retries the failed ones only, and still refuses them.
    pid_ok = ok.running_pids()
    assert cli.main(["--config", str(cfg_path), "restore"]) == 1
    assert ok.running_pids() == pid_ok
