"""Benchmark: cprd's save and restore on real TCG guests, reported as ratios.

Everything is measured in one run, against references taken on the same disk in the same
run (this machine is shared and noisy, so only ratios carry over):

1. Copied RAM: a 2 GiB guest with 1.5 GiB of random data in a tmpfs, saved by cprd three
   times ("live" or "saving" to "saved", fsync included: the guest is saved live), each
   followed by `dd oflag=direct` of as many bytes to the same directory. After the first
   save the guest is resumed and saved over QMP with QEMU's defaults as CPR.rst uses them
   (mode cpr-reboot only: 128 MiB/s max-bandwidth, no mapped-ram), then with cprd's
   settings but no direct-io. The other two saves are committed and restored by cprd from
   a cold page cache ("launching" to "restored"), each vs a cold `dd iflag=direct` read of
   the same state file. Repeated
   figures are compared best against best (interference on a shared machine only adds).
   Before the first save state_dir's bandwidth is measured as `cprdctl check --measure`
   does, and `cprdctl check`'s prediction (stopped time, restore time) is printed beside
   what was measured. The stopped time runs from QEMU's STOP event (its own timestamp) to
   the end of Saver.prepare (state file and manifest fsynced).
1b. The peer, when libvirt is installed: the same guest (kernel, RAM, fill) run by a
   private libvirtd (scripts/bench_libvirt.py), saved with `virsh save --image-format
   sparse --bypass-cache --parallel-channels 4` (+ sync) and restored from a cold cache
   with `virsh restore --bypass-cache --parallel-channels 4`; ratios to cprd's best.
2. RAM in place: a 512 MiB guest on memory-backend-file,share=on on disk. Blackout (from
   QEMU's STOP event to the state and the manifest fsynced at the end of Saver.prepare)
   vs QEMU's own migration time (query-migrate total-time): the difference is cprd's
   overhead.
3. Parallel: the whole Saver.prepare for 1, 2, 4 and 8 small guests (128 MiB, no fill),
   as a ratio to one guest.
5. Live vs stop-first: a 1 GiB guest holding 512 MiB that keeps rewriting 64 MiB, saved
   stop-first (cpr-reboot) and live (normal mode) alternately, three times each: the time
   it is stopped, from its STOP event to its state and the manifest fsynced.

Prints a table, then as its last line one JSON object with every figure.
Run as root (drop_caches, QEMU): `make bench` or `.venv/bin/python scripts/bench.py`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import logging
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_libvirt
from harness import QEMU, GuestSpec, GuestVM, Memory, guest_image, start_guests
from qemu.qmp import EventListener, QMPClient

from cprd import config, log
from cprd import predict as pr
from cprd.config import Config
from cprd.inventory import Inventory
from cprd.manifest import Manifest, Outcome
from cprd.plan import MigrationSettings
from cprd.restore import Restorer
from cprd.save import Saver
from cprd.transfer import Upgrader

# Case 1: the guest fills its tmpfs from /dev/urandom at boot, about 65 MiB/s under TCG on
# this 2-core machine: 1536 MiB take about 25 s, so the full size fits the time budget.
BIG_MEM_MIB = 2048
BIG_FILL_MIB = 1536
#: Round 1 is resumed (then the QEMU-driven saves); the others are committed and restored.
COPIED_ROUNDS = 3
INPLACE_MEM_MIB = 512
INPLACE_REPS = 5
PARALLEL_COUNTS = (1, 2, 4, 8)
PARALLEL_MEM_MIB = 128
UPGRADE_MEM_MIB = 512
PARALLEL_REPS = 3
QMP_TIMEOUT = 30.0
NO_DISK_FS = frozenset({"tmpfs", "ramfs", "devtmpfs"})

T0 = time.monotonic()


def say(text: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s] {text}", flush=True)


class Clock:
    """First timestamp of each (VM, phase) from cprd's progress callbacks."""

    def __init__(self) -> None:
        self.t: dict[tuple[str, str], float] = {}

    def __call__(self, name: str, phase: str, done: int, total: int) -> None:
        self.t.setdefault((name, phase), time.monotonic())

    def span(self, name: str, start: str, end: str) -> float:
        return self.t[(name, end)] - self.t[(name, start)]

    def save_span(self, name: str) -> float:
        """The whole save: from "live" (a live save begins while the VM runs) or
        "saving" (stopped) to "saved"."""
        begun = min(self.t[(name, p)] for p in ("live", "saving") if (name, p) in self.t)
        return self.t[(name, "saved")] - begun


# --- the machine ------------------------------------------------------------------------


def mount_of(path: Path) -> tuple[str, str, str]:
    """(source, fstype, mount point) of the filesystem holding path."""
    out = subprocess.run(
        ["findmnt", "-n", "-o", "SOURCE,FSTYPE,TARGET", "-T", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return out[0], out[1], out[2]


def bench_base() -> Path:
    """/var/tmp, else /tmp: whichever is on a real disk (never tmpfs)."""
    for base in (Path("/var/tmp"), Path("/tmp")):
        if base.is_dir() and mount_of(base)[1] not in NO_DISK_FS:
            return base
    raise SystemExit("bench: neither /var/tmp nor /tmp is on a disk filesystem")


def machine_info(base: Path) -> dict[str, Any]:
    meminfo = Path("/proc/meminfo").read_text()
    mem_kib = next(int(line.split()[1]) for line in meminfo.splitlines() if "MemTotal" in line)
    qemu = subprocess.run([QEMU, "--version"], capture_output=True, text=True, check=True)
    source, fstype, target = mount_of(base)
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "mem_total_gib": round(mem_kib / 2**20, 1),
        "kernel": platform.release(),
        "qemu": qemu.stdout.splitlines()[0].removeprefix("QEMU emulator version "),
        "disk": {"dir": str(base), "source": source, "fstype": fstype, "mount": target},
    }


# --- disk references --------------------------------------------------------------------


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def timed_dd(*args: str) -> float:
    start = time.monotonic()
    subprocess.run(["dd", *args], capture_output=True, check=True)
    return time.monotonic() - start


def allocated(path: Path) -> int:
    """Bytes on disk (a mapped-ram state file is sparse: zero pages are holes)."""
    return os.stat(path).st_blocks * 512


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


async def appears(path: Path) -> float | None:
    """When path becomes a socket (polled every 5 ms); None if it already was one."""
    if path.exists():
        return None
    while True:
        if path.is_socket():
            return time.monotonic()
        await asyncio.sleep(0.005)


def mib_s(nbytes: float, seconds: float) -> float:
    return nbytes / 2**20 / seconds


# --- QMP of our own (the VM's test-qmp socket; cprd keeps qmp.sock) ------------------------


class QMP:
    """A short QMP session; every call with a timeout (qemu.qmp has none)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.client = QMPClient("bench")

    async def __aenter__(self) -> QMP:
        await asyncio.wait_for(self.client.connect(str(self.path)), QMP_TIMEOUT)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.disconnect()

    async def __call__(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        return await asyncio.wait_for(self.client.execute(cmd, args), QMP_TIMEOUT)


async def qmp_once(path: Path, cmd: str, args: dict[str, Any] | None = None) -> Any:
    async with QMP(path) as qmp:
        return await qmp(cmd, args)


async def wait_running(path: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while (status := (await qmp_once(path, "query-status"))["status"]) != "running":
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path}: runstate {status!r}, not running")
        await asyncio.sleep(0.1)


PARAMS = ("max-bandwidth", "multifd-channels", "direct-io")
CAPS = ("mapped-ram", "multifd", "x-ignore-shared")


async def migration_defaults(path: Path) -> tuple[dict[str, Any], dict[str, bool]]:
    """The settings cprd changes, as a fresh QEMU has them (before any cprd save)."""
    async with QMP(path) as qmp:
        params = await qmp("query-migrate-parameters")
        caps = await qmp("query-migrate-capabilities")
    return (
        {k: params[k] for k in PARAMS if k in params},
        {c["capability"]: c["state"] for c in caps if c["capability"] in CAPS},
    )


async def save_over_qmp(
    path: Path, state: Path, params: dict[str, Any], caps: dict[str, bool]
) -> dict[str, Any]:
    """A cpr-reboot save with these settings, driven here; timed incl. fsync, then cont."""
    async with QMP(path) as qmp:
        await qmp(
            "migrate-set-capabilities",
            {"capabilities": [{"capability": k, "state": v} for k, v in caps.items()]},
        )
        await qmp("migrate-set-parameters", {**params, "mode": "cpr-reboot"})
        used = await qmp("query-migrate-parameters")
        start = time.monotonic()
        await qmp("migrate", {"uri": f"file:{state}"})
        while True:
            info = await qmp("query-migrate")
            if info.get("status") == "completed":
                break
            if info.get("status") in ("failed", "cancelled"):
                raise RuntimeError(f"save {info.get('status')}: {info.get('error-desc')}")
            await asyncio.sleep(0.05)
        fsync_path(state)
        fsync_path(state.parent)
        seconds = time.monotonic() - start
        await qmp("cont")
    return {
        "seconds": seconds,
        "qemu_total_ms": info.get("total-time"),
        "max_bandwidth": used.get("max-bandwidth"),
        "bytes": state.stat().st_size,
    }


# --- cprd -----------------------------------------------------------------------------


def make_config(root: Path, tag: str, vms: list[GuestVM], **restore: Any) -> Config:
    """A cprd config for exactly these VMs, with a state_dir of its own."""
    sockets = ", ".join(f"'{vm.qmp_path}'" for vm in vms)
    path = root / f"cprd-{tag}.yaml"
    text = f"state_dir: {root}/state-{tag}\ndiscovery:\n  qmp_sockets: [{sockets}]\n"
    if restore:
        text += "restore: " + json.dumps(restore) + "\n"
    path.write_text(text)
    return config.load(path)


async def timed_prepare(cfg: Config, inventory: Inventory) -> tuple[Manifest, Clock, float, float]:
    """Saver.prepare; returns (manifest, clock, seconds of the whole prepare, end time)."""
    clock = Clock()
    start = time.monotonic()
    manifest = await Saver(cfg, inventory, clock).prepare()
    end = time.monotonic()
    return manifest, clock, end - start, end


class StopWatch:
    """QEMU's STOP event on the VM's test-qmp socket (its own timestamp, wall clock), so a
    stopped time runs from the VM's last instruction, not from cprd's progress callback.
    Holds that socket while open: close it before another QMP call on it."""

    def __init__(self, path: Path) -> None:
        self.qmp = QMP(path)
        self.listener = EventListener(("STOP",))

    async def __aenter__(self) -> StopWatch:
        await self.qmp.__aenter__()
        self.qmp.client.register_listener(self.listener)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.qmp.client.remove_listener(self.listener)
        await self.qmp.__aexit__()

    async def stopped_at(self) -> float:
        """Wall-clock time of the first STOP event since the watch began."""
        event = await asyncio.wait_for(self.listener.get(), QMP_TIMEOUT)
        ts: Any = event["timestamp"]
        return float(ts["seconds"]) + float(ts["microseconds"]) / 1e6


async def watched_prepare(
    cfg: Config, inventory: Inventory, vm: GuestVM
) -> tuple[Manifest, Clock, float, float]:
    """timed_prepare, plus the stopped time: from QEMU's STOP event to the end of
    Saver.prepare (state file and manifest fsynced), both on the wall clock."""
    async with StopWatch(vm.test_qmp_path) as watch:
        manifest, clock, prepare_s, _ = await timed_prepare(cfg, inventory)
        done = time.time()
        stopped = done - await watch.stopped_at()
    return manifest, clock, prepare_s, stopped


async def predicted(cfg: Config, inventory: Inventory, bw: pr.Bandwidth) -> dict[str, Any]:
    """What `cprdctl check` predicts for the (one) VM of cfg, from bandwidth bw."""
    plans, _ = await Saver(cfg, inventory).plan()
    (_, plan), *_ = plans
    mode = pr.save_mode(in_place=plan.in_place, live=plan.live)
    p = pr.predict(plan.bytes_to_write, mode, bw)
    return {"mode": mode.value, "bytes": p.bytes_to_write, "stopped_s": p.stopped_s,
            "restore_s": p.restore_s}  # fmt: skip


# --- the cases --------------------------------------------------------------------------


def dd_write(state_dir: Path, nbytes: int) -> tuple[float, float]:
    """dd as many MiB as nbytes into state_dir, O_DIRECT, fsync; (seconds, MiB/s)."""
    count = math.ceil(nbytes / 2**20)
    target = state_dir / "dd-write.bin"
    try:
        seconds = timed_dd(
            "if=/dev/zero", f"of={target}", "bs=1M", f"count={count}", "oflag=direct", "conv=fsync"
        )
    finally:
        target.unlink(missing_ok=True)
    return seconds, mib_s(count * 2**20, seconds)


async def restore_cold(cfg: Config, vm: GuestVM) -> dict[str, Any]:
    """Drop caches, cprd restore, check the counter; then a cold dd read of the state."""
    vm.released()
    before = vm.last_tick() or 0
    drop_caches()
    clock = Clock()
    socket_up = asyncio.create_task(appears(vm.test_qmp_path))
    try:
        restored = await Restorer(cfg, progress=clock).run()
    finally:
        socket_up.cancel()
    up = None if not socket_up.done() or socket_up.cancelled() else socket_up.result()
    rec = restored.vms[0]
    if rec.outcome is not Outcome.RESTORED:
        raise RuntimeError(f"restore failed: {rec.reason}")
    launched, back = clock.t[("big", "launching")], clock.t[("big", "restored")]
    state = Path(rec.state_file)
    vm.wait_tick_above(before, timeout=30)
    drop_caches()
    read_s = timed_dd(f"if={state}", "of=/dev/null", "bs=1M", "iflag=direct")
    # QEMU's incoming file migration blocks its main loop until loaded, so cprd's
    # "loading" phase says little; the QMP socket appearing marks QEMU up instead.
    return {
        "seconds": back - launched,
        "mib_s": mib_s(allocated(state), back - launched),
        "qemu_up_s": None if up is None else up - launched,
        "after_up_s": None if up is None else back - up,
        "counter_before": before,
        "counter_continued": min(t for t in vm.ticks() if t > before) == before + 1,
        "dd_read_s": read_s,
        "dd_read_mib_s": mib_s(state.stat().st_size, read_s),
    }


async def case_copied(root: Path, image: tuple[Path, Path], vms: list[GuestVM]) -> dict[str, Any]:
    """Three cprd saves, each followed by a dd write: the first is resumed and the
    QEMU-driven saves follow it; the other two are committed and restored cold."""
    say(f"case 1: booting a {BIG_MEM_MIB} MiB guest that fills {BIG_FILL_MIB} MiB of tmpfs")
    spec = GuestSpec("big", mem_mib=BIG_MEM_MIB, fill_mib=BIG_FILL_MIB)
    vms += start_guests([spec], root, image, 600)
    vm = vms[-1]
    r: dict[str, Any] = {"mem_mib": BIG_MEM_MIB, "fill_mib": BIG_FILL_MIB}
    r["boot_and_fill_s"] = vm.ready_seconds
    say(f"  ready after {vm.ready_seconds:.1f} s (boot + fill)")
    params, caps = await migration_defaults(vm.test_qmp_path)
    cfg = make_config(root, "copied", [vm], keep_state_files=True)
    state_dir = cfg.state_dir
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    bw = pr.measure(state_dir)
    r["bandwidth"] = bw.to_dict()
    say(
        f"  state_dir measured (cprdctl check --measure): write {bw.write_bps / 2**20:.0f}, "
        f"read {bw.read_bps / 2**20:.0f} MiB/s"
    )
    saves: list[dict[str, Any]] = []
    restores: list[dict[str, Any]] = []
    for n in range(1, COPIED_ROUNDS + 1):
        inventory = Inventory(cfg)
        try:
            if n == 1:
                r["predicted"] = await predicted(cfg, inventory, bw)
            say(f"  round {n}: cprd save (mapped-ram + multifd + direct-io, unlimited)")
            manifest, clock, _, stopped = await watched_prepare(cfg, inventory, vm)
            rec = manifest.vms[0]
            state = Path(rec.state_file)
            info = await qmp_once(vm.test_qmp_path, "query-migrate")
            s: dict[str, Any] = {
                "seconds": clock.save_span("big"),
                "stopped_s": stopped,
                "qemu_total_ms": info.get("total-time"),
                "allocated_bytes": allocated(state),
                "apparent_bytes": rec.state_size,
            }
            s["mib_s"] = mib_s(s["allocated_bytes"], s["seconds"])
            s["dd_write_s"], s["dd_write_mib_s"] = dd_write(state.parent, s["allocated_bytes"])
            saves.append(s)
            r["settings"] = rec.settings.to_dict()
            say(
                f"    {s['allocated_bytes'] / 2**20:.0f} MiB on disk in {s['seconds']:.2f} s"
                f" ({s['mib_s']:.0f} MiB/s); dd oflag=direct {s['dd_write_mib_s']:.0f} MiB/s"
            )
            if n == 1:
                await Saver(cfg, inventory).resume()
                await wait_running(vm.test_qmp_path)
            else:
                await Saver(cfg, inventory).commit()
        finally:
            await inventory.close()
        if n == 1:
            await qemu_driven_saves(r, vm, state.parent, rec.settings, params, caps)
            continue
        say("    committed; drop caches; cprd restore; drop caches; dd iflag=direct read")
        restores.append(await restore_cold(cfg, vm))
        state.unlink(missing_ok=True)
        x = restores[-1]
        say(
            f"    restored in {x['seconds']:.2f} s, counter went on from "
            f"{x['counter_before']}; dd read {x['dd_read_s']:.2f} s"
        )
    vm.cleanup()
    save_s = min(s["seconds"] for s in saves)
    r["saves"] = saves
    r["restores"] = restores
    r["state_allocated_bytes"] = saves[0]["allocated_bytes"]
    r["state_apparent_bytes"] = saves[0]["apparent_bytes"]
    r["cprd_save_s"] = save_s
    r["cprd_stopped_s"] = min(s["stopped_s"] for s in saves)
    r["cprd_save_mib_s"] = max(s["mib_s"] for s in saves)
    r["dd_write_mib_s"] = max(s["dd_write_mib_s"] for s in saves)
    r["save_vs_dd"] = r["cprd_save_mib_s"] / r["dd_write_mib_s"]
    r["cprd_faster_than_defaults"] = r["defaults_save_s"] / save_s
    r["direct_io_speedup"] = r["no_direct_io_save_s"] / save_s
    r["cprd_restore_s"] = min(x["seconds"] for x in restores)
    r["cprd_restore_mib_s"] = max(x["mib_s"] for x in restores)
    r["dd_read_s"] = min(x["dd_read_s"] for x in restores)
    r["dd_read_mib_s"] = max(x["dd_read_mib_s"] for x in restores)
    r["restore_vs_dd_read"] = r["dd_read_s"] / r["cprd_restore_s"]
    # Throughput over the bytes each actually reads (a sparse state file has holes).
    r["restore_vs_cold_read_throughput"] = r["cprd_restore_mib_s"] / r["dd_read_mib_s"]
    r["counter_continued"] = all(x["counter_continued"] for x in restores)
    return r


async def qemu_driven_saves(
    r: dict[str, Any],
    vm: GuestVM,
    state_dir: Path,
    settings: MigrationSettings,
    params: dict[str, Any],
    caps: dict[str, bool],
) -> None:
    """The resumed guest saved over QMP: QEMU's defaults, then cprd's without direct-io."""
    variants = {
        "defaults": (params, caps),
        "no_direct_io": (
            {**settings.parameters, "direct-io": False},
            dict(settings.capabilities),
        ),
    }
    for key, (p, c) in variants.items():
        what = "QEMU's defaults (mode cpr-reboot only)" if key == "defaults" else "no direct-io"
        say(f"    resumed; {what}, saved over QMP")
        target = state_dir / f"{key}.state"
        try:
            d = await save_over_qmp(vm.test_qmp_path, target, p, c)
            d["allocated_bytes"] = allocated(target)
        finally:
            target.unlink(missing_ok=True)
        await wait_running(vm.test_qmp_path)
        d["params"], d["caps"] = p, c
        r[key] = d
        r[f"{key}_save_s"] = d["seconds"]
        r[f"{key}_mib_s"] = mib_s(d["allocated_bytes"], d["seconds"])
        say(f"    {d['allocated_bytes'] / 2**20:.0f} MiB in {d['seconds']:.2f} s")


async def case_libvirt(root: Path, image: tuple[Path, Path]) -> dict[str, Any]:
    why = bench_libvirt.available()
    if why is not None:
        say(f"case 1b: libvirt skipped: {why}")
        return {"skipped": why}
    say(f"case 1b: the same {BIG_MEM_MIB} MiB guest ({BIG_FILL_MIB} MiB filled) under libvirt")
    return await bench_libvirt.run(root, image, BIG_MEM_MIB, BIG_FILL_MIB, say)


async def case_in_place(root: Path, image: tuple[Path, Path], vms: list[GuestVM]) -> dict[str, Any]:
    say(f"case 2: booting a {INPLACE_MEM_MIB} MiB guest on memory-backend-file,share=on")
    spec = GuestSpec("inplace", memory=Memory.FILE, mem_mib=INPLACE_MEM_MIB)
    vms += start_guests([spec], root, image, 120)
    vm = vms[-1]
    cfg = make_config(root, "inplace", [vm])
    inventory = Inventory(cfg)
    reps: list[dict[str, Any]] = []
    try:
        for n in range(INPLACE_REPS):
            manifest, _, prepare_s, blackout = await watched_prepare(cfg, inventory, vm)
            info = await qmp_once(vm.test_qmp_path, "query-migrate")
            qemu_s = info["total-time"] / 1000
            reps.append(
                {
                    "prepare_s": prepare_s,
                    "blackout_s": blackout,
                    "qemu_total_ms": info["total-time"],
                    "qemu_downtime_ms": info.get("downtime"),
                    "overhead_s": blackout - qemu_s,
                    "state_bytes": manifest.vms[0].state_size,
                    "in_place": bool(manifest.vms[0].in_place),
                }
            )
            say(
                f"  rep {n + 1}: blackout {blackout * 1000:.0f} ms, QEMU total-time "
                f"{info['total-time']} ms, state {manifest.vms[0].state_size:,} bytes"
            )
            await Saver(cfg, inventory).resume()
            await wait_running(vm.test_qmp_path)
    finally:
        await inventory.close()
    vm.cleanup()

    def med(key: str) -> float:
        return statistics.median(float(x[key]) for x in reps)

    return {
        "mem_mib": INPLACE_MEM_MIB,
        "reps": reps,
        "blackout_s": med("blackout_s"),
        "qemu_total_s": med("qemu_total_ms") / 1000,
        "qemu_downtime_s": med("qemu_downtime_ms") / 1000,
        "overhead_s": med("overhead_s"),
        "prepare_s": med("prepare_s"),
        "state_bytes": reps[-1]["state_bytes"],
        "in_place": all(x["in_place"] for x in reps),
    }


async def case_parallel(root: Path, image: tuple[Path, Path], vms: list[GuestVM]) -> dict[str, Any]:
    top = max(PARALLEL_COUNTS)
    say(f"case 3: booting {top} guests of {PARALLEL_MEM_MIB} MiB in parallel")
    start = time.monotonic()
    specs = [GuestSpec(f"p{i}", mem_mib=PARALLEL_MEM_MIB) for i in range(top)]
    guests = start_guests(specs, root, image, 180)
    vms += guests
    boot_s = time.monotonic() - start
    say(f"  all {top} ready after {boot_s:.1f} s")
    runs: dict[int, list[float]] = {}
    saves: dict[int, list[float]] = {}
    written: dict[int, int] = {}
    for count in PARALLEL_COUNTS:
        chosen = guests[:count]
        cfg = make_config(root, f"par{count}", chosen)
        inventory = Inventory(cfg)
        try:
            for _ in range(PARALLEL_REPS):
                manifest, clock, prepare_s, _ = await timed_prepare(cfg, inventory)
                runs.setdefault(count, []).append(prepare_s)
                saves.setdefault(count, []).append(max(clock.save_span(vm.name) for vm in chosen))
                written[count] = sum(allocated(Path(r.state_file)) for r in manifest.vms)
                await Saver(cfg, inventory).resume()
                for vm in chosen:
                    await wait_running(vm.test_qmp_path)
        finally:
            await inventory.close()
        say(
            f"  {count} guests: prepare "
            + ", ".join(f"{s:.2f}" for s in runs[count])
            + f" s ({written[count] / 2**20:.0f} MiB written)"
        )
    for vm in guests:
        vm.cleanup()
    prepare = {n: statistics.median(v) for n, v in runs.items()}
    return {
        "mem_mib": PARALLEL_MEM_MIB,
        "reps": PARALLEL_REPS,
        "save_concurrency": config.Config().save.concurrency,
        "boot_s": boot_s,
        "prepare_s": {str(n): prepare[n] for n in prepare},
        "prepare_runs_s": {str(n): v for n, v in runs.items()},
        "slowest_save_s": {str(n): statistics.median(v) for n, v in saves.items()},
        "written_bytes": {str(n): b for n, b in written.items()},
        "ratio_to_1": {str(n): prepare[n] / prepare[1] for n in prepare},
    }


async def case_upgrade(root: Path, image: tuple[Path, Path], vms: list[GuestVM]) -> dict[str, Any]:
    """QEMU-only upgrade, no reboot: per-VM blackout of cpr-transfer and of the file path."""
    say(f"case 4: QEMU-only upgrade of two {UPGRADE_MEM_MIB} MiB guests (memfd / private RAM)")
    guests = start_guests(
        [
            GuestSpec(
                "xfer",
                memory=Memory.MEMFD,
                mem_mib=UPGRADE_MEM_MIB,
                extra_args=["-machine", "aux-ram-share=on"],
            ),
            GuestSpec("file", mem_mib=UPGRADE_MEM_MIB),
        ],
        root,
        image,
        120,
    )
    vms += guests
    cfg = make_config(root, "upgrade", guests)
    inventory = Inventory(cfg)
    clock = Clock()
    try:
        upgrader = Upgrader(cfg, inventory, progress=clock)
        results = await upgrader.upgrade()
    finally:
        await inventory.close()
    for vm in guests:
        vm.released()
        last = vm.last_tick() or 0
        vm.wait_tick_above(last, timeout=30)
    out = {
        "mem_mib": UPGRADE_MEM_MIB,
        "results": results,
        "cpr_transfer_blackout_s": upgrader.blackout["xfer"],
        "file_blackout_s": clock.span("file", "saving", "restored"),
    }
    out["ratio_file_to_transfer"] = out["file_blackout_s"] / out["cpr_transfer_blackout_s"]
    for vm in guests:
        vm.cleanup()
    return out


# --- output -----------------------------------------------------------------------------


# --- live vs stop-first (issue 15 item 1) -----------------------------------------------

LIVE_MEM_MIB = 1024
LIVE_FILL_MIB = 512
LIVE_DIRTY_MIB = 64
LIVE_ROUNDS = 3


def _note_saved(into: dict[str, float], name: str, phase: str, _d: int, _t: int) -> None:
    if phase == "saved":
        into[name] = time.time()


async def _stops(client: QMPClient, into: list[float]) -> None:
    """Append the wall-clock stamp of every STOP event the client receives."""
    with client.listener("STOP") as listener:
        async for event in listener:
            stamp = event["timestamp"]
            into.append(stamp["seconds"] + stamp["microseconds"] / 1e6)


async def case_live(root: Path, image: tuple[Path, Path], vms: list[GuestVM]) -> dict[str, Any]:
    """A copied VM whose guest keeps rewriting memory, saved stop-first (save.live: never,
    cpr-reboot) and live (normal mode), alternately: per save, the time it is stopped,
    from its STOP event (QEMU's stamp) to its state file and the manifest fsynced (cprd's
    progress callback "saved", called right after the step saved is written)."""
    say(
        f"case live: booting a {LIVE_MEM_MIB} MiB guest holding {LIVE_FILL_MIB} MiB, "
        f"rewriting {LIVE_DIRTY_MIB} MiB in a loop"
    )
    spec = GuestSpec("live", mem_mib=LIVE_MEM_MIB, fill_mib=LIVE_FILL_MIB, dirty_mib=LIVE_DIRTY_MIB)
    vms += start_guests([spec], root, image, 600)
    vm = vms[-1]
    r: dict[str, Any] = {"mem_mib": LIVE_MEM_MIB, "fill_mib": LIVE_FILL_MIB}
    r["dirty_mib"] = LIVE_DIRTY_MIB
    runs: dict[str, list[dict[str, Any]]] = {"stop-first": [], "live": []}
    for n in range(LIVE_ROUNDS):
        for mode, live in (("stop-first", "never"), ("live", "auto")):
            path = root / f"cprd-live-{mode}.yaml"
            path.write_text(
                f"state_dir: {root}/state-live\n"
                f"discovery: {{qmp_sockets: ['{vm.qmp_path}']}}\n"
                f"save: {{live: {live}}}\n"
            )
            cfg = config.load(path)
            saved: dict[str, float] = {}
            progress = functools.partial(_note_saved, saved)
            stops: list[float] = []
            # The test monitor serves one client: the one that hears STOP asks too.
            client = QMPClient("bench-live")
            await asyncio.wait_for(client.connect(str(vm.test_qmp_path)), QMP_TIMEOUT)
            watch = asyncio.create_task(_stops(client, stops))
            inventory = Inventory(cfg)
            try:
                start = time.time()
                manifest = await Saver(cfg, inventory, progress).prepare()
                await asyncio.sleep(0.1)
                info = await asyncio.wait_for(client.execute("query-migrate"), QMP_TIMEOUT)
                rec = manifest.vms[0]
                x = {
                    "stopped_s": saved["live"] - stops[0],
                    "save_s": saved["live"] - start,
                    "stops": len(stops),
                    "qemu_downtime_ms": info.get("downtime"),
                    "mode": rec.settings.parameters["mode"],
                    "bytes": rec.state_size,
                }
                runs[mode].append(x)
                say(
                    f"  round {n + 1} {mode} ({x['mode']}): stopped "
                    f"{x['stopped_s'] * 1000:.0f} ms of a {x['save_s']:.2f} s prepare "
                    f"(QEMU downtime {x['qemu_downtime_ms']} ms)"
                )
                await Saver(cfg, inventory).resume()
            finally:
                watch.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watch
                await client.disconnect()
                await inventory.close()
            await wait_running(vm.test_qmp_path)
    vm.cleanup()
    r["runs"] = runs
    r["stop_first_stopped_s"] = min(x["stopped_s"] for x in runs["stop-first"])
    r["live_stopped_s"] = min(x["stopped_s"] for x in runs["live"])
    r["ratio_live_to_stop_first"] = r["live_stopped_s"] / r["stop_first_stopped_s"]
    return r


def live_rows(c: dict[str, Any]) -> list[tuple[str, str, str]]:
    ms = ", ".join
    runs = c["runs"]
    ratio = c["ratio_live_to_stop_first"]
    return [
        (
            "5 live",
            "guest RAM / data / rewritten in a loop",
            f"{c['mem_mib']} / {c['fill_mib']} / {c['dirty_mib']} MiB",
        ),
        (
            "",
            f"stopped, stop-first (cpr-reboot) x{len(runs['stop-first'])}",
            ms(f"{x['stopped_s'] * 1000:.0f}" for x in runs["stop-first"]) + " ms",
        ),
        (
            "",
            f"stopped, live (normal) x{len(runs['live'])}",
            ms(f"{x['stopped_s'] * 1000:.0f}" for x in runs["live"])
            + " ms (QEMU downtime "
            + ms(str(x["qemu_downtime_ms"]) for x in runs["live"])
            + " ms)",
        ),
        (
            "",
            "RATIO live / stop-first stopped time",
            f"{ratio:.2f}  (best vs best; STOP event to state + manifest fsynced; "
            f"target <= 0.2: {mark(ratio <= 0.2)})",
        ),
    ]


def mark(ok: bool) -> str:
    return "met" if ok else "MISSED"


def secs(values: list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values) + " s"


def case1_rows(c: dict[str, Any]) -> list[tuple[str, str, str]]:
    saves, restores = c["saves"], c["restores"]
    ups = [x["qemu_up_s"] for x in restores if x["qemu_up_s"] is not None]
    up = f"; QEMU up after {secs(ups)}" if ups else ""
    d, b = c["defaults"], c["no_direct_io"]
    rows = [
        ("1 copied", "guest RAM / random fill", f"{c['mem_mib']} / {c['fill_mib']} MiB"),
        ("", "boot + fill (TCG)", f"{c['boot_and_fill_s']:.1f} s"),
        (
            "",
            "state file, on disk / apparent",
            f"{c['state_allocated_bytes'] / 2**20:.0f} / "
            f"{c['state_apparent_bytes'] / 2**20:.0f} MiB",
        ),
        (
            "",
            f"cprd save x{len(saves)} (saving->saved, fsync)",
            f"{secs([s['seconds'] for s in saves])}; best {c['cprd_save_mib_s']:.0f} MiB/s",
        ),
        (
            "",
            f"dd oflag=direct conv=fsync x{len(saves)}",
            f"{secs([s['dd_write_s'] for s in saves])}; best {c['dd_write_mib_s']:.0f} MiB/s",
        ),
        (
            "",
            "RATIO cprd / dd write throughput",
            f"{c['save_vs_dd']:.2f}  (best vs best; target >= 0.8: {mark(c['save_vs_dd'] >= 0.8)})",
        ),
        (
            "",
            "QEMU defaults save (CPR.rst), fsync",
            f"{d['seconds']:.2f} s  {c['defaults_mib_s']:.0f} MiB/s  "
            f"(max-bandwidth {d['max_bandwidth'] / 2**20:.0f} MiB/s, no mapped-ram)",
        ),
        (
            "",
            "RATIO defaults / cprd save time",
            f"{c['cprd_faster_than_defaults']:.1f}x  "
            f"(target >= 5x: {mark(c['cprd_faster_than_defaults'] >= 5)})",
        ),
        (
            "",
            "cprd settings without direct-io",
            f"{b['seconds']:.2f} s  {c['no_direct_io_mib_s']:.0f} MiB/s",
        ),
        ("", "RATIO no direct-io / cprd save time", f"{c['direct_io_speedup']:.2f}x"),
        (
            "",
            f"cprd restore x{len(restores)}, cold cache",
            f"{secs([x['seconds'] for x in restores])}; best {c['cprd_restore_mib_s']:.0f} "
            f"MiB/s{up}",
        ),
        (
            "",
            f"dd iflag=direct read x{len(restores)}, cold",
            f"{secs([x['dd_read_s'] for x in restores])}; best "
            f"{c['dd_read_mib_s']:.0f} MiB/s (apparent size)",
        ),
        ("", "RATIO dd read / cprd restore time", f"{c['restore_vs_dd_read']:.2f}  (best vs best)"),
        (
            "",
            "RATIO restore / cold read throughput",
            f"{c['restore_vs_cold_read_throughput']:.2f}  (bytes each reads; best vs best)",
        ),
        ("", "guest counter went on after restores", str(c["counter_continued"])),
    ]
    p, bw = c.get("predicted"), c.get("bandwidth")
    if p and bw:
        rows += [
            (
                "",
                "state_dir measured (check --measure)",
                f"write {bw['write_bps'] / 2**20:.0f} MiB/s, read {bw['read_bps'] / 2**20:.0f} "
                "MiB/s",
            ),
            (
                "",
                f"stopped, predicted/measured ({p['mode']})",
                f"{p['stopped_s']:.2f} s / {c['cprd_stopped_s']:.2f} s  (STOP event to state + "
                f"manifest fsynced; predicted for {p['bytes'] / 2**20:.0f} MiB planned)",
            ),
            (
                "",
                "restore: predicted / measured",
                f"{p['restore_s']:.2f} s / {c['cprd_restore_s']:.2f} s",
            ),
        ]
    return rows


def libvirt_rows(c: dict[str, Any], lv: dict[str, Any]) -> list[tuple[str, str, str]]:
    if "skipped" in lv:
        return [("1b libvirt", "skipped", lv["skipped"])]
    rows = [
        (
            "1b libvirt",
            f"libvirt {lv['version']}, same guest",
            f"boot + fill {lv['boot_and_fill_s']:.1f} s; state "
            f"{lv['allocated_bytes'] / 2**20:.0f} MiB on disk",
        ),
        (
            "",
            f"virsh save sparse/bypass-cache/{lv['channels']}ch",
            f"{lv['save_s']:.2f} s (VM stopped throughout)",
        ),
        ("", "virsh restore, cold cache", f"{lv['restore_s']:.2f} s"),
        ("", "guest counter went on", str(lv["counter_continued"])),
    ]
    if c:
        rows += [
            (
                "",
                "RATIO libvirt / cprd save time",
                f"{lv['save_s'] / c['cprd_save_s']:.2f}x  (cprd best "
                f"{c['cprd_save_s']:.2f} s; stopped {c['cprd_stopped_s']:.2f} s)",
            ),
            (
                "",
                "RATIO libvirt / cprd restore time",
                f"{lv['restore_s'] / c['cprd_restore_s']:.2f}x  (cprd best "
                f"{c['cprd_restore_s']:.2f} s)",
            ),
        ]
    return rows


def table(results: dict[str, Any]) -> list[str]:
    rows: list[tuple[str, str, str]] = []
    c = results.get("copied")
    if c:
        rows += case1_rows(c)
    lv = results.get("libvirt")
    if lv:
        rows += libvirt_rows(c or {}, lv)
    p = results.get("in_place")
    if p:
        rows += [
            (
                "2 in place",
                "guest RAM (file, share=on, disk)",
                f"{p['mem_mib']} MiB, state {p['state_bytes']:,} bytes, in place {p['in_place']}",
            ),
            (
                "",
                f"blackout (STOP to fsynced), median of {len(p['reps'])}",
                f"{p['blackout_s'] * 1000:.0f} ms  (all: "
                + ", ".join(f"{x['blackout_s'] * 1000:.0f}" for x in p["reps"])
                + f" ms; whole prepare {p['prepare_s'] * 1000:.0f} ms)",
            ),
            (
                "",
                "QEMU total-time / downtime",
                f"{p['qemu_total_s'] * 1000:.0f} ms / {p['qemu_downtime_s'] * 1000:.0f} ms",
            ),
            ("", "cprd overhead = blackout - QEMU", f"{p['overhead_s'] * 1000:.0f} ms"),
        ]
    q = results.get("parallel")
    if q:
        rows.append(
            (
                "3 parallel",
                f"{q['mem_mib']} MiB guests, concurrency",
                f"{q['save_concurrency']}, boot of 8: {q['boot_s']:.1f} s, median of {q['reps']}",
            )
        )
        for n, s in q["prepare_s"].items():
            rows.append(
                (
                    "",
                    f"{n} guest{'s' if n != '1' else ''}: prepare",
                    f"{s:.2f} s  ratio to 1: {q['ratio_to_1'][n]:.2f}  "
                    f"({q['written_bytes'][n] / 2**20:.0f} MiB written)",
                )
            )
    u = results.get("upgrade")
    if u:
        rows += [
            (
                "4 upgrade",
                f"QEMU-only, {u['mem_mib']} MiB guests",
                ", ".join(f"{k}: {v}" for k, v in sorted(u["results"].items())),
            ),
            ("", "blackout, cpr-transfer (memfd)", f"{u['cpr_transfer_blackout_s'] * 1000:.0f} ms"),
            ("", "blackout, file path (private RAM)", f"{u['file_blackout_s'] * 1000:.0f} ms"),
            ("", "RATIO file / cpr-transfer", f"{u['ratio_file_to_transfer']:.1f}x"),
        ]
    lv = results.get("live")
    if lv:
        rows += live_rows(lv)
    w = (12, 38)
    lines = [f"{'case':<{w[0]}} {'figure':<{w[1]}} value", "-" * 100]
    lines += [f"{a:<{w[0]}} {b:<{w[1]}} {v}" for a, b, v in rows]
    return lines


def rounded(obj: Any) -> Any:
    if isinstance(obj, float):
        return round(obj, 4)
    if isinstance(obj, dict):
        return {k: rounded(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [rounded(v) for v in obj]
    return obj


CASES = ("copied", "libvirt", "in_place", "parallel", "upgrade", "live")


async def run_all(
    root: Path, image: tuple[Path, Path], results: dict[str, Any], only: set[str]
) -> None:
    vms: list[GuestVM] = []
    try:
        if "copied" in only:
            results["copied"] = await case_copied(root, image, vms)
        if "libvirt" in only:
            results["libvirt"] = await case_libvirt(root, image)
        if "in_place" in only:
            results["in_place"] = await case_in_place(root, image, vms)
        if "parallel" in only:
            results["parallel"] = await case_parallel(root, image, vms)
        if "upgrade" in only:
            results["upgrade"] = await case_upgrade(root, image, vms)
        if "live" in only:
            results["live"] = await case_live(root, image, vms)
    finally:
        for vm in vms:
            with contextlib.suppress(Exception):
                vm.cleanup()


def main() -> int:
    parser = argparse.ArgumentParser(description="cprd's benchmark (see the module docstring)")
    parser.add_argument(
        "--only",
        default=",".join(CASES),
        help=f"comma-separated cases to run (default: all of {','.join(CASES)})",
    )
    only = set(parser.parse_args().only.split(","))
    if not only <= set(CASES):
        parser.error(f"unknown case(s): {', '.join(sorted(only - set(CASES)))}")
    if os.geteuid() != 0:
        print("bench: run as root (QEMU, drop_caches)", file=sys.stderr)
        return 2
    log.setup()
    logging.getLogger().setLevel(logging.WARNING)
    base = bench_base()
    machine = machine_info(base)
    d = machine["disk"]
    print("cprd benchmark")
    print(
        f"machine: {machine['nproc']} CPUs, {machine['mem_total_gib']} GiB, kernel "
        f"{machine['kernel']}, QEMU {machine['qemu']} (TCG)"
    )
    print(f"disk:    {d['dir']} on {d['source']} ({d['fstype']}, mounted at {d['mount']})")
    say("building (or reusing) the test guest")
    image = guest_image()
    root = Path(tempfile.mkdtemp(prefix="cprd-bench-", dir=base))
    results: dict[str, Any] = {"machine": machine}
    error = None
    try:
        asyncio.run(run_all(root, image, results, only))
    except Exception as err:
        traceback.print_exc()
        error = f"{type(err).__name__}: {err}"
    finally:
        shutil.rmtree(root, ignore_errors=True)
    results["total_s"] = time.monotonic() - T0
    print()
    print("\n".join(table(results)))
    print(f"total run time {results['total_s']:.0f} s")
    if error:
        results["error"] = error
    print(json.dumps(rounded(results), sort_keys=True))
    return 1 if error else 0


if __name__ == "__main__":
    sys.exit(main())
