"""decide(): every (step, what QEMU reports, intent) combination, and a model of QEMU that
acts out each decision until the VM settles.

Pure: no QEMU here.  The model's transitions are the ones observed with QEMU 10.0.2
(TESTBED.md, and the abort on ``cont`` from postmigrate for a guest saved in S3).
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from cprd.steps import (
    COMPLETE,
    Action,
    Decision,
    Facts,
    Intent,
    Qemu,
    Seen,
    Step,
    decide,
)

RUNSTATES = (
    "running",
    "paused",
    "suspended",
    "postmigrate",
    "finish-migrate",
    "inmigrate",
    "shutdown",
    "internal-error",
    "",
)
MIGRATIONS = ("none", "setup", "active", "cancelling", "completed", "failed", "cancelled", "")
BEFORE = ("running", "paused", "suspended")
FACTS = [
    Facts(step, before, suspended, on_failure, asked)
    for step in Step
    for before in BEFORE
    for suspended in (False, True)
    for on_failure in ("shutdown", "leave")
    for asked in (False, True)
    if not (suspended and before != "running")  # cprd suspends running guests only
    if not (asked and suspended)  # a VM named to be shut down is not suspended first
]
SEEN = [
    Seen(qemu, runstate if qemu in (Qemu.UP, Qemu.OTHER) else "", mig, complete)
    for qemu in Qemu
    for runstate in RUNSTATES
    for mig in MIGRATIONS
    for complete in (False, True)
    if qemu in (Qemu.UP, Qemu.OTHER) or (runstate == "" and mig == "")
]
ALL = list(itertools.product(FACTS, SEEN, Intent))


def test_the_grid_is_walked_whole() -> None:
    assert len(ALL) > 50_000


def test_every_combination_decides() -> None:
    for f, seen, intent in ALL:
        d = decide(f, seen, intent)
        assert isinstance(d.action, Action), (f, seen, intent)
        assert d.why, (f, seen, intent)


def test_never_cont_from_postmigrate_after_a_save_in_s3() -> None:
    """QEMU 10.0 aborts ('postmigrate' -> 'suspended'): the guest would be lost."""
    for f, seen, intent in ALL:
        if seen.runstate == "postmigrate" and f.saved_suspended:
            assert decide(f, seen, intent).action is not Action.CONT, (f, seen, intent)


def test_a_live_copy_is_given_up_only_for_a_complete_state() -> None:
    """quit, kill and reload end the only running copy of a VM: never without a complete
    state file (or, on the kexec-goes-ahead path, after a clean shutdown)."""
    for f, seen, intent in ALL:
        d = decide(f, seen, intent)
        if d.action in (Action.QUIT, Action.RELOAD) and d.to is not Step.SHUTTING_DOWN:
            quit_sent = f.step in (Step.QUITTING, Step.COMMITTED)
            assert seen.state_complete or quit_sent, (f, seen, intent, d)
            assert f.step in COMPLETE, (f, seen, intent, d)
        if d.action is Action.KILL and d.to is Step.QUITTING:
            assert intent is Intent.COMMIT_ANYWAY and f.step in COMPLETE, (f, seen, intent)


def test_only_the_kexec_going_ahead_shuts_down_or_kills() -> None:
    for f, seen, intent in ALL:
        d = decide(f, seen, intent)
        if d.action in (Action.SHUTDOWN, Action.KILL):
            # ... or a VM its caller named to be shut down instead of saved
            assert intent is Intent.COMMIT_ANYWAY or f.shutdown_asked, (f, seen, intent, d)
            assert intent is not Intent.PUT_BACK, (f, seen, intent, d)
        if d.action is Action.SHUTDOWN:
            assert f.on_kexec_failure == "shutdown" or f.shutdown_asked, (f, seen, intent, d)


def test_a_vm_is_started_only_where_nothing_serves_its_socket() -> None:
    for f, seen, intent in ALL:
        d = decide(f, seen, intent)
        if d.action is Action.LAUNCH:
            assert seen.qemu is Qemu.GONE and seen.state_complete, (f, seen, intent, d)
        if d.action is Action.COLD_BOOT:
            assert seen.qemu is Qemu.GONE, (f, seen, intent, d)
            assert f.step in (Step.SHUTTING_DOWN, Step.SHUT_DOWN, Step.BOOTING), (f, seen)


def test_lost_only_when_neither_qemu_nor_complete_state() -> None:
    for f, seen, intent in ALL:
        d = decide(f, seen, intent)
        if d.action is Action.LOST:
            assert seen.qemu is Qemu.GONE, (f, seen, intent, d)
            assert not (seen.state_complete and f.step in COMPLETE), (f, seen, intent, d)


def test_a_live_save_under_way_is_cancelled_and_its_vm_never_stopped() -> None:
    """A save under way (migrating, or stopping for the last pass of a live save) while
    the VM runs: putting it back cancels the migration, and nothing in decide() stops
    the VM (no quit, kill, reload or shutdown) on the way back."""
    for f, seen, intent in ALL:
        if f.step not in (Step.MIGRATING, Step.STOPPING) or seen.qemu is not Qemu.UP:
            continue
        d = decide(f, seen, intent)
        if intent is Intent.PUT_BACK and seen.migration in ("setup", "active"):
            assert d.action is Action.CANCEL, (f, seen, d)
        if intent is not Intent.COMMIT_ANYWAY and not f.shutdown_asked:
            assert d.action not in (Action.QUIT, Action.KILL, Action.RELOAD, Action.SHUTDOWN)
    # Stopped by cprd for its last pass, then the migration failed: continued.
    stopped = Facts(Step.STOPPING, "running", False)
    for mig in ("failed", "cancelled"):
        d = decide(stopped, Seen(Qemu.UP, "paused", mig), Intent.PUT_BACK)
        assert (d.action, d.to) == (Action.CONT, Step.RESUMING)
    done = decide(stopped, Seen(Qemu.UP, "postmigrate", "completed"), Intent.PUT_BACK)
    assert (done.action, done.to) == (Action.FINISH_SAVE, Step.SAVED)


def test_commit_that_can_be_stopped_never_commits_a_vm_that_runs() -> None:
    for f, seen, intent in ALL:
        if intent is not Intent.COMMIT:
            continue
        d = decide(f, seen, intent)
        if seen.qemu is Qemu.UP and seen.runstate == "running" and f.step is Step.SAVED:
            assert d.action is Action.KEEP, (f, seen, d)


# --- a model of QEMU, acted on until the VM settles -----------------------------------


@dataclasses.dataclass
class Model:
    step: Step
    qemu: Qemu
    runstate: str
    migration: str
    complete: bool
    facts: Facts
    aborted: bool = False

    def seen(self) -> Seen:
        if self.qemu in (Qemu.GONE, Qemu.HUNG):
            return Seen(self.qemu, state_complete=self.complete)
        return Seen(self.qemu, self.runstate, self.migration, self.complete)

    def act(self, d: Decision) -> None:
        if d.to is not None:
            self.step = d.to
        a = d.action
        if a is Action.CANCEL:
            self.migration = "cancelled"
            if self.runstate == "finish-migrate":
                self.runstate = self.facts.runstate_before
            elif self.runstate == "postmigrate":
                self.runstate = "paused"
            # A live save stopped by cprd (paused) stays paused: QEMU restarts only a VM
            # that ran when its last pass began; a running one runs on.
        elif a is Action.FINISH_SAVE:
            self.complete = True
        elif a is Action.CONT:
            if self.runstate == "postmigrate" and self.facts.saved_suspended:
                self.aborted = True
                self.qemu = Qemu.GONE
            elif self.runstate in ("paused", "postmigrate"):
                self.runstate = "suspended" if self.facts.cprd_suspended else "running"
        elif a is Action.WAKE:
            self.runstate = "running"
        elif a in (Action.RELOAD, Action.QUIT, Action.KILL, Action.SHUTDOWN):
            self.qemu = Qemu.GONE
            self.runstate = ""
        elif a in (Action.LAUNCH, Action.COLD_BOOT):
            assert a is Action.COLD_BOOT or self.complete
            self.qemu, self.runstate, self.step = Qemu.UP, "running", Step.RESTORED
        elif a is Action.WAIT:
            if self.migration == "cancelling":
                self.migration = "cancelled"
            if self.runstate in ("finish-migrate", "inmigrate"):
                self.runstate = "postmigrate"
                self.migration = "completed"


#: The states a VM can be found in after a crash at each step (what QEMU may report).
START = {
    Step.PLANNED: [("running", "none", False)],
    Step.SUSPENDING: [("running", "none", False), ("suspended", "none", False)],
    Step.MIGRATING: [
        ("running", "setup", False),
        ("running", "active", False),  # a live save, in its live phase
        ("finish-migrate", "active", False),
        ("postmigrate", "active", False),
        ("postmigrate", "completed", False),
        ("postmigrate", "completed", True),
        ("running", "failed", False),
        ("suspended", "cancelled", False),
    ],
    Step.STOPPING: [  # a live save: cprd is stopping the VM for the last pass
        ("running", "active", False),
        ("paused", "active", False),
        ("finish-migrate", "active", False),
        ("postmigrate", "completed", False),
        ("postmigrate", "completed", True),
        ("paused", "failed", False),
        ("running", "cancelled", False),
    ],
    Step.SAVED: [("postmigrate", "completed", True)],
    Step.RESUMING: [("postmigrate", "completed", True), ("running", "completed", True)],
    Step.RELOADING: [("postmigrate", "completed", True)],
    Step.QUITTING: [("postmigrate", "completed", True)],
    Step.COMMITTED: [("postmigrate", "completed", True)],
}


def _walk(model: Model, intent: Intent) -> Decision:
    for _ in range(30):
        d = decide(dataclasses.replace(model.facts, step=model.step), model.seen(), intent)
        if d.final:
            if d.to is not None:
                model.step = d.to
            return d
        model.act(d)
        assert not model.aborted, (model, d)
    raise AssertionError(f"did not settle: {model}")


@pytest.mark.parametrize("intent", [Intent.PUT_BACK, Intent.COMMIT, Intent.COMMIT_ANYWAY])
def test_every_crash_point_settles_running_saved_or_shut_down(intent: Intent) -> None:
    """From every step a crash can leave, with the QEMU alive or gone: acting out the
    decisions ends with the VM running, committed with a complete state, shut down, or
    kept with its QEMU alive; lost only when its QEMU died with an incomplete state."""
    walked = 0
    for f in FACTS:
        for (state, mig, complete), qemu in itertools.product(
            START.get(f.step, []), (Qemu.UP, Qemu.GONE)
        ):
            if f.saved_suspended and state == "running" and f.step is not Step.PLANNED:
                continue
            model = Model(f.step, qemu, state if qemu is Qemu.UP else "", mig, complete, f)
            # Gone with no complete state, or gone after it was resumed (its state may be
            # stale: loading it over disks the guest wrote since would corrupt them).
            lost_already = qemu is Qemu.GONE and (not complete or f.step is Step.RESUMING)
            d = _walk(model, intent)
            walked += 1
            where = (f, state, mig, complete, qemu, intent, d, model)
            if d.action is Action.LOST:
                assert lost_already, where
                continue
            if intent is Intent.PUT_BACK:
                assert d.action in (Action.DONE, Action.KEEP), where
                if d.action is Action.DONE and f.step is not Step.PLANNED:
                    # A VM its operator had paused may stay stopped (postmigrate is a
                    # stopped state that `cont` resumes, as paused is).
                    stopped = f.runstate_before == "paused" and model.runstate == "postmigrate"
                    assert model.qemu is Qemu.UP, where
                    assert model.runstate in BEFORE or stopped, where
                    assert model.step in (Step.RESUMED, Step.RESTORED), where
            elif d.action is Action.DONE:
                if model.step is Step.COMMITTED:
                    assert model.qemu is Qemu.GONE and model.complete, where
                elif model.step is Step.SHUT_DOWN:
                    assert intent is Intent.COMMIT_ANYWAY or f.shutdown_asked, where
                    assert model.qemu is Qemu.GONE, where
                else:
                    assert intent is Intent.COMMIT_ANYWAY and f.on_kexec_failure == "leave", where
            else:
                assert intent is Intent.COMMIT and d.action is Action.KEEP, where
    assert walked > 200


def test_restore_brings_back_committed_and_boots_shut_down() -> None:
    base = Facts(Step.COMMITTED, "running", False)
    gone = Seen(Qemu.GONE, state_complete=True)
    assert decide(base, gone, Intent.RESTORE).action is Action.LAUNCH
    assert decide(base, Seen(Qemu.GONE), Intent.RESTORE).action is Action.LOST
    assert decide(base, Seen(Qemu.OTHER), Intent.RESTORE).action is Action.KEEP
    shut = dataclasses.replace(base, step=Step.SHUT_DOWN)
    assert decide(shut, Seen(Qemu.GONE), Intent.RESTORE).action is Action.COLD_BOOT
    done = dataclasses.replace(base, step=Step.RESTORED)
    assert decide(done, gone, Intent.RESTORE).action is Action.DONE


def test_a_save_error_never_says_every_vm_was_put_back_when_one_was_lost() -> None:
    """A QEMU that dies by itself while its save is cancelled (seen once with QEMU 10.0.2:
    a segfault in migrate_cancel) is lost; the error must say so, not 'every VM was put
    back'."""
    from cprd.errors import SaveError

    err = SaveError(
        "x: boom",
        {"big": "LOST: its QEMU exited during the save: the state is incomplete", "ok": "resumed"},
        lost=["big"],
    )
    assert "every VM was put back" not in str(err)
    assert "not every VM could be put back (big LOST: its QEMU exited by itself)" in str(err)
    assert SaveError("r", {"a": "resumed"}).message.startswith("save failed (r); every VM was")


def test_a_vm_named_to_be_shut_down_is_shut_down_at_a_commit_that_can_be_stopped() -> None:
    """`cprdctl kexec --shutdown VM`: all or nothing for the others, but that VM is not
    saved: its commit shuts it down (it used to refuse: 'not saved (planned)')."""
    asked = Facts(Step.PLANNED, "running", False, "leave", shutdown_asked=True)
    up = Seen(Qemu.UP, "running", "none")
    d = decide(asked, up, Intent.COMMIT)
    assert (d.action, d.to) == (Action.SHUTDOWN, Step.SHUTTING_DOWN)
    d = decide(dataclasses.replace(asked, step=Step.SHUTTING_DOWN), Seen(Qemu.GONE), Intent.COMMIT)
    assert (d.action, d.to) == (Action.MARK, Step.SHUT_DOWN)
    plain = dataclasses.replace(asked, shutdown_asked=False)
    assert decide(plain, up, Intent.COMMIT).action is Action.KEEP
