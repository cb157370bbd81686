"""VMs run as operator systemd units (issue 13 item 5): cprd/units.py decisions and what
cprd-generator writes (cprd/generator.py).

systemd is not PID 1 here, so no unit can be started: the drop-ins the generator writes
are checked with the real ``systemd-analyze verify`` on a real operator unit, and the
generator runs as systemd runs it (a process with an output directory).  Restoring into
the unit for real is tested in the booted virtual host (tests/kexec_e2e, systemd as
PID 1).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from test_manifest import record

from cprd import manifest as mf
from cprd.errors import LaunchError, ManifestError
from cprd.generator import generate, unmounted_mount_point
from cprd.hosts import DiskImage
from cprd.manifest import Manifest, Outcome, Phase
from cprd.plan import plan_vm
from cprd.sysd import Systemd
from cprd.units import (
    CgroupUnit,
    UnitInfo,
    UnitKind,
    UnitRef,
    cgroup_unit,
    decide_unit,
    escape_path,
    exec_line,
    exec_word,
    mount_needs,
    mount_units,
)

ROOT = Path(__file__).resolve().parent.parent
WEB = UnitRef("vm@web.service")


# --- which unit ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0::/system.slice/system-vm.slice/vm@web.service\n", ("vm@web.service", "service")),
        ("0::/system.slice/run-r3f1.service\n", ("run-r3f1.service", "service")),
        ("0::/user.slice/user-0.slice/session-4.scope\n", ("session-4.scope", "session")),
        ("0::/system.slice/run-r9.scope\n", ("run-r9.scope", "scope")),
        (
            "0::/user.slice/user-1000.slice/user@1000.service/app.slice/vm.service\n",
            ("user@1000.service", "user"),
        ),
        ("12:name=systemd:/system.slice/vm@db.service\n0::/\n", ("vm@db.service", "service")),
        ("0::/\n", None),
        ("4:memory:/process_api/70a4\n0::/\n", None),
        ("0::/docker/abc123\n", None),
    ],
)
def test_cgroup_unit(text: str, expected: tuple[str, str] | None) -> None:
    got = cgroup_unit(text)
    assert (None if got is None else (got.name, got.kind.value)) == expected


def test_decide_unit_every_kind() -> None:
    svc = CgroupUnit("vm@web.service", UnitKind.SERVICE)
    d = decide_unit(svc, 100, UnitInfo("vm@web.service", 100, False))
    assert d == decide_unit(svc, 100, UnitInfo("vm@web.service", 100, False))
    assert d.unit == WEB and d.problem is None
    assert d.note == "main process of vm@web.service: restored into it"
    # not the main process: refused, naming the unit and its MainPID
    d = decide_unit(svc, 100, UnitInfo("vm@web.service", 99, False))
    assert d.unit is None
    assert d.problem == (
        "runs in vm@web.service but is not its main process (MainPID 99): cprd can restore "
        "a QEMU only into a unit whose main process it is"
    )
    # systemd did not answer: refused
    assert decide_unit(svc, 100, None).problem == (
        "runs in vm@web.service but systemd does not answer about that unit: cprd cannot "
        "restore it there"
    )
    # transient: re-created with the properties that are set
    props = {
        "Description": "my vm",
        "Slice": "machine.slice",
        "MemoryMax": 2**30,
        "MemoryHigh": 2**64 - 1,  # infinity: not set
        "CPUQuotaPerSecUSec": 500000,
        "Environment": ["A=1"],
        "User": "",
    }
    d = decide_unit(svc, 100, UnitInfo("vm@web.service", 100, True, props))
    assert d.unit == UnitRef(
        "vm@web.service",
        True,
        (
            ("Description", "s", "my vm"),
            ("Slice", "s", "machine.slice"),
            ("Environment", "as", ("A=1",)),
            ("CPUQuotaPerSecUSec", "t", 500000),
            ("MemoryMax", "t", 2**30),
        ),
    )
    # scopes, sessions, a user's manager: handled by cprd's launcher, noted
    for name, kind, where in [
        ("session-4.scope", UnitKind.SESSION, "login session scope session-4.scope"),
        ("run-r9.scope", UnitKind.SCOPE, "scope run-r9.scope"),
        ("user@1000.service", UnitKind.USER, "the user manager user@1000.service"),
    ]:
        d = decide_unit(CgroupUnit(name, kind), 100, None)
        assert d.unit is None and d.problem is None
        assert d.note == (
            f"runs in {where}: restored by cprd's launcher (restore.launcher), outside it"
        )
    # cprd's own units: its launchers' business
    for own in ("cprd-restore.service", "cprd-vm-web.service"):
        assert decide_unit(CgroupUnit(own, UnitKind.SERVICE), 100, None).unit is None
        assert decide_unit(CgroupUnit(own, UnitKind.SERVICE), 100, None).problem is None


def test_plan_refuses_a_qemu_that_is_not_its_units_main_process() -> None:
    from test_plan import facts

    from cprd.config import SaveSettings, VMSettings

    f = facts().replace(
        cgroup="0::/system.slice/vm@web.service\n",
        unit_info=UnitInfo("vm@web.service", 1, False),
    )
    plan = plan_vm(f, VMSettings(), SaveSettings(), "ext4")
    assert any("is not its main process (MainPID 1)" in p for p in plan.problems)
    ok = f.replace(unit_info=UnitInfo("vm@web.service", f.pid, False))
    plan = plan_vm(ok, VMSettings(), SaveSettings(), "ext4")
    assert plan.problems == ()
    assert "main process of vm@web.service: restored into it" in plan.notes


def test_a_unit_vm_is_moved_through_a_file() -> None:
    """cpr-transfer would start the new QEMU outside the operator's unit."""
    from test_plan import MEMFD, facts

    from cprd.plan import transfer_path

    f = facts(backends=(MEMFD,), aux_ram_share=True)
    assert transfer_path(f, (10, 0, 2))[0] is True
    f = f.replace(
        cgroup="0::/system.slice/vm@web.service\n",
        unit_info=UnitInfo("vm@web.service", f.pid, False),
    )
    assert transfer_path(f, (10, 0, 2)) == (
        False,
        "main process of vm@web.service: saved to a file and restored into it",
    )


def test_manifest_round_trip_with_unit(tmp_path: Path) -> None:
    transient = UnitRef("run-x.service", True, (("Environment", "as", ("A=1", "B=2")),))
    m = Manifest.new(
        Phase.COMMITTED,
        (record(tmp_path, unit=WEB), record(tmp_path, "db", unit=transient), record(tmp_path, "x")),
    )
    mf.write(tmp_path / "s" / "manifest.yaml", m)
    assert mf.read(tmp_path / "s" / "manifest.yaml") == m


@pytest.mark.parametrize(
    ("unit", "error"),
    [
        ({"name": "../etc.service", "transient": False, "properties": []}, "not a service name"),
        ({"name": "a.scope", "transient": False, "properties": []}, "not a service name"),
        (
            {"name": "a.service", "transient": True, "properties": [{"name": "ExecStart"}]},
            "not a property cprd sets",
        ),
    ],
)
def test_manifest_refuses_a_bad_unit(tmp_path: Path, unit: dict[str, object], error: str) -> None:
    data = mf.to_dict(Manifest.new(Phase.COMMITTED, (record(tmp_path),)))
    data["vms"][0]["unit"] = unit
    with pytest.raises(ManifestError, match=error):
        mf.from_dict(data, "m")


# --- what the generator writes --------------------------------------------------------------


@pytest.mark.parametrize(
    ("word", "quoted"),
    [
        ("-m", "-m"),
        ("file,id=s,path=/var/lib/x.serial", "file,id=s,path=/var/lib/x.serial"),
        ("a b", '"a b"'),
        ("$HOME%n", '"$$HOME%%n"'),
        ('q"\\', '"q\\"\\\\"'),
        ('{"x": 1}', '"{\\"x\\": 1}"'),
        ("a\udcff\n", '"a\\xff\\n"'),  # not UTF-8 (surrogateescape): its byte
    ],
)
def test_exec_word(word: str, quoted: str) -> None:
    assert exec_word(word) == quoted


def committed(tmp: Path, **kw: object) -> Manifest:
    argv = (
        "qemu-system-x86_64", "-machine", "q35", "-name", "web", "-daemonize",
        "-drive", "file=/srv/images/web.qcow2,if=virtio",
        "-qmp", "unix:/run/cprd/qmp/web.sock,server=on,wait=off",
        "-kernel", "/boot/vmlinuz", "-append", "console=ttyS0 root=/dev/vda",
    )  # fmt: skip
    base: dict[str, object] = dict(
        argv=argv,
        unit=WEB,
        qmp_socket="/run/cprd/qmp/web.sock",
        state_file=f"{tmp}/state/web.state",
        disks=(DiskImage("/srv/images/web.qcow2", 1, 2, 3, 4),),
        in_place=(),
    )
    base.update(kw)
    rec = record(tmp, "web", **base)
    other = record(tmp, "plain", in_place=(), state_file=f"{tmp}/state/plain.state")
    return Manifest.new(Phase.COMMITTED, (rec, other))


def test_generate_dropin_and_needs(tmp_path: Path) -> None:
    files = generate(committed(tmp_path), "/var/lib/cprd/manifest.yaml")
    assert sorted(files) == [
        "cprd-restore.service.d/50-cprd-needs.conf",
        "vm@web.service.d/50-cprd-restore.conf",
    ]
    dropin = files["vm@web.service.d/50-cprd-restore.conf"]
    body = [ln for ln in dropin.splitlines() if not ln.startswith("#")]
    assert body == [
        "[Unit]",
        "ConditionPathExists=/run/cprd/restoring/%n",
        "[Service]",
        "Type=exec",
        "Restart=no",
        "ExecStart=",
        "ExecStart=@/usr/bin/qemu-system-x86_64 qemu-system-x86_64 -machine pc-q35-10.0 "
        "-name web -drive file=/srv/images/web.qcow2,if=virtio "
        "-qmp unix:/run/cprd/qmp/web.sock,server=on,wait=off -kernel /boot/vmlinuz "
        '-append "console=ttyS0 root=/dev/vda" -incoming defer',
    ]
    needs = files["cprd-restore.service.d/50-cprd-needs.conf"].splitlines()
    paths = [
        "/var/lib/cprd/manifest.yaml",
        f"{tmp_path}/state/web.state",
        "/usr/bin/qemu-system-x86_64",
        "/run/cprd/qmp/web.sock",
        "/srv/images/web.qcow2",
        "/boot/vmlinuz",
        f"{tmp_path}/state/plain.state",
        f"{tmp_path}/plain.sock",
    ]
    units = mount_units(paths)
    assert "srv-images.mount" in units and "boot.mount" in units
    # Wants= + After=, never Requires: a mount that fails costs only its VMs' restores.
    assert [ln for ln in needs if not ln.startswith("#")] == [
        "[Unit]",
        *(line for u in units for line in (f"Wants={u}", f"After={u}")),
    ]
    assert not any("Requires" in ln for ln in needs)


@pytest.mark.parametrize(
    ("change", "phase"),
    [
        ({"outcome": Outcome.RESTORED}, Phase.COMMITTED),
        ({"state_size": None}, Phase.COMMITTED),
        ({"shutdown_asked": True}, Phase.COMMITTED),
        ({"unit": UnitRef("run-u1.service", True)}, Phase.COMMITTED),
        ({}, Phase.PREPARED),
        ({}, Phase.RESTORED),
    ],
)
def test_no_dropin_without_a_state_to_restore(
    tmp_path: Path, change: dict[str, object], phase: Phase
) -> None:
    m = committed(tmp_path, **change).replace(phase=phase)
    files = generate(m, "/m")
    assert not any(k.startswith("vm@web") for k in files)


def test_a_failure_of_this_boot_leaves_the_unit_as_written(tmp_path: Path) -> None:
    m = committed(tmp_path, outcome=Outcome.FAILED)
    assert "vm@web.service.d/50-cprd-restore.conf" in generate(m, "/m")
    assert "vm@web.service.d/50-cprd-restore.conf" not in generate(m, "/m", {"vm@web.service"})
    # a pending VM (a new commit) is held back whatever an older failure marked
    m = committed(tmp_path)
    assert "vm@web.service.d/50-cprd-restore.conf" in generate(m, "/m", {"vm@web.service"})


def test_mount_needs_leaves_out_what_systemd_cannot_take() -> None:
    assert mount_needs(["/a", "/dev/vda", "/proc/x", "/a", "/b c", "rel", '/q"', "/ok%"]) == [
        "/a",
        "/ok%",
    ]


def test_dropin_verifies_with_systemd(tmp_path: Path) -> None:
    """The real ``systemd-analyze verify`` on an operator's template unit with the
    generator's drop-in (ExecStart quoting, Condition, Type=exec)."""
    units = tmp_path / "units"
    (units / "vm@.service.d").mkdir(parents=True)
    (units / "vm@.service").write_text(
        "[Unit]\nDescription=VM %i\n[Service]\nExecStart=/usr/bin/qemu-system-x86_64 -name %i\n"
        "MemoryMax=1G\n[Install]\nWantedBy=multi-user.target\n"
    )
    files = generate(committed(tmp_path), "/var/lib/cprd/manifest.yaml")
    (units / "vm@web.service.d").mkdir()
    (units / "vm@web.service.d" / "50-cprd-restore.conf").write_text(
        files["vm@web.service.d/50-cprd-restore.conf"]
    )
    r = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", "--recursive-errors=no", "vm@web.service"],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "SYSTEMD_UNIT_PATH": f"{units}:"},
        cwd=units,
    )
    assert r.returncode == 0, r.stderr
    assert "Unknown" not in r.stderr and "Failed to parse" not in r.stderr, r.stderr


def test_exec_line_keeps_argv0() -> None:
    assert exec_line("/usr/bin/q", ["qemu", "-m", "1G"]) == "@/usr/bin/q qemu -m 1G"


# --- the generator as systemd runs it --------------------------------------------------------


def generator(tmp: Path, config: Path) -> subprocess.CompletedProcess[str]:
    """cprd-generator as a process: ``units/cprd-generator OUT EARLY LATE``."""
    out = tmp / "out"
    out.mkdir(exist_ok=True)
    return subprocess.run(
        [sys.executable, "-c", "import sys; from cprd.generator import run; "
         f"sys.exit(run(sys.argv[1:], config_path=__import__('pathlib').Path({str(config)!r}), "
         f"failed_dir=__import__('pathlib').Path({str(tmp / 'failed')!r})))",
         str(out), str(tmp / "early"), str(tmp / "late")],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=60,
    )  # fmt: skip


def test_generator_writes_the_dropins(tmp_path: Path) -> None:
    state = tmp_path / "state"
    config = tmp_path / "cprd.yaml"
    config.write_text(f"state_dir: {state}\n")
    mf.write(state / "manifest.yaml", committed(tmp_path))
    r = generator(tmp_path, config)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out"
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*.conf"))
    assert written == [
        "cprd-restore.service.d/50-cprd-needs.conf",
        "vm@web.service.d/50-cprd-restore.conf",
    ]
    assert (out / written[1]).read_text() == generate(
        committed(tmp_path), str(state / "manifest.yaml")
    )[written[1]]
    assert "cprd-generator: wrote vm@web.service.d/50-cprd-restore.conf" in r.stderr
    # a failure marked in this boot: nothing for that unit at the next daemon-reload
    mf.write(state / "manifest.yaml", committed(tmp_path, outcome=Outcome.FAILED))
    (tmp_path / "failed").mkdir()
    (tmp_path / "failed" / "vm@web.service").touch()
    for p in sorted(out.rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    r = generator(tmp_path, config)
    assert r.returncode == 0
    assert not (out / "vm@web.service.d").exists()


def test_one_vms_argv_costs_no_other_vms_dropin(tmp_path: Path) -> None:
    """A QEMU's argv is bytes its user (or a compromised QEMU) chose, not text: a word
    that is not UTF-8 (read with surrogateescape) reaches the drop-in as its very bytes
    (``\\xff``), and every VM keeps its drop-in; a path systemd cannot take is left out
    of RequiresMountsFor=."""
    state = tmp_path / "state"
    config = tmp_path / "cprd.yaml"
    config.write_text(f"state_dir: {state}\n")
    bad = "console=ttyS0 \udcff"  # the byte 0xff, as vm.read_argv decodes it
    web = committed(tmp_path, argv=("qemu", "-append", bad, "-kernel", "/srv/k\udcfe"))
    db = record(tmp_path, "db", unit=UnitRef("vm@db.service"), state_file=f"{state}/db.state")
    odd = record(  # a lone surrogate stands for no byte: that VM alone gets no drop-in
        tmp_path, "odd", unit=UnitRef("vm@odd.service"), argv=("qemu", "-name", "\ud800")
    )
    mf.write(state / "manifest.yaml", web.replace(vms=(*web.vms, db, odd)))
    r = generator(tmp_path, config)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out"
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.conf")) == [
        "cprd-restore.service.d/50-cprd-needs.conf",
        "vm@db.service.d/50-cprd-restore.conf",
        "vm@web.service.d/50-cprd-restore.conf",
    ], r.stderr
    web_dropin = (out / "vm@web.service.d/50-cprd-restore.conf").read_text()
    assert '-append "console=ttyS0 \\xff" -kernel "/srv/k\\xfe"' in web_dropin
    assert "srv-k" not in (out / "cprd-restore.service.d/50-cprd-needs.conf").read_text()
    assert "cprd-generator: VM 'odd': no drop-in for vm@odd.service: argument" in r.stderr


@pytest.mark.parametrize("damage", ["corrupt", "unreadable", "no-state-dir", "bad-config"])
def test_generator_never_fails_the_boot(tmp_path: Path, damage: str) -> None:
    """A bad manifest, an unreadable one, a state_dir not mounted yet, a bad config:
    nothing written, exit 0, one line on stderr saying why."""
    state = tmp_path / "state"
    config = tmp_path / "cprd.yaml"
    config.write_text(f"state_dir: {state}\n")
    path = state / "manifest.yaml"
    mf.write(path, committed(tmp_path))
    if damage == "corrupt":
        path.write_bytes(path.read_bytes().replace(b"vm@web", b"vm@bad"))
    elif damage == "unreadable":
        path.unlink()
        path.mkdir()  # not a regular file: open/read fails
    elif damage == "no-state-dir":
        # state_dir on a file system /etc/fstab names and that is not mounted: the real
        # check reads the real /etc/fstab, so the pure function is tested below and here
        # a state_dir that merely does not exist yet (a fresh install) is silent
        config.write_text(f"state_dir: {tmp_path}/not-created/cprd\n")
    else:
        config.write_text("state_dir: [1\n")
    r = generator(tmp_path, config)
    assert r.returncode == 0
    assert list((tmp_path / "out").iterdir()) == []
    lines = r.stderr.strip().splitlines()
    if damage == "no-state-dir":
        assert lines == []
        return
    assert len(lines) == 1 and lines[0].startswith("cprd-generator: "), r.stderr
    expected = {
        "corrupt": "checksum mismatch: nothing written",
        "unreadable": "nothing written",
        "bad-config": "nothing written",
    }[damage]
    assert expected in lines[0]


def test_unmounted_mount_point() -> None:
    fstab = "# /etc/fstab\nUUID=1 / ext4 defaults 0 1\nUUID=2 /var ext4 defaults 0 2\n"
    fstab += "UUID=3 /var/lib/cprd xfs defaults 0 2\nnfs:/x /srv nfs defaults 0 0\n"
    mountinfo = "22 1 8:1 / / rw - ext4 /dev/sda1 rw\n"
    m = "/var/lib/cprd/manifest.yaml"
    assert unmounted_mount_point(m, fstab, mountinfo) == "/var/lib/cprd"
    mountinfo += "23 22 8:3 / /var/lib/cprd rw - xfs /dev/sda3 rw\n"
    assert unmounted_mount_point(m, fstab, mountinfo) is None
    assert unmounted_mount_point("/var/x", fstab, mountinfo) == "/var"
    assert unmounted_mount_point("/opt/m", fstab, mountinfo) is None


def test_mount_units_are_systemds_names() -> None:
    """The escaping matches systemd-escape --path (a wrong name would order nothing)."""
    paths = ["/var/lib/my-vm/.x/a b", "/srv/vm.img", "/mnt/ü"]
    for path in paths:
        r = subprocess.run(
            ["systemd-escape", "--path", path], capture_output=True, text=True, check=True
        )
        assert escape_path(path) == r.stdout.strip()
    assert mount_units(["/srv/vm.img", "/srv/b"]) == [
        "srv.mount",
        "srv-vm.img.mount",
        "srv-b.mount",
    ]


@pytest.mark.parametrize(
    ("props", "argv", "said"),
    [
        ([("Description", "s", "vm\n[Service]")], ["qemu"], "Description 'vm\\n[Service]'"),
        ([("Environment", "as", ["A=1", "B=2\rExecStopPost=+/x"])], ["qemu"], "Environment"),
        ([], ["qemu", "-name", "vm\nExecStopPost=+/tmp/x"], "argv word"),
    ],
)
def test_transient_unit_never_gets_a_control_character(
    props: list[tuple[str, str, Any]], argv: list[str], said: str
) -> None:
    """systemd writes a transient unit to a file it reads again at each daemon-reload: a
    newline in a property or an argv word would add a line (run as root). Refused before
    anything reaches the bus (the address here leads nowhere: nothing is sent)."""
    sd = Systemd("unix:path=/nonexistent/bus")
    with pytest.raises(LaunchError, match="has a control character") as err:
        asyncio.run(sd.start_transient("vm.service", props, "/usr/bin/qemu", argv))
    assert said in str(err.value)
