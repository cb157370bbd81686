"""The planner on plain data: suspend, RAM in place, migration settings, space."""

from __future__ import annotations

import dataclasses
from typing import Any

from cprd import plan
from cprd.config import InPlace, Live, SaveSettings, Suspend, VMSettings
from cprd.hosts import ProcessContext, relaunch_argv
from cprd.units import UnitInfo
from cprd.vm import Backend, MemClass, ProcIdentity, VMFacts, classify, fstype_of, vm_name

CAPS_10 = ("xbzrle", "x-ignore-shared", "multifd", "mapped-ram", "postcopy-ram")


def backend(**kw: Any) -> Backend:
    base: dict[str, Any] = dict(
        id="pc.ram",
        qom_type="memory-backend-ram",
        size=2**30,
        share=False,
        mem_path=None,
        fstype=None,
    )
    base.update(kw)
    base["memclass"] = classify(
        base["qom_type"],
        base["share"],
        base["fstype"],
        str(base["mem_path"] or "").startswith("/dev/dax"),
    )
    return Backend(**base)


def facts(**kw: Any) -> VMFacts:
    base: dict[str, Any] = dict(
        name="web1",
        qmp_socket="/run/cprd/qmp/web1.sock",
        pid=42,
        argv=("qemu",),
        executable="/usr/bin/qemu-system-x86_64",
        qemu_version=(10, 0, 2),
        machine_type="pc-q35-10.0",
        runstate="running",
        vfio_devices=(),
        backends=(backend(),),
        wakeup_suspend_support=True,
        migration_capabilities=CAPS_10,
        migration_blockers=(),
        agent_socket=None,
        agent_reachable=False,
    )
    base.update(kw)
    return VMFacts(**base)


SAVE = SaveSettings()
DISK_FILE = backend(
    id="ram0",
    qom_type="memory-backend-file",
    share=True,
    mem_path="/var/lib/vm/ram0",
    fstype="ext4",
)
SHM_FILE = backend(
    id="ram0", qom_type="memory-backend-file", share=True, mem_path="/dev/shm/ram0", fstype="tmpfs"
)
DAX = backend(
    id="ram0", qom_type="memory-backend-file", share=True, mem_path="/dev/dax0.0", fstype="devtmpfs"
)
MEMFD = backend(id="ram0", qom_type="memory-backend-memfd", share=True)


def test_memory_classes() -> None:
    assert backend().memclass is MemClass.PRIVATE
    assert DISK_FILE.memclass is MemClass.SHARED_PERSISTENT
    assert DAX.memclass is MemClass.SHARED_PERSISTENT
    assert SHM_FILE.memclass is MemClass.SHARED_VOLATILE
    assert MEMFD.memclass is MemClass.SHARED_VOLATILE
    assert classify("memory-backend-file", True, "hugetlbfs") is MemClass.SHARED_VOLATILE
    assert classify("memory-backend-file", False, "ext4") is MemClass.PRIVATE


def test_private_ram_is_copied_with_the_fast_settings() -> None:
    p = plan.plan_vm(facts(), VMSettings(), SAVE, "ext4")
    assert not p.suspend and not p.in_place and not p.problems
    assert dict(p.settings.capabilities) == {
        "x-ignore-shared": False,
        "mapped-ram": True,
        "multifd": True,
    }
    # A running VM whose RAM is copied is saved live (issue 15 item 1).
    assert dict(p.settings.parameters) == {
        "mode": "normal",
        "downtime-limit": 1,
        "avail-switchover-bandwidth": 2**20,
        "max-bandwidth": 2**63 - 1,
        "multifd-channels": 4,
        "direct-io": True,
    }
    assert p.live and p.settings.mode is plan.SaveMode.NORMAL
    assert p.action == "save live (RAM copied)"
    assert p.bytes_to_write == 2**30 + plan.STATE_OVERHEAD
    never = plan.plan_vm(facts(), VMSettings(), SaveSettings(live=Live.NEVER), "ext4")
    assert dict(never.settings.parameters) == {
        "mode": "cpr-reboot",
        "max-bandwidth": 2**63 - 1,
        "multifd-channels": 4,
        "direct-io": True,
    }
    assert not never.live and never.action == "save (RAM copied)"


def test_save_mode_is_live_only_for_a_running_vm_whose_ram_is_copied() -> None:
    """Stop-first (cpr-reboot) for a VM suspended first (VFIO, suspend: always), one
    whose RAM stays in place, one not running, an old QEMU, a live migration blocked,
    or save.live: never; live (normal) otherwise."""
    vm, save = VMSettings(), SAVE
    normal, cpr = plan.SaveMode.NORMAL, plan.SaveMode.CPR_REBOOT
    assert plan.save_mode(facts(), vm, save)[0] is normal
    cases: list[tuple[VMFacts, VMSettings, SaveSettings, tuple[str, ...], str]] = [
        (facts(), vm, SaveSettings(live=Live.NEVER), (), "save.live: never"),
        (facts(runstate="paused"), vm, save, (), "runstate 'paused'"),
        (facts(runstate="suspended"), vm, save, (), "runstate 'suspended'"),
        (facts(vfio_devices=("hostdev0",)), vm, save, (), "suspended first"),
        (facts(), VMSettings(suspend=Suspend.ALWAYS), save, (), "suspended first"),
        (facts(backends=(DISK_FILE,)), vm, save, (), "RAM stays in place"),
        (facts(qemu_version=(8, 2, 0)), vm, save, (), "no mapped-ram"),
        (facts(migration_capabilities=("x-ignore-shared",)), vm, save, (), "no mapped-ram"),
        (facts(), vm, save, ("a device blocks it",), "live migration blocked"),
    ]
    for f, v, s, blockers, why in cases:
        mode, text = plan.save_mode(f, v, s, blockers)
        assert mode is cpr and why in text, (f, v, s, blockers, text)
    # Copied shared memory that does not survive a reboot (memfd) is saved live.
    assert plan.save_mode(facts(backends=(MEMFD,)), vm, save)[0] is normal
    # The recorded mode of a manifest from before live saves: cpr-reboot.
    old = plan.MigrationSettings({}, {"max-bandwidth": 1})
    assert old.mode is cpr and not old.live


def test_no_direct_io_on_tmpfs_state_dir() -> None:
    p = plan.plan_vm(facts(), VMSettings(), SAVE, "tmpfs")
    assert p.settings.parameters["direct-io"] is False
    assert p.settings.capabilities["mapped-ram"] is True


def test_fallbacks_for_older_qemu() -> None:
    p90 = plan.plan_vm(facts(qemu_version=(9, 0, 0)), VMSettings(), SAVE, "ext4")
    assert p90.settings.capabilities["mapped-ram"] is True
    assert "direct-io" not in p90.settings.parameters
    caps_82 = ("xbzrle", "x-ignore-shared", "multifd")
    p82 = plan.plan_vm(
        facts(qemu_version=(8, 2, 0), migration_capabilities=caps_82), VMSettings(), SAVE, "ext4"
    )
    assert dict(p82.settings.capabilities) == {"x-ignore-shared": False, "multifd": False}
    assert dict(p82.settings.parameters) == {"mode": "cpr-reboot", "max-bandwidth": 2**63 - 1}
    assert not p82.problems
    p81 = plan.plan_vm(facts(qemu_version=(8, 1, 0)), VMSettings(), SAVE, "ext4")
    assert p81.problems == ("QEMU 8.1.0 is too old for cpr-reboot (needs 8.2 or later)",)


def test_persistent_shared_ram_stays_in_place() -> None:
    f = facts(backends=(DISK_FILE,))
    p = plan.plan_vm(f, VMSettings(), SAVE, "ext4")
    assert p.in_place and p.settings.capabilities["x-ignore-shared"] is True
    assert p.settings.capabilities["mapped-ram"] is False
    assert p.bytes_to_write == plan.STATE_OVERHEAD
    assert p.in_place_backends == (DISK_FILE,)
    never = plan.plan_vm(f, VMSettings(), SaveSettings(in_place=InPlace.NEVER), "ext4")
    assert not never.in_place and never.bytes_to_write == 2**30 + plan.STATE_OVERHEAD


def test_one_volatile_shared_backend_forces_a_copy_of_all() -> None:
    for volatile in (SHM_FILE, MEMFD):
        p = plan.plan_vm(facts(backends=(DISK_FILE, volatile)), VMSettings(), SAVE, "ext4")
        assert not p.in_place
        assert p.settings.capabilities["x-ignore-shared"] is False
        assert "lost at a reboot" in p.notes[1]
    p = plan.plan_vm(facts(backends=(SHM_FILE,)), VMSettings(), SAVE, "ext4")
    assert p.notes[1] == (
        "shared memory lost at a reboot: ram0 (/dev/shm/ram0 on tmpfs): RAM is copied"
    )


def test_suspend_decisions() -> None:
    vfio = facts(
        vfio_devices=("hostdev0 (vfio-pci)",), agent_socket="/q.sock", agent_reachable=True
    )
    assert plan.decide_suspend(vfio, VMSettings()) == (
        True,
        "has VFIO devices (hostdev0 (vfio-pci))",
    )
    assert plan.decide_suspend(facts(), VMSettings())[0] is False
    assert plan.decide_suspend(facts(), VMSettings(suspend=Suspend.ALWAYS))[0] is True
    assert plan.decide_suspend(facts(runstate="suspended"), VMSettings(suspend=Suspend.ALWAYS)) == (
        False,
        "already suspended by the guest",
    )
    p = plan.plan_vm(vfio, VMSettings(), SAVE, "ext4")
    assert p.suspend and not p.problems


def test_vfio_without_agent_is_refused() -> None:
    """Recorded facts: no VFIO hardware on this machine, so the VFIO device is data."""
    no_agent = facts(vfio_devices=("gpu0 (vfio-pci)",))
    assert plan.plan_vm(no_agent, VMSettings(), SAVE, "ext4").problems == (
        "must be suspended first (has VFIO devices (gpu0 (vfio-pci))) but no guest agent is "
        "configured",
    )
    silent = no_agent.replace(agent_socket="/run/qga/web1.sock")
    assert plan.plan_vm(silent, VMSettings(), SAVE, "ext4").problems == (
        "must be suspended first (has VFIO devices (gpu0 (vfio-pci))) but its guest agent at "
        "/run/qga/web1.sock does not answer",
    )
    never = plan.plan_vm(no_agent, VMSettings(suspend=Suspend.NEVER), SAVE, "ext4")
    assert never.problems == ("has VFIO devices but would not be suspended (suspend: never)",)
    no_s3 = silent.replace(agent_reachable=True, wakeup_suspend_support=False)
    assert plan.plan_vm(no_s3, VMSettings(), SAVE, "ext4").problems == (
        "must be suspended first but the machine has S3 disabled",
    )


def test_runstates_and_blockers() -> None:
    assert plan.plan_vm(facts(runstate="paused"), VMSettings(), SAVE, "ext4").problems == ()
    assert plan.plan_vm(facts(runstate="inmigrate"), VMSettings(), SAVE, "ext4").problems == (
        "runstate 'inmigrate' cannot be saved",
    )
    blocked = facts(migration_blockers=("device x does not support migration",))
    assert plan.plan_vm(blocked, VMSettings(), SAVE, "ext4").problems == (
        "migration blocked: device x does not support migration",
    )


def test_space() -> None:
    p = plan.plan_vm(facts(), VMSettings(), SAVE, "ext4")
    need = p.bytes_to_write
    assert plan.space_problem([p], need + 100 * 2**20, 100 * 2**20) is None
    assert plan.space_problem([p, p], need * 2 + 2**20, 256 * 2**20) == (
        "not enough space in state_dir: 2080 MiB to write plus 256 MiB margin, 2081 MiB free"
    )


def test_duplicate_names() -> None:
    a = facts()
    b = facts(qmp_socket="/run/cprd/qmp/other.sock")
    assert plan.duplicate_names([a, b]) == {
        "web1": "two VMs share this name (/run/cprd/qmp/web1.sock and /run/cprd/qmp/other.sock)"
    }


def test_vm_name_and_fstype() -> None:
    from pathlib import Path

    sock = Path("/run/x/fallback.sock")
    assert vm_name(("qemu", "-name", "web1,debug-threads=on"), sock) == "web1"
    assert vm_name(("qemu", "-name", "guest=db,process=qemu:db"), sock) == "db"
    assert vm_name(("qemu", "-m", "1G"), sock) == "fallback"
    mountinfo = (
        "22 1 254:0 / / rw - ext4 /dev/vda rw\n"
        "30 22 0:25 / /dev/shm rw - tmpfs tmpfs rw\n"
        "31 22 0:26 / /dev/hugepages rw - hugetlbfs hugetlbfs rw\n"
        "32 22 0:27 / /mnt/my\\040dir rw - xfs /dev/vdb rw\n"
    )
    assert fstype_of("/dev/shm/ram0", mountinfo) == "tmpfs"
    assert fstype_of("/dev/shmx/ram0", mountinfo) == "ext4"
    assert fstype_of("/dev/hugepages/x", mountinfo) == "hugetlbfs"
    assert fstype_of("/mnt/my dir/ram", mountinfo) == "xfs"
    assert fstype_of("/var/lib/x", mountinfo) == "ext4"


class RecordedQMP:
    """Replays recorded QMP replies.

    A fake, because this machine has no VFIO hardware: the qom-list replies below are
    what QEMU returns for a VM with a vfio-pci device (-device vfio-pci,id=hostdev0,...).
    """

    def __init__(self, replies: dict[str, Any]) -> None:
        self.replies = replies

    async def execute(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        key = f"{cmd} {args['path']}" if args and "path" in args else cmd
        if key not in self.replies:
            from cprd.errors import QMPError

            raise QMPError(f"recorded: no reply for {key}")
        return self.replies[key]


async def test_vfio_detection_on_recorded_replies() -> None:
    from cprd.vm import vfio_devices

    qmp = RecordedQMP(
        {
            "qom-list /machine/peripheral": [
                {"name": "type", "type": "string"},
                {"name": "hostdev0", "type": "child<vfio-pci>"},
                {"name": "net0", "type": "child<virtio-net-pci>"},
            ],
            "qom-list /machine/peripheral-anon": [
                {"name": "device[0]", "type": "child<vfio-pci-nohotplug>"},
                {"name": "device[1]", "type": "child<virtio-serial-pci>"},
            ],
        }
    )
    found = await vfio_devices(qmp)  # type: ignore[arg-type]
    assert found == ("hostdev0 (vfio-pci)", "device[0] (vfio-pci-nohotplug)")
    none = await vfio_devices(RecordedQMP({}))  # type: ignore[arg-type]
    assert none == ()
    f = facts(vfio_devices=found, agent_socket=None)
    assert plan.plan_vm(f, VMSettings(), SAVE, "ext4").problems == (
        "must be suspended first (has VFIO devices (hostdev0 (vfio-pci), device[0] "
        "(vfio-pci-nohotplug))) but no guest agent is configured",
    )


def test_transfer_path() -> None:
    memfd = facts(backends=(MEMFD,), aux_ram_share=True)
    assert plan.transfer_path(memfd, (10, 0, 2)) == (
        True,
        "all RAM shareable and aux-ram-share=on: cpr-transfer",
    )
    assert plan.transfer_path(facts(backends=(DISK_FILE,), aux_ram_share=True), (10, 1, 0))[0]
    assert plan.transfer_path(memfd, (9, 2, 0)) == (
        False,
        "cpr-transfer needs QEMU 10.0 on both sides (running 10.0.2, new 9.2.0)",
    )
    assert plan.transfer_path(facts(aux_ram_share=True), (10, 0, 2)) == (
        False,
        "RAM not shareable (pc.ram): saved to a file instead",
    )
    assert plan.transfer_path(facts(backends=(MEMFD,)), (10, 0, 2)) == (
        False,
        "-machine aux-ram-share=on is not set: saved to a file instead",
    )


def test_a_qemu_run_as_another_user_is_planned_when_its_uid_is_trusted() -> None:
    """cprd relaunches a QEMU as the uid it runs as (hosts.relaunch_as): a uid that
    discovery trusts is planned; another one, or mixed credentials, are refused."""
    ident = ProcIdentity(7, ("qemu",), 1, 2, (1000, 1000, 1000, 1000), (1000,) * 4)
    vm = plan.plan_vm(facts(identity=ident), VMSettings(), SaveSettings(), "ext4")
    assert any("runs as uid 1000" in p for p in vm.problems), vm.problems
    trusted = plan.plan_vm(facts(identity=ident), VMSettings(), SaveSettings(), "ext4", (1000,))
    assert not any("uid" in p for p in trusted.problems), trusted.problems
    mixed = dataclasses.replace(ident, uids=(1000, 0, 0, 0))
    refused = plan.plan_vm(facts(identity=mixed), VMSettings(), SaveSettings(), "ext4", (1000,))
    assert any("mixed credentials" in p for p in refused.problems), refused.problems
    dropped = dataclasses.replace(ident, uids=(65534,) * 4)
    argv = ("qemu", "-run-with", "user=nobody")
    untrusted = plan.plan_vm(
        facts(identity=dropped, argv=argv), VMSettings(), SaveSettings(), "ext4"
    )
    assert any("drops root to uid 65534" in p for p in untrusted.problems), untrusted.problems
    ok = plan.plan_vm(
        facts(identity=dropped, argv=argv), VMSettings(), SaveSettings(), "ext4", (65534,)
    )
    assert not any("uid" in p for p in ok.problems), ok.problems
    root = dataclasses.replace(ident, uids=(0,) * 4)
    assert not any(
        "runs as uid" in p
        for p in plan.plan_vm(facts(identity=root), VMSettings(), SaveSettings(), "ext4").problems
    )


def test_a_root_dropping_qemu_whose_argv_is_its_units_execstart_needs_no_trust() -> None:
    """issue 13 item 2: a QEMU started as root that drops to nobody itself is relaunched
    as root from its argv; that argv is accepted without trusting nobody only when it is
    the ExecStart= root's systemd holds for the service whose main process it is."""
    argv = ("/usr/bin/qemu-system-x86_64", "-m", "96", "-run-with", "user=nobody")
    ident = ProcIdentity(42, argv, 1, 2, (65534,) * 4, (65534,) * 4)
    ctx = ProcessContext(65534, 65534, (), "/", (), started_as_root=True)
    info = UnitInfo(
        "vm@web.service", 42, False, exec_start=argv, exec_path="/usr/bin/qemu-system-x86_64"
    )
    base = facts(
        argv=argv,
        identity=ident,
        process=ctx,
        cgroup="0::/system.slice/system-vm.slice/vm@web.service\n",
        unit_info=info,
    )
    ok = plan.plan_vm(base, VMSettings(), SaveSettings(), "ext4")
    assert not [p for p in ok.problems if "uid" in p], ok.problems
    assert (
        "argv matches systemd's ExecStart of vm@web.service (root's record): relaunched as "
        "root, drops to uid 65534 again"
    ) in ok.notes
    assert ok.argv == argv  # what the save records: the argv the check was made on
    after_restore = tuple(relaunch_argv(argv, "pc-q35-10.0"))
    again = dataclasses.replace(base, argv=after_restore)
    assert plan.argv_anchor(again) == "vm@web.service"

    evil = (*argv, "-netdev", "tap,id=n0,script=/tmp/evil.sh")
    for why, changed in {
        "argv rewritten": dataclasses.replace(base, argv=evil),
        "not the main process": dataclasses.replace(
            base, unit_info=dataclasses.replace(info, main_pid=7)
        ),
        "another binary": dataclasses.replace(base, executable="/tmp/qemu"),
        "no single ExecStart": dataclasses.replace(
            base, unit_info=dataclasses.replace(info, exec_start=None)
        ),
        "another unit's": dataclasses.replace(base, cgroup="0::/system.slice/vm@db.service\n"),
        "no unit": dataclasses.replace(base, unit_info=None),
    }.items():
        assert plan.argv_anchor(changed) is None, why
        refused = plan.plan_vm(changed, VMSettings(), SaveSettings(), "ext4")
        assert any("drops root to uid 65534" in p for p in refused.problems), (why, refused)
        assert not any("ExecStart of" in n for n in refused.notes), why
