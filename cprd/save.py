"""Prepare (suspend and save every VM), roll back, resume, commit.

``prepare`` is all-or-nothing: a preflight refuses before anything is stopped; after
that, if any VM fails or the deadline passes, running migrations are cancelled, every VM
cprd stopped is resumed (and woken, when cprd suspended it), partial state files are
removed, and :class:`SaveError` says per VM what happened.  The manifest is written in
phase ``preparing`` before anything is stopped, so a restarted daemon knows which VMs
to resume.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cprd import manifest as mf
from cprd.config import Config
from cprd.errors import AgentError, CprdError, PreflightError, QMPError, SaveError, StateError
from cprd.inventory import Inventory, VMHandle, pin_record
from cprd.launch import Launcher
from cprd.log import Event, emit
from cprd.manifest import InPlaceFile, Manifest, Outcome, Phase, VMRecord
from cprd.plan import VMPlan, duplicate_names, plan_vm, space_problem
from cprd.restore import Restorer
from cprd.vm import fstype_of

logger = logging.getLogger(__name__)

#: name, phase, bytes done, bytes total
ProgressCallback = Callable[[str, str, int, int], None]
POLL = 0.05
POLL_FIRST = 0.002


@dataclass
class _Work:
    """What cprd did to one VM during a prepare, so that it can be undone."""

    handle: VMHandle
    plan: VMPlan
    record: VMRecord
    suspended: bool = False
    migrating: bool = False
    saved: bool = False
    #: could not be put back although its QEMU lives (e.g. stopped, not answering):
    #: kept in the manifest so that ``cprd resume`` finishes the job later.
    stuck: bool = False
    seconds: float = 0.0
    error: str = ""
    timings: dict[str, float] = field(default_factory=dict)


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
        #: starts a QEMU when a VM saved while suspended must be reloaded (see _reload)
        self.launcher = launcher
        self.inventory = inventory
        self.progress = progress or (lambda *_: None)
        self.manifest_path = config.manifest_path

    # --- planning -----------------------------------------------------------------------

    async def _cpr_blockers(self, handle: VMHandle) -> tuple[str, ...]:
        """Migration blockers that apply to cpr-reboot (QEMU reports them per mode)."""
        conn = handle.conn
        before = (await conn.execute("query-migrate-parameters")).get("mode", "normal")
        await conn.execute("migrate-set-parameters", {"mode": "cpr-reboot"})
        try:
            info = await conn.execute("query-migrate")
        finally:
            await conn.execute("migrate-set-parameters", {"mode": before})
        return tuple(str(r) for r in info.get("blocked-reasons", []))

    async def plan(
        self, only: set[str] | None = None
    ) -> tuple[list[tuple[VMHandle, VMPlan]], dict[str, str]]:
        """Fresh facts and a plan per VM (or per VM named in ``only``); changes nothing.

        Returns (plans, problems)."""
        await self.inventory.scan()
        handles = [h for h in self.inventory.vms() if only is None or h.name in only]
        fstype = state_fstype(self.config.state_dir)
        plans: list[tuple[VMHandle, VMPlan]] = []
        problems: dict[str, str] = {}

        async def one(handle: VMHandle) -> None:
            try:
                facts = await self.inventory.refresh(handle, probe_agent=True)
                if facts.qemu_version >= (8, 2, 0):
                    facts = facts.replace(migration_blockers=await self._cpr_blockers(handle))
            except (CprdError, OSError) as err:
                problems[handle.name] = f"cannot inspect: {err}"
                return
            vm_plan = plan_vm(facts, self.config.vm(facts.name), self.config.save, fstype)
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

    def _existing_phase(self) -> Phase | None:
        try:
            return mf.read(self.manifest_path).phase
        except CprdError:
            return None if not self.manifest_path.exists() else Phase.PREPARING

    async def prepare(self, only: set[str] | None = None) -> Manifest:
        """Save every VM (or those named in ``only``); on any failure put every VM back
        and raise SaveError."""
        phase = self._existing_phase()
        if phase in (Phase.PREPARING, Phase.PREPARED, Phase.COMMITTED):
            raise StateError(
                f"a manifest in phase {phase.value if phase else '?'} exists at "
                f"{self.manifest_path}",
                "resume or restore it first",
            )
        mf.ensure_state_dir(self.config.state_dir)
        plans, problems = await self.plan(only)
        if problems:
            raise PreflightError(problems, "fix the VMs named, or run `cprdctl check`")
        if not plans:
            raise PreflightError({"host": "no VMs found"}, "check discovery.qmp_sockets")

        work = [self._work(h, p) for h, p in plans]
        for w in work:
            emit(
                logger,
                logging.INFO,
                Event.PLAN,
                "%s: %s",
                w.plan.action,
                "; ".join(w.plan.notes),
                vm=w.plan.name,
                phase="preparing",
            )
        manifest = Manifest.new(Phase.PREPARING, tuple(w.record for w in work))
        mf.write(self.manifest_path, manifest)
        emit(
            logger,
            logging.INFO,
            Event.SAVE_STARTED,
            "saving %d VMs",
            len(work),
            phase="preparing",
            manifest=self.manifest_path,
        )

        sem = asyncio.Semaphore(self.config.save.concurrency)
        reason = ""
        try:
            async with asyncio.timeout(self.config.save.timeout_s):
                await self._save_all(work, sem)
        except TimeoutError:
            reason = f"deadline of {self.config.save.timeout_s}s passed"
        except (CprdError, OSError) as err:
            failed = [w for w in work if w.error]
            reason = "; ".join(f"{w.plan.name}: {w.error}" for w in failed) or str(err)
        if reason:
            outcomes = await self._rollback(work, reason)
            stuck = [w for w in work if w.stuck]
            self._keep_stuck(manifest, [w.record for w in stuck])
            raise SaveError(reason, outcomes, pending=[w.plan.name for w in stuck])

        manifest = manifest.replace(phase=Phase.PREPARED, vms=tuple(w.record for w in work))
        mf.write(self.manifest_path, manifest)
        emit(
            logger,
            logging.INFO,
            Event.PREPARED,
            "prepared: %d VMs saved, resumable until commit",
            len(work),
            phase="prepared",
            manifest=self.manifest_path,
        )
        return manifest

    async def _save_all(self, work: list[_Work], sem: asyncio.Semaphore) -> None:
        """Save in parallel; the first failure cancels the rest and is raised."""
        first: BaseException | None = None
        try:
            async with asyncio.TaskGroup() as group:
                for w in work:
                    group.create_task(self._save_one(w, sem), name=f"save-{w.plan.name}")
        except* (CprdError, OSError) as errors:
            first = errors.exceptions[0]
        if first is not None:
            raise first

    def _work(self, handle: VMHandle, plan: VMPlan) -> _Work:
        f = handle.facts
        state = self.config.state_dir / f"{mf.safe_file_name(f.name)}.state"
        record = VMRecord(
            name=f.name,
            qmp_socket=f.qmp_socket,
            pid=f.pid,
            argv=f.argv,
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
            exe_dev=f.binary[0] if f.binary else None,
            exe_ino=f.binary[1] if f.binary else None,
        )
        return _Work(handle, plan, record)

    async def _save_one(self, w: _Work, sem: asyncio.Semaphore) -> None:
        name = w.plan.name
        try:
            async with sem:
                start = time.monotonic()
                if w.plan.suspend:
                    await self._suspend(w)
                await self._migrate(w)
                w.seconds = time.monotonic() - start
        except (CprdError, OSError) as err:
            w.error = str(err)
            emit(
                logger,
                logging.ERROR,
                Event.FAILURE,
                "save failed: %s",
                err,
                vm=name,
                phase="preparing",
            )
            raise

    async def _wait_runstate(self, w: _Work, wanted: set[str], timeout: float) -> str:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            status = str((await w.handle.conn.execute("query-status"))["status"])
            if status in wanted:
                return status
            if loop.time() > deadline:
                wants = " or ".join(sorted(wanted))
                raise CprdError(f"runstate still {status!r} after {timeout:g}s (wanted {wants})")
            await asyncio.sleep(0.1)

    async def _suspend(self, w: _Work) -> None:
        agent = w.handle.agent(timeout=5.0)
        if agent is None:
            raise AgentError(f"{w.plan.name}: no guest agent configured")
        self.progress(w.plan.name, "suspending", 0, 0)
        await agent.execute("guest-suspend-ram", reply=False)
        w.suspended = True
        await self._wait_runstate(w, {"suspended"}, self.config.save.suspend_timeout_s)
        emit(
            logger,
            logging.INFO,
            Event.VM_SUSPENDED,
            "suspended to RAM through its guest agent",
            vm=w.plan.name,
            phase="preparing",
        )

    async def _migrate(self, w: _Work) -> None:
        conn = w.handle.conn
        for cmd, args in w.plan.settings.commands():
            await conn.execute(cmd, args)
        path = Path(w.record.state_file)
        mf.create_private(path)
        self.progress(w.plan.name, "saving", 0, w.plan.bytes_to_write)
        w.migrating = True
        start = time.monotonic()
        await conn.execute("migrate", {"uri": f"file:{path}"})
        poll = POLL_FIRST
        while True:
            info = await conn.execute("query-migrate")
            status = info.get("status", "none")
            ram = info.get("ram", {})
            if status == "completed":
                break
            if status in ("failed", "cancelled"):
                raise QMPError(f"migration {status}: {info.get('error-desc', 'no reason given')}")
            self.progress(
                w.plan.name,
                "saving",
                int(ram.get("transferred", 0)),
                int(ram.get("total", 0)) or w.plan.bytes_to_write,
            )
            # An in-place save takes QEMU a few ms: look again soon, then back off.
            await asyncio.sleep(poll)
            poll = min(poll * 2, POLL)
        w.migrating = False
        size = mf.fsync_file(path)
        mf.fsync_dir(path.parent)
        w.saved = True
        w.record = w.record.replace(state_size=size)
        w.timings["save"] = time.monotonic() - start
        self.progress(w.plan.name, "saved", size, size)
        emit(
            logger,
            logging.INFO,
            Event.VM_SAVED,
            "saved %d bytes to %s in %.2fs (%s)",
            size,
            path,
            w.timings["save"],
            "RAM in place" if w.plan.in_place else "RAM copied",
            vm=w.plan.name,
            phase="preparing",
            manifest=self.manifest_path,
        )

    # --- undo ---------------------------------------------------------------------------

    async def _put_back(self, w: _Work) -> str:
        """Return one VM to the runstate it had; say what happened."""
        conn = w.handle.conn
        name = w.plan.name
        try:
            if conn.closed.is_set():
                return "QEMU is gone (its process exited); nothing to resume"
            status = str((await conn.execute("query-status"))["status"])
            if w.migrating or status in ("finish-migrate",):
                with contextlib.suppress(QMPError):
                    await conn.execute("migrate_cancel")
                for _ in range(100):
                    info = await conn.execute("query-migrate")
                    if info.get("status") not in ("active", "setup", "device", "cancelling"):
                        break
                    await asyncio.sleep(POLL)
                status = str((await conn.execute("query-status"))["status"])
            was_suspended = w.suspended or w.record.runstate_before == "suspended"
            if status == "postmigrate" and was_suspended and w.saved:
                final = await self._reload(w)
                emit(
                    logger,
                    logging.INFO,
                    Event.VM_RESUMED,
                    "put back from its state file: %s",
                    final,
                    vm=name,
                )
                return f"resumed from its state file ({final})"
            stopped = status in ("postmigrate", "paused", "finish-migrate")
            if stopped and w.record.runstate_before == "running":
                await conn.execute("cont")
            if w.suspended:
                status = await self._wait_runstate(w, {"suspended", "running"}, 10)
                if status == "suspended":
                    await conn.execute("system_wakeup")
            final = await self._wait_runstate(
                w,
                {"running"}
                if w.record.runstate_before == "running"
                else {w.record.runstate_before, "postmigrate"},
                15,
            )
            emit(logger, logging.INFO, Event.VM_RESUMED, "put back: %s", final, vm=name)
            return f"resumed ({final})"
        except (CprdError, OSError) as err:
            emit(logger, logging.ERROR, Event.FAILURE, "could not put back: %s", err, vm=name)
            if _alive(w.record.pid):
                # Its QEMU lives on (stopped, hung): commands it has not read yet, a
                # `migrate` among them, still run once it continues.  Keep it in the
                # manifest so that `cprd resume` puts it back then.
                w.stuck = True
                return (
                    f"could not resume: {err}; its QEMU (pid {w.record.pid}) lives on: "
                    "kept in the manifest, run `cprd resume` once it answers"
                )
            return f"could not resume: {err}"
        finally:
            if not w.stuck and mf.in_state_dir(w.record.state_file, self.config.state_dir):
                with contextlib.suppress(OSError):
                    os.unlink(w.record.state_file)

    async def _reload(self, w: _Work) -> str:
        """Bring back a VM saved while suspended by restoring it from its state file.

        QEMU 10.0 aborts on ``cont`` from postmigrate when the guest was suspended
        ("invalid runstate transition: 'postmigrate' -> 'suspended'"), so the only safe
        way back is the restore path: quit this QEMU and load the complete state file
        into a new one (which comes back suspended and is woken when cprd suspended it).
        """
        with contextlib.suppress(QMPError):
            await w.handle.conn.execute("quit")
        if not await wait_exit(w.record.pid, 30):
            raise CprdError(f"QEMU pid {w.record.pid} did not quit")
        async with asyncio.timeout(self.config.restore.timeout_s):
            return await Restorer(self.config, launcher=self.launcher).restore_vm(w.record)

    async def _rollback(self, work: list[_Work], reason: str) -> dict[str, str]:
        emit(
            logger,
            logging.WARNING,
            Event.ROLLBACK,
            "rolling back: %s",
            reason,
            phase="preparing",
            manifest=self.manifest_path,
        )
        touched = [w for w in work if w.suspended or w.migrating or w.saved]
        results = await asyncio.gather(*(self._put_back(w) for w in touched))
        outcomes = {w.plan.name: r for w, r in zip(touched, results, strict=True)}
        for w in work:
            if w not in touched:
                outcomes[w.plan.name] = "untouched, still " + w.handle.facts.runstate
            if not w.stuck and mf.in_state_dir(w.record.state_file, self.config.state_dir):
                with contextlib.suppress(OSError):
                    os.unlink(w.record.state_file)
        for w in work:
            if w.error and w.plan.name in outcomes:
                outcomes[w.plan.name] = f"failed ({w.error}); {outcomes[w.plan.name]}"
        return outcomes

    async def resume(self) -> dict[str, str]:
        """Undo a prepared (or interrupted) save: every VM back as it was."""
        manifest = mf.read(self.manifest_path)
        if manifest.phase not in (Phase.PREPARING, Phase.PREPARED):
            raise StateError(f"nothing to resume: the manifest is in phase {manifest.phase.value}")
        await self.inventory.scan()
        by_socket = {str(h.conn.path): h for h in self.inventory.vms()}
        work = []
        outcomes: dict[str, str] = {}
        unreachable: list[VMRecord] = []
        for rec in manifest.vms:
            handle = by_socket.get(rec.qmp_socket)
            if handle is None or handle.conn.pid != rec.pid:
                if _alive(rec.pid) and handle is None:
                    unreachable.append(rec)
                    outcomes[rec.name] = (
                        f"its QEMU (pid {rec.pid}) lives but its monitor cannot be reached "
                        "(is cprd.service running? use cprdctl resume): kept in the manifest"
                    )
                else:
                    outcomes[rec.name] = "not connected: its QEMU is gone or was replaced"
                continue
            plan = VMPlan(rec.name, rec.cprd_suspended, bool(rec.in_place), rec.settings, 0)
            work.append(_Work(handle, plan, rec, suspended=rec.cprd_suspended, saved=True))
        results = await asyncio.gather(*(self._put_back(w) for w in work))
        outcomes.update({w.plan.name: r for w, r in zip(work, results, strict=True)})
        self._keep_stuck(manifest, [w.record for w in work if w.stuck] + unreachable)
        return outcomes

    def _keep_stuck(self, manifest: Manifest, stuck: list[VMRecord]) -> None:
        """Remove the manifest, or keep in it (phase preparing) the VMs not put back."""
        if not stuck:
            mf.remove(self.manifest_path)
            return
        kept = manifest.replace(phase=Phase.PREPARING, vms=tuple(stuck))
        mf.write(self.manifest_path, kept)

    # --- commit -------------------------------------------------------------------------

    async def commit(self) -> Manifest:
        """Quit the saved QEMUs; the manifest says committed before the first quit."""
        manifest = mf.read(self.manifest_path)
        if manifest.phase is not Phase.PREPARED:
            raise StateError(
                f"cannot commit: the manifest is in phase {manifest.phase.value}", "prepare first"
            )
        await self.inventory.scan()
        by_socket = {str(h.conn.path): h for h in self.inventory.vms()}
        handles = []
        for rec in manifest.vms:
            handle = by_socket.get(rec.qmp_socket)
            if handle is None or handle.conn.pid != rec.pid:
                raise StateError(f"{rec.name}: its QEMU is no longer the one that was saved")
            status = str((await handle.conn.execute("query-status"))["status"])
            if status != "postmigrate":
                raise StateError(
                    f"{rec.name}: runstate {status!r}, not postmigrate: not committing"
                )
            rec = pin_record(self.inventory, handle, rec)  # TrustError if it changed
            manifest = manifest.with_vm(rec)
            handles.append((rec, handle))
        manifest = manifest.replace(phase=Phase.COMMITTED)
        mf.write(self.manifest_path, manifest)
        await asyncio.gather(*(self._quit(rec, h) for rec, h in handles))
        os.sync()
        emit(
            logger,
            logging.INFO,
            Event.COMMITTED,
            "committed: %d QEMUs quit; restore after the reboot",
            len(handles),
            phase="committed",
            manifest=self.manifest_path,
        )
        return manifest

    async def _quit(self, rec: VMRecord, handle: VMHandle) -> None:
        with contextlib.suppress(QMPError):
            await handle.conn.execute("quit")
        await wait_exit(rec.pid, 30)
        for f in rec.in_place:
            with contextlib.suppress(OSError):
                mf.fsync_file(Path(f.path))


async def wait_exit(pid: int, timeout: float) -> bool:
    """Wait for a process to exit (it is not our child: poll /proc)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return True
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return True
        await asyncio.sleep(0.05)
    return False


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _free_bytes(path: Path) -> int:
    probe = path
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free


__all__ = ["Outcome", "Saver", "wait_exit"]
