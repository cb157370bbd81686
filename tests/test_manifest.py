"""The manifest on disk, and the restore's pure argv rewrite and file checks."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from cprd import manifest as mf
from cprd.errors import ManifestError, RestoreError
from cprd.hosts import relaunch_argv
from cprd.manifest import InPlaceFile, Manifest, Outcome, Phase, VMRecord
from cprd.plan import MigrationSettings
from cprd.restore import check_files, restore_waves

SETTINGS = MigrationSettings({"x-ignore-shared": True}, {"mode": "cpr-reboot"})


def record(tmp: Path, name: str = "web1", **kw: object) -> VMRecord:
    base: dict[str, object] = dict(
        name=name,
        qmp_socket=f"{tmp}/{name}.sock",
        pid=4242,
        argv=("qemu-system-x86_64", "-machine", "q35", "-name", name),
        executable="/usr/bin/qemu-system-x86_64",
        qemu_version="10.0.2",
        machine_type="pc-q35-10.0",
        state_file=f"{tmp}/{name}.state",
        settings=SETTINGS,
        runstate_before="running",
        cprd_suspended=False,
        agent_socket=None,
        in_place=(InPlaceFile("ram0", f"{tmp}/ram0", 4096),),
        state_size=3,
    )
    base.update(kw)
    return VMRecord(**base)  # type: ignore[arg-type]


def test_round_trip_and_modes(tmp_path: Path) -> None:
    state = tmp_path / "state"
    m = Manifest.new(
        Phase.PREPARED,
        (record(tmp_path, restore_priority=-7), record(tmp_path, "we ird/../x\n")),
    )
    mf.write(state / "manifest.yaml", m)
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(state / "manifest.yaml").st_mode) == 0o600
    assert mf.read(state / "manifest.yaml") == m
    assert os.listdir(state) == ["manifest.yaml"]
    assert b"priority: -7" in (state / "manifest.yaml").read_bytes()


@pytest.mark.parametrize("cut", [1, 50, -80, -2])
def test_truncated_manifest_is_refused(tmp_path: Path, cut: int) -> None:
    path = tmp_path / "manifest.yaml"
    mf.write(path, Manifest.new(Phase.COMMITTED, (record(tmp_path), record(tmp_path, "db"))))
    data = path.read_bytes()
    path.write_bytes(data[:cut] if cut > 0 else data[: len(data) + cut])
    with pytest.raises(ManifestError, match=r"truncated or corrupt|checksum mismatch"):
        mf.read(path)


def test_edited_manifest_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "manifest.yaml"
    mf.write(path, Manifest.new(Phase.COMMITTED, (record(tmp_path),)))
    path.write_bytes(path.read_bytes().replace(b"web1", b"web2"))
    with pytest.raises(ManifestError) as err:
        mf.read(path)
    assert str(err.value) == f"manifest {path} is corrupt: checksum mismatch"


def _resign(path: Path, body: bytes) -> None:
    import hashlib

    path.write_bytes(body + b"# sha256: " + hashlib.sha256(body).hexdigest().encode() + b"\n")


def test_unknown_version_and_bad_fields(tmp_path: Path) -> None:
    path = tmp_path / "manifest.yaml"
    good = mf.dumps(Manifest.new(Phase.COMMITTED, (record(tmp_path),)))
    body = good[: good.rindex(b"# sha256")]
    _resign(path, body.replace(b"version: 2", b"version: 7"))
    with pytest.raises(ManifestError) as err:
        mf.read(path)
    assert str(err.value) == f"manifest {path} has version 7; this cprd reads version 2"
    _resign(path, body.replace(b"phase: committed", b"phase: exploded"))
    with pytest.raises(ManifestError) as err:
        mf.read(path)
    assert str(err.value) == f"manifest {path} is corrupt: phase: unknown value 'exploded'"
    _resign(path, body.replace(b"pid: 4242", b"pid: many"))
    with pytest.raises(ManifestError) as err:
        mf.read(path)
    assert str(err.value) == f"manifest {path} is corrupt: vms[0].pid: unexpected value 'many'"
    # restore.priority is optional (manifests before it have none: 0), typed when present
    _resign(path, body.replace(b"  priority: 0\n", b""))
    assert mf.read(path).vms[0].restore_priority == 0
    _resign(path, body.replace(b"priority: 0", b"priority: first"))
    with pytest.raises(ManifestError) as err:
        mf.read(path)
    assert str(err.value) == (
        f"manifest {path} is corrupt: vms[0].restore.priority: unexpected value 'first'"
    )
    _resign(path, body.replace(b"machine_type: pc-q35-10.0", b"machine_type: pc,accel=kvm"))
    with pytest.raises(ManifestError) as err:
        mf.read(path)
    assert str(err.value) == (
        f"manifest {path} is corrupt: vms[0].machine_type: not a machine type: 'pc,accel=kvm'"
    )
    _resign(path, b"- just\n- a list\n")
    with pytest.raises(ManifestError, match="top level: not a mapping"):
        mf.read(path)


def test_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(ManifestError) as err:
        mf.read(tmp_path / "manifest.yaml")
    assert str(err.value) == f"no manifest at {tmp_path}/manifest.yaml: nothing to restore"


def test_symlinks_are_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(ManifestError, match="is a symlink: refused"):
        mf.ensure_state_dir(link)
    target = tmp_path / "elsewhere.yaml"
    mf.write(target, Manifest.new(Phase.COMMITTED, ()))
    (real / "manifest.yaml").symlink_to(target)
    with pytest.raises(ManifestError, match="is a symlink: refused"):
        mf.read(real / "manifest.yaml")
    with pytest.raises(ManifestError, match="is a symlink: refused"):
        mf.write(real / "manifest.yaml", Manifest.new(Phase.COMMITTED, ()))
    (real / "x.state").symlink_to(target)
    with pytest.raises(ManifestError, match="is a symlink or not a regular file: refused"):
        mf.create_private(real / "x.state")
    assert target.exists()


def test_safe_file_names() -> None:
    assert mf.safe_file_name("web1") == "web1"
    for hostile in ("../etc/passwd", "a/b", "..", ".hidden", "two words", "new\nline", ""):
        name = mf.safe_file_name(hostile)
        assert "/" not in name and "\n" not in name and " " not in name
        assert name and not name.startswith(".")
    assert mf.safe_file_name("a/b") != mf.safe_file_name("a_b")


def test_relaunch_argv_pins_machine_and_defers_incoming() -> None:
    argv = ["qemu", "-machine", "q35,accel=tcg", "-incoming", "tcp:0:4444", "-m", "1G"]
    assert relaunch_argv(argv, "pc-q35-10.0") == [
        "qemu",
        "-machine",
        "pc-q35-10.0,accel=tcg",
        "-m",
        "1G",
        "-incoming",
        "defer",
    ]
    assert relaunch_argv(["qemu", "-M", "type=pc,hpet=off"], "pc-i440fx-10.0") == [
        "qemu",
        "-M",
        "type=pc-i440fx-10.0,hpet=off",
        "-incoming",
        "defer",
    ]
    assert relaunch_argv(["qemu", "--machine=q35", "-incoming=defer"], "pc-q35-9.2") == [
        "qemu",
        "--machine=pc-q35-9.2",
        "-incoming",
        "defer",
    ]
    assert relaunch_argv(["qemu", "-machine", "accel=tcg"], "pc-q35-10.0") == [
        "qemu",
        "-machine",
        "pc-q35-10.0,accel=tcg",
        "-incoming",
        "defer",
    ]
    assert relaunch_argv(["qemu", "-m", "1G"], "pc-q35-10.0") == [
        "qemu",
        "-m",
        "1G",
        "-machine",
        "pc-q35-10.0",
        "-incoming",
        "defer",
    ]


def test_check_files_refusals(tmp_path: Path) -> None:
    rec = record(tmp_path)
    with pytest.raises(RestoreError) as err:
        check_files(rec, tmp_path)
    assert str(err.value) == f"web1: state file {tmp_path}/web1.state is missing"
    Path(rec.state_file).write_bytes(b"abcd")
    with pytest.raises(RestoreError) as err:
        check_files(rec, tmp_path)
    assert str(err.value) == f"web1: state file {tmp_path}/web1.state has 4 bytes, expected 3"
    Path(rec.state_file).write_bytes(b"abc")
    with pytest.raises(RestoreError) as err:
        check_files(rec, tmp_path)
    assert str(err.value).startswith(f"web1: in-place memory {tmp_path}/ram0 (ram0) is gone")
    Path(f"{tmp_path}/ram0").write_bytes(b"\0" * 4096)
    check_files(rec, tmp_path)
    with pytest.raises(RestoreError) as err:
        check_files(rec.replace(executable="/nonexistent/qemu"), tmp_path)
    assert str(err.value) == "web1: QEMU executable /nonexistent/qemu is missing"
    with pytest.raises(RestoreError, match="never saved completely"):
        check_files(rec.replace(state_size=None), tmp_path)
    os.unlink(rec.state_file)
    os.symlink(f"{tmp_path}/ram0", rec.state_file)
    with pytest.raises(RestoreError, match="is a symlink: refused"):
        check_files(rec, tmp_path)
    assert rec.outcome is Outcome.PENDING


def test_restore_waves_priority_then_smallest_state(tmp_path: Path) -> None:
    """Higher restore_priority first, each priority a wave of its own; within a wave the
    smallest state first, then by name."""

    def rec(name: str, prio: int, size: int | None) -> VMRecord:
        return record(tmp_path, name, restore_priority=prio, state_size=size)

    recs = [
        rec("web2", 0, 500),
        rec("batch", -5, 10),
        rec("db", 10, 900),
        rec("web1", 0, 500),
        rec("dns", 10, 3),
        rec("inplace", 0, 2),
        rec("off", 0, None),  # shut down before the kexec: cold boot, no state to read
    ]
    assert restore_waves(recs) == [
        ["dns", "db"],
        ["off", "inplace", "web1", "web2"],
        ["batch"],
    ]
    assert restore_waves([]) == []


def test_sweep_removes_what_a_killed_writer_left(tmp_path: Path) -> None:
    """A daemon killed between creating its temporary manifest and renaming it leaves
    ``.manifest.yaml.<pid>.tmp``; the next start removes it (make faults found one left
    in state_dir after a SIGKILL mid-save). A live writer's file, a file from before
    this boot and files that are not the manifest's temporaries are told apart."""
    import subprocess

    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    path = state / "manifest.yaml"
    mf.write(path, Manifest.new(Phase.PREPARING, ()))
    dead = subprocess.Popen(["true"])
    dead.wait()
    live = subprocess.Popen(["sleep", "60"])
    try:
        names = {
            "dead": f".manifest.yaml.{dead.pid}.tmp",
            "live": f".manifest.yaml.{live.pid}.tmp",
            "live_before_boot": f".manifest.yaml.{os.getppid()}.tmp",
            "other": f".other.yaml.{dead.pid}.tmp",
            "odd": ".manifest.yaml.x.tmp",
        }
        for name in names.values():
            (state / name).write_bytes(b"half")
        os.utime(state / names["live_before_boot"], (1, 1))
        removed = mf.sweep_temporaries(path)
        assert sorted(removed) == sorted([names["dead"], names["live_before_boot"]])
        left = sorted(os.listdir(state))
        assert left == sorted([names["live"], names["other"], names["odd"], "manifest.yaml"])
        assert mf.read(path).phase is Phase.PREPARING
    finally:
        live.kill()
        live.wait()
