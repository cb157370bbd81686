"""What kind of QEMU this is, and whether cprd can bring it back (pure).

Three decisions, each a pure function of what was read from /proc and QMP:

- :func:`replay_problems`: can this argv be run again by cprd?  Inherited file
  descriptors (``-add-fd fd=N``, ``fd=``/``fds=``/``vhostfd=``/``vhostfds=`` options,
  ``/dev/fdset/`` paths, ``fd:N`` chardevs) cannot be recreated, and ``-snapshot`` keeps
  the guest's disk writes in a temporary file that is gone once QEMU quits: both are
  refused, the argument named.  ``-daemonize`` and ``-incoming`` are handled by
  :func:`replay_argv` (restore.relaunch_argv), not refused.
- :func:`manager_of`: is this QEMU run by another VM manager (libvirt, Proxmox VE)?
  cprd cannot bring such a VM back under its manager, so it is refused at check, naming
  the manager's own way to save it.
- :func:`disk_changes`: is every disk image the guest saw still the one it saw?

Only :func:`identify` and :func:`identify_all` touch the filesystem (one stat each).
"""

from __future__ import annotations

import enum
import json
import os
import re
import stat
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

#: QEMU options that take no argument (so the next word is an option, not a value).
FLAGS = frozenset(
    {
        "-daemonize", "-nodefaults", "-no-user-config", "-nographic", "-S", "-s",
        "-snapshot", "-enable-kvm", "-no-reboot", "-no-shutdown", "-only-migratable",
        "-preconfig", "-full-screen", "-alt-grab", "-ctrl-grab", "-no-hpet", "-no-acpi",
        "-win2k-hack", "-no-fd-bootchk", "-usb", "-semihosting", "-enable-fips",
        "-version", "-help", "-h", "-no-quit", "-old-param", "-xen-attach",
        "-enable-sync-profile", "-nouserconfig", "-sdl", "-curses",
    }
)  # fmt: skip
#: Option keys whose values are file descriptors the process inherited.
FD_KEYS = frozenset({"fd", "fds", "vhostfd", "vhostfds", "sock_fd"})
#: Options whose value is a key=value list (QemuOpts) or JSON that may carry FD_KEYS.
KEYVAL_OPTIONS = frozenset(
    {
        "-netdev", "-nic", "-net", "-chardev", "-device", "-object", "-drive", "-blockdev",
        "-fsdev", "-virtfs", "-audiodev", "-add-fd", "-mon", "-vnc", "-spice",
    }
)  # fmt: skip
#: Options whose value is a chardev spec, where ``fd:N`` would be an inherited fd.
CHARDEV_SPEC_OPTIONS = frozenset({"-qmp", "-qmp-pretty", "-monitor", "-serial", "-parallel"})


def options(argv: Sequence[str]) -> Iterator[tuple[int, str, str | None]]:
    """(index, option, value) for each option of a QEMU argv (argv[0] is the binary).

    ``--opt`` is read as ``-opt``; ``-opt=value`` is split; a word that is not an
    option (a bare disk image) comes as (index, "", word)."""
    i = 1
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("-") or arg == "-":
            yield i, "", arg
            i += 1
            continue
        opt = "-" + arg.lstrip("-")
        value: str | None = None
        if "=" in opt:
            opt, value = opt.split("=", 1)
            yield i, opt, value
            i += 1
            continue
        if opt in FLAGS or i + 1 >= len(argv):
            yield i, opt, None
            i += 1
            continue
        yield i, opt, argv[i + 1]
        i += 2


def keyvals(value: str) -> list[tuple[str, str]]:
    """QemuOpts ``a=b,c=d`` (``,,`` escapes a comma) or a JSON object, flattened."""
    if value.lstrip().startswith("{"):
        try:
            data = json.loads(value)
        except ValueError:
            return []
        return list(_walk_json(data))
    parts: list[str] = []
    cur = ""
    i = 0
    while i < len(value):
        if value[i] == ",":
            if value[i + 1 : i + 2] == ",":
                cur += ","
                i += 2
                continue
            parts.append(cur)
            cur = ""
        else:
            cur += value[i]
        i += 1
    parts.append(cur)
    out = []
    for part in parts:
        key, sep, val = part.partition("=")
        out.append((key, val) if sep else ("", key))
    return out


def _walk_json(data: Any, depth: int = 0) -> Iterator[tuple[str, str]]:
    if depth > 32:
        return
    if isinstance(data, Mapping):
        for k, v in data.items():
            if isinstance(v, Mapping | list):
                yield from _walk_json(v, depth + 1)
            else:
                yield str(k), str(v)
    elif isinstance(data, list):
        for v in data:
            yield from _walk_json(v, depth + 1)


def replay_problems(argv: Sequence[str]) -> tuple[str, ...]:
    """Why this QEMU argv cannot be run again by cprd (pure); empty if it can.

    Each problem names the argument, e.g. ``argv passes fd 7 (-add-fd fd=7,set=2):
    cprd cannot recreate it``."""
    problems: list[str] = []

    def fd_problem(fd: str, opt: str, value: str) -> None:
        shown = f"{opt} {value}" if opt else value
        problems.append(f"argv passes fd {fd} ({shown}): cprd cannot recreate it")

    for _, opt, value in options(argv):
        if opt == "-snapshot":
            problems.append(
                "argv has -snapshot: the guest's disk writes live in a temporary file "
                "that is deleted when QEMU quits"
            )
            continue
        if value is None:
            continue
        if "/dev/fdset/" in value:
            fdset = value.split("/dev/fdset/", 1)[1].split(",", 1)[0].split('"', 1)[0]
            fd_problem(f"set {fdset}", opt, value)
            continue
        if opt in CHARDEV_SPEC_OPTIONS and value.startswith("fd:"):
            fd_problem(value[3:], opt, value)
            continue
        if opt not in KEYVAL_OPTIONS:
            continue
        pairs = keyvals(value)
        fds = [v for k, v in pairs if k in FD_KEYS]
        if fds:
            fd_problem(", ".join(fds), opt, value)
        elif opt in ("-drive", "-blockdev") and ("snapshot", "on") in pairs:
            problems.append(
                f"argv has {opt} {value}: snapshot=on keeps the guest's disk writes in a "
                "temporary file that is deleted when QEMU quits"
            )
    return tuple(problems)


def replay_argv(argv: Sequence[str]) -> list[str]:
    """argv as cprd runs it again (pure): without ``-incoming`` (the caller adds its
    own) and without ``-daemonize`` (cprd's launchers keep QEMU in the background
    themselves, and must see the process that serves the socket; ``-pidfile`` stays, so
    the pidfile names the new QEMU)."""
    out: list[str] = list(argv[:1])
    for i, opt, value in options(argv):
        separate = bool(opt) and value is not None and "=" not in argv[i]
        if opt not in ("-incoming", "-daemonize"):
            out += argv[i : i + (2 if separate else 1)]
    return out


# --- other VM managers -----------------------------------------------------------------


class Manager(enum.Enum):
    LIBVIRT = "libvirt"
    PROXMOX = "Proxmox VE"


LIBVIRT_DAEMONS = frozenset({"libvirtd", "virtqemud"})
_LIBVIRT_SCOPE = re.compile(r"^machine-qemu\\x2d.*\.scope$|^qemu-\d+-.*\.libvirt-qemu$")
_PROXMOX_SCOPE = re.compile(r"^(\d+)\.scope$")


@dataclass(frozen=True)
class Managed:
    manager: Manager
    evidence: str
    instead: str

    def problem(self) -> str:
        return (
            f"run by {self.manager.value} ({self.evidence}): cprd cannot bring it back under "
            f"{self.manager.value}; use {self.instead} instead"
        )


def cgroup_paths(cgroup_text: str) -> list[str]:
    """The cgroup paths of a /proc/PID/cgroup text (v1 and v2 lines)."""
    out = []
    for line in cgroup_text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3 and parts[2] not in out:
            out.append(parts[2])
    return out


def _option_value(argv: Sequence[str], name: str) -> str | None:
    found = None
    for _, opt, value in options(argv):
        if opt == name:
            found = value
    return found


def _domain_name(argv: Sequence[str]) -> str:
    value = _option_value(argv, "-name") or ""
    for key, val in keyvals(value):
        if key == "guest" or (key == "" and val):
            return val
    return "DOMAIN"


def manager_of(cgroup_text: str, parent_comm: str, argv: Sequence[str]) -> Managed | None:
    """The VM manager that runs this QEMU, from its cgroup, its parent's name and its
    argv (pure); None when none is recognised."""
    paths = cgroup_paths(cgroup_text)
    for path in paths:
        parts = [p for p in path.split("/") if p]
        for n, part in enumerate(parts):
            if _LIBVIRT_SCOPE.match(part):
                return _libvirt(argv, f"cgroup {'/'.join(parts[: n + 1])}")
            m = _PROXMOX_SCOPE.match(part)
            if m and n > 0 and parts[n - 1] == "qemu.slice":
                return _proxmox(m.group(1), f"cgroup qemu.slice/{part}")
    if parent_comm in LIBVIRT_DAEMONS:
        return _libvirt(argv, f"parent process {parent_comm}")
    vmid = _option_value(argv, "-id")
    for _, _, value in options(argv):
        if value and "qmeventd.sock" in value:
            return _proxmox(vmid or "VMID", "argv connects to qmeventd.sock")
        if value and "/run/qemu-server/" in value:
            return _proxmox(vmid or "VMID", f"argv uses {value.split(',')[0]}")
    for _, _, value in options(argv):
        for marker in ("/var/lib/libvirt/qemu/domain-", "/run/libvirt/qemu/"):
            if value and marker in value:
                rest = value.split(marker, 1)[1]
                where = marker + re.split(r"[/,\"]", rest, maxsplit=1)[0]
                return _libvirt(argv, f"argv uses {where}")
    return None


def _libvirt(argv: Sequence[str], evidence: str) -> Managed:
    return Managed(
        Manager.LIBVIRT,
        evidence,
        f"libvirt's managed save (`virsh managedsave {_domain_name(argv)}`)",
    )


def _proxmox(vmid: str, evidence: str) -> Managed:
    return Managed(Manager.PROXMOX, evidence, f"`qm suspend {vmid} --todisk`")


# --- disk images ----------------------------------------------------------------------


@dataclass(frozen=True)
class DiskImage:
    """One image file (or block device) a block node of the VM used, and its identity
    once its QEMU exited at commit (all zero: not recorded, e.g. before the commit)."""

    path: str
    dev: int = 0
    ino: int = 0
    size: int = 0
    mtime_ns: int = 0

    @property
    def recorded(self) -> bool:
        return self.ino != 0 or self.dev != 0


def image_paths(nodes: Iterable[Mapping[str, Any]]) -> tuple[str, ...]:
    """The image files of ``query-named-block-nodes`` (flat) replies (pure): the
    protocol nodes' ``file``, each once, in order."""
    out: list[str] = []
    for node in nodes:
        if node.get("drv") not in ("file", "host_device", "host_cdrom"):
            continue
        path = node.get("file")
        if isinstance(path, str) and path.startswith("/") and path not in out:
            out.append(path)
    return tuple(out)


def identify(path: str) -> DiskImage | None:
    """The identity of image ``path`` now (one stat, following symlinks as QEMU did);
    None when it is gone."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    size = st.st_size
    dev = st.st_dev
    ino = st.st_ino
    if stat.S_ISBLK(st.st_mode):
        dev, ino = st.st_rdev, st.st_ino or 1
    return DiskImage(path, dev, ino, size, st.st_mtime_ns)


def identify_all(disks: Iterable[DiskImage]) -> tuple[DiskImage, ...]:
    """Each of ``disks`` with its identity now (kept unrecorded when it is gone)."""
    return tuple(identify(d.path) or DiskImage(d.path) for d in disks)


def disk_changes(recorded: Iterable[DiskImage], now: Mapping[str, DiskImage | None]) -> list[str]:
    """How each recorded image differs from what is there ``now`` (pure); empty when
    every image is the one the guest saw.  Images without a recorded identity are not
    compared."""
    out = []
    for d in recorded:
        cur = now.get(d.path)
        if not d.recorded:
            # Not committed (a put-back reloads a suspended guest before its QEMU quit
            # for good), or gone already when its QEMU quit: nothing to compare with.
            continue
        if cur is None:
            out.append(f"{d.path} is missing")
        elif (cur.dev, cur.ino) != (d.dev, d.ino):
            out.append(f"{d.path} is another file than the one the guest saw")
        elif cur.size != d.size:
            out.append(f"{d.path} changed size ({d.size} -> {cur.size} bytes)")
        elif cur.mtime_ns != d.mtime_ns:
            out.append(f"{d.path} was modified after QEMU quit")
    return out
