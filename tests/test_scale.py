"""Scale: 32 guests at once on this 2-core machine, held, saved and restored by the daemon.

Real daemon, real dbus-daemon with the project's policy, 32 real TCG guests.  Records the
daemon's RSS and idle CPU (printed, and asserted only against generous bounds: this is a
shared, noisy machine).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from fixtures_daemon import Daemon
from harness import GuestFactory, GuestSpec

# 32 guests: run by `make faults`, not `make check` (its 15-minute budget).
pytestmark = [pytest.mark.qemu, pytest.mark.faults, pytest.mark.timeout(900)]

COUNT = 32


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_32_guests(guests: GuestFactory, daemon: Daemon) -> None:
    # 32 TCG boots at once thrash two cores: boot in waves, then hold them all.
    # (96 MiB: the test guest does not boot in 64.)
    vms = []
    for wave in range(0, COUNT, 8):
        vms += guests(
            *(GuestSpec(f"s{i:02d}", mem_mib=96) for i in range(wave, wave + 8)), timeout=300
        )
    deadline = time.monotonic() + 120
    while len(json.loads(daemon.ctl("status", "--json").stdout)["vms"]) < COUNT:
        assert time.monotonic() < deadline, "the daemon did not hold every VM"
        time.sleep(1)
    pid = daemon.proc.pid
    before = cpu_seconds(pid)
    time.sleep(10)
    idle_cpu = (cpu_seconds(pid) - before) / 10 * 100
    rss = rss_kib(pid)
    print(f"\ndaemon holding {COUNT} VMs: RSS {rss / 1024:.1f} MiB, idle CPU {idle_cpu:.2f} %")
    assert rss < 200 * 1024 and idle_cpu < 10

    last = {vm.name: vm.last_tick() for vm in vms}
    start = time.monotonic()
    prep = daemon.ctl("prepare-kexec", "--commit", timeout=600)
    assert prep.returncode == 0, prep.stderr + daemon.log.read_text()[-3000:]
    saved = time.monotonic() - start
    for vm in vms:
        vm.released()
        vm.wait_exit(timeout=60)
    start = time.monotonic()
    restore = daemon.ctl("restore", timeout=900)
    restored = time.monotonic() - start
    assert restore.returncode == 0, restore.stdout + restore.stderr
    assert restore.stdout.splitlines() == [f"s{i:02d}: restored: running" for i in range(COUNT)]
    for vm in vms:  # none lost: every counter goes on
        tick = last[vm.name]
        assert tick is not None
        vm.wait_tick_above(tick, timeout=60)  # asserts it continued
    print(
        f"prepare+commit of {COUNT} VMs: {saved:.1f} s; restore: {restored:.1f} s; "
        f"daemon RSS after: {rss_kib(pid) / 1024:.1f} MiB"
    )
