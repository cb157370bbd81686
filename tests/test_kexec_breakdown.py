"""The kexec end-to-end test's per-phase breakdown (scripts/kexec_breakdown.py), a pure
function over what the virtual host reported and the console stamped outside.

Two inputs: a hand-made run whose every phase is known to the millisecond, and a real run
of `make kexec-e2e` captured in tests/data/kexec_e2e_run.json (the virtual host's
E2E-RESULT fields the breakdown reads, and the console lines it reads with their outer
stamps).
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

import kexec_breakdown as kb
import pytest

DATA = Path(__file__).parent / "data" / "kexec_e2e_run.json"
RT1, RT2 = 1_000_000.0, 2_000_000.0  # realtime - monotonic in boot 1 and boot 2
B1, B2 = "084d4c58-3961-4a9f-a088-182742b56ee7", "6959aeaf-600b-4a4a-9293-84c2ed36c9e4"


def iso(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).isoformat(timespec="milliseconds")


def entry(mono: float, rt_offset: float, **fields: str) -> dict[str, str]:
    return {
        "__MONOTONIC_TIMESTAMP": str(round(mono * 1e6)),
        "__REALTIME_TIMESTAMP": str(round((mono + rt_offset) * 1e6)),
        **fields,
    }


MANIFEST = {
    "vms": [
        {
            "name": "vm1",
            "history": [
                ["planned", iso(RT1 + 48.0)],
                ["migrating", iso(RT1 + 50.5)],
                ["saved", iso(RT1 + 51.5)],
                ["quitting", iso(RT1 + 51.7)],
                ["committed", iso(RT1 + 51.9)],
                ["restoring", iso(RT2 + 21.0)],
                ["restored", iso(RT2 + 23.0)],
            ],
        },
        {
            "name": "vm2",
            "history": [
                ["planned", iso(RT1 + 48.0)],
                ["migrating", iso(RT1 + 50.4)],
                ["saved", iso(RT1 + 51.6)],
                ["quitting", iso(RT1 + 51.7)],
                ["committed", iso(RT1 + 51.85)],
                ["restoring", iso(RT2 + 23.0)],
                ["restored", iso(RT2 + 25.0)],
            ],
        },
    ]
}


def made_up(late_ticks_s: float = 0.0) -> tuple[dict[str, Any], list[tuple[float, str]]]:
    """A run whose phases are known; ``late_ticks_s``: the outer stamps of the ticks
    after the kexec come that much later than the inner clocks say."""
    import yaml

    result: dict[str, Any] = {
        "journal_raw": {
            "boot1": [
                entry(
                    49.8,
                    RT1,
                    _SYSTEMD_UNIT="cprd.service",
                    MESSAGE="logind: a kexec is under way: preparing and committing",
                ),
                entry(49.0, RT1, MESSAGE_ID="6a5b1f0e3c8d4e7f9a0b1c2d3e4f5a61", MESSAGE="x"),
                entry(52.0, RT1, MESSAGE_ID="6a5b1f0e3c8d4e7f9a0b1c2d3e4f5a65", MESSAGE="y"),
                entry(
                    52.1,
                    RT1,
                    _SYSTEMD_UNIT="cprd.service",
                    MESSAGE="released logind's shutdown delay lock: the VMs are committed",
                ),
            ],
            "boot2": [
                entry(
                    20.0,
                    RT2,
                    UNIT="cprd-restore.service",
                    JOB_TYPE="start",
                    MESSAGE="Starting cprd-restore.service - cprd: restore...",
                ),
                entry(26.0, RT2, _SYSTEMD_UNIT="cprd-restore.service", MESSAGE="vm2: restored"),
            ],
        },
        "ticks_raw": {
            "vm1": [[4, RT1 + 49.0, B1], [5, RT1 + 50.0, B1], [6, RT2 + 24.0, B2]],
            "vm2": [[9, RT1 + 50.3, B1], [10, RT2 + 25.5, B2]],
        },
        "manifest": yaml.safe_dump(MANIFEST),
    }
    lines = [
        (99.0, "SeaBIOS (version 1.16)"),
        (100.5, "[    0.000000] Linux version 6.12.117+deb13-amd64 (buffered)"),
        (101.0, "[    0.900000] printk: console [ttyS0] enabled"),
        (130.0, "[   30.000000] systemd[1]: Started journald"),
        (140.0, f"E2E-PHASE boot1 {B1}"),
        (149.05, "E2E-TICK vm1 4"),
        (150.05, "E2E-TICK vm1 5"),
        (150.35, "E2E-TICK vm2 9"),
        (155.02, "[   55.000000] kexec_core: Starting new kernel"),
        (158.0, "[    0.000000] Linux version 6.12.117+deb13-amd64 (buffered)"),
        (158.0, "[    1.000000] printk: console [ttyS0] enabled"),
        # before its clocksource switch a starved kernel's clock is off: not read
        (157.5, "[    2.000000] clock not settled yet"),
        (159.5, "[    2.500000] clocksource: Switched to clocksource tsc"),
        (167.0, "[   10.000000] systemd[1]: Started journald"),
        (180.0, f"E2E-PHASE boot2 {B2}"),
        # a line quoting the journal, its ticks and phase lines: not read
        (180.5, f'E2E-RESULT {{"MESSAGE":"E2E-PHASE boot2 {B1}","x":"E2E-TICK vm1 6"}}'),
        (181.05 + late_ticks_s, "E2E-TICK vm1 6"),
        (182.55 + late_ticks_s, "E2E-TICK vm2 10"),
    ]
    return result, lines


def phases(b: kb.Breakdown) -> list[tuple[str, float]]:
    return [(p.mark, round(p.seconds, 3)) for p in b.phases]


def test_made_up_run_every_phase() -> None:
    parts = kb.breakdown(*made_up())
    assert list(parts) == ["vm1", "vm2", "host"]
    vm1 = parts["vm1"]
    assert phases(vm1) == [
        ("last tick", 0.5),
        ("migrating", 1.0),
        ("saved", 0.2),
        ("quitting", 0.2),
        ("committed", 0.1),
        ("manifest committed", 0.1),
        ("lock released", 2.9),
        ("kexec", 3.0),
        ("kernel", 19.0),
        ("cprd-restore", 1.0),
        ("restoring", 2.0),
        ("restored", 1.0),
    ]
    assert vm1.outer_s == pytest.approx(31.0)
    assert vm1.total_s == pytest.approx(31.0)
    assert abs(vm1.unaccounted_s) < 1e-6
    # cprd: the save after it stopped (1.6 s), the restore until it runs (3.0 s)
    assert vm1.cprd_s == pytest.approx(4.6)
    assert vm1.live_s == 0.0
    host = parts["host"]
    assert phases(host) == [
        ("last tick", 0.4),
        ("migrating", 1.1),
        ("saved", 0.2),
        ("quitting", 0.15),
        ("committed", 0.15),
        ("manifest committed", 0.1),
        ("lock released", 2.9),
        ("kexec", 3.0),
        ("kernel", 19.0),
        ("cprd-restore", 1.0),
        ("restoring", 4.0),
        ("restored", 0.5),
    ]
    assert host.outer_s == pytest.approx(32.5) and abs(host.unaccounted_s) < 1e-6


def test_late_outer_stamps_are_unaccounted() -> None:
    """The inner clocks say the ticks came 3 s earlier than the outside saw them: the
    phases no longer add up, and the remainder is beyond the tolerance."""
    parts = kb.breakdown(*made_up(late_ticks_s=3.0))
    assert parts["vm1"].unaccounted_s == pytest.approx(3.0)
    assert abs(parts["vm1"].unaccounted_s) > kb.tolerance(parts["vm1"].outer_s)


def test_live_phase_is_before_the_blackout() -> None:
    """A VM still ticking after its save began (a live save): the time from migrating to
    its last tick is its live phase, outside the blackout."""
    result, lines = made_up()
    result["manifest"] = result["manifest"].replace(iso(RT1 + 50.5), iso(RT1 + 46.0))
    vm1 = kb.breakdown(result, lines)["vm1"]
    assert vm1.live_s == pytest.approx(4.0)
    assert phases(vm1)[:2] == [("last tick", 1.5), ("saved", 0.2)]


def test_missing_data_is_named() -> None:
    result, lines = made_up()
    with pytest.raises(kb.BreakdownError, match="no journal_raw"):
        kb.breakdown({**result, "journal_raw": {}}, lines)
    with pytest.raises(kb.BreakdownError, match="1 kernel boots on the console"):
        kb.breakdown(result, [ln for ln in lines if ln[0] < 155.5])
    no_restore = {**result["journal_raw"], "boot2": result["journal_raw"]["boot2"][1:]}
    with pytest.raises(kb.BreakdownError, match=r"no start of cprd-restore\.service"):
        kb.breakdown({**result, "journal_raw": no_restore}, lines)


def test_stamped_log_round_trip() -> None:
    _, lines = made_up()
    text = "".join(f"{t:9.2f} {ln}\n" for t, ln in lines)
    assert kb.load_stamped(text) == [(round(t, 2), ln) for t, ln in lines]


def test_capture_keeps_what_the_breakdown_reads() -> None:
    result, lines = made_up()
    small = kb.capture(result, lines)
    assert len(small["lines"]) < len(lines)
    again = kb.breakdown(small["result"], [(t, ln) for t, ln in small["lines"]])
    assert kb.as_json(again) == kb.as_json(kb.breakdown(result, lines))


@pytest.mark.skipif(not DATA.exists(), reason="no captured run")
def test_real_run_adds_up() -> None:
    """A real `make kexec-e2e` run: every VM's phases add up to its blackout measured
    outside, within the tolerance; every phase is non-negative."""
    run = json.loads(DATA.read_text())
    lines = [(float(t), str(ln)) for t, ln in run["lines"]]
    parts = kb.breakdown(run["result"], lines)
    assert set(parts) == {"vm1", "vm2", "host"}
    for name, b in parts.items():
        assert abs(b.unaccounted_s) <= kb.tolerance(b.outer_s), (name, b.to_dict())
        assert all(p.seconds >= 0 for p in b.phases), (name, b.to_dict())
        marks = [p.mark for p in b.phases]
        for mark in ("kexec", "kernel", "cprd-restore", "restored"):
            assert mark in marks, (name, marks)
