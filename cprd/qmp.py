"""QMP transport: one qemu.qmp client per connection, every call with a timeout.

This layer knows nothing of policy.  It connects to a QEMU monitor socket, learns the
peer's pid with SO_PEERCRED, executes commands with a deadline, and hands QEMU's events
to one callback.  qemu.qmp's listeners keep an unbounded history, so the default
listener is made to accept nothing and our own listener keeps no history.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from qemu.qmp import EventListener, ExecuteError, QMPClient
from qemu.qmp.error import QMPError as _LibQMPError
from qemu.qmp.message import Message

from cprd.errors import MonitorBusyError, QMPError

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 10.0

T = TypeVar("T")
Event = dict[str, Any]
EventCallback = Callable[[Event], None]


class _Stream(EventListener):
    """An event listener without qemu.qmp's unbounded history."""

    async def put(self, event: Message) -> None:
        if self.accept(event):
            await self._queue.put(event)


@dataclass(frozen=True)
class PeerCred:
    """SO_PEERCRED of a UNIX socket: the listener's pid, uid and gid at ``listen()``."""

    pid: int
    uid: int
    gid: int


def peer_cred(sock: socket.socket) -> PeerCred:
    """The credentials of the process at the other end of a UNIX socket (SO_PEERCRED)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", creds)
    return PeerCred(int(pid), int(uid), int(gid))


def peer_pid(sock: socket.socket) -> int:
    """The pid of the process at the other end of a UNIX socket (SO_PEERCRED)."""
    return peer_cred(sock).pid


#: Called with the peer's credentials before the QMP greeting is read; raises to refuse.
PeerCheck = Callable[[PeerCred], None]


# --- typed access to QEMU's replies: QEMU's output is data, never trusted structure -----


def expect(value: object, kind: type[T], what: str) -> T:
    """``value`` if it is a ``kind`` (bool is not an int), else QMPError."""
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise QMPError(f"malformed QMP reply: {what}: expected {kind.__name__}, got {_show(value)}")
    return value


def field(data: object, key: str, kind: type[T], what: str, default: T | None = None) -> T:
    """``data[key]`` checked to be a ``kind``; ``default`` when absent (if given)."""
    mapping = expect(data, dict, what)
    if key not in mapping:
        if default is not None:
            return default
        raise QMPError(f"malformed QMP reply: {what}: no {key!r}")
    return expect(mapping[key], kind, f"{what}.{key}")


def _show(value: object) -> str:
    text = repr(value)
    return (text[:60] + "...") if len(text) > 60 else text


class QMPConnection:
    """A QMP session with one QEMU.

    ``on_event`` is called for every event QEMU sends; ``closed`` is set when the
    connection ends, for whatever reason.  The owner calls :meth:`close`.
    """

    def __init__(self, path: Path, name: str | None = None) -> None:
        self.path = path
        self.name = name or path.stem
        self.pid = 0
        self.cred = PeerCred(0, -1, -1)
        self.version: tuple[int, int, int] = (0, 0, 0)
        self.package = ""
        self.closed = asyncio.Event()
        self._client = QMPClient(self.name)
        self._client.events.event_filter = lambda _event: False
        self._stream = _Stream()
        self._client.register_listener(self._stream)
        self._callbacks: list[EventCallback] = []
        self._pump: asyncio.Task[None] | None = None
        self._watch: asyncio.Task[None] | None = None

    @classmethod
    async def open(
        cls,
        path: Path,
        name: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        check: PeerCheck | None = None,
    ) -> QMPConnection:
        conn = cls(path, name)
        await conn.connect(timeout, check)
        return conn

    async def connect(
        self, timeout: float = DEFAULT_TIMEOUT, check: PeerCheck | None = None
    ) -> None:
        """Connect; ``check`` sees the peer's credentials first and may refuse it (its
        exception is raised as is, after the socket is closed)."""
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, str(self.path)), timeout)
            self.cred = peer_cred(sock)
            self.pid = self.cred.pid
            if check is not None:
                try:
                    check(self.cred)
                except BaseException:
                    sock.close()
                    raise
            # A second client gets no greeting until the first one leaves: the timeout
            # turns "somebody else holds this monitor" into an error instead of a hang.
            await asyncio.wait_for(self._client.connect(sock), timeout)
        except TimeoutError as err:
            sock.close()
            raise MonitorBusyError(
                f"{self.path}: no QMP greeting within {timeout:g}s",
                "is another client connected to this monitor? give cprd a -qmp socket of its own",
            ) from err
        except (OSError, _LibQMPError) as err:
            sock.close()
            raise QMPError(f"{self.path}: cannot connect: {err}") from err
        try:
            self._read_greeting()
        except QMPError:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._client.disconnect(), 5)
            raise
        self._pump = asyncio.create_task(self._pump_events(), name=f"qmp-events-{self.name}")
        self._watch = asyncio.create_task(self._watch_state(), name=f"qmp-watch-{self.name}")
        logger.debug("connected to %s (pid %d, QEMU %s)", self.path, self.pid, self.version_str)

    def _read_greeting(self) -> None:
        greeting = self._client.greeting
        if greeting is None:
            return
        what = f"{self.path}: greeting"
        version = field(greeting._asdict().get("QMP"), "version", dict, what)
        qemu = field(version, "qemu", dict, f"{what}.version")
        self.version = (
            field(qemu, "major", int, f"{what}.qemu"),
            field(qemu, "minor", int, f"{what}.qemu"),
            field(qemu, "micro", int, f"{what}.qemu"),
        )
        self.package = field(version, "package", str, f"{what}.version", "")

    @property
    def version_str(self) -> str:
        return ".".join(map(str, self.version))

    def subscribe(self, callback: EventCallback) -> None:
        self._callbacks.append(callback)

    def unsubscribe(self, callback: EventCallback) -> None:
        with contextlib.suppress(ValueError):
            self._callbacks.remove(callback)

    async def _pump_events(self) -> None:
        while True:
            msg = await self._stream.get()
            event: Event = dict(msg)
            logger.debug("<-- %s %s", self.name, event.get("event"))
            for callback in list(self._callbacks):
                try:
                    callback(event)
                except Exception:
                    logger.exception("event callback failed for %s", self.name)

    async def _watch_state(self) -> None:
        # qemu.qmp disconnects by itself when the peer goes away; notice that.
        from qemu.qmp.protocol import Runstate

        while self._client.runstate == Runstate.RUNNING:
            await self._client.runstate_changed()
        self.closed.set()

    async def execute(
        self, cmd: str, args: Mapping[str, object] | None = None, timeout: float = DEFAULT_TIMEOUT
    ) -> Any:
        """Execute ``cmd``; raise QMPError on an error reply, a timeout or a broken link."""
        logger.debug("--> %s %s %s", self.name, cmd, dict(args) if args else "")
        try:
            result = await asyncio.wait_for(self._client.execute(cmd, args), timeout)
        except ExecuteError as err:
            raise QMPError(f"{self.name}: {cmd}: {err}") from err
        except TimeoutError as err:
            raise QMPError(f"{self.name}: {cmd}: no reply within {timeout:g}s") from err
        except (_LibQMPError, OSError, EOFError) as err:
            raise QMPError(
                f"{self.name}: {cmd}: connection lost ({err or type(err).__name__})"
            ) from err
        logger.debug("<-- %s %s", self.name, cmd)
        return result

    def send_fd(self, fd: int) -> None:
        self._client.send_fd_scm(fd)

    async def close(self) -> None:
        for task in (self._pump, self._watch):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._client.disconnect(), 5)
        self.closed.set()
