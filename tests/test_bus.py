"""The D-Bus policy (config/org.cprd.Cprd1.conf) on a real dbus-daemon, and the journald
fixture on a real systemd-journald.

A root stand-in for cprd owns org.cprd.Cprd1 in this process; clients run as separate
processes under real uids (root, a member of group cprd, nobody), so dbus-daemon judges
them by their kernel credentials exactly as on a host. The stand-in is a fake only of
cprd's method bodies; the policy decisions under test are all dbus-daemon's.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import pytest
from dbus_fast import Message, MessageType, PropertyAccess, RequestNameReply
from dbus_fast.aio import MessageBus
from dbus_fast.annotations import DBusSignature, DBusStr
from dbus_fast.auth import AuthExternal
from dbus_fast.service import ServiceInterface, dbus_method, dbus_property
from fixtures_bus import (
    JOURNAL_SOCKET,
    PROJECT_POLICY,
    BusDaemon,
    CprdAccounts,
    Journald,
    ServiceError,
    run_dbus_daemon,
    run_journald,
)
from systemd import journal

# The fixtures come from tests/fixtures_bus.py (harmless if conftest.py imports them too).

NAME = "org.cprd.Cprd1"
PATH = "/org/cprd/Cprd1"
IFACE = "org.cprd.Cprd1.Manager"
PROPS = "org.freedesktop.DBus.Properties"
FENCE_IFACE = "org.cprd.Test.Fence"
ACCESS_DENIED = "org.freedesktop.DBus.Error.AccessDenied"
WAIT_S = 5.0

# ---------------------------------------------------------------------------------------
# Stand-in for cprd (root, in this process)
# ---------------------------------------------------------------------------------------


class Manager(ServiceInterface):
    """org.cprd.Cprd1.Manager with trivial bodies: only the policy is under test."""

    def __init__(self) -> None:
        super().__init__(IFACE)

    @dbus_method()
    def ListVMs(self) -> Annotated[list[str], DBusSignature("as")]:
        return ["web1", "db1"]

    @dbus_method()
    def Check(self) -> DBusStr:
        return "check-ok"

    @dbus_method()
    def GetManifest(self) -> DBusStr:
        return "manifest"

    @dbus_method()
    def PrepareKexec(self) -> DBusStr:
        return "prepared"

    @dbus_method()
    def Commit(self) -> DBusStr:
        return "committed"

    @dbus_method()
    def Resume(self) -> DBusStr:
        return "resumed"

    @dbus_property(access=PropertyAccess.READ)
    def Version(self) -> DBusStr:
        return "0-test"


class SignalLog:
    """``token`` of every PrepareKexec signal one connection received, in order."""

    def __init__(self) -> None:
        self.tokens: list[str] = []
        self._changed = asyncio.Event()

    def on_message(self, msg: Message) -> None:
        if (
            msg.message_type is MessageType.SIGNAL
            and msg.interface == IFACE
            and msg.member == "PrepareKexec"
        ):
            self.tokens.append(msg.body[0]["token"].value)
            self._changed.set()

    async def wait(self, count: int) -> list[str]:
        async with asyncio.timeout(WAIT_S):
            while len(self.tokens) < count:
                self._changed.clear()
                await self._changed.wait()
        return list(self.tokens)


@dataclasses.dataclass
class StandIn:
    bus: MessageBus
    """Owns org.cprd.Cprd1 and serves Manager."""
    bystander: MessageBus
    """A second root connection that owns no name: another listener (a root cprdctl,
    say) and the sender of fence signals (see ``emit_daemon_signals``)."""
    received: SignalLog = dataclasses.field(default_factory=SignalLog)
    bystander_received: SignalLog = dataclasses.field(default_factory=SignalLog)

    async def wait_prepare_kexec(self, count: int) -> tuple[list[str], list[str]]:
        """Tokens of the PrepareKexec signals the owner and the bystander received, once
        each has ``count``."""
        return await self.received.wait(count), await self.bystander_received.wait(count)

    async def emit_daemon_signals(self) -> None:
        """Emit signals as cprd would, then a fence signal from a connection that owns no
        name. The bus routes each connection's messages in order and queues them per
        receiver in order, so once a client has the fence, it has every daemon signal the
        policy let through."""
        await self.bus.send(Message.new_signal(PATH, IFACE, "VMChanged", "s", ["web1"]))
        await self.bus.send(
            Message.new_signal(
                PATH, PROPS, "PropertiesChanged", "sa{sv}as", [IFACE, {}, ["Version"]]
            )
        )
        await bus_round_trip(self.bus)  # both routed (or dropped) before the fence
        await self.bystander.send(Message.new_signal("/", FENCE_IFACE, "Fence"))


async def connect(address: str) -> MessageBus:
    return await asyncio.wait_for(
        MessageBus(bus_address=address, auth=AuthExternal()).connect(), WAIT_S
    )


async def bus_call(bus: MessageBus, member: str, signature: str = "", *args: Any) -> Message:
    msg = Message(
        destination="org.freedesktop.DBus",
        path="/org/freedesktop/DBus",
        interface="org.freedesktop.DBus",
        member=member,
        signature=signature,
        body=list(args),
    )
    reply = await asyncio.wait_for(bus.call(msg), WAIT_S)
    assert reply.message_type is MessageType.METHOD_RETURN, reply.body
    return reply


async def bus_round_trip(bus: MessageBus) -> None:
    await bus_call(bus, "GetId")


@pytest.fixture
async def standin(dbus_daemon: BusDaemon) -> AsyncIterator[StandIn]:
    bus = await connect(dbus_daemon.address)
    bystander = await connect(dbus_daemon.address)
    stand_in = StandIn(bus=bus, bystander=bystander)
    prepare_kexec = f"type='signal',interface='{IFACE}',member='PrepareKexec'"
    try:
        bus.export(PATH, Manager())
        bus.add_message_handler(stand_in.received.on_message)
        bystander.add_message_handler(stand_in.bystander_received.on_message)
        await bus_call(bus, "AddMatch", "s", prepare_kexec)
        await bus_call(bystander, "AddMatch", "s", prepare_kexec)
        reply = await bus_call(bus, "RequestName", "su", NAME, 4)  # DO_NOT_QUEUE
        assert reply.body == [RequestNameReply.PRIMARY_OWNER.value]
        yield stand_in
    finally:
        bus.disconnect()
        bystander.disconnect()
        async with asyncio.timeout(WAIT_S):
            # dbus-fast 5.2 leaves wait_for_disconnect unannotated.
            await bus.wait_for_disconnect()  # type: ignore[no-untyped-call]
            await bystander.wait_for_disconnect()  # type: ignore[no-untyped-call]


# ---------------------------------------------------------------------------------------
# Clients, as separate processes under real credentials
# ---------------------------------------------------------------------------------------

# Runs `ops` in order and prints one JSON line per event: {"ready": true} once a listen
# op subscribed, {"results": [...]} at the end. Plain dbus-fast Message calls, no proxies,
# so the reply or error is exactly what the bus sent.
_CLIENT = """
import asyncio, json, sys
from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus
from dbus_fast.auth import AuthExternal

NAME, PATH, IFACE = "org.cprd.Cprd1", "/org/cprd/Cprd1", "org.cprd.Cprd1.Manager"
FENCE_IFACE = "org.cprd.Test.Fence"
WAIT = 5

def driver(member, signature="", body=()):
    return Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                   interface="org.freedesktop.DBus", member=member, signature=signature,
                   body=list(body))

def plain(value):
    return value.value if isinstance(value, Variant) else repr(value)

def outcome(reply):
    if reply.message_type is MessageType.ERROR:
        return {"error": reply.error_name, "text": reply.body[0] if reply.body else ""}
    return {"ok": json.loads(json.dumps(reply.body, default=plain))}

async def main():
    req = json.loads(sys.argv[1])
    bus = await asyncio.wait_for(
        MessageBus(bus_address=req["address"], auth=AuthExternal()).connect(), WAIT)
    errors = {}  # reply_serial -> error name
    received = []
    fence = asyncio.Event()

    def on_message(msg):
        if msg.message_type is MessageType.ERROR:
            errors[msg.reply_serial] = msg.error_name
        elif msg.message_type is MessageType.SIGNAL and msg.sender != "org.freedesktop.DBus":
            if msg.interface == FENCE_IFACE:
                fence.set()
            else:
                received.append(f"{msg.interface}.{msg.member}")

    bus.add_message_handler(on_message)
    results = []
    for op in req["ops"]:
        kind = op["op"]
        if kind == "call":
            body = [Variant(*arg["variant"]) if isinstance(arg, dict) else arg
                    for arg in op["body"]]
            msg = Message(destination=NAME, path=PATH, interface=op["interface"],
                          member=op["member"], signature=op["signature"], body=body)
            results.append(outcome(await asyncio.wait_for(bus.call(msg), WAIT)))
        elif kind == "own":
            msg = driver("RequestName", "su", [NAME, 4])  # DO_NOT_QUEUE
            results.append(outcome(await asyncio.wait_for(bus.call(msg), WAIT)))
        elif kind == "emit":
            body = [{"token": Variant("s", op["token"])}]
            signal = Message.new_signal(PATH, IFACE, "PrepareKexec", "a{sv}", body)
            await bus.send(signal)
            # The bus handles a connection's messages in order: once this reply is here,
            # the signal has been routed or dropped.
            await asyncio.wait_for(bus.call(driver("GetId")), WAIT)
            results.append({"emitted": op["token"], "errors": [
                name for serial, name in errors.items() if serial == signal.serial]})
        elif kind == "listen":
            await asyncio.wait_for(bus.call(driver("AddMatch", "s", ["type='signal'"])), WAIT)
            print(json.dumps({"ready": True}), flush=True)
            await asyncio.wait_for(fence.wait(), WAIT)
            results.append({"received": received})
    print(json.dumps({"results": results}), flush=True)
    bus.disconnect()

asyncio.run(main())
"""


@dataclasses.dataclass(frozen=True)
class Identity:
    name: str
    uid: int
    gid: int
    groups: list[int]


@pytest.fixture(scope="session")
def identities(cprd_accounts: CprdAccounts) -> dict[str, Identity]:
    return {
        "root": Identity("root", 0, 0, []),
        "member": Identity(
            "cprd-test",
            cprd_accounts.member_uid,
            cprd_accounts.member_gid,
            cprd_accounts.member_groups,
        ),
        "nobody": Identity("nobody", 65534, 65534, []),
    }


Op = dict[str, Any]
Result = dict[str, Any]


def call(member: str, interface: str = IFACE, signature: str = "", *body: Any) -> Op:
    return {
        "op": "call",
        "interface": interface,
        "member": member,
        "signature": signature,
        "body": list(body),
    }


def own() -> Op:
    return {"op": "own"}


def emit(token: str) -> Op:
    return {"op": "emit", "token": token}


def listen() -> Op:
    return {"op": "listen"}


async def run_client(
    bus: BusDaemon,
    who: Identity,
    ops: list[Op],
    on_ready: Callable[[], Awaitable[None]] | None = None,
) -> list[Result]:
    """Run the client as ``who`` (no shell, no inherited groups) and return its results."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-I",
        "-c",
        _CLIENT,
        json.dumps({"address": bus.address, "ops": ops}),
        user=who.uid,
        group=who.gid,
        extra_groups=who.groups,
        cwd="/",
        env={"PATH": "/usr/bin:/bin"},
        stdin=subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    results: list[Result] | None = None
    try:
        async with asyncio.timeout(3 * WAIT_S):
            while line := await proc.stdout.readline():
                event = json.loads(line)
                if "ready" in event and on_ready is not None:
                    await on_ready()
                elif "results" in event:
                    results = event["results"]
            stderr = (await proc.stderr.read()).decode(errors="replace")
            await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0 and results is not None, f"client as {who.name}: {stderr}"
    return results


def assert_denied(result: Result, text_part: str) -> None:
    assert result.get("error") == ACCESS_DENIED, result
    assert text_part in result["text"], result


async def forged_signal_is_dropped(
    dbus_daemon: BusDaemon, standin: StandIn, identities: dict[str, Identity], who: str
) -> None:
    """``who`` broadcasts PrepareKexec, then root does: neither the stand-in nor the
    bystander gets ``who``'s, and ``who`` gets no error either (a denied broadcast is
    dropped silently).

    ``who``'s signal was routed or dropped before its client exited (see _CLIENT), so had it
    been delivered, it would be queued at the stand-in ahead of root's."""
    forged = f"forged-by-{who}"
    results = await run_client(dbus_daemon, identities[who], [emit(forged)])
    assert results == [{"emitted": forged, "errors": []}]
    results = await run_client(dbus_daemon, identities["root"], [emit("from-root")])
    assert results == [{"emitted": "from-root", "errors": []}]
    assert await standin.wait_prepare_kexec(1) == (["from-root"], ["from-root"])


# ---------------------------------------------------------------------------------------
# Policy tests
# ---------------------------------------------------------------------------------------

SEND_REJECTED = "Rejected send message"
OWN_REJECTED = f'is not allowed to own the service "{NAME}"'


async def test_nobody_is_denied_everything(
    dbus_daemon: BusDaemon, standin: StandIn, identities: dict[str, Identity]
) -> None:
    calls = [
        call("ListVMs"),
        call("Check"),
        call("GetManifest"),
        call("PrepareKexec"),
        call("Commit"),
        call("Resume"),
        call("GetAll", PROPS, "s", IFACE),
        call("Get", PROPS, "ss", IFACE, "Version"),
        call("Introspect", "org.freedesktop.DBus.Introspectable"),
        call("Ping", "org.freedesktop.DBus.Peer"),
    ]
    results = await run_client(dbus_daemon, identities["nobody"], [own(), *calls])
    assert_denied(results[0], OWN_REJECTED)
    for op, result in zip(calls, results[1:], strict=True):
        assert_denied(result, SEND_REJECTED)
        assert f'member="{op["member"]}"' in result["text"]
    await forged_signal_is_dropped(dbus_daemon, standin, identities, "nobody")


async def test_cprd_member_may_only_read(
    dbus_daemon: BusDaemon, standin: StandIn, identities: dict[str, Identity]
) -> None:
    reads = [
        call("ListVMs"),
        call("Check"),
        call("GetManifest"),
        call("GetAll", PROPS, "s", IFACE),
        call("Get", PROPS, "ss", IFACE, "Version"),
        call("Ping", "org.freedesktop.DBus.Peer"),
    ]
    writes = [
        call("PrepareKexec"),
        call("Commit"),
        call("Resume"),
        # Not implemented by the stand-in: were they let through, the error would be
        # UnknownMethod from it, not AccessDenied from the bus.
        call("Restore"),
        call("UpgradeQemu"),
        call("MeasureBandwidth"),  # writes to state_dir: root only
        call("Set", PROPS, "ssv", IFACE, "Version", {"variant": ["s", "x"]}),
    ]
    member = identities["member"]
    results = await run_client(dbus_daemon, member, [*reads, *writes, own()])
    assert results[: len(reads)] == [
        {"ok": [["web1", "db1"]]},
        {"ok": ["check-ok"]},
        {"ok": ["manifest"]},
        {"ok": [{"Version": "0-test"}]},
        {"ok": ["0-test"]},
        {"ok": []},
    ]
    for result in results[len(reads) : -1]:
        assert_denied(result, SEND_REJECTED)
    assert_denied(results[-1], OWN_REJECTED)
    # Introspection is allowed too; its XML is dbus-fast's, so check only that it came.
    (introspected,) = await run_client(
        dbus_daemon, member, [call("Introspect", "org.freedesktop.DBus.Introspectable")]
    )
    assert IFACE in introspected["ok"][0]
    await forged_signal_is_dropped(dbus_daemon, standin, identities, "member")


async def test_root_may_do_everything(
    dbus_daemon: BusDaemon, standin: StandIn, identities: dict[str, Identity]
) -> None:
    results = await run_client(
        dbus_daemon,
        identities["root"],
        [
            own(),
            call("ListVMs"),
            call("Check"),
            call("GetManifest"),
            call("PrepareKexec"),
            call("Commit"),
            call("Resume"),
            call("GetAll", PROPS, "s", IFACE),
            emit("from-root"),
        ],
    )
    assert results == [
        # Allowed, but the stand-in holds the name already (DO_NOT_QUEUE).
        {"ok": [RequestNameReply.EXISTS.value]},
        {"ok": [["web1", "db1"]]},
        {"ok": ["check-ok"]},
        {"ok": ["manifest"]},
        {"ok": ["prepared"]},
        {"ok": ["committed"]},
        {"ok": ["resumed"]},
        {"ok": [{"Version": "0-test"}]},
        {"emitted": "from-root", "errors": []},
    ]
    assert await standin.wait_prepare_kexec(1) == (["from-root"], ["from-root"])


@pytest.mark.parametrize(
    ("who", "expected"),
    [
        ("root", [f"{IFACE}.VMChanged", f"{PROPS}.PropertiesChanged"]),
        ("member", [f"{IFACE}.VMChanged", f"{PROPS}.PropertiesChanged"]),
        ("nobody", []),
    ],
)
async def test_daemon_signals_reach_root_and_cprd_only(
    dbus_daemon: BusDaemon,
    standin: StandIn,
    identities: dict[str, Identity],
    who: str,
    expected: list[str],
) -> None:
    results = await run_client(
        dbus_daemon, identities[who], [listen()], on_ready=standin.emit_daemon_signals
    )
    assert results == [{"received": expected}]


def test_daemon_loaded_policy_cleanly(dbus_daemon: BusDaemon) -> None:
    """The fixture already fails on these; this states it where a reader looks."""
    log = dbus_daemon.log()
    assert "Encountered error" not in log
    assert "Unknown group" not in log


def test_broken_policy_in_includedir_is_caught(tmp_path: Path) -> None:
    """dbus-daemon only logs and skips a file in an includedir it cannot parse (as it would
    on a host); the fixture must refuse to run with half a policy."""
    broken = tmp_path / PROJECT_POLICY.name
    broken.write_text(PROJECT_POLICY.read_text().replace("</busconfig>", ""))
    with (
        pytest.raises(ServiceError, match=r"ignored part of its policy: .*Encountered error"),
        run_dbus_daemon([broken]),
    ):
        pass


async def test_policy_file_parses_as_strict_include(tmp_path: Path) -> None:
    """``<include>`` makes any parse error fatal: the daemon starts with the real file and
    refuses a truncated copy."""

    async def start(policy: Path) -> tuple[str, int | None, str]:
        """(printed address, exit status or None if it was running, stderr)"""
        conf = tmp_path / f"{policy.stem}.bus.conf"
        conf.write_text(
            "<busconfig><type>system</type>"
            f"<listen>unix:path={tmp_path}/{policy.stem}.sock</listen><auth>EXTERNAL</auth>"
            f"<include>{policy}</include></busconfig>"
        )
        proc = await asyncio.create_subprocess_exec(
            "dbus-daemon",
            f"--config-file={conf}",
            "--nofork",
            "--nosyslog",
            "--nopidfile",
            "--print-address=1",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert proc.stdout is not None and proc.stderr is not None
        try:
            address = await asyncio.wait_for(proc.stdout.readline(), WAIT_S)
            if not address:  # EOF: it exited
                await asyncio.wait_for(proc.wait(), WAIT_S)
            status = proc.returncode
        finally:
            if proc.returncode is None:
                proc.terminate()
            _, err = await asyncio.wait_for(proc.communicate(), WAIT_S)
        return address.decode().strip(), status, err.decode(errors="replace")

    address, status, err = await start(PROJECT_POLICY)
    assert address.startswith("unix:path="), err
    assert status is None, err
    truncated = tmp_path / "truncated.conf"
    truncated.write_text(PROJECT_POLICY.read_text().replace("</busconfig>", ""))
    address, status, err = await start(truncated)
    assert (address, status) == ("", 1)
    assert "Failed to start message bus: Error in file" in err


# ---------------------------------------------------------------------------------------
# journald
# ---------------------------------------------------------------------------------------


@pytest.fixture
def journal_logger() -> Iterator[logging.Logger]:
    """A logger that writes only to journald, through systemd-python's JournalHandler."""
    logger = logging.getLogger(f"cprd.test.{uuid.uuid4().hex[:8]}")
    handler = journal.JournalHandler(SYSLOG_IDENTIFIER="cprd-test")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield logger
    finally:
        logger.removeHandler(handler)


def test_journal_handler_fields_are_read_back(
    journald: Journald, journal_logger: logging.Logger
) -> None:
    vm = f"test-{uuid.uuid4().hex[:12]}"
    journal_logger.info("saved %s in %d ms", "ram", 42, extra={"CPRD_VM": vm})
    journal.send("second", CPRD_VM=vm, CPRD_PHASE="save")

    entries = journald.entries(CPRD_VM=vm, until=lambda found: len(found) >= 2)

    assert [e["MESSAGE"] for e in entries] == ["saved ram in 42 ms", "second"]
    first, second = entries
    assert first["CPRD_VM"] == vm
    assert first["PRIORITY"] == "6"
    assert first["SYSLOG_IDENTIFIER"] == "cprd-test"
    assert first["_PID"] == str(os.getpid())
    assert second["CPRD_PHASE"] == "save"
    assert journald.entries(CPRD_VM=vm, CPRD_PHASE="save") == [second]


def test_journald_lifecycle(tmp_path: Path) -> None:
    """A second journald is refused; a later instance sees none of an earlier one's
    entries; and after each ends, no journald socket is left."""
    vm = f"test-{uuid.uuid4().hex[:12]}"
    with run_journald(tmp_path / "first") as first:
        assert JOURNAL_SOCKET.is_socket()
        journal.send("from the first run", CPRD_VM=vm)
        assert [e["MESSAGE"] for e in first.entries(CPRD_VM=vm)] == ["from the first run"]
        with (
            pytest.raises(ServiceError, match="already running"),
            run_journald(tmp_path / "second"),
        ):
            pass
        assert JOURNAL_SOCKET.is_socket()  # the refused attempt left the first one alone
    assert not JOURNAL_SOCKET.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(first.pid, 0)

    with run_journald(tmp_path / "third") as third:
        assert third.entries(CPRD_VM=vm, until=lambda found: False, timeout=0.3) == []
    assert not JOURNAL_SOCKET.exists()
