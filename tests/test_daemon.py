"""The daemon on a private system bus with the project's own policy, driven by cprdctl.

Real: the cprd daemon process, dbus-daemon with config/org.cprd.Cprd1.conf, QEMU guests
with qemu-ga, systemd-journald.  A stand-in only for logind, whose
PrepareForShutdownWithMetadata signal needs systemd 255 (Debian 12 has 252) and which
cannot run without systemd as PID 1 here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus
from dbus_fast.auth import AuthExternal
from fixtures_bus import BusDaemon, CprdAccounts, Journald
from fixtures_daemon import BIN, Daemon, start_daemon, stop_daemon
from harness import GuestFactory, GuestSpec, GuestVM, Memory, is_alive
from test_faults import FakeAgent

from cprd import manifest as mf
from cprd.log import Event
from cprd.manifest import Phase
from cprd.steps import Step

pytestmark = pytest.mark.qemu


def running(vms: list[GuestVM]) -> dict[str, str]:
    return {vm.name: vm.runstate() for vm in vms}


def test_cprdctl_cycle_over_the_bus(
    guests: GuestFactory, daemon: Daemon, journald: Journald, cprd_accounts: CprdAccounts
) -> None:
    web, db = guests(GuestSpec("web"), GuestSpec("db", memory=Memory.FILE))
    vms = [web, db]
    daemon.wait_state("idle")
    deadline = time.monotonic() + 20
    while json.loads(daemon.ctl("status", "--json").stdout)["vms"].__len__() < 2:
        assert time.monotonic() < deadline
        time.sleep(0.2)

    status = daemon.ctl("status")
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    assert lines[0] == "cprd: idle, 2 VMs"
    assert lines[1].split() == [
        "VM",
        "RUNSTATE",
        "RAM",
        "MEMORY",
        "VFIO",
        "AGENT",
        "ACTION",
        "TO",
        "WRITE",
    ]
    assert lines[2].split()[:6] == ["db", "running", "128", "MiB", "shared-persistent", "-"]
    assert "save (RAM in place)" in lines[2] and "save live (RAM copied)" in lines[3]
    check = daemon.ctl("check")
    unmeasured = "times not measured; run `cprdctl check --measure` as root"
    assert check.returncode == 0 and check.stdout.splitlines() == [
        "db: save (RAM in place): ok",
        "  QEMU-only upgrade: file (-machine aux-ram-share=on is not set: saved to a file instead)",
        f"  predicted (in-place): write 1 MiB; {unmeasured}",
        "web: save live (RAM copied): ok",
        "  QEMU-only upgrade: file (RAM not shareable (pc.ram): saved to a file instead)",
        f"  predicted (live): write 144 MiB; {unmeasured}",
        f"host (2 VMs): write 145 MiB; {unmeasured}",
    ]

    member = (cprd_accounts.member_uid, cprd_accounts.member_gid, cprd_accounts.member_groups)
    nobody: tuple[int, int, list[int]] = (65534, 65534, [])
    assert daemon.ctl("status", user=member).returncode == 0
    denied = daemon.ctl("prepare-kexec", user=member)
    assert denied.returncode == 3
    assert denied.stderr.strip() == (
        "cprdctl: AccessDenied: permission denied for PrepareKexec (root, or group cprd for reads)"
    )
    assert daemon.ctl("status", user=nobody).returncode == 3
    assert running(vms) == {"web": "running", "db": "running"}

    prep = daemon.ctl("prepare-kexec")
    assert prep.returncode == 0, prep.stderr + daemon.log.read_text()
    assert prep.stdout.splitlines()[-1].startswith("prepared: manifest ")
    assert any(line.startswith("web: saving") for line in prep.stdout.splitlines()), prep.stdout
    assert running(vms) == {"web": "postmigrate", "db": "postmigrate"}
    again = daemon.ctl("prepare-kexec")
    assert again.returncode == 4
    assert again.stderr.strip() == ("cprdctl: Busy: cannot prepare while prepared (needs idle)")
    assert "phase: prepared" in daemon.ctl("manifest").stdout

    resume = daemon.ctl("resume")
    assert resume.returncode == 0 and resume.stdout.splitlines() == [
        "db: resumed (running)",
        "web: resumed (running)",
    ]
    assert running(vms) == {"web": "running", "db": "running"}
    daemon.wait_state("idle")

    commit = daemon.ctl("prepare-kexec", "--commit")
    assert commit.returncode == 0, commit.stderr
    for vm in vms:
        vm.released()
        vm.wait_exit()
    daemon.wait_state("committed")
    last = {vm.name: vm.last_tick() for vm in vms}

    restore = daemon.ctl("restore")
    assert restore.returncode == 0, restore.stderr + daemon.log.read_text()
    assert restore.stdout.splitlines() == ["db: restored: running", "web: restored: running"]
    for vm in vms:
        tick = last[vm.name]
        assert tick is not None
        vm.wait_tick_above(tick)  # asserts it continued
    daemon.wait_state("idle")

    # journald: each VM's save and restore, with its fields and MESSAGE_IDs.
    ids = {Event.VM_SAVED.value, Event.VM_RESTORED.value}
    entries = journald.entries(
        CPRD_VM="web", until=lambda es: ids <= {e.get("MESSAGE_ID") for e in es}
    )
    got = {e["MESSAGE_ID"]: e for e in entries if e.get("MESSAGE_ID") in ids}
    assert set(got) == ids
    assert got[Event.VM_SAVED.value]["CPRD_PHASE"] == "preparing"
    assert got[Event.VM_RESTORED.value]["CPRD_MANIFEST"].endswith("/state/manifest.yaml")
    assert got[Event.VM_SAVED.value]["PRIORITY"] == "6"


async def _connect(address: str) -> MessageBus:
    return await asyncio.wait_for(
        MessageBus(bus_address=address, auth=AuthExternal(), negotiate_unix_fd=True).connect(), 5
    )


@dataclass
class StandInLogind:
    """A stand-in logind: systemd 252 here predates PrepareForShutdownWithMetadata, and
    logind cannot run without systemd as PID 1.  It hands out a delay lock (a pipe's
    write end, as logind does with a FIFO) and sends the shutdown signals."""

    bus: MessageBus
    lock_read: int
    daemon: Daemon

    def send(self, member: str, signature: str, body: list[Any]) -> None:
        self.bus.send(
            Message.new_signal(
                "/org/freedesktop/login1", "org.freedesktop.login1.Manager", member, signature, body
            )
        )

    async def lock_released(self) -> bool:
        """True once every copy of the lock's write end is closed."""
        loop = asyncio.get_running_loop()
        data = await asyncio.wait_for(loop.run_in_executor(None, os.read, self.lock_read, 1), 30)
        return data == b""


@contextlib.asynccontextmanager
async def stand_in_logind(
    dbus_daemon: BusDaemon, vm_dir_root: Path, journald: Journald, vm: str, extra: str = ""
) -> AsyncIterator[StandInLogind]:
    """The stand-in logind and the real daemon, once the daemon holds the delay lock and
    VM ``vm``."""
    login1 = await _connect(dbus_daemon.address)
    lock_read, lock_write = os.pipe()
    inhibited = asyncio.Event()

    def handler(msg: Message) -> Message | None:
        if msg.member == "Inhibit" and msg.interface == "org.freedesktop.login1.Manager":
            assert msg.body == ["shutdown", "cprd", "save every VM before a kexec", "delay"]
            inhibited.set()
            return Message.new_method_return(msg, "h", [0], unix_fds=[lock_write])
        return None

    login1.add_message_handler(handler)
    await login1.request_name("org.freedesktop.login1")
    d = start_daemon(dbus_daemon, vm_dir_root, extra=extra)
    try:
        await asyncio.wait_for(inhibited.wait(), 20)
        os.close(lock_write)  # the daemon holds the only write end now
        held = await asyncio.to_thread(
            journald.entries,
            CPRD_VM=vm,
            until=lambda es: any("holding" in e["MESSAGE"] for e in es),
            timeout=20,
        )
        assert any("holding" in e["MESSAGE"] for e in held)
        yield StandInLogind(login1, lock_read, d)
    finally:
        os.close(lock_read)
        stop_daemon(d)
        login1.disconnect()


@pytest.fixture
async def logind(
    guests: GuestFactory, dbus_daemon: BusDaemon, vm_dir_root: Path, journald: Journald
) -> AsyncIterator[tuple[StandInLogind, GuestVM]]:
    (vm,) = guests(GuestSpec("k"))
    async with stand_in_logind(dbus_daemon, vm_dir_root, journald, "k") as login1:
        yield login1, vm


async def test_logind_kexec_signal_prepares_and_commits(
    logind: tuple[StandInLogind, GuestVM], journald: Journald
) -> None:
    login1, vm = logind
    login1.send("PrepareForShutdown", "b", [True])
    login1.send("PrepareForShutdownWithMetadata", "ba{sv}", [True, {"type": Variant("s", "kexec")}])
    assert await login1.lock_released()
    # The lock went only once the save was complete: at that instant the manifest says
    # committed, with the VM's state complete and its QEMU gone.
    manifest = mf.read(login1.daemon.config.parent / "state" / "manifest.yaml")
    assert manifest.phase is Phase.COMMITTED, mf.dumps(manifest).decode()
    assert [(r.name, r.step) for r in manifest.vms] == [("k", Step.COMMITTED)]
    assert not is_alive(vm.pid)
    vm.released()
    committed = journald.entries(MESSAGE_ID=Event.COMMITTED.value)
    assert committed[0]["CPRD_PHASE"] == "committed"
    released = journald.entries(
        MESSAGE="released logind's shutdown delay lock: logind's kexec may go on"
    )
    assert len(released) == 1
    assert int(released[0]["__MONOTONIC_TIMESTAMP"]) > int(committed[0]["__MONOTONIC_TIMESTAMP"])


async def test_logind_kexec_saves_what_can_be_saved(
    guests: GuestFactory, dbus_daemon: BusDaemon, vm_dir_root: Path, journald: Journald
) -> None:
    """The kexec goes ahead whatever cprd does (logind's signal): a VM that cannot be saved
    must not stop the others.  ``sleepy`` must be suspended first but its agent never
    suspends it (a stand-in agent: the test guest's real qemu-ga always suspends); ``ok`` is
    saved and committed, ``sleepy`` is shut down and recorded.  After the "reboot" (cprd
    restore; no real kexec in this test) ``ok`` goes on where it stopped and ``sleepy``
    boots again.  The test guest has no ACPI power-button handler, so ``sleepy`` ignores
    system_powerdown and cprd quits it after save.shutdown_timeout_s."""
    ok, sleepy = guests(GuestSpec("ok"), GuestSpec("sleepy", agent=False))
    agent = vm_dir_root / "fake-qga.sock"
    fake = FakeAgent()
    server = await asyncio.start_unix_server(fake.serve, path=str(agent))
    extra = (
        "save: {suspend_timeout_s: 3, shutdown_timeout_s: 3, space_margin_mib: 16}\n"
        f"vms: {{sleepy: {{suspend: always, agent: {agent}}}}}\n"
    )
    try:
        async with stand_in_logind(dbus_daemon, vm_dir_root, journald, "ok", extra) as login1:
            tick = ok.last_tick()
            login1.send(
                "PrepareForShutdownWithMetadata", "ba{sv}", [True, {"type": Variant("s", "kexec")}]
            )
            assert await login1.lock_released()
            manifest = mf.read(vm_dir_root / "state" / "manifest.yaml")
            assert manifest.phase is Phase.COMMITTED
            steps = {r.name: r.step for r in manifest.vms}
            assert steps == {"ok": Step.COMMITTED, "sleepy": Step.SHUT_DOWN}
            assert "runstate still 'running' after 3s" in manifest.vm("sleepy").reason
            assert not is_alive(ok.pid) and not is_alive(sleepy.pid)
            assert fake.commands.count("guest-suspend-ram") == 1
            shut = journald.entries(MESSAGE_ID=Event.VM_SHUTDOWN.value)
            assert [e["CPRD_VM"] for e in shut] == ["sleepy"]
    finally:
        server.close()
        await server.wait_closed()
    ok.released()
    sleepy.released()
    out = await asyncio.to_thread(
        subprocess.run,
        [str(BIN / "cprd"), "--config", str(vm_dir_root / "cprd.yaml"), "restore"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, (out.stdout, out.stderr)
    lines = sorted(out.stdout.splitlines())
    assert lines[0].startswith("ok: restored: running"), lines
    assert lines[1].startswith("sleepy: restored: cold-booted: running"), lines
    assert tick is not None
    ok.wait_tick_above(tick, timeout=30)  # asserts it continued where it stopped
    # booted again, a fresh guest: a second ready mark, and its counter from 1 again
    deadline = time.monotonic() + 90
    while sleepy.serial_text().count("cprd-guest-ready") < 2:
        assert time.monotonic() < deadline, sleepy.serial_text()[-2000:]
        await asyncio.sleep(0.5)
    assert sleepy.runstate() == "running"


async def test_old_logind_gets_its_lock_back_at_once(
    logind: tuple[StandInLogind, GuestVM], journald: Journald
) -> None:
    """systemd < 255 sends only PrepareForShutdown: no kexec type, so the daemon must not
    hold every shutdown for InhibitDelayMaxSec; the VMs are left alone."""
    login1, vm = logind
    login1.send("PrepareForShutdown", "b", [True])
    assert await login1.lock_released()
    assert vm.runstate() == "running"
    released = journald.entries(
        MESSAGE="logind sent no PrepareForShutdownWithMetadata "
        "(systemd < 255): releasing the delay lock; "
        "cprd-kexec-guard.service covers a kexec"
    )
    assert len(released) == 1


async def _call(bus: MessageBus, member: str, sig: str, body: list[Any]) -> Message:
    reply = await asyncio.wait_for(
        bus.call(
            Message(
                destination="org.cprd.Cprd1",
                path="/org/cprd/Cprd1",
                interface="org.cprd.Cprd1.Manager",
                member=member,
                signature=sig,
                body=body,
            )
        ),
        60,
    )
    assert reply is not None
    return reply


async def test_bad_arguments_and_the_root_broadcast(guests: GuestFactory, daemon: Daemon) -> None:
    (vm,) = guests(GuestSpec("b"))
    bus = await _connect(daemon.bus)
    try:
        unknown = await _call(bus, "PrepareKexec", "a{sv}", [{"reboot": Variant("b", True)}])
        assert (unknown.error_name, unknown.body) == (
            "org.cprd.Cprd1.Error.InvalidArgs",
            ["unknown option 'reboot' (known: best_effort, commit, shutdown)"],
        )
        wrong = await _call(bus, "PrepareKexec", "a{sv}", [{"commit": Variant("s", "yes")}])
        assert (wrong.error_name, wrong.body) == (
            "org.cprd.Cprd1.Error.InvalidArgs",
            ["option 'commit': expected bool, got str"],
        )
        bad_sig = await _call(bus, "PrepareKexec", "s", ["now"])
        # dbus-fast looks methods up by name and signature: a wrong one is unknown.
        assert bad_sig.error_name == "org.freedesktop.DBus.Error.UnknownMethod"
        assert vm.runstate() == "running"
        commit = await _call(bus, "Commit", "", [])
        assert (commit.error_name, commit.body) == (
            "org.cprd.Cprd1.Error.Busy",
            ["cannot commit while idle (needs prepared)"],
        )

        # Fleet tooling may broadcast PrepareKexec instead of calling it (root only).
        finished: asyncio.Queue[list[Any]] = asyncio.Queue()

        def on_signal(msg: Message) -> bool:
            if msg.member == "PrepareFinished":
                finished.put_nowait(msg.body)
            return False

        bus.add_message_handler(on_signal)
        await asyncio.wait_for(
            bus.call(
                Message(
                    destination="org.freedesktop.DBus",
                    path="/org/freedesktop/DBus",
                    interface="org.freedesktop.DBus",
                    member="AddMatch",
                    signature="s",
                    body=[
                        "type='signal',interface='org.cprd.Cprd1.Manager',member='PrepareFinished'"
                    ],
                )
            ),
            5,
        )
        await asyncio.sleep(1)  # let the inventory hold the new VM
        bus.send(
            Message.new_signal(
                "/org/cprd/Cprd1", "org.cprd.Cprd1.Manager", "PrepareKexec", "a{sv}", [{}]
            )
        )
        ok, detail = await asyncio.wait_for(finished.get(), 60)
        assert (ok, detail) == (True, str(Path(daemon.config).parent / "state/manifest.yaml"))
        assert vm.runstate() == "postmigrate"
        resumed = await _call(bus, "Resume", "", [])
        assert resumed.message_type == MessageType.METHOD_RETURN
        assert vm.runstate() == "running"
    finally:
        bus.disconnect()


def test_kexec_with_a_bad_kernel_stops_nothing(guests: GuestFactory, daemon: Daemon) -> None:
    (vm,) = guests(GuestSpec("kx"))
    out = daemon.ctl("kexec", "--kernel", "/nonexistent/vmlinuz", "--reuse-cmdline")
    assert out.returncode == 1
    assert out.stderr.startswith("cprdctl: kexec -l failed (")
    assert vm.runstate() == "running"
    usage = daemon.ctl("kexec", "--initrd", "/boot/initrd.img")
    assert (usage.returncode, usage.stderr.strip()) == (
        2,
        "cprdctl: --initrd, --append and --reuse-cmdline need --kernel",
    )


def test_daemon_under_systemd_starts_qemus_as_transient_units(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Under systemd (INVOCATION_ID set) the sandboxed daemon must not spawn QEMUs itself."""
    from cprd import config
    from cprd.daemon import daemon_launcher
    from cprd.launch import DirectLauncher, SystemdLauncher

    cfg = config.Config()
    monkeypatch.delenv("INVOCATION_ID", raising=False)
    assert isinstance(daemon_launcher(cfg, None), DirectLauncher)
    monkeypatch.setenv("INVOCATION_ID", "0123456789abcdef0123456789abcdef")
    launcher = daemon_launcher(cfg, "unix:path=/run/x")
    assert isinstance(launcher, SystemdLauncher) and launcher.bus_address == "unix:path=/run/x"


def test_sd_notify(guests: GuestFactory, dbus_daemon: BusDaemon, vm_dir_root: Path) -> None:
    """The notify protocol as systemd speaks it: a datagram socket in NOTIFY_SOCKET."""
    import socket

    guests(GuestSpec("n"))
    path = vm_dir_root / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(20)
    d = start_daemon(
        dbus_daemon, vm_dir_root, {"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "400000"}
    )
    got: list[str] = []
    try:
        while "READY=1" not in got:
            got += sock.recv(4096).decode().splitlines()
        while not any(m.startswith("STATUS=") for m in got) or got.count("WATCHDOG=1") < 2:
            got += sock.recv(4096).decode().splitlines()
        assert "STATUS=idle, 1 VMs" in got
        d.proc.send_signal(signal.SIGTERM)
        while "STOPPING=1" not in got:
            got += sock.recv(4096).decode().splitlines()
    finally:
        stop_daemon(d)
        sock.close()


def test_one_shot_commands_refuse_while_the_daemon_holds_the_monitors(
    guests: GuestFactory, daemon: Daemon, capsys: pytest.CaptureFixture[str]
) -> None:
    """A VM cprd cannot reach would not be saved: preflight refuses instead of skipping it."""
    from cprd import cli

    (vm,) = guests(GuestSpec("held"))
    daemon.wait_state("idle")
    deadline = time.monotonic() + 20
    while len(json.loads(daemon.ctl("status", "--json").stdout)["vms"]) < 1:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    capsys.readouterr()
    assert cli.main(["--config", str(daemon.config), "check"]) == 1
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith(f"{vm.qmp_path}: a QEMU serves this socket but cprd cannot use it (")
    assert line.endswith("it would not be saved (is cprd.service running?)")
    assert cli.main(["--config", str(daemon.config), "prepare"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"cprd: preflight failed, nothing was stopped: {vm.qmp_path}: ")
    assert vm.runstate() == "running"
