"""Failpoints: a test-only way to fail at any journalled step (FreeBSD's fail points,
etcd's gofail).  Read in one place: :func:`hit`, called by the step journal right after a
step is recorded and before it is taken.  A no-op unless ``CPRD_FAILPOINT`` is set.

    CPRD_FAILPOINT="<step>:<fault>[:<vm>][,...]"

``<step>`` is a :class:`cprd.steps.Step` value (``migrating``, ``quitting``, ...) and
``<vm>`` limits it to one VM.  Each failpoint fires once per process.  Faults:

    raise      an exception type nobody expects (FailpointError, not a CprdError)
    cancel     asyncio.CancelledError, as when the caller's task is cancelled
    enospc     OSError(ENOSPC), as when state_dir fills up
    kill-cprd  SIGKILL to cprd itself (recovery starts from the journal)
    kill-qemu  SIGKILL to the VM's QEMU
    stop-qemu  SIGSTOP to the VM's QEMU (it hangs; cprd must not wait forever)
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
from dataclasses import dataclass

logger = logging.getLogger(__name__)

ENV = "CPRD_FAILPOINT"
FAULTS = ("raise", "cancel", "enospc", "kill-cprd", "kill-qemu", "stop-qemu")


class FailpointError(Exception):
    """Raised by the ``raise`` fault: deliberately outside cprd's error tree."""


@dataclass(frozen=True)
class Failpoint:
    step: str
    fault: str
    vm: str | None


def parse(text: str) -> list[Failpoint]:
    out = []
    for item in filter(None, (p.strip() for p in text.split(","))):
        parts = item.split(":", 2)
        if len(parts) < 2 or parts[1] not in FAULTS:
            raise ValueError(f"{ENV}: bad failpoint {item!r} (step:fault[:vm], faults {FAULTS})")
        out.append(Failpoint(parts[0], parts[1], parts[2] if len(parts) > 2 else None))
    return out


_armed: list[Failpoint] | None = None


def _points() -> list[Failpoint]:
    global _armed
    if _armed is None:
        _armed = parse(os.environ.get(ENV, ""))
    return _armed


def hit(step: str, vm: str, pid: int) -> None:
    """Fire the failpoint armed for this step (and VM), if any; once."""
    points = _points()
    if not points:
        return
    for point in points:
        if point.step == step and point.vm in (None, vm):
            points.remove(point)
            _fire(point, vm, pid)
            return


def _fire(point: Failpoint, vm: str, pid: int) -> None:
    logger.warning("failpoint %s:%s fires for %s", point.step, point.fault, vm)
    if point.fault == "raise":
        raise FailpointError(f"failpoint at {point.step} for {vm}")
    if point.fault == "cancel":
        raise asyncio.CancelledError(f"failpoint at {point.step} for {vm}")
    if point.fault == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if point.fault == "kill-cprd":
        os.kill(os.getpid(), signal.SIGKILL)
    if point.fault in ("kill-qemu", "stop-qemu") and pid > 0:
        sig = signal.SIGKILL if point.fault == "kill-qemu" else signal.SIGSTOP
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
