"""Launchers: how a restored QEMU is started so that it outlives the restorer.

``direct`` starts a detached process in its own session, output to a log file under
state_dir through a relay that keeps at most :data:`LOG_MAX` bytes of each start.
``systemd`` asks systemd for a transient unit ``cprd-vm-<name>.service``
(StartTransientUnit), so the VM is not killed when the restore unit ends.  argv is
always a list: no shell is involved in starting QEMU (the relay is a fixed script
with no word from a VM in it).

Both start QEMU as :func:`cprd.hosts.relaunch_as` says (a :class:`~cprd.hosts.RunAs`):
its uid, gid and supplementary groups, its working directory and its filtered
environment.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cprd import manifest as mf
from cprd.config import Config
from cprd.config import Launcher as LauncherKind
from cprd.errors import LaunchError
from cprd.hosts import LEGACY_RUN_AS, RunAs
from cprd.sysd import Systemd
from cprd.units import DROPIN_NAME, FAILED_DIR, RESTORING_DIR, UnitRef, has_control


def popen_credentials(run_as: RunAs, uid: int, gid: int, groups: Sequence[int]) -> dict[str, Any]:
    """Popen's ``user``/``group``/``extra_groups`` for ``run_as``, given cprd's own
    credentials (pure): only what differs, so that a QEMU relaunched as cprd's own user
    needs no CAP_SETUID/CAP_SETGID; supplementary groups are always set for another
    uid (``extra_groups=[]`` clears root's).  A record without a process context
    (:data:`~cprd.hosts.LEGACY_RUN_AS`) changes nothing."""
    if run_as.env is None:
        return {}
    out: dict[str, Any] = {}
    if run_as.uid != uid:
        out["user"] = run_as.uid
    if run_as.gid != gid:
        out["group"] = run_as.gid
    if run_as.uid != uid or sorted(run_as.groups) != sorted(groups):
        out["extra_groups"] = list(run_as.groups)
    return out


def printable(text: str) -> str:
    """``text`` with each character that is not printable (newline, a control, a lone
    surrogate...) as a ``\\x``/``\\u`` escape (pure)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class Launcher:
    @dataclass
    class Process:
        name: str
        pid: int = 0
        log: Path | None = None
        popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)
        unit: str = ""
        #: the direct launcher's log relay (see :data:`LOG_RELAY`)
        relay: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    async def launch(
        self, name: str, executable: str, argv: list[str], run_as: RunAs = LEGACY_RUN_AS
    ) -> Launcher.Process:
        """Start QEMU ``executable`` with ``argv`` (a list, never a shell) for VM ``name``,
        with the credentials, working directory and environment of ``run_as``."""
        raise NotImplementedError

    async def alive(self, process: Launcher.Process) -> bool:
        raise NotImplementedError

    async def stop(self, process: Launcher.Process) -> None:
        raise NotImplementedError

    def tail(self, process: Launcher.Process) -> str:
        if process.log is None:
            return "see its log"
        if process.relay is not None:
            # The relay writes what QEMU said before it exited once it reads the end of
            # the pipe; a child QEMU left behind may hold the pipe open: not for long.
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.relay.wait(timeout=2)
        try:
            lines = process.log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "no log"
        return lines[-1] if lines else "no output"


#: What the direct launcher keeps of one start's output (stdout and stderr): QEMU's own
#: messages are a few lines, but ``-serial stdio`` or ``-monitor stdio`` hand it to the
#: guest, and a log without a bound in state_dir is a guest filling the disk that every
#: VM's save needs.
LOG_MAX = 4 << 20

#: The relay between QEMU's output and its log: the first LOG_MAX bytes go to the log,
#: the rest is read and dropped (QEMU never blocks on a full pipe), until QEMU and every
#: process it made close the pipe.  A fixed script: no word in it comes from a VM.
LOG_RELAY = ("/bin/sh", "-c", 'head -c "$1"; exec cat >/dev/null', "cprd-log-relay")


class DirectLauncher(Launcher):
    """A detached QEMU in its own session; cprd keeps the Popen only to reap it."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.children: list[subprocess.Popen[bytes]] = []

    async def launch(
        self, name: str, executable: str, argv: list[str], run_as: RunAs = LEGACY_RUN_AS
    ) -> Launcher.Process:
        log = self.log_dir / f"{mf.safe_file_name(name)}.log"
        fd = os.open(
            log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        relay: subprocess.Popen[bytes] | None = None
        try:
            read_end, write_end = os.pipe2(os.O_CLOEXEC)
            try:
                relay = subprocess.Popen(
                    [*LOG_RELAY, str(LOG_MAX)],
                    stdin=read_end,
                    stdout=fd,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                    close_fds=True,
                    cwd="/",
                    env={"PATH": "/usr/bin:/bin"},
                )
                popen = subprocess.Popen(
                    argv,
                    executable=executable,
                    stdin=subprocess.DEVNULL,
                    stdout=write_end,
                    stderr=write_end,
                    start_new_session=True,
                    close_fds=True,
                    cwd=run_as.cwd,
                    env=run_as.environment,
                    **popen_credentials(run_as, os.geteuid(), os.getegid(), os.getgroups()),
                )
            finally:
                os.close(read_end)
                os.close(write_end)
        except OSError as err:
            if relay is not None:
                relay.wait(timeout=5)  # its pipe is closed: it ends at once
            raise LaunchError(f"{name}: cannot start {executable}: {err.strerror}") from err
        finally:
            os.close(fd)
        self.children += [popen, relay]
        return Launcher.Process(name, popen.pid, log, popen, relay=relay)

    async def alive(self, process: Launcher.Process) -> bool:
        return process.popen is None or process.popen.poll() is None

    async def stop(self, process: Launcher.Process) -> None:
        if process.popen is not None and process.popen.poll() is None:
            process.popen.send_signal(signal.SIGKILL)
            await asyncio.to_thread(process.popen.wait)


class SystemdLauncher(Launcher):
    """A transient unit through org.freedesktop.systemd1 on the system bus."""

    def __init__(self, bus_address: str | None = None) -> None:
        self.bus_address = bus_address

    async def _call(self, member: str, signature: str, body: list[Any]) -> Any:
        """One systemd Manager method; LaunchError (one line) for anything that fails."""
        async with Systemd(self.bus_address) as sd:
            return await sd.call(member, signature, body)

    @staticmethod
    def unit_name(name: str) -> str:
        return f"cprd-vm-{mf.safe_file_name(name)}.service"

    @staticmethod
    def properties(
        name: str, executable: str, argv: list[str], run_as: RunAs
    ) -> list[tuple[str, str, Any]]:
        """The transient unit's properties as (name, D-Bus signature, value) (pure).

        systemd writes them to the unit's file in /run/systemd/transient, read again at
        every daemon-reload, and writes Description= and WorkingDirectory= as given: a
        newline there would start a line of the QEMU's user's choosing (``[Service]``,
        ``ExecStopPost=+...``, run as root).  So the VM's name (its ``-name``) is shown
        escaped, and a working directory, executable or argv word with a control
        character is refused (LaunchError), never handed to systemd."""
        for what, text in (("working directory", run_as.cwd), ("executable", executable)):
            if has_control(text):
                raise LaunchError(f"{name}: its {what} {text!r} has a control character")
        for word in argv:
            if has_control(word):
                raise LaunchError(
                    f"{name}: its argv word {word!r} has a control character",
                    "systemd writes argv to a unit file; use restore.launcher: direct for it",
                )
        props: list[tuple[str, str, Any]] = [
            ("Description", "s", f"QEMU VM {printable(name)} (restored by cprd)"),
            ("ExecStart", "a(sasb)", [[executable, argv, False]]),
            ("KillMode", "s", "mixed"),
            ("CollectMode", "s", "inactive-or-failed"),
            ("WorkingDirectory", "s", run_as.cwd),
        ]
        if run_as.uid != 0:
            props.append(("User", "s", str(run_as.uid)))
        if run_as.uid != 0 or run_as.gid != 0:
            props.append(("Group", "s", str(run_as.gid)))
        if run_as.groups:
            props.append(("SupplementaryGroups", "as", [str(g) for g in run_as.groups]))
        env = run_as.environment
        if env is not None:
            props.append(("Environment", "as", [f"{k}={v}" for k, v in env.items()]))
        return props

    async def launch(
        self, name: str, executable: str, argv: list[str], run_as: RunAs = LEGACY_RUN_AS
    ) -> Launcher.Process:
        from dbus_fast import Variant

        unit = self.unit_name(name)
        props = [
            [key, Variant(sig, value)]
            for key, sig, value in self.properties(name, executable, argv, run_as)
        ]
        await self._call("StartTransientUnit", "ssa(sv)a(sa(sv))", [unit, "fail", props, []])
        return Launcher.Process(name, 0, None, None, unit)

    async def alive(self, process: Launcher.Process) -> bool:
        return True  # a QEMU that dies is noticed by its QMP socket never answering

    async def stop(self, process: Launcher.Process) -> None:
        with contextlib.suppress(LaunchError):
            await self._call("StopUnit", "ss", [process.unit, "replace"])


def make_launcher(config: Config, bus_address: str | None = None) -> Launcher:
    if config.restore.launcher is LauncherKind.SYSTEMD:
        return SystemdLauncher(bus_address)
    return DirectLauncher(config.state_dir)


class UnitLauncher(Launcher):
    """Restore into the operator's own systemd service (issue 13 item 5).

    An operator unit (``vm@web.service``): cprd-generator's drop-in (written from the
    committed manifest at boot or at a daemon-reload) makes the unit run the replayed
    argv with ``-incoming defer``, and only when cprd-restore marks it
    (``/run/cprd/restoring/<unit>``); :meth:`launch` marks it and starts the unit, and
    the unit's MainPID is the QEMU.  A transient service (``systemd-run``) is re-created
    under its name with the properties it had.  :meth:`stop` (a failed restore) stops
    the unit and marks the failure, so the next daemon-reload (:meth:`end`) leaves the
    unit exactly as the operator wrote it.
    """

    def __init__(
        self,
        bus_address: str | None = None,
        run_dir: Path = Path(RESTORING_DIR).parent,
        start_timeout: float = 60.0,
    ) -> None:
        self.bus_address = bus_address
        self.restoring = run_dir / Path(RESTORING_DIR).name
        self.failed = run_dir / Path(FAILED_DIR).name
        self.start_timeout = start_timeout

    def _mark(self, directory: Path, unit: str, present: bool) -> None:
        if present:
            directory.mkdir(mode=0o755, parents=True, exist_ok=True)
            (directory / unit).touch(mode=0o644)
        else:
            with contextlib.suppress(FileNotFoundError):
                (directory / unit).unlink()

    async def begin(self, units: list[str]) -> None:
        """Before restoring into ``units``: forget their failures of this boot and have
        the generator write their drop-ins (a daemon-reload), unless there already."""
        for unit in units:
            self._mark(self.failed, unit, False)
        async with Systemd(self.bus_address) as sd:
            for unit in units:
                if not await self._has_dropin(sd, unit):
                    await sd.reload()
                    break

    async def end(self, failed: list[str]) -> None:
        """After the restore: mark the units of the VMs not restored as failed in this
        boot, then a daemon-reload, so the drop-ins of restored or failed VMs are gone
        and their units are as written again."""
        for unit in failed:
            self._mark(self.failed, unit, True)
        with contextlib.suppress(FileNotFoundError):
            for mark in self.restoring.iterdir():
                mark.unlink()
        async with Systemd(self.bus_address) as sd:
            await sd.reload()

    @staticmethod
    async def _has_dropin(sd: Systemd, unit: str) -> bool:
        return any(Path(p).name == DROPIN_NAME for p in (await sd.state(unit)).dropins)

    async def launch(
        self,
        name: str,
        executable: str,
        argv: list[str],
        run_as: RunAs = LEGACY_RUN_AS,
        unit: UnitRef | None = None,
    ) -> Launcher.Process:
        # The unit says who its QEMU runs as (User=, ... in the unit or its recorded
        # transient properties): ``run_as`` is not used here.
        assert unit is not None
        async with Systemd(self.bus_address) as sd:
            if unit.transient:
                with contextlib.suppress(LaunchError):  # a failed unit of that name left
                    await sd.reset_failed(unit.name)
                await sd.start_transient(unit.name, list(unit.properties), executable, argv)
            else:
                if not await self._has_dropin(sd, unit.name):
                    raise LaunchError(
                        f"{name}: {unit.name} has no cprd restore drop-in: cprd-generator did "
                        "not write one (is it installed, and is this manifest the config's?)"
                    )
                state = (await sd.state(unit.name)).active
                if state in ("active", "activating", "reloading"):
                    raise LaunchError(f"{name}: {unit.name} is already {state}: refused")
                self._mark(self.restoring, unit.name, True)
                with contextlib.suppress(LaunchError):
                    await sd.reset_failed(unit.name)
                await sd.start(unit.name)
            try:
                pid = await self._main_pid(sd, name, unit.name)
            except BaseException:
                await self.stop(Launcher.Process(name, 0, None, None, unit.name))
                raise
        return Launcher.Process(name, pid, None, None, unit.name)

    async def _main_pid(self, sd: Systemd, name: str, unit: str) -> int:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.start_timeout
        while True:
            st = await sd.state(unit)
            if st.active == "active" and st.main_pid:
                return st.main_pid
            # inactive with no job: it ran and exited, or its condition was unmet; with a
            # job: waiting for what it is ordered after (never after cprd-restore.service)
            if st.active == "failed" or (st.active == "inactive" and not st.job):
                raise LaunchError(f"{name}: {unit} did not start: {st.active} ({st.result})")
            if loop.time() > deadline:
                raise LaunchError(f"{name}: {unit} not active after {self.start_timeout:g} s")
            await asyncio.sleep(0.1)

    async def alive(self, process: Launcher.Process) -> bool:
        async with Systemd(self.bus_address) as sd:
            st = await sd.state(process.unit)
        return st.active in ("active", "activating") and st.main_pid == process.pid

    def tail(self, process: Launcher.Process) -> str:
        return f"see `journalctl -u {process.unit}`"

    async def stop(self, process: Launcher.Process) -> None:
        """Stop the unit (a failed restore) and mark it failed for this boot."""
        self._mark(self.failed, process.unit, True)
        self._mark(self.restoring, process.unit, False)
        with contextlib.suppress(LaunchError):
            async with Systemd(self.bus_address) as sd:
                await sd.stop(process.unit)
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 30
                while loop.time() < deadline:
                    if (await sd.state(process.unit)).active in ("inactive", "failed"):
                        break
                    await asyncio.sleep(0.1)
                with contextlib.suppress(LaunchError):
                    await sd.reset_failed(process.unit)

    async def start_plain(self, name: str, unit: str) -> Launcher.Process:
        """Start the unit as written (a VM shut down before the kexec: a cold boot)."""
        async with Systemd(self.bus_address) as sd:
            await sd.start(unit)
            pid = await self._main_pid(sd, name, unit)
        return Launcher.Process(name, pid, None, None, unit)
