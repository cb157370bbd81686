"""Figures for the fleet's dashboards: a metrics file for node_exporter's textfile collector.

After each prepare, commit, resume, restore and QEMU upgrade, cprd replaces the file named
by ``metrics.textfile`` (off by default) with the figures of that operation: per VM the
bytes saved, the seconds it was stopped and its outcome; for the host the operation, when
it ended, how long it took and how many VMs came through it and how many failed.

The format is the Prometheus text exposition format (version 0.0.4), the one the textfile
collector parses, kept to the subset OpenMetrics 1.0 shares (gauges only, no timestamps,
a closing ``# EOF`` that the Prometheus parser reads as a comment): the one file parses as
either.  The names are documented in docs/operator-guide.md.

:func:`render` and the functions it uses are pure; :func:`write_atomic` does the I/O (temp
file, fsync, rename, fsync of the directory), so the collector never reads half a file.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import logging
import os
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cprd import manifest as mf
from cprd.errors import CprdError
from cprd.manifest import Outcome, VMRecord
from cprd.steps import Step

logger = logging.getLogger(__name__)

#: (name, help) of every metric, in the order written.
METRICS: tuple[tuple[str, str], ...] = (
    ("cprd_last_operation", "the last operation (label operation) and its result (ok or failed)"),
    ("cprd_last_operation_timestamp_seconds", "when the last operation ended, Unix time"),
    ("cprd_last_operation_duration_seconds", "how long the last operation took"),
    ("cprd_last_operation_vms_ok", "VMs the last operation saved, committed, restored or moved"),
    ("cprd_last_operation_vms_failed", "VMs the last operation failed to bring where it was asked"),
    ("cprd_vm_state_bytes", "bytes of the VM's state file written by the last save"),
    ("cprd_vm_stopped_seconds", "seconds the VM was stopped (or asleep) by the last save"),
    ("cprd_vm_restore_seconds", "seconds the last restore of the VM took, launch to running"),
    ("cprd_vm_outcome", "the VM's step after the last operation (label outcome)"),
)
#: Steps at which a VM's stop for a save began, and at which its save was complete.
STOP_STEPS = frozenset({Step.SUSPENDING.value, Step.MIGRATING.value})
#: A live save's VM runs while ``migrating``; it stops at ``stopping``.
LIVE_STOP_STEPS = frozenset({Step.STOPPING.value})
SAVED_STEP = Step.SAVED.value


def _stop_steps(history: Iterable[tuple[str, str]]) -> frozenset[str]:
    """Where this VM's stop began: ``stopping`` for a live save, else the first of
    suspending/migrating (pure)."""
    steps = {step for step, _ in history}
    return LIVE_STOP_STEPS if Step.STOPPING.value in steps else STOP_STEPS


OK_STEPS = {
    "prepare": frozenset({Step.SAVED, Step.COMMITTED}),
    "commit": frozenset({Step.COMMITTED}),
    "kexec": frozenset({Step.COMMITTED}),
    "resume": frozenset({Step.RESUMED}),
    "restore": frozenset({Step.RESTORED}),
}


@dataclass(frozen=True)
class VMFigures:
    name: str
    outcome: str  # the VM's step (or the upgrade's word for it)
    ok: bool | None  # None: neither (e.g. shut down because the operator asked)
    state_bytes: int | None = None
    stopped_s: float | None = None
    restore_s: float | None = None


@dataclass(frozen=True)
class Report:
    operation: str  # prepare, commit, kexec, resume, restore, upgrade
    ok: bool
    ended_at: float  # Unix time
    duration_s: float
    vms: tuple[VMFigures, ...] = field(default=())


def _time(iso: str) -> float | None:
    try:
        return datetime.datetime.fromisoformat(iso).timestamp()
    except ValueError:
        return None


def span(history: Iterable[tuple[str, str]], starts: frozenset[str], end: str) -> float | None:
    """Seconds from the first step in ``starts`` to the first ``end`` after it, within the
    last such run of the history (pure); None when the history has no such pair."""
    began: float | None = None
    found: float | None = None
    prev: str | None = None
    for step, at in history:
        if step in starts and prev not in starts:  # a new run begins
            began, found = _time(at), None
        elif step == end and began is not None and found is None:
            t = _time(at)
            found = None if t is None else max(0.0, round(t - began, 3))  # ms in the history
        prev = step
    return found


def vm_figures(operation: str, rec: VMRecord) -> VMFigures:
    """One VM's figures from its manifest record after ``operation`` (pure)."""
    if operation == "restore":
        ok: bool | None = rec.outcome is Outcome.RESTORED
        outcome = rec.step.value if rec.outcome is not Outcome.FAILED else "failed"
    else:
        ok = rec.step in OK_STEPS.get(operation, frozenset())
        if not ok and rec.step is Step.SHUT_DOWN and rec.shutdown_asked:
            ok = None  # shut down as the operator asked: not a failure
        outcome = rec.step.value
    return VMFigures(
        name=rec.name,
        outcome=outcome,
        ok=ok,
        state_bytes=rec.state_size,
        stopped_s=span(rec.history, _stop_steps(rec.history), SAVED_STEP),
        restore_s=span(rec.history, frozenset({Step.RESTORING.value}), Step.RESTORED.value),
    )


def outcome_figures(
    outcomes: Mapping[str, str], blackout: Mapping[str, float] | None = None
) -> tuple[VMFigures, ...]:
    """Per VM figures from an operation's outcome lines, ``name: outcome`` as cprdctl
    prints them (pure): for a resume (whose manifest is gone once every VM runs) and a
    QEMU upgrade, with each VM's blackout when known."""
    out = []
    for name, line in sorted(outcomes.items()):
        if line.startswith("LOST"):
            word, ok = "lost", False
        elif line.startswith("could not"):
            word, ok = "kept", False
        elif line.startswith("failed"):
            word, ok = "failed", False
        else:
            found = re.match(r"[A-Za-z0-9_-]+", line)
            word, ok = (found.group(0) if found else "unknown"), True
        out.append(VMFigures(name, word, ok, stopped_s=(blackout or {}).get(name)))
    return tuple(out)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    return repr(int(value)) if float(value).is_integer() else repr(float(value))


def render(report: Report) -> str:
    """The metrics file's text (pure)."""
    samples: dict[str, list[str]] = {name: [] for name, _ in METRICS}

    def add(name: str, value: float, **labels: str) -> None:
        body = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
        samples[name].append(
            f"{name}{{{body}}} {_number(value)}" if body else f"{name} {_number(value)}"
        )

    add(
        "cprd_last_operation",
        1,
        operation=report.operation,
        result="ok" if report.ok else "failed",
    )
    add("cprd_last_operation_timestamp_seconds", round(report.ended_at, 3))
    add("cprd_last_operation_duration_seconds", round(report.duration_s, 3))
    add("cprd_last_operation_vms_ok", sum(1 for v in report.vms if v.ok))
    add("cprd_last_operation_vms_failed", sum(1 for v in report.vms if v.ok is False))
    for vm in sorted(report.vms, key=lambda v: v.name):
        if vm.state_bytes is not None:
            add("cprd_vm_state_bytes", vm.state_bytes, vm=vm.name)
        if vm.stopped_s is not None:
            add("cprd_vm_stopped_seconds", round(vm.stopped_s, 3), vm=vm.name)
        if vm.restore_s is not None:
            add("cprd_vm_restore_seconds", round(vm.restore_s, 3), vm=vm.name)
        add("cprd_vm_outcome", 1, vm=vm.name, outcome=vm.outcome)
    lines: list[str] = []
    for name, help_text in METRICS:
        if not samples[name]:
            continue
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", *samples[name]]
    lines.append("# EOF")
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Replace ``path`` with ``data``: a temp file beside it, fsync, chmod, rename, fsync
    of the directory.  A reader sees the old file or the new one, never a part.

    Root writes this into a directory another user may own (node_exporter's): the
    directory is opened once, and refused (OSError) unless it is the one ``path`` names,
    absolute and with no symlink on the way (its user could otherwise point it at
    another directory, as /etc/cron.d, and have root create a file there); the temp
    file, the rename and the fsync all go through that descriptor, the temp file is
    created without following a symlink and never replaces one."""
    parent = str(path.parent)
    dfd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        real = os.readlink(f"/proc/self/fd/{dfd}")
        if real != os.path.normpath(parent) or not os.path.isabs(parent):
            raise OSError(
                errno.ELOOP, f"{parent} is not a directory of that name but {real}: refused"
            )
        tmp = f".{path.name}.{os.getpid()}.tmp"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dfd)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(tmp, flags, mode, dir_fd=dfd)
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fchmod(fd, mode)  # whatever the umask
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, path.name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dfd)
            raise
        os.fsync(dfd)
    finally:
        os.close(dfd)


def write(path: Path, report: Report) -> None:
    """Replace the metrics file (mode 0644: node_exporter reads it as another user)."""
    write_atomic(path, render(report).encode(), 0o644)


def record(
    textfile: Path | None,
    manifest_path: Path,
    operation: str,
    ok: bool,
    duration_s: float,
    vms: tuple[VMFigures, ...] | None = None,
) -> None:
    """After an operation: write the metrics file, if one is configured, with each VM's
    figures (read from the manifest unless given).  The operation's result is ``failed``
    when it raised or any VM failed.  Never fails the operation: a write error is logged."""
    if textfile is None:
        return
    try:
        if vms is None:
            try:
                records: tuple[VMRecord, ...] = mf.read(manifest_path).vms
            except CprdError:
                records = ()
            vms = tuple(vm_figures(operation, r) for r in records)
        ok = ok and not any(v.ok is False for v in vms)
        write(textfile, Report(operation, ok, time.time(), duration_s, vms))
    except (OSError, CprdError) as err:
        logger.warning("cannot write the metrics file %s: %s", textfile, err)
