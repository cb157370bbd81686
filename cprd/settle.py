"""Settle a VM: observe it, :func:`cprd.steps.decide`, record the step, act; repeat.

The one loop behind rollback, resume, commit, crash recovery and restore.  Each round
reads what QEMU reports now (:meth:`Settler.observe`), asks the pure decision function
what to do, records the step in the journal *before* taking it, then takes it.  It ends
when the decision is final (done, kept, lost), after a bounded number of failed actions
(kept), or at the caller's deadline.

An action that only puts a VM back towards running (cancel a migration, ``cont``, wake)
is taken even when the journal cannot be written (a full disk): a crash then leaves an
older step on record, from which :func:`decide` reaches the same place.  An action that
gives up a live copy of a VM (quit, kill, reload, shutdown) never is.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import os
import signal
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cprd import manifest as mf
from cprd.config import Config
from cprd.errors import CprdError, MonitorBusyError, QMPError
from cprd.hosts import identify_all
from cprd.log import Event, emit
from cprd.manifest import Journal, VMRecord
from cprd.qmp import QMPConnection
from cprd.steps import Action, Decision, Facts, Intent, Qemu, Seen, Step, decide

logger = logging.getLogger(__name__)

#: Actions taken even when the journal cannot be written (see the module docstring).
SAFE_UNRECORDED = frozenset({Action.CANCEL, Action.CONT, Action.WAKE, Action.WAIT})
#: Failed actions after which a VM is kept as it is.
MAX_ERRORS = 3
POLL = 0.1

#: Looks up the connection the inventory holds to a socket (or None).
ConnLookup = Callable[[str], QMPConnection | None]
#: Starts a VM from its record: (record, cold) -> (final runstate, pid).
Launch = Callable[[VMRecord, bool], "asyncio.Future[tuple[str, int]] | object"]


@dataclass(frozen=True)
class Settled:
    name: str
    decision: Decision
    record: VMRecord
    error: str = ""

    @property
    def running(self) -> bool:
        return self.decision.action is Action.DONE and self.record.step in (
            Step.RESUMED,
            Step.RESTORED,
            Step.PLANNED,
        )

    def describe(self) -> str:
        """What happened, in one line: what went wrong if it did not settle well."""
        if self.error and self.decision.action is not Action.DONE:
            return self.error
        return self.decision.why


def alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie (it need not be our child)."""
    if pid <= 0:
        return False
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return text.rsplit(")", 1)[1].split()[0] != "Z"


async def wait_exit(pid: int, timeout: float) -> bool:
    """Wait for a process to exit (it is not our child: poll /proc)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while alive(pid):
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(0.05)
    return True


def state_complete(rec: VMRecord) -> bool:
    """The state file exists, is a regular file, and has the size recorded at its save."""
    if rec.state_size is None:
        return False
    try:
        st = os.lstat(rec.state_file)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_size == rec.state_size


def facts_of(rec: VMRecord) -> Facts:
    return Facts(
        rec.step, rec.runstate_before, rec.cprd_suspended, rec.on_kexec_failure, rec.shutdown_asked
    )


class Settler:
    """Drives VMs of one journal towards an intent."""

    def __init__(
        self,
        config: Config,
        journal: Journal,
        launch: Callable[[VMRecord, bool], object],
        lookup: ConnLookup | None = None,
        exclude: set[Path] | None = None,
    ) -> None:
        self.config = config
        self.journal = journal
        #: async (record, cold) -> (final runstate, pid): the Restorer's relaunch
        self._launch = launch
        self._lookup = lookup or (lambda _socket: None)
        #: sockets the inventory leaves alone while cprd starts a QEMU on them
        self._exclude = exclude if exclude is not None else set()
        self._own: dict[str, QMPConnection] = {}
        self.same_boot = journal.manifest.boot_id == mf.boot_id()

    @property
    def qmp_timeout(self) -> float:
        return float(self.config.save.qmp_timeout_s)

    async def close(self) -> None:
        for conn in self._own.values():
            await conn.close()
        self._own.clear()

    # --- observing ----------------------------------------------------------------------

    async def _conn(self, rec: VMRecord) -> QMPConnection | None:
        """A live connection to the recorded QEMU, or None."""
        conn = self._lookup(rec.qmp_socket)
        if conn is not None and not conn.closed.is_set() and conn.pid == rec.pid:
            return conn
        own = self._own.get(rec.name)
        if own is not None and not own.closed.is_set() and own.pid == rec.pid:
            return own
        if own is not None:
            await own.close()
            del self._own[rec.name]
        try:
            own = await QMPConnection.open(Path(rec.qmp_socket), rec.name, self.qmp_timeout)
        except QMPError:
            return None
        if own.pid != rec.pid:
            await own.close()
            return None
        self._own[rec.name] = own
        return own

    async def observe(self, rec: VMRecord) -> Seen:
        complete = state_complete(rec)
        if self.same_boot and alive(rec.pid):
            conn = await self._conn(rec)
            if conn is None:
                return Seen(Qemu.HUNG if alive(rec.pid) else Qemu.GONE, state_complete=complete)
            try:
                status = await conn.execute("query-status", timeout=self.qmp_timeout)
                migration = await conn.execute("query-migrate", timeout=self.qmp_timeout)
                runstate = _field(status, "status")
                mig = _field(migration, "status", "none")
            except QMPError:
                return Seen(Qemu.HUNG if alive(rec.pid) else Qemu.GONE, state_complete=complete)
            return Seen(Qemu.UP, runstate, mig, complete)
        return await self._other(rec, complete)

    async def _other(self, rec: VMRecord, complete: bool) -> Seen:
        """The recorded QEMU is gone: does another one serve the VM's socket?"""
        conn = self._lookup(rec.qmp_socket)
        owned = False
        # The inventory may still hold its link to the QEMU that just quit (its end of
        # the socket not yet seen closed): that is not another QEMU.
        if conn is None or conn.closed.is_set() or not alive(conn.pid):
            try:
                conn = await QMPConnection.open(Path(rec.qmp_socket), rec.name, timeout=2)
            except MonitorBusyError:
                return Seen(Qemu.OTHER, state_complete=complete)
            except QMPError:
                return Seen(Qemu.GONE, state_complete=complete)
            owned = True
        try:
            status = await conn.execute("query-status", timeout=self.qmp_timeout)
            runstate = _field(status, "status")
            if runstate == "inmigrate" and await self._discard_orphan(rec, conn):
                return Seen(Qemu.GONE, state_complete=complete)
            return Seen(Qemu.OTHER, runstate, state_complete=complete)
        except QMPError:
            return Seen(Qemu.OTHER, state_complete=complete)
        finally:
            if owned:
                await conn.close()

    async def _discard_orphan(self, rec: VMRecord, conn: QMPConnection) -> bool:
        """A QEMU that an interrupted reload or restore of this VM started (cprd was
        killed meanwhile) and left waiting for an incoming state nobody will send: its
        command line ends in ``-incoming defer`` and no incoming migration was asked for.
        It holds nothing of the VM (the complete state file does): kill it, so that the
        state file can be loaded again instead of the VM being kept forever."""
        if rec.step not in (Step.RELOADING, Step.RESTORING) or not rec.state_size:
            return False
        try:
            raw = Path(f"/proc/{conn.pid}/cmdline").read_bytes()
        except OSError:
            return False
        argv = raw.split(b"\0")[:-1]
        if argv[-2:] != [b"-incoming", b"defer"] or rec.qmp_socket.encode() not in raw:
            return False
        migration = await conn.execute("query-migrate", timeout=self.qmp_timeout)
        if _field(migration, "status", "none") != "none":
            return False
        emit(
            logger,
            logging.WARNING,
            Event.FAILURE,
            "QEMU pid %d, left waiting for its state by an interrupted %s: killing it",
            conn.pid,
            rec.step.value,
            vm=rec.name,
        )
        with contextlib.suppress(ProcessLookupError):
            os.kill(conn.pid, signal.SIGKILL)
        return await wait_exit(conn.pid, 10)

    # --- the loop -----------------------------------------------------------------------

    async def settle(self, name: str, intent: Intent, deadline: float | None = None) -> Settled:
        """Drive VM ``name`` towards ``intent`` until it is settled; never raises a
        CprdError or OSError (they end as a kept VM), nor anything from a failed action."""
        loop = asyncio.get_running_loop()
        errors: list[str] = []
        launched = False
        while True:
            rec = self.journal.vm(name)
            try:
                seen = await self.observe(rec)
            except Exception as err:  # observing must not end the loop either
                errors.append(f"cannot observe: {err}")
                seen = Seen(Qemu.HUNG if alive(rec.pid) else Qemu.GONE)
            decision = decide(facts_of(rec), seen, intent)
            if decision.action is Action.DONE and self._entering_s3(rec, seen):
                decision = Decision(Action.WAIT, "guest-suspend-ram sent: it may yet reach S3")
            logger.debug("%s: %s -> %s (%s)", name, seen, decision.action.value, decision.why)
            if decision.action in (Action.LAUNCH, Action.COLD_BOOT) and launched:
                # One start per settle: a second would fail the same way.
                return Settled(name, Decision(Action.KEEP, decision.why), rec, "; ".join(errors))
            if len(errors) >= MAX_ERRORS or (deadline is not None and loop.time() > deadline):
                why = "did not settle in time" if len(errors) < MAX_ERRORS else "gave up"
                final = decision if decision.final else Decision(Action.KEEP, why)
                return Settled(name, final, rec, "; ".join(errors[-MAX_ERRORS:]))
            try:
                if decision.to is not None and decision.action not in (
                    Action.FINISH_SAVE,
                    Action.MARK,
                ):
                    rec = self._record(rec, decision)
                if decision.final:
                    return Settled(name, decision, rec, "; ".join(errors))
                launched |= decision.action in (Action.LAUNCH, Action.COLD_BOOT)
                await self._act(decision, rec)
            except asyncio.CancelledError:
                raise
            except Exception as err:
                msg = (str(err) or type(err).__name__).removeprefix(f"{name}: ")
                errors.append(msg)
                emit(
                    logger,
                    logging.ERROR,
                    Event.FAILURE,
                    "%s failed: %s",
                    decision.action.value,
                    msg,
                    vm=name,
                )
                await asyncio.sleep(POLL)

    def _entering_s3(self, rec: VMRecord, seen: Seen) -> bool:
        """guest-suspend-ram was (or was about to be) sent and the guest still runs: it
        may yet enter S3, and a VM called running now would then stay asleep.  Wait for
        it until save.suspend_timeout_s after the step was recorded (then wake it)."""
        if rec.step is not Step.SUSPENDING or seen.qemu is not Qemu.UP:
            return False
        if seen.runstate != "running" or not rec.history:
            return False
        step, at = rec.history[-1]
        try:
            since = datetime.datetime.fromisoformat(at)
        except ValueError:
            return False
        age = (datetime.datetime.now(datetime.UTC) - since).total_seconds()
        return step == Step.SUSPENDING.value and age < self.config.save.suspend_timeout_s

    def _record(self, rec: VMRecord, decision: Decision) -> VMRecord:
        assert decision.to is not None
        try:
            return self.journal.step(rec.name, decision.to)
        except OSError:
            if decision.action not in SAFE_UNRECORDED:
                raise
            logger.warning("cannot record %s for %s; acting anyway", decision.to.value, rec.name)
            return rec

    # --- acting -------------------------------------------------------------------------

    async def _act(self, d: Decision, rec: VMRecord) -> None:
        name = rec.name
        action = d.action
        if action is Action.WAIT:
            await asyncio.sleep(POLL)
            return
        if action is Action.MARK:
            assert d.to is not None
            if d.to is Step.COMMITTED:
                _fsync_in_place(rec)
                # Its QEMU has exited: the images are as the guest will find them.
                self.journal.step(name, d.to, disks=identify_all(rec.disks))
                return
            self.journal.step(name, d.to)
            return
        if action is Action.FINISH_SAVE:
            size = mf.fsync_file(Path(rec.state_file))
            mf.fsync_dir(Path(rec.state_file).parent)
            self.journal.step(name, Step.SAVED, state_size=size)
            return
        if action in (Action.LAUNCH, Action.COLD_BOOT):
            sock = Path(rec.qmp_socket)
            self._exclude.add(sock)
            try:
                final, pid = await self._launch(rec, action is Action.COLD_BOOT)  # type: ignore[misc]
            finally:
                self._exclude.discard(sock)
            self.journal.step(name, Step.RESTORED, pid=pid, reason=final)
            return
        if action is Action.KILL:
            with contextlib.suppress(ProcessLookupError):
                os.kill(rec.pid, signal.SIGKILL)
            await wait_exit(rec.pid, 10)
            return
        conn = await self._conn(rec)
        if conn is None:
            raise QMPError(f"{name}: its monitor does not answer")
        if action is Action.CANCEL:
            with contextlib.suppress(QMPError):
                await conn.execute("migrate_cancel", timeout=self.qmp_timeout)
            await asyncio.sleep(POLL)
        elif action is Action.CONT:
            await conn.execute("cont", timeout=self.qmp_timeout)
            emit(logger, logging.INFO, Event.VM_RESUMED, "put back: continued", vm=name)
        elif action is Action.WAKE:
            await conn.execute("system_wakeup", timeout=self.qmp_timeout)
            emit(logger, logging.INFO, Event.VM_RESUMED, "put back: woken", vm=name)
        elif action in (Action.QUIT, Action.RELOAD):
            with contextlib.suppress(QMPError):  # the link drops as it quits
                await conn.execute("quit", timeout=self.qmp_timeout)
            if not await wait_exit(rec.pid, self.config.save.quit_timeout_s):
                raise CprdError(
                    f"{name}: QEMU pid {rec.pid} did not exit "
                    f"{self.config.save.quit_timeout_s}s after quit"
                )
        elif action is Action.SHUTDOWN:
            await self._shutdown(conn, rec)
        else:  # pragma: no cover - decide() returns no other action
            raise CprdError(f"{name}: no way to {action.value}")

    async def _shutdown(self, conn: QMPConnection, rec: VMRecord) -> None:
        """system_powerdown, wait for the guest to power off, then quit."""
        emit(
            logger,
            logging.WARNING,
            Event.VM_SHUTDOWN,
            "could not be saved: shutting it down cleanly (%s)",
            rec.reason or "on_kexec_failure: shutdown",
            vm=rec.name,
        )
        await conn.execute("system_powerdown", timeout=self.qmp_timeout)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.save.shutdown_timeout_s
        while loop.time() < deadline and alive(rec.pid):
            try:
                status = await conn.execute("query-status", timeout=self.qmp_timeout)
            except QMPError:
                break
            if _field(status, "status") == "shutdown":
                break
            await asyncio.sleep(0.2)
        with contextlib.suppress(QMPError):
            await conn.execute("quit", timeout=self.qmp_timeout)
        if not await wait_exit(rec.pid, self.config.save.quit_timeout_s):
            with contextlib.suppress(ProcessLookupError):
                os.kill(rec.pid, signal.SIGKILL)
            await wait_exit(rec.pid, 10)


def _field(reply: object, key: str, default: str | None = None) -> str:
    """A string field of a QMP reply; QMPError when the reply is not what QEMU sends."""
    if isinstance(reply, dict):
        value = reply.get(key, default)
        if isinstance(value, str):
            return value
    raise QMPError(f"unexpected QMP reply: no string {key!r} in {str(reply)[:80]!r}")


def _fsync_in_place(rec: VMRecord) -> None:
    """RAM left in place must be on disk before the VM counts as committed."""
    for f in rec.in_place:
        try:
            mf.fsync_file(Path(f.path))
        except OSError as err:
            raise CprdError(
                f"{rec.name}: in-place memory {f.path} could not be synced: {err.strerror}"
            ) from err


async def settle_all(
    settler: Settler, names: list[str], intent: Intent, timeout: float
) -> dict[str, Settled]:
    """Settle VMs in parallel; a VM whose settle raised (a failpoint, a bug) gets a second
    go, then is kept as it is.  Runs to the end even if the caller is cancelled meanwhile
    (the cancellation is raised afterwards)."""

    async def run() -> dict[str, Settled]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        out: dict[str, Settled] = {}
        todo = list(names)
        for attempt in range(2):
            results = await asyncio.gather(
                *(settler.settle(n, intent, deadline) for n in todo), return_exceptions=True
            )
            again = []
            for n, result in zip(todo, results, strict=True):
                if isinstance(result, Settled):
                    out[n] = result
                    continue
                logger.error("settling %s raised %r", n, result, extra={"CPRD_VM": n})
                if attempt == 0:
                    again.append(n)
                else:
                    rec = settler.journal.vm(n)
                    out[n] = Settled(n, Decision(Action.KEEP, "kept"), rec, repr(result))
            todo = again
            if not todo:
                break
        return out

    task = asyncio.ensure_future(run())
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await task  # finish putting every VM back first
        raise


__all__ = ["Settled", "Settler", "alive", "settle_all", "state_complete", "wait_exit"]
