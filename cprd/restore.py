"""Restore: bring every VM of a committed manifest back where it stopped.

Per VM, in the order of :func:`restore_waves` and in parallel (bounded): check the
state file, the executable and any in-place memory file; relaunch QEMU with the recorded
argv (``-incoming`` replaced by ``-incoming defer``, the machine type pinned to the
recorded versioned type); set the same migration settings as the save;
``migrate-incoming``; wake the guest when cprd suspended it.  Each outcome is written to
the manifest at once, so a second run skips the restored VMs and retries the failed
ones.  A state file is deleted only once its VM is confirmed back.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import signal
import stat
from collections.abc import Callable, Collection, Iterable, Sequence
from pathlib import Path

from cprd import manifest as mf
from cprd import statefile
from cprd.config import Config
from cprd.errors import (
    LaunchError,
    ManifestError,
    MonitorBusyError,
    QMPError,
    RestoreError,
    TrustError,
)
from cprd.hosts import RunAs, disk_changes, identify, relaunch_argv, relaunch_as
from cprd.launch import Launcher, UnitLauncher, make_launcher
from cprd.log import Event, emit
from cprd.manifest import Journal, Manifest, Outcome, Phase, VMRecord
from cprd.qmp import QMPConnection
from cprd.settle import Settler
from cprd.steps import Action, Intent
from cprd.trust import binary_dir_problem, check_binary

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[str, str, int, int], None]


def restore_waves(records: Iterable[VMRecord]) -> list[list[str]]:
    """The order of a restore (pure): one wave per ``restore_priority``, the highest
    first; a wave starts once every VM of the one before is back or failed, so that an
    operator can bring up first what other VMs need.  Within a wave the smallest state
    first, then by name: the disk reads the same in aggregate for one restore or several
    (measured), so the VMs whose state is small (RAM left in place) take the first slots
    and are back at once instead of sharing the disk with the big ones."""
    waves: dict[int, list[VMRecord]] = {}
    for rec in records:
        waves.setdefault(rec.restore_priority, []).append(rec)
    return [
        [r.name for r in sorted(recs, key=lambda r: (r.state_size or 0, r.name))]
        for _, recs in sorted(waves.items(), key=lambda kv: -kv[0])
    ]


def check_files(rec: VMRecord, state_dir: Path) -> None:
    """Refuse a VM whose state would be incomplete, whose state file lies outside
    state_dir, or whose QEMU binary is not the one pinned at commit; RestoreError."""
    if not mf.in_state_dir(rec.state_file, state_dir):
        raise RestoreError(
            f"{rec.name}: state file {rec.state_file} is not inside state_dir {state_dir}: "
            "refused (a manifest may only name files in state_dir)"
        )
    if rec.state_size is None:
        raise RestoreError(f"{rec.name}: never saved completely: refusing to start it")
    try:
        fd = mf.open_nofollow(Path(rec.state_file))
    except FileNotFoundError:
        raise RestoreError(f"{rec.name}: state file {rec.state_file} is missing") from None
    except ManifestError as err:
        raise RestoreError(f"{rec.name}: {err}") from None
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_size != rec.state_size:
        raise RestoreError(
            f"{rec.name}: state file {rec.state_file} has {st.st_size} bytes, "
            f"expected {rec.state_size}"
        )
    check_executable(rec)
    for f in rec.in_place:
        try:
            st = os.stat(f.path)
        except OSError:
            raise RestoreError(
                f"{rec.name}: in-place memory {f.path} ({f.id}) is gone: its RAM is lost, "
                "refusing to start the VM from half a state"
            ) from None
        if stat.S_ISREG(st.st_mode) and st.st_size < f.size:
            raise RestoreError(
                f"{rec.name}: in-place memory {f.path} has {st.st_size} bytes, expected {f.size}"
            )


def check_executable(rec: VMRecord) -> None:
    """The QEMU binary a restore starts: present, owned by root and not writable by group
    or others, and the file pinned when the VM was saved (not replaced since)."""
    if not os.access(rec.executable, os.X_OK):
        raise RestoreError(f"{rec.name}: QEMU executable {rec.executable} is missing")
    try:
        pinned = check_binary(rec.executable)
    except TrustError as err:
        raise RestoreError(f"{rec.name}: {err}") from err
    if rec.exe_dev is not None and pinned != (rec.exe_dev, rec.exe_ino):
        # Replaced since the commit.  Updating QEMU across the reboot is what cprd is
        # for (a package upgrade writes a new inode), so the new file is accepted when
        # only root could have put it there; otherwise it is refused.
        problem = binary_dir_problem(rec.executable)
        if problem is not None:
            raise RestoreError(
                f"{rec.name}: QEMU executable {rec.executable} is not the file pinned at "
                f"commit (replaced since), and {problem}: refused"
            )
        logger.warning(
            "QEMU executable %s was replaced since the commit (a QEMU update): starting the "
            "new one, which only root could have installed",
            rec.executable,
            extra={"CPRD_VM": rec.name},
        )


def check_disks(rec: VMRecord, ignore: bool = False) -> None:
    """Refuse a VM whose disk images changed since its QEMU quit at commit (CPR.rst:
    guest block devices must not be modified between the quit and the restart);
    RestoreError naming the image.  ``ignore``: log the changes and go on."""
    changes = disk_changes(rec.disks, {d.path: identify(d.path) for d in rec.disks})
    if not changes:
        return
    if ignore:
        logger.warning(
            "disk images changed, restoring anyway: %s",
            "; ".join(changes),
            extra={"CPRD_VM": rec.name},
        )
        return
    raise RestoreError(
        f"{rec.name}: disk image changed since the save: {'; '.join(changes)} (state kept; "
        f"`cprd restore --ignore-disk-changes {rec.name}` restores it anyway)",
        "restore it over the disk images it saw, or override if the change is known safe",
    )


def run_as(rec: VMRecord) -> RunAs:
    """As whom and where VM ``rec`` is relaunched (:func:`cprd.hosts.relaunch_as`);
    RestoreError when its recorded working directory is gone (VM not started, state
    kept)."""
    how = relaunch_as(rec.process, rec.argv)
    if not os.path.isdir(how.cwd):
        raise RestoreError(
            f"{rec.name}: its working directory {how.cwd} is gone (state kept)",
            "create the directory again (owned as before), then run the restore again",
        )
    return how


class Restorer:
    def __init__(
        self,
        config: Config,
        manifest_path: Path | None = None,
        launcher: Launcher | None = None,
        progress: ProgressCallback | None = None,
        ignore_disk_changes: Collection[str] = (),
        units: UnitLauncher | None = None,
    ) -> None:
        self.config = config
        self.manifest_path = manifest_path or config.manifest_path
        self.launcher = launcher or make_launcher(config)
        self.progress = progress or (lambda *_: None)
        self.ignore_disk_changes = frozenset(ignore_disk_changes)
        #: VMs that ran as the main process of a systemd service go back into it
        self.units = units or UnitLauncher()

    async def run(self) -> Manifest:
        """Restore every pending or failed VM; return the updated manifest.

        Each VM goes through the step journal (restoring, then restored) and
        :func:`cprd.steps.decide` with the restore intent: a VM shut down before the kexec
        is cold-booted, a VM whose QEMU still serves its socket is never started twice."""
        for name in mf.sweep_temporaries(self.manifest_path):
            logger.info("removed %s, left by a writer killed mid-write", name)
        journal = Journal.load(self.manifest_path)
        manifest = journal.manifest
        if manifest.phase in (Phase.PREPARING, Phase.PREPARED):
            raise ManifestError(
                f"manifest {self.manifest_path} is in phase {manifest.phase.value}: "
                "its VMs were never committed",
                "resume them with `cprdctl resume`",
            )
        pending = [r for r in manifest.vms if r.outcome is not Outcome.RESTORED]
        todo = {r.name for r in pending}
        waves = restore_waves(pending)
        settler = Settler(self.config, journal, self.start)
        # Operator units (not transient ones): the generator's drop-ins must be loaded
        # before and dropped after (one daemon-reload each way).
        units = [
            r.unit.name
            for r in manifest.vms
            if r.name in todo and r.unit is not None and not r.unit.transient
        ]
        try:
            if units:
                try:
                    await self.units.begin(units)
                except LaunchError as err:  # each of those VMs then fails on its own
                    logger.warning("cannot prepare the VMs' systemd units: %s", err)
            for wave in waves:
                await self._wave(settler, wave)
        finally:
            await settler.close()
            if units:
                failed = [
                    r.unit.name
                    for r in journal.manifest.vms
                    if r.unit is not None
                    and r.unit.name in units
                    and r.outcome is not Outcome.RESTORED
                ]
                try:
                    await self.units.end(failed)
                except LaunchError as err:
                    logger.warning("cannot reload systemd after the restore: %s", err)
        if all(r.outcome is Outcome.RESTORED for r in journal.manifest.vms):
            journal.phase(Phase.RESTORED)
        return journal.manifest

    async def _wave(self, settler: Settler, names: Sequence[str]) -> None:
        """Restore ``names`` in this order, at most restore.concurrency at a time: each
        worker takes the next VM when its last one is settled."""
        queue = collections.deque(names)

        async def worker() -> None:
            while queue:
                await self._one(settler, queue.popleft())

        async with asyncio.TaskGroup() as group:
            for n in range(min(self.config.restore.concurrency, len(names))):
                group.create_task(worker(), name=f"restore-worker-{n}")

    async def _one(self, settler: Settler, name: str) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.restore.timeout_s
        res = await settler.settle(name, Intent.RESTORE, deadline)
        rec = res.record
        if res.decision.action is Action.DONE:
            rec = rec.replace(outcome=Outcome.RESTORED, reason=rec.reason or res.describe())
            settler.journal.put(rec)
            keep = self.config.restore.keep_state_files
            inside = mf.in_state_dir(rec.state_file, self.config.state_dir)
            if not keep and inside and rec.state_size is not None:
                with contextlib.suppress(OSError):
                    os.unlink(rec.state_file)
            return
        reason = res.describe()
        if res.decision.action is Action.LOST and rec.state_size is not None:
            try:
                check_files(rec, self.config.state_dir)  # what exactly is wrong with it
            except RestoreError as err:
                reason = str(err).removeprefix(f"{name}: ")
        emit(
            logger,
            logging.ERROR,
            Event.VM_RESTORE_FAILED,
            "restore failed: %s (state file kept)",
            reason,
            vm=name,
            phase="restoring",
            manifest=self.manifest_path,
        )
        settler.journal.put(rec.replace(outcome=Outcome.FAILED, reason=reason))

    async def start(self, rec: VMRecord, cold: bool) -> tuple[str, int]:
        """Start VM ``rec`` in a new QEMU, from its state file or (``cold``) from its argv
        alone; return (its runstate, its pid)."""
        if cold:
            return await self.cold_boot(rec)
        return await self.restore_vm(rec)

    async def restore_vm(self, rec: VMRecord) -> tuple[str, int]:
        """Relaunch one VM from its state file; return (its final runstate, its pid)."""
        check_files(rec, self.config.state_dir)
        check_disks(rec, rec.name in self.ignore_disk_changes)
        how = run_as(rec)
        await self._refuse_if_running(rec)
        argv = relaunch_argv(rec.argv, rec.machine_type)
        self.progress(rec.name, "launching", 0, rec.state_size or 0)
        launcher = self._launcher_for(rec)
        if rec.unit is not None:
            process = await self.units.launch(rec.name, rec.executable, argv, unit=rec.unit)
        else:
            process = await launcher.launch(rec.name, rec.executable, argv, how)
        conn: QMPConnection | None = None
        try:
            conn = await self._connect(rec, process, launcher)
            for cmd, args in rec.settings.commands():
                await conn.execute(cmd, args)
            # cprd opens the state file and hands it over: the QEMU may run as any user.
            direct = statefile.uses_direct_io(rec.settings.parameters)
            fds = statefile.open_fds(Path(rec.state_file), write=False, direct=direct)
            try:
                fdset = await statefile.add_fdset(conn, fds, f"cprd-restore-{rec.name}", 10)
            finally:
                statefile.close(fds)
            await conn.execute("migrate-incoming", {"uri": f"file:/dev/fdset/{fdset}"})
            await self._wait_incoming(rec, conn)
            await statefile.remove_fdset(conn, fdset, 10)
            final = await self._finish(rec, conn)
        except BaseException:
            await launcher.stop(process)
            raise
        finally:
            if conn is not None:
                await conn.close()
        emit(
            logger,
            logging.INFO,
            Event.VM_RESTORED,
            "restored: %s (QEMU pid %d)",
            final,
            process.pid,
            vm=rec.name,
            phase="restoring",
            manifest=self.manifest_path,
        )
        return final, process.pid

    async def cold_boot(self, rec: VMRecord) -> tuple[str, int]:
        """Boot a VM that was shut down before the kexec from its recorded argv."""
        check_executable(rec)
        how = run_as(rec)
        await self._refuse_if_running(rec)
        argv = relaunch_argv(rec.argv, rec.machine_type)[:-2]  # without -incoming defer
        launcher = self._launcher_for(rec)
        if rec.unit is not None and not rec.unit.transient:
            process = await self.units.start_plain(rec.name, rec.unit.name)  # as written
        elif rec.unit is not None:
            process = await self.units.launch(rec.name, rec.executable, argv, unit=rec.unit)
        else:
            process = await launcher.launch(rec.name, rec.executable, argv, how)
        try:
            conn = await self._connect(rec, process, launcher)
        except BaseException:
            await launcher.stop(process)
            raise
        try:
            status = await _wait_status(conn, lambda s: s not in ("inmigrate", "prelaunch"), 30)
        finally:
            await conn.close()
        emit(
            logger,
            logging.INFO,
            Event.VM_RESTORED,
            "booted again (it was shut down before the kexec): %s (QEMU pid %d)",
            status,
            process.pid,
            vm=rec.name,
            phase="restoring",
            manifest=self.manifest_path,
        )
        return f"cold-booted: {status}", process.pid

    def _launcher_for(self, rec: VMRecord) -> Launcher:
        return self.units if rec.unit is not None else self.launcher

    async def _refuse_if_running(self, rec: VMRecord) -> None:
        """Never start a second QEMU beside a live one on the same socket."""
        try:
            conn = await QMPConnection.open(Path(rec.qmp_socket), rec.name, timeout=2)
        except MonitorBusyError as err:
            # A live QEMU whose monitor another client holds: running, all the same.
            raise RestoreError(
                f"{rec.name}: a QEMU already serves {rec.qmp_socket} (its monitor is busy)"
            ) from err
        except QMPError:
            return
        await conn.close()
        raise RestoreError(f"{rec.name}: a QEMU (pid {conn.pid}) already serves {rec.qmp_socket}")

    async def _connect(
        self, rec: VMRecord, process: Launcher.Process, launcher: Launcher
    ) -> QMPConnection:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        last = ""
        while loop.time() < deadline:
            if not await launcher.alive(process):
                raise RestoreError(f"{rec.name}: QEMU exited at start: {launcher.tail(process)}")
            try:
                conn = await QMPConnection.open(Path(rec.qmp_socket), rec.name, timeout=5)
            except QMPError as err:
                last = str(err)
                await asyncio.sleep(0.05)
                continue
            if process.pid and conn.pid != process.pid:
                await conn.close()
                raise RestoreError(f"{rec.name}: {rec.qmp_socket} is served by pid {conn.pid}")
            return conn
        raise RestoreError(f"{rec.name}: QMP socket never came up: {last}")

    async def _wait_incoming(self, rec: VMRecord, conn: QMPConnection) -> None:
        total = rec.state_size or 0
        while True:
            # QEMU loads a state file in its main loop and answers no monitor command
            # until the load is done (seen: 10 s and more for 540 MB on a loaded host):
            # the first reply may take as long as the whole restore is allowed to.
            info = await conn.execute("query-migrate", timeout=self.config.restore.timeout_s)
            status = info.get("status", "none")
            if status == "completed":
                self.progress(rec.name, "restored", total, total)
                return
            if status in ("failed", "cancelled"):
                raise RestoreError(
                    f"{rec.name}: incoming migration {status}: {info.get('error-desc', '?')}"
                )
            done = int(info.get("ram", {}).get("transferred", 0))
            self.progress(rec.name, "loading", done, total)
            await asyncio.sleep(0.05)

    async def _finish(self, rec: VMRecord, conn: QMPConnection) -> str:
        status = await _wait_status(conn, lambda s: s not in ("inmigrate", "finish-migrate"), 30)
        if rec.cprd_suspended:
            if status != "suspended":
                raise RestoreError(f"{rec.name}: came back {status!r}, expected 'suspended'")
            await conn.execute("system_wakeup")
            status = await _wait_status(conn, lambda s: s == "running", 30)
            return "running (woken)"
        expected = {"running": "running", "suspended": "suspended", "paused": "paused"}
        want = expected.get(rec.runstate_before, rec.runstate_before)
        if rec.settings.live and status == "paused" and want == "running":
            # A live save's VM was stopped by cprd for its last pass (QMP stop), so the
            # state file says paused: continue it, as it ran.
            await conn.execute("cont")
        if status != want:
            status = await _wait_status(conn, lambda s: s == want, 10)
        return status


async def _wait_status(conn: QMPConnection, ok: Callable[[str], bool], timeout: float) -> str:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        status = str((await conn.execute("query-status"))["status"])
        if ok(status):
            return status
        if loop.time() > deadline:
            raise RestoreError(f"{conn.name}: runstate {status!r} after {timeout:g}s")
        await asyncio.sleep(0.05)


def kill_quietly(pid: int) -> None:
    with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGKILL)
