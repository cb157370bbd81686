"""The D-Bus face of the daemon: org.cprd.Cprd1 on the system bus.

A thin adapter over :class:`cprd.controller.Controller`: arguments are checked and
converted here, and every CprdError is converted exactly once into a namespaced D-Bus
error (``org.cprd.Cprd1.Error.<Name>``) with its one-line message.  Also here: the
root-only ``PrepareKexec`` broadcast signal and logind's delay inhibitor with its
``PrepareForShutdownWithMetadata`` signal.
"""

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from dbus_fast import Message, MessageType, PropertyAccess, Variant
from dbus_fast.aio import MessageBus
from dbus_fast.errors import DBusError

# method and signal: the names dbus-fast 2.44 (Debian 13) has; 5.x keeps them as aliases.
from dbus_fast.service import ServiceInterface, dbus_property
from dbus_fast.service import method as dbus_method
from dbus_fast.service import signal as dbus_signal

from cprd import controller as ctl
from cprd import manifest as mf
from cprd.controller import Controller, InvalidArgument, PrepareOptions, RestoreOptions
from cprd.errors import CprdError
from cprd.vm import redact_argv

logger = logging.getLogger(__name__)

NAME = "org.cprd.Cprd1"
PATH = "/org/cprd/Cprd1"
IFACE = "org.cprd.Cprd1.Manager"
ERROR_PREFIX = "org.cprd.Cprd1.Error."
LOGIND = "org.freedesktop.login1"
PROGRESS_INTERVAL = 0.25
#: Version of the documents ListVMs, VMChanged and Check send (each dict carries it) and
#: of cprdctl's JSON output (docs/json-schema.md).  Bump it when a field changes meaning
#: or goes away; adding a field does not.
SCHEMA_VERSION = 1

# D-Bus signatures as return and argument annotations. dbus-fast reads a plain string
# signature in every version (Debian 13 ships 2.44; typing.Annotated signatures need 4.0),
# so at run time each alias IS its signature string; mypy sees the Python type.
if TYPE_CHECKING:
    VarDict = dict[str, Variant]
    VarDicts = list[dict[str, Variant]]
    Strs = list[str]
    DBusStr = str
    DBusUInt32 = int
    SigVMChanged = list[Any]
    SigProgress = list[Any]
    SigPrepareFinished = list[Any]
else:
    VarDict, VarDicts, Strs, DBusStr, DBusUInt32 = "a{sv}", "aa{sv}", "as", "s", "u"
    SigVMChanged, SigProgress, SigPrepareFinished = "sa{sv}", "sstt", "bs"
T = TypeVar("T")


def variant(value: object) -> Variant:
    """Plain data (bool, int, float, str, lists, dicts) as a D-Bus variant."""
    if isinstance(value, Variant):
        return value
    if isinstance(value, bool):
        return Variant("b", value)
    if isinstance(value, int):
        return Variant("x", value)
    if isinstance(value, float):
        return Variant("d", value)
    if isinstance(value, str):
        return Variant("s", value)
    if isinstance(value, Mapping):
        return Variant("a{sv}", {str(k): variant(v) for k, v in value.items()})
    if isinstance(value, list | tuple):
        if all(isinstance(v, str) for v in value):
            return Variant("as", list(value))
        return Variant("av", [variant(v) for v in value])
    if value is None:
        return Variant("s", "")
    raise TypeError(f"cannot send {type(value).__name__} over D-Bus")


def vardict(data: Mapping[str, object]) -> dict[str, Variant]:
    return {k: variant(v) for k, v in data.items()}


def document(data: Mapping[str, object]) -> dict[str, Variant]:
    """A versioned D-Bus document: ``schema_version`` first, then the fields."""
    return vardict({"schema_version": SCHEMA_VERSION, **data})


def unvariant(value: Any) -> Any:
    """D-Bus values (variants nested in dicts and lists) as plain Python data."""
    if isinstance(value, Variant):
        return unvariant(value.value)
    if isinstance(value, dict):
        return {k: unvariant(v) for k, v in value.items()}
    if isinstance(value, list):
        return [unvariant(v) for v in value]
    return value


async def dbus_errors(call: Awaitable[T]) -> T:
    """Convert a CprdError into its namespaced D-Bus error, once, here."""
    try:
        return await call
    except CprdError as err:
        raise DBusError(ERROR_PREFIX + err.dbus_name, err.message) from err


class Manager(ServiceInterface):
    def __init__(self, controller: Controller) -> None:
        super().__init__(IFACE)
        self.controller = controller
        self._last_progress: dict[str, tuple[str, float]] = {}
        controller.on_state = self._state_changed
        controller.on_vm = self._vm_changed
        controller.on_progress = self._progress

    # --- methods --------------------------------------------------------------------------

    @dbus_method()
    def ListVMs(self) -> VarDicts:
        return [document(d) for d in self.controller.listing()]

    @dbus_method()
    async def Check(self) -> VarDicts:
        return [document(r) for r in await dbus_errors(self.controller.check())]

    @dbus_method()
    async def PrepareKexec(self, options: VarDict) -> DBusStr:
        return await self.prepare(options)

    @dbus_method()
    async def Commit(self) -> None:
        await dbus_errors(self.controller.commit())

    @dbus_method()
    async def Resume(self) -> VarDict:
        return vardict(await dbus_errors(self.controller.resume()))

    @dbus_method()
    async def Restore(self, options: VarDict) -> VarDict:
        async def run() -> dict[str, str]:
            parsed = RestoreOptions.parse({k: unvariant(v) for k, v in options.items()})
            return await self.controller.restore(parsed)

        return vardict(await dbus_errors(run()))

    @dbus_method()
    async def UpgradeQemu(self, names: Strs, options: VarDict) -> VarDict:
        async def run() -> dict[str, str]:
            opts = {k: unvariant(v) for k, v in options.items()}
            unknown = sorted(set(opts) - {"binary"})
            if unknown:
                raise InvalidArgument(f"unknown option {unknown[0]!r} (known: binary)")
            binary = opts.get("binary")
            if binary is not None and (not isinstance(binary, str) or not binary.startswith("/")):
                raise InvalidArgument("option 'binary': expected an absolute path")
            return await self.controller.upgrade(list(names), binary)

        return vardict(await dbus_errors(run()))

    @dbus_method()
    async def MeasureBandwidth(self) -> VarDict:
        """Measure state_dir's bandwidth for Check's predictions.  Root only: the bus
        policy allows group cprd no such call, and BusGlue answers it after checking the
        caller's uid (this body runs only without BusGlue, as in tests of the object)."""
        return vardict(await dbus_errors(self.controller.measure_bandwidth()))

    @dbus_method()
    async def GetManifest(self) -> DBusStr:
        """The manifest, secrets redacted (BusGlue answers root's calls unredacted)."""

        async def text() -> str:
            return self.manifest_text(redact=True)

        return await dbus_errors(text())

    def manifest_text(self, redact: bool) -> str:
        """The manifest; with ``redact``, every argv's secret values replaced."""
        text = self.controller.manifest_text()
        if not redact:
            return text
        manifest = mf.loads(text.encode(), str(self.controller.manifest_path))
        return mf.dumps(
            manifest.replace(vms=tuple(r.replace(argv=redact_argv(r.argv)) for r in manifest.vms))
        ).decode()

    # --- properties and signals -----------------------------------------------------------

    @dbus_property(access=PropertyAccess.READ)
    def State(self) -> DBusStr:
        return self.controller.state.value

    @dbus_property(access=PropertyAccess.READ)
    def VMCount(self) -> DBusUInt32:
        return len(self.controller.listing())

    @dbus_signal()
    def VMChanged(self, name: str, facts: dict[str, Variant]) -> SigVMChanged:
        return [name, facts]

    @dbus_signal()
    def Progress(self, name: str, phase: str, done: int, total: int) -> SigProgress:
        return [name, phase, done, total]

    @dbus_signal()
    def PrepareFinished(self, ok: bool, detail: str) -> SigPrepareFinished:
        return [ok, detail]

    # --- adapters ---------------------------------------------------------------------------

    async def prepare(self, options: Mapping[str, object]) -> str:
        """PrepareKexec for the method, the broadcast signal and logind alike."""

        async def run() -> str:
            parsed = PrepareOptions.parse({k: unvariant(v) for k, v in options.items()})
            return await self.controller.prepare(parsed)

        try:
            path = await dbus_errors(run())
        except DBusError as err:
            if err.type != ERROR_PREFIX + InvalidArgument.dbus_name:
                self.PrepareFinished(False, err.text)
            raise
        self.PrepareFinished(True, path)
        return path

    def _state_changed(self, state: ctl.State) -> None:
        self.emit_properties_changed({"State": state.value})

    def _vm_changed(self, name: str, doc: Mapping[str, object] | None) -> None:
        self.VMChanged(name, document(doc) if doc else {})
        self.emit_properties_changed({"VMCount": len(self.controller.listing())})

    def _progress(self, name: str, phase: str, done: int, total: int) -> None:
        now = time.monotonic()
        last = self._last_progress.get(name)
        if last is not None and last[0] == phase and now - last[1] < PROGRESS_INTERVAL:
            return
        self._last_progress[name] = (phase, now)
        self.Progress(name, phase, max(done, 0), max(total, 0))


class BusGlue:
    """The bus-level parts: the root-only broadcast signal, and logind."""

    def __init__(self, bus: MessageBus, manager: Manager) -> None:
        self.bus = bus
        self.manager = manager
        self.tasks: set[asyncio.Task[Any]] = set()
        self.inhibitor: int | None = None
        self.logind_owner: str | None = None
        self._metadata = asyncio.Event()

    async def _call(
        self,
        dest: str,
        path: str,
        iface: str,
        member: str,
        sig: str = "",
        body: list[Any] | None = None,
    ) -> Message:
        reply = await asyncio.wait_for(
            self.bus.call(
                Message(
                    destination=dest,
                    path=path,
                    interface=iface,
                    member=member,
                    signature=sig,
                    body=body or [],
                )
            ),
            10,
        )
        if reply is None or reply.message_type == MessageType.ERROR:
            detail = reply.body[0] if reply is not None and reply.body else "no reply"
            raise CprdError(f"{dest} {member}: {reply.error_name if reply else ''}: {detail}")
        return reply

    async def _driver(self, member: str, sig: str, body: list[Any]) -> Message:
        return await self._call(
            "org.freedesktop.DBus",
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus",
            member,
            sig,
            body,
        )

    async def start(self) -> None:
        self.bus.add_message_handler(self._on_message)
        await self._driver(
            "AddMatch", "s", [f"type='signal',interface='{IFACE}',member='PrepareKexec'"]
        )
        for member in ("PrepareForShutdownWithMetadata", "PrepareForShutdown"):
            await self._driver(
                "AddMatch",
                "s",
                [
                    f"type='signal',sender='{LOGIND}',interface='org.freedesktop.login1.Manager',"
                    f"member='{member}'"
                ],
            )
        await self.take_inhibitor()

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.release_inhibitor()

    # --- logind -------------------------------------------------------------------------------

    async def take_inhibitor(self) -> None:
        """Hold a "shutdown" delay lock while idle, so a kexec waits for the save."""
        if self.inhibitor is not None:
            return
        try:
            owner = await self._driver("GetNameOwner", "s", [LOGIND])
            self.logind_owner = str(owner.body[0])
            reply = await self._call(
                LOGIND,
                "/org/freedesktop/login1",
                "org.freedesktop.login1.Manager",
                "Inhibit",
                "ssss",
                ["shutdown", "cprd", "save every VM before a kexec", "delay"],
            )
        except (CprdError, TimeoutError) as err:
            logger.warning("no logind delay lock (%s): a kexec will not wait for cprd", err)
            return
        fds = reply.unix_fds
        self.inhibitor = fds[reply.body[0]] if fds else None
        logger.info("holding logind's shutdown delay lock")

    def release_inhibitor(self, why: str = "cprd stops") -> None:
        if self.inhibitor is not None:
            os.close(self.inhibitor)
            self.inhibitor = None
            # The kexec e2e test orders this line after the manifest's "committed".
            logger.info("released logind's shutdown delay lock: %s", why)

    async def _on_plain_shutdown(self, start: bool) -> None:
        """logind before systemd 255 sends only PrepareForShutdown (no type): cprd cannot
        tell a kexec from a power-off, so it lets the shutdown go on at once and leaves a
        kexec to cprd-kexec-guard.service.  Newer logind sends both signals."""
        if not start:
            self._metadata.clear()
            await self.take_inhibitor()
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._metadata.wait(), 2)
            return
        logger.info(
            "logind sent no PrepareForShutdownWithMetadata (systemd < 255): "
            "releasing the delay lock; cprd-kexec-guard.service covers a kexec"
        )
        self.release_inhibitor("no kexec metadata from logind")

    async def _on_logind(self, start: bool, metadata: Mapping[str, Any]) -> None:
        self._metadata.set()
        kind = str(unvariant(metadata.get("type", "")))
        if not start:  # the shutdown was cancelled
            await self.take_inhibitor()
            return
        if kind == "kexec":
            logger.info("logind: a kexec is under way: preparing and committing")
            # The kexec goes ahead whatever cprd does: save what can be saved, shut down
            # the rest, commit; the lock is released only once that is done.
            with contextlib.suppress(DBusError):
                await self.manager.prepare(
                    {"commit": Variant("b", True), "best_effort": Variant("b", True)}
                )
            logger.info("releasing logind's delay lock: the VMs are committed")
        else:
            logger.info("logind: %s under way: cprd does nothing", kind or "shutdown")
        self.release_inhibitor(f"logind's {kind or 'shutdown'} may go on")

    # --- GetManifest: the full text for root only ----------------------------------------------

    async def _get_manifest(self, msg: Message) -> None:
        """Answer GetManifest: unredacted for uid 0, secrets redacted for anyone else
        (the bus policy lets group cprd read it)."""
        try:
            try:
                reply = await self._driver("GetConnectionUnixUser", "s", [msg.sender])
                root = int(reply.body[0]) == 0
            except (CprdError, TimeoutError):
                root = False
            text = self.manager.manifest_text(redact=not root)
        except CprdError as err:
            self.bus.send(Message.new_error(msg, ERROR_PREFIX + err.dbus_name, err.message))
            return
        self.bus.send(Message.new_method_return(msg, "s", [text]))

    # --- MeasureBandwidth: root only ---------------------------------------------------------

    async def _measure(self, msg: Message) -> None:
        """Answer MeasureBandwidth for uid 0 only: it writes a few hundred MiB to state_dir
        (the bus policy already refuses everyone else; this is the second lock)."""
        try:
            try:
                reply = await self._driver("GetConnectionUnixUser", "s", [msg.sender])
                uid = int(reply.body[0])
            except (CprdError, TimeoutError):
                uid = -1
            if uid != 0:
                logger.warning("refused MeasureBandwidth from uid %d: only root may", uid)
                self.bus.send(
                    Message.new_error(
                        msg,
                        "org.freedesktop.DBus.Error.AccessDenied",
                        "MeasureBandwidth writes to state_dir: only root may call it",
                    )
                )
                return
            result = vardict(await self.manager.controller.measure_bandwidth())
        except CprdError as err:
            self.bus.send(Message.new_error(msg, ERROR_PREFIX + err.dbus_name, err.message))
            return
        self.bus.send(Message.new_method_return(msg, "a{sv}", [result]))

    # --- the broadcast signal -----------------------------------------------------------------

    async def _on_broadcast(self, sender: str, options: Mapping[str, Any]) -> None:
        reply = await self._driver("GetConnectionUnixUser", "s", [sender])
        uid = int(reply.body[0])
        if uid != 0:
            logger.warning(
                "ignored a PrepareKexec signal from uid %d (%s): only root may", uid, sender
            )
            return
        with contextlib.suppress(DBusError):
            await self.manager.prepare(options)

    def _on_message(self, msg: Message) -> bool:
        if (
            msg.message_type == MessageType.METHOD_CALL
            and msg.interface == IFACE
            and msg.member == "GetManifest"
            and msg.path == PATH
            and msg.signature == ""
            and msg.sender
        ):
            self._spawn(self._get_manifest(msg))
            return True
        if (
            msg.message_type == MessageType.METHOD_CALL
            and msg.interface == IFACE
            and msg.member == "MeasureBandwidth"
            and msg.path == PATH
            and msg.signature == ""
            and msg.sender
        ):
            self._spawn(self._measure(msg))
            return True
        if msg.message_type != MessageType.SIGNAL:
            return False
        if msg.interface == IFACE and msg.member == "PrepareKexec" and msg.signature == "a{sv}":
            if msg.sender:
                self._spawn(self._on_broadcast(msg.sender, msg.body[0]))
            return False
        if (
            msg.member == "PrepareForShutdownWithMetadata"
            and msg.signature == "ba{sv}"
            and msg.interface == "org.freedesktop.login1.Manager"
        ):
            if msg.sender != self.logind_owner:
                logger.warning(
                    "ignored PrepareForShutdownWithMetadata from %s, not logind", msg.sender
                )
                return False
            self._spawn(self._on_logind(bool(msg.body[0]), msg.body[1]))
        elif (
            msg.member == "PrepareForShutdown"
            and msg.signature == "b"
            and msg.interface == "org.freedesktop.login1.Manager"
            and msg.sender == self.logind_owner
        ):
            self._spawn(self._on_plain_shutdown(bool(msg.body[0])))
        return False


__all__ = ["BusGlue", "Manager", "vardict"]
