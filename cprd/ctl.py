"""``cprdctl``: the operator's client of the cprd daemon on D-Bus.

    cprdctl [--bus ADDRESS] status [--json] | check [--json] [--measure]
    cprdctl [--bus ADDRESS] manifest [--json|--yaml]
    cprdctl [--bus ADDRESS] prepare-kexec [--commit] | commit | resume
    cprdctl [--bus ADDRESS] restore [--ignore-disk-changes VM]...
    cprdctl [--bus ADDRESS] upgrade-qemu [--binary PATH] [VM ...]
    cprdctl [--bus ADDRESS] kexec [--kernel K [--initrd I] [--append A | --reuse-cmdline]]
                                  [--shutdown VM ...]
    cprdctl guard-stop        (ExecStop of cprd-kexec-guard.service)

The JSON documents (``--json``) carry ``schema_version`` (:data:`SCHEMA_VERSION`); their
fields are documented in docs/json-schema.md.

Exit codes: 0 success; 1 the operation failed (the VMs were put back); 2 bad usage;
3 cprd is not reachable or the call was denied; 4 cprd is busy or in the wrong phase.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import yaml
from dbus_fast import BusType, Message, MessageType, Variant
from dbus_fast.aio import MessageBus
from dbus_fast.auth import AuthExternal

from cprd import __version__
from cprd.config import safe_load
from cprd.render import (
    VMProgress,
    host_prediction,
    manifest_summary,
    prediction_line,
    progress_line,
    save_summary,
    status_table,
)
from cprd.service import SCHEMA_VERSION
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

    async def watch_progress(self, printer: ProgressPrinter) -> None:
        await self.call(
            "AddMatch",
            "s",
            [f"type='signal',sender='{NAME}',interface='{IFACE}',member='Progress'"],
            iface="org.freedesktop.DBus",
            dest="org.freedesktop.DBus",
            path="/org/freedesktop/DBus",
        )
        self.bus.add_message_handler(printer.on_message)

    async def manifest(self) -> dict[str, Any]:
        """The daemon's manifest, parsed (CtlError when there is none)."""
        (text,) = await self.call("GetManifest")
        try:
            data = safe_load(text)
        except yaml.YAMLError as err:
            raise CtlError(f"GetManifest: not YAML: {err}", EXIT_FAILED) from err
        if not isinstance(data, dict):
            raise CtlError("GetManifest: the manifest is not a mapping", EXIT_FAILED)
        return data


class ProgressPrinter:
    """Per VM: phase, bytes, rate, ETA.  On a terminal one line per VM, redrawn together;
    otherwise a plain line whenever a VM's phase changes.

    Signals are queued as they arrive (with their arrival time) and drawn by :meth:`run`,
    which first reads the manifest the prepare wrote before it stopped any VM, to know
    which VMs keep their RAM in place."""

    def __init__(self, client: Client, tty: bool) -> None:
        self.client = client
        self.tty = tty
        self.vms: dict[str, VMProgress] = {}
        self.queue: asyncio.Queue[tuple[float, str, str, int, int]] = asyncio.Queue()
        self.drawn = 0
        self._task: asyncio.Task[None] | None = None

    def on_message(self, msg: Message) -> bool:
        if msg.member != "Progress" or msg.message_type != MessageType.SIGNAL:
            return False
        name, phase, done, total = msg.body
        self.queue.put_nowait((time.monotonic(), str(name), str(phase), int(done), int(total)))
        return False

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name="progress")

    async def stop(self) -> None:
        """Draw what is queued (the signals sent before the reply), then stop."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        while not self.queue.empty():
            self._apply(*self.queue.get_nowait())
        self.draw()

    async def run(self) -> None:
        item = await self.queue.get()
        await self._learn_in_place()
        self._apply(*item)
        self.draw()
        while True:
            self._apply(*await self.queue.get())
            self.draw()

    async def _learn_in_place(self) -> None:
        try:
            manifest = await self.client.manifest()
        except CtlError:
            return
        for vm in manifest.get("vms", []):
            if isinstance(vm, dict) and vm.get("in_place"):
                self.vms.setdefault(str(vm.get("name")), VMProgress()).in_place = True

    def _apply(self, at: float, name: str, phase: str, done: int, total: int) -> None:
        p = self.vms.setdefault(name, VMProgress())
        changed = phase != p.phase
        p.update(at, phase, done, total)
        if not self.tty and changed:
            print(f"{name}: {progress_line(p, at)}", flush=True)

    def draw(self) -> None:
        if not self.tty or not self.vms:
            return
        now = time.monotonic()
        width = max(shutil.get_terminal_size().columns - 1, 20)
        name_width = max(len(n) for n in self.vms)
        out = [f"\033[{self.drawn}A"] if self.drawn else []
        for name, p in sorted(self.vms.items()):
            if not p.phase:
                continue
            line = f"{name.ljust(name_width)}  {progress_line(p, now)}"[:width]
            out.append(f"\r\033[K{line}\n")
        self.drawn = len(out) - (1 if self.drawn else 0)
        sys.stdout.write("".join(out))
        sys.stdout.flush()


async def status(client: Client, as_json: bool) -> int:
    # Check first: it probes each guest agent, so the list read after it shows that probe.
    checks = plain((await client.call("Check", timeout=120))[0])
    vms = plain((await client.call("ListVMs"))[0])
    props = plain(
        (await client.call("GetAll", "s", [IFACE], iface="org.freedesktop.DBus.Properties"))[0]
    )
    if as_json:
        doc = {"schema_version": SCHEMA_VERSION, "state": props["State"], "vms": vms}
        print(json.dumps({**doc, "check": checks}))
        return EXIT_OK
    print(f"cprd: {props['State']}, {props['VMCount']} VMs")
    print(status_table(vms, checks, time.time()))
    return EXIT_OK


async def check(client: Client, as_json: bool, measure: bool = False) -> int:
    if measure:  # root only: it writes a few hundred MiB to state_dir
        await client.call("MeasureBandwidth", timeout=LONG_CALL)
    results = plain((await client.call("Check", timeout=120))[0])
    if as_json:
        print(json.dumps({"schema_version": SCHEMA_VERSION, "check": results}))
    else:
        for r in results:
            what = "ok" if r["ok"] else "; ".join(r["problems"])
            if "action" not in r:
                print(f"{r['name']}: {what}")
                continue
            print(f"{r['name']}: {r['action']}: {what}")
            print(f"  QEMU-only upgrade: {r['qemu_upgrade']} ({r['qemu_upgrade_why']})")
            print(f"  {prediction_line(r['prediction'])}")
        host = host_prediction(results)
        if host is not None:
            print(host)
    return EXIT_OK if all(r["ok"] for r in results) else EXIT_FAILED


async def manifest(client: Client, form: str) -> int:
    if form == "yaml":
        (text,) = await client.call("GetManifest")
        print(text, end="")
    elif form == "json":
        doc = {"schema_version": SCHEMA_VERSION, "manifest": await client.manifest()}
        print(json.dumps(doc))
    else:
        print(manifest_summary(await client.manifest()))
    return EXIT_OK


async def prepare(
    client: Client, commit: bool, shutdown: list[str] | None = None, best_effort: bool = False
) -> int:
    printer = ProgressPrinter(client, sys.stdout.isatty())
    await client.watch_progress(printer)
    options: dict[str, Variant] = {}
    if commit:
        options["commit"] = Variant("b", True)
    if shutdown:
        options["shutdown"] = Variant("as", shutdown)
    if best_effort:
        options["best_effort"] = Variant("b", True)
    printer.start()
    try:
        (path,) = await client.call("PrepareKexec", "a{sv}", [options], timeout=LONG_CALL)
    finally:
        await printer.stop()
    with contextlib.suppress(CtlError):  # the save is done; the table is a courtesy
        print(save_summary(await client.manifest(), printer.vms))
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
    sub.add_parser("status", help="every VM and what a kexec would do to it").add_argument(
        "--json", action="store_true"
    )
    c = sub.add_parser("check", help="preflight and predicted times; changes nothing")
    c.add_argument("--json", action="store_true")
    c.add_argument(
        "--measure",
        action="store_true",
        help="first measure state_dir's write and read bandwidth (root: writes 256 MiB)",
    )
    m = sub.add_parser("manifest", help="the current manifest: a summary table")
    form = m.add_mutually_exclusive_group()
    form.add_argument("--json", action="store_const", dest="form", const="json")
    form.add_argument("--yaml", action="store_const", dest="form", const="yaml")
    sub.add_parser("prepare-kexec", help="save every VM; resumable until commit").add_argument(
        "--commit", action="store_true", help="then quit the saved QEMUs"
    )
    sub.add_parser("commit", help="quit the saved QEMUs")
    sub.add_parser("resume", help="undo a prepare: every VM back as it was")
    sub.add_parser("restore", help="restore the VMs of a committed manifest").add_argument(
        "--ignore-disk-changes",
        action="append",
        default=[],
        metavar="VM",
        help="restore VM even if its disk images changed since the save (repeatable)",
    )
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
            return await check(client, args.json, args.measure)
        if args.command == "manifest":
            return await manifest(client, args.form or "table")
        if args.command == "prepare-kexec":
            return await prepare(client, args.commit)
        if args.command in ("commit", "resume", "restore"):
            if args.command == "restore":
                ignore = {"ignore_disk_changes": Variant("as", args.ignore_disk_changes)}
                options = ignore if args.ignore_disk_changes else {}
                body = await client.call("Restore", "a{sv}", [options], timeout=LONG_CALL)
            else:
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
