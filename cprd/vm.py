"""What cprd knows about one VM, read from QMP and /proc.

:func:`inspect` asks a connected QEMU for everything the planner needs; the memory
class of each backend is a pure function of its QOM type, its ``share`` flag and the
filesystem under its ``mem-path`` (:func:`classify`).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cprd.errors import LaunchError, QMPError, TrustError
from cprd.hosts import ProcessContext, image_paths, read_process, valid_machine_type
from cprd.qmp import QMPConnection, expect, field
from cprd.sysd import Systemd
from cprd.trust import check_binary
from cprd.units import UnitInfo, UnitKind, cgroup_unit, is_cprds_own

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
    #: the process as found at discovery: compared again before commit
    identity: ProcIdentity | None = None
    #: (st_dev, st_ino) of the file at ``executable``, the one a restore would start:
    #: recorded at prepare, checked at commit and at restore
    binary: tuple[int, int] | None = None
    cgroup: str = ""  # /proc/PID/cgroup as read (which manager runs it)
    parent_comm: str = ""  # the parent process's name (libvirtd, virtqemud, ...)
    block_files: tuple[str, ...] = ()  # image files of its block nodes (hosts.image_paths)
    #: who it runs as, where, with which (filtered) environment: relaunched so
    process: ProcessContext | None = None
    #: what systemd said of the service its cgroup names (None: not a service, or no answer)
    unit_info: UnitInfo | None = None

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


@dataclass(frozen=True)
class ProcIdentity:
    """What makes a QEMU process the one cprd inspected: re-read before commit."""

    pid: int
    argv: tuple[str, ...]
    exe_dev: int
    exe_ino: int
    uids: tuple[int, ...]  # real, effective, saved, filesystem
    gids: tuple[int, ...]

    def changes(self, now: ProcIdentity) -> list[str]:
        """What differs in ``now`` (pure)."""
        out = []
        if now.pid != self.pid:
            out.append(f"pid {self.pid} -> {now.pid}")
        if now.argv != self.argv:
            out.append("its command line changed")
        if (now.exe_dev, now.exe_ino) != (self.exe_dev, self.exe_ino):
            out.append("its executable file was replaced")
        if now.uids != self.uids or now.gids != self.gids:
            out.append(f"its credentials changed (uids {self.uids} -> {now.uids})")
        return out


def _status_ids(status: str, key: str) -> tuple[int, ...]:
    for line in status.splitlines():
        if line.startswith(key + ":"):
            return tuple(int(v) for v in line.split()[1:])
    raise TrustError(f"/proc status has no {key} line")


def read_identity(pid: int) -> ProcIdentity:
    """The identity of process ``pid`` from /proc (argv, executable inode, credentials)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        argv = read_argv(pid)
        st = os.stat(f"/proc/{pid}/exe")
    except OSError as err:
        raise TrustError(f"QEMU pid {pid}: cannot read /proc: {err.strerror}") from err
    return ProcIdentity(
        pid=pid,
        argv=argv,
        exe_dev=st.st_dev,
        exe_ino=st.st_ino,
        uids=_status_ids(status, "Uid"),
        gids=_status_ids(status, "Gid"),
    )


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
    for prop in expect(props, list, f"qom-list {path}"):
        kind = field(prop, "type", str, f"qom-list {path}[]")
        if kind.startswith("child<") and kind.endswith(">"):
            out.append((field(prop, "name", str, f"qom-list {path}[]"), kind[6:-1]))
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
    for dev in expect(memdevs, list, "query-memdev"):
        dev_id = field(dev, "id", str, "query-memdev[]")
        qom_type = types.get(dev_id, "memory-backend-ram")
        mem_path: str | None = None
        if qom_type == "memory-backend-file":
            mem_path = expect(
                await conn.execute(
                    "qom-get", {"path": f"/objects/{dev_id}", "property": "mem-path"}
                ),
                str,
                f"mem-path of {dev_id}",
            )
        share = field(dev, "share", bool, f"query-memdev {dev_id}", False)
        fstype = fstype_of(mem_path, mountinfo) if mem_path else None
        is_dax = bool(mem_path) and _is_dax(str(mem_path))
        out.append(
            Backend(
                id=dev_id,
                qom_type=qom_type,
                size=field(dev, "size", int, f"query-memdev {dev_id}"),
                share=share,
                mem_path=mem_path,
                fstype=fstype,
                memclass=classify(qom_type, share, fstype, is_dax),
            )
        )
    return tuple(out)


# --- secrets in argv ---------------------------------------------------------------------

#: Option keys whose values are secrets (or name the secret object holding one).
SECRET_KEYS = frozenset(
    {"password", "passwordid", "password-secret", "passphrase", "key-secret", "iv", "psk"}
)
REDACTED = "<redacted>"


def _segments(text: str) -> list[str]:
    """QEMU's comma-separated options, ``,,`` being an escaped comma (kept as is)."""
    out: list[str] = []
    cur: list[str] = []
    i = 0
    while i < len(text):
        if text[i] == ",":
            if text[i + 1 : i + 2] == ",":
                cur.append(",,")
                i += 2
                continue
            out.append("".join(cur))
            cur = []
        else:
            cur.append(text[i])
        i += 1
    out.append("".join(cur))
    return out


def _redact_json(value: Any, secret_object: bool = False) -> Any:
    if isinstance(value, dict):
        is_secret = secret_object or value.get("qom-type") == "secret"
        return {
            k: REDACTED
            if k.rsplit(".", 1)[-1] in SECRET_KEYS or (is_secret and k == "data")
            else _redact_json(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_redact_json(v) for v in value]
    return value


def redact_arg(arg: str) -> str:
    """One argv element with secret values replaced by ``<redacted>`` (pure): a
    ``secret`` object's ``data=``, and ``password=``, ``passwordid=`` and the like."""
    if arg.startswith("{"):
        try:
            parsed = json.loads(arg)
        except ValueError:
            return arg
        return json.dumps(_redact_json(parsed), separators=(",", ":"))
    if "=" not in arg:
        return arg
    parts = _segments(arg)
    is_secret = parts[0] == "secret" or "qom-type=secret" in parts
    out = []
    for part in parts:
        key, eq, _value = part.partition("=")
        last = key.rsplit(".", 1)[-1]
        if eq and (last in SECRET_KEYS or (is_secret and last == "data")):
            part = f"{key}={REDACTED}"
        out.append(part)
    return ",".join(out)


def redact_argv(argv: tuple[str, ...]) -> tuple[str, ...]:
    """``argv`` fit for a reader who is not root (pure)."""
    return tuple(redact_arg(a) for a in argv)


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
    """Everything the planner needs about the QEMU behind ``conn``.

    Every field of every reply is type-checked: a malformed reply is a QMPError."""
    identity = read_identity(conn.pid)
    argv = identity.argv
    executable = read_executable(conn.pid)
    binary = check_binary(executable)
    version = await conn.execute("query-version")
    qemu = field(version, "qemu", dict, "query-version")
    qemu_version = (
        field(qemu, "major", int, "query-version.qemu"),
        field(qemu, "minor", int, "query-version.qemu"),
        field(qemu, "micro", int, "query-version.qemu"),
    )
    status = field(await conn.execute("query-status"), "status", str, "query-status")
    machine = expect(
        await conn.execute("qom-get", {"path": "/machine", "property": "type"}),
        str,
        "qom-get /machine type",
    )
    if not valid_machine_type(machine.removesuffix("-machine")):
        raise QMPError(
            f"malformed QMP reply: qom-get /machine type: {machine[:60]!r} is not a machine type"
        )
    current = await conn.execute("query-current-machine")
    caps = expect(await conn.execute("query-migrate-capabilities"), list, "capabilities")
    migrate = await conn.execute("query-migrate")
    blockers = field(migrate, "blocked-reasons", list, "query-migrate", [])
    try:
        aux = await conn.execute("qom-get", {"path": "/machine", "property": "aux-ram-share"})
    except QMPError:  # QEMU before 10.0
        aux = False
    nodes = await conn.execute("query-named-block-nodes", {"flat": True})
    cgroup = read_cgroup(conn.pid)
    return VMFacts(
        name=vm_name(argv, conn.path),
        qmp_socket=str(conn.path),
        pid=conn.pid,
        argv=argv,
        executable=executable,
        qemu_version=qemu_version,
        machine_type=machine.removesuffix("-machine"),
        runstate=status,
        vfio_devices=await vfio_devices(conn),
        backends=await memory_backends(conn, conn.pid),
        wakeup_suspend_support=field(
            current, "wakeup-suspend-support", bool, "query-current-machine", False
        ),
        migration_capabilities=tuple(
            field(c, "capability", str, "query-migrate-capabilities[]") for c in caps
        ),
        migration_blockers=tuple(expect(r, str, "blocked-reasons[]") for r in blockers),
        agent_socket=str(agent_socket) if agent_socket else None,
        agent_reachable=agent_reachable,
        aux_ram_share=expect(aux, bool, "aux-ram-share"),
        identity=identity,
        binary=binary,
        cgroup=cgroup,
        parent_comm=read_parent_comm(conn.pid),
        block_files=image_paths(
            n for n in (nodes if isinstance(nodes, list) else []) if isinstance(n, dict)
        ),
        process=_process(conn.pid, conn.cred.uid),
        unit_info=await read_unit_info(conn.pid, cgroup),
    )


def _process(pid: int, listener_uid: int) -> ProcessContext:
    try:
        return read_process(pid, listener_uid)
    except (OSError, ValueError) as err:
        raise TrustError(f"QEMU pid {pid}: cannot read its credentials from /proc: {err}") from err


async def read_unit_info(pid: int, cgroup: str) -> UnitInfo | None:
    """What systemd says of the service QEMU ``pid`` runs in (its MainPID, and a transient
    unit's properties); None when its cgroup names no operator service, or systemd does
    not answer (the plan then refuses it: see :func:`cprd.units.decide_unit`)."""
    cg = cgroup_unit(cgroup)
    if cg is None or cg.kind is not UnitKind.SERVICE or is_cprds_own(cg.name):
        return None
    try:
        async with Systemd() as sd:
            info = await sd.unit_of_pid(pid)
    except LaunchError as err:
        logger.warning("cannot ask systemd about %s: %s", cg.name, err)
        return None
    return info if info.name == cg.name else None
