"""The daemon's domain object: one state machine over the inventory and the saver.

States: idle -> preparing -> prepared -> committing -> committed, and prepared ->
resuming -> idle.  One operation at a time: anything else asked meanwhile is refused
with StateError (D-Bus: ``org.cprd.Cprd1.Error.Busy``).  No D-Bus here: the service
adapts this object, the CLI could too.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import shutil
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cprd import manifest as mf
from cprd import metrics
from cprd import predict as pr
from cprd.config import Config
from cprd.errors import CprdError, StateError
from cprd.inventory import Inventory, VMHandle
from cprd.launch import Launcher
from cprd.manifest import Manifest, Phase, VMRecord
from cprd.restore import Restorer
from cprd.save import Saver
from cprd.steps import RUNNING, Step
from cprd.transfer import Upgrader
from cprd.vm import VMFacts

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
    """Options of PrepareKexec; unknown keys and wrong types are refused.

    ``commit``: quit the saved QEMUs too.  ``shutdown``: VMs to shut down cleanly at
    commit instead of saving them.  ``best_effort``: the kexec goes ahead whatever
    happens (logind's signal, the guard unit): save what can be saved, shut down the rest,
    always commit; otherwise all or nothing."""

    commit: bool = False
    best_effort: bool = False
    shutdown: tuple[str, ...] = ()

    @classmethod
    def parse(cls, options: Mapping[str, object]) -> PrepareOptions:
        known: dict[str, type] = {"commit": bool, "best_effort": bool, "shutdown": list}
        for key, value in options.items():
            if key not in known:
                raise InvalidArgument(f"unknown option {key!r} (known: {', '.join(sorted(known))})")
            if not isinstance(value, known[key]):
                raise InvalidArgument(
                    f"option {key!r}: expected {known[key].__name__}, got {type(value).__name__}"
                )
        shutdown = options.get("shutdown", [])
        assert isinstance(shutdown, list)
        if not all(isinstance(n, str) and n for n in shutdown):
            raise InvalidArgument("option 'shutdown': expected a list of VM names")
        best_effort = bool(options.get("best_effort", False))
        return cls(
            commit=bool(options.get("commit", False)) or best_effort,
            best_effort=best_effort,
            shutdown=tuple(str(n) for n in shutdown),
        )


@dataclass(frozen=True)
class RestoreOptions:
    """Options of Restore (D-Bus ``a{sv}``), validated: ``ignore_disk_changes`` names the
    VMs restored even if their disk images changed since the save (as ``cprd restore
    --ignore-disk-changes VM``)."""

    ignore_disk_changes: tuple[str, ...] = ()

    @classmethod
    def parse(cls, options: Mapping[str, object]) -> RestoreOptions:
        for key in options:
            if key != "ignore_disk_changes":
                raise InvalidArgument(f"unknown option {key!r} (known: ignore_disk_changes)")
        names = options.get("ignore_disk_changes", [])
        if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
            raise InvalidArgument("option 'ignore_disk_changes': expected a list of VM names")
        return cls(tuple(names))


class InvalidArgument(CprdError):
    dbus_name = "InvalidArgs"


# --- the phase of a VM, from its manifest record (pure) ------------------------------------


def held(rec: VMRecord) -> bool:
    """cprd holds this VM: it stopped, saved, quit or shut it down, and has not yet put
    it back.  The preflight is not run against such a VM (it would refuse a saved one)."""
    return rec.step not in RUNNING and rec.step is not Step.PLANNED


def _size(n: int) -> str:
    return f"{n / 2**10:.0f} KiB" if n < 2**20 else f"{n / 2**20:.0f} MiB"


def phase_line(rec: VMRecord) -> str:
    """What cprd has done to a VM, for a person (ListVMs ``phase``)."""
    step = rec.step
    if step is Step.SAVED:
        size = _size(rec.state_size) if rec.state_size is not None else "size unknown"
        return f"saved ({size}, {rec.state_file}, resumable until commit)"
    if step is Step.COMMITTED:
        return "committed (QEMU quit)"
    if step is Step.SHUT_DOWN:
        return "shut down (booted again at restore)"
    return str(step.value)  # restored, resumed, and the steps in between (migrating, ...)


def vm_document(facts: VMFacts | None, rec: VMRecord | None) -> dict[str, Any]:
    """One VM as ListVMs and VMChanged report it (pure): its QEMU's facts, plus its step
    and phase when the manifest records one.  A VM whose QEMU is gone (committed, shut
    down) is described from its record: ``pid`` 0, ``runstate`` empty, nothing QEMU
    alone could tell (memory, VFIO)."""
    if facts is not None and rec is not None and rec.step in RUNNING and rec.pid != facts.pid:
        rec = None  # a record of an earlier QEMU: this one was started since, not by cprd
    if facts is not None:
        doc = facts.to_dict()
    else:
        assert rec is not None
        doc = {
            "name": rec.name,
            "qmp_socket": rec.qmp_socket,
            "pid": 0,
            "executable": rec.executable,
            "qemu_version": rec.qemu_version,
            "machine_type": rec.machine_type,
            "runstate": "",
            "vfio_devices": [],
            "ram_bytes": 0,
            "memory": [],
            "agent_socket": rec.agent_socket or "",
            "agent_reachable": False,
            "agent_probed_at": 0.0,
        }
    doc["step"] = rec.step.value if rec is not None else ""
    doc["phase"] = phase_line(rec) if rec is not None else ""
    return doc


def prediction_document(
    p: pr.Prediction, host: Mapping[str, Any], bandwidth: pr.Bandwidth | None
) -> dict[str, Any]:
    """A check result's ``prediction`` (pure): this VM's, the host's, and the bandwidth
    they come from.  Times are 0 and ``measured`` false while state_dir was never
    measured (D-Bus has no null)."""
    return {
        "measured": bandwidth is not None,
        "mode": p.mode.value,
        "bytes": p.bytes_to_write,
        "stopped_s": p.stopped_s or 0.0,
        "restore_s": p.restore_s or 0.0,
        "host_vms": host["vms"],
        "host_bytes": host["bytes"],
        "host_stopped_s": host["stopped_s"] or 0.0,
        "host_restore_s": host["restore_s"] or 0.0,
        "write_bps": bandwidth.write_bps if bandwidth else 0.0,
        "read_bps": bandwidth.read_bps if bandwidth else 0.0,
        "measured_at": bandwidth.measured_at if bandwidth else "",
    }


Listener = Callable[..., None]
#: Deadline of a bandwidth measurement (a few hundred MiB written and read).
MEASURE_TIMEOUT = 300.0


class Controller:
    def __init__(self, config: Config, launcher: Launcher | None = None) -> None:
        self.config = config
        self.launcher = launcher
        self.inventory = Inventory(config, on_change=self._vm_changed)
        self.saver = Saver(config, self.inventory, self._progress, launcher)
        self.upgrader = Upgrader(config, self.inventory, launcher, self._progress)
        self.state = State.IDLE
        #: one operation at a time; Check and the preflight hold it too
        self._lock = asyncio.Lock()
        #: the operation holding the lock (None: none, or only a Check)
        self._op: str | None = None
        self._last_check: list[dict[str, Any]] = []
        #: the manifest as last read, keyed by the file's identity (atomic writes rename)
        self._manifest: tuple[tuple[int, int, int] | None, Manifest | None] = (None, None)
        #: the VM documents last published through on_vm
        self._published: dict[str, dict[str, Any]] = {}
        #: hooks set by the adapter: state(State), vm(name, document|None), progress(...)
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
        for name in mf.sweep_temporaries(self.manifest_path):
            logger.info("removed %s, left by a writer killed mid-write", name)
        phase = self._manifest_phase()
        if phase is Phase.PREPARING:
            # The daemon died mid-save: every step it took is recorded; put the VMs back.
            logger.warning("found a manifest in phase preparing: resuming its VMs")
            async with self._lock:
                try:
                    outcomes = await self.saver.resume()
                except CprdError as err:
                    logger.error("recovery failed: %s", err)
                    outcomes = {}
            for name, outcome in sorted(outcomes.items()):
                logger.info("recovery: %s", outcome, extra={"CPRD_VM": name})
        self._sync_state()

    async def close(self) -> None:
        async with self._lock:  # an operation in flight finishes first
            await self.inventory.close()

    def _manifest_phase(self) -> Phase | None:
        try:
            return mf.read(self.manifest_path).phase
        except CprdError:
            # Unreadable but present: treat it as holding saved VMs, never as nothing.
            return Phase.PREPARING if self.manifest_path.exists() else None

    def _sync_state(self) -> None:
        """The daemon's State, derived from the manifest: they never disagree."""
        phase = self._manifest_phase()
        if phase in (Phase.PREPARING, Phase.PREPARED):
            self._set(State.PREPARED)
        elif phase is Phase.COMMITTED:
            self._set(State.COMMITTED)
        else:
            self._set(State.IDLE)

    @property
    def busy(self) -> bool:
        """An operation (not a Check) is in flight."""
        return self._op is not None

    # --- queries --------------------------------------------------------------------------

    def vms(self) -> list[VMHandle]:
        return self.inventory.vms()

    def _records(self) -> dict[str, VMRecord]:
        """The manifest's records by VM name ({} without a readable manifest); read again
        only when the file changed."""
        try:
            st = os.stat(self.manifest_path)
        except OSError:
            self._manifest = (None, None)
            return {}
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        if self._manifest[0] != key:
            try:
                manifest: Manifest | None = mf.read(self.manifest_path)
            except CprdError:
                manifest = None
            self._manifest = (key, manifest)
        manifest = self._manifest[1]
        return {r.name: r for r in manifest.vms} if manifest is not None else {}

    def listing(self) -> list[dict[str, Any]]:
        """Every VM, by name, as ListVMs reports it: each QEMU the inventory holds, with
        its step and phase from the manifest, and each VM the manifest holds whose QEMU
        is gone (committed, shut down)."""
        records = self._records()
        docs = {h.name: vm_document(h.facts, records.get(h.name)) for h in self.inventory.vms()}
        for name, rec in records.items():
            if name not in docs and rec.step not in RUNNING:
                docs[name] = vm_document(None, rec)
        return [docs[n] for n in sorted(docs)]

    def _publish(self) -> None:
        """Send on_vm for every VM whose document changed (an empty one: it went away)."""
        docs = {d["name"]: d for d in self.listing()}
        for name in sorted(set(docs) | set(self._published)):
            doc = docs.get(name)
            if doc != self._published.get(name):
                self.on_vm(name, doc)
        self._published = docs

    async def _resync(self) -> None:
        """At the end of every operation, before its lock is released: the inventory
        drops QEMUs that quit and holds the new ones, every VM's facts are read again, and
        the changes are published.  So ListVMs is true when the operation returns."""
        try:
            await self.inventory.resync()
        except (CprdError, OSError, TimeoutError) as err:
            logger.warning("could not refresh the VM list: %s", err or type(err).__name__)
        self._publish()

    async def check(self) -> list[dict[str, Any]]:
        """The preflight of every VM.  While an operation runs it changes nothing and
        asks QEMU nothing: it answers with the last result, marked ``stale``."""
        if self._op is not None:
            return [dict(r, stale=True) for r in self._last_check]
        async with self._lock:  # waits for another Check, never blocks an operation long
            result = await self._check()
        self._last_check = result
        return result

    async def _check(self) -> list[dict[str, Any]]:
        # VMs that cprd itself holds (saved, committed) are not checked: ListVMs reports
        # their phase.  The preflight would refuse a saved VM, which is not the news.
        saved = {n for n, r in self._records().items() if held(r)}
        if saved:
            await self.inventory.scan()  # the VMs to check are those held after it
        only = {h.name for h in self.inventory.vms()} - saved if saved else None
        plans, problems = await self.saver.plan(only)
        bandwidth = pr.load(self.config.state_dir)
        predictions = {
            plan.name: pr.predict(
                plan.bytes_to_write,
                pr.save_mode(in_place=plan.in_place, live=plan.live),
                bandwidth,
            )
            for _, plan in plans
        }
        host = pr.host_total(predictions.values(), bandwidth)
        upgrade = {
            h.name: (ok, why)
            for h, _, ok, why in await self.upgrader.paths(None, None, probe=False)
        }  # Check runs no binary
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
                    "prediction": prediction_document(predictions[plan.name], host, bandwidth),
                }
            )
        for path, why in sorted(self.inventory.refused().items()):
            out.append({"name": str(path), "ok": False, "problems": [why]})
        if "state_dir" in problems:
            out.append({"name": "state_dir", "ok": False, "problems": [problems["state_dir"]]})
        return out

    async def measure_bandwidth(self) -> dict[str, Any]:
        """Measure state_dir's write and read bandwidth and cache it for Check (root only:
        it writes a few hundred MiB).  Refused while an operation runs."""
        async with self._running(set(State), "measure state_dir"):
            state_dir = self.config.state_dir
            mf.ensure_state_dir(state_dir)
            margin = self.config.save.space_margin_mib * 2**20
            free = shutil.disk_usage(state_dir).free
            if free < pr.PROBE_BYTES + margin:
                raise pr.MeasureError(
                    f"not enough space in state_dir to measure it: {free // 2**20} MiB free",
                    f"it writes {pr.PROBE_BYTES // 2**20} MiB, beyond save.space_margin_mib",
                )
            try:
                bandwidth = await asyncio.wait_for(
                    asyncio.to_thread(pr.measure, state_dir), MEASURE_TIMEOUT
                )
            except TimeoutError:
                raise pr.MeasureError(
                    f"measuring state_dir took longer than {MEASURE_TIMEOUT:.0f} s"
                ) from None
            pr.store(state_dir, bandwidth)
        logger.info(
            "state_dir bandwidth: write %.0f MiB/s, read %.0f MiB/s",
            bandwidth.write_bps / 2**20,
            bandwidth.read_bps / 2**20,
        )
        return bandwidth.to_dict()

    def manifest_text(self) -> str:
        manifest = mf.read(self.manifest_path)
        return mf.dumps(manifest).decode()

    # --- operations -----------------------------------------------------------------------

    def _set(self, state: State) -> None:
        if state is not self.state:
            self.state = state
            self.on_state(state)

    def _begin(self, allowed: set[State], what: str) -> None:
        if self._op is not None:
            raise StateError(f"busy: {self.state.value}", "wait for it to finish")
        if self.state not in allowed:
            wanted = " or ".join(sorted(s.value for s in allowed))
            raise StateError(f"cannot {what} while {self.state.value} (needs {wanted})")

    @contextlib.asynccontextmanager
    async def _running(self, allowed: set[State] | None, what: str) -> AsyncIterator[None]:
        """Hold the lock for one operation.  Another operation in flight refuses it at
        once (Busy); a Check in flight is waited for (a Check may not block root's
        prepare, commit or resume: any member of group cprd may call it)."""
        if allowed is not None:
            self._begin(allowed, what)
        async with self._lock:
            if allowed is not None:
                self._begin(allowed, what)  # the state may have moved while we waited
            self._op = what
            try:
                yield
            finally:
                self._op = None

    async def prepare(self, options: PrepareOptions) -> str:
        """Save every VM (and commit when asked); return the manifest path.

        All or nothing, unless ``options.best_effort`` (see :meth:`kexec_anyway`)."""
        if options.best_effort:
            return await self.kexec_anyway(options.shutdown)
        async with self._running({State.IDLE}, "prepare"):
            self._set(State.PREPARING)
            began, ok = time.monotonic(), False
            try:
                await self.saver.prepare(shutdown=options.shutdown)
                if options.commit:
                    self._set(State.COMMITTING)
                    await self.saver.commit()
                ok = True
            finally:
                self._sync_state()
                await self._resync()
                self._metrics("prepare", began, ok)
        return str(self.manifest_path)

    async def kexec_anyway(self, shutdown: tuple[str, ...] = ()) -> str:
        """The kexec goes ahead whatever happens: save what can be saved, shut down the
        rest, commit.  Waits for an operation in flight instead of refusing."""
        async with self._running(None, "kexec"):
            began, ok = time.monotonic(), False
            try:
                if self._manifest_phase() is Phase.PREPARING:
                    await self.saver.resume()  # VMs kept by an earlier failure: back first
                phase = self._manifest_phase()
                if phase in (None, Phase.RESTORED):
                    self._set(State.PREPARING)
                    await self.saver.prepare(anyway=True, shutdown=shutdown)
                    phase = Phase.PREPARED
                if phase is Phase.PREPARED:
                    self._set(State.COMMITTING)
                    await self.saver.commit(anyway=True)
                ok = True
            finally:
                self._sync_state()
                await self._resync()
                self._metrics("kexec", began, ok)
        return str(self.manifest_path)

    async def commit(self) -> None:
        """Quit the saved QEMUs; if that fails, every VM is put back (SaveError)."""
        async with self._running({State.PREPARED}, "commit"):
            self._set(State.COMMITTING)
            began, ok = time.monotonic(), False
            try:
                await self.saver.commit()
                ok = True
            finally:
                self._sync_state()
                await self._resync()
                self._metrics("commit", began, ok)

    async def resume(self) -> dict[str, str]:
        """Every VM back as it ran: after a prepare, or a commit interrupted on this boot."""
        async with self._running({State.PREPARED, State.COMMITTED}, "resume"):
            self._set(State.RESUMING)
            began, outcomes = time.monotonic(), None
            try:
                outcomes = await self.saver.resume()
                return outcomes
            finally:
                self._sync_state()
                await self._resync()
                # The manifest is gone once every VM runs: the outcomes say how each came back.
                figures = metrics.outcome_figures(outcomes or {})
                self._metrics("resume", began, outcomes is not None, figures)

    async def restore(self, options: RestoreOptions | None = None) -> dict[str, str]:
        """Restore a committed manifest (e.g. after a QEMU-only update, without a reboot)."""
        options = options or RestoreOptions()
        async with self._running({State.COMMITTED, State.IDLE}, "restore"):
            manifest = mf.read(self.manifest_path)
            sockets = {Path(r.qmp_socket) for r in manifest.vms}
            self.inventory.exclude |= sockets
            began, ok = time.monotonic(), False
            try:
                result = await Restorer(
                    self.config,
                    self.manifest_path,
                    self.launcher,
                    ignore_disk_changes=options.ignore_disk_changes,
                ).run()
                ok = True
            finally:
                self.inventory.exclude -= sockets
                self._sync_state()
                await self._resync()
                self._metrics("restore", began, ok)
            return {r.name: f"{r.outcome.value}: {r.reason}" for r in result.vms}

    async def upgrade(self, names: list[str], binary: str | None) -> dict[str, str]:
        """Move VMs to a new QEMU process without a reboot (cpr-transfer where possible)."""
        async with self._running({State.IDLE}, "upgrade QEMU"):
            self._set(State.UPGRADING)
            began, outcomes = time.monotonic(), None
            try:
                outcomes = await self.upgrader.upgrade(names or None, binary)
                return outcomes
            finally:
                self._sync_state()
                await self._resync()
                figures = metrics.outcome_figures(outcomes or {}, self.upgrader.blackout)
                self._metrics("upgrade", began, outcomes is not None, figures)

    def _metrics(
        self,
        operation: str,
        began: float,
        ok: bool,
        vms: tuple[metrics.VMFigures, ...] | None = None,
    ) -> None:
        if vms is None and not ok and not self._records():
            # A failed all-or-nothing save removed its manifest: none of them was saved.
            vms = tuple(metrics.VMFigures(h.name, "not-saved", False) for h in self.vms())
        metrics.record(
            self.config.metrics.textfile,
            self.manifest_path,
            operation,
            ok,
            time.monotonic() - began,
            vms,
        )

    # --- hooks ----------------------------------------------------------------------------

    def _vm_changed(self, handle: VMHandle | None, what: str) -> None:
        if handle is not None:
            self._publish()

    def _progress(self, name: str, phase: str, done: int, total: int) -> None:
        self.on_progress(name, phase, done, total)
