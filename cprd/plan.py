"""Decisions: pure functions of a VM's facts and the config.

Which VMs are suspended first, whether RAM stays in place, which migration settings a
save (and so the restore) uses, and whether everything fits in state_dir.  Nothing here
does I/O; the tests feed it plain data.
"""

from __future__ import annotations

import enum
import hashlib
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cprd.config import InPlace, Live, SaveSettings, Suspend, VMSettings
from cprd.hosts import (
    argv_anchored,
    drops_root_itself,
    manager_of,
    replay_problems,
    run_as_problem,
)
from cprd.units import cgroup_unit, decide_unit
from cprd.vm import Backend, MemClass, VMFacts

MIN_VERSION = (8, 2, 0)
TRANSFER_VERSION = (10, 0, 0)
MAPPED_RAM_VERSION = (9, 0, 0)
DIRECT_IO_VERSION = (9, 1, 0)
#: The default max-bandwidth (128 MiB/s) throttles a save to file about tenfold.
UNLIMITED_BANDWIDTH = 2**63 - 1
#: Device state and migration stream overhead, beyond guest RAM.
STATE_OVERHEAD = 16 * 2**20
#: Runstates a save can start from.
SAVEABLE = frozenset({"running", "paused", "suspended"})
#: Capabilities cprd sets on every save and restore, so none is left from elsewhere.
MANAGED_CAPABILITIES = ("x-ignore-shared", "mapped-ram", "multifd")
#: downtime-limit (ms) of a live save's live phase: QEMU switches over by itself only when
#: less than about a millisecond of writing is left; otherwise cprd stops the VMs together
#: (cprd.live).  Not 0: with 0, QEMU 10.0 skips its exact count of the pages dirtied during
#: the first pass and switches over as soon as that pass ends, whatever the guest dirtied
#: (observed here: a guest rewriting 16 MiB at 130 MB/s was stopped after one pass).
LIVE_DOWNTIME_MS = 1
#: avail-switchover-bandwidth (bytes/s) of the live phase: QEMU's switch-over threshold is
#: this rate times downtime-limit, here 1 KiB, less than a page: QEMU switches over by
#: itself only when the guest dirtied nothing since its last pass.  (At the rate QEMU
#: measures, a megabyte or so: a TCG guest starved by a loaded host was seen to dirty less
#: and be stopped alone, before the others.)
LIVE_SWITCHOVER_BANDWIDTH = 2**20
#: Filesystems without O_DIRECT.
NO_DIRECT_IO_FS = frozenset({"tmpfs", "ramfs", "overlay", "fuse", "9p", "virtiofs"})


class SaveMode(enum.Enum):
    """QEMU's migration mode for a save, recorded in the manifest (``parameters.mode``)
    and set again by the restore."""

    #: stopped first, then saved (VMs suspended first, RAM left in place, or not running)
    CPR_REBOOT = "cpr-reboot"
    #: saved live (RAM written while the guest runs), stopped for the last pass only
    NORMAL = "normal"


@dataclass(frozen=True)
class MigrationSettings:
    """What both sides of a save to file set; recorded in the manifest."""

    capabilities: Mapping[str, bool]
    parameters: Mapping[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"capabilities": dict(self.capabilities), "parameters": dict(self.parameters)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MigrationSettings:
        return cls(dict(data["capabilities"]), dict(data["parameters"]))

    @property
    def mode(self) -> SaveMode:
        """The migration mode (a manifest from before live saves has cpr-reboot)."""
        return SaveMode(self.parameters.get("mode", SaveMode.CPR_REBOOT.value))

    @property
    def live(self) -> bool:
        return self.mode is SaveMode.NORMAL

    def commands(self) -> list[tuple[str, dict[str, Any]]]:
        """The QMP commands that apply these settings, in order."""
        caps = [{"capability": k, "state": v} for k, v in self.capabilities.items()]
        return [
            ("migrate-set-capabilities", {"capabilities": caps}),
            ("migrate-set-parameters", dict(self.parameters)),
        ]


@dataclass(frozen=True)
class VMPlan:
    name: str
    suspend: bool
    in_place: bool
    settings: MigrationSettings
    bytes_to_write: int
    #: the argv every check of this plan was made on (facts.argv of that one read): the
    #: one the save records, never a later read (see :func:`argv_anchor`)
    argv: tuple[str, ...]
    notes: tuple[str, ...] = ()
    problems: tuple[str, ...] = ()
    in_place_backends: tuple[Backend, ...] = field(default=())

    @property
    def live(self) -> bool:
        return self.settings.live

    @property
    def action(self) -> str:
        verb = "suspend, then save" if self.suspend else "save live" if self.live else "save"
        return f"{verb} ({'RAM in place' if self.in_place else 'RAM copied'})"


def _supports(facts: VMFacts, version: tuple[int, int, int], capability: str | None) -> bool:
    if facts.qemu_version < version:
        return False
    return capability is None or capability in facts.migration_capabilities


def decide_suspend(facts: VMFacts, vm: VMSettings) -> tuple[bool, str]:
    """Whether cprd suspends the guest first, and why."""
    if facts.runstate == "suspended":
        return False, "already suspended by the guest"
    if vm.suspend is Suspend.NEVER:
        return False, "suspend: never"
    if vm.suspend is Suspend.ALWAYS:
        return True, "suspend: always"
    if facts.vfio_devices:
        return True, "has VFIO devices (" + ", ".join(facts.vfio_devices) + ")"
    return False, "no VFIO devices"


def decide_in_place(facts: VMFacts, save: SaveSettings) -> tuple[bool, str]:
    """Whether shared RAM stays in place (x-ignore-shared), and why.

    x-ignore-shared skips every shared backend, so it is allowed only when each of them
    survives a reboot.
    """
    shared = [b for b in facts.backends if b.share]
    if not shared:
        return False, "no shared memory backend: RAM is copied"
    if save.in_place is InPlace.NEVER:
        return False, "save.in_place: never: RAM is copied"
    volatile = [b for b in shared if b.memclass is MemClass.SHARED_VOLATILE]
    if volatile:
        why = ", ".join(
            f"{b.id} ({b.mem_path} on {b.fstype})" if b.mem_path else f"{b.id} ({b.qom_type})"
            for b in volatile
        )
        return False, f"shared memory lost at a reboot: {why}: RAM is copied"
    return True, "all shared memory is persistent: RAM stays in place"


def save_mode(
    facts: VMFacts,
    vm: VMSettings,
    save: SaveSettings,
    live_blockers: tuple[str, ...] = (),
) -> tuple[SaveMode, str]:
    """Whether VM ``facts`` is saved live (normal mode) or stopped first (cpr-reboot),
    and why (pure).

    Live only for a running VM whose RAM is copied with mapped-ram (QEMU 9.0 or later)
    and that is not suspended first (VFIO): a VM suspended first, one whose RAM stays in
    place, or one not running gains nothing from a live phase.  ``live_blockers``: what
    QEMU reports blocking a migration in normal mode (``query-migrate`` blocked-reasons)."""
    stop_first = SaveMode.CPR_REBOOT
    if save.live is Live.NEVER:
        return stop_first, "save.live: never: stopped first"
    if facts.runstate != "running":
        return stop_first, f"runstate {facts.runstate!r}: stopped first"
    if decide_suspend(facts, vm)[0] or facts.vfio_devices:
        return stop_first, "suspended first: stopped first"
    if decide_in_place(facts, save)[0]:
        return stop_first, "RAM stays in place: stopped first"
    if not _supports(facts, MAPPED_RAM_VERSION, "mapped-ram") or (
        "multifd" not in facts.migration_capabilities
    ):
        return stop_first, f"QEMU {facts.version_str} has no mapped-ram: stopped first"
    if live_blockers:
        return stop_first, f"live migration blocked ({live_blockers[0]}): stopped first"
    return SaveMode.NORMAL, "RAM copied while it runs (live), stopped for the last pass"


def migration_settings(
    facts: VMFacts,
    in_place: bool,
    save: SaveSettings,
    state_fstype: str | None,
    mode: SaveMode = SaveMode.CPR_REBOOT,
) -> MigrationSettings:
    caps = dict.fromkeys(MANAGED_CAPABILITIES, False)
    params: dict[str, Any] = {"mode": mode.value, "max-bandwidth": UNLIMITED_BANDWIDTH}
    if mode is SaveMode.NORMAL:
        params["downtime-limit"] = LIVE_DOWNTIME_MS
        params["avail-switchover-bandwidth"] = LIVE_SWITCHOVER_BANDWIDTH
    if in_place:
        caps["x-ignore-shared"] = True
    elif _supports(facts, MAPPED_RAM_VERSION, "mapped-ram"):
        caps["mapped-ram"] = True
        caps["multifd"] = True
        params["multifd-channels"] = save.multifd_channels
        if _supports(facts, DIRECT_IO_VERSION, None) and state_fstype not in NO_DIRECT_IO_FS:
            params["direct-io"] = True
    # Only capabilities this QEMU knows may be named, even to switch them off.
    known = set(facts.migration_capabilities)
    caps = {k: v for k, v in caps.items() if k in known or v}
    if _supports(facts, DIRECT_IO_VERSION, None) and "direct-io" not in params:
        params["direct-io"] = False
    return MigrationSettings(caps, params)


def argv_anchor(facts: VMFacts) -> str | None:
    """The systemd service whose ``ExecStart=`` (held by PID 1, root) this QEMU's argv is
    (:func:`cprd.hosts.argv_anchored`), or None (pure).  Only the service's main process
    run from that very executable counts: a process the main process forked, or one
    whose binary is not the one systemd ran, may have any argv.

    No TOCTOU: ``facts.argv`` is one read of /proc/PID/cmdline, kept as an immutable
    tuple; it is compared here and it is what the save records (:attr:`VMPlan.argv`),
    and commit refuses a QEMU whose argv then differs (inventory.pin_record).  A QEMU
    that rewrites its argv after the read changes neither."""
    info, cg = facts.unit_info, cgroup_unit(facts.cgroup)
    if info is None or cg is None or info.name != cg.name or info.main_pid != facts.pid:
        return None
    if info.exec_path is None or info.exec_path != facts.executable:
        return None
    if not argv_anchored(facts.argv, info.exec_start, facts.machine_type):
        return None
    return info.name


def relaunch_problem(facts: VMFacts, trusted_uids: Iterable[int]) -> tuple[str | None, str | None]:
    """Why cprd cannot relaunch this QEMU as it runs now (:func:`cprd.hosts.run_as_problem`,
    anchored to its unit's ``ExecStart=`` when :func:`argv_anchor` says so) or None, and
    that unit or None (pure): the one question the save's plan and cpr-transfer ask."""
    ident = facts.identity
    anchor = argv_anchor(facts)
    problem = run_as_problem(
        ident.uids if ident else (),
        ident.gids if ident else (),
        facts.process,
        facts.argv,
        trusted_uids,
        anchor is not None,
    )
    return problem, anchor


def plan_vm(
    facts: VMFacts,
    vm: VMSettings,
    save: SaveSettings,
    state_fstype: str | None,
    trusted_uids: Collection[int] = (),
    live_blockers: tuple[str, ...] = (),
) -> VMPlan:
    """The plan for one VM, with every reason it cannot be saved in ``problems``.

    ``trusted_uids``: discovery.trusted_uids, the uids (besides root and a uid the QEMU
    dropped to itself) cprd relaunches a QEMU as; ``live_blockers``: what QEMU reports
    against a normal-mode (live) migration."""
    problems: list[str] = []
    notes: list[str] = []
    suspend, suspend_why = decide_suspend(facts, vm)
    if facts.runstate != "running" and suspend:
        if facts.vfio_devices:
            problems.append(
                f"runstate {facts.runstate!r}: a VM with VFIO devices can only be saved "
                "once its guest suspends itself or runs"
            )
        suspend, suspend_why = False, f"not suspended: runstate {facts.runstate!r}"
    notes.append(suspend_why)
    in_place, in_place_why = decide_in_place(facts, save)
    notes.append(in_place_why)

    if facts.qemu_version < MIN_VERSION:
        problems.append(f"QEMU {facts.version_str} is too old for cpr-reboot (needs 8.2 or later)")
    if facts.runstate not in SAVEABLE:
        problems.append(f"runstate {facts.runstate!r} cannot be saved")
    if suspend:
        if not facts.agent_socket:
            problems.append(
                f"must be suspended first ({suspend_why}) but no guest agent is configured"
            )
        elif not facts.agent_reachable:
            problems.append(
                f"must be suspended first ({suspend_why}) but its guest agent at "
                f"{facts.agent_socket} does not answer"
            )
        if not facts.wakeup_suspend_support:
            problems.append("must be suspended first but the machine has S3 disabled")
    if facts.vfio_devices and not suspend and facts.runstate != "suspended":
        problems.append("has VFIO devices but would not be suspended (suspend: never)")
    for reason in facts.migration_blockers:
        problems.append(f"migration blocked: {reason}")
    managed = manager_of(facts.cgroup, facts.parent_comm, facts.argv)
    if managed is not None:
        problems.append(managed.problem())
    problems.extend(replay_problems(facts.argv))
    unit = decide_unit(cgroup_unit(facts.cgroup), facts.pid, facts.unit_info)
    if unit.note:
        notes.append(unit.note)
    if unit.problem:
        problems.append(unit.problem)
    if facts.identity is not None:
        # Relaunched as it runs (hosts.relaunch_as): refused only when cprd cannot.
        problem, anchor = relaunch_problem(facts, trusted_uids)
        if problem is not None:
            problems.append(problem)
        elif anchor is not None and facts.process and drops_root_itself(facts.process, facts.argv):
            notes.append(
                f"argv matches systemd's ExecStart of {anchor} (root's record): relaunched "
                f"as root, drops to uid {facts.process.uid} again"
            )

    mode, mode_why = save_mode(facts, vm, save, live_blockers)
    notes.append(mode_why)
    settings = migration_settings(facts, in_place, save, state_fstype, mode)
    in_place_backends = tuple(b for b in facts.backends if in_place and b.share)
    copied = sum(b.size for b in facts.backends if b not in in_place_backends)
    return VMPlan(
        name=facts.name,
        suspend=suspend,
        in_place=in_place,
        settings=settings,
        bytes_to_write=copied + STATE_OVERHEAD,
        argv=facts.argv,
        notes=tuple(notes),
        problems=tuple(problems),
        in_place_backends=in_place_backends,
    )


def space_problem(plans: Iterable[VMPlan], free_bytes: int, margin_bytes: int) -> str | None:
    """Why the state files would not fit, or None."""
    need = sum(p.bytes_to_write for p in plans)
    if need + margin_bytes > free_bytes:
        return (
            f"not enough space in state_dir: {_mib(need)} to write plus {_mib(margin_bytes)} "
            f"margin, {_mib(free_bytes)} free"
        )
    return None


_TAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")
_HASHED = re.compile(r"(?:.*-)?[0-9a-f]{12}")


def safe_file_name(name: str) -> str:
    """A file name for VM ``name``: its own name when harmless, else a hashed form.

    Injective up to a 48-bit hash collision: a tame name that looks like a hashed form
    (ends in ``-`` and 12 hex digits) is hashed too, so ``x y`` (``x_y-<hash>``) and a
    VM named ``x_y-<hash>`` never share a state file."""
    if _TAME.fullmatch(name) and not _HASHED.fullmatch(name):
        return name
    digest = hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:12]
    tame = re.sub(r"[^A-Za-z0-9_.+-]", "_", name).lstrip("._-")[:40]
    return f"{tame}-{digest}" if tame else digest


def duplicate_names(facts: Iterable[VMFacts]) -> dict[str, str]:
    """VMs that share a name, or a state file name (refused at check and prepare)."""
    seen: dict[str, str] = {}
    files: dict[str, str] = {}
    problems: dict[str, str] = {}
    for f in facts:
        if f.name in seen:
            problems[f.name] = f"two VMs share this name ({seen[f.name]} and {f.qmp_socket})"
        else:
            file = safe_file_name(f.name)
            if file in files:
                problems[f.name] = (
                    f"its state file name {file!r} is also that of VM {files[file]!r}: "
                    "rename one of them (-name)"
                )
            files.setdefault(file, f.name)
        seen[f.name] = f.qmp_socket
    return problems


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def transfer_path(facts: VMFacts, new_version: tuple[int, int, int]) -> tuple[bool, str]:
    """Whether a QEMU-only upgrade can move this VM with cpr-transfer, and why (pure).

    cpr-transfer hands the guest RAM itself to the new process, so every backend must be
    shareable (memfd, or a file with share=on) and the machine must have aux-ram-share
    on for QEMU's own auxiliary RAM.  Otherwise: cpr-reboot to a file and an immediate
    restore with the new binary.
    """
    managed = manager_of(facts.cgroup, facts.parent_comm, facts.argv)
    refused = [managed.problem()] if managed else list(replay_problems(facts.argv))
    if refused:  # the save-to-file path refuses it, before anything stops
        return False, f"{refused[0]}: not moved"
    unit = decide_unit(cgroup_unit(facts.cgroup), facts.pid, facts.unit_info).unit
    if unit is not None:
        # The new QEMU must be the unit's main process; cpr-transfer starts it beside the
        # old one, which only a restore into the unit (after the old one quit) can do.
        return False, f"main process of {unit.name}: saved to a file and restored into it"
    if facts.qemu_version < TRANSFER_VERSION or new_version < TRANSFER_VERSION:
        old = facts.version_str
        new = ".".join(map(str, new_version))
        return False, f"cpr-transfer needs QEMU 10.0 on both sides (running {old}, new {new})"
    private = [b.id for b in facts.backends if not b.share]
    if private:
        return False, f"RAM not shareable ({', '.join(private)}): saved to a file instead"
    if not facts.aux_ram_share:
        return False, "-machine aux-ram-share=on is not set: saved to a file instead"
    if facts.vfio_devices:
        return False, "VFIO devices: saved to a file (suspended) instead"
    return True, "all RAM shareable and aux-ram-share=on: cpr-transfer"
