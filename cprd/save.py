"""Prepare (suspend and save every VM), roll back, resume, commit.

Every step that changes a VM is recorded in the manifest's step journal before it is
taken (:class:`cprd.manifest.Journal`), and everything that undoes or finishes a step is
one loop over one pure function (:mod:`cprd.settle`, :func:`cprd.steps.decide`).

Two promises, by path (README, "What is promised"):

- **All or nothing** (``cprdctl prepare-kexec``, ``cprdctl kexec``, D-Bus ``PrepareKexec``
  from fleet tooling, ``cprd prepare``): a preflight refuses before anything is stopped;
  after that, whatever escapes a save (any exception type, a cancellation, the deadline)
  puts every VM back, and a commit that fails puts every VM back too.
- **Save what can be saved** (logind's kexec signal, the guard unit's stop: the kexec goes
  ahead anyway): every VM that can be saved is saved and its QEMU quit (killed if it will
  not quit); a VM that cannot be saved is shut down cleanly and cold-booted at restore
  (``vms.<name>.on_kexec_failure``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cprd import manifest as mf
from cprd import statefile
from cprd.config import Config
from cprd.errors import (
    AgentError,
    CprdError,
    ManifestError,
    PreflightError,
    QMPError,
    SaveError,
    StateError,
)
from cprd.hosts import DiskImage
from cprd.inventory import Inventory, VMHandle, pin_records
from cprd.launch import Launcher
from cprd.live import StopTogether, dirty_syncs
from cprd.log import Event, emit
from cprd.manifest import InPlaceFile, Journal, Manifest, Outcome, Phase, VMRecord
from cprd.plan import (
    UNLIMITED_BANDWIDTH,
    VMPlan,
    duplicate_names,
    plan_vm,
    space_problem,
)
from cprd.qmp import QMPConnection
from cprd.restore import Restorer
from cprd.settle import Settled, Settler, alive, settle_all, wait_exit
from cprd.steps import Action, Intent, Step
from cprd.units import cgroup_unit, decide_unit
from cprd.vm import fstype_of

logger = logging.getLogger(__name__)

#: name, phase, bytes done, bytes total
ProgressCallback = Callable[[str, str, int, int], None]
POLL = 0.05
POLL_FIRST = 0.002
#: downtime-limit (ms) once a live save's VM is stopped: finish now, whatever is left
FINAL_DOWNTIME_MS = 100_000


@dataclass
class _Work:
    """One VM of a prepare."""

    handle: VMHandle
    plan: VMPlan
    record: VMRecord
    seconds: float = 0.0
    error: str = ""
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.plan.name


def state_fstype(state_dir: Path) -> str | None:
    try:
        return fstype_of(str(state_dir.resolve()), Path("/proc/self/mountinfo").read_text())
    except OSError:
        return None


class Saver:
    def __init__(
        self,
        config: Config,
        inventory: Inventory,
        progress: ProgressCallback | None = None,
        launcher: Launcher | None = None,
    ) -> None:
        self.config = config
        #: starts a QEMU when a VM must be brought back from its state file
        self.launcher = launcher
        self.inventory = inventory
        self.progress = progress or (lambda *_: None)
        self.manifest_path = config.manifest_path
        #: live saves of the prepare under way stop together
        self._together = StopTogether()

    # --- planning -----------------------------------------------------------------------

    async def _blockers(self, handle: VMHandle) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """Migration blockers that apply to cpr-reboot and to a live (normal-mode) save:
        QEMU reports them per mode.  The mode is put back as it was."""
        conn = handle.conn
        before = (await conn.execute("query-migrate-parameters")).get("mode", "normal")
        found: dict[str, tuple[str, ...]] = {}
        try:
            for mode in ("cpr-reboot", "normal"):
                await conn.execute("migrate-set-parameters", {"mode": mode})
                info = await conn.execute("query-migrate")
                reasons = info.get("blocked-reasons", []) if isinstance(info, dict) else []
                found[mode] = tuple(str(r) for r in reasons) if isinstance(reasons, list) else ()
        finally:
            await conn.execute("migrate-set-parameters", {"mode": before})
        return found.get("cpr-reboot", ()), found.get("normal", ())

    async def plan(
        self, only: set[str] | None = None
    ) -> tuple[list[tuple[VMHandle, VMPlan]], dict[str, str]]:
        """Fresh facts and a plan per VM (or per VM named in ``only``).

        Changes nothing a VM keeps (the migration mode is switched to cpr-reboot and
        normal, and back, to read QEMU's blockers for each mode); the caller holds the
        operation lock, so no save runs meanwhile.  Returns (plans, problems)."""
        await self.inventory.scan()
        handles = [h for h in self.inventory.vms() if only is None or h.name in only]
        fstype = state_fstype(self.config.state_dir)
        plans: list[tuple[VMHandle, VMPlan]] = []
        problems: dict[str, str] = {}

        async def one(handle: VMHandle) -> None:
            live_blockers: tuple[str, ...] = ()
            try:
                facts = await self.inventory.refresh(handle, probe_agent=True)
                if facts.qemu_version >= (8, 2, 0):
                    cpr, live_blockers = await self._blockers(handle)
                    facts = facts.replace(migration_blockers=cpr)
            except (CprdError, OSError) as err:
                problems[handle.name] = f"cannot inspect: {err}"
                return
            vm = self.config.vm(facts.name)
            vm_plan = plan_vm(
                facts,
                vm,
                self.config.save,
                fstype,
                trusted_uids=self.config.discovery.trusted_uids,
                live_blockers=live_blockers,
            )
            plans.append((handle, vm_plan))
            if vm_plan.problems:
                problems[facts.name] = "; ".join(vm_plan.problems)

        await asyncio.gather(*(one(h) for h in handles))
        plans.sort(key=lambda hp: hp[1].name)
        if only is None:
            for path, error in self.inventory.unreachable().items():
                problems[str(path)] = (
                    f"a QEMU serves this socket but cprd cannot use it ({error}); "
                    "it would not be saved (is cprd.service running?)"
                )
        problems.update(duplicate_names(h.facts for h, _ in plans))
        free = _free_bytes(self.config.state_dir)
        space = space_problem(
            (p for _, p in plans), free, self.config.save.space_margin_mib * 2**20
        )
        if space:
            problems["state_dir"] = space
        return plans, problems

    # --- prepare ------------------------------------------------------------------------

    def _refuse_existing(self) -> None:
        try:
            phase = mf.read(self.manifest_path).phase
        except ManifestError as err:
            if not os.path.lexists(self.manifest_path):
                return
            raise StateError(
                f"a manifest exists at {self.manifest_path} but cannot be read: {err}",
                "look at it: its VMs may be saved; fix or remove it, then prepare again",
            ) from err
        if phase in (Phase.PREPARING, Phase.PREPARED, Phase.COMMITTED):
            raise StateError(
                f"a manifest in phase {phase.value} exists at {self.manifest_path}",
                "resume or restore it first",
            )

    async def prepare(
        self,
        only: set[str] | None = None,
        *,
        anyway: bool = False,
        shutdown: Collection[str] = (),
    ) -> Manifest:
        """Save every VM (or those named in ``only``).

        All or nothing by default: on any failure every VM is put back and SaveError
        raised.  With ``anyway`` (the kexec goes ahead whatever happens) every VM that can
        be saved is, and the others are put back to be shut down at commit.  VMs named in
        ``shutdown`` are not saved but shut down at commit."""
        self._refuse_existing()
        mf.ensure_state_dir(self.config.state_dir)
        plans, problems = await self.plan(only)
        known = {p.name for _, p in plans}
        unknown = sorted(set(shutdown) - known)
        if unknown:
            raise PreflightError(
                dict.fromkeys(unknown, "asked to shut down, but no such VM"), "see cprdctl status"
            )
        blocking = {k: v for k, v in problems.items() if k not in shutdown}
        if anyway:
            for what, why in sorted(blocking.items()):
                emit(logger, logging.ERROR, Event.FAILURE, "cannot be saved: %s", why, vm=what)
        elif blocking:
            raise PreflightError(blocking, "fix the VMs named, or run `cprdctl check`")
        if not plans:
            raise PreflightError({"host": "no VMs found"}, "check discovery.qmp_sockets")

        work = [self._work(h, p, problems.get(p.name, "")) for h, p in plans]
        for w in work:
            if w.name in shutdown:
                w.record = w.record.replace(
                    shutdown_asked=True, reason="asked to shut down instead of saving"
                )
        skip = {w.name for w in work if w.name in shutdown or (anyway and w.name in problems)}
        for w in work:
            emit(
                logger,
                logging.INFO,
                Event.PLAN,
                "%s: %s",
                "shut down instead of saving" if w.name in skip else w.plan.action,
                "; ".join(w.plan.notes),
                vm=w.name,
                phase="preparing",
            )
        journal = Journal.create(
            self.manifest_path, Manifest.new(Phase.PREPARING, tuple(w.record for w in work))
        )
        emit(
            logger,
            logging.INFO,
            Event.SAVE_STARTED,
            "saving %d VMs%s",
            len(work) - len(skip),
            " (save what can be saved: the kexec goes ahead)" if anyway else "",
            phase="preparing",
            manifest=self.manifest_path,
        )
        todo = [w for w in work if w.name not in skip]
        self._together = StopTogether()
        reason = ""
        cancelled: BaseException | None = None
        try:
            async with asyncio.timeout(self.config.save.timeout_s):
                await self._save_all(journal, todo, isolate=anyway)
            if not anyway:
                # By construction, not by trust in the code above: prepared means saved.
                unsaved = [w.name for w in todo if journal.vm(w.name).step is not Step.SAVED]
                if unsaved:
                    raise StateError(f"not saved: {', '.join(unsaved)}")
        except TimeoutError:
            reason = f"deadline of {self.config.save.timeout_s}s passed"
        except asyncio.CancelledError as err:
            reason, cancelled = "cancelled", err
        except BaseException as err:  # whatever it is, every VM is put back
            failed = [w for w in todo if w.error]
            reason = "; ".join(f"{w.name}: {w.error}" for w in failed) or _describe(err)
            if not isinstance(err, Exception):
                cancelled = err
        failed = [w for w in todo if w.error]
        if anyway and not cancelled:
            if reason and not failed:  # the deadline: every VM not yet saved failed
                failed = [w for w in todo if journal.vm(w.name).step is not Step.SAVED]
                for w in failed:
                    w.error = reason
            for w in failed:
                journal.put(journal.vm(w.name).replace(reason=w.error))
            await self._settle(journal, [w.name for w in failed], Intent.PUT_BACK)
            journal.phase(Phase.PREPARED)
            emit(
                logger,
                logging.INFO,
                Event.PREPARED,
                "prepared: %d VMs saved, %d to be shut down",
                len(todo) - len(failed),
                len(skip) + len(failed),
                phase="prepared",
                manifest=self.manifest_path,
            )
            return journal.manifest
        if reason:
            emit(
                logger,
                logging.WARNING,
                Event.ROLLBACK,
                "rolling back: %s",
                reason,
                phase="preparing",
                manifest=self.manifest_path,
            )
            outcomes, kept = await self._put_back(journal)
            for w in failed:
                outcomes[w.name] = f"failed ({w.error}); {outcomes.get(w.name, '?')}"
            if cancelled is not None:
                raise cancelled
            raise SaveError(reason, outcomes, pending=kept, lost=_lost(outcomes))
        journal.phase(Phase.PREPARED)
        emit(
            logger,
            logging.INFO,
            Event.PREPARED,
            "prepared: %d VMs saved, resumable until commit",
            len(work),
            phase="prepared",
            manifest=self.manifest_path,
        )
        return journal.manifest

    async def _save_all(self, journal: Journal, work: list[_Work], isolate: bool) -> None:
        """Save in parallel.  All or nothing: the first failure cancels the rest and is
        raised.  ``isolate``: a failure is that VM's alone (``w.error``)."""
        sem = asyncio.Semaphore(self.config.save.concurrency)
        if isolate:
            results = await asyncio.gather(
                *(self._save_one(journal, w, sem) for w in work), return_exceptions=True
            )
            for w, result in zip(work, results, strict=True):
                # A save cancelled on its own (a cancelled prepare raises from the gather) is a
                # failure of that VM: its live migration must be put back, not left running.
                if isinstance(result, asyncio.CancelledError) and not w.error:
                    w.error = "its save was cancelled"
            return
        async with asyncio.TaskGroup() as group:
            for w in work:
                group.create_task(self._save_one(journal, w, sem), name=f"save-{w.name}")

    def _work(self, handle: VMHandle, plan: VMPlan, problem: str) -> _Work:
        f = handle.facts
        state = self.config.state_dir / f"{mf.safe_file_name(f.name)}.state"
        record = VMRecord(
            name=f.name,
            qmp_socket=f.qmp_socket,
            pid=f.pid,
            # The argv the plan checked (argv_anchor, run_as_problem), not handle.facts
            # again: an inventory scan may have read it anew since.
            argv=plan.argv,
            executable=f.executable,
            qemu_version=f.version_str,
            machine_type=f.machine_type,
            state_file=str(state),
            settings=plan.settings,
            runstate_before=f.runstate,
            cprd_suspended=plan.suspend,
            agent_socket=f.agent_socket,
            in_place=tuple(
                InPlaceFile(b.id, b.mem_path or "", b.size) for b in plan.in_place_backends
            ),
            reason=problem,
            on_kexec_failure=self.config.vm(f.name).on_kexec_failure.value,
            exe_dev=f.binary[0] if f.binary else None,
            exe_ino=f.binary[1] if f.binary else None,
            disks=tuple(DiskImage(path) for path in f.block_files),
            process=f.process,
            restore_priority=self.config.vm(f.name).restore_priority,
            unit=decide_unit(cgroup_unit(f.cgroup), f.pid, f.unit_info).unit,
        )
        return _Work(handle, plan, record)

    async def _save_one(self, journal: Journal, w: _Work, sem: asyncio.Semaphore) -> None:
        try:
            async with sem:
                start = time.monotonic()
                if w.plan.suspend:
                    await self._suspend(journal, w)
                await self._migrate(journal, w)
                w.seconds = time.monotonic() - start
        except asyncio.CancelledError:
            raise  # cancelled because another VM failed, or the whole prepare was
        except BaseException as err:
            w.error = _describe(err)
            if isinstance(err, Exception):
                emit(
                    logger,
                    logging.ERROR,
                    Event.FAILURE,
                    "save failed: %s",
                    w.error,
                    vm=w.name,
                    phase="preparing",
                )
            raise

    async def _wait_runstate(self, w: _Work, wanted: set[str], timeout: float) -> str:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            reply = await w.handle.conn.execute("query-status", timeout=self._qmp_timeout)
            status = reply.get("status") if isinstance(reply, dict) else None
            if not isinstance(status, str):
                raise QMPError(f"{w.name}: query-status: unexpected reply")
            if status in wanted:
                return status
            if loop.time() > deadline:
                wants = " or ".join(sorted(wanted))
                raise CprdError(f"runstate still {status!r} after {timeout:g}s (wanted {wants})")
            await asyncio.sleep(0.1)

    @property
    def _qmp_timeout(self) -> float:
        return float(self.config.save.qmp_timeout_s)

    async def _suspend(self, journal: Journal, w: _Work) -> None:
        agent = w.handle.agent(timeout=float(self.config.save.agent_timeout_s))
        if agent is None:
            raise AgentError(f"{w.name}: no guest agent configured")
        self.progress(w.name, "suspending", 0, 0)
        journal.step(w.name, Step.SUSPENDING)
        await agent.execute("guest-suspend-ram", reply=False)
        await self._wait_runstate(w, {"suspended"}, self.config.save.suspend_timeout_s)
        emit(
            logger,
            logging.INFO,
            Event.VM_SUSPENDED,
            "suspended to RAM through its guest agent",
            vm=w.name,
            phase="preparing",
        )

    async def _migrate(self, journal: Journal, w: _Work) -> None:
        conn = w.handle.conn
        for cmd, args in w.plan.settings.commands():
            await conn.execute(cmd, args, timeout=self._qmp_timeout)
        path = Path(w.record.state_file)
        # cprd creates the state file and hands it over: the QEMU may run as any user.
        direct = statefile.uses_direct_io(w.plan.settings.parameters)
        fds = statefile.open_fds(path, write=True, direct=direct)
        try:
            fdset = await statefile.add_fdset(conn, fds, f"cprd-save-{w.name}", self._qmp_timeout)
        finally:
            statefile.close(fds)
        try:
            await self._run_migration(journal, w, conn, fdset)
        finally:
            # QEMU closes the descriptors it holds in the fdset (a failed or cancelled
            # save would otherwise keep the state file open, and its space taken, for as
            # long as the QEMU runs).  Bounded: a stopped QEMU must not hold up a rollback.
            await statefile.remove_fdset(conn, fdset, 2)
        size = mf.fsync_file(path)
        mf.fsync_dir(path.parent)
        w.record = journal.step(w.name, Step.SAVED, state_size=size)
        done = time.monotonic()
        w.timings["save"] = done - w.timings["start"]
        how = "RAM in place" if w.plan.in_place else "RAM copied"
        if "stop" in w.timings:
            w.timings["stopped"] = done - w.timings["stop"]
            how += f", live {w.timings['live']:.2f}s, stopped {w.timings['stopped']:.3f}s"
        elif w.plan.live:
            how += ", live: converged by itself"
        self.progress(w.name, "saved", size, size)
        emit(
            logger,
            logging.INFO,
            Event.VM_SAVED,
            "saved %d bytes to %s in %.2fs (%s)",
            size,
            path,
            w.timings["save"],
            how,
            vm=w.name,
            phase="preparing",
            manifest=self.manifest_path,
        )

    async def _run_migration(
        self, journal: Journal, w: _Work, conn: QMPConnection, fdset: int
    ) -> None:
        """migrate to the fdset and follow it until it completes; QMPError if it fails.

        A live save (normal mode) first runs its live phase (:meth:`_live_phase`)."""
        # Progress phase "live" while a live save's VM runs, "saving" once it is stopped
        # (cprdctl times STOPPED from the first "saving").
        self.progress(w.name, "live" if w.plan.live else "saving", 0, w.plan.bytes_to_write)
        journal.step(w.name, Step.MIGRATING)
        w.timings["start"] = time.monotonic()
        if w.plan.live and self.config.save.live_bandwidth_mib:
            cap = self.config.save.live_bandwidth_mib * 2**20
            await conn.execute(
                "migrate-set-parameters", {"max-bandwidth": cap}, timeout=self._qmp_timeout
            )
        await conn.execute(
            "migrate", {"uri": f"file:/dev/fdset/{fdset}"}, timeout=self._qmp_timeout
        )
        if w.plan.live and await self._live_phase(journal, w, conn):
            return
        await self._follow(w, conn)

    async def _query_migrate(
        self, w: _Work, conn: QMPConnection, phase: str = "saving"
    ) -> dict[str, Any]:
        info = await conn.execute("query-migrate", timeout=self._qmp_timeout)
        if not isinstance(info, dict):
            raise QMPError(f"{w.name}: query-migrate: unexpected reply")
        status = info.get("status", "none")
        if status in ("failed", "cancelled"):
            raise QMPError(f"migration {status}: {info.get('error-desc', 'no reason given')}")
        ram = info.get("ram", {})
        ram = ram if isinstance(ram, dict) else {}
        self.progress(
            w.name,
            phase,
            _int(ram.get("transferred")),
            _int(ram.get("total")) or w.plan.bytes_to_write,
        )
        return info

    async def _follow(self, w: _Work, conn: QMPConnection) -> None:
        poll = POLL_FIRST
        while True:
            info = await self._query_migrate(w, conn)
            if info.get("status") == "completed":
                return
            # An in-place save takes QEMU a few ms: look again soon, then back off.
            await asyncio.sleep(poll)
            poll = min(poll * 2, POLL)

    async def _live_phase(self, journal: Journal, w: _Work, conn: QMPConnection) -> bool:
        """The VM runs while its RAM is written.  Once every live save of its wave has
        written its RAM once, or its own save.live_max_s has passed, stop it (with the
        wave: one manifest write for all, then one ``stop`` each), lift the downtime
        limit and the bandwidth cap so that QEMU finishes the save while it is stopped.
        True if the save completed by itself (nothing left to write: QEMU stopped it)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.save.live_max_s
        wave = self._together.join(w.name)
        try:
            while not wave.go.is_set():
                info = await self._query_migrate(w, conn, "live")
                if info.get("status") == "completed":  # QEMU stopped it: nothing was left
                    w.timings["live"] = time.monotonic() - w.timings["start"]
                    self.progress(w.name, "saving", 0, w.plan.bytes_to_write)
                    return True
                now = loop.time()
                if dirty_syncs(info) > 1 or now >= deadline:
                    self._together.ready(wave, w.name)
                if now >= deadline:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wave.go.wait(), min(POLL, deadline - now))
            if not wave.recorded and wave.go.is_set():
                wave.recorded = True
                names = [
                    n for n in wave.names if journal.vm(n).step is Step.MIGRATING
                ]  # not those saved already (converged by themselves)
                journal.record_steps(names, Step.STOPPING)
            if journal.vm(w.name).step is Step.STOPPING:
                journal.taking(w.name, Step.STOPPING)
            else:  # stopped alone, at its own deadline
                journal.step(w.name, Step.STOPPING)
            await conn.execute("stop", timeout=self._qmp_timeout)
        finally:
            self._together.leave(wave, w.name)
        w.timings["stop"] = time.monotonic()
        w.timings["live"] = w.timings["stop"] - w.timings["start"]
        self.progress(w.name, "saving", 0, w.plan.bytes_to_write)
        final: dict[str, Any] = {
            "downtime-limit": FINAL_DOWNTIME_MS,
            "avail-switchover-bandwidth": 0,  # the rate QEMU measures
        }
        if self.config.save.live_bandwidth_mib:
            final["max-bandwidth"] = UNLIMITED_BANDWIDTH
        await conn.execute("migrate-set-parameters", final, timeout=self._qmp_timeout)
        return False

    # --- settling: rollback, resume, commit ---------------------------------------------

    def _settler(self, journal: Journal) -> Settler:
        restorer = Restorer(self.config, self.manifest_path, launcher=self.launcher)

        def lookup(socket: str) -> QMPConnection | None:
            for handle in self.inventory.handles.values():
                if str(handle.conn.path) == socket and not handle.conn.closed.is_set():
                    return handle.conn
            return None

        return Settler(self.config, journal, restorer.start, lookup, self.inventory.exclude)

    async def _settle(
        self, journal: Journal, names: list[str], intent: Intent
    ) -> dict[str, Settled]:
        settler = self._settler(journal)
        try:
            timeout = self.config.save.timeout_s + self.config.restore.timeout_s
            return await settle_all(settler, names, intent, timeout)
        finally:
            await settler.close()

    async def _put_back(self, journal: Journal) -> tuple[dict[str, str], list[str]]:
        """Every VM of the journal back as it ran; the manifest keeps only the VMs that
        could not be put back (phase preparing), or is removed.  Returns (outcomes, kept)."""
        names = [r.name for r in journal.manifest.vms]
        results = await self._settle(journal, names, Intent.PUT_BACK)
        return self._conclude(journal, results)

    def _conclude(
        self, journal: Journal, results: dict[str, Settled]
    ) -> tuple[dict[str, str], list[str]]:
        outcomes: dict[str, str] = {}
        kept: list[str] = []
        for name, res in sorted(results.items()):
            rec = res.record
            if res.decision.action is Action.DONE:
                outcomes[name] = _outcome_text(res)
                _drop_state(rec, self.config.state_dir)
            elif res.decision.action is Action.LOST:
                outcomes[name] = f"LOST: {res.describe()}"
                emit(logger, logging.CRITICAL, Event.VM_LOST, "lost: %s", res.describe(), vm=name)
                _drop_state(rec, self.config.state_dir)
            else:
                outcomes[name] = (
                    f"could not be put back: {res.describe()}; kept in the manifest, "
                    "run `cprdctl resume` once its QEMU answers"
                )
                kept.append(name)
                emit(
                    logger,
                    logging.ERROR,
                    Event.FAILURE,
                    "could not be put back: %s",
                    res.describe(),
                    vm=name,
                )
        if kept:
            journal.phase(Phase.PREPARING, keep=set(kept))
        else:
            journal.remove()
        return outcomes, kept

    async def resume(self) -> dict[str, str]:
        """Undo a prepared (or interrupted, or failed-to-commit) save: every VM back."""
        journal = Journal.load(self.manifest_path)
        phase = journal.manifest.phase
        same_boot = journal.manifest.boot_id == mf.boot_id()
        # A commit interrupted on this boot (cprd killed, the kexec called off) is resumed
        # too: QEMUs not yet quit continue, the others are loaded from their state files.
        if phase not in (Phase.PREPARING, Phase.PREPARED) and not (
            phase is Phase.COMMITTED and same_boot
        ):
            raise StateError(
                f"nothing to resume: the manifest is in phase {phase.value}",
                "a manifest committed before a reboot is restored: `cprdctl restore`",
            )
        await self.inventory.scan()
        outcomes, _ = await self._put_back(journal)
        return outcomes

    # --- commit -------------------------------------------------------------------------

    async def commit(self, *, anyway: bool = False) -> Manifest:
        """Quit the saved QEMUs; the manifest says committed before the first quit.

        All or nothing: if any VM cannot be committed, every VM is put back and
        SaveError raised.  With ``anyway`` (the kexec goes ahead): a QEMU that will not
        quit is killed once its state is complete, a VM not saved is shut down cleanly
        (or left, by its on_kexec_failure), and nothing is raised."""
        journal = Journal.load(self.manifest_path)
        phase = journal.manifest.phase
        interrupted = phase is Phase.COMMITTED and journal.manifest.boot_id == mf.boot_id()
        if phase is not Phase.PREPARED and not interrupted:
            raise StateError(
                f"cannot commit: the manifest is in phase {journal.manifest.phase.value}",
                "prepare first",
            )
        await self.inventory.scan()
        names = [r.name for r in journal.manifest.vms]
        if phase is Phase.PREPARED:
            names = self._pin(journal, names, anyway)
        journal.phase(Phase.COMMITTED)
        intent = Intent.COMMIT_ANYWAY if anyway else Intent.COMMIT
        results = await self._settle(journal, names, intent)
        refused = {n: r for n, r in results.items() if r.decision.action is not Action.DONE}
        if refused and not anyway:
            reason = "; ".join(f"{n}: {r.describe()}" for n, r in sorted(refused.items()))
            emit(
                logger,
                logging.WARNING,
                Event.ROLLBACK,
                "commit failed, putting every VM back: %s",
                reason,
                phase="committing",
                manifest=self.manifest_path,
            )
            journal.phase(Phase.PREPARING)
            outcomes, kept = await self._put_back(journal)
            raise SaveError(
                f"commit failed: {reason}", outcomes, pending=kept, lost=_lost(outcomes)
            )
        for name, res in sorted(refused.items()):
            emit(
                logger,
                logging.CRITICAL if res.decision.action is Action.LOST else logging.ERROR,
                Event.VM_LOST if res.decision.action is Action.LOST else Event.FAILURE,
                "not committed: %s",
                res.describe(),
                vm=name,
                phase="committed",
            )
        os.sync()
        shut = [r.name for r in journal.manifest.vms if r.step is Step.SHUT_DOWN]
        emit(
            logger,
            logging.INFO,
            Event.COMMITTED,
            "committed: %d QEMUs quit%s; restore after the reboot",
            len(names) - len(shut),
            f", {len(shut)} shut down ({', '.join(shut)})" if shut else "",
            phase="committed",
            manifest=self.manifest_path,
        )
        return journal.manifest

    def _pin(self, journal: Journal, names: list[str], anyway: bool) -> list[str]:
        """Before the first quit: each QEMU is still the process inspected, with the argv
        and binary recorded (pinned in the manifest).  One that is not refuses the commit
        (TrustError, nothing quit); with ``anyway`` it is dropped from the manifest and
        left alone instead: cprd never relaunches what it cannot trust."""
        pinned, refused = pin_records(self.inventory, journal.manifest.vms)
        for rec in pinned:
            journal.put(rec)
        if refused and not anyway:
            raise next(iter(refused.values()))
        for name, err in sorted(refused.items()):
            emit(logger, logging.ERROR, Event.FAILURE, "not committed: %s", err, vm=name)
        if refused:
            names = [n for n in names if n not in refused]
            journal.phase(Phase.PREPARED, keep=set(names))
        return names


def _describe(err: BaseException) -> str:
    text = str(err)
    if isinstance(err, CprdError):
        return text
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _lost(outcomes: dict[str, str]) -> list[str]:
    return [name for name, what in outcomes.items() if "LOST: " in what]


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _outcome_text(res: Settled) -> str:
    step = res.record.step
    if step is Step.PLANNED:
        return f"untouched, still {res.record.runstate_before}"
    if step is Step.RESTORED:
        return f"resumed from its state file ({res.record.reason or res.decision.why})"
    return f"resumed ({res.decision.why})"


def _drop_state(rec: VMRecord, state_dir: Path) -> None:
    """Delete a state file once its VM runs without it (or it never was complete); never
    one outside state_dir (a manifest names it)."""
    if not mf.in_state_dir(rec.state_file, state_dir):
        return
    if rec.step in (Step.RESUMED, Step.RESTORED, Step.PLANNED) or rec.state_size is None:
        with contextlib.suppress(OSError):
            os.unlink(rec.state_file)


def _free_bytes(path: Path) -> int:
    probe = path
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free


__all__ = ["Outcome", "Saver", "alive", "wait_exit"]
