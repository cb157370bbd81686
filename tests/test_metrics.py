"""The metrics file for node_exporter's textfile collector (issue 15 item 5).

Parsed with prometheus_client's two parsers: the Prometheus text format (what the textfile
collector reads) and OpenMetrics 1.0.  The last test runs a real prepare and resume through
the real daemon on real guests and parses the file it wrote after each.
"""

from __future__ import annotations

import json
import os
import re
import stat
import time
from pathlib import Path
from typing import Any

import pytest
from fixtures_bus import BusDaemon, CprdAccounts
from fixtures_daemon import start_daemon, stop_daemon
from harness import GuestFactory, GuestSpec, Memory
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families as prometheus_families
from test_cycle import make_config

from cprd import cli, metrics
from cprd.manifest import Outcome, VMRecord
from cprd.plan import MigrationSettings
from cprd.steps import Step

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """Every sample, by (name, labels), after checking both parsers read the same."""
    out: Samples = {}
    for family in prometheus_families(text):
        assert family.type == "gauge", family
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    om: Samples = {}
    for family in openmetrics_families(text):  # type: ignore[no-untyped-call]
        for s in family.samples:
            om[(s.name, tuple(sorted(s.labels.items())))] = s.value
    assert om == out
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def test_span_is_the_last_stop_to_its_save() -> None:
    history = [
        ("planned", "2026-12-01T10:00:00.000+00:00"),
        ("migrating", "2026-12-01T10:00:01.000+00:00"),
        ("resuming", "2026-12-01T10:00:02.000+00:00"),  # a failed save: no "saved"
        ("resumed", "2026-12-01T10:00:02.100+00:00"),
        ("suspending", "2026-12-01T10:01:00.000+00:00"),
        ("migrating", "2026-12-01T10:01:00.500+00:00"),
        ("saved", "2026-12-01T10:01:01.250+00:00"),
        ("quitting", "2026-12-01T10:01:05.000+00:00"),
        ("committed", "2026-12-01T10:01:05.100+00:00"),
    ]
    assert metrics.span(history, metrics.STOP_STEPS, "saved") == 1.25
    assert metrics.span(history[:4], metrics.STOP_STEPS, "saved") is None
    assert metrics.span([], metrics.STOP_STEPS, "saved") is None


def test_render_parses_as_prometheus_text_and_openmetrics() -> None:
    vms = (
        metrics.VMFigures('we"b\\1\n', "saved", True, 1536 * 2**20, 1.234),
        metrics.VMFigures("db", "resumed", False),
        metrics.VMFigures("old", "shut-down", None),
    )
    text = metrics.render(metrics.Report("prepare", False, 1764583200.5, 3.25, vms))
    assert text.endswith("\n# EOF\n")
    s = parse(text)
    assert value(s, "cprd_last_operation", operation="prepare", result="failed") == 1
    assert value(s, "cprd_last_operation_timestamp_seconds") == 1764583200.5
    assert value(s, "cprd_last_operation_duration_seconds") == 3.25
    assert value(s, "cprd_last_operation_vms_ok") == 1
    assert value(s, "cprd_last_operation_vms_failed") == 1  # "old" was shut down as asked
    assert value(s, "cprd_vm_state_bytes", vm='we"b\\1\n') == 1536 * 2**20
    assert value(s, "cprd_vm_stopped_seconds", vm='we"b\\1\n') == 1.234
    assert value(s, "cprd_vm_outcome", vm="db", outcome="resumed") == 1
    assert ("cprd_vm_state_bytes", (("vm", "db"),)) not in s
    # Every metric written is documented, in the module and the operator guide.
    guide = (Path(__file__).parent.parent / "docs" / "operator-guide.md").read_text()
    for name, _ in metrics.METRICS:
        assert f"`{name}`" in guide, name
    assert {n for n, _ in s} <= {n for n, _ in metrics.METRICS}


def record(step: Step, **changes: Any) -> VMRecord:
    rec = VMRecord(
        name="web",
        qmp_socket="/run/cprd/qmp/web.sock",
        pid=42,
        argv=("qemu-system-x86_64",),
        executable="/usr/bin/qemu-system-x86_64",
        qemu_version="10.0.2",
        machine_type="pc-q35-10.0",
        state_file="/var/lib/cprd/web.state",
        settings=MigrationSettings({}, {}),
        runstate_before="running",
        cprd_suspended=False,
        history=(
            ("migrating", "2026-12-01T10:00:00.000+00:00"),
            ("saved", "2026-12-01T10:00:00.600+00:00"),
            ("restoring", "2026-12-01T10:05:00.000+00:00"),
            ("restored", "2026-12-01T10:05:01.500+00:00"),
        ),
    )
    return rec.replace(step=step, **changes)


def test_vm_figures_from_the_manifest_record() -> None:
    saved = metrics.vm_figures("prepare", record(Step.SAVED, state_size=1000))
    assert saved == metrics.VMFigures("web", "saved", True, 1000, 0.6, 1.5)
    assert metrics.vm_figures("commit", record(Step.SAVED)).ok is False
    assert metrics.vm_figures("commit", record(Step.COMMITTED)).ok is True
    asked = record(Step.SHUT_DOWN, shutdown_asked=True)
    assert metrics.vm_figures("kexec", asked).ok is None  # neither saved nor failed
    assert metrics.vm_figures("kexec", record(Step.SHUT_DOWN)).ok is False
    failed = metrics.vm_figures("restore", record(Step.RESTORING, outcome=Outcome.FAILED))
    assert (failed.outcome, failed.ok) == ("failed", False)
    restored = metrics.vm_figures("restore", record(Step.RESTORED, outcome=Outcome.RESTORED))
    assert (restored.outcome, restored.ok, restored.restore_s) == ("restored", True, 1.5)


def test_figures_from_outcome_lines() -> None:
    figures = metrics.outcome_figures(
        {
            "a": "cpr-transfer: running",
            "b": "failed: QMP: gone",
            "c": "resumed (running)",
            "d": "LOST: its QEMU is gone",
            "e": "could not be put back: hung; kept in the manifest",
            "f": "untouched, still running",
        },
        {"a": 0.05},
    )
    assert [(f.name, f.outcome, f.ok, f.stopped_s) for f in figures] == [
        ("a", "cpr-transfer", True, 0.05),
        ("b", "failed", False, None),
        ("c", "resumed", True, None),
        ("d", "lost", False, None),
        ("e", "kept", False, None),
        ("f", "untouched", True, None),
    ]


def test_write_replaces_the_file_atomically_mode_0644(tmp_path: Path) -> None:
    path = tmp_path / "cprd.prom"
    path.write_text("old\n")
    os.chmod(path, 0o600)
    old_umask = os.umask(0o077)
    try:
        metrics.write(path, metrics.Report("commit", True, 1.0, 0.5))
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert os.listdir(tmp_path) == ["cprd.prom"], "no temp file left"
    assert value(parse(path.read_text()), "cprd_last_operation", operation="commit", result="ok")


def test_write_follows_no_symlinked_directory(tmp_path: Path) -> None:
    """The metrics file's directory may be another user's (node_exporter's): swapped for
    a symlink to another directory (as /etc/cron.d), it is refused and nothing is
    written there; a symlink at the file's own name is replaced, never followed."""
    elsewhere = tmp_path / "elsewhere"  # stands for /etc/cron.d
    elsewhere.mkdir()
    (tmp_path / "textfiles").symlink_to(elsewhere)
    report = metrics.Report("commit", True, 1.0, 0.5)
    (elsewhere / "sub").mkdir()
    with pytest.raises(NotADirectoryError):  # the directory's own name: O_NOFOLLOW
        metrics.write(tmp_path / "textfiles" / "cprd.prom", report)
    with pytest.raises(OSError, match=f"is not a directory of that name but {elsewhere}/sub"):
        metrics.write(tmp_path / "textfiles" / "sub" / "cprd.prom", report)
    assert os.listdir(elsewhere) == ["sub"] and os.listdir(elsewhere / "sub") == []
    real = tmp_path / "real"
    real.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("root's\n")
    (real / "cprd.prom").symlink_to(victim)
    metrics.write(real / "cprd.prom", report)
    assert victim.read_text() == "root's\n"
    assert not (real / "cprd.prom").is_symlink()
    assert sorted(os.listdir(real)) == ["cprd.prom"]


def test_record_never_fails_the_operation(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    missing = tmp_path / "no-such-dir" / "cprd.prom"
    metrics.record(missing, tmp_path / "manifest.yaml", "prepare", True, 1.0)
    assert "cannot write the metrics file" in caplog.text
    metrics.record(None, tmp_path / "manifest.yaml", "prepare", True, 1.0)  # off: nothing


@pytest.mark.qemu
def test_prepare_and_resume_write_the_metrics_file(
    guests: GuestFactory,
    dbus_daemon: BusDaemon,
    vm_dir_root: Path,
    cprd_accounts: CprdAccounts,
) -> None:
    """The real daemon, real guests: check --measure (root only), then prepare and resume,
    each followed by a metrics file that both parsers read, with the manifest's figures.
    Without the journald fixture (host-global, often held by another test run): the daemon
    logs to whichever journald answers, or to stderr."""
    web, db = guests(GuestSpec("web", fill_mib=32), GuestSpec("db", memory=Memory.FILE))
    prom = vm_dir_root / "textfile" / "cprd.prom"
    prom.parent.mkdir()
    daemon = start_daemon(dbus_daemon, vm_dir_root, extra=f"metrics: {{textfile: '{prom}'}}\n")
    try:
        daemon.wait_answering()
        member = (cprd_accounts.member_uid, cprd_accounts.member_gid, cprd_accounts.member_groups)
        denied = daemon.ctl("check", "--measure", user=member)
        assert denied.returncode == 3, denied.stderr
        assert "AccessDenied" in denied.stderr and "MeasureBandwidth" in denied.stderr
        assert not (vm_dir_root / "state" / "bandwidth.json").exists()
        unmeasured = daemon.ctl("check", user=member)
        assert "times not measured; run `cprdctl check --measure` as root" in unmeasured.stdout

        measured = daemon.ctl("check", "--measure")
        assert measured.returncode == 0, measured.stderr + daemon.log.read_text()[-3000:]
        lines = measured.stdout.splitlines()
        assert re.fullmatch(
            r"  predicted \(live\): write \d+ MiB, stopped \d+ ms, restore \d+ ms",
            lines[lines.index("web: save live (RAM copied): ok") + 2],
        ), lines
        assert re.fullmatch(r"host \(2 VMs\): write \d+ MiB, longest stop .*", lines[-1]), lines
        doc = json.loads(daemon.ctl("check", "--json", user=member).stdout)
        pred = {c["name"]: c["prediction"] for c in doc["check"]}
        assert pred["web"]["measured"] and pred["web"]["write_bps"] > 2**20
        assert pred["db"]["mode"] == "in-place" and pred["web"]["mode"] == "live"
        assert pred["web"]["host_bytes"] == pred["web"]["bytes"] + pred["db"]["bytes"]

        assert not prom.exists()
        before = time.time()
        prep = daemon.ctl("prepare-kexec")
        assert prep.returncode == 0, prep.stderr + daemon.log.read_text()[-3000:]
        assert stat.S_IMODE(prom.stat().st_mode) == 0o644
        s = parse(prom.read_text())
        assert value(s, "cprd_last_operation", operation="prepare", result="ok") == 1
        assert before <= value(s, "cprd_last_operation_timestamp_seconds") <= time.time()
        duration = value(s, "cprd_last_operation_duration_seconds")
        assert 0 < duration < 120
        assert value(s, "cprd_last_operation_vms_ok") == 2
        assert value(s, "cprd_last_operation_vms_failed") == 0
        manifest = json.loads(daemon.ctl("manifest", "--json").stdout)["manifest"]
        for rec in manifest["vms"]:
            name = rec["name"]
            assert value(s, "cprd_vm_state_bytes", vm=name) == rec["state_size"]
            assert 0 < value(s, "cprd_vm_stopped_seconds", vm=name) <= duration
            assert value(s, "cprd_vm_outcome", vm=name, outcome="saved") == 1

        res = daemon.ctl("resume")
        assert res.returncode == 0, res.stderr
        s = parse(prom.read_text())
        assert value(s, "cprd_last_operation", operation="resume", result="ok") == 1
        assert value(s, "cprd_last_operation_vms_ok") == 2
        for name in ("web", "db"):
            assert value(s, "cprd_vm_outcome", vm=name, outcome="resumed") == 1
        assert web.runstate() == "running" and db.runstate() == "running"
    finally:
        stop_daemon(daemon)


@pytest.mark.qemu
def test_one_shot_commands_write_the_metrics_file(
    guests: GuestFactory, vm_dir_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`cprd prepare` and `cprd resume` without the daemon write the file too."""
    (web,) = guests(GuestSpec("web"))
    prom = vm_dir_root / "cprd.prom"
    make_config(vm_dir_root, f"metrics: {{textfile: '{prom}'}}\n")
    config = str(vm_dir_root / "cprd.yaml")
    assert cli.main(["--config", config, "prepare"]) == 0, capsys.readouterr()
    s = parse(prom.read_text())
    assert value(s, "cprd_last_operation", operation="prepare", result="ok") == 1
    assert value(s, "cprd_vm_outcome", vm="web", outcome="saved") == 1
    assert value(s, "cprd_vm_state_bytes", vm="web") > 0
    assert cli.main(["--config", config, "resume"]) == 0, capsys.readouterr()
    s = parse(prom.read_text())
    assert value(s, "cprd_last_operation", operation="resume", result="ok") == 1
    assert value(s, "cprd_last_operation_vms_ok") == 1
    assert web.runstate() == "running"


def test_a_live_saves_stopped_time_starts_at_its_stop() -> None:
    """A live save runs while ``migrating``: only ``stopping`` to ``saved`` is stopped."""
    live = record(Step.SAVED).replace(
        history=(
            ("migrating", "2026-12-01T10:00:00.000+00:00"),
            ("stopping", "2026-12-01T10:00:02.000+00:00"),
            ("saved", "2026-12-01T10:00:02.040+00:00"),
        )
    )
    assert metrics.vm_figures("prepare", live).stopped_s == 0.04
