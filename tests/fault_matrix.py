"""``make faults``: every journalled step x every fault, on real guests (issue 12 item 5).

Not a pytest module (pytest collects ``test_*.py`` only): run it as a script.

    python tests/fault_matrix.py [--full] [--only OP[/STEP[/FAULT]]] [--keep]

For each cell (operation x step x fault) it sets ``CPRD_FAILPOINT=<step>:<fault>:<vm>`` for
the cprd process that runs the operation, runs it, recovers the way an operator would
(SIGCONT every QEMU; a manifest in phase preparing: ``cprd resume``; a commit cut short:
run it again), then checks the invariant by acting on it: a prepared manifest is resumed
(``cprd resume``), a committed one restored (``cprd restore``), and then every VM must
run with its serial counter going on past the value it had before the operation.  The one
allowed loss is a VM whose QEMU the fault itself killed before its state was complete; cprd
must have reported it (its name and "lost"/"exited"/... in its output), and every other VM
must be intact.  On the save-what-can-be-saved path (``anyway``) a VM recorded as shut
down is cold-booted at restore: its counter restarts, and that is what was promised.

Operations (each a real ``cprd`` process, the CLI's own ``main``, or for ``anyway`` a driver
calling ``Saver.prepare(anyway=True)`` then ``Saver.commit(anyway=True)`` as the daemon's
logind path does, with VM ``disk`` named to be shut down instead of saved):

    prepare          cprd prepare                  (all or nothing)
    prepare+commit   cprd prepare --commit
    resume           cprd resume    of a prepared save (cprd prepare first, no fault)
    restore          cprd restore   of a committed manifest (cprd prepare --commit first)
    anyway           prepare(anyway) + commit(anyway), shutdown=[disk]

Steps: those the operation records in a run without a fault (a baseline run per operation,
traced at the journal's one failpoint call).  Faults: the six of :mod:`cprd.failpoint`,
plus ``check-storm``: the same operation through the real daemon on a private bus while
another client calls Check in a loop (a QMP socket serves one client at a time, so a storm
must go through the daemon); one cell per operation.

Three guests are reused across cells: ``s3`` (private RAM, ``suspend: always``, real
qemu-ga), ``disk`` (RAM in a shared file) and ``live`` (private RAM copied while it runs:
saved live, its guest rewriting 8 MiB so that QEMU never finishes the save by itself and
cprd stops it, at step ``stopping``).  A lost VM is booted again.  ``live`` adds rows of its
own: ``stopping`` (only it records that step), and ``migrating@live``, the failpoint at
``migrating`` named for ``live`` (a fault while the VM still runs) rather than for ``s3``.
A VM that cprd had not stopped yet when the failure hit (``live`` with no step past
``migrating`` recorded, or failed at ``stopping``, recorded but not taken, by a fault that
ends cprd's path there) must never have been stopped: its QEMU (the same process) logs
every runstate change (``-trace runstate_set``) and must log no ``paused`` (what cprd's
``stop`` does) during the cell; QEMU's own last pass (``finish-migrate``, when a pass found
nothing dirty) is its convergence, not a stop by cprd.  The
slice (default) runs every step once and every fault once, ``stopping`` with every fault
and ``migrating@live`` once; ``--full`` the whole matrix.  Both
print the matrix and end with ``N passed, M failed``; the exit status is non-zero on any
FAIL or if the number of cells executed differs from the number planned.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import harness
from harness import GuestSpec, GuestVM, Memory

from cprd import manifest as mf
from cprd.errors import ManifestError
from cprd.manifest import Outcome, VMRecord
from cprd.settle import alive
from cprd.steps import Step

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
FAILPOINT_FAULTS = ("raise", "cancel", "enospc", "kill-cprd", "kill-qemu", "stop-qemu")
STORM = "check-storm"
FAULTS = (*FAILPOINT_FAULTS, STORM)
OPS = ("prepare", "prepare+commit", "resume", "restore", "anyway")
SHUTDOWN_VM = "disk"  # the anyway path shuts this one down instead of saving it
LIVE_VM = "live"  # saved live: migrating while it runs, then stopping
#: Steps a live VM records without cprd ever stopping it: a failure there must leave its
#: QEMU running all along (the live save cancelled, never a ``stop``).
NEVER_STOPPED = frozenset({"planned", "migrating", "resumed"})
#: Faults that end cprd's path at the failpoint: one at ``stopping`` (recorded, not yet
#: taken) hits a live save before its ``stop`` is sent, while the migration still runs.
#: (``stop-qemu`` does not: cprd goes on and its ``stop`` waits in the frozen QEMU.)
BEFORE_STOP = frozenset({"raise", "cancel", "enospc", "kill-cprd"})
OP_TIMEOUT = 240.0
#: Steps recorded once cprd has seen the VM running again: a QEMU killed there is a crash
#: after the operation (its state file is stale by then), not something cprd can undo.
BACK = ("resumed", "restored")
LOST_WORDS = ("lost", "exited", "gone", "failed", "never saved", "missing", "incomplete")


def env_for(failpoint: str = "") -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "CPRD_FAILPOINT"}
    env["PYTHONPATH"] = str(REPO)
    env["CPRD_LOG"] = "stderr"
    if failpoint:
        env["CPRD_FAILPOINT"] = failpoint
    return env


# --- the cprd side: run as `fault_matrix.py _cprd ...` / `_anyway ...` ---------------------


def _trace(path: str) -> None:
    """Append every step the journal records (step, VM) to ``path``, before the failpoint
    fires: what the operation reached, also when the fault kills it."""
    from cprd import failpoint

    hit = failpoint.hit

    def traced(step: str, vm: str, pid: int) -> None:
        with open(path, "a") as out:
            out.write(f"{step} {vm}\n")
        hit(step, vm, pid)

    failpoint.hit = traced


def _anyway(config_path: str) -> int:
    """The kexec goes ahead whatever happens (the daemon's kexec_anyway, without D-Bus):
    put back what an earlier run left preparing, save what can be saved, commit anyway."""
    import asyncio

    from cprd import config as cfg
    from cprd import manifest as mf
    from cprd.errors import ManifestError
    from cprd.inventory import Inventory
    from cprd.manifest import Phase
    from cprd.save import Saver

    config = cfg.load(Path(config_path))

    def phase() -> Phase | None:
        try:
            return mf.read(config.manifest_path).phase
        except ManifestError:
            return None

    async def run() -> int:
        inventory = Inventory(config)
        saver = Saver(config, inventory)
        try:
            if phase() is Phase.PREPARING:
                print(json.dumps(await saver.resume()))
            if phase() in (None, Phase.RESTORED):
                await saver.prepare(anyway=True, shutdown=(SHUTDOWN_VM,))
            if phase() in (Phase.PREPARED, Phase.COMMITTED):
                manifest = await saver.commit(anyway=True)
                for rec in manifest.vms:
                    print(f"{rec.name}: {rec.step.value} {rec.reason}")
        finally:
            await inventory.close()
        return 0

    return asyncio.run(run())


def cprd_side(argv: list[str]) -> int:
    trace, mode, *rest = argv
    _trace(trace)
    if mode == "anyway":
        return _anyway(rest[0])
    from cprd import cli

    return cli.main(rest)


# --- the runner ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Cell:
    op: str
    step: str  # "*" for the storm: the whole operation
    fault: str
    vm: str = ""  # the failpoint's VM
    #: a second row of the step, for another VM than the usual one: ``step@vm`` in the key
    named: bool = False

    @property
    def row(self) -> str:
        return f"{self.step}@{self.vm}" if self.named else self.step

    @property
    def key(self) -> str:
        return f"{self.op}/{self.row}/{self.fault}"


@dataclasses.dataclass
class Result:
    cell: Cell
    verdict: str  # ok | lost | FAIL
    seconds: float
    detail: str = ""


class Run:
    """Config, guests and the cprd invocations of one matrix run."""

    def __init__(self, root: Path, log_dir: Path) -> None:
        self.root = root
        self.log_dir = log_dir
        self.config = root / "cprd.yaml"
        self.state_dir = root / "state"
        self.manifest = self.state_dir / "manifest.yaml"
        self.config.write_text(
            f"state_dir: {self.state_dir}\n"
            f"discovery: {{qmp_sockets: ['{root}/*/qmp.sock'],\n"
            f"            agent_socket: '{root}/{{name}}/qga.sock'}}\n"
            # Short timeouts: a SIGSTOPped QEMU or a silent agent costs seconds, not minutes.
            "save: {space_margin_mib: 16, timeout_s: 60, qmp_timeout_s: 3, agent_timeout_s: 10,\n"
            # live_max_s: a bound in case the live phase does not end by itself (its wave
            # goes once the first pass is written, a second or two here).
            "       quit_timeout_s: 5, suspend_timeout_s: 10, shutdown_timeout_s: 3,\n"
            "       live_max_s: 10}\n"
            "restore: {timeout_s: 60}\n"
            "vms: {s3: {suspend: always}}\n"
        )
        self.specs = {
            "s3": GuestSpec("s3"),
            "disk": GuestSpec("disk", memory=Memory.FILE),
            # Every runstate change of its QEMU in runstate.log (QEMU's log trace backend):
            # the proof that a live VM cprd had not stopped was never stopped.
            LIVE_VM: GuestSpec(
                LIVE_VM,
                dirty_mib=8,
                extra_args=["-trace", "runstate_set", "-D", str(root / LIVE_VM / "runstate.log")],
            ),
        }
        self.vms: dict[str, GuestVM] = {}
        self.out: list[str] = []  # what cprd printed during the current cell
        self.history: dict[str, set[str]] = {}  # steps recorded per VM during the cell
        #: the live VM's QEMU pid and the size of its runstate log when the operation began
        self.runstate_mark: tuple[int, int] = (0, 0)

    # guests ---------------------------------------------------------------------------

    def boot(self, name: str) -> None:
        old = self.vms.get(name)
        if old is not None:
            old.cleanup()
        vm = GuestVM(self.specs[name], self.root / name, harness.guest_image())
        readies = vm.serial_text().count(harness.READY_MARK)
        vm.launch()
        vm.wait_sockets(30)
        deadline = time.monotonic() + 120
        while vm.serial_text().count(harness.READY_MARK) <= readies:
            if vm.proc is not None and vm.proc.poll() is not None:
                raise RuntimeError(f"{name}: QEMU exited at boot: {vm.qemu_log.read_text()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name}: not ready after 120 s")
            time.sleep(0.2)
        vm.wait_tick_above(0, timeout=30)
        self.vms[name] = vm

    def follow(self, vm: GuestVM) -> None:
        """A QEMU that cprd relaunched is followed by its socket, not by our Popen."""
        if vm.proc is not None and vm.proc.poll() is not None:
            vm.proc = None

    def mark_runstates(self) -> None:
        """Remember where the live VM's runstate log is, before the operation."""
        vm = self.vms[LIVE_VM]
        self.follow(vm)
        pids = vm.running_pids()
        log = vm.dir / "runstate.log"
        size = log.stat().st_size if log.exists() else 0
        self.runstate_mark = (pids[0] if len(pids) == 1 else 0, size)
        # From now on every step a cprd process records (the recovery's too) is traced here
        # and in the operation's trace: a manifest removed by a rollback keeps no history.
        (self.log_dir / "trace.recover").unlink(missing_ok=True)

    def traced(self, name: str) -> set[str]:
        """The steps every traced cprd process recorded for VM ``name`` since the mark."""
        steps: set[str] = set()
        for path in (self.log_dir / "trace.recover", self.log_dir / "trace.cell"):
            if path.exists():
                words = path.read_text().split()
                steps |= {s for s, v in zip(words[0::2], words[1::2], strict=False) if v == name}
        return steps

    def never_stopped(self, cell: Cell, name: str) -> str:
        """A problem if the live VM ``name`` was stopped (or replaced) although the failure
        hit before cprd stopped it: cprd recorded no step that stops it, or the cell's
        fault ended cprd's path at its ``stopping`` step, before the ``stop``."""
        seen = self.history.get(name, set()) | self.traced(name)
        at_stop = (cell.vm, cell.step) == (name, Step.STOPPING.value) and cell.fault in BEFORE_STOP
        if name != LIVE_VM or not (seen <= NEVER_STOPPED or at_stop):
            return ""
        vm = self.vms[name]
        pid, offset = self.runstate_mark
        pids = vm.running_pids()
        steps = ", ".join(sorted(seen)) or "none"
        if pids != [pid]:
            return f"{name}: cprd never stopped it (steps {steps}) yet its QEMU {pid} is now {pids}"
        with open(vm.dir / "runstate.log", "rb") as log:
            log.seek(offset)
            text = log.read().decode(errors="replace")
        # cprd's `stop` makes it paused; QEMU's own last pass (a pass that found nothing
        # dirty: a vCPU starved on a loaded host) goes through finish-migrate instead, and
        # is QEMU's convergence, not a stop by cprd.
        changes = [
            line.split(" ", 1)[1] for line in text.splitlines() if line.startswith("runstate_set ")
        ]
        if any(change.endswith("(paused)") for change in changes):
            return f"{name}: cprd never stopped it (steps {steps}) yet QEMU logged {changes[:3]}"
        return ""

    def readies(self) -> dict[str, int]:
        return {n: vm.serial_text().count(harness.READY_MARK) for n, vm in self.vms.items()}

    def sigcont(self) -> None:
        for vm in self.vms.values():
            for pid in vm.running_pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)

    def healthy(self, name: str) -> bool:
        vm = self.vms[name]
        self.follow(vm)
        pids = vm.running_pids()
        if len(pids) != 1:
            return False
        try:
            return vm.runstate() == "running"
        except Exception:
            return False

    def reset(self) -> None:
        """Between cells: no manifest, no state file, every VM running (booted if not)."""
        self.sigcont()
        self.manifest.unlink(missing_ok=True)
        if self.state_dir.is_dir():
            for f in self.state_dir.glob("*.state"):
                f.unlink()
        for name in self.specs:
            if name not in self.vms or not self.healthy(name):
                self.boot(name)

    # cprd -------------------------------------------------------------------------------

    def cprd(self, *args: str, failpoint: str = "", trace: Path | None = None) -> int:
        """One cprd process (the CLI's main, or the anyway driver); its output is kept."""
        trace = trace or self.log_dir / "trace.recover"
        self.note_history()
        mode = "anyway" if args[:1] == ("anyway",) else "cli"
        rest = [str(self.config)] if mode == "anyway" else ["--config", str(self.config), *args]
        argv = [PY, __file__, "_cprd", str(trace), mode, *rest]
        try:
            proc = subprocess.run(
                argv,
                env=env_for(failpoint),
                capture_output=True,
                text=True,
                timeout=OP_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired as err:
            self.out.append(f"$ cprd {' '.join(args)}: TIMEOUT after {OP_TIMEOUT:g}s: {err}")
            return -1
        self.out.append(
            f"$ {'CPRD_FAILPOINT=' + failpoint + ' ' if failpoint else ''}cprd {' '.join(args)}"
            f" -> {proc.returncode}\n{proc.stdout}{_tail(proc.stderr, 25)}"
        )
        return proc.returncode

    def phase(self) -> str | None:
        try:
            return mf.read(self.manifest).phase.value
        except ManifestError as err:
            if os.path.lexists(self.manifest):
                return f"unreadable: {err}"
            return None

    def records(self) -> dict[str, VMRecord]:
        try:
            return {r.name: r for r in mf.read(self.manifest).vms}
        except ManifestError:
            return {}

    def manifest_text(self) -> str:
        try:
            return self.manifest.read_text()
        except OSError:
            return "(no manifest)"

    def op(self, op: str, failpoint: str, trace: Path) -> int:
        if op == "prepare":
            return self.cprd("prepare", failpoint=failpoint, trace=trace)
        if op == "prepare+commit":
            return self.cprd("prepare", "--commit", failpoint=failpoint, trace=trace)
        if op == "resume":
            return self.cprd("resume", failpoint=failpoint, trace=trace)
        if op == "restore":
            return self.cprd("restore", failpoint=failpoint, trace=trace)
        return self.cprd("anyway", failpoint=failpoint, trace=trace)

    def setup(self, op: str) -> str:
        """What must exist before the operation; "" when it does."""
        if op == "resume":
            rc = self.cprd("prepare")
        elif op == "restore":
            rc = self.cprd("prepare", "--commit")
            for vm in self.vms.values():
                with contextlib.suppress(Exception):
                    vm.wait_exit(30)
                self.follow(vm)
        else:
            return ""
        return "" if rc == 0 else f"setup for {op} failed ({rc})"

    def recover(self, op: str, killed: bool) -> None:
        """What an operator does next, until no operation is left half-done."""
        for _ in range(4):
            self.sigcont()
            phase = self.phase()
            if phase is None or phase == "restored":
                return
            if phase == "preparing":
                self.cprd("resume")
            elif phase == "prepared":
                if killed and op == "anyway":
                    self.cprd("anyway")
                elif killed and op == "prepare+commit":
                    self.cprd("commit")
                else:
                    self.cprd("resume")  # acting on it: resume brings every VM back
                killed = False
            elif phase == "committed":
                if self.commit_unfinished():
                    # The commit was cut short on this boot: run it again.
                    self.cprd("anyway" if op == "anyway" else "commit")
                    if self.commit_unfinished():
                        self.cprd("resume")
                        continue
                for vm in self.vms.values():
                    self.follow(vm)
                self.cprd("restore")  # acting on it: the "reboot" is over
                if self.phase() == "committed":
                    self.cprd("restore")  # a second run retries what failed
                    return
            else:
                return

    def commit_unfinished(self) -> bool:
        for rec in self.records().values():
            if rec.step.value not in ("committed", "shut-down", "restored") and alive(rec.pid):
                return True
        return False

    # checking -------------------------------------------------------------------------

    def verdict(
        self, cell: Cell, before: dict[str, int], readies: dict[str, int]
    ) -> tuple[str, str]:
        """(ok | lost | FAIL, why) from what the VMs do now."""
        problems: list[str] = []
        lost: list[str] = []
        self.note_history()
        history = self.history
        for name, vm in self.vms.items():
            self.follow(vm)
            pids = vm.running_pids()
            if not pids:
                said = [
                    line
                    for text in self.out
                    for line in text.splitlines()
                    if name in line and any(w in line.lower() for w in LOST_WORDS)
                ]
                if cell.fault == "kill-qemu" and cell.vm == name and said:
                    lost.append(name)
                    continue
                if cell.fault == "kill-qemu" and cell.vm == name and cell.step in BACK:
                    lost.append(name)  # a crash after the operation had it running again
                    continue
                problems.append(
                    f"{name}: no QEMU runs it"
                    + ("" if said else " and cprd did not say it was lost")
                )
                continue
            if len(pids) > 1:
                problems.append(f"{name}: {len(pids)} QEMUs run it: {pids}")
                continue
            try:
                state = vm.runstate()
            except Exception as err:
                problems.append(f"{name}: its QEMU does not answer: {err}")
                continue
            if state != "running":
                problems.append(f"{name}: runstate {state}")
                continue
            shut = bool({"shut-down", "shutting-down", "booting"} & history.get(name, set()))
            try:
                now = vm.last_tick() or 0
                if shut:
                    # Recorded as shut down (the anyway path): cold-booted at restore, or
                    # still running if the shutdown was undone; either way it goes on.
                    _wait(
                        functools.partial(_moved_on, vm, readies[name], max(now, before[name])), 120
                    )
                    if vm.serial_text().count(harness.READY_MARK) > readies[name]:
                        _wait_cold_boot(vm, readies[name])
                else:
                    vm.wait_tick_above(max(now, before[name]), timeout=20)
                    if vm.serial_text().count(harness.READY_MARK) > readies[name]:
                        problems.append(f"{name}: booted afresh (its memory is lost)")
                    if cell.fault != STORM and (problem := self.never_stopped(cell, name)):
                        problems.append(problem)
            except TimeoutError as err:
                problems.append(f"{name}: runs but its counter does not go on: {err}")
        phase = self.phase()
        pending = {n for n, r in self.records().items() if r.outcome is not Outcome.RESTORED}
        # A committed manifest keeps a lost VM as failed to restore: that is its report.
        if phase not in (None, "restored") and not (phase == "committed" and pending <= set(lost)):
            problems.append(f"manifest left in phase {phase}")
        if problems:
            return "FAIL", "; ".join(problems)
        if lost:
            when = (
                "after cprd had it running again" if cell.step in BACK else "reported lost by cprd"
            )
            return "lost", f"{', '.join(lost)} killed by the fault, {when}"
        return "ok", ""

    def note_history(self) -> None:
        """Remember every step recorded so far (a resume removes the manifest)."""
        for name, rec in self.records().items():
            seen = self.history.setdefault(name, set())
            seen |= {step for step, _ in rec.history} | {rec.step.value}

    # one cell ---------------------------------------------------------------------------

    def cell(self, cell: Cell) -> Result:
        start = time.monotonic()
        self.out = []
        self.history = {}
        try:
            self.reset()
        except Exception as err:
            return Result(cell, "FAIL", time.monotonic() - start, f"cannot set up guests: {err}")
        problem = self.setup(cell.op)
        if problem:
            return self._result(cell, "FAIL", start, problem)
        before = {n: vm.last_tick() or 0 for n, vm in self.vms.items()}
        readies = self.readies()
        self.mark_runstates()
        trace = self.log_dir / "trace.cell"
        trace.unlink(missing_ok=True)
        storm = ""
        if cell.fault == STORM:
            rc, storm = self.storm(cell.op)
        else:
            rc = self.op(cell.op, f"{cell.step}:{cell.fault}:{cell.vm}", trace)
        reached = trace.read_text().split() if trace.exists() else []
        if cell.fault != STORM and (cell.step, cell.vm) not in zip(
            reached[0::2], reached[1::2], strict=False
        ):
            self.recover(cell.op, killed=False)
            return self._result(cell, "FAIL", start, f"the step was never reached: {reached}")
        self.out.append(f"(manifest after the operation)\n{self.manifest_text()}")
        self.recover(cell.op, killed=rc == -signal.SIGKILL)
        verdict, why = self.verdict(cell, before, readies)
        if storm:
            verdict, why = "FAIL", "; ".join(filter(None, (storm, why)))
        return self._result(cell, verdict, start, why)

    def _result(self, cell: Cell, verdict: str, start: float, why: str) -> Result:
        log = self.log_dir / f"{cell.key.replace('/', '_')}.log"
        log.write_text(
            f"{cell} -> {verdict}: {why}\n\n" + "\n".join(self.out) + "\n" + self.manifest_text()
        )
        return Result(cell, verdict, time.monotonic() - start, why)

    # the check storm --------------------------------------------------------------------

    def storm(self, op: str) -> tuple[int, str]:
        """The operation through the real daemon while another client calls Check in a
        loop.  Returns (the operation's exit status, a problem or "")."""
        import fixtures_bus

        fixtures_bus.ensure_test_accounts()
        with fixtures_bus.run_dbus_daemon() as bus:
            log = self.log_dir / "daemon.log"
            with open(log, "ab") as out:
                daemon = subprocess.Popen(
                    [PY, "-m", "cprd", "--config", str(self.config), "--bus", bus.address],
                    stdout=out,
                    stderr=out,
                    env=env_for(),
                )
            try:
                return self._storm(op, bus.address, daemon, log)
            finally:
                if daemon.poll() is None:
                    daemon.send_signal(signal.SIGTERM)
                try:
                    daemon.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    daemon.kill()
                    daemon.wait()

    def _ctl(self, bus: str, *args: str, timeout: float = OP_TIMEOUT) -> int:
        proc = subprocess.run(
            [PY, "-m", "cprd.ctl", "--bus", bus, *args],
            env=env_for(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if args[0] != "check":
            self.out.append(f"$ cprdctl {' '.join(args)} -> {proc.returncode}\n{proc.stdout}")
            self.out.append(_tail(proc.stderr, 10))
        return proc.returncode

    def _storm(
        self, op: str, bus: str, daemon: subprocess.Popen[bytes], log: Path
    ) -> tuple[int, str]:
        deadline = time.monotonic() + 60
        while self._ctl(bus, "status", "--json", timeout=30) != 0:
            if daemon.poll() is not None or time.monotonic() > deadline:
                return -1, f"the daemon did not come up: {_tail(log.read_text(), 10)}"
            time.sleep(0.3)
        stop = threading.Event()
        answers: list[str] = []  # "ok", or the D-Bus error of each Check
        check = [
            "busctl", f"--address={bus}", "--timeout=60", "call",
            "org.cprd.Cprd1", "/org/cprd/Cprd1", "org.cprd.Cprd1.Manager", "Check",
        ]  # fmt: skip

        def storm() -> None:
            # busctl, not cprdctl: a Python start-up per call would make a thin storm.
            while not stop.is_set():
                got = subprocess.run(check, capture_output=True, text=True, check=False)
                answers.append("ok" if got.returncode == 0 else got.stderr.strip()[:120])

        threads = [threading.Thread(target=storm, name=f"check-storm-{n}") for n in range(2)]
        for thread in threads:
            thread.start()
        mark = len(self.out)
        try:
            if op == "prepare":
                rc = self._ctl(bus, "prepare-kexec")
            elif op == "prepare+commit":
                rc = self._ctl(bus, "prepare-kexec") or self._ctl(bus, "commit")
            elif op == "resume":
                rc = self._ctl(bus, "resume")
            elif op == "restore":
                rc = self._ctl(bus, "restore")
            else:
                call = [
                    "busctl", f"--address={bus}", "--timeout=200", "call",
                    "org.cprd.Cprd1", "/org/cprd/Cprd1", "org.cprd.Cprd1.Manager",
                    "PrepareKexec", "a{sv}", "2", "best_effort", "b", "true",
                    "shutdown", "as", "1", SHUTDOWN_VM,
                ]  # fmt: skip
                proc = subprocess.run(
                    call,
                    capture_output=True,
                    text=True,
                    timeout=OP_TIMEOUT,
                    check=False,
                )
                self.out.append(f"$ busctl PrepareKexec best_effort -> {proc.returncode}")
                self.out.append(proc.stdout + proc.stderr)
                rc = proc.returncode
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=90)
        said = " | ".join(x.strip().replace("\n", " ") for x in self.out[mark:] if x.strip())
        kinds = sorted(set(answers))
        self.out.append(f"check storm: {len(answers)} Check calls, answers {kinds}")
        if daemon.poll() is not None:
            return rc, f"the daemon died during the storm: {_tail(log.read_text(), 10)}"
        if self._ctl(bus, "status", "--json", timeout=30) != 0:
            return rc, "the daemon does not answer after the storm"
        if answers.count("ok") < 5 or any(a != "ok" for a in answers):
            return rc, f"Check storm: {len(answers)} calls, answers {kinds}"
        if rc != 0:
            # Another client's Check must not make the operation itself fail.
            return rc, f"the operation failed ({rc}) during the storm: {said[-300:]}"
        return rc, ""


def _wait(predicate: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout:g}s")
        time.sleep(0.2)


def _moved_on(vm: GuestVM, readies: int, tick: int) -> bool:
    """A new boot started, or the same one counted past ``tick``."""
    return vm.serial_text().count(harness.READY_MARK) > readies or (vm.last_tick() or 0) > tick


def _wait_cold_boot(vm: GuestVM, readies: int) -> None:
    """A new boot (one more ready mark than ``readies``) whose counter goes on."""
    _wait(lambda: vm.serial_text().count(harness.READY_MARK) > readies, 120)
    first = _boot_tick(vm)
    _wait(lambda: _boot_tick(vm) > first, 30)


def _boot_tick(vm: GuestVM) -> int:
    """The last tick of the current boot (0 if it has printed none yet)."""
    text = vm.serial_text()
    last = harness._TICK_RE.findall(text[text.rindex(harness.READY_MARK) :])
    return int(last[-1]) if last else 0


def _tail(text: str, lines: int) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


# --- planning -----------------------------------------------------------------------------


def baseline(run: Run) -> dict[str, list[tuple[str, str]]]:
    """Each operation once without a fault: the (step, VM) pairs its journal records."""
    out: dict[str, list[tuple[str, str]]] = {}
    for op in OPS:
        run.out = []
        run.history = {}
        run.reset()
        if problem := run.setup(op):
            raise SystemExit(f"baseline {op}: {problem}\n" + "\n".join(run.out))
        before = {n: vm.last_tick() or 0 for n, vm in run.vms.items()}
        readies = run.readies()
        run.mark_runstates()
        trace = run.log_dir / "trace.cell"
        trace.unlink(missing_ok=True)
        rc = run.op(op, "", trace)
        run.recover(op, killed=False)
        verdict, why = run.verdict(Cell(op, "-", "none"), before, readies)
        if rc != 0 or verdict != "ok":
            raise SystemExit(f"baseline {op}: exit {rc}, {verdict} {why}\n" + "\n".join(run.out))
        words = trace.read_text().split()
        pairs = list(dict.fromkeys(zip(words[0::2], words[1::2], strict=True)))
        if op in ("prepare", "prepare+commit", "anyway") and ("saved", "s3") not in pairs:
            # Under load s3's agent may miss the preflight: then nothing of it is traced.
            raise SystemExit(f"baseline {op}: s3 was not saved: {pairs}\n" + "\n".join(run.out))
        if op in ("prepare", "prepare+commit", "anyway") and ("stopping", LIVE_VM) not in pairs:
            # Its guest keeps dirtying memory: QEMU cannot finish the live save by itself.
            raise SystemExit(f"baseline {op}: {LIVE_VM} was not saved live: {pairs}")
        out[op] = pairs
        print(f"baseline {op}: {' '.join(f'{s}({v})' for s, v in pairs)}", flush=True)
    return out


def rows_of(steps: dict[str, list[tuple[str, str]]]) -> list[tuple[str, str, str, bool]]:
    """(op, step, the VM the failpoint names, named), in the order of :class:`Step` (not
    of a run, so that the slice is the same every time); the VM is ``s3`` when it records
    the step (it is suspended first: more to undo), else ``disk``, else ``live``.  A
    second row ``migrating@live`` (named) fails the live VM while it still runs."""
    order = [s.value for s in Step]
    rows = []
    for op in OPS:
        vms: dict[str, set[str]] = {}
        for step, vm in steps[op]:
            vms.setdefault(step, set()).add(vm)
        for step in sorted(vms, key=order.index):
            first = "s3" if "s3" in vms[step] else min(vms[step])
            rows.append((op, step, first, False))
            if step == Step.MIGRATING.value and first != LIVE_VM and LIVE_VM in vms[step]:
                rows.append((op, step, LIVE_VM, True))
    return rows


def plan(steps: dict[str, list[tuple[str, str]]], full: bool) -> list[Cell]:
    rows = rows_of(steps)
    if full:
        cells = [Cell(op, s, f, vm, named) for op, s, vm, named in rows for f in FAILPOINT_FAULTS]
        return cells + [Cell(op, "*", STORM) for op in OPS]
    # The slice: every row label once (the first operation that records it), every
    # operation at least once, every fault once.
    chosen: list[tuple[str, str, str, bool]] = []
    covered: set[tuple[str, bool]] = set()
    for row in rows:
        if (row[1], row[3]) not in covered:
            chosen.append(row)
            covered.add((row[1], row[3]))
    for op in OPS:
        if not any(r[0] == op for r in chosen):
            chosen.append(next(r for r in rows if r[0] == op))
    while len(chosen) < len(FAILPOINT_FAULTS):
        chosen.append(rows[len(chosen) % len(rows)])
    cells = [
        Cell(op, step, FAILPOINT_FAULTS[i % len(FAILPOINT_FAULTS)], vm, named)
        for i, (op, step, vm, named) in enumerate(chosen)
    ]
    # The end of a live phase with every fault (issue 12's promise for live saves): the
    # faults the slice has not given it yet, spread over the operations that record it.
    stopping = [r for r in rows if r[1] == Step.STOPPING.value]
    done = {c.fault for c in cells if c.step == Step.STOPPING.value}
    missing = [f for f in FAILPOINT_FAULTS if f not in done]
    for i, fault in enumerate(missing):
        op, step, vm, named = stopping[(i + 1) % len(stopping)]
        cells.append(Cell(op, step, fault, vm, named))
    return [*cells, Cell("prepare+commit", "*", STORM)]


def matrix(
    results: list[Result], cells: list[Cell], steps: dict[str, list[tuple[str, str]]]
) -> str:
    got = {r.cell.key: r.verdict for r in results}
    rows = [(op, f"{step}@{vm}" if named else step) for op, step, vm, named in rows_of(steps)] + [
        (op, "*") for op in OPS
    ]
    width = max(len(f"{op}/{step}") for op, step in rows) + 2
    head = "".ljust(width) + "".join(f.ljust(11) for f in FAULTS)
    lines = [head, "-" * len(head)]
    planned = {c.key for c in cells}
    for op, step in rows:
        marks = []
        for f in FAULTS:
            key = f"{op}/{step}/{f}"
            if (step == "*") != (f == STORM):
                marks.append("")
            elif key in got:
                marks.append(got[key])
            else:
                marks.append("." if key not in planned else "not run")
        if any(m for m in marks):
            lines.append(f"{op}/{step}".ljust(width) + "".join(m.ljust(11) for m in marks))
    return "\n".join(lines)


@contextlib.contextmanager
def workspace(keep: bool, log_dir: Path) -> Iterator[tuple[Path, Path]]:
    root = Path(tempfile.mkdtemp(prefix="cprdf-", dir="/tmp"))  # short: socket paths
    shutil.rmtree(log_dir, ignore_errors=True)
    log_dir.mkdir(parents=True)
    try:
        yield root, log_dir
    finally:
        if keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str]) -> int:
    if argv[:1] == ["_cprd"]:
        return cprd_side(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--full", action="store_true", help="the whole matrix (default: the slice)")
    p.add_argument("--only", action="append", default=[], help="OP[/STEP[/FAULT]] prefix")
    p.add_argument("--keep", action="store_true", help="keep the VM directory")
    p.add_argument(
        "--log-dir", type=Path, default=REPO / "build" / "faults", help="one log per cell"
    )
    args = p.parse_args(argv)
    started = time.monotonic()
    with workspace(args.keep, args.log_dir) as (root, log_dir):
        run = Run(root, log_dir)
        try:
            steps = baseline(run)
            cells = plan(steps, args.full)
            if args.only:
                cells = [c for c in cells if any(c.key.startswith(o) for o in args.only)]
            print(
                f"{'full matrix' if args.full else 'slice'}: {len(cells)} cells planned "
                f"(logs in {log_dir})",
                flush=True,
            )
            results: list[Result] = []
            for n, cell in enumerate(cells, 1):
                res = run.cell(cell)
                results.append(res)
                print(
                    f"[{n}/{len(cells)}] {cell.key}{'(' + cell.vm + ')' if cell.vm else ''}: "
                    f"{res.verdict} ({res.seconds:.1f}s){' ' + res.detail if res.detail else ''}",
                    flush=True,
                )
        finally:
            for vm in run.vms.values():
                vm.cleanup()
    failed = [r for r in results if r.verdict == "FAIL"]
    print()
    print(matrix(results, cells, steps))
    print()
    print("ok: every VM running on (or shut down and cold-booted on the anyway path), or saved")
    print("and then brought back; lost: the VM whose QEMU the fault killed before its state was")
    print("complete (reported lost by cprd) or after cprd had it running again; every other VM")
    print("intact")
    print(
        f"{len(results)} cells executed of {len(cells)} planned in "
        f"{time.monotonic() - started:.0f}s "
        f"({sum(r.verdict == 'lost' for r in results)} lost-by-fault)"
    )
    for r in failed:
        print(f"FAIL {r.cell.key}: {r.detail} (log: {log_dir / r.cell.key.replace('/', '_')}.log)")
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed or len(results) != len(cells) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
