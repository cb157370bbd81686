"""The bench's peer: libvirt saving and restoring the same guest, in the same run.

libvirt (11.3 from bookworm-backports) runs in a private mount namespace, as in
tests/test_hosts_qemu.py: its /run, /etc/libvirt and /var/{lib,cache,log}/libvirt are under
the bench's directory, so the host's libvirt (if any) is never touched; QEMU runs as root
without cgroups.  The domain is the bench's copied-RAM guest: the same kernel, initrd, RAM
and random fill, under TCG.  It is saved with libvirt's fastest options (``virsh save
--image-format sparse --bypass-cache --parallel-channels 4``, then ``sync`` of the file, as
cprd's save includes its fsync) and restored from a cold page cache with the same
(``virsh restore --bypass-cache --parallel-channels 4``); the guest's counter must go on.

Not in cprd's package: imported by scripts/bench.py only.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from harness import PRIVATE_LIBVIRTD, READY_MARK

CHANNELS = 4

#: Runs in `unshare --mount`: starts libvirtd, defines and starts the domain, then answers
#: commands on stdin (save, restore) with one line each on stdout; tears down at EOF.
SCRIPT = (
    r"""
set -euo pipefail
R=$1; XML=$2; STATE=$3; CH=$4; PID=
WITH_VIRTLOGD=1
V="virsh -q -c qemu:///system"
cleanup() {
    $V destroy lvbench >&2 2>/dev/null || true
    $V undefine lvbench >&2 2>/dev/null || true
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
$V define "$XML" >&2
$V start lvbench >&2
echo READY
now() { date +%s.%N; }
drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }
while read -r cmd; do
    case "$cmd" in
    save)
        rm -f "$STATE"; drop
        t0=$(now)
        $V save lvbench "$STATE" --image-format sparse --bypass-cache --parallel-channels "$CH" >&2
        sync "$STATE"
        t1=$(now)
        echo "SAVED $t0 $t1 $(stat -c '%s %b' "$STATE")" ;;
    restore)
        drop
        t0=$(now)
        $V restore "$STATE" --bypass-cache --parallel-channels "$CH" >&2
        t1=$(now)
        echo "RESTORED $t0 $t1 $($V domstate lvbench)" ;;
    *) echo "UNKNOWN $cmd" ;;
    esac
done
"""
)


def available() -> str | None:
    """Why libvirt cannot be benchmarked here, or None."""
    missing = [b for b in ("libvirtd", "virtlogd", "virsh", "unshare") if not shutil.which(b)]
    if missing:
        return (
            f"{', '.join(missing)} not installed (apt-get install -t bookworm-backports "
            "libvirt-daemon-driver-qemu libvirt-daemon libvirt-clients)"
        )
    return None


def domain_xml(image: tuple[Path, Path], vm_dir: Path, mem_mib: int, fill_mib: int) -> str:
    kernel, initrd = image
    return f"""<domain type='qemu'>
  <name>lvbench</name>
  <memory unit='MiB'>{mem_mib}</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type><kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>console=ttyS0 quiet no_timer_check cprd.fill={fill_mib}</cmdline></os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <serial type='file'><source path='{vm_dir}/serial.log' append='on'/>
      <target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>
"""


def _ticks(log: Path) -> list[int]:
    import re

    text = log.read_text(errors="replace") if log.exists() else ""
    return [int(n) for n in re.findall(r"cprd-tick (\d+)\r?\n", text)]


async def _wait(what: str, pred: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(f"libvirt: {what} within {timeout:.0f} s")
        await asyncio.sleep(0.2)


async def run(
    root: Path, image: tuple[Path, Path], mem_mib: int, fill_mib: int, say: Any
) -> dict[str, Any]:
    """Boot the guest under libvirt, save it, restore it; the figures."""
    vm_dir = root / "libvirt-vm"
    vm_dir.mkdir()
    xml = root / "libvirt-vm.xml"
    xml.write_text(domain_xml(image, vm_dir, mem_mib, fill_mib))
    state = root / "libvirt.save"
    serial = vm_dir / "serial.log"
    proc = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "bash", "-c", SCRIPT, "libvirt",
         str(root / "libvirt-ns"), str(xml), str(state), str(CHANNELS)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    stdout, stdin = proc.stdout, proc.stdin

    async def line(timeout: float) -> str:
        got = await asyncio.wait_for(asyncio.to_thread(stdout.readline), timeout)
        if not got:
            err = proc.stderr.read() if proc.stderr else ""
            raise RuntimeError(f"libvirt script ended: {err[-2000:]}")
        return got.strip()

    async def command(cmd: str, timeout: float) -> list[str]:
        stdin.write(cmd + "\n")
        stdin.flush()
        return (await line(timeout)).split()

    r: dict[str, Any] = {"version": _version(), "channels": CHANNELS}
    try:
        started = time.monotonic()
        ready = await line(180)
        if ready != "READY":
            raise RuntimeError(f"libvirt: {ready}")
        say(f"  libvirt {r['version']}: booting {mem_mib} MiB, filling {fill_mib} MiB")
        await _wait("guest ready", lambda: READY_MARK in serial.read_text(errors="replace")
                    if serial.exists() else False, 600)  # fmt: skip
        r["boot_and_fill_s"] = time.monotonic() - started
        await _wait("a first tick", lambda: bool(_ticks(serial)), 30)
        saved = await command("save", 600)
        assert saved[0] == "SAVED", saved
        r["save_s"] = float(saved[2]) - float(saved[1])
        r["apparent_bytes"], r["allocated_bytes"] = int(saved[3]), int(saved[4]) * 512
        before = _ticks(serial)[-1]
        say(
            f"  virsh save (sparse, bypass-cache, {CHANNELS} channels, sync): "
            f"{r['save_s']:.2f} s, {r['allocated_bytes'] / 2**20:.0f} MiB on disk"
        )
        restored = await command("restore", 600)
        assert restored[0] == "RESTORED", restored
        r["restore_s"] = float(restored[2]) - float(restored[1])
        r["state_after_restore"] = " ".join(restored[3:])
        await _wait("a tick after the restore", lambda: _ticks(serial)[-1] > before, 60)
        after = _ticks(serial)
        r["counter_continued"] = after[after.index(before) + 1] == before + 1
        say(f"  virsh restore (cold cache): {r['restore_s']:.2f} s, counter went on: "
            f"{r['counter_continued']}")  # fmt: skip
    finally:
        stdin.close()
        tail = await asyncio.wait_for(asyncio.to_thread(stdout.read), 120)
        proc.wait(timeout=60)
        state.unlink(missing_ok=True)
        if "STOPPED" not in tail:
            say(f"  libvirt teardown: {tail[-200:]!r}")
    return r


def _version() -> str:
    out = subprocess.run(["libvirtd", "--version"], capture_output=True, text=True, check=False)
    return out.stdout.split()[-1] if out.stdout.split() else "?"
