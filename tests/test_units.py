"""The systemd units, the logind drop-in and the journal catalog in units/.

systemd is installed here but is not PID 1, so the units cannot be started: they are
checked with the real ``systemd-analyze verify`` / ``systemd-analyze security
--offline=yes`` and the catalog is compiled with the real ``journalctl
--update-catalog`` into a scratch root. What only a running systemd could show (the
shutdown order actually taken, the sandbox as the daemon sees it) is asserted on the
unit files' settings instead.
"""

from __future__ import annotations

import configparser
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from cprd.config import Config, SaveSettings
from cprd.log import Event

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "units"
VENV_BIN = ROOT / ".venv" / "bin"
SERVICES = ("cprd.service", "cprd-restore.service", "cprd-kexec-guard.service")
MAX_EXPOSURE = 2.0  # issue 14: systemd-analyze security stays <= 2.0

Unit = dict[str, dict[str, list[str]]]


def parse_unit(path: Path) -> Unit:
    """Sections -> key -> every value given, in order (systemd's list settings repeat)."""
    unit: Unit = {}
    section: dict[str, list[str]] | None = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        assert not line.endswith("\\"), f"{path.name}: line continuations are not parsed here"
        if line.startswith("[") and line.endswith("]"):
            section = unit.setdefault(line[1:-1], {})
            continue
        assert section is not None, f"{path.name}: {line!r} outside a section"
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not a key=value line: {line!r}"
        section.setdefault(key.strip(), []).append(value.strip())
    return unit


def words(unit: Unit, section: str, key: str) -> list[str]:
    """All space-separated words of a (possibly repeated) setting."""
    return [w for value in unit.get(section, {}).get(key, []) for w in value.split()]


def single(unit: Unit, section: str, key: str) -> str:
    values = unit.get(section, {}).get(key, [])
    assert len(values) == 1, f"[{section}] {key}: expected one value, got {values}"
    return values[0]


def stage(tmp_path: Path) -> Path:
    """units/ copied with /usr/bin/cprd{,ctl} pointing at the venv's console scripts.

    verify refuses an ExecStart= whose binary does not exist, and the .deb that puts
    them in /usr/bin is not installed here.
    """
    for script in ("cprd", "cprdctl"):
        assert (VENV_BIN / script).is_file(), f"{VENV_BIN / script} missing: run make setup"
    staged = tmp_path / "units"
    shutil.copytree(UNITS, staged)
    for service in SERVICES:
        path = staged / service
        text = re.sub(r"/usr/bin/(cprdctl|cprd)\b", rf"{VENV_BIN}/\1", path.read_text())
        path.write_text(text)
    return staged


def verify(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", "verify", "--man=no", "--recursive-errors=no", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


# --- systemd-analyze ---------------------------------------------------------------------


@pytest.mark.parametrize("service", SERVICES)
def test_unit_verifies_clean(tmp_path: Path, service: str) -> None:
    staged = stage(tmp_path)
    assert str(VENV_BIN) in (staged / service).read_text()
    result = verify(staged / service)
    output = result.stdout + result.stderr
    ours = [
        line
        for line in output.splitlines()
        if service in line or "cprd" in line or str(tmp_path) in line
    ]
    assert result.returncode == 0, output
    assert ours == []


def test_verify_catches_missing_binary(tmp_path: Path) -> None:
    """The rewrite above is what makes verify pass: the /usr/bin paths are checked."""
    if Path("/usr/bin/cprd").exists():
        pytest.skip("cprd is installed in /usr/bin")
    shutil.copy(UNITS / "cprd.service", tmp_path / "cprd.service")
    result = verify(tmp_path / "cprd.service")
    assert result.returncode != 0
    assert "cprd.service: Command /usr/bin/cprd is not executable" in result.stderr


def test_vm_unit_dropin_applies_to_every_transient_vm_unit(tmp_path: Path) -> None:
    """cprd-vm-.service.d/ is read for cprd-vm-<name>.service, and cprd.conf is clean.

    A probe conf with an unknown key next to cprd.conf shows that verify loaded that
    directory for a unit named like the systemd launcher's transient units.
    """
    staged = stage(tmp_path)
    dropins = staged / "cprd-vm-.service.d"
    (staged / "cprd-vm-web1.service").write_text("[Service]\nExecStart=/bin/true\n")
    clean = verify(staged / "cprd-vm-web1.service")
    assert clean.returncode == 0, clean.stderr
    assert clean.stdout + clean.stderr == ""
    (dropins / "zz-probe.conf").write_text("[Unit]\nCprdProbe=1\n")
    probed = verify(staged / "cprd-vm-web1.service")
    assert "zz-probe.conf:2: Unknown key 'CprdProbe'" in probed.stderr
    assert "cprd.conf" not in probed.stderr
    dropin = parse_unit(dropins / "cprd.conf")
    assert words(dropin, "Unit", "Before") == ["cprd-kexec-guard.service"]


def test_daemon_exposure(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    staged = stage(tmp_path)
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(staged / "cprd.service")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    match = re.search(r"Overall exposure level for cprd\.service: (\d+\.\d+)", result.stdout)
    assert match, result.stdout
    exposure = float(match.group(1))
    with capsys.disabled():
        print(f"\ncprd.service: overall exposure level {exposure} (limit {MAX_EXPOSURE})")
    assert exposure <= MAX_EXPOSURE


# --- what the settings must keep ---------------------------------------------------------


def test_daemon_sandbox_still_reaches_what_cprd_needs() -> None:
    unit = parse_unit(UNITS / "cprd.service")
    svc = unit["Service"]
    assert single(unit, "Service", "Type") == "notify"
    assert single(unit, "Service", "BusName") == "org.cprd.Cprd1"
    assert single(unit, "Service", "NotifyAccess") == "main"
    assert single(unit, "Service", "ExecStart") == "/usr/bin/cprd"
    assert single(unit, "Service", "Restart") == "on-failure"
    # /proc of every QEMU (and /proc/sys/kernel/random/boot_id) must stay visible.
    assert "ProtectProc" not in svc
    assert "ProcSubset" not in svc
    # /dev/daxX.Y for in-place memory: a private /dev would hide it.
    assert "PrivateDevices" not in svc
    assert single(unit, "Service", "DevicePolicy") == "closed"
    assert words(unit, "Service", "DeviceAllow") == ["char-dax", "rw"]
    # The QMP sockets are AF_UNIX; the daemon never opens any other kind.
    assert words(unit, "Service", "RestrictAddressFamilies") == ["AF_UNIX"]
    # state_dir writable and private; the default state_dir is the one in cprd.config.
    assert single(unit, "Service", "StateDirectory") == Config().state_dir.name
    assert Config().state_dir == Path("/var/lib") / Config().state_dir.name
    assert single(unit, "Service", "StateDirectoryMode") == "0700"
    assert single(unit, "Service", "ProtectSystem") == "strict"
    assert single(unit, "Service", "ProtectHome") == "read-only"
    # Other users' QEMUs: /proc/<pid>/exe, their sockets and memory files, signals.
    assert set(words(unit, "Service", "CapabilityBoundingSet")) == {
        "CAP_SYS_PTRACE",
        "CAP_DAC_OVERRIDE",
        "CAP_DAC_READ_SEARCH",
        "CAP_KILL",
        "CAP_CHOWN",  # cpr-transfer: a non-root QEMU's socket directory is given to it
    }
    assert single(unit, "Service", "RuntimeDirectory") == "cprd-transfer"
    assert single(unit, "Service", "RuntimeDirectoryMode") == "0711"
    assert "User" not in svc
    assert "DynamicUser" not in svc


def test_restore_unit_leaves_qemu_alone() -> None:
    """QEMUs started by the direct launcher inherit this unit: no sandbox, no cgroup kill."""
    unit = parse_unit(UNITS / "cprd-restore.service")
    sandbox = {
        "ProtectSystem",
        "ProtectHome",
        "PrivateTmp",
        "PrivateDevices",
        "PrivateNetwork",
        "DevicePolicy",
        "NoNewPrivileges",
        "MemoryDenyWriteExecute",
        "SystemCallFilter",
        "CapabilityBoundingSet",
        "RestrictAddressFamilies",
        "RestrictNamespaces",
        "IPAddressDeny",
        "User",
        "DynamicUser",
    }
    assert sandbox.isdisjoint(unit["Service"])
    assert single(unit, "Service", "Type") == "oneshot"
    assert single(unit, "Service", "KillMode") == "process"
    assert single(unit, "Service", "ExecStart") == "/usr/bin/cprd restore"
    assert single(unit, "Unit", "ConditionPathExists") == str(Config().manifest_path)


# --- ordering ----------------------------------------------------------------------------


def test_restore_runs_before_the_daemon_and_vm_managers() -> None:
    """A QMP socket serves one client: the restore must be done before cprd grabs them."""
    restore = parse_unit(UNITS / "cprd-restore.service")
    daemon = parse_unit(UNITS / "cprd.service")
    before = set(words(restore, "Unit", "Before"))
    assert {"cprd.service", "libvirtd.service", "libvirt-guests.service"} <= before
    assert "cprd-restore.service" in words(daemon, "Unit", "After")
    assert "cprd.service" not in words(restore, "Unit", "After")


def test_guard_stops_before_the_daemon_and_every_vm() -> None:
    """Units stop in reverse order: After= here means its ExecStop runs while they run."""
    guard = parse_unit(UNITS / "cprd-kexec-guard.service")
    after = set(words(guard, "Unit", "After"))
    assert {
        "cprd.service",
        "dbus.service",
        "libvirtd.service",
        "libvirt-guests.service",
        "machines.target",
    } <= after
    assert "cprd.service" not in words(guard, "Unit", "Before")
    # Default dependencies give Conflicts=shutdown.target: the stop that runs ExecStop.
    assert guard["Unit"].get("DefaultDependencies", ["yes"]) == ["yes"]
    assert single(guard, "Service", "Type") == "oneshot"
    assert single(guard, "Service", "RemainAfterExit") == "yes"
    assert single(guard, "Service", "ExecStop") == "/usr/bin/cprdctl guard-stop"


@pytest.mark.parametrize("service", SERVICES)
def test_installed_into_multi_user(service: str) -> None:
    assert words(parse_unit(UNITS / service), "Install", "WantedBy") == ["multi-user.target"]


# --- logind and the catalog --------------------------------------------------------------


def test_logind_waits_for_the_whole_save() -> None:
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((UNITS / "logind.conf.d" / "cprd.conf").read_text())
    assert parser.sections() == ["Login"]
    assert dict(parser["Login"]) == {"InhibitDelayMaxSec": "720"}
    # the save deadline plus time for a rollback
    assert int(parser["Login"]["InhibitDelayMaxSec"]) >= SaveSettings().timeout_s + 60


def catalog_entries() -> dict[str, list[str]]:
    """Catalog id -> the lines of its entry; ids may repeat, so count headers separately."""
    entries: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in (UNITS / "cprd.catalog").read_text().splitlines():
        if line.startswith("-- "):
            current = entries.setdefault(line[3:].strip(), [])
        elif current is not None:
            current.append(line)
    return entries


def test_catalog_has_one_entry_per_event() -> None:
    text = (UNITS / "cprd.catalog").read_text()
    headers = re.findall(r"^-- (\S+)\s*$", text, flags=re.MULTILINE)
    for event in Event:
        assert headers.count(event.value) == 1, f"{event.name}: {headers.count(event.value)}"
    assert sorted(headers) == sorted(event.value for event in Event)
    for msg_id, lines in catalog_entries().items():
        subjects = [line for line in lines if line.startswith("Subject: ")]
        assert len(subjects) == 1, msg_id
        assert "Defined-By: cprd" in lines, msg_id
        assert any(line.startswith("Support: ") for line in lines), msg_id


def test_catalog_compiles_with_journalctl(tmp_path: Path) -> None:
    """The real parser: journalctl --update-catalog into a scratch root, then list it."""
    catalog_dir = tmp_path / "usr" / "lib" / "systemd" / "catalog"
    catalog_dir.mkdir(parents=True)
    shutil.copy(UNITS / "cprd.catalog", catalog_dir / "cprd.catalog")
    update = subprocess.run(
        ["journalctl", f"--root={tmp_path}", "--update-catalog"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert update.returncode == 0, update.stderr
    assert update.stderr == ""
    listed = subprocess.run(
        ["journalctl", f"--root={tmp_path}", "--list-catalog"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    subjects = dict(line.split(" ", 1) for line in listed.stdout.splitlines())
    assert sorted(subjects) == sorted(event.value for event in Event)
    assert all(subject.startswith("cprd: ") for subject in subjects.values())


def test_tmpfiles_creates_the_socket_directories(tmp_path: Path) -> None:
    conf = UNITS / "tmpfiles.d" / "cprd.conf"
    subprocess.run(
        ["systemd-tmpfiles", "--create", f"--root={tmp_path}", str(conf)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    for sub, mode in (("run/cprd", 0o755), ("run/cprd/qmp", 0o750), ("run/cprd/qga", 0o750)):
        st = (tmp_path / sub).stat()
        assert (stat.S_IMODE(st.st_mode), st.st_uid) == (mode, 0), sub
