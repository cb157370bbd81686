"""A hostile guest agent costs only its own VM's save: real bytes from a real guest.

The hostile VM runs, instead of qemu-ga, the test guest's shell agent on its virtio-serial
port (tests/guest/build.sh, ``cprd.agent=<mode>,<good>``): it answers the preflight's ping
correctly and then sends a hostile reply to the guest-sync that precedes
``guest-suspend-ram`` (the VM is configured ``suspend: always``), while the two ordinary
VMs are being saved.  One case turns hostile one request earlier, answering the ping
itself with ``{"error": 1}``.  The real daemon runs the prepare, driven by ``cprdctl``.

Each case must end the same way: prepare fails with one line naming the hostile VM and
what it sent, every VM runs (its counter advancing), no manifest is left half-way, and
the daemon is alive and answers.  Before the transport's budget (cprd/agent.py) the
long-line, endless, deep and error-at-ping cases escaped as ValueError, RecursionError or
AttributeError, skipped the rollback and left the other VMs stopped.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from fixtures_bus import BusDaemon
from fixtures_daemon import Daemon, start_daemon, stop_daemon
from harness import GuestFactory, GuestSpec, GuestVM, Memory

from cprd import config
from cprd import manifest as mf
from cprd.agent import MAX_DEPTH, MAX_LINE
from cprd.manifest import Phase

# Fault-style: run by `make faults`, not `make check` (its 15-minute budget).
pytestmark = [pytest.mark.qemu, pytest.mark.faults]

AGENT_TIMEOUT = 5  # what save.py gives the agent for the suspend

# (mode, requests answered correctly, the error cprd reports for the hostile VM)
CASES = {
    "longline": (2, f"guest agent sent a line longer than {MAX_LINE} bytes"),
    "endless": (2, f"guest agent sent a line longer than {MAX_LINE} bytes"),
    "deep": (2, f"guest agent: JSON nested deeper than {MAX_DEPTH} levels"),
    "errint": (
        2,
        f"guest agent: guest-suspend-ram: no answer within {AGENT_TIMEOUT}s "
        "(1 unusable lines skipped, last: not the reply to our guest-sync)",
    ),
    "badutf8": (
        2,
        f"guest agent: guest-suspend-ram: no answer within {AGENT_TIMEOUT}s "
        "(1 unusable lines skipped, last: not UTF-8)",
    ),
    "drip": (2, f"guest agent: guest-suspend-ram: no answer within {AGENT_TIMEOUT}s"),
    # {"error": 1} in reply to the preflight's guest-ping: the VM is refused up front.
    "errint-at-ping": (1, "does not answer"),
}


def start_when_holding(bus: BusDaemon, root: Path, vms: list[GuestVM]) -> Daemon:
    """The real daemon, with the hostile VM configured ``suspend: always``, once it holds
    every VM.  Logging to stderr (daemon.log): the test needs no host-global journald.

    Not `cprdctl status` to wait: it runs a Check, whose preflight pings every agent and
    so would use up the hostile agent's good answers."""
    d = start_daemon(
        bus, root, env={"CPRD_LOG": "stderr"}, extra="vms: {hostile: {suspend: always}}\n"
    )
    deadline = time.monotonic() + 30
    while f"cprd ready: {len(vms)} VMs" not in d.log.read_text():
        if d.proc.poll() is not None or time.monotonic() > deadline:
            stop_daemon(d)
            raise AssertionError(d.log.read_text())
        time.sleep(0.2)
    return d


def assert_running_and_counting(vms: list[GuestVM]) -> None:
    for vm in vms:
        assert vm.runstate() == "running", vm.name
    for vm in vms:
        last = vm.last_tick() or 0
        assert vm.wait_tick_above(last, timeout=15) > last, vm.name


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_agent_costs_only_its_own_save(
    guests: GuestFactory, dbus_daemon: BusDaemon, vm_dir_root: Path, case: str
) -> None:
    mode = case.split("-")[0]
    good, expected = CASES[case]
    hostile, big, plain = guests(
        GuestSpec("hostile", agent_mode=mode, agent_good=good),
        GuestSpec("big", mem_mib=192, fill_mib=96),  # its save takes a moment
        GuestSpec("plain", memory=Memory.FILE),
        timeout=180,  # the machine is shared: boots under load take a while
    )
    vms = [hostile, big, plain]
    d = start_when_holding(dbus_daemon, vm_dir_root, vms)
    try:
        check_prepare(d, vms, good, expected, case)
    finally:
        stop_daemon(d)


def check_prepare(d: Daemon, vms: list[GuestVM], good: int, expected: str, case: str) -> None:
    hostile = vms[0]
    cfg = config.load(d.config)
    start = time.monotonic()
    prep = d.ctl("prepare-kexec", timeout=120)
    took = time.monotonic() - start
    log = d.log.read_text()
    print(f"{case}: prepare failed after {took:.1f}s: {prep.stderr.strip()}")
    assert prep.returncode != 0, prep.stdout + log
    error = prep.stderr.strip()
    assert "\n" not in error, error
    if good == 1:
        assert error == (
            "cprdctl: PreflightFailed: preflight failed, nothing was stopped: hostile: must "
            "be suspended first (suspend: always) but its guest agent at "
            f"{hostile.qga_path} {expected}"
        ), error + log
    else:
        assert error.startswith(
            f"cprdctl: SaveFailed: save failed (hostile: hostile: {expected}); "
            "every VM was put back: "
        ), error + log
        assert "hostile: " in error.split("every VM was put back: ", 1)[1], error
    # One agent deadline plus the saves and the rollback, not a hang.
    assert took < AGENT_TIMEOUT + 40, took

    assert_running_and_counting(vms)
    if os.path.lexists(cfg.manifest_path):
        phase = mf.read(cfg.manifest_path).phase
        assert phase not in (Phase.PREPARING, Phase.PREPARED), phase
    assert not [f for f in os.listdir(cfg.state_dir) if f.endswith(".state")]

    assert d.proc.poll() is None, log
    status = d.ctl("status")
    assert status.returncode == 0, status.stderr
    d.wait_state("idle")
