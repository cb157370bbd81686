"""The daemon's domain object: one state machine over the inventory and the saver.

States: idle -> preparing -> prepared -> committing -> committed, and prepared ->
resuming -> idle.  One operation at a time: anything else asked meanwhile is refused
with StateError (D-Bus: ``org.cprd.Cprd1.Error.Busy``).  No D-Bus here: the service
adapts this object, the CLI could too.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cprd import manifest as mf
from cprd.config import Config
from cprd.errors import CprdError, StateError
from cprd.inventory import Inventory, VMHandle
from cprd.launch import Launcher
from cprd.manifest import Phase
from cprd.restore import Restorer
from cprd.save import Saver
from cprd.transfer import Upgrader

logger = logging.getLogger(__name__)


class State(enum.Enum):
    IDLE = "idle"
    PREPARING = "preparing"
    PREPARED = "prepared"
    COMMITTING = "committing"
    COMMITTED = "committed"
    RESUMING = "resuming"
    UPGRADING = "upgrading"


@dataclass(frozen=True)
class PrepareOptions:
    """Options of PrepareKexec; unknown keys and wrong types are refused."""

    commit: bool = False

    @classmethod
    def parse(cls, options: Mapping[str, object]) -> PrepareOptions:
        known = {"commit": bool}
        for key, value in options.items():
            if key not in known:
                raise InvalidArgument(f"unknown option {key!r} (known: {', '.join(sorted(known))})")
            if not isinstance(value, known[key]):
                raise InvalidArgument(
                    f"option {key!r}: expected {known[key].__name__}, got {type(value).__name__}"
                )
        return cls(commit=bool(options.get("commit", False)))


class InvalidArgument(CprdError):
    dbus_name = "InvalidArgs"


Listener = Callable[..., None]


class Controller:
    def __init__(self, config: Config, launcher: Launcher | None = None) -> None:
        self.config = config
        self.launcher = launcher
        self.inventory = Inventory(config, on_change=self._vm_changed)
        self.saver = Saver(config, self.inventory, self._progress, launcher)
        self.upgrader = Upgrader(config, self.inventory, launcher, self._progress)
        self.state = State.IDLE
        self._lock = asyncio.Lock()
        #: hooks set by the adapter: state(State), vm(name, facts|None), progress(...)
        self.on_state: Listener = lambda *_: None
        self.on_vm: Listener = lambda *_: None
        self.on_progress: Listener = lambda *_: None

    @property
    def manifest_path(self) -> Path:
        return self.config.manifest_path

    # --- life cycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """First inventory, the phase of an existing manifest, and recovery."""
        await self.inventory.scan()
        self.inventory.start()
        phase = self._manifest_phase()
        if phase is Phase.PREPARING:
            # The daemon died mid-save: the VMs it had stopped are recorded; put them back.
            logger.warning("found a manifest in phase preparing: resuming its VMs")
            outcomes = await self.saver.resume()
            for name, outcome in sorted(outcomes.items()):
                logger.info("recovery: %s", outcome, extra={"CPRD_VM": name})
        elif phase is Phase.PREPARED:
            self._set(State.PREPARED)
        elif phase is Phase.COMMITTED:
            self._set(State.COMMITTED)

    async def close(self) -> None:
        async with self._lock:  # an operation in flight finishes first
            await self.inventory.close()

    def _manifest_phase(self) -> Phase | None:
        try:
            return mf.read(self.manifest_path).phase
        except CprdError:
            return None

    # --- queries --------------------------------------------------------------------------

    def vms(self) -> list[VMHandle]:
        return self.inventory.vms()

    async def check(self) -> list[dict[str, Any]]:
        plans, problems = await self.saver.plan()
        paths = await self.upgrader.paths(None, None, probe=False)  # Check runs no binary
        upgrade = {h.name: (ok, why) for h, _, ok, why in paths}
        out = []
        for handle, plan in plans:
            ok, why = upgrade.get(plan.name, (False, "?"))
            # e.g. two VMs sharing a name or a state file name
            other = problems.get(plan.name)
            extra = [other] if other and other != "; ".join(plan.problems) else []
            out.append(
                {
                    "name": plan.name,
                    "action": plan.action,
                    "suspend": plan.suspend,
                    "in_place": plan.in_place,
                    "bytes_to_write": plan.bytes_to_write,
                    "notes": list(plan.notes),
                    "problems": list(plan.problems) + extra,
                    "ok": not plan.problems and not extra,
                    "runstate": handle.facts.runstate,
                    "qemu_upgrade": "cpr-transfer" if ok else "file",
                    "qemu_upgrade_why": why,
                }
            )
        for path, why in sorted(self.inventory.refused().items()):
            out.append({"name": str(path), "ok": False, "problems": [why]})
        if "state_dir" in problems:
            out.append({"name": "state_dir", "ok": False, "problems": [problems["state_dir"]]})
        return out

    def manifest_text(self) -> str:
        manifest = mf.read(self.manifest_path)
        return mf.dumps(manifest).decode()

    # --- operations -----------------------------------------------------------------------

    def _set(self, state: State) -> None:
        if state is not self.state:
            self.state = state
            self.on_state(state)

    def _begin(self, allowed: set[State], what: str) -> None:
        if self._lock.locked():
            raise StateError(f"busy: {self.state.value}", "wait for it to finish")
        if self.state not in allowed:
            wanted = " or ".join(sorted(s.value for s in allowed))
            raise StateError(f"cannot {what} while {self.state.value} (needs {wanted})")

    async def prepare(self, options: PrepareOptions) -> str:
        """Save every VM (and commit when asked); return the manifest path."""
        self._begin({State.IDLE}, "prepare")
        async with self._lock:
            self._set(State.PREPARING)
            try:
                await self.saver.prepare()
            except BaseException:
                # A VM that could not be put back stays in the manifest: resumable.
                self._set(State.IDLE if self._manifest_phase() is None else State.PREPARED)
                raise
            self._set(State.PREPARED)
        if options.commit:
            await self.commit()
        return str(self.manifest_path)

    async def commit(self) -> None:
        self._begin({State.PREPARED}, "commit")
        async with self._lock:
            self._set(State.COMMITTING)
            try:
                await self.saver.commit()
            except BaseException:
                self._set(State.PREPARED)
                raise
            self._set(State.COMMITTED)

    async def resume(self) -> dict[str, str]:
        self._begin({State.PREPARED}, "resume")
        async with self._lock:
            self._set(State.RESUMING)
            try:
                return await self.saver.resume()
            finally:
                self._set(State.IDLE if self._manifest_phase() is None else State.PREPARED)

    async def restore(self) -> dict[str, str]:
        """Restore a committed manifest (e.g. after a QEMU-only update, without a reboot)."""
        self._begin({State.COMMITTED, State.IDLE}, "restore")
        async with self._lock:
            manifest = mf.read(self.manifest_path)
            sockets = {Path(r.qmp_socket) for r in manifest.vms}
            self.inventory.exclude |= sockets
            try:
                result = await Restorer(self.config, self.manifest_path, self.launcher).run()
            finally:
                self.inventory.exclude -= sockets
            self._set(State.IDLE if result.phase is Phase.RESTORED else State.COMMITTED)
            await self.inventory.scan()
            return {r.name: f"{r.outcome.value}: {r.reason}" for r in result.vms}

    async def upgrade(self, names: list[str], binary: str | None) -> dict[str, str]:
        """Move VMs to a new QEMU process without a reboot (cpr-transfer where possible)."""
        self._begin({State.IDLE}, "upgrade QEMU")
        async with self._lock:
            self._set(State.UPGRADING)
            try:
                return await self.upgrader.upgrade(names or None, binary)
            finally:
                self._set(State.IDLE)

    # --- hooks ----------------------------------------------------------------------------

    def _vm_changed(self, handle: VMHandle | None, what: str) -> None:
        if handle is not None:
            self.on_vm(handle.name, None if what == "removed" else handle.facts)

    def _progress(self, name: str, phase: str, done: int, total: int) -> None:
        self.on_progress(name, phase, done, total)
