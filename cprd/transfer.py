"""QEMU-only upgrades without a reboot: move each VM into a new QEMU process.

VMs whose RAM is all shareable (memfd, or a file with share=on) on a machine with
``aux-ram-share=on`` move with **cpr-transfer**: the new QEMU starts with the VM's
recorded argv plus a ``cpr`` incoming channel, the old one ``migrate``s over the main
and cpr channels (in that order: the new QEMU reads the cpr channel before its
monitor), the new one ``migrate-incoming``s, and nothing is written to disk.  The others
take cpr-reboot to a file and an immediate restore with the new binary.

Until the new QEMU runs, the old one is untouched or put back: a failed switch-over
leaves the VM in its old process and the new process gone.

The new QEMU runs as the old one did (:func:`cprd.hosts.relaunch_as`).  Both QEMUs reach
the cpr and main channels by path (QEMU takes nothing but a unix socket path for the cpr
channel): a root QEMU's in a directory inside state_dir; any other's in a per-VM
directory owned by the QEMU's user, mode 0700, inside :data:`TRANSFER_PARENT` (root's,
0711: others may pass, not list or create).  state_dir stays 0700.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cprd import manifest as mf
from cprd.config import Config
from cprd.errors import CprdError, LaunchError, QMPError, TrustError
from cprd.hosts import ProcessContext, relaunch_argv, relaunch_as
from cprd.inventory import Inventory, VMHandle
from cprd.launch import Launcher, make_launcher
from cprd.log import Event, emit
from cprd.plan import MANAGED_CAPABILITIES, relaunch_problem, transfer_path
from cprd.qmp import QMPConnection
from cprd.restore import Restorer
from cprd.save import Saver, wait_exit
from cprd.trust import check_binary

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[str, str, int, int], None]
_VERSION = re.compile(r"version (\d+)\.(\d+)\.(\d+)")


#: uid and gid that run ``qemu --version``: nobody, without capabilities.
NOBODY = 65534


def qemu_version(executable: str) -> tuple[int, int, int]:
    """The version of a QEMU binary on disk (``--version``).

    Only a root-owned binary that group and others cannot write is run, as nobody (no
    capabilities: a non-root process gets none without ambient ones), with an empty
    environment, no shell and its argv as a list."""
    check_binary(executable)
    try:
        out = subprocess.run(
            [executable, "--version"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
            user=NOBODY,
            group=NOBODY,
            extra_groups=[],
            env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"},
            cwd="/",
            stdin=subprocess.DEVNULL,
        )
    except OSError as err:
        raise LaunchError(f"cannot run {executable}: {err.strerror}") from err
    match = _VERSION.search(out.stdout)
    if out.returncode != 0 or match is None:
        raise LaunchError(f"{executable} --version did not say its version")
    major, minor, micro = (int(g) for g in match.groups())
    return major, minor, micro


def transfer_argv(argv: tuple[str, ...], machine_type: str, cpr_socket: Path) -> list[str]:
    """The VM's argv for the new process: pinned machine, cpr channel, -incoming defer."""
    base = relaunch_argv(argv, machine_type)[:-2]  # without its "-incoming defer"
    channel = {
        "channel-type": "cpr",
        "addr": {"transport": "socket", "type": "unix", "path": str(cpr_socket)},
    }
    return [*base, "-incoming", json.dumps(channel), "-incoming", "defer"]


#: Where the per-VM socket directories of a cpr-transfer are made (root's, 0711).
TRANSFER_PARENT = Path("/run/cprd-transfer")


def socket_dir(
    name: str, owner: ProcessContext | None, state_dir: Path, parent: Path = TRANSFER_PARENT
) -> Path:
    """A new directory for VM ``name``'s cpr and main channel sockets.

    A root QEMU's: inside the root-only state_dir (mode 0700), as both QEMUs are root's.
    Another's: owned by the QEMU's uid and gid, mode 0700, inside ``parent`` (created
    root's and 0711 if missing; refused if it is a symlink or not root's alone), as the
    QEMUs reach it as that user once they dropped root or if they never had it."""
    safe = mf.safe_file_name(name)
    if owner is None or owner.uid == 0:
        return Path(tempfile.mkdtemp(prefix=f"{safe}.", suffix=".cpr", dir=state_dir))
    with contextlib.suppress(FileExistsError):
        os.mkdir(parent, 0o711)
    st = os.lstat(parent)
    mode = stat.S_IMODE(st.st_mode)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise LaunchError(
            f"{parent} is not a root-owned directory only root may write (mode {mode:04o})",
            f"remove {parent}; cprd creates it again",
        )
    if mode != 0o711:  # mkdir's mode went through the umask
        os.chmod(parent, 0o711)  # noqa: S103 (search only: each VM's directory is 0700)
    path = Path(tempfile.mkdtemp(prefix=f"{safe}-", dir=parent))
    try:
        os.chown(path, owner.uid, owner.gid)
    except OSError as err:
        shutil.rmtree(path, ignore_errors=True)
        raise LaunchError(
            f"{name}: cannot give {path} to uid {owner.uid}: {err.strerror}",
            "the daemon needs CAP_CHOWN and a writable /run/cprd-transfer for this",
        ) from err
    return path


def hand_over(directory: Path, name: str, owner: ProcessContext | None) -> None:
    """Give socket ``name`` in ``directory`` to the QEMU's user: a QEMU that drops root
    itself creates its cpr socket before it drops, as root, and the old QEMU (that
    user) must be able to connect to it.

    ``directory`` is that user's: by the time cprd looks, the user may have put there a
    symlink, or a hard link to a file or socket of root's, under ``name``.  So the entry
    is opened without following a symlink and changed through that descriptor only if it
    is a socket with no other name (one link), owned by root (made by the new QEMU
    before it dropped root) or by the user already; anything else is refused
    (LaunchError) and left as it is."""
    if owner is None or owner.uid == 0:
        return
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
    finally:
        os.close(dfd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISSOCK(st.st_mode) or st.st_nlink != 1 or st.st_uid not in (0, owner.uid):
            raise LaunchError(
                f"{directory / name} is not the new QEMU's socket (mode "
                f"{stat.filemode(st.st_mode)}, uid {st.st_uid}, {st.st_nlink} links): "
                f"not given to uid {owner.uid}",
                f"something of uid {owner.uid} replaced it; check the host",
            )
        if (st.st_uid, st.st_gid) != (owner.uid, owner.gid):
            # An O_PATH descriptor cannot be fchown'ed; its /proc link leads to exactly
            # the inode checked above, whatever the name points at by now.
            os.chown(f"/proc/self/fd/{fd}", owner.uid, owner.gid)
    finally:
        os.close(fd)


def _inode(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


class Upgrader:
    def __init__(
        self,
        config: Config,
        inventory: Inventory,
        launcher: Launcher | None = None,
        progress: ProgressCallback | None = None,
    ) -> None:
        self.config = config
        self.inventory = inventory
        self.launcher = launcher or make_launcher(config)
        self.progress = progress or (lambda *_: None)
        #: per VM: seconds from `migrate` on the old QEMU to the new one running
        self.blackout: dict[str, float] = {}

    async def paths(
        self, names: list[str] | None, binary: str | None, probe: bool = True
    ) -> list[tuple[VMHandle, str, bool, str]]:
        """Per VM: (handle, new executable, cpr-transfer?, why).

        Without ``probe`` (Check) no binary is run: the new version is taken to be the
        running one, which QEMU reported over QMP."""
        await self.inventory.scan()
        handles = self.inventory.vms()
        if names:
            known = {h.name for h in handles}
            unknown = sorted(set(names) - known)
            if unknown:
                raise CprdError(f"no VM named {', '.join(map(repr, unknown))}")
            handles = [h for h in handles if h.name in names]
        versions: dict[str, tuple[int, int, int]] = {}
        out = []
        for handle in handles:
            exe = binary or handle.facts.executable
            if not probe:
                versions[exe] = handle.facts.qemu_version
            elif exe not in versions:
                versions[exe] = qemu_version(exe)
            ok, why = transfer_path(handle.facts, versions[exe])
            problem, _ = relaunch_problem(handle.facts, self.config.discovery.trusted_uids)
            if ok and problem is not None:
                # The new QEMU is relaunched as the plan allows (hosts.relaunch_as) or not
                # at all: the file path's plan refuses it, before anything stops.
                ok, why = False, f"{problem}: not moved"
            out.append((handle, exe, ok, why))
        return out

    async def upgrade(
        self, names: list[str] | None = None, binary: str | None = None
    ) -> dict[str, str]:
        """Move the named VMs (all by default) to ``binary`` (default: their own, on disk)."""
        plan = await self.paths(names, binary)
        results: dict[str, str] = {}
        sem = asyncio.Semaphore(self.config.save.concurrency)

        async def one(handle: VMHandle, exe: str) -> None:
            async with sem:
                try:
                    results[handle.name] = await self._transfer(handle, exe)
                except (CprdError, OSError) as err:
                    results[handle.name] = f"failed, still in its old QEMU: {err}"

        await asyncio.gather(*(one(h, exe) for h, exe, ok, _ in plan if ok))
        by_file = [(h, exe) for h, exe, ok, _ in plan if not ok]
        if by_file:
            results.update(await self._through_file(by_file))
        await self.inventory.scan()  # hold the new processes
        return results

    # --- cpr-transfer ---------------------------------------------------------------------

    async def _transfer(self, handle: VMHandle, exe: str) -> str:
        facts = handle.facts
        name = facts.name
        # Asked again on the facts whose argv is launched below: an inventory scan may
        # have read them anew since paths() asked (the argv then is not the one checked).
        problem, _ = relaunch_problem(facts, self.config.discovery.trusted_uids)
        if problem is not None:
            raise TrustError(f"{name}: {problem}")
        mf.ensure_state_dir(self.config.state_dir)  # the direct launcher's log is there
        how = relaunch_as(facts.process, facts.argv)
        sock_dir = socket_dir(name, facts.process, self.config.state_dir)
        cpr_sock, mig_sock = sock_dir / "cpr.sock", sock_dir / "mig.sock"
        qmp_path = Path(facts.qmp_socket)
        self.inventory.exclude.add(qmp_path)  # the new QEMU takes over this path
        old = handle.conn
        process: Launcher.Process | None = None
        new: QMPConnection | None = None
        migrating = False
        try:
            self.inventory.verify(handle)
            check_binary(exe)
            old_inode = _inode(qmp_path)
            self.progress(name, "launching", 0, 0)
            process = await self.launcher.launch(
                name, exe, transfer_argv(facts.argv, facts.machine_type, cpr_sock), how
            )
            await self._wait_for(lambda: cpr_sock.exists(), process, name, "its cpr socket")
            hand_over(sock_dir, cpr_sock.name, facts.process)
            # A save (then a resume or restore) leaves mapped-ram and multifd on, and
            # mapped-ram needs a seekable file: cpr-transfer's socket channels are not.
            caps = [
                {"capability": c, "state": False}
                for c in MANAGED_CAPABILITIES
                if c in facts.migration_capabilities
            ]
            await old.execute("migrate-set-capabilities", {"capabilities": caps})
            await old.execute("migrate-set-parameters", {"mode": "cpr-transfer"})
            channels = [
                {
                    "channel-type": "main",
                    "addr": {"transport": "socket", "type": "unix", "path": str(mig_sock)},
                },
                {
                    "channel-type": "cpr",
                    "addr": {"transport": "socket", "type": "unix", "path": str(cpr_sock)},
                },
            ]
            start = time.monotonic()
            migrating = True
            await self._migrate(old, channels, process, name)
            # Until the new QEMU has loaded the cpr state it has not bound the monitor
            # path, which still leads to the old QEMU (busy with cprd: no greeting).
            await self._wait_for(
                lambda: _inode(qmp_path) not in (old_inode, None),
                process,
                name,
                "its monitor socket",
            )
            new = await self._connect_new(qmp_path, process, name)
            await new.execute("migrate-set-parameters", {"mode": "cpr-transfer"})
            await new.execute("migrate-incoming", {"uri": f"unix:{mig_sock}"})
            status = await self._settled(new, name)
            self.blackout[name] = time.monotonic() - start
            info = await old.execute("query-migrate")
            if info.get("status") != "completed":
                raise QMPError(f"{name}: old QEMU reports migration {info.get('status')}")
        except BaseException:
            await self._undo(handle, process, new, migrating)
            raise
        finally:
            shutil.rmtree(sock_dir, ignore_errors=True)
        # The switch-over is done.  SIGKILL, not quit: a quitting QEMU unlinks its socket
        # paths, which the new process now serves.
        await new.close()
        with contextlib.suppress(ProcessLookupError):
            os.kill(facts.pid, signal.SIGKILL)
        await wait_exit(facts.pid, 30)
        self.inventory.exclude.discard(qmp_path)
        self.progress(name, "upgraded", 0, 0)
        emit(
            logger,
            logging.INFO,
            Event.VM_RESTORED,
            "moved to a new QEMU (%s) with cpr-transfer in %.3fs: %s",
            exe,
            self.blackout[name],
            status,
            vm=name,
            phase="upgrading",
        )
        return f"cpr-transfer: {status}"

    async def _migrate(
        self,
        old: QMPConnection,
        channels: list[dict[str, Any]],
        process: Launcher.Process,
        name: str,
    ) -> None:
        """``migrate`` on the old QEMU, again while the new one is not listening yet.

        The cpr socket's file exists a moment before the new QEMU listens on it, and
        probing it would take the single connection the new QEMU accepts there.  A
        refused connection fails the command before the old VM is stopped.
        """
        for _ in range(250):
            try:
                await old.execute("migrate", {"channels": channels})
                return
            except QMPError as err:
                if "Connection refused" not in str(err):
                    raise
            if not await self.launcher.alive(process):
                raise LaunchError(f"{name}: the new QEMU exited: {self.launcher.tail(process)}")
            await asyncio.sleep(0.02)
        raise LaunchError(f"{name}: the new QEMU never accepted the cpr channel")

    async def _wait_for(
        self, ready: Callable[[], bool], process: Launcher.Process, name: str, what: str
    ) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while not ready():
            if not await self.launcher.alive(process):
                raise LaunchError(f"{name}: the new QEMU exited: {self.launcher.tail(process)}")
            if loop.time() > deadline:
                raise LaunchError(f"{name}: the new QEMU did not create {what} within 60s")
            await asyncio.sleep(0.02)

    async def _connect_new(self, path: Path, process: Launcher.Process, name: str) -> QMPConnection:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while True:
            if not await self.launcher.alive(process):
                raise LaunchError(f"{name}: the new QEMU exited: {self.launcher.tail(process)}")
            with contextlib.suppress(QMPError):
                conn = await QMPConnection.open(path, name, timeout=5)
                if not process.pid or conn.pid == process.pid:
                    return conn
                await conn.close()
            if loop.time() > deadline:
                raise LaunchError(f"{name}: the new QEMU's monitor never answered")
            await asyncio.sleep(0.05)

    async def _settled(self, new: QMPConnection, name: str) -> str:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.restore.timeout_s
        while True:
            info = await new.execute("query-migrate")
            if info.get("status") in ("failed", "cancelled"):
                raise QMPError(
                    f"{name}: incoming cpr-transfer {info['status']}: {info.get('error-desc', '?')}"
                )
            status = str((await new.execute("query-status"))["status"])
            if info.get("status") == "completed" and status not in ("inmigrate", "finish-migrate"):
                return status
            if loop.time() > deadline:
                raise QMPError(f"{name}: the new QEMU is still {status!r}")
            await asyncio.sleep(0.02)

    async def _undo(
        self,
        handle: VMHandle,
        process: Launcher.Process | None,
        new: QMPConnection | None,
        migrating: bool,
    ) -> None:
        """Before the switch-over: the new process goes, the old one runs as before."""
        if new is not None:
            await new.close()
        if process is not None:
            await self.launcher.stop(process)
        old = handle.conn
        with contextlib.suppress(CprdError):
            if migrating:
                with contextlib.suppress(QMPError):
                    await old.execute("migrate_cancel")
                status = str((await old.execute("query-status"))["status"])
                if status in ("postmigrate", "paused") and handle.facts.runstate == "running":
                    await old.execute("cont")
            await old.execute("migrate-set-parameters", {"mode": "normal"})
        self.inventory.exclude.discard(Path(handle.facts.qmp_socket))

    # --- the file path --------------------------------------------------------------------

    async def _through_file(self, vms: list[tuple[VMHandle, str]]) -> dict[str, str]:
        """cpr-reboot to a file, quit, and an immediate restore with the new binary."""
        names = {h.name for h, _ in vms}
        sockets = {Path(h.facts.qmp_socket) for h, _ in vms}
        saver = Saver(self.config, self.inventory, self.progress, self.launcher)
        try:
            await saver.prepare(only=names)
        except CprdError as err:
            return dict.fromkeys(names, f"failed, still in its old QEMU: {err}")
        self.inventory.exclude |= sockets
        try:
            manifest = await saver.commit()
            exe = {h.name: e for h, e in vms}
            pinned = {name: check_binary(path) for name, path in exe.items()}
            manifest = manifest.replace(
                vms=tuple(
                    r.replace(
                        executable=exe[r.name],
                        exe_dev=pinned[r.name][0],
                        exe_ino=pinned[r.name][1],
                    )
                    for r in manifest.vms
                )
            )
            mf.write(self.config.manifest_path, manifest)
            restored = await Restorer(
                self.config, launcher=self.launcher, progress=self.progress
            ).run()
        finally:
            self.inventory.exclude -= sockets
            await self.inventory.scan()
        return {r.name: f"file: {r.outcome.value}: {r.reason}" for r in restored.vms}
