"""Restore over D-Bus with ``ignore_disk_changes`` (as ``cprd restore
--ignore-disk-changes VM``): the real daemon on a private dbus-daemon with the project's
policy, driven by cprdctl; a real guest with a real disk image."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from fixtures_bus import CprdAccounts
from fixtures_daemon import Daemon
from harness import GuestFactory, GuestSpec

from cprd.controller import InvalidArgument, RestoreOptions

pytestmark = pytest.mark.qemu


def test_restore_options() -> None:
    assert RestoreOptions.parse({}) == RestoreOptions(())
    assert RestoreOptions.parse({"ignore_disk_changes": ["a", "b"]}) == RestoreOptions(("a", "b"))
    with pytest.raises(InvalidArgument) as err:
        RestoreOptions.parse({"force": True})
    assert str(err.value) == "unknown option 'force' (known: ignore_disk_changes)"
    for bad in ("a", [""], [1]):
        with pytest.raises(InvalidArgument) as err:
            RestoreOptions.parse({"ignore_disk_changes": bad})
        assert str(err.value) == "option 'ignore_disk_changes': expected a list of VM names"


def test_cprdctl_restore_ignores_named_disk_changes(
    guests: GuestFactory, daemon: Daemon, vm_dir_root: Path, cprd_accounts: CprdAccounts
) -> None:
    """A VM whose disk image changed after the commit: ``cprdctl restore`` refuses it
    with the image named (state kept, exit 1); the option is root's (group cprd is
    denied Restore by the policy); ``cprdctl restore --ignore-disk-changes disk`` (D-Bus
    Restore with ``ignore_disk_changes``) brings it back and its counter goes on."""
    image = vm_dir_root / "disk.raw"
    image.write_bytes(b"\0" * 2**20)
    (vm,) = guests(GuestSpec("disk", extra_args=["-drive", f"file={image},if=virtio,format=raw"]))
    daemon.wait_state("idle")
    deadline = time.monotonic() + 20
    while len(json.loads(daemon.ctl("status", "--json").stdout)["vms"]) < 1:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    commit = daemon.ctl("prepare-kexec", "--commit")
    assert commit.returncode == 0, commit.stderr
    vm.released()
    vm.wait_exit()
    daemon.wait_state("committed")
    tick = vm.last_tick()
    assert tick is not None
    with image.open("r+b") as f:  # the image is written to between quit and restart
        f.write(b"changed")

    member = (cprd_accounts.member_uid, cprd_accounts.member_gid, cprd_accounts.member_groups)
    denied = daemon.ctl("restore", "--ignore-disk-changes", "disk", user=member)
    assert denied.returncode == 3
    assert denied.stderr.strip() == (
        "cprdctl: AccessDenied: permission denied for Restore (root, or group cprd for reads)"
    )
    refused = daemon.ctl("restore")
    assert refused.returncode == 1, refused.stderr
    assert refused.stdout.splitlines() == [
        f"disk: failed: disk image changed since the save: {image} was modified after QEMU "
        "quit (state kept; `cprd restore --ignore-disk-changes disk` restores it anyway)"
    ]
    assert vm.running_pids() == []

    restore = daemon.ctl("restore", "--ignore-disk-changes", "disk")
    assert restore.returncode == 0, restore.stderr + daemon.log.read_text()
    assert restore.stdout.splitlines() == ["disk: restored: running"]
    vm.wait_tick_above(tick)
    daemon.wait_state("idle")
