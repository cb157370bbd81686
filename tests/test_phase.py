"""Status reflects the phase (issue 17 item 1): what ListVMs and `cprdctl status` say right
after each cprdctl command returns is already true.

Real: the cprd daemon on a private dbus-daemon with the project's policy, QEMU guests with
qemu-ga (one saved in S3, whose resume reloads it into a new QEMU; one moved by cpr-transfer
at upgrade-qemu).  The truth each status is held against is each guest's own QMP
(``query-status`` through its test-qmp socket) and /proc (the QEMU processes that run it).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fixtures_bus import BusDaemon
from fixtures_daemon import Daemon, start_daemon, stop_daemon
from harness import GuestFactory, GuestSpec, GuestVM, Memory
from test_cycle import make_config
from test_operator import conforms, documented, list_vms

from cprd.controller import Controller, PrepareOptions, held, phase_line, vm_document
from cprd.inventory import Inventory
from cprd.manifest import VMRecord
from cprd.plan import MigrationSettings
from cprd.render import action_cell, status_table
from cprd.steps import Step
from cprd.vm import VMFacts

# --- pure -----------------------------------------------------------------------------------


def record(step: Step, **changes: Any) -> VMRecord:
    rec = VMRecord(
        name="web",
        qmp_socket="/run/web/qmp.sock",
        pid=4242,
        argv=("/usr/bin/qemu-system-x86_64",),
        executable="/usr/bin/qemu-system-x86_64",
        qemu_version="10.0.2",
        machine_type="pc-q35-10.0",
        state_file="/var/lib/cprd/web.state",
        settings=MigrationSettings(capabilities={}, parameters={}),
        runstate_before="running",
        cprd_suspended=False,
        agent_socket="/run/web/qga.sock",
        state_size=512 * 2**20,
    )
    return rec.replace(step=step, **changes)


def test_phase_lines() -> None:
    assert phase_line(record(Step.SAVED)) == (
        "saved (512 MiB, /var/lib/cprd/web.state, resumable until commit)"
    )
    assert phase_line(record(Step.SAVED, state_size=348_160)).startswith("saved (340 KiB, ")
    assert phase_line(record(Step.COMMITTED)) == "committed (QEMU quit)"
    assert phase_line(record(Step.RESTORED)) == "restored"
    assert phase_line(record(Step.MIGRATING)) == "migrating"
    # cprd holds a VM from its first change until it runs again without its state.
    assert [s.value for s in Step if held(record(s))] == [
        "suspending",
        "migrating",
        "stopping",
        "saved",
        "resuming",
        "reloading",
        "quitting",
        "committed",
        "shutting-down",
        "shut-down",
        "restoring",
        "booting",
    ]


def test_a_committed_vm_is_listed_from_its_record() -> None:
    doc = vm_document(None, record(Step.COMMITTED))
    assert (doc["pid"], doc["runstate"], doc["step"], doc["phase"]) == (
        0,
        "",
        "committed",
        "committed (QEMU quit)",
    )
    conforms({"schema_version": 1, **doc}, "vm", documented(), "committed")
    row = status_table([doc], [], 100.0).splitlines()[1].split()
    assert row == ["web", "-", "committed", "-", "-", "-", "-", "committed", "(QEMU", "quit)", "-"]


def test_a_record_of_an_earlier_qemu_is_not_this_one() -> None:
    """A VM restored by cprd, then restarted by its operator: no longer "restored"."""
    facts = VMFacts(
        name="web",
        qmp_socket="/run/web/qmp.sock",
        pid=4242,
        argv=(),
        executable="/usr/bin/qemu-system-x86_64",
        qemu_version=(10, 0, 2),
        machine_type="pc-q35-10.0",
        runstate="running",
        vfio_devices=(),
        backends=(),
        wakeup_suspend_support=True,
        migration_capabilities=(),
        migration_blockers=(),
    )
    doc = vm_document(facts, record(Step.RESTORED))
    assert (doc["pid"], doc["step"], doc["phase"]) == (4242, "restored", "restored")
    doc = vm_document(facts.replace(pid=5000), record(Step.RESTORED))
    assert (doc["pid"], doc["step"], doc["phase"]) == (5000, "", "")
    # A saved VM is its recorded QEMU whatever: the record stands.
    assert vm_document(facts, record(Step.SAVED))["step"] == "saved"


def test_a_saved_vm_shows_its_phase_not_refused() -> None:
    vm = {"name": "web", "step": "saved", "phase": phase_line(record(Step.SAVED))}
    assert action_cell(vm, {}) == vm["phase"]
    assert action_cell(vm, {"ok": False}) == "REFUSED"
    assert action_cell({"name": "web"}, {}) == "-"


# --- on real guests -------------------------------------------------------------------------

AUX = ["-machine", "aux-ram-share=on"]


@pytest.fixture
def s3_daemon(dbus_daemon: BusDaemon, vm_dir_root: Path) -> Iterator[Daemon]:
    """The real daemon, configured to suspend guest ``s3`` before saving it; logging to
    its own file (not the host-global journald)."""
    d = start_daemon(
        dbus_daemon, vm_dir_root, {"CPRD_LOG": "stderr"}, "vms: {s3: {suspend: always}}\n"
    )
    try:
        d.wait_answering()
        yield d
    finally:
        stop_daemon(d)


def run(daemon: Daemon, *args: str) -> str:
    out = daemon.ctl(*args, timeout=300)
    assert out.returncode == 0, f"{args}: {out.stdout}{out.stderr}{daemon.log.read_text()[-4000:]}"
    return out.stdout


def status(daemon: Daemon) -> dict[str, Any]:
    doc = json.loads(run(daemon, "status", "--json"))
    conforms(doc, "status", documented(), "status --json")
    assert isinstance(doc, dict)
    return doc


def agrees(daemon: Daemon, vms: list[GuestVM], after: str) -> dict[str, dict[str, Any]]:
    """D-Bus ListVMs and then `cprdctl status --json`, read at once, agree with each guest's
    QMP and its real pid; no VM is REFUSED.  Returns status's VM objects by name.

    ListVMs is read first and by itself: `cprdctl status` runs Check before it, and Check
    scans the inventory, which would hide a picture left stale by the operation."""
    bare = list_vms(daemon)
    doc = status(daemon)
    listed = {vm["name"]: vm for vm in doc["vms"]}
    truth = {}
    for vm in vms:
        pids = vm.running_pids()
        assert len(pids) == 1, f"after {after}: {vm.name} runs in {pids}"
        truth[vm.name] = {"pid": pids[0], "runstate": vm.runstate()}
    for what, got in (("ListVMs", bare), ("status", listed)):
        seen = {n: {"pid": v["pid"], "runstate": v["runstate"]} for n, v in got.items()}
        assert seen == truth, f"after {after}: {what} says {seen}, QEMU says {truth}"
    refused = [c for c in doc["check"] if not c["ok"]]
    assert not refused, f"after {after}: {refused}"
    text = run(daemon, "status")
    assert "REFUSED" not in text, f"after {after}:\n{text}"
    return listed


@pytest.mark.qemu
def test_status_is_true_after_every_command(guests: GuestFactory, s3_daemon: Daemon) -> None:
    daemon = s3_daemon
    plain, s3 = guests(
        GuestSpec("plain", memory=Memory.MEMFD, extra_args=AUX),
        GuestSpec("s3", fill_mib=16),
        timeout=180,  # the shared host may be loaded
    )
    vms = [plain, s3]
    deadline = time.monotonic() + 30
    while {v["name"] for v in status(daemon)["vms"]} != {"plain", "s3"}:
        assert time.monotonic() < deadline, daemon.log.read_text()
        time.sleep(0.2)
    started = agrees(daemon, vms, "start")
    assert {v["step"] for v in started.values()} == {""}

    # upgrade-qemu: plain by cpr-transfer, s3 through a file; both in new processes.
    # (First: a QEMU that a save has touched keeps mapped-ram set, and cpr-transfer then
    # fails, "Migration requires seekable transport": a transfer.py matter, not this one.)
    out = run(daemon, "upgrade-qemu")
    before = agrees(daemon, vms, "upgrade-qemu")
    for name in ("plain", "s3"):
        assert before[name]["pid"] != started[name]["pid"], out
    assert {v["runstate"] for v in before.values()} == {"running"}
    assert "plain: cpr-transfer" in out, out

    # prepare: both saved (s3 suspended first), shown as saved, not checked, not refused.
    run(daemon, "prepare-kexec")
    saved = agrees(daemon, vms, "prepare-kexec")
    for name, obj in saved.items():
        assert obj["runstate"] == "postmigrate" and obj["pid"] == before[name]["pid"]
        assert obj["step"] == "saved", obj
        assert obj["phase"].startswith("saved (") and obj["phase"].endswith(
            ", resumable until commit)"
        ), obj
    assert [c["name"] for c in status(daemon)["check"]] == []
    text = run(daemon, "status").splitlines()
    assert text[0] == "cprd: prepared, 2 VMs"
    assert all(
        "postmigrate  saved" in line and "resumable until commit" in line for line in text[2:]
    )

    # resume: s3 was saved in S3, so it comes back in a NEW QEMU (reloaded from its state);
    # status holds that one at once, not the old pid.
    run(daemon, "resume")
    resumed = agrees(daemon, vms, "resume")
    assert resumed["s3"]["pid"] != before["s3"]["pid"]
    assert resumed["plain"]["pid"] == before["plain"]["pid"]
    assert {v["runstate"] for v in resumed.values()} == {"running"}
    assert {(v["step"], v["phase"]) for v in resumed.values()} == {("", "")}

    # commit: every VM committed, with no QEMU, still listed.
    run(daemon, "prepare-kexec")
    agrees(daemon, vms, "prepare-kexec (2)")
    run(daemon, "commit")
    for vm in vms:
        assert vm.running_pids() == []
        vm.released()
    doc = status(daemon)
    assert doc["state"] == "committed"
    committed = {v["name"]: (v["pid"], v["runstate"], v["step"], v["phase"]) for v in doc["vms"]}
    assert committed == {
        "plain": (0, "", "committed", "committed (QEMU quit)"),
        "s3": (0, "", "committed", "committed (QEMU quit)"),
    }
    assert not [c for c in doc["check"] if c.get("name") in ("plain", "s3")]
    text = run(daemon, "status").splitlines()
    assert text[0] == "cprd: committed, 2 VMs"
    assert all(line.split()[1:3] == ["-", "committed"] for line in text[2:]), text

    # restore: new QEMUs, shown at once with their pids and runstates, phase restored.
    run(daemon, "restore")
    restored = agrees(daemon, vms, "restore")
    assert {(v["runstate"], v["step"], v["phase"]) for v in restored.values()} == {
        ("running", "restored", "restored")
    }


@pytest.mark.qemu
async def test_resync_holds_the_new_qemu_at_once(guests: GuestFactory, vm_dir_root: Path) -> None:
    """A VM whose QEMU was replaced (here: killed and started again on the same socket,
    as a reload does) is held in its new QEMU as soon as resync returns; no background
    task runs, and the event loop had no chance to notice the old link closing."""
    (vm,) = guests(GuestSpec("one"), timeout=180)
    inventory = Inventory(make_config(vm_dir_root))
    try:
        await inventory.scan()
        (handle,) = inventory.vms()
        old = handle.facts.pid
        assert old == vm.pid
        # Blocking calls: the loop runs nothing meanwhile, as during a busy operation.
        vm.kill()
        vm.released()
        vm.start()
        await inventory.resync()
        (handle,) = inventory.vms()
        assert handle.facts.pid == vm.pid != old
        assert handle.facts.runstate == vm.runstate()
    finally:
        await inventory.close()


@pytest.mark.qemu
async def test_vm_changed_carries_the_phase(guests: GuestFactory, vm_dir_root: Path) -> None:
    """The documents the daemon signals (VMChanged, through Controller.on_vm) carry the
    phase: saved after prepare, committed with no QEMU after commit (not "went away"),
    restored after restore; each is sent before the operation returns."""
    (vm,) = guests(GuestSpec("one"), timeout=180)
    controller = Controller(make_config(vm_dir_root))
    sent: list[tuple[str, dict[str, Any] | None]] = []
    controller.on_vm = lambda name, doc: sent.append((name, doc))
    await controller.start()

    def last() -> dict[str, Any] | None:
        docs = [doc for name, doc in sent if name == "one"]
        return docs[-1] if docs else None

    try:
        await controller.prepare(PrepareOptions())
        doc = last()
        assert doc is not None and (doc["pid"], doc["runstate"], doc["step"]) == (
            vm.pid,
            "postmigrate",
            "saved",
        )
        await controller.commit()
        vm.released()
        doc = last()
        assert doc is not None and (doc["pid"], doc["runstate"], doc["phase"]) == (
            0,
            "",
            "committed (QEMU quit)",
        )
        await controller.restore()
        doc = last()
        (pid,) = vm.running_pids()
        assert doc is not None and (doc["pid"], doc["runstate"], doc["step"]) == (
            pid,
            "running",
            "restored",
        )
        assert controller.listing() == [doc]
    finally:
        await controller.close()
