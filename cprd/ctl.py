"""``cprdctl``: the operator's client of the cprd daemon on D-Bus.

    cprdctl [--bus ADDRESS] status|check|manifest [--json]
    cprdctl [--bus ADDRESS] prepare-kexec [--commit] | commit | resume | restore
    cprdctl [--bus ADDRESS] upgrade-qemu [--binary PATH] [VM ...]
    cprdctl [--bus ADDRESS] kexec [--kernel K [--initrd I] [--append A | --reuse-cmdline]]
                                  [--shutdown VM ...]
    cprdctl guard-stop        (ExecStop of cprd-kexec-guard.service)

Exit codes: 0 success; 1 the operation failed (the VMs were put back); 2 bad usage;
3 cprd is not reachable or the call was denied; 4 cprd is busy or in the wrong phase.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from dbus_fast import BusType, Message, MessageType, Variant
from dbus_fast.aio import MessageBus
from dbus_fast.auth import AuthExternal

from cprd import __version__
from cprd.service import unvariant as plain

NAME, PATH, IFACE = "org.cprd.Cprd1", "/org/cprd/Cprd1", "org.cprd.Cprd1.Manager"
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_BUSY = 0, 1, 2, 3, 4
#: Longer than the daemon's own deadlines: it answers once every VM is saved or put back.
LONG_CALL = 3600.0


class CtlError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class Client:
    def __init__(self, bus: MessageBus) -> None:
        self.bus = bus

    @classmethod
    async def connect(cls, address: str | None) -> Client:
        try:
            if address:
                bus = MessageBus(bus_address=address, auth=AuthExternal())
            else:
                bus = MessageBus(bus_type=BusType.SYSTEM)
            return cls(await asyncio.wait_for(bus.connect(), 10))
        except Exception as err:
            raise CtlError(
                f"cannot reach the D-Bus {address or 'system bus'}: {err}", EXIT_UNREACHABLE
            ) from err

    async def call(
        self,
        member: str,
        sig: str = "",
        body: Sequence[Any] = (),
        timeout: float = 30,
        iface: str = IFACE,
        dest: str = NAME,
        path: str = PATH,
    ) -> list[Any]:
        msg = Message(
            destination=dest,
            path=path,
            interface=iface,
            member=member,
            signature=sig,
            body=list(body),
        )
        try:
            reply = await asyncio.wait_for(self.bus.call(msg), timeout)
        except TimeoutError:
            raise CtlError(
                f"{member}: no answer from cprd within {timeout:g}s", EXIT_UNREACHABLE
            ) from None
        assert reply is not None
        if reply.message_type == MessageType.ERROR:
            text = str(reply.body[0]) if reply.body else reply.error_name or "error"
            name = reply.error_name or ""
            if name in ("org.cprd.Cprd1.Error.Busy",):
                code = EXIT_BUSY
            elif name == "org.cprd.Cprd1.Error.InvalidArgs":
                code = EXIT_USAGE
            elif name.startswith("org.cprd.Cprd1.Error."):
                code = EXIT_FAILED
            else:  # AccessDenied, ServiceUnknown, NoReply, ...
                code = EXIT_UNREACHABLE
                if name.endswith("AccessDenied"):
                    text = f"permission denied for {member} (root, or group cprd for reads)"
                elif name.endswith(("ServiceUnknown", "NameHasNoOwner")):
                    text = "cprd is not running (no owner of org.cprd.Cprd1)"
            raise CtlError(f"{name.rsplit('.', 1)[-1]}: {text}", code)
        return list(reply.body)

    async def watch_progress(self, tty: bool) -> None:
        await self.call(
            "AddMatch",
            "s",
            [f"type='signal',sender='{NAME}',interface='{IFACE}',member='Progress'"],
            iface="org.freedesktop.DBus",
            dest="org.freedesktop.DBus",
            path="/org/freedesktop/DBus",
        )
        printer = ProgressPrinter(tty)
        self.bus.add_message_handler(printer.on_message)


class ProgressPrinter:
    """Per VM: bytes, rate, ETA; a live line on a terminal, plain lines otherwise."""

    def __init__(self, tty: bool) -> None:
        self.tty = tty
        self.started: dict[str, float] = {}
        self.phase: dict[str, str] = {}

    def on_message(self, msg: Message) -> bool:
        if msg.member != "Progress" or msg.message_type != MessageType.SIGNAL:
            return False
        name, phase, done, total = msg.body
        now = time.monotonic()
        elapsed = max(now - self.started.setdefault(name, now), 1e-6)
        rate = done / elapsed
        eta = (total - done) / rate if rate > 0 and total > done else 0.0
        line = (
            f"{name}: {phase} {done / 2**20:.0f}/{total / 2**20:.0f} MiB "
            f"{rate / 2**20:.0f} MiB/s ETA {eta:.0f}s"
        )
        final = phase in ("saved", "restored")
        if self.tty:
            print(f"\r\033[K{line}", end="\n" if final else "", flush=True)
        elif self.phase.get(name) != phase:
            print(line, flush=True)
        self.phase[name] = phase
        return False


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


def mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


async def status(client: Client, as_json: bool) -> int:
    vms = plain((await client.call("ListVMs"))[0])
    props = plain(
        (await client.call("GetAll", "s", [IFACE], iface="org.freedesktop.DBus.Properties"))[0]
    )
    checks = {c["name"]: c for c in plain((await client.call("Check", timeout=120))[0])}
    if as_json:
        print(json.dumps({"state": props["State"], "vms": vms, "check": list(checks.values())}))
        return EXIT_OK
    rows = [["VM", "RUNSTATE", "RAM", "MEMORY", "VFIO", "AGENT", "ACTION", "TO WRITE"]]
    for vm in vms:
        c = checks.get(vm["name"], {})
        classes = sorted({m["class"] for m in vm["memory"]})
        rows.append(
            [
                vm["name"],
                vm["runstate"],
                mib(vm["ram_bytes"]),
                ",".join(classes),
                str(len(vm["vfio_devices"])) if vm["vfio_devices"] else "-",
                "yes" if vm["agent_reachable"] else ("no" if vm["agent_socket"] else "-"),
                c.get("action", "?") if c.get("ok", False) else "REFUSED",
                mib(c.get("bytes_to_write", 0)),
            ]
        )
    print(f"cprd: {props['State']}, {props['VMCount']} VMs")
    print(table(rows))
    return EXIT_OK


async def check(client: Client, as_json: bool) -> int:
    results = plain((await client.call("Check", timeout=120))[0])
    if as_json:
        print(json.dumps(results))
    else:
        for r in results:
            what = "ok" if r["ok"] else "; ".join(r["problems"])
            if "action" not in r:
                print(f"{r['name']}: {what}")
                continue
            print(f"{r['name']}: {r['action']}: {what}")
            print(f"  QEMU-only upgrade: {r['qemu_upgrade']} ({r['qemu_upgrade_why']})")
    return EXIT_OK if all(r["ok"] for r in results) else EXIT_FAILED


async def prepare(
    client: Client, commit: bool, shutdown: list[str] | None = None, best_effort: bool = False
) -> int:
    await client.watch_progress(sys.stdout.isatty())
    options: dict[str, Variant] = {}
    if commit:
        options["commit"] = Variant("b", True)
    if shutdown:
        options["shutdown"] = Variant("as", shutdown)
    if best_effort:
        options["best_effort"] = Variant("b", True)
    (path,) = await client.call("PrepareKexec", "a{sv}", [options], timeout=LONG_CALL)
    print(f"prepared{' and committed' if commit or best_effort else ''}: manifest {path}")
    return EXIT_OK


def load_kernel(args: argparse.Namespace) -> None:
    """kexec -l, through kexec-tools, as a list (no shell)."""
    if args.kernel is None:
        return
    argv = ["kexec", "-l", args.kernel]
    if args.initrd:
        argv.append(f"--initrd={args.initrd}")
    if args.reuse_cmdline:
        argv.append("--reuse-cmdline")
    elif args.append is not None:
        argv.append(f"--append={args.append}")
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    except OSError as err:
        raise CtlError(
            f"cannot run kexec: {err.strerror} (install kexec-tools)", EXIT_FAILED
        ) from err
    if proc.returncode != 0:
        detail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise CtlError(f"kexec -l failed ({proc.returncode}): {detail}", EXIT_FAILED)


async def kexec(client: Client, args: argparse.Namespace) -> int:
    load_kernel(args)  # before anything is stopped
    # All or nothing: a failed save or a failed commit puts every VM back (the daemon
    # does it) and nothing is kexeced.
    await prepare(client, commit=True, shutdown=args.shutdown)
    # `systemctl kexec`: systemd stops the units, then kexecs into the loaded kernel.
    try:
        await client.call(
            "StartUnit",
            "ss",
            ["kexec.target", "replace-irreversibly"],
            iface="org.freedesktop.systemd1.Manager",
            dest="org.freedesktop.systemd1",
            path="/org/freedesktop/systemd1",
        )
    except CtlError as err:
        raise CtlError(
            f"every VM is saved and committed, but systemd did not kexec ({err}); "
            "kexec by hand, or bring them back with `cprdctl restore`",
            EXIT_FAILED,
        ) from err
    print("committed; systemd is kexecing")
    return EXIT_OK


async def guard_stop(client: Client) -> int:
    """At shutdown: prepare and commit only when a kexec is under way."""
    jobs = await client.call(
        "ListJobs",
        iface="org.freedesktop.systemd1.Manager",
        dest="org.freedesktop.systemd1",
        path="/org/freedesktop/systemd1",
    )
    if not any(job[1] == "kexec.target" for job in jobs[0]):
        print("no kexec under way: leaving the VMs to their own units")
        return EXIT_OK
    state = plain(
        (await client.call("Get", "ss", [IFACE, "State"], iface="org.freedesktop.DBus.Properties"))[
            0
        ]
    )
    if state == "committed":
        return EXIT_OK
    # The kexec goes ahead whatever happens now: save what can be saved, shut down the
    # rest (vms.<name>.on_kexec_failure), commit.  The daemon waits for an operation in
    # flight instead of answering Busy.
    return await prepare(client, commit=True, best_effort=True)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cprdctl",
        description="Drive the cprd daemon over D-Bus.",
        epilog="exit codes: 0 ok, 1 failed (VMs put back), 2 usage, "
        "3 cprd unreachable or permission denied, 4 busy",
    )
    p.add_argument("--version", action="version", version=f"cprdctl {__version__}")
    p.add_argument("--bus", help="D-Bus address (default: the system bus)")
    sub = p.add_subparsers(dest="command", required=True)
    for name, text in (
        ("status", "every VM and what a kexec would do to it"),
        ("check", "preflight; changes nothing"),
        ("manifest", "the current manifest"),
    ):
        sub.add_parser(name, help=text).add_argument("--json", action="store_true")
    sub.add_parser("prepare-kexec", help="save every VM; resumable until commit").add_argument(
        "--commit", action="store_true", help="then quit the saved QEMUs"
    )
    sub.add_parser("commit", help="quit the saved QEMUs")
    sub.add_parser("resume", help="undo a prepare: every VM back as it was")
    sub.add_parser("restore", help="restore the VMs of a committed manifest")
    u = sub.add_parser("upgrade-qemu", help="move VMs to a new QEMU process, no reboot")
    u.add_argument("--binary", help="the new QEMU (default: each VM's own, as on disk now)")
    u.add_argument("vms", nargs="*", metavar="VM", help="VMs to move (default: all)")
    k = sub.add_parser("kexec", help="load a kernel, prepare, commit, then kexec")
    k.add_argument("--kernel")
    k.add_argument("--initrd")
    group = k.add_mutually_exclusive_group()
    group.add_argument("--append")
    group.add_argument("--reuse-cmdline", action="store_true")
    k.add_argument(
        "--shutdown",
        action="append",
        default=[],
        metavar="VM",
        help="shut this VM down cleanly (cold boot after the kexec) instead of saving it; "
        "repeatable",
    )
    sub.add_parser("guard-stop")  # ExecStop of cprd-kexec-guard.service
    return p


async def _run(args: argparse.Namespace) -> int:
    client = await Client.connect(args.bus)
    try:
        if args.command == "status":
            return await status(client, args.json)
        if args.command == "check":
            return await check(client, args.json)
        if args.command == "manifest":
            (text,) = await client.call("GetManifest")
            print(json.dumps({"manifest": text}) if args.json else text, end="")
            return EXIT_OK
        if args.command == "prepare-kexec":
            return await prepare(client, args.commit)
        if args.command in ("commit", "resume", "restore"):
            body = await client.call(args.command.capitalize(), timeout=LONG_CALL)
            outcomes = plain(body[0]) if body else {}
            for name, outcome in sorted(outcomes.items()):
                print(f"{name}: {outcome}")
            if args.command == "restore" and any(
                not o.startswith("restored") for o in outcomes.values()
            ):
                return EXIT_FAILED
            return EXIT_OK
        if args.command == "kexec":
            return await kexec(client, args)
        if args.command == "upgrade-qemu":
            options = {"binary": Variant("s", os.path.abspath(args.binary))} if args.binary else {}
            body = await client.call(
                "UpgradeQemu", "asa{sv}", [args.vms, options], timeout=LONG_CALL
            )
            results = plain(body[0])
            for name, outcome in sorted(results.items()):
                print(f"{name}: {outcome}")
            return EXIT_FAILED if any(o.startswith("failed") for o in results.values()) else 0
        return await guard_stop(client)
    finally:
        client.bus.disconnect()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if (
        args.command == "kexec"
        and (args.initrd or args.append or args.reuse_cmdline)
        and (not args.kernel)
    ):
        print("cprdctl: --initrd, --append and --reuse-cmdline need --kernel", file=sys.stderr)
        return EXIT_USAGE
    try:
        return asyncio.run(_run(args))
    except CtlError as err:
        print(f"cprdctl: {err}", file=sys.stderr)
        return err.code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
