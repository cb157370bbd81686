"""What cprd knows about one VM, read from QMP and /proc.

:func:`inspect` asks a connected QEMU for everything the planner needs; the memory
class of each backend is a pure function of its QOM type, its ``share`` flag and the
filesystem under its ``mem-path`` (:func:`classify`).
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cprd.errors import QMPError
from cprd.hosts import image_paths
from cprd.qmp import QMPConnection

logger = logging.getLogger(__name__)

#: Filesystems whose contents are gone after a reboot.
VOLATILE_FS = frozenset({"tmpfs", "hugetlbfs", "ramfs", "devtmpfs"})


class MemClass(enum.Enum):
    PRIVATE = "private"  # copied into the state file
    SHARED_PERSISTENT = "shared-persistent"  # may stay in place with x-ignore-shared
    SHARED_VOLATILE = "shared-volatile"  # shared, but lost at a reboot: copied


def classify(qom_type: str, share: bool, fstype: str | None, is_dax: bool = False) -> MemClass:
    """The memory class of one backend (pure)."""
    if not share:
        return MemClass.PRIVATE
    if qom_type == "memory-backend-file":
        if is_dax:
            return MemClass.SHARED_PERSISTENT
        if fstype is None or fstype in VOLATILE_FS:
            return MemClass.SHARED_VOLATILE
        return MemClass.SHARED_PERSISTENT
    # memfd, shared anonymous RAM, epc: nothing of it survives the process.
    return MemClass.SHARED_VOLATILE


@dataclass(frozen=True)
class Backend:
    id: str
    qom_type: str
    size: int
    share: bool
    mem_path: str | None
    fstype: str | None
    memclass: MemClass


@dataclass(frozen=True)
class VMFacts:
    name: str
    qmp_socket: str
    pid: int
    argv: tuple[str, ...]
    executable: str
    qemu_version: tuple[int, int, int]
    machine_type: str  # resolved and versioned, e.g. pc-q35-10.0
    runstate: str
    vfio_devices: tuple[str, ...]
    backends: tuple[Backend, ...]
    wakeup_suspend_support: bool
    migration_capabilities: tuple[str, ...]
    migration_blockers: tuple[str, ...]
    agent_socket: str | None = None
    agent_reachable: bool = False
    #: wall-clock time (time.time()) of the probe behind agent_reachable; 0.0: never probed
    agent_probed_at: float = 0.0
    aux_ram_share: bool = False  # -machine aux-ram-share=on (needed by cpr-transfer)
    cgroup: str = ""  # /proc/PID/cgroup as read (which manager runs it)
    parent_comm: str = ""  # the parent process's name (libvirtd, virtqemud, ...)
    block_files: tuple[str, ...] = ()  # image files of its block nodes (hosts.image_paths)

    @property
    def ram_bytes(self) -> int:
        return sum(b.size for b in self.backends)

    @property
    def version_str(self) -> str:
        return ".".join(map(str, self.qemu_version))

    def replace(self, **changes: Any) -> VMFacts:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (for D-Bus, JSON and the manifest)."""
        return {
            "name": self.name,
            "qmp_socket": self.qmp_socket,
            "pid": self.pid,
            "executable": self.executable,
            "qemu_version": self.version_str,
            "machine_type": self.machine_type,
            "runstate": self.runstate,
            "vfio_devices": list(self.vfio_devices),
            "ram_bytes": self.ram_bytes,
            "memory": [
                {
                    "id": b.id,
                    "type": b.qom_type,
                    "size": b.size,
                    "share": b.share,
                    "mem_path": b.mem_path or "",
                    "class": b.memclass.value,
                }
                for b in self.backends
            ],
            "agent_socket": self.agent_socket or "",
            "agent_reachable": self.agent_reachable,
            "agent_probed_at": self.agent_probed_at,
        }


# --- /proc ----------------------------------------------------------------------------


def read_argv(pid: int) -> tuple[str, ...]:
    raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    return tuple(arg.decode("utf-8", "surrogateescape") for arg in raw.split(b"\0")[:-1])


def read_executable(pid: int) -> str:
    exe = os.readlink(f"/proc/{pid}/exe")
    # An executable replaced by a package upgrade reads "/usr/bin/qemu (deleted)".
    return exe.removesuffix(" (deleted)")


def read_cgroup(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return ""


def read_parent_comm(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        return Path(f"/proc/{ppid}/comm").read_text().strip()
    except (OSError, ValueError, IndexError):
        return ""


def _unescape_mount(field: str) -> str:
    return (
        field.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
    )


def fstype_of(path: str, mountinfo: str) -> str | None:
    """The filesystem type of the mount holding ``path``, from a mountinfo text (pure)."""
    best: tuple[int, str] | None = None
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields = left.split()
        if len(fields) < 5:
            continue
        mountpoint = _unescape_mount(fields[4])
        prefix = mountpoint.rstrip("/") + "/"
        covers = path == mountpoint or path.startswith(prefix) or mountpoint == "/"
        if covers and (best is None or len(mountpoint) >= best[0]):
            best = (len(mountpoint), right.split()[0])
    return best[1] if best else None


def _is_dax(path: str) -> bool:
    return os.path.basename(path).startswith("dax") and path.startswith("/dev/")


# --- QMP ------------------------------------------------------------------------------


async def _qom_children(conn: QMPConnection, path: str) -> list[tuple[str, str]]:
    try:
        props = await conn.execute("qom-list", {"path": path})
    except QMPError:
        return []
    out = []
    for prop in props:
        kind = str(prop.get("type", ""))
        if kind.startswith("child<") and kind.endswith(">"):
            out.append((str(prop["name"]), kind[6:-1]))
    return out


async def vfio_devices(conn: QMPConnection) -> tuple[str, ...]:
    """Every vfio-* device in the QOM tree, by its id (or QOM path)."""
    found: list[str] = []
    for container in ("/machine/peripheral", "/machine/peripheral-anon"):
        for name, kind in await _qom_children(conn, container):
            if kind.startswith("vfio-"):
                found.append(f"{name} ({kind})")
    return tuple(found)


async def memory_backends(conn: QMPConnection, pid: int) -> tuple[Backend, ...]:
    memdevs = await conn.execute("query-memdev")
    types = dict(await _qom_children(conn, "/objects"))
    try:
        mountinfo = Path(f"/proc/{pid}/mountinfo").read_text()
    except OSError:
        mountinfo = ""
    out = []
    for dev in memdevs:
        dev_id = str(dev["id"])
        qom_type = types.get(dev_id, "memory-backend-ram")
        mem_path: str | None = None
        if qom_type == "memory-backend-file":
            mem_path = str(
                await conn.execute(
                    "qom-get", {"path": f"/objects/{dev_id}", "property": "mem-path"}
                )
            )
        share = bool(dev.get("share", False))
        fstype = fstype_of(mem_path, mountinfo) if mem_path else None
        is_dax = bool(mem_path) and _is_dax(str(mem_path))
        out.append(
            Backend(
                id=dev_id,
                qom_type=qom_type,
                size=int(dev["size"]),
                share=share,
                mem_path=mem_path,
                fstype=fstype,
                memclass=classify(qom_type, share, fstype, is_dax),
            )
        )
    return tuple(out)


def vm_name(argv: tuple[str, ...], socket_path: Path) -> str:
    """QEMU's ``-name`` (its ``guest=`` or first field), else the socket's file name.

    QEMU merges repeated ``-name`` options, a later one overriding: so does this.
    """
    name = None
    for i, arg in enumerate(argv):
        value = None
        if arg in ("-name", "--name") and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(("-name=", "--name=")):
            value = arg.split("=", 1)[1]
        if value is not None:
            first = value.split(",", 1)[0]
            if first and "=" not in first:
                name = first
            for part in value.split(","):
                if part.startswith("guest="):
                    name = part[6:]
    return name if name is not None else socket_path.stem


async def inspect(
    conn: QMPConnection, agent_socket: Path | None = None, agent_reachable: bool = False
) -> VMFacts:
    """Everything the planner needs about the QEMU behind ``conn``."""
    argv = read_argv(conn.pid)
    status = await conn.execute("query-status")
    machine = str(await conn.execute("qom-get", {"path": "/machine", "property": "type"}))
    current = await conn.execute("query-current-machine")
    caps = await conn.execute("query-migrate-capabilities")
    migrate = await conn.execute("query-migrate")
    try:
        aux = await conn.execute("qom-get", {"path": "/machine", "property": "aux-ram-share"})
    except QMPError:  # QEMU before 10.0
        aux = False
    nodes = await conn.execute("query-named-block-nodes", {"flat": True})
    return VMFacts(
        name=vm_name(argv, conn.path),
        qmp_socket=str(conn.path),
        pid=conn.pid,
        argv=argv,
        executable=read_executable(conn.pid),
        qemu_version=conn.version,
        machine_type=machine.removesuffix("-machine"),
        runstate=str(status["status"]),
        vfio_devices=await vfio_devices(conn),
        backends=await memory_backends(conn, conn.pid),
        wakeup_suspend_support=bool(current.get("wakeup-suspend-support", False)),
        migration_capabilities=tuple(str(c["capability"]) for c in caps),
        migration_blockers=tuple(str(r) for r in migrate.get("blocked-reasons", [])),
        agent_socket=str(agent_socket) if agent_socket else None,
        agent_reachable=agent_reachable,
        aux_ram_share=bool(aux),
        cgroup=read_cgroup(conn.pid),
        parent_comm=read_parent_comm(conn.pid),
        block_files=image_paths(
            n for n in (nodes if isinstance(nodes, list) else []) if isinstance(n, dict)
        ),
    )
