"""cprd-generator: a systemd generator (systemd.generator(7)) for VMs saved by cprd.

Installed as /usr/lib/systemd/system-generators/cprd-generator.  systemd runs it very
early at boot (only / and /usr are mounted) and at every daemon-reload, with three
output directories; cprd writes to the first (normal priority).  From the manifest of
the config's state_dir it writes:

- for each VM of a committed manifest that ran as the main process of an operator's
  service (``unit`` in the manifest) and still has a state to restore: the drop-in
  ``<unit>.d/50-cprd-restore.conf`` (:func:`cprd.units.dropin`), so the unit's own start
  at boot is skipped and cprd-restore's start runs the replayed argv with ``-incoming
  defer`` (no cold boot, no second QEMU on the same disks);
- ``cprd-restore.service.d/50-cprd-needs.conf``: Wants= + After= the mount units of every
  path the saved VMs need (state files, disk images, memory files, sockets, the binary), so
  cprd-restore starts as early as those mounts allow.

Once a VM is restored (manifest) or its restore failed in this boot (a mark in
/run/cprd/restore-failed), the next daemon-reload (cprd-restore does one at its end)
writes nothing for it: its unit is again exactly as the operator wrote it.

A generator must never fail the boot: whatever goes wrong (no config, no manifest,
state_dir not mounted yet, a corrupt or unreadable manifest), it writes nothing for the
VMs concerned, says why on stderr and in the kernel log, and exits 0.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Collection
from pathlib import Path

from cprd import config as cfg
from cprd import manifest as mf
from cprd.hosts import relaunch_argv
from cprd.manifest import Manifest, Outcome, Phase, VMRecord
from cprd.units import (
    DROPIN_NAME,
    FAILED_DIR,
    argv_paths,
    dropin,
    mount_needs,
    needs_dropin,
    valid_unit_name,
)

RESTORE_UNIT = "cprd-restore.service"
NEEDS_NAME = "50-cprd-needs.conf"


def pending(rec: VMRecord) -> bool:
    """Whether VM ``rec`` still has a complete state to restore (pure)."""
    return (
        rec.outcome is not Outcome.RESTORED
        and rec.state_size is not None
        and not rec.shutdown_asked
    )


def generate(
    manifest: Manifest,
    manifest_path: str,
    failed: Collection[str] = (),
    problems: list[str] | None = None,
) -> dict[str, str]:
    """The files to write, as {path relative to the output dir: content} (pure).

    ``failed``: units whose restore failed in this boot (nothing written for them).
    A VM whose drop-in cannot be written (its argv is bytes its QEMU's user chose) gets
    none, the others theirs: the reason is appended to ``problems``."""
    if manifest.phase is not Phase.COMMITTED:
        return {}
    out: dict[str, str] = {}
    paths: list[str] = [manifest_path]
    for rec in manifest.vms:
        if rec.outcome is Outcome.RESTORED:
            continue
        paths += [rec.state_file, rec.executable, rec.qmp_socket]
        paths += [rec.agent_socket] if rec.agent_socket else []
        paths += [d.path for d in rec.disks] + [f.path for f in rec.in_place]
        paths += argv_paths(rec.argv)
        unit = rec.unit
        if unit is None or unit.transient or not pending(rec):
            continue
        if not valid_unit_name(unit.name) or not unit.name.endswith(".service"):
            continue
        if rec.outcome is Outcome.FAILED and unit.name in failed:
            continue
        argv = relaunch_argv(rec.argv, rec.machine_type)
        try:
            text = dropin(rec.name, unit.name, rec.executable, argv, manifest_path)
            text.encode()
        except (ValueError, UnicodeError) as err:
            if problems is not None:
                problems.append(f"VM {rec.name!r}: no drop-in for {unit.name}: {err}")
            continue
        out[f"{unit.name}.d/{DROPIN_NAME}"] = text
    needs = mount_needs(paths)
    if needs:
        out[f"{RESTORE_UNIT}.d/{NEEDS_NAME}"] = needs_dropin(needs)
    return out


def unmounted_mount_point(path: str, fstab: str, mountinfo: str) -> str | None:
    """The /etc/fstab mount point holding ``path`` that is not mounted (pure); None when
    every file system on its way is mounted (or is not in fstab)."""
    mounted = {ln.split()[4] for ln in mountinfo.splitlines() if len(ln.split()) > 4}
    best = None
    for line in fstab.splitlines():
        fields = line.split()
        if len(fields) < 2 or fields[0].startswith("#") or not fields[1].startswith("/"):
            continue
        point = fields[1].rstrip("/") or "/"
        inside = point != "/" and (path == point or path.startswith(point + "/"))
        if inside and (best is None or len(point) > len(best)):
            best = point
    return best if best is not None and best not in mounted else None


def _unmounted(path: Path) -> str | None:
    try:
        fstab = Path("/etc/fstab").read_text()
        mountinfo = Path("/proc/self/mountinfo").read_text()
    except OSError:
        return None
    return unmounted_mount_point(str(path), fstab, mountinfo)


def failed_units(failed_dir: Path = Path(FAILED_DIR)) -> frozenset[str]:
    try:
        return frozenset(p.name for p in failed_dir.iterdir())
    except OSError:
        return frozenset()


def write(out_dir: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = out_dir / rel
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.chmod(tmp, 0o644)
        tmp.rename(path)


def say(msg: str, level: int = 4) -> None:
    """stderr, and the kernel log at ``level`` (4 warning, 6 info) when systemd runs us
    (this early, journald may not be up; systemd sets $SYSTEMD_SCOPE for generators from
    v251)."""
    line = f"cprd-generator: {msg}"
    print(line, file=sys.stderr)
    if os.environ.get("SYSTEMD_SCOPE"):
        try:
            fd = os.open("/dev/kmsg", os.O_WRONLY | os.O_NOCTTY | os.O_CLOEXEC)
        except OSError:
            return
        try:
            os.write(fd, f"<{level}>{line}\n".encode(errors="replace"))
        except OSError:
            pass
        finally:
            os.close(fd)


def run(
    argv: list[str], config_path: Path = cfg.DEFAULT_PATH, failed_dir: Path = Path(FAILED_DIR)
) -> int:
    """The generator: ``argv`` is [normal_dir, early_dir, late_dir]; always 0."""
    if not argv:
        say("no output directory given: nothing written")
        return 0
    out_dir = Path(argv[0])
    try:
        config = cfg.load(config_path)
    except Exception as err:
        say(f"{err}: nothing written")
        return 0
    path = config.manifest_path
    if not path.exists():
        mount = _unmounted(path)
        if mount is not None:
            # state_dir is on a file system not mounted yet: its units would cold-boot.
            say(
                f"manifest {path} is on {mount}, not mounted yet: no unit of a saved VM is "
                "held back; keep state_dir on the root file system"
            )
        return 0
    try:
        manifest = mf.read(path)
        problems: list[str] = []
        files = generate(manifest, str(path), failed_units(failed_dir), problems)
        write(out_dir, files)
    except Exception as err:
        say(f"manifest {path}: {err}: nothing written")
        return 0
    for problem in problems:
        say(problem)
    for rel in files:
        say(f"wrote {rel}", level=6)  # info: problems are warnings (4)
    return 0


def main() -> int:
    try:
        return run(sys.argv[1:])
    except BaseException as err:
        say(f"unexpected error: {err!r}")
        return 0
