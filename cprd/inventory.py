"""The inventory: a QMP connection to every QEMU the discovery globs match.

The inventory polls the globs for new and removed sockets, keeps one connection per
socket (reconnecting with backoff when QEMU restarts) and keeps each VM's facts current:
runstate changes arrive as QMP events and trigger a fresh look.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import glob
import logging
import os
import select
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from cprd.agent import Agent
from cprd.config import Config
from cprd.errors import CprdError, MonitorBusyError, QMPError, TrustError
from cprd.log import Event as LogEvent
from cprd.log import emit
from cprd.manifest import VMRecord
from cprd.qmp import Event, PeerCred, QMPConnection
from cprd.settle import alive
from cprd.trust import check_binary, path_problem, peer_problem
from cprd.vm import ProcIdentity, VMFacts, inspect, read_identity

logger = logging.getLogger(__name__)

#: Events after which the facts of a VM are read again.
RUNSTATE_EVENTS = frozenset(
    {"STOP", "RESUME", "SUSPEND", "WAKEUP", "SHUTDOWN", "RESET", "MIGRATION", "DEVICE_DELETED"}
)
BACKOFF_MAX = 30.0
#: Least time between two scans woken by QMP events: a guest that storms RESET, SUSPEND
#: or STOP events costs cprd at most this rate of re-inspections.
EVENT_SCAN_INTERVAL = 0.5


@dataclass
class VMHandle:
    """A connected VM: its QMP connection and latest facts.

    ``pidfd`` pins the QEMU process from discovery on (a pid can be reused, a pidfd
    cannot); ``identity`` is what /proc said of it then.  :meth:`Inventory.verify`
    compares both with the present before cprd quits or relaunches the VM."""

    conn: QMPConnection
    facts: VMFacts
    dirty: bool = False
    pidfd: int | None = None
    identity: ProcIdentity | None = None

    @property
    def name(self) -> str:
        return self.facts.name

    def close_pidfd(self) -> None:
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None

    def process_alive(self) -> bool:
        """Whether the pinned process still runs (a pidfd polls readable once it exits)."""
        if self.pidfd is None:
            return False
        poller = select.poll()
        poller.register(self.pidfd, select.POLLIN)
        return not poller.poll(0)

    def agent(self, timeout: float = 5.0) -> Agent | None:
        path = self.facts.agent_socket
        return Agent(Path(path), self.name, timeout) if path else None


def pin_record(inventory: Inventory, handle: VMHandle, rec: VMRecord) -> VMRecord:
    """Before commit quits a QEMU: refuse it unless it is still the process cprd
    inspected (:meth:`Inventory.verify`), with the argv recorded at prepare, and the
    file at its executable path the one pinned at prepare (root-owned, not writable by
    group or others); return ``rec`` with that binary pinned."""
    identity = inventory.verify(handle)
    if identity.argv != rec.argv:
        raise TrustError(f"{rec.name}: its command line is not the one recorded at prepare")
    try:
        binary = check_binary(rec.executable)
    except TrustError as err:
        raise TrustError(f"{rec.name}: {err}", err.hint) from err
    if rec.exe_dev is not None and binary != (rec.exe_dev, rec.exe_ino):
        raise TrustError(
            f"{rec.name}: its executable file {rec.executable} was replaced since prepare",
            "check the host; `cprdctl resume` puts the VMs back",
        )
    return rec.replace(exe_dev=binary[0], exe_ino=binary[1])


def pin_records(
    inventory: Inventory, records: Iterable[VMRecord]
) -> tuple[list[VMRecord], dict[str, TrustError]]:
    """:func:`pin_record` for every record whose QEMU the inventory holds (a QEMU gone or
    replaced is left to the caller): (pinned records, refusals by VM name)."""
    by_socket = {str(h.conn.path): h for h in inventory.vms()}
    pinned: list[VMRecord] = []
    refused: dict[str, TrustError] = {}
    for rec in records:
        handle = by_socket.get(rec.qmp_socket)
        if handle is None or handle.conn.pid != rec.pid:
            continue
        try:
            pinned.append(pin_record(inventory, handle, rec))
        except TrustError as err:
            refused[rec.name] = err
    return pinned, refused


@dataclass
class _Retry:
    attempts: int = 0
    next_at: float = 0.0
    last_error: str = ""
    busy: bool = False  # a live QEMU whose monitor another client holds
    refused: bool = False  # refused by the trust rules (cprd.trust)


@dataclass
class Inventory:
    config: Config
    poll_interval: float = 1.0
    on_change: Callable[[VMHandle | None, str], None] | None = None
    handles: dict[Path, VMHandle] = field(default_factory=dict)
    _retry: dict[Path, _Retry] = field(default_factory=dict)
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None
    #: one scan at a time: concurrent scans raced on the same sockets
    _scan_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    #: Sockets left alone (a restore is talking to them: QMP serves one client at a time).
    exclude: set[Path] = field(default_factory=set)

    # --- queries ------------------------------------------------------------------------

    def vms(self) -> list[VMHandle]:
        return sorted(self.handles.values(), key=lambda h: h.name)

    def by_name(self, name: str) -> VMHandle:
        for handle in self.handles.values():
            if handle.name == name:
                return handle
        raise CprdError(f"no VM named {name!r}")

    def sockets(self) -> list[Path]:
        found: set[Path] = set()
        for pattern in self.config.discovery.qmp_sockets:
            found.update(Path(p) for p in glob.glob(pattern))
        return sorted(found)

    # --- scanning -----------------------------------------------------------------------

    async def scan(self) -> None:
        """One pass: connect new sockets, drop dead ones, refresh changed facts."""
        async with self._scan_lock:
            await self._scan()

    async def _scan(self) -> None:
        present = set(self.sockets()) - self.exclude
        for path, handle in list(self.handles.items()):
            gone = path not in present and path not in self.exclude
            if handle.conn.closed.is_set() or gone:
                await self._drop(path, "QEMU went away" if path in present else "socket removed")
        now = time.monotonic()
        new = [
            p
            for p in present
            if p not in self.handles and self._retry.get(p, _Retry()).next_at <= now
        ]
        await asyncio.gather(*(self._connect(p) for p in new))
        for path in list(self._retry):
            if path not in present:
                del self._retry[path]
        dirty = [h for h in self.handles.values() if h.dirty and not h.conn.closed.is_set()]
        results = await asyncio.gather(*(self.refresh(h) for h in dirty), return_exceptions=True)
        for handle, result in zip(dirty, results, strict=True):
            if isinstance(result, CprdError | OSError):
                # Its QEMU may have just gone away: the next scan drops or retries it.
                handle.dirty = True
                logger.debug("refresh of %s failed: %s", handle.name, result)
            elif isinstance(result, BaseException):
                raise result

    async def resync(self, timeout: float = 20.0) -> None:
        """Make the picture true now, not at the next poll: drop every handle whose QEMU
        is gone (a VM reloaded or transferred into a new process), connect to every
        socket at once (no backoff, except monitors another client holds), and read every
        VM's facts again.  The end of each operation calls it, so that what ListVMs says
        when the operation returns is already true."""
        async with asyncio.timeout(timeout), self._scan_lock:
            for _ in range(2):  # a refresh may reveal a link that just closed: once more
                for path, handle in list(self.handles.items()):
                    if handle.conn.closed.is_set() or not alive(handle.conn.pid):
                        await self._drop(path, "QEMU went away")
                    else:
                        handle.dirty = True
                for retry in self._retry.values():
                    if not retry.busy:
                        retry.next_at = 0.0
                await self._scan()
                if not any(h.dirty or h.conn.closed.is_set() for h in self.handles.values()):
                    return

    def _check_peer(self, cred: PeerCred) -> None:
        """Refuse a QMP peer the trust rules do not accept (before its greeting is read)."""
        trusted = self.config.discovery.trusted_uids
        try:
            identity = read_identity(cred.pid)
        except TrustError as err:
            raise TrustError(f"refused: {err}") from err
        problem = peer_problem(cred.uid, identity.uids, identity.argv, trusted)
        if problem is not None:
            raise TrustError(f"refused: {problem}")

    async def _connect(self, path: Path) -> None:
        trusted = self.config.discovery.trusted_uids
        problem = path_problem(path, trusted)
        if problem is not None:
            self._backoff(path, f"refused: {problem}", refused=True)
            return
        try:
            conn = await QMPConnection.open(path, timeout=5.0, check=self._check_peer)
        except TrustError as err:
            self._backoff(path, str(err), refused=True)
            return
        except QMPError as err:
            self._backoff(path, str(err), busy=isinstance(err, MonitorBusyError))
            return
        pidfd: int | None = None
        try:
            pidfd = os.pidfd_open(conn.pid)
            facts = await self._inspect(conn)
            identity = facts.identity
            assert identity is not None
            # The facts were read from /proc/PID: they are the pidfd's process only if
            # it still runs now (its pid cannot have been reused while it ran).
            if not VMHandle(conn, facts, pidfd=pidfd).process_alive():
                raise QMPError(f"{path}: QEMU pid {conn.pid} exited during discovery")
            check_binary(f"/proc/{conn.pid}/exe")
        except TrustError as err:
            await conn.close()
            if pidfd is not None:
                os.close(pidfd)
            self._backoff(path, f"refused: {err}", refused=True)
            return
        except (CprdError, OSError) as err:
            await conn.close()
            if pidfd is not None:
                os.close(pidfd)
            self._backoff(path, str(err))
            return
        except BaseException:
            # A bug or a cancellation: do not keep the monitor (nor the pidfd) busy.
            await conn.close()
            if pidfd is not None:
                os.close(pidfd)
            raise
        self._retry.pop(path, None)
        conn.name = facts.name
        handle = VMHandle(conn, facts, pidfd=pidfd, identity=identity)
        conn.subscribe(functools.partial(self._on_event, handle))
        self.handles[path] = handle
        logger.info(
            "holding %s: QEMU %s pid %d, %s, %s",
            path,
            facts.version_str,
            facts.pid,
            facts.machine_type,
            facts.runstate,
            extra={"CPRD_VM": facts.name},
        )
        self._changed(handle, "added")

    def unreachable(self) -> dict[Path, str]:
        """Sockets the globs match whose QEMU lives but whose monitor another client holds:
        VMs cprd cannot save (a stale socket of a dead QEMU is not listed)."""
        return {p: r.last_error for p, r in self._retry.items() if r.busy or r.refused}

    def refused(self) -> dict[Path, str]:
        """Sockets the globs match that the trust rules refused, with the reason."""
        return {p: r.last_error for p, r in self._retry.items() if r.refused}

    def _backoff(self, path: Path, error: str, busy: bool = False, refused: bool = False) -> None:
        retry = self._retry.setdefault(path, _Retry())
        retry.busy = busy
        retry.refused = refused
        retry.attempts += 1
        delay = min(BACKOFF_MAX, 0.5 * 2 ** (retry.attempts - 1))
        retry.next_at = time.monotonic() + delay
        if error != retry.last_error:
            if refused:
                emit(
                    logger,
                    logging.WARNING,
                    LogEvent.REFUSED,
                    "%s: %s (see TRUST in cprd.yaml(5))",
                    path,
                    error,
                )
            else:
                logger.warning("%s: %s (retrying in %.1fs)", path, error, delay)
        retry.last_error = error

    def verify(self, handle: VMHandle) -> ProcIdentity:
        """Refuse (TrustError) a VM whose QEMU is not the process found at discovery:
        exited or replaced, its argv rewritten, its executable replaced, its credentials
        changed, or its binary no longer root-owned and unwritable by others."""
        name = handle.name
        pinned = handle.identity
        if pinned is None or not handle.process_alive():
            raise TrustError(f"{name}: its QEMU (pid {handle.facts.pid}) is gone or was replaced")
        try:
            now = read_identity(pinned.pid)
        except TrustError as err:
            raise TrustError(f"{name}: {err}") from err
        if not handle.process_alive():
            raise TrustError(f"{name}: its QEMU (pid {pinned.pid}) exited")
        changes = pinned.changes(now)
        if changes:
            raise TrustError(
                f"{name}: its QEMU is not the process cprd inspected: {'; '.join(changes)}",
                "check the host; `cprdctl resume` puts the VMs back",
            )
        try:
            dev_ino = check_binary(f"/proc/{pinned.pid}/exe")
        except TrustError as err:
            raise TrustError(f"{name}: {err}", err.hint) from err
        if dev_ino != (pinned.exe_dev, pinned.exe_ino):
            raise TrustError(f"{name}: its executable file was replaced")
        return now

    async def _drop(self, path: Path, why: str) -> None:
        handle = self.handles.pop(path, None)
        if handle is None:
            return
        await handle.conn.close()
        handle.close_pidfd()
        logger.info("released %s: %s", path, why, extra={"CPRD_VM": handle.name})
        self._changed(handle, "removed")

    async def _inspect(self, conn: QMPConnection) -> VMFacts:
        facts = await inspect(conn)
        agent = self.config.agent_path(facts.name)
        return facts.replace(agent_socket=str(agent) if agent else None)

    async def refresh(self, handle: VMHandle, probe_agent: bool = False) -> VMFacts:
        """Read the facts of one VM again (and ping its agent when asked)."""
        handle.dirty = False
        facts = await self._inspect(handle.conn)
        if probe_agent and facts.agent_socket:
            agent = handle.agent(timeout=3.0)
            assert agent is not None
            facts = facts.replace(agent_reachable=await agent.ping(), agent_probed_at=time.time())
        elif facts.agent_socket == handle.facts.agent_socket:
            # Not probed this time: the last probe's result and time stand (not a default).
            facts = facts.replace(
                agent_reachable=handle.facts.agent_reachable,
                agent_probed_at=handle.facts.agent_probed_at,
            )
        if facts != handle.facts:
            handle.facts = facts
            self._changed(handle, "changed")
        return facts

    def _on_event(self, handle: VMHandle, event: Event) -> None:
        if event.get("event") in RUNSTATE_EVENTS:
            handle.dirty = True
            self._wake.set()

    def _changed(self, handle: VMHandle | None, what: str) -> None:
        if self.on_change is not None:
            self.on_change(handle, what)

    # --- the watcher --------------------------------------------------------------------

    async def run(self) -> None:
        """Scan forever; the owner cancels it."""
        while True:
            try:
                await self.scan()
            except asyncio.CancelledError:
                raise
            except Exception as err:  # the inventory task never dies of one bad scan
                logger.warning("inventory scan: %s", err or type(err).__name__)
            await asyncio.sleep(EVENT_SCAN_INTERVAL)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_interval)

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name="inventory")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for handle in list(self.handles.values()):
            await handle.conn.close()
            handle.close_pidfd()
        self.handles.clear()
