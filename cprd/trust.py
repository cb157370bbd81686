"""Trust boundaries: which QMP sockets, processes and binaries cprd may act on.

cprd runs as root and relaunches whatever it records, so a QMP peer is a VM only when
nobody but root (or a uid the operator trusts) could have put it there:

* **the path**: every component of the socket's real path (symlinks resolved first) is
  owned by root or a trusted uid and not writable by group or others; a sticky
  world-writable directory (like /tmp) is allowed when the component after it is owned
  by root or a trusted uid (systemd's CHASE_SAFE rule).  The socket itself is owned by
  root or a trusted uid and not writable by group or others.
* **the process**: the uid of the listener (SO_PEERCRED) is root or trusted, and the
  process's real, effective, saved and filesystem uids are root, trusted, or the uid a
  root-started QEMU dropped to by its own ``-run-with user=`` / ``-runas`` option.
* **the binary** cprd probes or relaunches is owned by root and not writable by group
  or others.

The decisions are pure functions of ``os.stat_result``-like facts; :func:`path_problem`
does the lstat walk.
"""

from __future__ import annotations

import os
import pwd
import stat
from collections.abc import Collection, Sequence
from pathlib import Path

from cprd.errors import TrustError

#: Directories that are never a state_dir (and never chmod'ed by cprd).
SYSTEM_DIRS = frozenset(
    {
        "/",
        "/bin",
        "/boot",
        "/dev",
        "/etc",
        "/home",
        "/lib",
        "/lib64",
        "/media",
        "/mnt",
        "/opt",
        "/proc",
        "/root",
        "/run",
        "/run/user",
        "/sbin",
        "/srv",
        "/sys",
        "/tmp",
        "/usr",
        "/usr/bin",
        "/usr/lib",
        "/usr/local",
        "/usr/sbin",
        "/usr/share",
        "/var",
        "/var/cache",
        "/var/lib",
        "/var/log",
        "/var/spool",
        "/var/tmp",
    }
)


def _owner_ok(uid: int, trusted: Collection[int]) -> bool:
    return uid == 0 or uid in trusted


def entry_problem(
    path: str, st: os.stat_result, trusted: Collection[int], after_sticky: bool = False
) -> str | None:
    """Why one component of a socket's path is unsafe, or None (pure).

    ``after_sticky``: the parent is a sticky world-writable directory, so this component
    must be owned by root or a trusted uid (anyone could have created it otherwise)."""
    mode = stat.S_IMODE(st.st_mode)
    if not _owner_ok(st.st_uid, trusted):
        where = " (inside a sticky world-writable directory)" if after_sticky else ""
        return f"{path} is owned by uid {st.st_uid}, not root or a trusted uid{where}"
    if stat.S_ISDIR(st.st_mode):
        sticky_world = mode & stat.S_ISVTX and mode & stat.S_IWOTH
        if mode & (stat.S_IWGRP | stat.S_IWOTH) and not sticky_world:
            return f"{path} is writable by group or others (mode {mode:04o})"
        return None
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{path} is writable by group or others (mode {mode:04o})"
    return None


def is_sticky_world_writable(st: os.stat_result) -> bool:
    mode = stat.S_IMODE(st.st_mode)
    return stat.S_ISDIR(st.st_mode) and bool(mode & stat.S_ISVTX) and bool(mode & stat.S_IWOTH)


def path_problem(path: Path | str, trusted: Collection[int] = ()) -> str | None:
    """Why a socket at ``path`` cannot be trusted, or None: the CHASE_SAFE walk.

    Symlinks are resolved first; every component of the real path is then checked
    with lstat (a component that turns into a symlink meanwhile is refused)."""
    real = os.path.realpath(path)
    parts = Path(real).parts
    current = "/"
    after_sticky = False
    for i, part in enumerate(parts):
        current = os.path.join(current, part) if i else "/"
        try:
            st = os.lstat(current)
        except OSError as err:
            return f"{current}: cannot stat: {err.strerror}"
        if stat.S_ISLNK(st.st_mode):
            return f"{current} became a symlink while it was checked"
        last = i == len(parts) - 1
        if not last and not stat.S_ISDIR(st.st_mode):
            return f"{current} is not a directory"
        if last and not stat.S_ISSOCK(st.st_mode):
            return f"{current} is not a socket"
        problem = entry_problem(current, st, trusted, after_sticky)
        if problem is not None:
            where = f" (the real path of {path})" if str(path) != real else ""
            return problem + where
        after_sticky = is_sticky_world_writable(st)
    return None


def dropped_uid(argv: Sequence[str]) -> int | None:
    """The uid a QEMU drops to by ``-run-with user=NAME|UID[:GID]`` or ``-runas NAME``."""
    user: str | None = None
    for i, arg in enumerate(argv):
        opt, eq, inline = arg.partition("=")
        if opt in ("-run-with", "--run-with", "-runas", "--runas"):
            value = inline if eq else (argv[i + 1] if i + 1 < len(argv) else None)
            if value is None:
                continue
            if opt.endswith("runas"):
                user = value
                continue
            for part in value.split(","):
                if part.startswith("user="):
                    user = part[5:]
    if not user:
        return None
    name = user.split(":", 1)[0]
    if name.isdigit():
        return int(name)
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        return None


def peer_problem(
    listener_uid: int,
    process_uids: Sequence[int],
    argv: Sequence[str],
    trusted: Collection[int] = (),
) -> str | None:
    """Why the process behind a QMP socket is not a VM cprd may act on, or None (pure
    apart from a user-name lookup).  ``process_uids``: real, effective, saved, fs."""
    if not _owner_ok(listener_uid, trusted):
        return f"its QEMU listens as uid {listener_uid}, not root or a trusted uid"
    allowed = {0, *trusted}
    if listener_uid == 0:
        dropped = dropped_uid(argv)
        if dropped is not None:
            allowed.add(dropped)
    bad = sorted({u for u in process_uids if u not in allowed})
    if bad:
        return f"its QEMU runs as uid {bad[0]}, not root, a trusted uid or its own -run-with user"
    return None


def binary_problem(path: str, st: os.stat_result) -> str | None:
    """Why cprd must not run or relaunch the binary ``path``, or None (pure)."""
    if not stat.S_ISREG(st.st_mode):
        return f"{path} is not a regular file"
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid != 0:
        return f"{path} is owned by uid {st.st_uid}, not root"
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{path} is writable by group or others (mode {mode:04o})"
    return None


def check_binary(path: str) -> tuple[int, int]:
    """(st_dev, st_ino) of a binary cprd may run; TrustError otherwise."""
    try:
        st = os.stat(path)
    except OSError as err:
        raise TrustError(f"QEMU binary {path}: {err.strerror}") from err
    problem = binary_problem(path, st)
    if problem is not None:
        raise TrustError(
            f"QEMU binary refused: {problem}",
            "install QEMU root-owned and not writable by group or others",
        )
    return st.st_dev, st.st_ino


def binary_dir_problem(path: str) -> str | None:
    """Why the directories holding binary ``path`` could let someone other than root
    swap it, or None: every directory of its real path owned by root and not writable by
    group or others (no sticky exception: nobody but root may place a binary there)."""
    real = os.path.realpath(path)
    current = os.path.dirname(real)
    while True:
        try:
            st = os.lstat(current)
        except OSError as err:
            return f"{current}: cannot stat: {err.strerror}"
        mode = stat.S_IMODE(st.st_mode)
        if st.st_uid != 0 or mode & (stat.S_IWGRP | stat.S_IWOTH):
            return f"{current} is not root's alone (uid {st.st_uid}, mode {mode:04o})"
        if current == "/":
            return None
        current = os.path.dirname(current)
