"""The restore's order on real guests: vms.<name>.restore_priority, recorded at prepare.

Real QEMU (TCG) and qemu-ga; the reboot is simulated as in test_cycle: commit quits every
QEMU and the restore starts them again from the manifest alone.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from harness import GuestFactory, GuestSpec
from test_cycle import make_config

from cprd.inventory import Inventory
from cprd.manifest import Outcome, Phase, VMRecord
from cprd.restore import Restorer
from cprd.save import Saver

pytestmark = pytest.mark.qemu


def step_time(rec: VMRecord, step: str) -> str:
    """The (ISO, UTC, ms) time of the last ``step`` in the VM's manifest history."""
    times = [at for name, at in rec.history if name == step]
    assert times, f"{rec.name}: no {step} in {rec.history}"
    return times[-1]


async def test_higher_priority_is_back_before_a_lower_one_starts(
    guests: GuestFactory, vm_dir_root: Path
) -> None:
    """ "z" has priority 5, "a" the default 0: with 4 restore slots both could start at
    once, and by name or size "a" would go first; the priority makes "a" wait until "z"
    is back.  The config at restore no longer names a priority: the manifest's counts."""
    a, z = guests(GuestSpec("a"), GuestSpec("z"))
    cfg = make_config(
        vm_dir_root, "vms: {z: {restore_priority: 5}}\nrestore: {concurrency: 4, timeout_s: 120}\n"
    )
    for vm in (a, z):
        vm.wait_tick_above(1)
    inventory = Inventory(cfg)
    saver = Saver(cfg, inventory)
    try:
        prepared = await saver.prepare()
        assert {r.name: r.restore_priority for r in prepared.vms} == {"a": 0, "z": 5}
        before = {vm.name: vm.last_tick() for vm in (a, z)}
        assert (await saver.commit()).phase is Phase.COMMITTED
    finally:
        await inventory.close()
    for vm in (a, z):
        vm.released()

    at_boot = make_config(vm_dir_root, "restore: {concurrency: 4, timeout_s: 120}\n")
    restored = await Restorer(at_boot).run()
    assert restored.phase is Phase.RESTORED
    recs = {r.name: r for r in restored.vms}
    assert {n: r.outcome for n, r in recs.items()} == dict.fromkeys("az", Outcome.RESTORED)
    assert step_time(recs["z"], "restored") <= step_time(recs["a"], "restoring"), (
        recs["z"].history,
        recs["a"].history,
    )
    for vm in (a, z):
        tick = before[vm.name]
        assert tick is not None
        vm.wait_tick_above(tick, timeout=20)  # the counter continued
