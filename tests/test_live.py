"""Live saves on real guests (issue 15 item 1): normal mode with mapped-ram + multifd +
direct-io while the guest runs, stopped together for the last pass, bounded by
save.live_max_s, cancelled (the VM never stopped) when anything fails.

Every QEMU here is real (TCG) with a real qemu-ga; the guests keep rewriting memory
(``cprd.dirty=``).  The STOP events are read on each VM's own test monitor, with QEMU's
timestamps.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from harness import GuestFactory, GuestSpec, GuestVM
from qemu.qmp import QMPClient

from cprd import config, failpoint
from cprd.errors import SaveError
from cprd.inventory import Inventory
from cprd.manifest import Outcome, Phase
from cprd.restore import Restorer
from cprd.save import Saver
from cprd.steps import Step

pytestmark = pytest.mark.qemu

MIB = 2**20


def make_config(root: Path, save: str = "", extra: str = "") -> config.Config:
    cfg = root / "cprd.yaml"
    cfg.write_text(
        f"state_dir: {root}/state\n"
        f"discovery: {{qmp_sockets: ['{root}/*/qmp.sock'],\n"
        f"            agent_socket: '{root}/{{name}}/qga.sock'}}\n"
        f"save: {{space_margin_mib: 16, timeout_s: 120{save}}}\n"
        "restore: {timeout_s: 120}\n" + extra
    )
    return config.load(cfg)


class Stops:
    """STOP events of some VMs, read on their test monitors (QEMU's wall-clock stamps)."""

    def __init__(self) -> None:
        self.at: dict[str, list[float]] = {}
        self._clients: list[QMPClient] = []
        self._tasks: list[asyncio.Task[None]] = []

    async def watch(self, vm: GuestVM) -> None:
        client = QMPClient(f"stops-{vm.name}")
        await asyncio.wait_for(client.connect(str(vm.test_qmp_path)), 10)
        self._clients.append(client)
        self.at[vm.name] = []

        async def listen() -> None:
            with client.listener("STOP") as listener:
                async for event in listener:
                    stamp: dict[str, int] = event["timestamp"]  # type: ignore[assignment]
                    self.at[vm.name].append(stamp["seconds"] + stamp["microseconds"] / 1e6)

        self._tasks.append(asyncio.create_task(listen()))

    async def close(self) -> None:
        await asyncio.sleep(0.2)  # let the last events in
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for client in self._clients:
            await client.disconnect()


@contextlib.asynccontextmanager
async def stops_of(*vms: GuestVM) -> AsyncIterator[Stops]:
    stops = Stops()
    try:
        for vm in vms:
            await stops.watch(vm)
        yield stops
    finally:
        await stops.close()


def saved_at() -> tuple[dict[str, float], object]:
    """A progress callback noting when each VM's save ended: state file and manifest
    fsynced (it is called right after the step saved is written)."""
    ends: dict[str, float] = {}

    def progress(name: str, phase: str, _done: int, _total: int) -> None:
        if phase == "saved":
            ends[name] = time.time()

    return ends, progress


def stamp(history: tuple[tuple[str, str], ...], step: Step) -> float:
    return next(
        datetime.datetime.fromisoformat(at).timestamp()
        for s, at in reversed(history)
        if s == step.value
    )


async def test_live_saves_stop_together_and_restore_in_normal_mode(
    guests: GuestFactory, vm_dir_root: Path
) -> None:
    """Two guests that keep writing memory are saved live: each is stopped once, at
    about the same moment (after both wrote their RAM once), and is stopped for a small
    part of its save; the manifest records mode normal, and the restore in that mode
    brings the counters back."""
    a, b = guests(
        # Of different sizes: each alone would end its first pass at another moment.
        GuestSpec("a", mem_mib=512, fill_mib=256, dirty_mib=16),
        GuestSpec("b", mem_mib=128, dirty_mib=16),
    )
    vms = [a, b]
    for vm in vms:
        vm.wait_tick_above(2)
    cfg = make_config(vm_dir_root)
    ends, progress = saved_at()
    inventory = Inventory(cfg)
    try:
        async with stops_of(a, b) as stops:
            manifest = await Saver(cfg, inventory, progress).prepare()  # type: ignore[arg-type]
        assert manifest.phase is Phase.PREPARED
        recs = {r.name: r for r in manifest.vms}
        for vm in vms:
            rec = recs[vm.name]
            assert rec.settings.parameters["mode"] == "normal"
            assert rec.settings.parameters["downtime-limit"] == 1
            assert rec.settings.parameters["avail-switchover-bandwidth"] == MIB
            assert rec.settings.capabilities["mapped-ram"] is True
            assert [s for s, _ in rec.history] == ["migrating", "stopping", "saved"]
            assert vm.runstate() == "postmigrate"
            assert len(stops.at[vm.name]) == 1, stops.at
        stop_at = {n: at[0] for n, at in stops.at.items()}
        spread = max(stop_at.values()) - min(stop_at.values())
        stopped = {n: ends[n] - stop_at[n] for n in stop_at}
        saving = {n: ends[n] - stamp(recs[n].history, Step.MIGRATING) for n in stop_at}
        print(f"STOP spread {spread * 1000:.1f} ms; stopped {stopped}; whole save {saving}")
        assert spread < 0.1, stop_at
        # Both stopped after the bigger one wrote its RAM once: near the end, not at once.
        for n in stop_at:
            assert stopped[n] < saving[n] / 2, (stopped, saving)
        before = {vm.name: vm.last_tick() or 0 for vm in vms}
        await Saver(cfg, inventory).commit()
    finally:
        await inventory.close()
    for vm in vms:
        vm.released()
    restored = await Restorer(cfg).run()
    assert {r.name: r.outcome for r in restored.vms} == dict.fromkeys("ab", Outcome.RESTORED)
    for vm in vms:
        vm.assert_continued(before[vm.name])


async def test_a_guest_dirtying_faster_than_the_save_is_stopped_within_live_max_s(
    guests: GuestFactory, vm_dir_root: Path
) -> None:
    """The live phase is capped at 4 MiB/s (save.live_bandwidth_mib) so that the guest,
    rewriting 32 MiB in a loop, dirties memory faster than the save can write it: the
    save never converges by itself.  It is stopped when save.live_max_s has passed,
    finished while stopped, and the VM is saved (then put back, its counter going on)."""
    (vm,) = guests(GuestSpec("busy", mem_mib=192, dirty_mib=32))
    vm.wait_tick_above(2)
    max_s = 3
    cfg = make_config(vm_dir_root, f", live_max_s: {max_s}, live_bandwidth_mib: 4")
    ends, progress = saved_at()
    inventory = Inventory(cfg)
    try:
        async with stops_of(vm) as stops:
            manifest = await Saver(cfg, inventory, progress).prepare()  # type: ignore[arg-type]
        rec = manifest.vms[0]
        assert rec.step is Step.SAVED and rec.state_size is not None
        assert rec.state_size > 192 * MIB
        (stop,) = stops.at["busy"]
        live = stop - stamp(rec.history, Step.MIGRATING)
        print(f"live phase {live:.2f} s (live_max_s {max_s}); stopped {ends['busy'] - stop:.3f} s")
        assert max_s - 0.5 < live < max_s + 1.5, live
        # Saved while stopped, not left iterating: QEMU's own figures.
        info = vm.qmp("query-migrate")
        assert info["status"] == "completed"
        assert vm.runstate() == "postmigrate"
        tick = vm.last_tick() or 0
        await Saver(cfg, inventory).resume()
    finally:
        await inventory.close()
    assert vm.runstate() == "running"
    vm.assert_continued(tick)


async def test_a_failed_prepare_cancels_a_live_save_and_never_stops_the_vm(
    guests: GuestFactory, vm_dir_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A live save under way when another VM's save fails (a failpoint: an exception
    nobody expects) is cancelled: its VM is never stopped (no STOP event at all), runs
    on, and its partial state file is gone."""
    live, other = guests(
        GuestSpec("live", mem_mib=192, dirty_mib=32),
        GuestSpec("other"),
    )
    for vm in (live, other):
        vm.wait_tick_above(2)
    # The live phase is slow (capped), so the failure lands in the middle of it; the
    # other VM is suspended first (a second or so), then fails as its save begins.
    cfg = make_config(
        vm_dir_root,
        ", live_bandwidth_mib: 4, live_max_s: 60",
        "vms: {other: {suspend: always}}\n",
    )
    monkeypatch.setenv(failpoint.ENV, "migrating:raise:other")
    monkeypatch.setattr(failpoint, "_armed", None)
    inventory = Inventory(cfg)
    try:
        async with stops_of(live) as stops:
            started = time.monotonic()
            with pytest.raises(SaveError) as err:
                await Saver(cfg, inventory).prepare()
            assert time.monotonic() - started < 30
        assert "failpoint at migrating for other" in str(err.value)
        assert stops.at["live"] == []
    finally:
        await inventory.close()
    assert live.runstate() == "running"
    assert other.runstate() == "running"
    assert live.qmp("query-migrate")["status"] == "cancelled"
    assert not (cfg.state_dir / "live.state").exists()
    assert not cfg.manifest_path.exists()
    live.wait_tick_above(live.last_tick() or 0)


async def test_a_failure_as_the_live_saves_stop_puts_every_vm_back(
    guests: GuestFactory, vm_dir_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure at the step stopping (recorded for the whole wave in one write, then
    each VM stopped): the VM it names is never stopped, and every VM runs again, its
    counter going on (one stopped already is continued, or restarted by QEMU as its
    migration is cancelled)."""
    a, b = guests(GuestSpec("a", mem_mib=192, dirty_mib=16), GuestSpec("b", dirty_mib=16))
    for vm in (a, b):
        vm.wait_tick_above(2)
    cfg = make_config(vm_dir_root)
    monkeypatch.setenv(failpoint.ENV, "stopping:raise:b")
    monkeypatch.setattr(failpoint, "_armed", None)
    inventory = Inventory(cfg)
    try:
        async with stops_of(a, b) as stops:
            with pytest.raises(SaveError) as err:
                await Saver(cfg, inventory).prepare()
        assert "failpoint at stopping for b" in str(err.value)
        assert stops.at["b"] == []
    finally:
        await inventory.close()
    assert not cfg.manifest_path.exists()
    for vm in (a, b):
        assert vm.runstate() == "running"
        vm.wait_tick_above(vm.last_tick() or 0)
