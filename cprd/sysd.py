"""systemd's D-Bus API (org.freedesktop.systemd1 on the system bus): a thin transport.

Only what cprd needs of PID 1 for VMs run as units (issue 13 item 5): which unit a
process is in and that unit's properties, start, stop, reset, re-create a transient
service, reload.  Every call has a timeout; a D-Bus error is a :class:`LaunchError`
naming the call.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cprd.errors import LaunchError
from cprd.units import TRANSIENT_PROPERTIES, UnitInfo, control_in, exec_command

DEST = "org.freedesktop.systemd1"
MANAGER = "org.freedesktop.systemd1.Manager"
UNIT = "org.freedesktop.systemd1.Unit"
SERVICE = "org.freedesktop.systemd1.Service"
TIMEOUT = 30.0
#: daemon-reload re-runs every generator and reloads every unit: give it longer.
RELOAD_TIMEOUT = 120.0


@dataclass(frozen=True)
class UnitState:
    active: str  # ActiveState
    main_pid: int
    dropins: tuple[str, ...]
    result: str
    job: bool  # a start or stop job is queued or running


class Systemd:
    """One connection to the system bus (``async with Systemd() as sd``)."""

    def __init__(self, bus_address: str | None = None) -> None:
        self.bus_address = bus_address
        self.bus: Any = None

    async def __aenter__(self) -> Systemd:
        from dbus_fast import BusType
        from dbus_fast.aio import MessageBus

        try:
            if self.bus_address:
                bus = MessageBus(bus_address=self.bus_address)
            else:
                bus = MessageBus(bus_type=BusType.SYSTEM)
            self.bus = await asyncio.wait_for(bus.connect(), TIMEOUT)
        except (TimeoutError, OSError) as err:
            raise LaunchError(f"cannot reach systemd on the system bus: {err}") from err
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.bus is not None:
            self.bus.disconnect()
            self.bus = None

    async def call(
        self,
        member: str,
        signature: str = "",
        body: list[Any] | None = None,
        *,
        path: str = "/org/freedesktop/systemd1",
        interface: str = MANAGER,
        timeout: float = TIMEOUT,
    ) -> list[Any]:
        from dbus_fast import Message, MessageType

        try:
            reply = await asyncio.wait_for(
                self.bus.call(
                    Message(
                        destination=DEST,
                        path=path,
                        interface=interface,
                        member=member,
                        signature=signature,
                        body=body or [],
                    )
                ),
                timeout,
            )
        except TimeoutError as err:
            raise LaunchError(f"systemd {member}: no answer in {timeout:g} s") from err
        if reply is None or reply.message_type == MessageType.ERROR:
            detail = reply.body[0] if reply is not None and reply.body else "no reply"
            name = reply.error_name if reply is not None else ""
            raise LaunchError(f"systemd {member}: {name}: {detail}")
        return list(reply.body)

    async def unit_path(self, unit: str) -> str:
        return str((await self.call("LoadUnit", "s", [unit]))[0])

    async def properties(self, path: str, interface: str) -> dict[str, Any]:
        body = await self.call(
            "GetAll",
            "s",
            [interface],
            path=path,
            interface="org.freedesktop.DBus.Properties",
        )
        return {k: v.value for k, v in body[0].items()}

    async def unit_of_pid(self, pid: int) -> UnitInfo:
        """The unit process ``pid`` runs in, its MainPID, its ``ExecStart=`` (the command
        line root's PID 1 holds: see :func:`cprd.hosts.argv_anchored`) and, for a
        transient unit, the properties cprd records
        (:data:`cprd.units.TRANSIENT_PROPERTIES`)."""
        path = str((await self.call("GetUnitByPID", "u", [pid]))[0])
        unit = await self.properties(path, UNIT)
        name = str(unit.get("Id", ""))
        service: Mapping[str, Any] = {}
        if name.endswith(".service"):
            service = await self.properties(path, SERVICE)
        main = service.get("MainPID", 0)
        transient = unit.get("Transient") is True
        props = {**unit, **service} if transient else {}
        props = {k: v for k, v in props.items() if k in TRANSIENT_PROPERTIES}
        exec_path, exec_start = exec_command(service.get("ExecStart"))
        return UnitInfo(
            name,
            main if isinstance(main, int) else 0,
            transient,
            props,
            exec_start,
            os.path.realpath(exec_path) if exec_path is not None else None,
        )

    async def state(self, unit: str) -> UnitState:
        """ActiveState, MainPID, DropInPaths, Result and the pending job of ``unit``."""
        path = await self.unit_path(unit)
        u = await self.properties(path, UNIT)
        s = await self.properties(path, SERVICE)
        job = u.get("Job")
        return UnitState(
            str(u.get("ActiveState", "")),
            int(s.get("MainPID", 0) or 0),
            tuple(str(p) for p in u.get("DropInPaths", [])),
            str(s.get("Result", "")),
            bool(job and isinstance(job, list | tuple) and job[0]),
        )

    async def start(self, unit: str) -> None:
        await self.call("StartUnit", "ss", [unit, "replace"])

    async def stop(self, unit: str) -> None:
        await self.call("StopUnit", "ss", [unit, "replace"])

    async def reset_failed(self, unit: str) -> None:
        await self.call("ResetFailedUnit", "s", [unit])

    async def reload(self) -> None:
        await self.call("Reload", timeout=RELOAD_TIMEOUT)

    async def start_transient(
        self, unit: str, props: list[tuple[str, str, Any]], executable: str, argv: list[str]
    ) -> None:
        from dbus_fast import Variant

        # systemd writes a transient unit's properties and ExecStart= to its file in
        # /run/systemd/transient, read again at each daemon-reload: a newline in one
        # (an argv word of a QEMU that runs as a user) would add a line of that user's
        # choosing (ExecStopPost=+..., run as root).  Never handed to systemd.
        for what, value in [*((n, v) for n, _, v in props), ("executable", executable)]:
            if (bad := control_in(value)) is not None:
                raise LaunchError(f"{unit}: its {what} {bad!r} has a control character")
        if (bad := control_in(argv)) is not None:
            raise LaunchError(
                f"{unit}: its argv word {bad!r} has a control character",
                "systemd writes argv to a unit file; cprd does not hand it such a word",
            )
        body = [[n, Variant(sig, list(v) if isinstance(v, tuple) else v)] for n, sig, v in props]
        body += [
            ["Type", Variant("s", "exec")],
            ["ExecStart", Variant("a(sasb)", [[executable, argv, False]])],
        ]
        await self.call("StartTransientUnit", "ssa(sv)a(sa(sv))", [unit, "fail", body, []])
