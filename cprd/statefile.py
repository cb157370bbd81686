"""State files opened by cprd and handed to QEMU as file descriptors.

QEMU never opens a state file itself: cprd creates it (0600, O_NOFOLLOW, in its 0700
state_dir) or opens it for the restore, passes the descriptors over the QMP socket
(SCM_RIGHTS, then ``add-fd`` into one fdset) and gives QEMU the URI
``file:/dev/fdset/N``.  A QEMU that dropped root (``-run-with user=``) or runs as
another user is then saved and restored without widening state_dir's permissions.

QEMU picks a descriptor from the fdset whose access mode and O_DIRECT flag match what it
would have opened (util/osdep.c, monitor_fdset_dup_fd_add): a file migration opens its
main channel without O_DIRECT and, with ``direct-io``, its multifd channels with it; so
the fdset holds one descriptor of each (write-only for a save, read-only for a restore).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from cprd import manifest as mf
from cprd.errors import ManifestError, QMPError
from cprd.qmp import QMPConnection


def open_fds(path: Path, *, write: bool, direct: bool) -> list[int]:
    """Descriptors of the state file for QEMU: created anew for a save (refusing a
    symlink), opened read-only for a restore; plus an O_DIRECT one when ``direct``."""
    fds: list[int] = []
    try:
        if write:
            mf.create_private(path)
        mode = os.O_WRONLY if write else os.O_RDONLY
        flags = mode | os.O_NOFOLLOW | os.O_CLOEXEC
        fds.append(_open(path, flags))
        if direct:
            fds.append(_open(path, flags | os.O_DIRECT))
    except BaseException:
        close(fds)
        raise
    return fds


def _open(path: Path, flags: int) -> int:
    try:
        return os.open(path, flags)
    except OSError as err:
        raise ManifestError(f"state file {path}: cannot open: {err.strerror}") from err


def close(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    fds.clear()


async def add_fdset(conn: QMPConnection, fds: list[int], opaque: str, timeout: float) -> int:
    """Pass ``fds`` to QEMU into one new fdset; return its id (``/dev/fdset/<id>``)."""
    fdset: int | None = None
    for fd in fds:
        conn.send_fd(fd)
        args: dict[str, Any] = {"opaque": opaque}
        if fdset is not None:
            args["fdset-id"] = fdset
        reply = await conn.execute("add-fd", args, timeout=timeout)
        got = reply.get("fdset-id") if isinstance(reply, dict) else None
        if not isinstance(got, int) or isinstance(got, bool) or got < 0:
            raise QMPError(f"{conn.name}: add-fd: unexpected reply {str(reply)[:80]!r}")
        fdset = got
    assert fdset is not None
    return fdset


async def remove_fdset(conn: QMPConnection, fdset: int, timeout: float) -> None:
    """Let QEMU close the fdset's descriptors (those it dup'ed stay open while in use)."""
    with contextlib.suppress(QMPError):
        await conn.execute("remove-fd", {"fdset-id": fdset}, timeout=timeout)


def uses_direct_io(parameters: dict[str, Any] | Any) -> bool:
    return bool(parameters.get("direct-io", False))
