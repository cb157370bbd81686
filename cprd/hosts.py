"""What kind of QEMU this is, and whether cprd can bring it back (pure).

Three decisions, each a pure function of what was read from /proc and QMP:

- :func:`replay_problems`: can this argv be run again by cprd?  Inherited file
  descriptors (``-add-fd fd=N``, ``fd=``/``fds=``/``vhostfd=``/``vhostfds=`` options,
  ``/dev/fdset/`` paths, ``fd:N`` chardevs) cannot be recreated, and ``-snapshot`` keeps
  the guest's disk writes in a temporary file that is gone once QEMU quits: both are
  refused, the argument named.  ``-daemonize`` and ``-incoming`` are handled by
  :func:`replay_argv` (:func:`relaunch_argv`), not refused.
- :func:`manager_of`: is this QEMU run by another VM manager (libvirt, Proxmox VE)?
  cprd cannot bring such a VM back under its manager, so it is refused at check, naming
  the manager's own way to save it.
- :func:`disk_changes`: is every disk image the guest saw still the one it saw?

- :func:`relaunch_as`: as whom, where and with which environment a QEMU is relaunched
  (:class:`ProcessContext` recorded at save, :class:`RunAs` for the launchers);
  :func:`run_as_problem` says why it cannot be; :func:`argv_anchored` whether its argv
  is the one root's systemd holds, so that replaying it as root trusts nobody else.

Only :func:`identify`, :func:`identify_all` (one stat each) and :func:`read_process`
(/proc) touch the filesystem.
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

from cprd.trust import dropped_uid

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


#: A machine type name as QEMU spells them (``pc-q35-10.0``, ``virt-9.2``, ``microvm``).
_MACHINE_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def valid_machine_type(name: str) -> bool:
    """Whether ``name`` can be a machine type (pure).  It comes from QEMU over QMP and is
    written into the relaunch's ``-machine`` value: a comma there would add machine
    properties that QEMU, not the operator, chose."""
    return bool(_MACHINE_TYPE.fullmatch(name))


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


_MACHINE_OPTS = ("-machine", "-M", "--machine")


def relaunch_argv(argv: Sequence[str], machine_type: str) -> list[str]:
    """The recorded argv as cprd runs it again (pure): without ``-daemonize`` (see
    :func:`replay_argv`), with ``-incoming defer`` in place of any
    ``-incoming`` and the machine type pinned."""
    argv = replay_argv(argv)
    out: list[str] = []
    pinned = False
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in _MACHINE_OPTS and i + 1 < len(argv):
            out += [arg, _pin_machine(argv[i + 1], machine_type)]
            pinned = True
            i += 2
            continue
        for opt in _MACHINE_OPTS:
            if arg.startswith(opt + "="):
                out.append(f"{opt}={_pin_machine(arg[len(opt) + 1 :], machine_type)}")
                pinned = True
                break
        else:
            out.append(arg)
        i += 1
    if not pinned:
        out += ["-machine", machine_type]
    return [*out, "-incoming", "defer"]


def _pin_machine(value: str, machine_type: str) -> str:
    parts = value.split(",")
    for n, part in enumerate(parts):
        if part.startswith("type="):
            parts[n] = f"type={machine_type}"
            return ",".join(parts)
    if parts and "=" not in parts[0]:
        parts[0] = machine_type
    else:
        parts.insert(0, machine_type)
    return ",".join(parts)


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


# --- who a QEMU runs as, and where (issue 13 item 2) ------------------------------------

#: Environment variables a relaunched QEMU gets back from the recorded /proc/PID/environ,
#: each with the values it may take.  Everything else is dropped: environ is memory a
#: compromised QEMU can rewrite, and a QEMU that drops root itself is relaunched as root.
#: Never replayed, for that reason: LD_* (LD_PRELOAD, LD_LIBRARY_PATH, LD_AUDIT...),
#: GCONV_PATH, LOCPATH, NLSPATH, MALLOC_*, GLIBC_TUNABLES, HOSTALIASES, RES_OPTIONS,
#: LOCALDOMAIN, TMPDIR, HOME, PATH, QEMU_MODULE_DIR and any other QEMU_* (they change
#: what QEMU loads or are test knobs).  PATH is not replayed but set to
#: :data:`RELAUNCH_PATH` (a tap script QEMU runs finds the system's tools).
LOCALE_VARIABLES = frozenset(
    {
        "LANG", "LANGUAGE", "LC_ALL", "LC_CTYPE", "LC_NUMERIC", "LC_TIME", "LC_COLLATE",
        "LC_MONETARY", "LC_MESSAGES", "LC_PAPER", "LC_NAME", "LC_ADDRESS", "LC_TELEPHONE",
        "LC_MEASUREMENT", "LC_IDENTIFICATION",
    }
)  # fmt: skip
ENV_ALLOWED = LOCALE_VARIABLES | {"TZ", "XDG_RUNTIME_DIR", "DISPLAY", "WAYLAND_DISPLAY"}
RELAUNCH_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: A locale name (no "/": glibc then reads only the system's locale files).
_LOCALE_VALUE = re.compile(r"[A-Za-z0-9_.@:+-]{1,64}")
#: A zone name under /usr/share/zoneinfo or a POSIX TZ rule (no absolute path, no "..").
_TZ_VALUE = re.compile(r":?[A-Za-z0-9_+,.<>-][A-Za-z0-9_+,./<>:-]{0,63}")
_DISPLAY_VALUE = re.compile(r"[A-Za-z0-9_.-]{0,64}:[0-9]{1,5}(\.[0-9]{1,3})?")
_WAYLAND_VALUE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def env_value_allowed(key: str, value: str, uid: int) -> bool:
    """Whether ``key=value`` from a QEMU of real uid ``uid`` is replayed (pure)."""
    if key in LOCALE_VARIABLES:
        return _LOCALE_VALUE.fullmatch(value) is not None
    if key == "TZ":
        return _TZ_VALUE.fullmatch(value) is not None and ".." not in value
    if key == "XDG_RUNTIME_DIR":
        own = f"/run/user/{uid}"
        norm = os.path.normpath(value) if value.startswith("/") else ""
        return uid != 0 and norm == value and (value == own or value.startswith(own + "/"))
    if key == "DISPLAY":
        return _DISPLAY_VALUE.fullmatch(value) is not None
    if key == "WAYLAND_DISPLAY":
        return _WAYLAND_VALUE.fullmatch(value) is not None
    return False


def filter_environ(raw: bytes, uid: int) -> tuple[tuple[str, str], ...]:
    """The variables of a /proc/PID/environ text that a relaunch replays (pure), sorted;
    see :data:`ENV_ALLOWED`.  A name given twice counts once (the first, as getenv)."""
    out: dict[str, str] = {}
    for entry in raw.split(b"\0")[:256]:
        key_b, sep, value_b = entry.partition(b"=")
        try:
            key, value = key_b.decode("ascii"), value_b.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if sep and key in ENV_ALLOWED and key not in out and env_value_allowed(key, value, uid):
            out[key] = value
    return tuple(sorted(out.items()))


@dataclass(frozen=True)
class ProcessContext:
    """Who a QEMU ran as and where, recorded at save: its credentials from the kernel
    (/proc/PID/status: real uid and gid, supplementary groups), its working directory
    (/proc/PID/cwd) and its environment filtered through :data:`ENV_ALLOWED`.

    ``started_as_root``: its QMP socket was listened on by root (SO_PEERCRED), so it was
    started as root.  Only then does a ``-run-with user=`` in its argv make it "a QEMU
    that drops root itself": argv is memory a compromised QEMU can rewrite, and a QEMU
    that always ran as uid N must not get itself relaunched as root by writing
    ``-run-with user=N`` there."""

    uid: int
    gid: int
    groups: tuple[int, ...]
    cwd: str
    env: tuple[tuple[str, str], ...] = ()
    started_as_root: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "uid": self.uid,
            "gid": self.gid,
            "groups": list(self.groups),
            "cwd": self.cwd,
            "env": dict(self.env),
            "started_as_root": self.started_as_root,
        }


def _status_field(status: str, key: str) -> list[int]:
    for line in status.splitlines():
        if line.startswith(key + ":"):
            return [int(v) for v in line.split()[1:]]
    raise ValueError(f"no {key} line")


def read_process(pid: int, listener_uid: int) -> ProcessContext:
    """The :class:`ProcessContext` of process ``pid`` now (reads /proc; OSError or
    ValueError when it cannot be read); ``listener_uid``: the uid its QMP socket was
    listened on as (SO_PEERCRED).  A deleted working directory reads as its path with
    `` (deleted)``: the planner refuses it."""
    with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
        status = f.read()
    uid = _status_field(status, "Uid")[0]
    gid = _status_field(status, "Gid")[0]
    groups = tuple(_status_field(status, "Groups"))
    cwd = os.readlink(f"/proc/{pid}/cwd")
    with open(f"/proc/{pid}/environ", "rb") as f:
        raw = f.read(1 << 20)
    return ProcessContext(uid, gid, groups, cwd, filter_environ(raw, uid), listener_uid == 0)


@dataclass(frozen=True)
class RunAs:
    """How a launcher starts a QEMU: its credentials, working directory and
    environment (``env`` None: cprd's own, for a record from before issue 13 item 2)."""

    uid: int
    gid: int
    groups: tuple[int, ...]
    cwd: str
    env: tuple[tuple[str, str], ...] | None
    why: str

    @property
    def environment(self) -> dict[str, str] | None:
        """The whole environment QEMU gets (with :data:`RELAUNCH_PATH`), or None."""
        if self.env is None:
            return None
        return {"PATH": RELAUNCH_PATH, **dict(self.env)}


#: How a record without a process context (an older manifest) is relaunched.
LEGACY_RUN_AS = RunAs(0, 0, (), "/", None, "as root from / (no process context recorded)")


def relaunch_as(ctx: ProcessContext | None, argv: Sequence[str]) -> RunAs:
    """As whom, where and with what environment cprd relaunches this QEMU (pure apart
    from the user-name lookup of ``-run-with user=NAME``).

    A QEMU started as root that drops privileges itself (``-run-with user=``,
    ``-runas``) is relaunched as root, so that it drops again; any other QEMU as the uid,
    gid and groups it ran as (never as root unless it was root), in its working directory
    with its filtered environment."""
    if ctx is None:
        return LEGACY_RUN_AS
    # Filtered again: a manifest is root's, but the rule is kept in one place.
    env = tuple((k, v) for k, v in ctx.env if env_value_allowed(k, v, ctx.uid))
    if ctx.uid == 0:
        return RunAs(0, ctx.gid, ctx.groups, ctx.cwd, env, "as root, as it ran")
    if drops_root_itself(ctx, argv):
        return RunAs(
            0, 0, (), ctx.cwd, env, f"as root: its own -run-with user= drops to uid {ctx.uid}"
        )
    return RunAs(ctx.uid, ctx.gid, ctx.groups, ctx.cwd, env, f"as uid {ctx.uid}, as it ran")


def drops_root_itself(ctx: ProcessContext, argv: Sequence[str]) -> bool:
    """Whether this QEMU was started as root and dropped to its uid by its own
    ``-run-with user=`` / ``-runas`` (pure apart from the user-name lookup)."""
    return ctx.uid != 0 and ctx.started_as_root and dropped_uid(argv) == ctx.uid


def argv_anchored(argv: Sequence[str], exec_start: Sequence[str] | None, machine_type: str) -> bool:
    """Whether a QEMU's ``argv`` (read from /proc/PID/cmdline: memory its own uid can
    rewrite) is the command line root holds for it (pure): ``exec_start``, the argv of
    the ``ExecStart=`` systemd (PID 1) runs it with, either as is or in the form a cprd
    restore ran from that unit (:func:`relaunch_argv` with ``machine_type``: after the
    restore systemd shows the unit file's line again, without the pinned machine and
    ``-incoming defer``).  None (no single ExecStart) is never anchored.

    An anchored argv is one root wrote, so replaying it as root trusts nobody else
    (issue 13 item 2): see :func:`run_as_problem`."""
    if not exec_start:
        return False
    got = list(argv)
    return got == list(exec_start) or got == relaunch_argv(exec_start, machine_type)


def run_as_problem(
    uids: Sequence[int],
    gids: Sequence[int],
    ctx: ProcessContext | None,
    argv: Sequence[str],
    trusted: Iterable[int],
    anchored: bool = False,
) -> str | None:
    """Why cprd cannot relaunch this QEMU as it runs now, or None (pure apart from the
    user-name lookup).  ``uids``/``gids``: real, effective, saved, filesystem.

    ``anchored``: ``argv`` is the one root's systemd holds for it
    (:func:`argv_anchored`, checked by the caller on the very argv it records); a QEMU
    that drops root itself is then relaunched as root without trusting its uid."""
    uid = uids[0] if uids else 0
    dropped = drops_root_itself(ctx, argv) if ctx is not None else dropped_uid(argv) == uid
    if len(set(uids)) > 1 or len(set(gids)) > 1:
        return (
            f"runs with mixed credentials (uids {'/'.join(map(str, uids))}, gids "
            f"{'/'.join(map(str, gids))}): cprd relaunches a QEMU as one uid and gid"
        )
    if uid != 0 and dropped and not anchored and uid not in set(trusted):
        # Relaunched as root (so that it drops again) from an argv read from its own
        # memory, which uid N can rewrite (a guest that took over this QEMU: `-netdev
        # tap,script=` runs before the drop): that is root trusting uid N.  Unless that
        # argv is the one root's systemd holds (anchored): then it is root's own.
        return (
            f"drops root to uid {uid} itself (-run-with user=/-runas), so a restore runs "
            f"its argv as root, and uid {uid} can rewrite that argv in its memory: run it "
            "as the main process of a systemd service (whose ExecStart= cprd then checks "
            f"its argv against), or add {uid} to discovery.trusted_uids to trust it so"
        )
    if uid != 0 and not dropped and uid not in set(trusted):
        return (
            f"runs as uid {uid}, neither dropped to by its own -run-with user= nor in "
            "discovery.trusted_uids: cprd relaunches a QEMU only as a uid it trusts"
        )
    if ctx is not None and (ctx.cwd.endswith(" (deleted)") or not ctx.cwd.startswith("/")):
        return f"its working directory {ctx.cwd} is gone: cprd cannot relaunch it there"
    if ctx is not None and any(ord(c) < 0x20 or ord(c) == 0x7F for c in ctx.cwd):
        # systemd would write it unescaped into a unit file (launch.SystemdLauncher).
        return (
            f"its working directory {ctx.cwd!r} has a control character: cprd does not "
            "hand it to systemd"
        )
    return None
