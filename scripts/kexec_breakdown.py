"""Every second of the kexec end-to-end test's blackout, phase by phase (pure functions).

Input: what the virtual host reported (``E2E-RESULT``: the journal of both boots with
both clocks, every tick of the inner VMs, the manifest with its per-VM step history) and
the serial console as the outer runner saw it, each line stamped with the outer clock.

Clocks.  Within one boot, the journal's ``__MONOTONIC_TIMESTAMP`` and the kernel's printk
stamps (``[  12.345678] ...`` on the console) run on that boot's monotonic clock, and
realtime stamps (ticks.log, the manifest's history, ``__REALTIME_TIMESTAMP``) convert to
it through the boot's realtime-monotonic offset read from its journal.  Across the kexec
only the outer clock holds: each boot's monotonic clock is placed on it by the tightest
bound ``min(outer stamp - printk stamp)`` over that boot's console lines printed once its
clock settled (``clocksource: Switched to clocksource``): a line reaches the outer file
after its kernel stamped it, and lines flushed late from the kernel's buffer give larger
differences and lose.  Before the switch the clock runs on jiffies and loses the ticks a
starved vCPU misses (seen: 2 s in the first 4 s of the second boot), and its printk
stamps stay 0 for seconds: its zero is not when the kernel started.  The kernel's start
is therefore its first console line's outer stamp (``Linux version``: an upper bound).

Phases.  Per VM the blackout runs from its last tick before the kexec to its first tick
after (its guest counter, stamped inside by the ticks service); the marks in between
(cprd's steps, the manifest's commit, logind's lock, ``kexec_core: Starting new kernel``,
the new kernel's zero, cprd-restore.service's start, the VM's restore) cut it into
phases, each measured on the clock of the boot it lies in, the kexec itself on the outer
clock.  The phases add up to the blackout placed on the outer clock through the two
offsets; the blackout measured outside (the ``E2E-TICK`` lines' own outer stamps) minus
that sum is the ``unaccounted`` remainder: conversion error, which must stay small.
"""

from __future__ import annotations

import datetime
import itertools
import re
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

PRINTK = re.compile(r"^\[\s*(\d+\.\d+)\] ")
BOOT = re.compile(r"^\[\s*0\.000000\] Linux version ")
TICK = re.compile(r"E2E-TICK (\S+) (\d+)")
PHASE_LINE = re.compile(r"E2E-PHASE boot([12]) ([0-9a-f-]{36})")
#: console lines that quote others (the journal in the result): never read for marks
QUOTING = ("E2E-RESULT ", "E2E-SAVE-PATH ", "E2E-CPRDCTL ", "E2E-WAIT ")
KEXEC_CORE = "kexec_core: Starting new kernel"
#: the kernel's clock runs true from here (before, on jiffies, a starved vCPU loses time)
SWITCHED = "clocksource: Switched to clocksource"
EVENT_IDS = {
    "6a5b1f0e3c8d4e7f9a0b1c2d3e4f5a61": "save started",
    "6a5b1f0e3c8d4e7f9a0b1c2d3e4f5a65": "manifest committed",
}
LOCK_RELEASED = ("released logind's shutdown delay lock", "releasing logind's delay lock")
LOGIND_SIGNAL = "logind: a kexec is under way"
#: manifest history steps taken after the kexec (the rest belong to the first boot)
BOOT2_STEPS = frozenset({"restoring", "booting", "restored"})
#: the blackout phase that begins at each mark; "cprd:" marks cprd's own share
LABELS = {
    "last tick": "guest: after its last tick, still running",
    "logind signal": "cprd, VMs still running: logind's kexec signal to the save's start",
    "save started": "cprd: prepare (plan, before this VM stops)",
    "suspending": "cprd: suspend to RAM through the agent",
    "migrating": "cprd: stopped, RAM to the state file + fsync",
    "live": "cprd: live save (running)",
    "saved": "cprd: saved, waiting for the others, manifest prepared",
    "quitting": "cprd: commit (its QEMU quits)",
    "committed": "cprd: committed, the others quit, manifest committed",
    "manifest committed": "cprd: logind's delay lock released",
    "lock released": "host: shutdown (units stop, sync, kexec)",
    "kexec": "host: kexec to the new kernel",
    "kernel": "host: new kernel, boot to cprd-restore start",
    "cprd-restore": "cprd: restore: its start, checks, VMs before this one",
    "restoring": "cprd: restore of this VM (QEMU start, load, run)",
    "booting": "cprd: cold boot of this VM",
    "restored": "guest: restored, until its first tick",
}
#: a VM saved live: it runs while ``migrating`` and stops at ``stopping``
LIVE_LABELS = {
    **LABELS,
    "migrating": "cprd: live save, the VM running (RAM written)",
    "stopping": "cprd: stopped together, the last pass + fsync",
}
#: the host's phases: from the first VM to take a step (the last to be restored)
HOST_LABELS = {
    "last tick": "guests: after the first VM's last tick, still running",
    "suspending": "cprd: suspends (from the first)",
    "migrating": "cprd: RAM to the state files + fsync (from the first VM stopped)",
    "stopping": "cprd: live saves stopped together, their last pass + fsync",
    "saved": "cprd: the first VM saved until the manifest is committed",
    "quitting": "cprd: commit (the first QEMU quits)",
    "committed": "cprd: the others quit, manifest committed",
    "restoring": "cprd: restores, from the first start to the last VM back",
    "booting": "cprd: cold boots, from the first start to the last VM back",
    "restored": "guests: the last VM restored until its first tick",
}
#: steps during which a VM may still run: their time before its last tick is its live phase
LIVE_STEPS = ("live", "migrating")


class BreakdownError(Exception):
    """The data lacks something the breakdown needs (named in the message)."""


@dataclass(frozen=True)
class Phase:
    mark: str  # the mark it begins at
    label: str
    seconds: float

    @property
    def cprd(self) -> bool:
        return self.label.startswith("cprd:")


@dataclass(frozen=True)
class Breakdown:
    """One VM's blackout (or the host's), phase by phase."""

    name: str
    phases: tuple[Phase, ...]
    outer_s: float  # measured outside: the E2E-TICK lines' own outer stamps
    live_s: float  # running while its RAM was written (not in the blackout)

    @property
    def total_s(self) -> float:
        return sum(p.seconds for p in self.phases)

    @property
    def unaccounted_s(self) -> float:
        return self.outer_s - self.total_s

    @property
    def cprd_s(self) -> float:
        return sum(p.seconds for p in self.phases if p.cprd)

    def to_dict(self) -> dict[str, Any]:
        return {
            "phases": [
                {"mark": p.mark, "phase": p.label, "s": round(p.seconds, 3)} for p in self.phases
            ],
            "sum_s": round(self.total_s, 3),
            "outer_s": round(self.outer_s, 3),
            "unaccounted_s": round(self.unaccounted_s, 3),
            "cprd_s": round(self.cprd_s, 3),
            "live_s": round(self.live_s, 3),
        }


def _printk(line: str) -> float:
    m = PRINTK.match(line)
    assert m is not None
    return float(m.group(1))


def _settled(lines: Sequence[tuple[float, str]], first: int, end: int) -> int | None:
    """The last clocksource switch among lines[first:end] (the boot's clock runs true
    after it), if any."""
    found = None
    for n in range(first, end):
        if PRINTK.match(lines[n][1]) and SWITCHED in lines[n][1]:
            found = n
    return found


def _zero_line(lines: Sequence[tuple[float, str]], first: int, end: int) -> int | None:
    """The line of lines[first:end] that places the boot's clock on the outer one: of
    those printed after its clock settled, the one with the least outer - printk stamp."""
    switch = _settled(lines, first, end)
    stable = _printk(lines[switch][1]) if switch is not None else 0.0
    best: tuple[float, int] | None = None
    for n in range(first, end):
        t, ln = lines[n]
        if PRINTK.match(ln) and (ts := _printk(ln)) > stable:
            best = min(best, (t - ts, n)) if best is not None else (t - ts, n)
    return None if best is None else best[1]


class Clock:
    """Both boots' clocks placed on the outer one (see the module docstring)."""

    def __init__(
        self,
        lines: Sequence[tuple[float, str]],
        journal: Mapping[str, Sequence[Mapping[str, str]]],
    ) -> None:
        starts = [n for n, (_, ln) in enumerate(lines) if BOOT.match(ln)]
        if len(starts) < 2:
            raise BreakdownError(f"{len(starts)} kernel boots on the console, expected 2")
        self.zero: list[float] = []  # outer time of each boot's monotonic zero
        self.first_line: list[float] = []  # outer stamp of each boot's first console line
        for b, first in enumerate(starts[:2]):
            end = starts[b + 1] if b + 1 < len(starts) else len(lines)
            n = _zero_line(lines, first, end)
            if n is None:
                raise BreakdownError(f"boot {b + 1}: no kernel line after its clock settled")
            t, ln = lines[n]
            self.zero.append(t - _printk(ln))
            self.first_line.append(lines[first][0])
        self.lines = lines
        self.boot2_first_line = starts[1]
        self.rt_offset: list[float] = []  # realtime - monotonic, per boot
        for key in ("boot1", "boot2"):
            offsets = [
                (int(e["__REALTIME_TIMESTAMP"]) - int(e["__MONOTONIC_TIMESTAMP"])) / 1e6
                for e in journal.get(key, ())
                if "__REALTIME_TIMESTAMP" in e
                and "__MONOTONIC_TIMESTAMP" in e
                and e.get("_TRANSPORT") != "kernel"  # its monotonic is journald's receipt
            ]
            if not offsets:
                raise BreakdownError(f"no journal entries of {key}")
            self.rt_offset.append(statistics.median(offsets))

    def mono(self, boot: int, seconds: float) -> float:
        return self.zero[boot] + seconds

    def real(self, boot: int, epoch: float) -> float:
        return self.mono(boot, epoch - self.rt_offset[boot])

    def printk(self, boot: int, needle: str) -> float | None:
        """The outer time of the printk stamp of the last console line of ``boot``
        containing ``needle``."""
        lines = self.lines[self.boot2_first_line :] if boot else self.lines[: self.boot2_first_line]
        for _, ln in reversed(lines):
            m = PRINTK.match(ln)
            if m is not None and needle in ln:
                return self.mono(boot, float(m.group(1)))
        return None


def _iso(value: str) -> float:
    return datetime.datetime.fromisoformat(value).timestamp()


def _history(manifest_text: str | None) -> dict[str, list[tuple[str, float]]]:
    if not manifest_text:
        return {}
    body = yaml.safe_load(manifest_text) or {}
    out: dict[str, list[tuple[str, float]]] = {}
    for vm in body.get("vms", []):
        out[str(vm["name"])] = [(str(s), _iso(str(at))) for s, at in vm.get("history", [])]
    return out


def _ticks(
    result: Mapping[str, Any], lines: Sequence[tuple[float, str]]
) -> tuple[dict[str, tuple[float, float]], dict[str, tuple[float, float]], str]:
    """Per VM: (realtime inside, outer stamp) of its last tick of boot 1 and its first of
    boot 2, and boot 2's id."""
    lines = [(t, ln) for t, ln in lines if not ln.startswith(QUOTING)]
    ids = {m.group(1): m.group(2) for _, ln in lines if (m := PHASE_LINE.search(ln))}
    if set(ids) != {"1", "2"}:
        raise BreakdownError("the console lacks E2E-PHASE boot1/boot2 lines")
    outer: dict[tuple[str, int], float] = {}
    for t, ln in lines:
        if (m := TICK.search(ln)) is not None:
            outer.setdefault((m.group(1), int(m.group(2))), t)
    last: dict[str, tuple[float, float]] = {}
    first: dict[str, tuple[float, float]] = {}
    for vm, ticks in result.get("ticks_raw", {}).items():
        before = [(int(n), float(rt)) for n, rt, boot in ticks if boot == ids["1"]]
        after = [(int(n), float(rt)) for n, rt, boot in ticks if boot == ids["2"]]
        if not before or not after:
            raise BreakdownError(f"{vm}: ticks before the kexec {len(before)}, after {len(after)}")
        for (n, rt), into in ((before[-1], last), (after[0], first)):
            if (vm, n) not in outer:
                raise BreakdownError(f"{vm}: tick {n} is not on the console")
            into[vm] = (rt, outer[(vm, n)])
    if not last:
        raise BreakdownError("no ticks_raw in the result")
    return last, first, ids["2"]


def _host_marks(
    clock: Clock, journal: Mapping[str, Sequence[Mapping[str, str]]]
) -> dict[str, float]:
    marks: dict[str, float] = {}
    for e in journal.get("boot1", ()):
        name = EVENT_IDS.get(e.get("MESSAGE_ID", ""))
        msg = e.get("MESSAGE", "")
        if name is None and e.get("_SYSTEMD_UNIT") == "cprd.service":
            if msg.startswith(LOCK_RELEASED):
                name = "lock released"
            elif msg.startswith(LOGIND_SIGNAL):
                name = "logind signal"
        if name is not None and name not in marks:  # the first of each
            marks[name] = clock.mono(0, int(e["__MONOTONIC_TIMESTAMP"]) / 1e6)
    for e in journal.get("boot2", ()):
        if (
            e.get("UNIT") == "cprd-restore.service"
            and e.get("JOB_TYPE", "start") == "start"
            and e.get("MESSAGE", "").startswith("Starting")
        ):
            marks["cprd-restore"] = clock.mono(1, int(e["__MONOTONIC_TIMESTAMP"]) / 1e6)
            break
    kexec = clock.printk(0, KEXEC_CORE)
    if kexec is None:
        raise BreakdownError(f"no '{KEXEC_CORE}' on the console")
    marks["kexec"] = kexec
    marks["kernel"] = clock.first_line[1]
    if "cprd-restore" not in marks:
        raise BreakdownError("boot 2's journal has no start of cprd-restore.service")
    return marks


def _phases(
    start: float,
    end: float,
    marks: Iterable[tuple[str, float]],
    first: str,
    labels: Mapping[str, str] = LABELS,
) -> tuple[Phase, ...]:
    """The blackout [start, end] cut at every mark inside it, each phase named by the mark
    it begins at (the first by ``first``)."""
    cuts = sorted((t, name) for name, t in marks if start < t < end)
    bounds = [(start, first), *cuts, (end, "")]
    return tuple(
        Phase(name, labels.get(name, LABELS.get(name, name)), t1 - t0)
        for (t0, name), (t1, _) in itertools.pairwise(bounds)
    )


def breakdown(
    result: Mapping[str, Any], lines: Sequence[tuple[float, str]]
) -> dict[str, Breakdown]:
    """Per VM, and for the host (``"host"``: from the first VM's last tick to the last
    VM's first tick), the blackout phase by phase; BreakdownError when data is missing."""
    journal = result.get("journal_raw")
    if not journal:
        raise BreakdownError("no journal_raw in the result (a virtual host built before it)")
    clock = Clock(lines, journal)
    last, first, _ = _ticks(result, lines)
    host = _host_marks(clock, journal)
    history = _history(result.get("manifest"))
    out: dict[str, Breakdown] = {}
    vm_marks: dict[str, dict[str, float]] = {}
    for vm in sorted(last):
        marks = dict(host)
        for step, epoch in history.get(vm, []):
            boot = 1 if step in BOOT2_STEPS else 0
            marks[step] = clock.real(boot, epoch)  # the last of each step
        vm_marks[vm] = marks
        start = clock.real(0, last[vm][0])
        end = clock.real(1, first[vm][0])
        live_from = min((marks[s] for s in LIVE_STEPS if s in marks), default=start)
        out[vm] = Breakdown(
            vm,
            _phases(
                start,
                end,
                marks.items(),
                "last tick",
                LIVE_LABELS if "stopping" in marks else LABELS,
            ),
            outer_s=first[vm][1] - last[vm][1],
            live_s=max(0.0, start - live_from),
        )
    # The host: its blackout is the union of the VMs'; per step the first VM to take it.
    merged: dict[str, float] = dict(host)
    for marks in vm_marks.values():
        for name, t in marks.items():
            if name not in host:
                merged[name] = min(t, merged.get(name, t))
    for name in ("restored",):  # every VM back: the last one
        times = [m[name] for m in vm_marks.values() if name in m]
        if times:
            merged[name] = max(times)
    h_start = min(clock.real(0, rt) for rt, _ in last.values())
    h_end = max(clock.real(1, rt) for rt, _ in first.values())
    out["host"] = Breakdown(
        "host",
        _phases(h_start, h_end, merged.items(), "last tick", HOST_LABELS),
        outer_s=max(o for _, o in first.values()) - min(o for _, o in last.values()),
        live_s=max(b.live_s for b in out.values()),
    )
    return out


def tolerance(outer_s: float) -> float:
    """How far the phases' sum may stray from the blackout measured outside: the outer
    runner polls the console every 0.1 s, under load later; 1 s or 2 %."""
    return max(1.0, 0.02 * outer_s)


def render(parts: Mapping[str, Breakdown]) -> list[str]:
    """The report: one table per VM and for the host."""
    out = []
    for name, b in parts.items():
        out.append(f"-- blackout of {name}: {b.outer_s:.2f} s measured outside --")
        for p in b.phases:
            out.append(f"  {p.seconds:8.2f} s  {p.label}")
        out.append(
            f"  {b.total_s:8.2f} s  sum of the phases; unaccounted {b.unaccounted_s:+.2f} s "
            f"(tolerance {tolerance(b.outer_s):.2f} s)"
        )
        share = b.cprd_s / b.outer_s if b.outer_s > 0 else 0.0
        out.append(f"  cprd's share: {b.cprd_s:.2f} s of {b.outer_s:.2f} s ({share:.0%})")
        if b.live_s > 0:
            out.append(f"  live phase before the blackout (running): {b.live_s:.2f} s")
    return out


def load_stamped(text: str) -> list[tuple[float, str]]:
    """serial-stamped.log (``%9.2f <line>`` per line) back into (outer time, line)."""
    out = []
    for row in text.split("\n"):  # not splitlines(): a console line may hold a \r
        head, _, line = row.lstrip().partition(" ")
        try:
            out.append((float(head), line))
        except ValueError:
            continue
    return out


def as_json(parts: Mapping[str, Breakdown]) -> dict[str, Any]:
    return {name: b.to_dict() for name, b in parts.items()}


def capture(result: Mapping[str, Any], lines: Sequence[tuple[float, str]]) -> dict[str, Any]:
    """What the breakdown reads of one run, small enough for a test's data file: the
    result's journal, ticks and manifest; the console lines it reads (each boot's first
    line and the line that places its zero, the kexec line, E2E-PHASE and E2E-TICK)."""
    starts = [n for n, (_, ln) in enumerate(lines) if BOOT.match(ln)]
    keep = set(starts)
    for b, first in enumerate(starts):
        end = starts[b + 1] if b + 1 < len(starts) else len(lines)
        switch, zero = _settled(lines, first, end), _zero_line(lines, first, end)
        keep |= {n for n in (switch, zero) if n is not None}
        if switch is not None and zero is not None:  # and the lines the switch rules out
            least = lines[zero][0] - _printk(lines[zero][1])
            keep |= {
                n
                for n in range(first, switch)
                if PRINTK.match(lines[n][1])
                and _printk(lines[n][1]) > max(0.0, lines[n][0] - least)
            }
    for n, (_, ln) in enumerate(lines):
        if ln.startswith(QUOTING):
            continue
        if KEXEC_CORE in ln or TICK.search(ln) or PHASE_LINE.search(ln):
            keep.add(n)
    return {
        "result": {k: result[k] for k in ("journal_raw", "ticks_raw", "manifest") if k in result},
        "lines": [[lines[n][0], lines[n][1]] for n in sorted(keep)],
    }
