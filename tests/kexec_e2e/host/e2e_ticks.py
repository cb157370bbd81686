"""cprd-e2e-ticks.service: time-stamp every `cprd-tick N` line of the inner VMs' serial files.

Runs inside the virtual host. For each VM it follows /var/lib/cprd-e2e/<vm>.serial from the
end it had when this service started (so that, after the kexec, only the restored VMs'
lines count as "after") and, per new tick, appends `<vm> <N> <realtime> <boot_id>` to
ticks.log and writes `E2E-TICK <vm> <N>` to the serial console, where the outer runner
stamps it with its own clock. Sends READY=1 once the start offsets are taken.
"""

from __future__ import annotations

import os
import re
import socket
import time
from pathlib import Path

DIR = Path("/var/lib/cprd-e2e")
VMS = ("vm1", "vm2")
TICK = re.compile(rb"cprd-tick (\d+)")


def notify_ready() -> None:
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(b"READY=1", addr)


def console(data: bytes) -> None:
    """Open the console per line: a getty's vhangup() would leave a kept fd dead (EIO)."""
    try:
        fd = os.open("/dev/ttyS0", os.O_WRONLY | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError:
        return
    try:
        os.write(fd, data)
    except OSError:
        pass
    finally:
        os.close(fd)


def main() -> None:
    DIR.mkdir(parents=True, exist_ok=True)
    boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    offsets: dict[str, int] = {}
    partial: dict[str, bytes] = {}
    with (DIR / "ticks.log").open("a", buffering=1) as log:
        for vm in VMS:
            path = DIR / f"{vm}.serial"
            offsets[vm] = path.stat().st_size if path.exists() else 0
            partial[vm] = b""
            log.write(f"START {vm} {offsets[vm]} {time.time():.3f} {boot_id}\n")
        notify_ready()
        while True:
            for vm in VMS:
                path = DIR / f"{vm}.serial"
                try:
                    with path.open("rb") as f:
                        f.seek(offsets[vm])
                        data = f.read()
                except FileNotFoundError:
                    continue
                if not data:
                    continue
                now = time.time()
                offsets[vm] += len(data)
                lines = (partial[vm] + data).split(b"\n")
                partial[vm] = lines.pop()
                for line in lines:
                    m = TICK.search(line)
                    if m is None:
                        continue
                    n = int(m.group(1))
                    log.write(f"{vm} {n} {now:.3f} {boot_id}\n")
                    console(f"E2E-TICK {vm} {n}\r\n".encode())
            time.sleep(0.1)


if __name__ == "__main__":
    main()
