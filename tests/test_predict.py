"""Predictions (pure) and the bandwidth measurement on the real disk (issue 15 item 4)."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from fixtures_bus import PROJECT_POLICY, CprdAccounts, run_dbus_daemon
from fixtures_daemon import start_daemon, stop_daemon
from test_bus import ACCESS_DENIED, Identity, call, run_client

from cprd import predict as pr
from cprd.controller import prediction_document
from cprd.render import host_prediction, prediction_line

MIB = 2**20
BW = pr.Bandwidth(
    write_bps=1000 * MIB,
    read_bps=2000 * MIB,
    measured_at="2026-12-01T18:00:00+00:00",
    probe_bytes=256 * MIB,
    direct_io=True,
)


def test_stop_first_is_stopped_while_every_byte_is_written() -> None:
    p = pr.predict(1500 * MIB, pr.SaveMode.STOP_FIRST, BW)
    # plus SAVE_OVERHEAD_S (0.05) and RESTORE_OVERHEAD_S (0.3)
    assert p == pr.Prediction(pr.SaveMode.STOP_FIRST, 1500 * MIB, 1.55, 1.05)


def test_live_is_stopped_for_the_last_pass_only() -> None:
    p = pr.predict(1500 * MIB, pr.SaveMode.LIVE, BW, downtime_limit_s=0.3)
    assert (p.bytes_to_write, p.stopped_s, p.restore_s) == (1500 * MIB, 0.35, 1.05)
    # A VM smaller than one downtime-limit's worth is stopped for all of it, no more.
    assert pr.predict(100 * MIB, pr.SaveMode.LIVE, BW, 0.3).stopped_s == pytest.approx(0.15)


def test_in_place_writes_device_state_only() -> None:
    p = pr.predict(16 * MIB, pr.SaveMode.IN_PLACE, BW)
    assert p.bytes_to_write == pr.IN_PLACE_BYTES
    assert p.stopped_s == pytest.approx(0.051)


def test_without_a_measurement_there_are_bytes_but_no_times() -> None:
    p = pr.predict(1500 * MIB, pr.SaveMode.STOP_FIRST, None)
    assert (p.bytes_to_write, p.stopped_s, p.restore_s) == (1500 * MIB, None, None)
    doc = prediction_document(p, pr.host_total([p], None), None)
    assert doc["measured"] is False and doc["stopped_s"] == 0.0 and doc["measured_at"] == ""
    assert prediction_line(doc) == (
        "predicted (stop-first): write 1500 MiB; times not measured; "
        "run `cprdctl check --measure` as root"
    )


def test_the_host_shares_one_disk() -> None:
    """Saved together, stop-first VMs are stopped until the disk wrote them all."""
    a = pr.predict(1000 * MIB, pr.SaveMode.STOP_FIRST, BW)
    b = pr.predict(500 * MIB, pr.SaveMode.STOP_FIRST, BW)
    c = pr.predict(1000 * MIB, pr.SaveMode.LIVE, BW, 0.3)
    host = pr.host_total([a, b, c], BW)
    assert host == {"vms": 3, "bytes": 2500 * MIB, "stopped_s": 2.55, "restore_s": 1.55}
    live_only = pr.host_total([c], BW)
    assert live_only["stopped_s"] == 0.35
    doc = prediction_document(a, host, BW)
    assert (
        prediction_line(doc)
        == "predicted (stop-first): write 1000 MiB, stopped 1.1 s, restore 800 ms"
    )
    assert host_prediction([{"name": "x", "prediction": doc}]) == (
        "host (3 VMs): write 2500 MiB, longest stop 2.5 s, restore all 1.6 s "
        "(state_dir measured 2026-12-01T18:00:00+00:00: write 1000 MiB/s, read 2000 MiB/s)"
    )
    assert host_prediction([{"name": "state_dir", "ok": False, "problems": []}]) is None


@pytest.fixture
def disk_dir() -> Iterator[Path]:
    """A directory on the real disk (/var/tmp), not tmpfs: O_DIRECT is measured there."""
    path = Path(tempfile.mkdtemp(prefix="cprd-bw-", dir="/var/tmp"))
    os.chmod(path, 0o700)
    yield path
    for f in path.iterdir():
        f.unlink()
    path.rmdir()


def test_measure_writes_and_reads_the_disk_then_caches(disk_dir: Path) -> None:
    assert pr.load(disk_dir) is None
    bw = pr.measure(disk_dir, probe_bytes=32 * MIB)
    assert bw.probe_bytes == 32 * MIB and bw.direct_io is True
    # Sanity bounds for any disk this runs on: more than 1 MiB/s, less than 1 TiB/s.
    for rate in (bw.write_bps, bw.read_bps):
        assert MIB < rate < 2**40
    assert os.listdir(disk_dir) == [], "the probe file is removed"
    pr.store(disk_dir, bw)
    cache = disk_dir / pr.CACHE_NAME
    assert stat.S_IMODE(cache.stat().st_mode) == 0o600
    assert pr.load(disk_dir) == bw
    assert json.loads(cache.read_text())["probe_bytes"] == 32 * MIB


GOOD = '{"write_bps": 1, "read_bps": 1, "measured_at": "x", "probe_bytes": 1, "direct_io": true}'


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "[]",
        '{"write_bps": 1}',
        GOOD.replace('"write_bps": 1', '"write_bps": "1"'),
        GOOD.replace('"write_bps": 1', '"write_bps": 0'),
        GOOD.replace('"read_bps": 1', '"read_bps": true'),
        GOOD.replace('"direct_io": true', '"direct_io": 1'),
        GOOD.replace('"measured_at": "x"', '"measured_at": null'),
        "[" * 100_000,
    ],
)
def test_a_bad_cache_is_not_a_measurement(disk_dir: Path, text: str) -> None:
    (disk_dir / pr.CACHE_NAME).write_text(GOOD)
    assert pr.load(disk_dir) == pr.Bandwidth(1.0, 1.0, "x", 1, True)
    (disk_dir / pr.CACHE_NAME).write_text(text)
    assert pr.load(disk_dir) is None


def test_measure_fails_with_one_line(disk_dir: Path) -> None:
    with pytest.raises(pr.MeasureError) as err:
        pr.measure(disk_dir / "missing", probe_bytes=MIB)
    assert str(err.value) == (
        f"cannot measure state_dir {disk_dir}/missing: No such file or directory"
    )
    assert err.value.hint


SITE_OVERRIDE = """<?xml version="1.0"?>
<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <policy group="cprd">
    <allow send_destination="org.cprd.Cprd1"
           send_interface="org.cprd.Cprd1.Manager" send_member="MeasureBandwidth"/>
  </policy>
</busconfig>
"""


async def test_measure_is_root_only_even_when_the_bus_lets_a_member_through(
    vm_dir_root: Path, cprd_accounts: CprdAccounts
) -> None:
    """The second lock: a site policy that (wrongly) lets group cprd call MeasureBandwidth
    gets the call through the bus, and the real daemon refuses it by the caller's uid;
    root's call measures and caches.  Real dbus-daemon (the project's policy plus that
    override), real daemon, no VM."""
    override = vm_dir_root / "zz-site-override.conf"
    override.write_text(SITE_OVERRIDE)
    member = Identity(
        "cprd-test", cprd_accounts.member_uid, cprd_accounts.member_gid, cprd_accounts.member_groups
    )
    with run_dbus_daemon((PROJECT_POLICY, override)) as bus:
        daemon = start_daemon(bus, vm_dir_root)
        try:
            await asyncio.to_thread(daemon.wait_answering)
            (denied,) = await run_client(bus, member, [call("MeasureBandwidth")])
            assert denied == {
                "error": ACCESS_DENIED,
                "text": "MeasureBandwidth writes to state_dir: only root may call it",
            }
            assert not (vm_dir_root / "state" / pr.CACHE_NAME).exists()
            ok = await asyncio.to_thread(daemon.ctl, "check", "--measure")
            assert ok.returncode == 0, ok.stderr + daemon.log.read_text()[-2000:]
            assert pr.load(vm_dir_root / "state") is not None
        finally:
            stop_daemon(daemon)


def test_the_prediction_follows_the_plans_mode() -> None:
    assert pr.save_mode(in_place=True, live=False) is pr.SaveMode.IN_PLACE
    assert pr.save_mode(in_place=False, live=True) is pr.SaveMode.LIVE
    assert pr.save_mode(in_place=False, live=False) is pr.SaveMode.STOP_FIRST
