"""The kexec end-to-end test (issues 8, 16): a virtual host does a real kexec and gets its VMs back.

    python3 scripts/kexec_e2e.py [--dist trixie|bookworm] [--keep] [--timeout S] [--deb FILE]
                                 [--rebuild]

As root with QEMU 10 (make setup). --dist picks the virtual host and the path that must
save the VMs: trixie (default; Debian 13, systemd 257): logind's
PrepareForShutdownWithMetadata, under cprd's delay lock; bookworm (Debian 12, systemd
252): cprd-kexec-guard.service's ExecStop. Steps:
1. the test guest (tests/guest/build.sh) and the virtual host's base root
   (tests/kexec_e2e/build-vhost.sh DIST: debootstrap, Debian kernel + initramfs, QEMU 10,
   kexec-tools, python3, dbus), both cached under /var/cache/cprd-test;
2. the host disk: a copy of that root with the project's .deb for that release
   (packaging/build-deb.sh --dist DIST) installed in a chroot (trixie: `apt-get install
   ./cprd.deb`, which pulls Debian's python3-dbus-fast & co.; bookworm: dpkg -i), the test
   guest, the scenario units of tests/kexec_e2e/host enabled, packed with mkfs.ext4 -d;
   cached by a hash of everything that goes into it (vhost-*/images/), so a warm run
   boots at once;
3. the host boots under TCG (3 GiB, 2 vCPUs, memmap=256M!1G, serial to serial.log) on a
   qcow2 overlay of that disk; cprd-e2e.service inside it starts two inner VMs, waits for
   their ticks, runs `kexec --load` and plain `systemctl kexec`; after the kexec
   cprd-restore.service restores them and cprd-e2e.service checks in the first boot's
   journal which path saved them, reports `E2E-RESULT <json>` on the serial console and
   powers off.
This script follows serial.log, stamps each line with its own clock (for the blackout as
seen from outside), prints the figures and the blackout's per-phase breakdown
(scripts/kexec_breakdown.py: per VM and for the host, from the journal of both boots, the
phases adding up to the blackout measured outside) and exits non-zero when anything
failed, or when the phases leave more than a second (2 %) of the blackout unaccounted.
`--report DIR` prints the report again from a kept work directory.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import kexec_breakdown as kb

TOP = Path(__file__).resolve().parent.parent
E2E = TOP / "tests" / "kexec_e2e"
HOST = E2E / "host"
CACHE = Path(os.environ.get("CPRD_GUEST_CACHE", "/var/cache/cprd-test"))
CMDLINE = "root=/dev/vda rw console=ttyS0 memmap=256M!1G panic=-1 systemd.show_status=1"
UNITS = ("cprd-e2e-pmem.service", "cprd-e2e-ticks.service", "cprd-e2e.service")
#: vm2 runs as the operator's enabled template unit (issue 13 item 5)
VM_TEMPLATE, OPERATOR_VM = "cprd-e2e-vm@.service", "cprd-e2e-vm@vm2.service"
T0 = time.monotonic()


def say(msg: str) -> None:
    print(f"[{time.monotonic() - T0:7.1f} s] {msg}", flush=True)


def sh(*argv: str | Path, capture: bool = False) -> str:
    r = subprocess.run(
        [str(a) for a in argv], check=False, text=True, stdout=subprocess.PIPE if capture else None
    )
    if r.returncode != 0:
        raise SystemExit(f"kexec-e2e: {' '.join(map(str, argv))} exited {r.returncode}")
    return r.stdout or ""


def last_line(out: str) -> Path:
    return Path(out.strip().splitlines()[-1])


def source_hash() -> str:
    """Everything that ends up in the host disk: the files build-deb.sh packs (minus tests/),
    plus tests/kexec_e2e."""
    files = (
        subprocess.run(
            ["git", "-C", str(TOP), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            check=True,
            capture_output=True,
        )
        .stdout.decode()
        .split("\0")
    )
    h = hashlib.sha256()
    for name in sorted(f for f in files if f):
        p = TOP / name
        if (name.startswith("tests/") and not name.startswith("tests/kexec_e2e/")) or (
            not p.is_file()
        ):
            continue
        h.update(name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


MODES = {"trixie": "logind", "bookworm": "guard"}


def build_image(vhost: Path, guest: Path, image: Path, deb: Path | None, dist: str) -> None:
    with tempfile.TemporaryDirectory(prefix="cprd-kexec-e2e-img.", dir="/var/tmp") as tmp:
        work = Path(tmp)
        if deb is None:
            say(f"building the .deb (packaging/build-deb.sh --dist {dist})")
            sh(TOP / "packaging" / "build-deb.sh", "--dist", dist, work / "deb")
            deb = next((work / "deb").glob("cprd_*.deb"))
        root = work / "root"
        say(f"copying the base root, installing {deb.name}")
        sh("cp", "-a", vhost / "root", root)
        shutil.copy(deb, root / "tmp" / "cprd.deb")
        mounts = []
        try:
            for m in ("proc", "sys", "dev"):
                sh("mount", "--bind", f"/{m}", root / m)
                mounts.append(root / m)
            env = ("chroot", root, "env", "DEBIAN_FRONTEND=noninteractive")
            if dist == "trixie":  # the README's way: apt pulls Debian's own dependencies
                sh(*env, "apt-get", "update", "-qq")
                sh(
                    *env,
                    "apt-get",
                    "install",
                    "-y",
                    "-qq",
                    "--no-install-recommends",
                    "/tmp/cprd.deb",
                )
                sh(*env, "apt-get", "clean")
            else:
                sh(*env, "dpkg", "-i", "/tmp/cprd.deb")
        finally:
            for m in reversed(mounts):
                subprocess.run(["umount", "-l", str(m)], check=False)
        (root / "tmp" / "cprd.deb").unlink()
        lib = root / "usr/local/lib/cprd-e2e"
        lib.mkdir(parents=True)
        for f in ("e2e_pmem.sh", "e2e_ticks.py", "e2e_scenario.py"):
            shutil.copy(HOST / f, lib / f)
        (lib / "mode").write_text(MODES[dist] + "\n")
        share = root / "usr/local/share/cprd-e2e"
        share.mkdir(parents=True)
        for f in ("vmlinuz", "initrd.img"):
            shutil.copy(guest / f, share / f)
        for u in (*UNITS, VM_TEMPLATE):
            shutil.copy(HOST / u, root / "etc/systemd/system" / u)
        shutil.copy(HOST / "cprd.yaml", root / "etc/cprd/cprd.yaml")
        (root / "var/lib/cprd-e2e").mkdir(parents=True, exist_ok=True)
        getty = root / "etc/systemd/system/serial-getty@ttyS1.service.d"
        getty.mkdir(parents=True)
        shutil.copy(HOST / "autologin.conf", getty / "autologin.conf")
        sh(
            "chroot",
            root,
            "systemctl",
            "enable",
            "cprd.service",
            "cprd-restore.service",
            "cprd-kexec-guard.service",
            "serial-getty@ttyS1.service",
            *UNITS,
            OPERATOR_VM,
        )
        # No getty on the console: its vhangup() would cut the scenario's writes to ttyS0.
        sh("chroot", root, "systemctl", "mask", "serial-getty@ttyS0.service")
        sh("chroot", root, "cprd", "--check-config")
        say("mkfs.ext4 -d (6 GiB sparse)")
        tmp_img = image.with_suffix(".tmp")
        sh("mkfs.ext4", "-q", "-F", "-L", "vhost", "-d", root, tmp_img, "6G")
        tmp_img.rename(image)


class Serial:
    """Follows serial.log; keeps (outer monotonic time, line) for every complete line."""

    def __init__(self, path: Path, echo: bool) -> None:
        self.path, self.echo = path, echo
        self.offset, self.partial = 0, b""
        self.lines: list[tuple[float, str]] = []

    def poll(self) -> list[tuple[float, str]]:
        try:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        now = time.monotonic()
        self.offset += len(data)
        parts = (self.partial + data).split(b"\n")
        self.partial = parts.pop()
        new = [(now, p.decode(errors="replace").rstrip("\r")) for p in parts]
        self.lines += new
        return new


INTERESTING = re.compile(
    r"E2E-(PHASE|VMS|CPRDCTL|KEXEC|RESTORE-UNIT|ERROR|WAIT|PMEM|SAVE-PATH|INSTALLED|UNIT)|"
    r"Linux version|"
    r"kexec_core: Starting new kernel|reboot: Power down|Kernel panic"
)


def run_host(vhost: Path, image: Path, work: Path, timeout: float, verbose: bool) -> dict[str, Any]:
    disk = work / "disk.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", image, "-F", "raw", disk)
    log = work / "serial.log"
    argv = [
        "qemu-system-x86_64",
        "-name",
        "cprd-vhost",
        "-machine",
        "q35",
        "-accel",
        "tcg",
        "-smp",
        "2",
        "-m",
        "3G",
        "-nodefaults",
        "-display",
        "none",
        "-kernel",
        str(vhost / "vmlinuz"),
        "-initrd",
        str(vhost / "initrd.img"),
        "-append",
        CMDLINE,
        "-drive",
        f"file={disk},if=virtio,format=qcow2,cache=unsafe",
        "-device",
        "virtio-rng-pci",
        "-chardev",
        f"file,id=ser0,path={log}",
        "-serial",
        "chardev:ser0",
        # ttyS1: a root shell (autologin) for a look inside while it runs
        "-chardev",
        f"socket,id=ser1,path={work}/shell.sock,server=on,wait=off",
        "-serial",
        "chardev:ser1",
        "-no-reboot",
    ]
    (work / "qemu.argv").write_text(json.dumps(argv))
    say(f"booting the virtual host (serial: {log})")
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=(work / "qemu.stderr").open("w"),
    )
    serial = Serial(log, verbose)
    result: dict[str, Any] | None = None
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            for _, line in serial.poll():
                if verbose or INTERESTING.search(line):
                    say(f"host: {line[:200]}")
                if line.startswith("E2E-RESULT "):
                    result = json.loads(line[len("E2E-RESULT ") :])
            if proc.poll() is not None:
                break
            time.sleep(0.1)
        serial.poll()
    finally:
        if proc.poll() is None:
            say(f"stopping the host QEMU (pid {proc.pid})")
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    if result is None:
        result = {
            "ok": False,
            "error": "no E2E-RESULT on the serial console "
            f"(QEMU exit {proc.returncode}, timeout {timeout:.0f} s)",
        }
    result["outer"] = outer_figures(serial.lines)
    add_breakdown(result, serial.lines)
    with (work / "serial-stamped.log").open("w") as f:  # outer clock, seconds from boot
        for t, ln in serial.lines:
            f.write(f"{t - serial.lines[0][0]:9.2f} {ln}\n")
    return result


def outer_figures(lines: list[tuple[float, str]]) -> dict[str, Any]:
    """Blackout and per-VM downtime by the outer clock: the arrival of E2E-TICK lines."""
    tick = re.compile(r"E2E-TICK (vm\d) (\d+)")
    boots = [t for t, ln in lines if kb.BOOT.match(ln)]  # not a quote of one (E2E-RESULT)
    kexec_at = next((t for t, ln in lines if "E2E-KEXEC-START" in ln), None)
    out: dict[str, Any] = {"boots": len(boots)}
    if len(boots) < 2 or kexec_at is None:
        return out
    second = boots[1]
    out["kexec_kernel_started_s"] = round(second - kexec_at, 1)
    kernel_go = next((t for t, ln in lines if "kexec_core: Starting new kernel" in ln), None)
    if kernel_go:
        out["kexec_start_to_new_kernel_s"] = round(kernel_go - kexec_at, 1)
    restored = next(
        (t for t, ln in lines if t > second and "Finished" in ln and "cprd-restore" in ln), None
    )
    if restored:
        out["new_kernel_to_restore_done_s"] = round(restored - second, 1)
    userspace = next((t for t, ln in lines if t > second and "E2E-PHASE boot2" in ln), None)
    if userspace:
        out["boot2_scenario_started_s_after_kernel"] = round(userspace - second, 1)
    per_vm: dict[str, Any] = {}
    for vm in ("vm1", "vm2"):
        ts = [
            (t, int(m.group(2))) for t, ln in lines if (m := tick.search(ln)) and m.group(1) == vm
        ]
        before = [x for x in ts if x[0] < second]
        after = [x for x in ts if x[0] > second]
        if before and after:
            per_vm[vm] = {
                "last_before": before[-1][1],
                "first_after": after[0][1],
                "downtime_s": round(after[0][0] - before[-1][0], 1),
            }
    out["vms"] = per_vm
    if len(per_vm) == 2:
        last = max(t for t, ln in lines if t < second and tick.search(ln))
        first = min(t for t, ln in lines if t > second and tick.search(ln))
        out["host_blackout_s"] = round(first - last, 1)
    return out


def add_breakdown(result: dict[str, Any], lines: list[tuple[float, str]]) -> None:
    """result["breakdown"]: the blackout phase by phase (or result["breakdown_error"])."""
    result.pop("breakdown", None)
    result.pop("breakdown_error", None)
    if "journal_raw" not in result and not result.get("ok"):
        return  # the run failed before the second boot reported: nothing to cut up
    try:
        result["breakdown"] = kb.as_json(kb.breakdown(result, lines))
    except (kb.BreakdownError, KeyError, ValueError) as err:
        result["breakdown_error"] = f"{type(err).__name__}: {err}"


def report_breakdown(result: dict[str, Any]) -> bool:
    """Print the per-phase breakdown; False when it is missing or does not add up."""
    if "breakdown_error" in result:
        print(f"PROBLEM: no per-phase breakdown: {result['breakdown_error']}")
        return False
    parts = result.get("breakdown")
    if not parts:
        return True
    ok = True
    print("\n=== the blackout, phase by phase (s; host: first VM down to last VM back) ===")
    for name, b in parts.items():
        print(f"-- {name}: {b['outer_s']:.2f} s measured outside --")
        for p in b["phases"]:
            print(f"  {p['s']:8.2f}  {p['phase']}")
        tol = kb.tolerance(b["outer_s"])
        print(
            f"  {b['sum_s']:8.2f}  sum of the phases; unaccounted {b['unaccounted_s']:+.2f} s "
            f"(tolerance {tol:.2f})"
        )
        share = b["cprd_s"] / b["outer_s"] if b["outer_s"] > 0 else 0.0
        print(f"  cprd's share: {b['cprd_s']:.2f} s ({share:.0%}); live phase {b['live_s']:.2f} s")
        if abs(b["unaccounted_s"]) > tol:
            print(f"PROBLEM: {name}: {b['unaccounted_s']:+.2f} s of the blackout unaccounted")
            ok = False
    return ok


def report(result: dict[str, Any], timings: dict[str, float]) -> bool:
    print("\n=== kexec e2e ===")
    for k, v in timings.items():
        print(f"{k:<28} {v:8.1f} s")
    outer = result.get("outer", {})
    ok = bool(result.get("ok"))
    if "error" in result:
        print(f"ERROR: {result['error']}")
    print(f"host boots seen on serial: {outer.get('boots')}")
    for k in ("kexec_start_to_new_kernel_s", "new_kernel_to_restore_done_s"):
        if k in outer:
            print(f"{k}: {outer[k]}")
    if "host_blackout_s" in outer:
        print(
            f"host blackout (outer clock, last tick before -> first after): "
            f"{outer['host_blackout_s']} s"
        )
    if "host_blackout_s" in result:
        print(f"host blackout (host clock):  {result['host_blackout_s']} s")
    for vm, v in result.get("vms", {}).items():
        o = outer.get("vms", {}).get(vm, {})
        print(
            f"{vm}: tick {v['last_tick_before']} -> {v['first_tick_after']} "
            f"({'continued' if v['continued'] else 'DID NOT CONTINUE'}), downtime "
            f"{v['downtime_s']} s host clock, {o.get('downtime_s')} s outer clock"
        )
    for path, st in result.get("state_files", {}).items():
        print(f"state file {path}: {st['size']:,} bytes ({st['allocated']:,} allocated)")
    if result.get("events_boot1") or result.get("events_boot2"):
        print(f"journal boot1: {', '.join(result.get('events_boot1', []))}")
        print(f"journal boot2: {', '.join(result.get('events_boot2', []))}")
    print(f"pmem: {result.get('pmem_mount')}")
    path = result.get("save_path")
    if path:
        print(f"saved by: {path['saved_by']} (expected {path['mode']})")
        print(f"first boot's journal, s from the save's start: {path['marks_s']}")
        for problem in path["problems"]:
            print(f"PROBLEM: {problem}")
    ok = report_breakdown(result) and ok
    print("RESULT:", "PASS" if ok else "FAIL")
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--dist",
        choices=sorted(MODES),
        default="trixie",
        help="the virtual host's release (trixie: logind path; bookworm: guard path)",
    )
    ap.add_argument("--timeout", type=float, default=5400, help="host run deadline (s)")
    ap.add_argument("--deb", type=Path, help="use this .deb instead of building one")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--rebuild", action="store_true", help="rebuild the host disk image")
    ap.add_argument("-v", "--verbose", action="store_true", help="echo the whole console")
    ap.add_argument(
        "--report",
        type=Path,
        metavar="DIR",
        help="only print the report again from a kept work directory (result.json, "
        "serial-stamped.log), with the breakdown computed anew",
    )
    args = ap.parse_args()
    if args.report is not None:
        result = json.loads((args.report / "result.json").read_text())
        with (args.report / "serial-stamped.log").open(newline="") as f:  # keep each \r
            lines = kb.load_stamped(f.read())
        result["outer"] = outer_figures(lines)
        add_breakdown(result, lines)
        return 0 if report(result, {}) else 1
    # SIGTERM/SIGHUP: unwind, so that the finally in run_host stops the host QEMU.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda n, _f: sys.exit(128 + n))
    if os.geteuid() != 0:
        raise SystemExit("kexec-e2e: must run as root")
    if shutil.which("debootstrap") is None:
        say("installing debootstrap")
        sh("apt-get", "install", "-y", "-qq", "debootstrap")
    timings: dict[str, float] = {}
    t = time.monotonic()
    guest = last_line(sh("bash", TOP / "tests/guest/build.sh", capture=True))
    say(f"virtual host: {args.dist}; the VMs must be saved by the {MODES[args.dist]} path")
    vhost = last_line(sh("bash", E2E / "build-vhost.sh", args.dist, capture=True))
    timings["guest + vhost base"] = time.monotonic() - t
    key = hashlib.sha256(f"{vhost.name} {guest.name} {source_hash()}".encode()).hexdigest()
    images = vhost / "images"
    images.mkdir(exist_ok=True)
    image = images / f"{key[:16]}.img"
    t = time.monotonic()
    if args.rebuild or not image.exists():
        for old in images.glob("*.img"):
            old.unlink()
        build_image(vhost, guest, image, args.deb, args.dist)
    else:
        say(f"host disk cached: {image}")
    timings["host disk image"] = time.monotonic() - t
    work = Path(tempfile.mkdtemp(prefix="cprd-kexec-e2e.", dir="/var/tmp"))
    t = time.monotonic()
    result = run_host(vhost, image, work, args.timeout, args.verbose)
    timings["host run (boot,kexec,boot)"] = time.monotonic() - t
    timings["total"] = time.monotonic() - T0
    (work / "result.json").write_text(json.dumps(result, indent=1))
    ok = report(result, timings)
    if ok and not args.keep:
        shutil.rmtree(work)
    else:
        print(f"work directory kept: {work}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
