"""The step journal's vocabulary, and what to do next for a VM: one pure function.

Before cprd takes a step that changes a VM it records the step in the manifest (atomically,
fsynced).  Whatever happens next (an error, a crash, a reboot, a QEMU that dies), what to
do for that VM is :func:`decide` of three facts:

- the last recorded :class:`Step` (and the record: how it ran before, whether cprd
  suspended it, whether its state file is complete);
- what QEMU reports now (:class:`Seen`): gone, hung, or its runstate and migration status;
- the :class:`Intent` of the operation: put it back (rollback, resume, crash recovery),
  commit (quit the saved QEMUs), commit while the kexec goes ahead anyway, or restore.

Rollback, resume, commit, restart recovery and restore all call :func:`decide` in a loop
(observe, decide, record, act) until it says the VM is settled (:attr:`Decision.final`).
No I/O here: the tests walk every combination.

The promise it keeps: every VM ends running, or saved with a complete state file and a
manifest entry that brings it back, or (on the paths where the kexec goes ahead anyway)
shut down cleanly and recorded for a cold boot.  A state file is deleted only when its VM
is confirmed running without it (:attr:`Decision.drop_state`).
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass


class Step(enum.Enum):
    """The last step cprd recorded for one VM (written before the step is taken)."""

    PLANNED = "planned"  # in the manifest; nothing done to the VM yet
    SUSPENDING = "suspending"  # guest-suspend-ram is being sent
    MIGRATING = "migrating"  # migrate is being sent: the VM may be stopped, the file partial
    #: a live save (normal mode) ends its live phase: cprd stops the VM for the last pass
    #: (it may be paused or postmigrate, the file still partial)
    STOPPING = "stopping"
    SAVED = "saved"  # the migration completed and the state file is fsynced
    RESUMING = "resuming"  # cont / system_wakeup of a saved VM: its state file goes stale
    RELOADING = "reloading"  # its QEMU quits so that a new one loads the complete state
    QUITTING = "quitting"  # quit is being sent at commit
    COMMITTED = "committed"  # its QEMU is gone; the state file is the VM
    SHUTTING_DOWN = "shutting-down"  # system_powerdown: it could not be saved, the kexec goes on
    SHUT_DOWN = "shut-down"  # its QEMU is gone after a clean shutdown: cold boot at restore
    RESTORING = "restoring"  # a new QEMU is being started from the state file
    BOOTING = "booting"  # a new QEMU is being started from its argv alone (it was shut down)
    RESUMED = "resumed"  # running again in its QEMU (put back)
    RESTORED = "restored"  # running in a new QEMU loaded from its state (or cold-booted)


#: Steps after which the state file holds the whole VM.
COMPLETE = frozenset({Step.SAVED, Step.QUITTING, Step.COMMITTED, Step.RELOADING})
#: Steps of a save under way: the state file is partial until the migration completes.
SAVING = frozenset({Step.MIGRATING, Step.STOPPING})
#: Steps after which the VM runs without its state file.
RUNNING = frozenset({Step.RESUMED, Step.RESTORED})


class Intent(enum.Enum):
    PUT_BACK = "put-back"  # rollback, resume, recovery of an interrupted save
    COMMIT = "commit"  # quit the saved QEMUs; the kexec can still be stopped
    COMMIT_ANYWAY = "commit-anyway"  # the kexec goes ahead whatever happens
    RESTORE = "restore"  # after the reboot: every VM from its state file


class Qemu(enum.Enum):
    """What is behind the VM's QMP socket now."""

    GONE = "gone"  # the recorded QEMU exited and nothing serves the socket
    HUNG = "hung"  # the recorded QEMU lives but its monitor does not answer
    UP = "up"  # the recorded QEMU answers: runstate and migration are known
    OTHER = "other"  # another QEMU (not the recorded one) answers on the socket


@dataclass(frozen=True)
class Seen:
    qemu: Qemu
    runstate: str = ""
    migration: str = ""  # query-migrate's status ("" when not asked)
    #: the state file exists with the size recorded when the save completed
    state_complete: bool = False


@dataclass(frozen=True)
class Facts:
    """What the record says about the VM, beyond its step."""

    step: Step
    runstate_before: str  # running, paused or suspended
    cprd_suspended: bool  # cprd suspended it through its agent before saving
    on_kexec_failure: str = "shutdown"  # shutdown | leave
    #: named by the caller to be shut down at commit instead of saved (cprdctl kexec
    #: --shutdown VM, PrepareKexec {"shutdown": [...]})
    shutdown_asked: bool = False

    @property
    def saved_suspended(self) -> bool:
        """Saved while in S3: QEMU 10.0 aborts on ``cont`` from postmigrate for such a
        guest, so it can only come back by loading its state into a new QEMU."""
        return self.cprd_suspended or self.runstate_before == "suspended"


class Action(enum.Enum):
    DONE = "done"  # settled: nothing more to do toward the intent
    WAIT = "wait"  # a transition is under way: look again shortly
    CANCEL = "cancel"  # migrate_cancel
    FINISH_SAVE = "finish-save"  # the migration completed: fsync, record the size, step saved
    CONT = "cont"  # resume the stopped VM
    WAKE = "wake"  # system_wakeup
    RELOAD = "reload"  # quit this QEMU, then load the complete state into a new one
    LAUNCH = "launch"  # start a new QEMU from the complete state file
    COLD_BOOT = "cold-boot"  # start a new QEMU from its argv, without state
    QUIT = "quit"  # quit (commit)
    KILL = "kill"  # SIGKILL: the kexec goes ahead and the state is complete
    SHUTDOWN = "shutdown"  # system_powerdown, then quit after save.shutdown_timeout_s
    MARK = "mark"  # record ``to`` (bookkeeping: what QEMU reports already happened)
    KEEP = "keep"  # cannot act now (hung, refused): kept in the manifest, retry later
    LOST = "lost"  # neither a QEMU nor a complete state: nothing can bring it back


@dataclass(frozen=True)
class Decision:
    action: Action
    why: str
    #: the step recorded before the action is taken (for MARK: the whole action)
    to: Step | None = None

    @property
    def final(self) -> bool:
        return self.action in (Action.DONE, Action.KEEP, Action.LOST)


#: Migration statuses under which the VM may still be stopped by the migration.
MIGRATING = frozenset(
    {"setup", "active", "device", "pre-switchover", "wait-unplug", "postcopy-active"}
)
#: Runstates of a VM that runs (or sleeps in S3, or was paused by its operator).
LIVE = frozenset({"running", "suspended", "paused"})
#: Runstates in which a VM is stopped by a save.
STOPPED = frozenset({"postmigrate", "finish-migrate", "paused"})


def _d(action: Action, why: str, to: Step | None = None) -> Decision:
    return Decision(action, why, to)


def _back(f: Facts, seen: Seen) -> Decision:
    """A VM whose QEMU answers and whose state need not be used: back to how it ran."""
    state = seen.runstate
    if state == "running":
        return _d(Action.DONE, "running", Step.RESUMED)
    if state == "suspended":
        if f.cprd_suspended:
            return _d(Action.WAKE, "suspended by cprd: waking it", Step.RESUMING)
        return _d(Action.DONE, "suspended, as the guest left it", Step.RESUMED)
    if state == "postmigrate" and f.saved_suspended:
        # QEMU 10.0 aborts on cont here: only a reload from the complete state is safe.
        if seen.state_complete and f.step in COMPLETE:
            return _d(Action.RELOAD, "saved in S3: reloading it from its state", Step.RELOADING)
        return _d(
            Action.KEEP,
            "stopped after a save in S3 but its state file is not complete: "
            "cont would abort QEMU; kept",
        )
    if state in ("postmigrate", "paused"):
        if f.runstate_before == "running":
            return _d(Action.CONT, f"{state}: continuing it", Step.RESUMING)
        if f.cprd_suspended:
            # S3 entered, then stopped by a migration that did not complete.
            return _d(Action.CONT, f"{state}: continuing it", Step.RESUMING)
        return _d(Action.DONE, f"{state}, as before", Step.RESUMED)
    if state in ("finish-migrate", "inmigrate", "prelaunch", "save-vm", "restore-vm"):
        return _d(Action.WAIT, f"runstate {state}")
    return _d(Action.KEEP, f"runstate {state!r}: cprd does not know how to put it back")


def _put_back(f: Facts, seen: Seen) -> Decision:
    step = f.step
    if step in RUNNING:
        return _d(Action.DONE, "running")
    if step is Step.PLANNED:
        if seen.qemu is Qemu.GONE:  # untouched, but its QEMU exited by itself
            return _d(Action.LOST, "its QEMU exited by itself before cprd touched it")
        return _d(Action.DONE, "untouched")
    if seen.qemu is Qemu.HUNG:
        return _d(Action.KEEP, "its QEMU lives but does not answer")
    if step in (Step.SHUTTING_DOWN, Step.SHUT_DOWN, Step.BOOTING):
        if seen.qemu is Qemu.GONE:
            return _d(Action.COLD_BOOT, "shut down: booting it again", Step.BOOTING)
        if seen.qemu is Qemu.OTHER and step is Step.BOOTING and seen.runstate in LIVE:
            return _d(Action.DONE, "running in a new QEMU", Step.RESTORED)
        if seen.qemu is Qemu.UP and seen.runstate == "running":
            return _d(Action.DONE, "still running", Step.RESUMED)
        return _d(Action.WAIT, f"shutting down ({seen.runstate or seen.qemu.value})")
    if seen.qemu is Qemu.OTHER:
        # Only a QEMU that cprd itself was starting for this VM may be taken for it.
        if step in (Step.RELOADING, Step.RESTORING) and seen.runstate in LIVE:
            return _d(Action.DONE, f"{seen.runstate} in a new QEMU", Step.RESTORED)
        return _d(
            Action.KEEP,
            f"another QEMU serves its socket ({seen.runstate or 'not answering'}): kept",
        )
    if step is Step.SUSPENDING:
        if seen.qemu is Qemu.GONE:
            return _d(Action.LOST, "its QEMU exited while it was being suspended")
        return _back(f, seen)
    if step in SAVING:
        # A live save runs while the VM runs: cancelling it leaves the VM running, as
        # QEMU restarts a VM that ran when its migration began; stopped by cprd (or by
        # the last pass) it is continued below once the migration is cancelled.
        if seen.qemu is Qemu.GONE:
            if seen.state_complete:
                return _d(Action.LAUNCH, "its QEMU exited after a complete save", Step.RESTORING)
            return _d(Action.LOST, "its QEMU exited during the save: the state is incomplete")
        if seen.migration == "cancelling":
            return _d(Action.WAIT, "migration cancelling")
        if seen.migration in MIGRATING or seen.runstate == "finish-migrate":
            return _d(Action.CANCEL, f"migration {seen.migration or seen.runstate}: cancelling it")
        if seen.migration == "completed" and seen.runstate == "postmigrate":
            return _d(Action.FINISH_SAVE, "the migration completed", Step.SAVED)
        return _back(f, seen)
    if step is Step.RESUMING:
        if seen.qemu is Qemu.GONE:
            return _d(Action.LOST, "its QEMU exited while it was being resumed")
        return _back(f, seen)
    # SAVED, QUITTING, COMMITTED, RELOADING, RESTORING: the state file is complete.
    if seen.qemu is Qemu.GONE:
        if not seen.state_complete:
            return _d(Action.LOST, "its QEMU is gone and its state file is incomplete or missing")
        return _d(Action.LAUNCH, "its QEMU is gone: loading its state file", Step.RESTORING)
    if step is Step.RESTORING:
        # Seen.qemu is UP only for the recorded (old) process: it cannot be the new one.
        return _d(Action.KEEP, f"its old QEMU still answers ({seen.runstate}): kept")
    if seen.runstate == "postmigrate" and not f.saved_suspended:
        return _d(Action.CONT, "saved: continuing it", Step.RESUMING)
    return _back(f, seen)


def _commit(f: Facts, seen: Seen, anyway: bool) -> Decision:
    step = f.step
    if step is Step.SHUT_DOWN:
        return _d(Action.DONE, step.value)
    if step in SAVING and seen.qemu is Qemu.GONE and seen.state_complete:
        return _d(Action.MARK, "its QEMU is gone after a complete save", Step.SAVED)
    if step in COMPLETE:
        if seen.qemu is Qemu.GONE:
            if step is Step.COMMITTED:
                return _d(Action.DONE, "committed")
            if seen.state_complete:
                return _d(
                    Action.MARK, "its QEMU is gone; the state file is complete", Step.COMMITTED
                )
            return _d(Action.LOST, "its QEMU is gone and its state file is incomplete or missing")
        quitting = step in (Step.QUITTING, Step.COMMITTED)
        if seen.qemu is Qemu.UP and seen.runstate == "postmigrate":
            if not seen.state_complete and not quitting:
                if not anyway:
                    return _d(
                        Action.KEEP, "its state file is missing or incomplete: not committing"
                    )
                return _unsaved_anyway(f, seen, "its state file is missing or incomplete")
            if quitting:
                if anyway:
                    return _d(Action.KILL, "still there after quit: killing it", Step.QUITTING)
                return _d(Action.QUIT, "still there after quit: quitting it again", Step.QUITTING)
            return _d(Action.QUIT, "saved: quitting its QEMU", Step.QUITTING)
        if quitting and seen.qemu is not Qemu.OTHER:
            if anyway:
                return _d(Action.KILL, "quit sent, QEMU still there: killing it", Step.QUITTING)
            return _d(Action.WAIT, "quit sent: waiting for its QEMU to exit")
        if not anyway:
            return _d(
                Action.KEEP,
                f"its QEMU is {seen.runstate or seen.qemu.value}, not postmigrate: "
                "its state may be stale; not committing",
            )
        if seen.qemu is Qemu.HUNG:
            return _d(Action.KILL, "saved, but its QEMU does not answer: killing it", Step.QUITTING)
        return _unsaved_anyway(f, seen, "its QEMU ran on after the save")
    if step is Step.SHUTTING_DOWN:
        if seen.qemu is Qemu.GONE:
            return _d(Action.MARK, "shut down", Step.SHUT_DOWN)
        if seen.qemu is Qemu.UP and seen.runstate == "shutdown":
            return _d(Action.QUIT, "the guest powered off: quitting its QEMU", Step.SHUTTING_DOWN)
        if (anyway or f.shutdown_asked) and seen.qemu in (Qemu.UP, Qemu.HUNG):
            # The shutdown action ends with its QEMU gone; still there, it was interrupted
            # (an error, cprd restarted): shut it down again rather than wait for nothing.
            return _unsaved_anyway(f, seen, "its shutdown was interrupted")
        return _d(Action.WAIT, "shutting down")
    if f.shutdown_asked and step in (Step.PLANNED, Step.RESUMED):
        # Not saved on purpose: shut down cleanly at commit, booted again at restore.
        if seen.qemu is Qemu.GONE:
            return _d(Action.MARK, "its QEMU is gone (it was to be shut down)", Step.SHUT_DOWN)
        return _unsaved_anyway(
            dataclasses.replace(f, on_kexec_failure="shutdown"),
            seen,
            "asked to shut down instead of saving",
        )
    if not anyway:
        return _d(Action.KEEP, f"not saved ({step.value}): not committing")
    # The kexec goes ahead and this VM was not saved (its save failed and was undone).
    if seen.qemu is Qemu.GONE:
        return _d(Action.LOST, f"its QEMU is gone and it was never saved ({step.value})")
    if step in (Step.SUSPENDING, *SAVING, Step.RESUMING):
        # Not back yet: put it back first, then shut it down.
        back = _put_back(f, seen)
        if not back.final:
            return back
    return _unsaved_anyway(f, seen, f"not saved ({step.value})")


def _unsaved_anyway(f: Facts, seen: Seen, why: str) -> Decision:
    if seen.qemu is Qemu.UP and seen.runstate not in ("running", "shutdown"):
        back = _back(f, seen)  # a stopped guest cannot power off: back first
        if not back.final:
            return back
    if f.on_kexec_failure == "leave":
        return _d(Action.DONE, f"{why}; on_kexec_failure: leave: it dies with the kexec")
    if seen.qemu is Qemu.HUNG:
        return _d(Action.KILL, f"{why}, and its QEMU does not answer", Step.SHUTTING_DOWN)
    return _d(Action.SHUTDOWN, f"{why}: shutting it down cleanly", Step.SHUTTING_DOWN)


def _restore(f: Facts, seen: Seen) -> Decision:
    step = f.step
    if step in RUNNING:
        return _d(Action.DONE, "running")
    if seen.qemu is not Qemu.GONE:
        return _d(
            Action.KEEP,
            f"a QEMU already serves its socket ({seen.runstate or seen.qemu.value}): "
            "not starting a second one",
        )
    if step in (Step.SHUT_DOWN, Step.SHUTTING_DOWN, Step.BOOTING):
        return _d(Action.COLD_BOOT, "shut down before the kexec: booting it", Step.BOOTING)
    if seen.state_complete:
        return _d(Action.LAUNCH, "loading its state file", Step.RESTORING)
    return _d(Action.LOST, f"never saved completely ({step.value}): refusing to start it")


def decide(f: Facts, seen: Seen, intent: Intent) -> Decision:
    """What to do next for one VM (pure)."""
    if intent is Intent.PUT_BACK:
        return _put_back(f, seen)
    if intent is Intent.RESTORE:
        return _restore(f, seen)
    return _commit(f, seen, anyway=intent is Intent.COMMIT_ANYWAY)
