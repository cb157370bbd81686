"""Real hosts on real guests: what cprd refuses at check, and what it brings back as it was.

Every QEMU here is real (TCG) with a real qemu-ga; the "reboot" is simulated (commit quits
every QEMU, the restore starts them again from the manifest).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from harness import PRIVATE_LIBVIRTD, GuestFactory, GuestSpec, GuestVM
from test_cycle import make_config

from cprd import cli
from cprd import manifest as mf
from cprd.errors import PreflightError
from cprd.inventory import Inventory
from cprd.manifest import Outcome, Phase
from cprd.qmp import QMPConnection
from cprd.restore import Restorer
from cprd.save import Saver

pytestmark = pytest.mark.qemu

BOOT_S = 240  # the machine is shared: TCG guests boot slowly under load
CGROUP_ROOT = Path("/sys/fs/cgroup/systemd")  # the v1 name=systemd hierarchy, as root


@contextlib.contextmanager
def own_guest(
    spec: GuestSpec, root: Path, image: tuple[Path, Path], launch: Callable[[GuestVM], None]
) -> Iterator[GuestVM]:
    """A guest started by ``launch`` (not the harness's Popen), killed afterwards."""
    vm = GuestVM(spec, root / spec.name, image)
    try:
        launch(vm)
        vm.wait_ready(BOOT_S)
        yield vm
    finally:
        print(f"qemu.log of {vm.name}: {vm.qemu_log.read_text(errors='replace')[-2000:]!r}")
        vm.cleanup()


@contextlib.contextmanager
def in_cgroup(pid: int, path: str) -> Iterator[None]:
    """Move ``pid`` into cgroup ``path`` of the name=systemd hierarchy (created here,
    removed afterwards: the process goes back to the root cgroup first)."""
    group = CGROUP_ROOT / path.strip("/")
    group.mkdir(parents=True, exist_ok=True)
    try:
        (group / "cgroup.procs").write_text(f"{pid}\n")
        yield
    finally:
        with contextlib.suppress(OSError):
            (CGROUP_ROOT / "cgroup.procs").write_text(f"{pid}\n")
        for d in [group, *group.parents]:
            if d == CGROUP_ROOT:
                break
            with contextlib.suppress(OSError):
                d.rmdir()


async def cli_main(argv: list[str]) -> int:
    """``cprd ARGV`` (it runs its own event loop: in a thread)."""
    return await asyncio.to_thread(cli.main, argv)


async def check_output(cfg_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    capsys.readouterr()
    code = await cli_main(["check", "--config", str(cfg_path)])  # options after the subcommand
    return code, capsys.readouterr().out


async def test_refused_at_check_and_nothing_stopped(
    guests: GuestFactory,
    guest_image: tuple[Path, Path],
    vm_dir_root: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An fd-passing QEMU, one in a libvirt machine scope and one in a Proxmox VE scope
    are refused by ``cprd check`` naming the argument or the manager, and a prepare stops
    none of them.

    libvirt and Proxmox are imitations: libvirt is not installed on this machine and
    Proxmox cannot be; their QEMUs are real, placed (as root, through cgroupfs, since
    systemd is not PID 1 here) in cgroups named as theirs are:
    machine.slice/machine-qemu\\x2d1\\x2dlv.scope and qemu.slice/104.scope."""
    if not (CGROUP_ROOT / "cgroup.procs").exists():
        pytest.skip("no name=systemd cgroup hierarchy to imitate a manager's scope in")
    lv, pve = guests(GuestSpec("lv"), GuestSpec("pve"), timeout=BOOT_S)
    read_fd, write_fd = os.pipe()

    def launch_with_fd(vm: GuestVM) -> None:
        vm.dir.mkdir(parents=True, exist_ok=True)
        argv = [*vm.argv, "-add-fd", f"fd={read_fd},set=2,opaque=inherited"]
        with vm.qemu_log.open("ab") as log:
            vm.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, pass_fds=(read_fd,)
            )

    cfg = make_config(vm_dir_root)
    cfg_path = vm_dir_root / "cprd.yaml"
    scope = "machine.slice/machine-qemu\\x2d1\\x2dlv.scope"
    try:
        with (
            own_guest(GuestSpec("fdvm"), vm_dir_root, guest_image, launch_with_fd) as fdvm,
            in_cgroup(lv.pid, scope),
            in_cgroup(pve.pid, "qemu.slice/104.scope"),
        ):
            vms = [lv, pve, fdvm]
            pids = {vm.name: vm.pid for vm in vms}
            code, out = await check_output(cfg_path, capsys)
            lines = {line.split(":", 1)[0]: line for line in out.splitlines()}
            assert code == 1
            assert lines["fdvm"].endswith(
                f"argv passes fd {read_fd} (-add-fd fd={read_fd},set=2,opaque=inherited): "
                "cprd cannot recreate it"
            )
            assert lines["lv"].endswith(
                f"run by libvirt (cgroup {scope}): cprd cannot bring it back under libvirt; "
                "use libvirt's managed save (`virsh managedsave lv`) instead"
            )
            assert lines["pve"].endswith(
                "run by Proxmox VE (cgroup qemu.slice/104.scope): cprd cannot bring it back "
                "under Proxmox VE; use `qm suspend 104 --todisk` instead"
            )

            inventory = Inventory(cfg)
            try:
                with pytest.raises(PreflightError) as info:
                    await Saver(cfg, inventory).prepare()
            finally:
                await inventory.close()
            assert set(info.value.problems) == {"fdvm", "lv", "pve"}
            assert {vm.name: vm.runstate() for vm in vms} == dict.fromkeys(pids, "running")
            assert {vm.name: vm.pid for vm in vms} == pids
            assert not cfg.manifest_path.exists()
            for vm in vms:
                vm.wait_tick_above(vm.last_tick() or 0, timeout=15)
    finally:
        os.close(read_fd)
        os.close(write_fd)


async def test_daemonized_and_changed_disk(
    guests: GuestFactory,
    guest_image: tuple[Path, Path],
    vm_dir_root: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A ``-daemonize -pidfile`` QEMU is restored, and the restored QEMU is the process
    serving its socket, named by its pidfile, loaded and counting on.  A VM whose disk
    image changed after commit is refused with the image named, its state kept; ``cprd
    restore --config F --ignore-disk-changes VM`` then brings it back."""
    pidfile = vm_dir_root / "daemon" / "qemu.pid"
    image = vm_dir_root / "disk.raw"
    image.write_bytes(b"\0" * 2**20)
    disk_spec = GuestSpec("disk", extra_args=["-drive", f"file={image},if=virtio,format=raw"])
    (disk,) = guests(disk_spec, timeout=BOOT_S)

    def launch_daemonized(vm: GuestVM) -> None:
        vm.launch([*vm.argv, "-daemonize", "-pidfile", str(pidfile)])
        assert vm.proc is not None
        assert vm.proc.wait(timeout=60) == 0  # the parent exits once the child is up
        vm.proc = None  # followed by its socket from now on

    cfg = make_config(vm_dir_root)
    with own_guest(GuestSpec("daemon"), vm_dir_root, guest_image, launch_daemonized) as daemon:
        first = int(pidfile.read_text())
        assert daemon.pid == first
        code, out = await check_output(vm_dir_root / "cprd.yaml", capsys)
        assert code == 0, out
        for vm in (daemon, disk):
            vm.wait_tick_above(2)
        inventory = Inventory(cfg)
        try:
            saver = Saver(cfg, inventory)
            await saver.prepare()
            manifest = await saver.commit()
        finally:
            await inventory.close()
        assert manifest.phase is Phase.COMMITTED
        recs = {r.name: r for r in manifest.vms}
        assert [d.path for d in recs["disk"].disks] == [str(image)]
        assert recs["disk"].disks[0].recorded and recs["disk"].disks[0].size == 2**20
        assert recs["daemon"].disks == ()
        disk.released()
        for vm in (daemon, disk):
            vm.wait_exit()
        before = {vm.name: vm.last_tick() or 0 for vm in (daemon, disk)}

        with image.open("r+b") as f:  # the image is written to between quit and restart
            f.write(b"changed")
        restored = await Restorer(cfg).run()
        out_of = {r.name: r for r in restored.vms}
        assert out_of["daemon"].outcome is Outcome.RESTORED
        assert out_of["disk"].outcome is Outcome.FAILED
        assert out_of["disk"].reason == (
            f"disk image changed since the save: {image} was modified after QEMU quit "
            "(state kept; `cprd restore --ignore-disk-changes disk` restores it anyway)"
        )
        assert disk.running_pids() == []
        assert Path(out_of["disk"].state_file).exists()

        # The daemonized VM: one QEMU, the one its pidfile names, serving its socket.
        (pid,) = daemon.running_pids()
        assert pid != first and int(pidfile.read_text()) == pid
        conn = await QMPConnection.open(daemon.qmp_path, "daemon", timeout=10)
        try:
            assert conn.pid == pid
        finally:
            await conn.close()
        assert daemon.runstate() == "running"
        daemon.wait_tick_above(before["daemon"], timeout=30)

        capsys.readouterr()
        code = await cli_main(
            ["restore", "--config", str(vm_dir_root / "cprd.yaml"), "--ignore-disk-changes", "disk"]
        )
        out = capsys.readouterr().out
        assert code == 0, out
        assert "disk: restored: running" in out
        assert mf.read(cfg.manifest_path).phase is Phase.RESTORED
        assert disk.runstate() == "running"
        disk.wait_tick_above(before["disk"], timeout=30)


#: libvirtd in a private mount namespace (harness.PRIVATE_LIBVIRTD) under $1.  Prints READY
#: once the domain runs, and tears everything down when its stdin closes.
LIBVIRT_SCRIPT = (
    r"""
set -euo pipefail
R=$1; XML=$2; PID=
V="virsh -c qemu:///system"
cleanup() {
    virsh -c qemu:///system destroy lv >&2 || true
    virsh -c qemu:///system undefine lv >&2 || true
    if [ -n "$PID" ]; then
        kill "$PID" || true
        for _ in $(seq 100); do [ -d /proc/"$PID" ] || break; sleep 0.1; done
    fi
    echo STOPPED
}
trap cleanup EXIT
"""
    + PRIVATE_LIBVIRTD
    + r"""
virsh -c qemu:///system define "$XML" >&2
virsh -c qemu:///system start lv >&2
echo READY
read -r _ || true
"""
)


def libvirt_domain(name: str, image: tuple[Path, Path], vm_dir: Path) -> str:
    kernel, initrd = image
    return f"""<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{name}</name>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type><kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd><cmdline>console=ttyS0 quiet no_timer_check</cmdline></os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <serial type='file'><source path='{vm_dir}/serial.log'/><target port='0'/></serial>
  </devices>
  <qemu:commandline>
    <qemu:arg value='-qmp'/><qemu:arg value='unix:{vm_dir}/qmp.sock,server=on,wait=off'/>
  </qemu:commandline>
</domain>
"""


async def test_real_libvirt_refused(
    guest_image: tuple[Path, Path], vm_dir_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A QEMU started by a real libvirtd (11.3, bookworm-backports), with a QMP socket for
    cprd added through <qemu:commandline>, is refused by ``cprd check`` naming libvirt and
    its managed save; a prepare stops nothing.  libvirtd runs in a private mount namespace
    (see LIBVIRT_SCRIPT) without cgroups, so here libvirt is recognised by its domain
    directory in the argv (the cgroup and parent rules are covered above and in
    test_hosts.py)."""
    if not (shutil.which("libvirtd") and shutil.which("virsh")):
        pytest.skip(
            "libvirt is not installed (apt-get install -t bookworm-backports "
            "libvirt-daemon-driver-qemu libvirt-daemon libvirt-clients)"
        )
    vm_dir = vm_dir_root / "lv"
    vm_dir.mkdir()
    xml = vm_dir_root / "lv.xml"
    xml.write_text(libvirt_domain("lv", guest_image, vm_dir))
    cfg = make_config(vm_dir_root)
    pid = 0
    proc = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "bash", "-c", LIBVIRT_SCRIPT,
         "libvirt", str(vm_dir_root / "libvirt"), str(xml)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    try:
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 180)
        assert line == "READY\n", proc.stderr.read() if proc.stderr else ""
        conn = await QMPConnection.open(vm_dir / "qmp.sock", "lv", timeout=30)
        try:
            pid = conn.pid
            assert (
                Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[2]
                == b"guest=lv,debug-threads=on"
            )
        finally:
            await conn.close()
        # libvirt's QEMU runs with umask 0002 and makes its socket group-writable, which
        # the trust rules refuse before any inspection (test_trust.py); an operator gives
        # cprd a socket only root can write, as here, and check then names libvirt.
        (vm_dir / "qmp.sock").chmod(0o755)
        code, out = await check_output(vm_dir_root / "cprd.yaml", capsys)
        assert code == 1
        (line,) = out.splitlines()
        assert line.startswith(
            "lv: save live (RAM copied): run by libvirt (argv uses "
            "/var/lib/libvirt/qemu/domain-1-lv): cprd cannot bring it back "
            "under libvirt; use libvirt's managed save (`virsh managedsave "
            "lv`) instead; argv passes fd "
        ), line
        inventory = Inventory(cfg)
        try:
            with pytest.raises(PreflightError):
                await Saver(cfg, inventory).prepare()
        finally:
            await inventory.close()
        assert Path(f"/proc/{pid}").exists() and not cfg.manifest_path.exists()
    finally:
        proc.stdin.close()
        tail = await asyncio.wait_for(asyncio.to_thread(proc.stdout.read), 120)
        assert proc.wait(timeout=30) == 0
        assert tail.endswith("STOPPED\n")
    assert not Path(f"/proc/{pid}").exists()
