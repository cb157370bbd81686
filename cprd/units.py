"""VMs run as the operator's own systemd units (issue 13 item 5): pure decisions.

- :func:`cgroup_unit`: the unit a QEMU's cgroup (``/proc/PID/cgroup``) puts it in: a
  system service (``vm@web.service``), a scope (``run-r1.scope``), a login session's
  scope (``session-3.scope``) or a unit of a user's own manager (``user@1000.service``).
- :func:`decide_unit`: what cprd records and does for it, from the cgroup and what
  systemd's D-Bus API said of that unit (:class:`UnitInfo`):

  ========================================  ===============================================
  the main process of a system service      restored into that same unit (:class:`UnitRef`)
  the main process of a transient service   re-created under the same name with the
                                            properties it had (``transient``)
  another process of a service              refused: the unit's main process is something
                                            else, which cprd cannot bring back
  in a scope, a session, a user's manager   handled: relaunched by cprd's own launcher
                                            (``restore.launcher``), outside that scope
  ========================================  ===============================================

- :func:`exec_command`: the service's single ``ExecStart=`` as systemd's D-Bus API gives
  it, type-checked (:attr:`UnitInfo.exec_start`): the root-held copy of a QEMU's argv
  that :func:`cprd.hosts.argv_anchored` compares with /proc (issue 13 item 2).
- :func:`dropin`, :func:`exec_line`, :func:`mount_needs`: what ``cprd-generator`` writes
  (see :mod:`cprd.generator`).

Nothing here does I/O.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cprd.hosts import cgroup_paths, keyvals, options

#: Where cprd-restore marks a unit it is starting: the generator's drop-in makes the
#: unit's start conditional on this file (``ConditionPathExists=<dir>/%n``), so the
#: unit's own start at boot never runs QEMU (neither a cold boot nor an empty
#: ``-incoming defer`` QEMU); only cprd-restore's start does.
RESTORING_DIR = "/run/cprd/restoring"
#: A unit whose restore failed in this boot: the generator writes no drop-in for it
#: (the unit is again as the operator wrote it).  /run is empty at every boot.
FAILED_DIR = "/run/cprd/restore-failed"
#: The drop-in's file name (in ``<unit>.d/``), also how cprd recognises it in the
#: unit's DropInPaths.
DROPIN_NAME = "50-cprd-restore.conf"
#: systemd's "not set" / "infinity" for 64-bit properties.
UINT64_MAX = 2**64 - 1

#: Properties of a transient service that cprd records and sets again when it
#: re-creates the unit (StartTransientUnit), with their D-Bus signatures.  ExecStart and
#: Type are cprd's own (the replayed argv, Type=exec).
TRANSIENT_PROPERTIES: Mapping[str, str] = {
    "Description": "s",
    "Slice": "s",
    "Before": "as",  # e.g. Before=cprd-kexec-guard.service, as the operator guide says
    "After": "as",
    "User": "s",
    "Group": "s",
    "WorkingDirectory": "s",
    "Environment": "as",
    "KillMode": "s",
    "CollectMode": "s",
    "CPUWeight": "t",
    "CPUQuotaPerSecUSec": "t",
    "MemoryLow": "t",
    "MemoryHigh": "t",
    "MemoryMax": "t",
    "MemorySwapMax": "t",
    "TasksMax": "t",
    "IOWeight": "t",
    "LimitMEMLOCK": "t",  # sets the soft limit too
}


def has_control(text: str) -> bool:
    """Whether ``text`` has a character a line-based file (a unit file) would read as
    an end of line or a control: C0 (newline, carriage return...) or DEL (pure)."""
    return any(ord(c) < 0x20 or ord(c) == 0x7F for c in text)


def control_in(value: object) -> str | None:
    """The first string inside ``value`` (a string, or lists and tuples of them) with a
    control character, or None (pure)."""
    if isinstance(value, str):
        return value if has_control(value) else None
    if isinstance(value, list | tuple):
        for item in value:
            if (found := control_in(item)) is not None:
                return found
    return None


_UNIT_NAME = re.compile(r"[A-Za-z0-9:_.@\\-]{1,250}\.(service|scope)")


class UnitKind(enum.Enum):
    SERVICE = "service"  # a system service: restored into it
    SCOPE = "scope"  # a scope (systemd-run --scope, a VM manager's own scope)
    SESSION = "session"  # a login session's scope (a QEMU started from a shell)
    USER = "user"  # inside a user's own service manager (user@UID.service)


@dataclass(frozen=True)
class CgroupUnit:
    name: str
    kind: UnitKind


@dataclass(frozen=True)
class UnitInfo:
    """What systemd's D-Bus API says of a unit (read by :mod:`cprd.sysd`)."""

    name: str
    main_pid: int
    transient: bool
    properties: Mapping[str, Any] = field(default_factory=dict)
    #: the argv of the service's single ``ExecStart=`` entry as systemd (PID 1, root)
    #: holds it; None when it has none or several, or systemd's answer was malformed
    exec_start: tuple[str, ...] | None = None
    #: that entry's executable, symlinks resolved (None: as ``exec_start``)
    exec_path: str | None = None


def exec_command(value: object) -> tuple[str | None, tuple[str, ...] | None]:
    """(path, argv) of the single entry of a service's ``ExecStart`` property
    (``a(sasbttttuii)``: path, argv, ignore-failure, timestamps, pid, code, status);
    (None, None) for zero or several entries or any field of the wrong type (it comes
    over D-Bus: checked, not trusted)."""
    if not isinstance(value, list | tuple) or len(value) != 1:
        return None, None
    entry = value[0]
    if not isinstance(entry, list | tuple) or len(entry) < 2:
        return None, None
    path, argv = entry[0], entry[1]
    if not isinstance(path, str) or not path.startswith("/"):
        return None, None
    if not isinstance(argv, list | tuple) or not argv:
        return None, None
    if not all(isinstance(a, str) for a in argv):
        return None, None
    return path, tuple(argv)


@dataclass(frozen=True)
class UnitRef:
    """The systemd service a VM is restored into (manifest field ``unit``)."""

    name: str
    transient: bool = False
    #: a transient unit's properties, as (name, D-Bus signature, value)
    properties: tuple[tuple[str, str, Any], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "transient": self.transient,
            "properties": [
                {"name": n, "signature": s, "value": list(v) if isinstance(v, tuple) else v}
                for n, s, v in self.properties
            ],
        }


def valid_unit_name(name: str) -> bool:
    return bool(_UNIT_NAME.fullmatch(name)) and ".." not in name


def cgroup_unit(cgroup_text: str) -> CgroupUnit | None:
    """The outermost unit of a /proc/PID/cgroup text (pure); None in the root cgroup or
    outside systemd's tree.  The unified (v2) line wins over the v1 name=systemd one."""
    lines = cgroup_text.splitlines()
    v2 = [ln.split(":", 2)[2] for ln in lines if ln.startswith("0::")]
    v1 = [ln.split(":", 2)[2] for ln in lines if ":name=systemd:" in ln]
    for path in [*v2, *v1, *cgroup_paths(cgroup_text)]:
        for part in (p for p in path.split("/") if p):
            if part.endswith(".slice"):
                continue
            if not valid_unit_name(part):
                break  # not a unit: a cgroup of its own (docker, a delegated tree)
            if re.fullmatch(r"user@\d+\.service", part):
                return CgroupUnit(part, UnitKind.USER)
            if re.fullmatch(r"session-[^/]+\.scope", part):
                return CgroupUnit(part, UnitKind.SESSION)
            kind = UnitKind.SERVICE if part.endswith(".service") else UnitKind.SCOPE
            return CgroupUnit(part, kind)
    return None


def is_cprds_own(unit: str) -> bool:
    """cprd's own units: a QEMU there was started by cprd's launchers, and is restored
    by them (cprd-vm-<name>.service is re-created by the systemd launcher)."""
    return unit in ("cprd.service", "cprd-restore.service") or unit.startswith("cprd-vm-")


@dataclass(frozen=True)
class UnitDecision:
    unit: UnitRef | None = None
    note: str | None = None
    problem: str | None = None


def transient_properties(props: Mapping[str, Any]) -> tuple[tuple[str, str, Any], ...]:
    """The recorded properties of a transient unit (pure): those of
    :data:`TRANSIENT_PROPERTIES` that are set (not empty, not "infinity")."""
    out: list[tuple[str, str, Any]] = []
    for name, sig in TRANSIENT_PROPERTIES.items():
        value = props.get(name)
        if value is None:
            continue
        if sig == "t" and (not isinstance(value, int) or value == UINT64_MAX):
            continue
        if sig == "s" and (not isinstance(value, str) or not value):
            continue
        if sig == "as":
            if not isinstance(value, list | tuple) or not value:
                continue
            value = tuple(str(v) for v in value)
        out.append((name, sig, value))
    return tuple(out)


def decide_unit(cg: CgroupUnit | None, pid: int, info: UnitInfo | None) -> UnitDecision:
    """How cprd treats a QEMU by the unit it runs in (pure); ``info`` is what systemd
    said of that unit (None: not asked, or systemd did not answer)."""
    if cg is None or is_cprds_own(cg.name):
        return UnitDecision()
    if cg.kind is not UnitKind.SERVICE:
        where = {
            UnitKind.SCOPE: f"scope {cg.name}",
            UnitKind.SESSION: f"login session scope {cg.name}",
            UnitKind.USER: f"the user manager {cg.name}",
        }[cg.kind]
        return UnitDecision(
            note=f"runs in {where}: restored by cprd's launcher (restore.launcher), outside it"
        )
    if info is None:
        return UnitDecision(
            problem=f"runs in {cg.name} but systemd does not answer about that unit: cprd "
            "cannot restore it there"
        )
    if info.main_pid != pid:
        return UnitDecision(
            problem=f"runs in {cg.name} but is not its main process (MainPID {info.main_pid}): "
            "cprd can restore a QEMU only into a unit whose main process it is"
        )
    if info.transient:
        props = transient_properties(info.properties)
        return UnitDecision(
            UnitRef(cg.name, True, props),
            note=f"main process of transient {cg.name}: re-created under that name with "
            f"its properties ({', '.join(n for n, _, _ in props) or 'none set'})",
        )
    return UnitDecision(UnitRef(cg.name), note=f"main process of {cg.name}: restored into it")


# --- what the generator writes ----------------------------------------------------------

_PLAIN = re.compile(r"[A-Za-z0-9_@+=:,./-]+")


def exec_word(word: str) -> str:
    """One word of a systemd command line (pure): quoted and escaped so systemd passes
    it on unchanged (no ``$VAR`` expansion, no ``%`` specifier, a byte that is not
    UTF-8 as ``\\xNN``); ValueError for a lone surrogate that stands for no byte."""
    if _PLAIN.fullmatch(word):
        return word
    out = ['"']
    for ch in word:
        if ch == "\\":
            out.append("\\\\")
        elif ch == '"':
            out.append('\\"')
        elif ch == "%":
            out.append("%%")
        elif ch == "$":
            out.append("$$")
        elif ch == "\n":
            out.append("\\n")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02x}")
        elif 0xDC80 <= ord(ch) <= 0xDCFF:  # a byte that is not UTF-8 (surrogateescape)
            out.append(f"\\x{ord(ch) - 0xDC00:02x}")
        elif 0xD800 <= ord(ch) <= 0xDFFF:
            raise ValueError(f"argument {word!r} is neither UTF-8 nor bytes")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def exec_line(executable: str, argv: Sequence[str]) -> str:
    """``ExecStart=`` value running ``executable`` with ``argv`` (argv[0] kept: ``@``)."""
    return " ".join(["@" + exec_word(executable), *(exec_word(a) for a in argv)])


def dropin(vm: str, unit: str, executable: str, argv: Sequence[str], manifest: str) -> str:
    """The drop-in that turns the operator's ``unit`` into the restore of VM ``vm``
    (pure); ``argv`` is the relaunch argv (with ``-incoming defer``)."""
    return (
        f"# Written by cprd-generator: VM {vm!r} has a saved state in {manifest}.\n"
        "# While it does, this unit starts only when `cprd restore` starts it (the\n"
        "# condition file is its own; the boot's or a start by hand is skipped), and then\n"
        "# runs QEMU waiting for the state (-incoming defer) that cprd restore loads: never\n"
        "# a cold boot. Once the VM is restored, or its restore failed, the next\n"
        "# daemon-reload (cprd restore does one) drops this file.\n"
        "[Unit]\n"
        f"ConditionPathExists={RESTORING_DIR}/%n\n"
        "[Service]\n"
        "Type=exec\n"
        "Restart=no\n"
        "ExecStart=\n"
        f"ExecStart={exec_line(executable, argv)}\n"
    )


_SYSTEM = ("/dev/", "/proc/", "/sys/")


def _path_ok(path: str) -> bool:
    return (
        path.startswith("/")
        and not path.startswith(_SYSTEM)
        and not any(
            c.isspace() or c in "\"'\\;" or ord(c) < 0x20 or 0xD800 <= ord(c) <= 0xDFFF
            for c in path
        )
    )


def argv_paths(argv: Sequence[str]) -> list[str]:
    """Absolute paths in a QEMU argv (pure): option values and ``key=/path`` values
    (disk images, kernel, memory-backend files, socket paths, pidfile)."""
    out: list[str] = []
    for _, _, value in options(argv):
        if value is None:
            continue
        if value.startswith("/"):
            out.append(value.split(",", 1)[0])
            continue
        for _, val in keyvals(value):
            if val.startswith("/"):
                out.append(val)
    return out


def mount_needs(
    paths: Iterable[str],
) -> list[str]:
    """The paths cprd-restore needs mounted (RequiresMountsFor=), deduplicated, in
    order; devices, /proc and /sys (always there) and paths systemd cannot take
    unquoted are left out (pure)."""
    out: list[str] = []
    for p in paths:
        if _path_ok(p) and p not in out:
            out.append(p)
    return out


def escape_path(path: str) -> str:
    """systemd's path escaping (``systemd-escape --path``), as in mount unit names (pure):
    slashes become ``-``; anything but ASCII letters, digits, ``:``, ``_`` and a ``.``
    that does not lead becomes ``\\xNN`` per byte."""
    parts = [p for p in path.split("/") if p]
    if not parts:
        return "-"
    out: list[str] = []
    for i, ch in enumerate("/".join(parts)):
        if ch == "/":
            out.append("-")
        elif ch.isascii() and (ch.isalnum() or ch in ":_" or (ch == "." and i > 0)):
            out.append(ch)
        else:
            out.append("".join(f"\\x{b:02x}" for b in ch.encode("utf-8", "surrogateescape")))
    return "".join(out)


def mount_units(paths: Iterable[str]) -> list[str]:
    """The mount units that may hold ``paths`` (pure): one per leading directory of each
    path (and the path itself), deduplicated, in order; the root is always mounted."""
    out: list[str] = []
    for path in paths:
        parts = [p for p in path.split("/") if p]
        for n in range(1, len(parts) + 1):
            unit = escape_path("/".join(parts[:n])) + ".mount"
            if unit not in out:
                out.append(unit)
    return out


def needs_dropin(paths: Sequence[str]) -> str:
    """The drop-in for cprd-restore.service ordering it after the mounts ``paths`` need.

    ``Wants=`` and ``After=`` on the mount units, not ``RequiresMountsFor=``: most of
    these paths come from QEMU argv and QMP answers, which the QEMU's user (or a guest
    that took over the QEMU) chose; a path on a mount that fails must cost that VM its
    restore, never stop cprd-restore for every VM (a wanted unit that fails or does not
    exist does not).  cprd-restore.service itself requires state_dir's mount."""
    body = "".join(f"Wants={u}\nAfter={u}\n" for u in mount_units(paths))
    return (
        "# Written by cprd-generator: cprd-restore starts once the file systems the saved\n"
        "# VMs need are mounted (state files, disk images, memory files, sockets), not\n"
        "# after every mount of the host; a mount that fails costs only the VMs on it.\n"
        "[Unit]\n" + body
    )
