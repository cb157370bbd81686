"""The whole cycle on real guests: save, simulated reboot, restore.

Three VMs under TCG, each with a real guest agent and a counter on its serial console:
  web  private RAM (copied into its state file, mapped-ram + multifd + direct-io)
  db   shared RAM in a file on disk (kept in place with x-ignore-shared)
  gpu  private RAM, suspended to RAM through its guest agent first (as a VFIO VM is)
cprd prepares (saves all three in parallel), commits (every QEMU quits: the simulated
reboot), then restores them; each counter goes on from where it stopped.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from harness import GuestSpec, GuestVM, Memory, guest_image, start_guests

from cprd import config, log
from cprd.inventory import Inventory
from cprd.restore import Restorer
from cprd.save import Saver


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


class Clock:
    """Per-VM timestamps from cprd's progress callbacks."""

    def __init__(self) -> None:
        self.t: dict[tuple[str, str], float] = {}

    def __call__(self, name: str, phase: str, done: int, total: int) -> None:
        self.t.setdefault((name, phase), time.monotonic())


async def cycle(root: Path, vms: list[GuestVM]) -> None:
    cfg_path = root / "cprd.yaml"
    cfg_path.write_text(
        f"state_dir: {root}/state\n"
        f"discovery:\n  qmp_sockets: ['{root}/*/qmp.sock']\n"
        f"  agent_socket: '{root}/{{name}}/qga.sock'\n"
        "vms:\n  gpu: {suspend: always}\n"
        "save: {space_margin_mib: 64}\n"
    )
    cfg = config.load(cfg_path)
    clock = Clock()
    inventory = Inventory(cfg)
    saver = Saver(cfg, inventory, clock)
    try:
        say("cprd check")
        plans, problems = await saver.plan()
        for _, p in plans:
            print(f"  {p.name:4} {p.action:34} {p.notes[-1]}")
        assert not problems, problems
        say("cprd prepare: suspend gpu, save all three in parallel")
        manifest = await saver.prepare()
        before = {vm.name: vm.last_tick() for vm in vms}
        for rec in manifest.vms:
            print(f"  {rec.name:4} {rec.state_size:>11,} bytes  {rec.state_file}")
        say("cprd commit: every QEMU quits")
        await saver.commit()
    finally:
        await inventory.close()
    for vm in vms:
        vm.released()
    say("simulated reboot: no QEMU is running")
    print("  " + ", ".join(f"{vm.name}: {len(vm.running_pids())} QEMU" for vm in vms))
    await asyncio.sleep(1)

    say("cprd restore")
    restored = await Restorer(cfg, progress=clock).run()
    for rec in restored.vms:
        print(f"  {rec.name:4} {rec.outcome.value}: {rec.reason}")
    say("the counters go on where they stopped")
    for vm in vms:
        last = before[vm.name] or 0
        first_after = min(t for t in vm.ticks() if t > last) if vm.wait_tick_above(last) else 0
        print(
            f"  {vm.name:4} last tick before the save: {last:3}   first after the restore: "
            f"{first_after:3}   (a cold boot would restart at 1)"
        )
    assert vm.agent("guest-ping") == {}  # gpu's agent answers after the wake-up

    say("summary")
    print(
        f"  {'VM':4} {'RAM':>12} {'bytes written':>14} {'save':>8} {'restore':>8} {'downtime':>9}"
    )
    sizes = {r.name: r.state_size or 0 for r in manifest.vms}
    modes = {r.name: "in place" if r.in_place else "copied" for r in manifest.vms}
    for vm in vms:
        n = vm.name
        start = clock.t.get((n, "suspending"), clock.t[(n, "saving")])
        save = clock.t[(n, "saved")] - clock.t[(n, "saving")]
        restore = clock.t[(n, "restored")] - clock.t[(n, "launching")]
        down = clock.t[(n, "restored")] - start
        print(
            f"  {n:4} {modes[n]:>12} {sizes[n]:>14,} {save:>7.2f}s {restore:>7.2f}s {down:>8.1f}s"
        )
    print("  (downtime includes the pause between commit and restore of this simulated reboot)")


def main() -> int:
    log.setup()
    logging.getLogger().setLevel(logging.WARNING)
    say("building (or reusing) the test guest")
    image = guest_image()
    root = Path(tempfile.mkdtemp(prefix="cprd-demo-", dir="/tmp"))
    vms: list[GuestVM] = []
    try:
        say("starting three guests under TCG")
        vms = start_guests(
            [
                GuestSpec("web", fill_mib=64, mem_mib=256),
                GuestSpec("db", memory=Memory.FILE, mem_mib=256),
                GuestSpec("gpu", mem_mib=256),
            ],
            root,
            image,
            90,
        )
        for vm in vms:
            vm.wait_tick_above(3, timeout=30)
            print(f"  {vm.name:4} running, counter at {vm.last_tick()}")
        asyncio.run(cycle(root, vms))
        say("demo complete")
        return 0
    finally:
        for vm in vms:
            vm.cleanup()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
