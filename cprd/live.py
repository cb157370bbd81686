"""Live saves stop together: the synchronised end of the live phase (pure coordination).

A VM saved live (normal mode, :func:`cprd.plan.save_mode`) keeps running while QEMU
writes its RAM, with a switch-over threshold under a page (downtime-limit 1 ms at an
assumed 1 MiB/s): QEMU stops it by itself only when the guest dirtied nothing since the
last pass (an idle guest).
Each save joins a *wave* (the live saves under way); once every member of the wave has
written its RAM once (QEMU's dirty-sync-count passed 1), the wave goes and every member
is stopped at once, so that the VMs stop at about the same moment, near
the end of the prepare, instead of each as soon as its own save converges.  A save whose
own ``save.live_max_s`` passes first counts as ready and is stopped alone: a guest that
dirties memory faster than the disk writes is never left iterating.

No I/O: the saver (:mod:`cprd.save`) records the steps and talks to QEMU.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field


@dataclass
class Wave:
    """The live saves that are stopped together."""

    members: dict[str, bool] = field(default_factory=dict)  # name -> ready
    go: asyncio.Event = field(default_factory=asyncio.Event)
    #: the step of every member was recorded (in one manifest write)
    recorded: bool = False

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self.members))


class StopTogether:
    """The waves of one prepare."""

    def __init__(self) -> None:
        self._wave = Wave()
        self.waves: list[Wave] = []

    def join(self, name: str) -> Wave:
        """VM ``name`` begins its live phase; the wave it belongs to."""
        if self._wave.go.is_set():
            self._wave = Wave()
        if not self._wave.members:
            self.waves.append(self._wave)
        self._wave.members[name] = False
        return self._wave

    def ready(self, wave: Wave, name: str) -> None:
        """VM ``name`` wrote its RAM once (or its live phase is over): stop it when the
        whole wave is."""
        if name in wave.members:
            wave.members[name] = True
        self._check(wave)

    def leave(self, wave: Wave, name: str) -> None:
        """VM ``name`` holds the wave no longer (its save ended, failed or converged)."""
        if not wave.go.is_set():
            wave.members.pop(name, None)
        self._check(wave)

    @staticmethod
    def _check(wave: Wave) -> None:
        if wave.members and all(wave.members.values()):
            wave.go.set()


def dirty_syncs(info: dict[str, object]) -> int:
    """QEMU's dirty-sync-count of a query-migrate reply (1 during the first pass)."""
    ram = info.get("ram")
    value = ram.get("dirty-sync-count") if isinstance(ram, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


__all__ = ["StopTogether", "Wave", "dirty_syncs"]
