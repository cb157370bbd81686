"""The manifest: what was saved, and how to bring it back.

YAML, versioned, written atomically (temp file, fsync, rename, fsync of the directory),
mode 0600 in a 0700 state_dir.  The last line is ``# sha256: <hex>`` over every byte
before it, so a truncated or edited file is refused instead of silently losing VMs.
Symlinks in place of the state_dir, the manifest or a state file are refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import enum
import errno
import hashlib
import os
import platform
import re
import stat
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cprd import failpoint
from cprd.config import safe_load
from cprd.errors import ManifestError
from cprd.hosts import DiskImage, ProcessContext, valid_machine_type
from cprd.plan import MigrationSettings
from cprd.plan import safe_file_name as safe_file_name  # re-exported
from cprd.steps import Step
from cprd.trust import SYSTEM_DIRS
from cprd.units import TRANSIENT_PROPERTIES, UnitRef, valid_unit_name

VERSION = 2
#: Versions this cprd reads (version 1 had no per-VM step: it is derived from the phase).
READS = (1, 2)
#: Per-VM step history kept in the manifest (the newest entries).
HISTORY = 32
_CHECKSUM = re.compile(rb"\n# sha256: ([0-9a-f]{64})\n\Z")


class Phase(enum.Enum):
    PREPARING = "preparing"  # recorded before anything is stopped
    PREPARED = "prepared"  # every VM saved, still resumable
    COMMITTED = "committed"  # the saved QEMUs are gone: restore after the reboot
    RESTORED = "restored"  # every VM is back


class Outcome(enum.Enum):
    PENDING = "pending"
    RESTORED = "restored"
    FAILED = "failed"


@dataclass(frozen=True)
class InPlaceFile:
    id: str
    path: str
    size: int


@dataclass(frozen=True)
class VMRecord:
    name: str
    qmp_socket: str
    pid: int
    argv: tuple[str, ...]
    executable: str
    qemu_version: str
    machine_type: str
    state_file: str
    settings: MigrationSettings
    runstate_before: str
    cprd_suspended: bool
    agent_socket: str | None = None
    in_place: tuple[InPlaceFile, ...] = ()
    state_size: int | None = None  # set once the save completed and was fsynced
    outcome: Outcome = Outcome.PENDING
    reason: str = ""
    #: the step journal: the last step recorded (before it was taken), and its history
    step: Step = Step.PLANNED
    history: tuple[tuple[str, str], ...] = ()  # (step, UTC time), oldest first
    on_kexec_failure: str = "shutdown"  # shutdown | leave
    #: the QEMU binary pinned at commit (st_dev, st_ino), checked again at restore
    exe_dev: int | None = None
    exe_ino: int | None = None
    #: the disk images its block nodes used; their identity is recorded once its QEMU
    #: exited at commit, and a restore over a changed one is refused
    disks: tuple[DiskImage, ...] = ()
    #: named to be shut down at commit instead of saved (cold-booted at restore)
    shutdown_asked: bool = False
    #: who its QEMU ran as, where and with which (filtered) environment: the restore
    #: relaunches it so (hosts.relaunch_as); None in manifests from before issue 13 item 2
    process: ProcessContext | None = None
    #: vms.<name>.restore_priority when it was saved: the restore's order (higher first)
    restore_priority: int = 0
    #: the systemd service whose main process it was (issue 13 item 5): restored into it
    unit: UnitRef | None = None

    def replace(self, **changes: Any) -> VMRecord:
        return dataclasses.replace(self, **changes)

    def at(self, step: Step, **changes: Any) -> VMRecord:
        """This record with ``step`` recorded now (and ``changes``)."""
        now = datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")
        history = (*self.history, (step.value, now))[-HISTORY:]
        return dataclasses.replace(self, step=step, history=history, **changes)


@dataclass(frozen=True)
class Manifest:
    phase: Phase
    created: str
    boot_id: str
    kernel: str
    vms: tuple[VMRecord, ...] = field(default=())

    def replace(self, **changes: Any) -> Manifest:
        return dataclasses.replace(self, **changes)

    def vm(self, name: str) -> VMRecord:
        for rec in self.vms:
            if rec.name == name:
                return rec
        raise KeyError(name)

    def with_vm(self, rec: VMRecord) -> Manifest:
        return self.replace(vms=tuple(rec if r.name == rec.name else r for r in self.vms))

    @classmethod
    def new(cls, phase: Phase, vms: tuple[VMRecord, ...]) -> Manifest:
        return cls(
            phase=phase,
            created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            boot_id=boot_id(),
            kernel=platform.release(),
            vms=vms,
        )


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


# --- the state directory ----------------------------------------------------------------


def ensure_state_dir(path: Path) -> None:
    """Create state_dir 0700 if missing; refuse a symlink, a directory others own, or a
    system directory (which cprd never chmods)."""
    if os.path.normpath(path) in SYSTEM_DIRS:
        raise ManifestError(
            f"state_dir {path} is a system directory: refused",
            "give state_dir (and the manifest) a directory of its own, e.g. /var/lib/cprd",
        )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as err:
        raise ManifestError(f"state_dir {path}: cannot create: {err.strerror}") from err
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise ManifestError(
            f"state_dir {path} is a symlink: refused", "make state_dir a real directory"
        )
    if not stat.S_ISDIR(st.st_mode):
        raise ManifestError(f"state_dir {path} is not a directory")
    if st.st_uid != os.geteuid():
        raise ManifestError(f"state_dir {path} is owned by uid {st.st_uid}, not by cprd")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)


def in_state_dir(path: str | Path, state_dir: Path) -> bool:
    """Whether ``path`` names a file directly inside ``state_dir`` (no ``..``, no
    symlinked directory in between): the only place cprd creates or deletes a file a
    manifest names."""
    text = str(path)
    if not text.startswith("/") or "\0" in text:
        return False
    if os.path.normpath(text) != text:
        return False
    parent, base = os.path.split(text)
    if base in ("", ".", "..") or base.startswith("."):
        return False
    return os.path.realpath(parent) == os.path.realpath(state_dir) and (
        os.path.normpath(parent) == os.path.normpath(state_dir)
    )


def require_in_state_dir(path: str | Path, state_dir: Path, what: str) -> None:
    if not in_state_dir(path, state_dir):
        raise ManifestError(
            f"{what} {path} is not inside state_dir {state_dir}: refused",
            "a manifest may only name files in state_dir",
        )


def create_private(path: Path) -> None:
    """Create an empty 0600 file, refusing to follow a symlink or reuse a file."""
    with contextlib.suppress(FileNotFoundError):
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISREG(st.st_mode):
            raise ManifestError(f"{path} is a symlink or not a regular file: refused")
        os.unlink(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    os.close(fd)


def fsync_file(path: Path) -> int:
    """fsync a file (not following symlinks) and return its size."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fsync(fd)
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_nofollow(path: Path) -> int:
    """Open a file for reading; ManifestError if it is a symlink."""
    try:
        return os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise ManifestError(f"{path} is a symlink: refused") from err
        raise


# --- (de)serialisation --------------------------------------------------------------------


def to_dict(m: Manifest) -> dict[str, Any]:
    return {
        "version": VERSION,
        "phase": m.phase.value,
        "created": m.created,
        "host": {"boot_id": m.boot_id, "kernel": m.kernel},
        "vms": [
            {
                "name": r.name,
                "qmp_socket": r.qmp_socket,
                "pid": r.pid,
                "argv": list(r.argv),
                "executable": r.executable,
                "qemu_version": r.qemu_version,
                "machine_type": r.machine_type,
                "state_file": r.state_file,
                "state_size": r.state_size,
                "migration": r.settings.to_dict(),
                "runstate_before": r.runstate_before,
                "cprd_suspended": r.cprd_suspended,
                "agent_socket": r.agent_socket,
                "in_place": [dataclasses.asdict(f) for f in r.in_place],
                "restore": {
                    "outcome": r.outcome.value,
                    "reason": r.reason,
                    "priority": r.restore_priority,
                },
                "step": r.step.value,
                "history": [list(h) for h in r.history],
                "on_kexec_failure": r.on_kexec_failure,
                "shutdown_asked": r.shutdown_asked,
                **(
                    {"executable_pin": {"dev": r.exe_dev, "ino": r.exe_ino}}
                    if r.exe_dev is not None and r.exe_ino is not None
                    else {}
                ),
                "disks": [dataclasses.asdict(d) for d in r.disks],
                **({"process": r.process.to_dict()} if r.process is not None else {}),
                "unit": r.unit.to_dict() if r.unit is not None else None,
            }
            for r in m.vms
        ],
    }


class _Reader:
    """Typed access to a parsed manifest; every error names the key path."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, path: str, what: str) -> ManifestError:
        return ManifestError(
            f"manifest {self.source} is corrupt: {path}: {what}",
            "the state files are kept; fix or remove the manifest",
        )

    def get(
        self, data: Mapping[str, Any], key: str, kind: type | tuple[type, ...], path: str
    ) -> Any:
        if key not in data:
            raise self.fail(f"{path}{key}", "missing")
        value = data[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise self.fail(f"{path}{key}", f"unexpected value {value!r}")
        return value

    def enum(self, cls: type[enum.Enum], data: Mapping[str, Any], key: str, path: str) -> Any:
        value = self.get(data, key, str, path)
        try:
            return cls(value)
        except ValueError:
            raise self.fail(f"{path}{key}", f"unknown value {value!r}") from None


def machine_type(r: _Reader, data: Mapping[str, Any], path: str) -> str:
    name = r.get(data, "machine_type", str, path)
    if not valid_machine_type(name):
        raise r.fail(f"{path}machine_type", f"not a machine type: {name[:60]!r}")
    return str(name)


def from_dict(data: object, source: str) -> Manifest:
    r = _Reader(source)
    if not isinstance(data, dict):
        raise r.fail("top level", "not a mapping")
    version = r.get(data, "version", int, "")
    if version not in READS:
        raise ManifestError(
            f"manifest {source} has version {version}; this cprd reads version {VERSION}",
            "restore it with the cprd that wrote it",
        )
    host = r.get(data, "host", dict, "")
    vms = []
    for i, v in enumerate(r.get(data, "vms", list, "")):
        p = f"vms[{i}]."
        if not isinstance(v, dict):
            raise r.fail(f"vms[{i}]", "not a mapping")
        argv = r.get(v, "argv", list, p)
        if not argv or not all(isinstance(a, str) for a in argv):
            raise r.fail(f"{p}argv", "expected a non-empty list of strings")
        mig = r.get(v, "migration", dict, p)
        caps = r.get(mig, "capabilities", dict, f"{p}migration.")
        params = r.get(mig, "parameters", dict, f"{p}migration.")
        restore = r.get(v, "restore", dict, p)
        size = v.get("state_size")
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
            raise r.fail(f"{p}state_size", f"unexpected value {size!r}")
        in_place = []
        for j, f in enumerate(r.get(v, "in_place", list, p)):
            q = f"{p}in_place[{j}]."
            if not isinstance(f, dict):
                raise r.fail(q[:-1], "not a mapping")
            in_place.append(
                InPlaceFile(
                    r.get(f, "id", str, q), r.get(f, "path", str, q), r.get(f, "size", int, q)
                )
            )
        agent = v.get("agent_socket")
        # version 1 had no step: derived from the phase
        step = r.enum(Step, v, "step", p) if "step" in v else _v1_step(str(data.get("phase")), size)
        history = v.get("history", [])
        if not isinstance(history, list) or not all(
            isinstance(h, list) and len(h) == 2 and all(isinstance(x, str) for x in h)
            for h in history
        ):
            raise r.fail(f"{p}history", "expected a list of [step, time] pairs")
        priority = restore.get("priority", 0)  # optional: manifests before issue 15
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise r.fail(f"{p}restore.priority", f"unexpected value {priority!r}")
        on_failure = v.get("on_kexec_failure", "shutdown")
        if on_failure not in ("shutdown", "leave"):
            raise r.fail(f"{p}on_kexec_failure", f"unknown value {on_failure!r}")
        pin = v.get("executable_pin")
        exe_dev = exe_ino = None
        if pin is not None:
            if not isinstance(pin, dict):
                raise r.fail(f"{p}executable_pin", "not a mapping")
            exe_dev = r.get(pin, "dev", int, f"{p}executable_pin.")
            exe_ino = r.get(pin, "ino", int, f"{p}executable_pin.")
        raw_disks = v.get("disks", [])  # optional: manifests before issue 13 have none
        if not isinstance(raw_disks, list):
            raise r.fail(f"{p}disks", "expected a list")
        disks = []
        for j, d in enumerate(raw_disks):
            q = f"{p}disks[{j}]."
            if not isinstance(d, dict):
                raise r.fail(q[:-1], "not a mapping")
            disks.append(
                DiskImage(
                    r.get(d, "path", str, q),
                    *(r.get(d, k, int, q) for k in ("dev", "ino", "size", "mtime_ns")),
                )
            )
        process = _process(r, v.get("process"), f"{p}process")
        unit = _unit(r, v.get("unit"), f"{p}unit")
        vms.append(
            VMRecord(
                name=r.get(v, "name", str, p),
                qmp_socket=r.get(v, "qmp_socket", str, p),
                pid=r.get(v, "pid", int, p),
                argv=tuple(argv),
                executable=r.get(v, "executable", str, p),
                qemu_version=r.get(v, "qemu_version", str, p),
                machine_type=machine_type(r, v, p),
                state_file=r.get(v, "state_file", str, p),
                settings=MigrationSettings(dict(caps), dict(params)),
                runstate_before=r.get(v, "runstate_before", str, p),
                cprd_suspended=r.get(v, "cprd_suspended", bool, p),
                agent_socket=agent if isinstance(agent, str) else None,
                in_place=tuple(in_place),
                state_size=size,
                outcome=r.enum(Outcome, restore, "outcome", f"{p}restore."),
                reason=str(restore.get("reason", "")),
                step=step,
                history=tuple((h[0], h[1]) for h in history),
                on_kexec_failure=on_failure,
                shutdown_asked=v.get("shutdown_asked", False) is True,
                exe_dev=exe_dev,
                exe_ino=exe_ino,
                disks=tuple(disks),
                process=process,
                restore_priority=priority,
                unit=unit,
            )
        )
    names = [v.name for v in vms]
    if len(set(names)) != len(names):
        raise r.fail("vms", "two entries share a name")
    return Manifest(
        phase=r.enum(Phase, data, "phase", ""),
        created=str(data.get("created", "")),
        boot_id=str(host.get("boot_id", "")),
        kernel=str(host.get("kernel", "")),
        vms=tuple(vms),
    )


def _process(r: _Reader, data: object, path: str) -> ProcessContext | None:
    """The optional ``process`` of a VM entry (absent in manifests before issue 13)."""
    if data is None:
        return None
    if not isinstance(data, dict):
        raise r.fail(path, "not a mapping")
    q = f"{path}."
    groups = r.get(data, "groups", list, q)
    if not all(isinstance(g, int) and not isinstance(g, bool) for g in groups):
        raise r.fail(f"{q}groups", "expected a list of gids")
    env = r.get(data, "env", dict, q)
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise r.fail(f"{q}env", "expected a mapping of strings")
    return ProcessContext(
        uid=r.get(data, "uid", int, q),
        gid=r.get(data, "gid", int, q),
        groups=tuple(groups),
        cwd=r.get(data, "cwd", str, q),
        env=tuple(sorted(env.items())),
        started_as_root=data.get("started_as_root", False) is True,
    )


def _unit(r: _Reader, raw: object, path: str) -> UnitRef | None:
    """The optional ``unit`` of a VM (manifests before issue 13 item 5 have none)."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise r.fail(path, "not a mapping")
    name = r.get(raw, "name", str, f"{path}.")
    if not valid_unit_name(name) or not name.endswith(".service"):
        raise r.fail(f"{path}.name", f"not a service name: {name!r}")
    props = []
    for j, prop in enumerate(r.get(raw, "properties", list, f"{path}.")):
        q = f"{path}.properties[{j}]."
        if not isinstance(prop, dict):
            raise r.fail(q[:-1], "not a mapping")
        pname = r.get(prop, "name", str, q)
        sig = TRANSIENT_PROPERTIES.get(pname)
        if sig is None or r.get(prop, "signature", str, q) != sig:
            raise r.fail(f"{q}name", f"not a property cprd sets: {pname!r}")
        kind = {"s": str, "t": int, "as": list}[sig]
        value = r.get(prop, "value", kind, q)
        if sig == "as":
            if not all(isinstance(x, str) for x in value):
                raise r.fail(f"{q}value", "expected a list of strings")
            value = tuple(value)
        props.append((pname, sig, value))
    return UnitRef(name, r.get(raw, "transient", bool, f"{path}."), tuple(props))


def _v1_step(phase: str, size: object) -> Step:
    if phase == "committed":
        return Step.COMMITTED
    if phase == "restored":
        return Step.RESTORED
    return Step.SAVED if size is not None else Step.MIGRATING


def dumps(m: Manifest) -> bytes:
    body = yaml.safe_dump(to_dict(m), sort_keys=False, default_flow_style=False, width=1000)
    data = body.encode()
    return data + b"# sha256: " + hashlib.sha256(data).hexdigest().encode() + b"\n"


def loads(data: bytes, source: str) -> Manifest:
    match = _CHECKSUM.search(b"\n" + data if not data.startswith(b"\n") else data)
    if match is None:
        raise ManifestError(
            f"manifest {source} is truncated or corrupt: no checksum line at its end",
            "the state files are kept; fix or remove the manifest",
        )
    body = data[: len(data) - len(match.group(0)) + 1]
    if hashlib.sha256(body).hexdigest().encode() != match.group(1):
        raise ManifestError(
            f"manifest {source} is corrupt: checksum mismatch",
            "the state files are kept; fix or remove the manifest",
        )
    try:
        parsed = safe_load(body.decode())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ManifestError(f"manifest {source} is corrupt: not valid YAML") from err
    return from_dict(parsed, source)


_TEMPORARY = re.compile(r"\.(?P<name>.+)\.(?P<pid>[0-9]+)\.tmp")


def sweep_temporaries(path: Path) -> list[str]:
    """Remove the temporary files a writer of ``path`` (the manifest) left when it was
    killed between creating and renaming them: ``.<name>.<pid>.tmp`` whose writer is
    gone (no such pid, or the file is older than this boot). A live writer's file is
    left alone. Returns the names removed."""
    removed: list[str] = []
    try:
        entries = os.listdir(path.parent)
    except OSError:
        return removed
    booted = _boot_time()
    for entry in entries:
        match = _TEMPORARY.fullmatch(entry)
        if match is None or match.group("name") != path.name:
            continue
        pid = int(match.group("pid"))
        temp = path.parent / entry
        try:
            st = os.lstat(temp)
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            continue  # cprd never wrote it: not cprd's to delete
        if pid != os.getpid() and _alive(pid) and st.st_mtime >= booted:
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
            removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _boot_time() -> float:
    try:
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("btime "):
                return float(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0.0


def write(path: Path, m: Manifest) -> None:
    """Replace the manifest atomically."""
    ensure_state_dir(path.parent)
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISLNK(os.lstat(path).st_mode):
            raise ManifestError(f"manifest {path} is a symlink: refused")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            data = dumps(m)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)  # a full disk leaves no half-written temp file behind
        raise
    fsync_dir(path.parent)


def read(path: Path) -> Manifest:
    """Load and verify the manifest; ManifestError with a one-line reason otherwise."""
    try:
        fd = open_nofollow(path)
    except FileNotFoundError:
        raise ManifestError(f"no manifest at {path}: nothing to restore") from None
    except OSError as err:
        raise ManifestError(f"manifest {path}: cannot open: {err.strerror}") from err
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ManifestError(f"manifest {path} is not a regular file: refused")
        if st.st_uid != os.geteuid():
            raise ManifestError(
                f"manifest {path} is owned by uid {st.st_uid}, not by cprd: refused",
                "only a manifest cprd wrote is restored",
            )
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise ManifestError(
                f"manifest {path} is writable by group or others "
                f"(mode {stat.S_IMODE(st.st_mode):04o}): refused",
                "only a manifest cprd wrote is restored",
            )
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return loads(b"".join(chunks), str(path))


def remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    fsync_dir(path.parent)


class Journal:
    """The manifest of an operation in memory: every change is written (atomically,
    fsynced) before the step it records is taken.

    :meth:`step` is the one place where a VM's step is recorded, and so the one place
    where a failpoint (:mod:`cprd.failpoint`) may fire.
    """

    def __init__(self, path: Path, manifest: Manifest) -> None:
        self.path = path
        self.manifest = manifest

    @classmethod
    def create(cls, path: Path, manifest: Manifest) -> Journal:
        write(path, manifest)
        return cls(path, manifest)

    @classmethod
    def load(cls, path: Path) -> Journal:
        return cls(path, read(path))

    def vm(self, name: str) -> VMRecord:
        return self.manifest.vm(name)

    def put(self, rec: VMRecord) -> None:
        """Record ``rec`` as it is (no new step)."""
        self.manifest = self.manifest.with_vm(rec)
        write(self.path, self.manifest)

    def step(self, name: str, step: Step, **changes: Any) -> VMRecord:
        """Record that ``step`` is about to be taken for VM ``name``; return the record."""
        rec = self.manifest.vm(name).at(step, **changes)
        self.put(rec)
        failpoint.hit(step.value, name, rec.pid)
        return rec

    def record_steps(self, names: Collection[str], step: Step) -> None:
        """Record ``step`` for several VMs in one write (VMs stopped together); each
        caller then calls :meth:`taking` before taking it for its VM."""
        manifest = self.manifest
        for name in names:
            manifest = manifest.with_vm(manifest.vm(name).at(step))
        self.manifest = manifest
        write(self.path, self.manifest)

    def taking(self, name: str, step: Step) -> None:
        """``step``, recorded by :meth:`record_steps`, is about to be taken for ``name``."""
        failpoint.hit(step.value, name, self.manifest.vm(name).pid)

    def phase(self, phase: Phase, keep: set[str] | None = None) -> None:
        """Move the whole manifest to ``phase`` (keeping only the VMs named in ``keep``)."""
        vms = (
            self.manifest.vms
            if keep is None
            else tuple(r for r in self.manifest.vms if r.name in keep)
        )
        self.manifest = self.manifest.replace(phase=phase, vms=vms)
        write(self.path, self.manifest)

    def remove(self) -> None:
        remove(self.path)
