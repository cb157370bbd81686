"""Restore into the operator's own unit (issue 13 item 5), against a stand-in PID 1.

A stand-in for org.freedesktop.systemd1 on a private bus, because systemd cannot run as
PID 1 on this machine (the real thing runs in the booted virtual host: tests/kexec_e2e,
vm2 is an operator's enabled template unit there).  The stand-in does what systemd does
with the parts cprd relies on: ``Reload`` runs the real cprd-generator into its
generator directory; ``StartUnit`` honours the drop-in's ``ConditionPathExists=`` (skips
the start without the mark) and runs its ``ExecStart=``; ``StopUnit`` kills it; the
unit's properties (ActiveState, MainPID, DropInPaths, Job) come from that.  Everything
else is real: the dbus-daemon with the project's policy, QEMU, the guest and its counter,
the generator, the marks in the run directory.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus
from fixtures_bus import BusDaemon
from harness import GuestFactory, GuestSpec
from test_cycle import make_config, save_and_commit
from test_launch_systemd import serving_as_systemd

from cprd import generator
from cprd import manifest as mf
from cprd.config import Config
from cprd.hosts import relaunch_argv
from cprd.inventory import Inventory
from cprd.launch import UnitLauncher
from cprd.manifest import Outcome
from cprd.restore import Restorer
from cprd.save import Saver
from cprd.units import DROPIN_NAME, UnitRef

pytestmark = pytest.mark.qemu
UNIT = "vm@un.service"
PREFIX = "/org/freedesktop/systemd1/unit/"


@dataclass
class StandInPID1:
    bus: MessageBus
    config: Path
    gen_dir: Path
    run_dir: Path
    paths: dict[str, str] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)
    #: units whose main process the stand-in did not start (a QEMU the harness runs):
    #: unit -> (MainPID, ExecStart's path, ExecStart's argv), as systemd would hold them
    held: dict[str, tuple[int, str, list[str]]] = field(default_factory=dict)

    def dropin(self, unit: str) -> Path:
        return self.gen_dir / f"{unit}.d" / DROPIN_NAME

    def active(self, unit: str) -> bool:
        proc = self.procs.get(unit)
        return proc is not None and proc.poll() is None

    def reload(self) -> None:
        for p in sorted(self.gen_dir.rglob("*"), reverse=True):
            p.unlink() if p.is_file() else p.rmdir()
        generator.run(
            [str(self.gen_dir)], config_path=self.config, failed_dir=self.run_dir / "restore-failed"
        )

    def start(self, unit: str) -> None:
        """The unit as written has no ExecStart here: only its drop-in's is run."""
        lines = self.dropin(unit).read_text().splitlines() if self.dropin(unit).exists() else []
        for ln in lines:
            path = ln.removeprefix("ConditionPathExists=")
            # the drop-in names /run/cprd/...: the stand-in's run_dir stands for /run/cprd
            path = path.replace("/run/cprd", str(self.run_dir)).replace("%n", unit)
            if ln.startswith("ConditionPathExists=") and not Path(path).exists():
                self.calls.append(f"skipped {unit}")  # condition unmet
                return
        if not lines:
            self.calls.append(f"cold boot {unit}")
            return
        exec_start = [ln for ln in lines if ln.startswith("ExecStart=") and ln != "ExecStart="]
        words = shlex.split(exec_start[-1].removeprefix("ExecStart="))
        self.procs[unit] = subprocess.Popen(
            words[1:],
            executable=words[0].removeprefix("@"),
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def stop(self, unit: str) -> None:
        proc = self.procs.get(unit)
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)

    def unit_path(self, unit: str) -> str:
        path = PREFIX + "".join(c if c.isalnum() else f"_{ord(c):02x}" for c in unit)
        self.paths[path] = unit
        return path

    def properties(self, unit: str, interface: str) -> dict[str, Variant]:
        if interface.endswith(".Service"):
            proc = self.procs.get(unit)
            pid = proc.pid if proc is not None and self.active(unit) else 0
            props = {"MainPID": Variant("u", pid), "Result": Variant("s", "success")}
            if unit in self.held:
                main, path, argv = self.held[unit]
                main = pid or main  # the QEMU the stand-in started, once it did
                # a(sasbttttuii): path, argv, ignore-failure, start/exit timestamps
                # (realtime, monotonic), pid, exit code, status
                entry = [path, argv, False, 0, 0, 0, 0, main, 0, 0]
                props["MainPID"] = Variant("u", main)
                props["ExecStart"] = Variant("a(sasbttttuii)", [entry])
            return props
        dropins = [str(self.dropin(unit))] if self.dropin(unit).exists() else []
        return {
            "Id": Variant("s", unit),
            "Transient": Variant("b", False),
            "ActiveState": Variant("s", "active" if self.active(unit) else "inactive"),
            "DropInPaths": Variant("as", dropins),
            "Job": Variant("(uo)", [0, "/"]),
        }

    def handle(self, msg: Message) -> Message | None:
        if msg.message_type != MessageType.METHOD_CALL:
            return None
        if msg.interface == "org.freedesktop.DBus.Properties" and msg.member == "GetAll":
            unit = self.paths[str(msg.path)]
            return Message.new_method_return(msg, "a{sv}", [self.properties(unit, msg.body[0])])
        if msg.interface != "org.freedesktop.systemd1.Manager":
            return None
        self.calls.append(str(msg.member))
        if msg.member == "LoadUnit":
            return Message.new_method_return(msg, "o", [self.unit_path(msg.body[0])])
        if msg.member == "GetUnitByPID":
            for unit, (main, _, _) in self.held.items():
                if main == msg.body[0]:
                    return Message.new_method_return(msg, "o", [self.unit_path(unit)])
            return Message.new_error(
                msg, "org.freedesktop.systemd1.NoUnitForPID", f"PID {msg.body[0]} has no unit"
            )
        if msg.member == "Reload":
            self.reload()
        elif msg.member == "StartUnit":
            self.start(msg.body[0])
        elif msg.member == "StopUnit":
            self.stop(msg.body[0])
        elif msg.member != "ResetFailedUnit":
            return None
        if msg.member in ("StartUnit", "StopUnit"):
            return Message.new_method_return(msg, "o", ["/org/freedesktop/systemd1/job/1"])
        return Message.new_method_return(msg)


@pytest.fixture
async def pid1(dbus_daemon: BusDaemon, vm_dir_root: Path) -> AsyncIterator[StandInPID1]:
    (vm_dir_root / "gen").mkdir()

    def make(bus: MessageBus) -> StandInPID1:
        return StandInPID1(bus, vm_dir_root / "cprd.yaml", vm_dir_root / "gen", vm_dir_root / "run")

    async with serving_as_systemd(dbus_daemon.address, make) as stand_in:
        yield stand_in


def patch(path: Path, head: bytes) -> None:
    with path.open("r+b") as f:
        f.write(head)


async def save_into_unit(cfg: Config) -> None:
    """prepare + commit, then record the VM as the main process of UNIT (its QEMU here is
    not in a systemd unit: the record is what a QEMU in vm@un.service would have)."""
    await save_and_commit(cfg)
    m = mf.read(cfg.manifest_path)
    mf.write(cfg.manifest_path, m.with_vm(m.vm("un").replace(unit=UnitRef(UNIT))))


async def test_restore_into_the_operators_unit_and_a_failure_leaves_it_as_written(
    guests: GuestFactory, vm_dir_root: Path, dbus_daemon: BusDaemon, pid1: StandInPID1
) -> None:
    (vm,) = guests(GuestSpec("un"))
    vm.wait_tick_above(2)
    cfg = make_config(vm_dir_root)
    units = UnitLauncher(dbus_daemon.address, run_dir=pid1.run_dir)
    await save_into_unit(cfg)
    last = vm.last_tick()
    vm.released()
    assert last is not None
    # The unit's own start (the boot's, or by hand) with the generator's drop-in: skipped.
    pid1.reload()
    assert pid1.dropin(UNIT).exists()
    pid1.start(UNIT)
    assert pid1.calls == [f"skipped {UNIT}"] and not pid1.active(UNIT)

    result = await Restorer(cfg, units=units).run()
    assert [(r.name, r.outcome, r.reason) for r in result.vms] == [
        ("un", Outcome.RESTORED, "running")
    ]
    assert vm.pid == pid1.procs[UNIT].pid  # the unit's MainPID is the restored QEMU
    vm.wait_tick_above(last)  # asserts it continued
    # the drop-in was there before (no reload needed), and is gone after: as written
    starts = [c for c in pid1.calls if c in ("Reload", "StartUnit")]
    assert starts == ["StartUnit", "Reload"]
    assert not pid1.dropin(UNIT).exists()
    assert list((pid1.run_dir / "restoring").iterdir()) == []

    # A restore that fails after the unit started: the unit is stopped, marked, and the
    # next reload leaves it as written; a retry brings the VM back into it.
    await save_into_unit(cfg)
    pid1.procs[UNIT].wait(timeout=30)  # the stand-in reaps its QEMU, which quit
    last = vm.last_tick()
    assert last is not None and not pid1.active(UNIT)
    state = Path(mf.read(cfg.manifest_path).vm("un").state_file)
    header = state.read_bytes()[:64]  # the migration stream's header: a load fails
    patch(state, b"\0" * 64)
    pid1.calls.clear()
    result = await Restorer(cfg, units=units).run()
    (rec,) = result.vms
    # QEMU 10.0 exits when the incoming stream is bad: "connection lost" on its monitor
    assert rec.outcome is Outcome.FAILED and "query-migrate: connection lost" in rec.reason
    assert [c for c in pid1.calls if c in ("Reload", "StartUnit", "StopUnit")] == [
        "Reload",
        "StartUnit",
        "StopUnit",
        "Reload",
    ]
    assert not pid1.active(UNIT) and vm.running_pids() == []
    assert not pid1.dropin(UNIT).exists()  # the unit as the operator wrote it
    assert (pid1.run_dir / "restore-failed" / UNIT).exists()
    assert state.exists()  # kept

    patch(state, header)
    result = await Restorer(cfg, units=units).run()
    assert [(r.name, r.outcome) for r in result.vms] == [("un", Outcome.RESTORED)]
    assert vm.pid == pid1.procs[UNIT].pid
    vm.wait_tick_above(last)
    assert not (pid1.run_dir / "restore-failed" / UNIT).exists()
    assert not pid1.dropin(UNIT).exists()


async def test_a_root_dropping_qemu_anchored_to_its_units_execstart_needs_no_trusted_uid(
    guests: GuestFactory,
    vm_dir_root: Path,
    dbus_daemon: BusDaemon,
    pid1: StandInPID1,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """issue 13 item 2: a QEMU started as root that drops to nobody itself
    (``-run-with user=nobody``) is relaunched as root from its argv, which nobody can
    rewrite in its memory.  As the main process of a service whose ExecStart= (held by
    PID 1, root) is that very argv it passes check with no discovery.trusted_uids; once
    the unit's ExecStart= differs by one word it is refused, naming the way out.  In
    between it is saved (recorded as its unit's main process, with the argv checked),
    restored into that unit (the relaunch form, dropping to nobody again), and checked
    again in that form: still anchored.

    Real: QEMU, the drop to nobody, /proc, the dbus-daemon with the project's policy,
    cprd's D-Bus client (sysd.Systemd.unit_of_pid over DBUS_SYSTEM_BUS_ADDRESS).  Stand-
    ins, since systemd cannot be PID 1 here: the systemd1 API (GetUnitByPID, the unit's
    Id, MainPID and ExecStart) and the unit's cgroup, a directory of the name=systemd
    hierarchy the QEMU is moved into (as in test_hosts_qemu)."""
    from test_hosts_qemu import CGROUP_ROOT, in_cgroup

    if not (CGROUP_ROOT / "cgroup.procs").exists():
        pytest.skip("no name=systemd cgroup hierarchy to put the QEMU in a unit's cgroup")
    unit = "vm@anc.service"
    cgroup = f"system.slice/system-vm.slice/{unit}"
    (vm,) = guests(GuestSpec("anc", extra_args=["-run-with", "user=nobody"]))
    exe = os.path.realpath(shutil.which(vm.argv[0]) or vm.argv[0])
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", dbus_daemon.address)
    cfg = make_config(vm_dir_root)  # no trusted_uids
    assert cfg.discovery.trusted_uids == ()

    async def check() -> tuple[str, tuple[str, ...], tuple[str, ...]]:
        inventory = Inventory(cfg)
        try:
            plans, problems = await Saver(cfg, inventory).plan()
        finally:
            await inventory.close()
        ((_, vm_plan),) = plans
        return problems.get("anc", ""), vm_plan.notes, vm_plan.argv

    note = (
        f"argv matches systemd's ExecStart of {unit} (root's record): relaunched as root, "
        "drops to uid 65534 again"
    )
    with in_cgroup(vm.pid, cgroup):
        assert Path(f"/proc/{vm.pid}/status").read_text().count("65534") >= 4  # dropped
        pid1.held[unit] = (vm.pid, exe, list(vm.argv))
        problem, notes, argv = await check()
        assert problem == ""
        assert note in notes
        assert argv == tuple(vm.argv)  # what a save records: the argv just checked
        assert "GetUnitByPID" in pid1.calls

        # Saved with no trusted uid, recorded as the main process of its unit, with the
        # argv checked.
        vm.wait_tick_above(2)
        await save_and_commit(cfg)
        last = vm.last_tick()
        vm.released()
    rec = mf.read(cfg.manifest_path).vm("anc")
    assert rec.argv == tuple(vm.argv) and rec.unit == UnitRef(unit)
    assert rec.process is not None and rec.process.uid == 65534 and rec.process.started_as_root

    # Restored into its unit (the drop-in's ExecStart: the relaunch form, run as root,
    # dropping to nobody again); the guest goes on.
    units = UnitLauncher(dbus_daemon.address, run_dir=pid1.run_dir)
    result = await Restorer(cfg, units=units).run()
    assert [(r.name, r.outcome) for r in result.vms] == [("anc", Outcome.RESTORED)]
    assert last is not None
    vm.wait_tick_above(last)
    restored = pid1.procs[unit].pid
    assert vm.pid == restored
    assert Path(f"/proc/{restored}/status").read_text().count("65534") >= 4
    running = Path(f"/proc/{restored}/cmdline").read_bytes().split(b"\0")[:-1]
    assert [a.decode() for a in running] == relaunch_argv(vm.argv, rec.machine_type)

    # The restored QEMU runs the relaunch form while systemd shows the unit's own line
    # again (the drop-in is gone): still anchored, so the next kexec saves it too.
    assert not pid1.dropin(unit).exists()
    with in_cgroup(restored, cgroup):
        pid1.held[unit] = (restored, exe, list(vm.argv))
        problem, notes, argv = await check()
        assert problem == "" and note in notes
        assert argv == tuple(relaunch_argv(vm.argv, rec.machine_type))

        # The unit's ExecStart= is not the argv the QEMU runs with (as if the QEMU had
        # rewritten one word of it): refused, as without a unit.
        other = [*vm.argv[:-1], vm.argv[-1] + "x"]
        pid1.held[unit] = (restored, exe, other)
        problem, notes, _ = await check()
        assert (
            "drops root to uid 65534 itself (-run-with user=/-runas), so a restore runs its "
            "argv as root, and uid 65534 can rewrite that argv in its memory: run it as the "
            "main process of a systemd service (whose ExecStart= cprd then checks its argv "
            "against), or add 65534 to discovery.trusted_uids to trust it so"
        ) in problem
        assert not any("ExecStart of" in n for n in notes)
