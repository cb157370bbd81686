"""Know before you start: state_dir's measured bandwidth, and what a save will cost.

``cprdctl check`` predicts, per VM, the bytes a save writes, how long the VM is stopped
and how long its restore takes, from a write and a read bandwidth of state_dir measured
once and cached in ``state_dir/bandwidth.json``.  Measuring writes a few hundred MiB to
the disk, so only root asks for it (``cprdctl check --measure``, D-Bus
``MeasureBandwidth``); a Check only reads the cache.

:func:`predict` and :func:`host_total` are pure; :func:`measure`, :func:`load` and
:func:`store` do the I/O.
"""

from __future__ import annotations

import contextlib
import datetime
import enum
import json
import logging
import mmap
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cprd.errors import CprdError
from cprd.metrics import write_atomic

logger = logging.getLogger(__name__)

#: The cache, in state_dir (its name starts with no dot and ends in .json: no state file
#: or manifest is ever named so).
CACHE_NAME = "bandwidth.json"
PROBE_NAME = ".bandwidth-probe"
#: Bytes written then read by a measurement: a few hundred MiB, past the disk's own cache.
PROBE_BYTES = 256 * 2**20
CHUNK = 4 * 2**20
#: A live save stops the VM for its last pass only: QEMU's default downtime-limit.
LIVE_DOWNTIME_S = 0.3
#: Device state written while a VM whose RAM stays in place is stopped.
IN_PLACE_BYTES = 2**20
#: What a save costs beyond writing the bytes: the migration's start and end, fsyncs of
#: the state file and the manifest (`make bench`, in place: 34-57 ms from the STOP event
#: to the manifest fsynced, of which QEMU's own migration 4-18 ms).
SAVE_OVERHEAD_S = 0.05
#: What a restore costs beyond reading the bytes: starting QEMU up to its QMP socket
#: (`make bench`: 0.23-0.36 s under TCG).
RESTORE_OVERHEAD_S = 0.3


class SaveMode(enum.Enum):
    """How a VM's RAM reaches the state file; decides what stops it and for how long."""

    STOP_FIRST = "stop-first"  # cpr-reboot: stopped, then every byte written
    LIVE = "live"  # normal mode: written while it runs, stopped for the last pass
    IN_PLACE = "in-place"  # x-ignore-shared: RAM stays where it is, ~nothing written


def save_mode(*, in_place: bool, live: bool) -> SaveMode:
    """The prediction's mode for a VM from its plan (plan.save_mode decided ``live``)."""
    if in_place:
        return SaveMode.IN_PLACE
    return SaveMode.LIVE if live else SaveMode.STOP_FIRST


class MeasureError(CprdError):
    dbus_name = "Measure"


@dataclass(frozen=True)
class Bandwidth:
    """state_dir's measured bandwidth, bytes per second, and when it was measured."""

    write_bps: float
    read_bps: float
    measured_at: str  # ISO 8601 UTC
    probe_bytes: int
    direct_io: bool  # measured with O_DIRECT (as cprd's saves write where they can)

    def to_dict(self) -> dict[str, Any]:
        return {
            "write_bps": self.write_bps,
            "read_bps": self.read_bps,
            "measured_at": self.measured_at,
            "probe_bytes": self.probe_bytes,
            "direct_io": self.direct_io,
        }

    @classmethod
    def from_dict(cls, data: object) -> Bandwidth | None:
        """The cache's contents, or None when any field is missing or of the wrong type."""
        if not isinstance(data, dict):
            return None
        w, r, at = data.get("write_bps"), data.get("read_bps"), data.get("measured_at")
        size, direct = data.get("probe_bytes"), data.get("direct_io")
        numbers = [v for v in (w, r) if isinstance(v, int | float) and not isinstance(v, bool)]
        if len(numbers) != 2 or min(numbers) <= 0 or not isinstance(at, str):
            return None
        if not isinstance(size, int) or isinstance(size, bool) or not isinstance(direct, bool):
            return None
        return cls(float(numbers[0]), float(numbers[1]), at, size, direct)


@dataclass(frozen=True)
class Prediction:
    """What a save of one VM (or of the whole host) is expected to cost."""

    mode: SaveMode
    bytes_to_write: int
    stopped_s: float | None  # None: state_dir's bandwidth was never measured
    restore_s: float | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode.value,
            "bytes": self.bytes_to_write,
            "stopped_s": self.stopped_s,
            "restore_s": self.restore_s,
        }


# --- pure --------------------------------------------------------------------------------


def predict(
    bytes_to_write: int,
    mode: SaveMode,
    bandwidth: Bandwidth | None,
    downtime_limit_s: float = LIVE_DOWNTIME_S,
) -> Prediction:
    """The expected cost of saving one VM alone (pure).

    Stop-first: stopped while every byte is written, ``bytes / write bandwidth``.  Live:
    stopped for the last pass only, which QEMU bounds by ``downtime_limit_s`` (bytes are
    all written, while it runs).  In place: only device state is written.  Each adds
    :data:`SAVE_OVERHEAD_S`.  A restore starts QEMU (:data:`RESTORE_OVERHEAD_S`) and
    reads what was written at the read bandwidth."""
    if mode is SaveMode.IN_PLACE:
        bytes_to_write = min(bytes_to_write, IN_PLACE_BYTES)
    if bandwidth is None:
        return Prediction(mode, bytes_to_write, None, None)
    write_s = bytes_to_write / bandwidth.write_bps
    stopped = min(write_s, downtime_limit_s) if mode is SaveMode.LIVE else write_s
    restore = RESTORE_OVERHEAD_S + bytes_to_write / bandwidth.read_bps
    return Prediction(mode, bytes_to_write, SAVE_OVERHEAD_S + stopped, restore)


def host_total(predictions: Iterable[Prediction], bandwidth: Bandwidth | None) -> dict[str, Any]:
    """The host's figures (pure): every VM's bytes, and the time to write and read them
    all through the one state_dir, whose bandwidth the VMs share when saved together.
    ``stopped_s`` is the longest a VM is stopped: a stop-first VM saved beside others is
    stopped until the disk has written them all."""
    preds = list(predictions)
    total = sum(p.bytes_to_write for p in preds)
    out: dict[str, Any] = {"vms": len(preds), "bytes": total, "stopped_s": None, "restore_s": None}
    if bandwidth is not None:
        write_all = SAVE_OVERHEAD_S + total / bandwidth.write_bps
        stopped = [
            write_all if p.mode is SaveMode.STOP_FIRST else (p.stopped_s or 0.0) for p in preds
        ]
        out["stopped_s"] = max(stopped, default=0.0)
        out["restore_s"] = RESTORE_OVERHEAD_S + total / bandwidth.read_bps
    return out


# --- I/O ---------------------------------------------------------------------------------


def load(state_dir: Path) -> Bandwidth | None:
    """The cached measurement, or None (never measured, or an unreadable cache)."""
    path = state_dir / CACHE_NAME
    try:
        with open(path, "rb") as f:
            text = f.read(64 * 1024)
    except FileNotFoundError:
        return None
    except OSError as err:
        logger.warning("cannot read %s: %s", path, err.strerror)
        return None
    try:
        found = Bandwidth.from_dict(json.loads(text))
    except (ValueError, RecursionError):
        found = None
    if found is None:
        logger.warning("%s is not a bandwidth measurement: ignored", path)
    return found


def store(state_dir: Path, bandwidth: Bandwidth) -> None:
    data = json.dumps(bandwidth.to_dict(), indent=1) + "\n"
    # state_dir is root's (mf.ensure_state_dir); write_atomic wants its real path.
    write_atomic(Path(os.path.realpath(state_dir)) / CACHE_NAME, data.encode(), 0o600)


def measure(state_dir: Path, probe_bytes: int = PROBE_BYTES) -> Bandwidth:
    """Write then read ``probe_bytes`` in state_dir, O_DIRECT where the filesystem has it
    (fsync included), then remove the probe file.  Blocking: run it in a thread."""
    path = state_dir / PROBE_NAME
    count = max(1, probe_bytes // CHUNK)
    buf = mmap.mmap(-1, CHUNK)  # page-aligned, as O_DIRECT needs
    try:
        buf.write(os.urandom(2**20) * (CHUNK // 2**20))  # incompressible
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        try:
            direct = True
            try:
                fd = _open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_DIRECT)
            except OSError:  # tmpfs and others: no O_DIRECT
                direct = False
                fd = _open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            try:
                start = time.monotonic()
                for _ in range(count):
                    _write_all(fd, buf)
                os.fsync(fd)
                write_s = time.monotonic() - start
            finally:
                os.close(fd)
            fd = _open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
            try:
                if not direct:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                start = time.monotonic()
                while os.readv(fd, [buf]) > 0:
                    pass
                read_s = time.monotonic() - start
            finally:
                os.close(fd)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(path)
    except OSError as err:
        raise MeasureError(
            f"cannot measure state_dir {state_dir}: {err.strerror or err}",
            "state_dir must exist and have a few hundred MiB free",
        ) from err
    finally:
        buf.close()
    written = count * CHUNK
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    return Bandwidth(
        written / max(write_s, 1e-6), written / max(read_s, 1e-6), now, written, direct
    )


def _open(path: Path, flags: int) -> int:
    return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)


def _write_all(fd: int, buf: mmap.mmap) -> None:
    view = memoryview(buf)
    try:
        while view:
            view = view[os.write(fd, view) :]
    finally:
        view.release()
