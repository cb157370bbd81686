"""What cprdctl prints: tables, sizes, ages and progress lines.

Pure functions of plain data (the daemon's D-Bus documents, the parsed manifest, the
Progress signals cprdctl has seen), so each can be tested without a bus.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


def mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def size(n: int) -> str:
    """Bytes for a person: KiB below one MiB (an in-place state file is a few hundred KiB)."""
    if n < 2**20:
        return f"{n / 2**10:.0f} KiB"
    return mib(n)


def ago(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 120:
        return f"{s}s ago"
    if s < 7200:
        return f"{s // 60}m ago"
    return f"{s // 3600}h ago"


def agent_cell(vm: dict[str, Any], now: float) -> str:
    """The AGENT column: the last probe's answer and its age (pure)."""
    if not vm.get("agent_socket") or vm.get("pid") == 0:  # no agent, or no QEMU
        return "-"
    probed = float(vm.get("agent_probed_at", 0.0))
    if probed <= 0:
        return "not probed"
    return f"{'yes' if vm.get('agent_reachable') else 'no'} {ago(now - probed)}"


# --- predictions (check) --------------------------------------------------------------------

NOT_MEASURED = "not measured; run `cprdctl check --measure` as root"


def seconds(s: float) -> str:
    return f"{s * 1000:.0f} ms" if s < 1 else f"{s:.1f} s"


def prediction_line(p: dict[str, Any]) -> str:
    """One VM's predicted save and restore (pure), from a check result's ``prediction``."""
    head = f"predicted ({p['mode']}): write {size(int(p['bytes']))}"
    if not p["measured"]:
        return f"{head}; times {NOT_MEASURED}"
    return (
        f"{head}, stopped {seconds(float(p['stopped_s']))}, "
        f"restore {seconds(float(p['restore_s']))}"
    )


def host_prediction(results: list[dict[str, Any]]) -> str | None:
    """The host's predicted totals and the bandwidth behind them (pure); None without VMs."""
    p = next((r["prediction"] for r in results if "prediction" in r), None)
    if p is None:
        return None
    head = f"host ({p['host_vms']} VMs): write {size(int(p['host_bytes']))}"
    if not p["measured"]:
        return f"{head}; times {NOT_MEASURED}"
    return (
        f"{head}, longest stop {seconds(float(p['host_stopped_s']))}, "
        f"restore all {seconds(float(p['host_restore_s']))} "
        f"(state_dir measured {p['measured_at']}: write {mib(int(p['write_bps']))}/s, "
        f"read {mib(int(p['read_bps']))}/s)"
    )


# --- progress -------------------------------------------------------------------------------

#: Phases during which a VM is stopped (or asleep) because of cprd, until it is saved.
STOPPING = frozenset({"suspending", "saving"})
FINAL = frozenset({"saved", "restored", "upgraded"})


@dataclass
class VMProgress:
    """What cprdctl has seen of one VM's Progress signals (monotonic times)."""

    phase: str = ""
    done: int = 0
    total: int = 0
    phase_at: float = 0.0  # when this phase began
    stopped_at: float | None = None  # first "suspending" or "saving"
    finished_at: float | None = None  # "saved" (or another final phase)
    in_place: bool = False

    def update(self, at: float, phase: str, done: int, total: int) -> None:
        if phase != self.phase:
            self.phase, self.phase_at = phase, at
        if phase in STOPPING and self.stopped_at is None:
            self.stopped_at = at
        if phase in FINAL:
            self.finished_at = at
        self.done, self.total = done, total

    @property
    def seconds_stopped(self) -> float | None:
        if self.stopped_at is None or self.finished_at is None:
            return None
        return self.finished_at - self.stopped_at


def progress_line(p: VMProgress, now: float) -> str:
    """One VM's progress: phase, bytes, rate, ETA (pure)."""
    if p.in_place and p.phase in ("saving", "saved"):
        what = "saving" if p.phase == "saving" else f"saved {size(p.done)} state"
        return f"{what}, in place, nothing to copy"
    if p.phase in FINAL:
        took = (p.finished_at or now) - (p.stopped_at or p.phase_at)
        return f"{p.phase} {size(p.done)} in {took:.1f}s"
    if p.total <= 0:
        return p.phase
    bytes_ = f"{p.done / 2**20:.0f}/{mib(p.total)}"
    elapsed = max(now - p.phase_at, 1e-3)
    rate = p.done / elapsed
    if rate <= 0:
        return f"{p.phase} {bytes_}"
    eta = (p.total - p.done) / rate if p.total > p.done else 0.0
    return f"{p.phase} {bytes_} {rate / 2**20:.0f} MiB/s ETA {eta:.0f}s"


def save_summary(manifest: dict[str, Any], seen: dict[str, VMProgress]) -> str:
    """The table printed after a prepare: VM, action, bytes, seconds stopped (pure).

    Action and bytes are the manifest's; seconds stopped are timed by cprdctl from the
    daemon's Progress signals (first "suspending" or "saving" to "saved")."""
    rows = [["VM", "ACTION", "BYTES", "STOPPED"]]
    for vm in manifest.get("vms", []):
        params = vm.get("migration", {}).get("parameters", {})
        live = params.get("mode") == "normal"  # saved while it ran (cprd.plan.save_mode)
        verb = "suspend, then save" if vm.get("cprd_suspended") else "save live" if live else "save"
        where = "RAM in place" if vm.get("in_place") else "RAM copied"
        state = vm.get("state_size")
        secs = seen[vm["name"]].seconds_stopped if vm["name"] in seen else None
        rows.append(
            [
                str(vm["name"]),
                f"{verb} ({where})",
                size(state) if isinstance(state, int) else "-",
                f"{secs:.1f}s" if secs is not None else "-",
            ]
        )
    return table(rows)


def manifest_summary(manifest: dict[str, Any]) -> str:
    """`cprdctl manifest`: one header line, then VM, phase, outcome, state size, QEMU (pure)."""
    host = manifest.get("host", {})
    vms = manifest.get("vms", [])
    head = (
        f"phase: {manifest.get('phase')}, created {manifest.get('created')}, "
        f"kernel {host.get('kernel', '?')}, {len(vms)} VMs"
    )
    rows = [["VM", "PHASE", "OUTCOME", "STATE SIZE", "QEMU"]]
    for vm in vms:
        restore = vm.get("restore", {})
        outcome = str(restore.get("outcome", "?"))
        if restore.get("reason"):
            outcome += f": {restore['reason']}"
        state = vm.get("state_size")
        rows.append(
            [
                str(vm["name"]),
                str(vm.get("step") or manifest.get("phase")),
                outcome,
                size(state) if isinstance(state, int) else "-",
                f"{vm.get('qemu_version')} {vm.get('executable')}",
            ]
        )
    return head + "\n" + table(rows)


def action_cell(vm: dict[str, Any], check: dict[str, Any]) -> str:
    """The ACTION column (pure): the check's action, or REFUSED; without a check result
    (cprd does not check a VM it saved or committed) the VM's phase, or "-"."""
    if not check:
        return str(vm.get("phase") or "-")
    return str(check.get("action", "?")) if check.get("ok") else "REFUSED"


def status_table(vms: list[dict[str, Any]], checks: list[dict[str, Any]], now: float) -> str:
    """`cprdctl status`'s table (pure); a STEP column when the daemon reports a VM's step.

    A VM cprd holds (saved, committed) has no check result: its ACTION is its phase."""
    by_name = {c["name"]: c for c in checks}
    steps = any(vm.get("step") for vm in vms)
    rows = [["VM", "RUNSTATE", *(["STEP"] if steps else []), "RAM", "MEMORY", "VFIO", "AGENT"]]
    rows[0] += ["ACTION", "TO WRITE"]
    for vm in vms:
        c = by_name.get(vm["name"], {})
        classes = sorted({m["class"] for m in vm["memory"]})
        qemu = vm.get("pid") != 0  # a committed VM is listed from the manifest, no QEMU
        rows.append(
            [
                vm["name"],
                vm["runstate"] or "-",
                *([str(vm.get("step") or "-")] if steps else []),
                mib(vm["ram_bytes"]) if qemu else "-",
                ",".join(classes) or "-",
                str(len(vm["vfio_devices"])) if vm["vfio_devices"] else "-",
                agent_cell(vm, now),
                action_cell(vm, c),
                mib(c["bytes_to_write"]) if "bytes_to_write" in c else "-",
            ]
        )
    return table(rows)
