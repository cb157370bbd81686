"""Relaunch as the same process (issue 13 item 2): as whom, where and with which
environment a QEMU comes back.  The decisions over plain data first, then real guests
(real QEMU under TCG, real qemu-ga, a real throwaway system user)."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest
from fixtures_bus import BusDaemon, CprdAccounts
from harness import GuestFactory, GuestSpec, GuestVM, Memory
from test_launch_systemd import StandInSystemd, systemd  # noqa: F401 (a fixture)
from test_manifest import record

from cprd import config
from cprd import manifest as mf
from cprd.errors import LaunchError, ManifestError, RestoreError
from cprd.hosts import (
    LEGACY_RUN_AS,
    RELAUNCH_PATH,
    ProcessContext,
    RunAs,
    argv_anchored,
    filter_environ,
    relaunch_argv,
    relaunch_as,
    run_as_problem,
)
from cprd.inventory import Inventory
from cprd.launch import Launcher, SystemdLauncher, popen_credentials
from cprd.manifest import Manifest, Outcome, Phase
from cprd.restore import Restorer, run_as
from cprd.save import Saver
from cprd.transfer import Upgrader, hand_over, socket_dir
from cprd.units import exec_command

NOBODY = 65534
CTX = ProcessContext(1000, 1000, (24, 1000), "/srv/vm", (("LANG", "C.UTF-8"), ("TZ", "UTC")))


# --- the environment allow-list ---------------------------------------------------------


def test_only_allowed_variables_with_harmless_values_are_replayed() -> None:
    raw = b"\0".join(
        [
            b"LD_PRELOAD=/tmp/evil.so",
            b"LD_LIBRARY_PATH=/tmp",
            b"GCONV_PATH=/tmp",
            b"MALLOC_CHECK_=3",
            b"HOSTALIASES=/tmp/h",
            b"PATH=/tmp/bin:/usr/bin",
            b"QEMU_MODULE_DIR=/tmp/mods",
            b"TMPDIR=/tmp",
            b"LANG=de_DE.UTF-8",
            b"LANG=fr_FR.UTF-8",  # a second LANG: getenv reads the first
            b"LC_ALL=/tmp/locale",  # a path: glibc would load a locale from it
            b"LC_TIME=en_GB.UTF-8",
            b"LANGUAGE=de:en",
            b"TZ=Europe/Berlin",
            b"XDG_RUNTIME_DIR=/run/user/1000",
            b"DISPLAY=:0",
            b"WAYLAND_DISPLAY=wayland-0",
            b"NOEQUALS",
            b"TZ_BAD\xff=x",
            b"",
        ]
    )
    assert filter_environ(raw, 1000) == (
        ("DISPLAY", ":0"),
        ("LANG", "de_DE.UTF-8"),
        ("LANGUAGE", "de:en"),
        ("LC_TIME", "en_GB.UTF-8"),
        ("TZ", "Europe/Berlin"),
        ("WAYLAND_DISPLAY", "wayland-0"),
        ("XDG_RUNTIME_DIR", "/run/user/1000"),
    )


@pytest.mark.parametrize(
    ("entry", "uid", "kept"),
    [
        ("TZ=UTC", 0, True),
        ("TZ=:Europe/Paris", 0, True),
        ("TZ=CET-1CEST,M3.5.0,M10.5.0/3", 0, True),
        ("TZ=/etc/shadow", 0, False),
        ("TZ=:/tmp/zone", 0, False),
        ("TZ=../../tmp/zone", 0, False),
        ("TZ=Europe/../../../tmp/z", 0, False),
        ("XDG_RUNTIME_DIR=/run/user/1000", 1000, True),
        ("XDG_RUNTIME_DIR=/run/user/1000/sub", 1000, True),
        ("XDG_RUNTIME_DIR=/run/user/1001", 1000, False),
        ("XDG_RUNTIME_DIR=/run/user/10000", 1000, False),
        ("XDG_RUNTIME_DIR=/run/user/1000/../0", 1000, False),
        ("XDG_RUNTIME_DIR=/run/user/0", 0, False),
        ("LANG=C", 0, True),
        ("LANG=../x", 0, False),
        ("DISPLAY=host:0.1", 0, True),
        ("DISPLAY=/tmp/.X11-unix/X0", 0, False),
        ("WAYLAND_DISPLAY=/tmp/w", 0, False),
        ("LD_AUDIT=x", 0, False),
        ("GLIBC_TUNABLES=glibc.malloc.check=3", 0, False),
    ],
)
def test_environment_value_rules(entry: str, uid: int, kept: bool) -> None:
    got = filter_environ(entry.encode(), uid)
    assert got == ((tuple(entry.split("=", 1)),) if kept else ())


# --- as whom ----------------------------------------------------------------------------


def test_relaunch_as_grid() -> None:
    """Every kind of QEMU: root, dropped root, another user, an old manifest."""
    qemu = ("qemu-system-x86_64", "-m", "1G")
    assert relaunch_as(None, qemu) is LEGACY_RUN_AS
    root = ProcessContext(0, 0, (0,), "/var/lib/vm", (("TZ", "UTC"),))
    assert relaunch_as(root, qemu) == RunAs(
        0, 0, (0,), "/var/lib/vm", (("TZ", "UTC"),), "as root, as it ran"
    )
    dropped = ProcessContext(NOBODY, NOBODY, (NOBODY,), "/", (), started_as_root=True)
    for argv in (
        (*qemu, "-run-with", "user=nobody"),
        (*qemu, "-run-with", f"user={NOBODY}:{NOBODY}"),
        (*qemu, "-runas", "nobody"),
        (*qemu, "--run-with=user=nobody"),
    ):
        assert relaunch_as(dropped, argv) == RunAs(
            0, 0, (), "/", (), f"as root: its own -run-with user= drops to uid {NOBODY}"
        ), argv
    # A QEMU that never was root (its QMP socket was not listened on by root) and has
    # -run-with user= in its argv (which it can rewrite): as the uid it runs as.
    never_root = ProcessContext(NOBODY, NOBODY, (NOBODY,), "/", ())
    assert relaunch_as(never_root, (*qemu, "-run-with", "user=nobody")) == RunAs(
        NOBODY, NOBODY, (NOBODY,), "/", (), f"as uid {NOBODY}, as it ran"
    )
    # Dropping to another user than the one it runs as: relaunched as the one it runs as.
    assert relaunch_as(CTX, (*qemu, "-run-with", "user=nobody")) == RunAs(
        1000, 1000, (24, 1000), "/srv/vm", CTX.env, "as uid 1000, as it ran"
    )
    assert relaunch_as(CTX, qemu).uid == 1000
    # A manifest's env is filtered again (it cannot smuggle LD_PRELOAD into a root QEMU).
    edited = ProcessContext(0, 0, (), "/", (("LD_PRELOAD", "/x.so"), ("TZ", "UTC")))
    assert relaunch_as(edited, qemu).env == (("TZ", "UTC"),)


def test_run_as_problem_grid() -> None:
    qemu = ("qemu-system-x86_64",)
    drop = (*qemu, "-run-with", "user=nobody")
    assert run_as_problem((0,) * 4, (0,) * 4, None, qemu, ()) is None
    # Dropped root itself: relaunched as root from an argv uid NOBODY can rewrite, so
    # only when the operator trusts that uid (review finding A).
    dropped_problem = (
        f"drops root to uid {NOBODY} itself (-run-with user=/-runas), so a restore runs its "
        f"argv as root, and uid {NOBODY} can rewrite that argv in its memory: run it as the "
        "main process of a systemd service (whose ExecStart= cprd then checks its argv "
        f"against), or add {NOBODY} to discovery.trusted_uids to trust it so"
    )
    assert run_as_problem((NOBODY,) * 4, (NOBODY,) * 4, None, drop, ()) == dropped_problem
    assert run_as_problem((NOBODY,) * 4, (NOBODY,) * 4, None, drop, (NOBODY,)) is None
    root_started = ProcessContext(NOBODY, NOBODY, (), "/", (), started_as_root=True)
    assert run_as_problem((NOBODY,) * 4, (NOBODY,) * 4, root_started, drop, ()) == (dropped_problem)
    assert run_as_problem((NOBODY,) * 4, (NOBODY,) * 4, root_started, drop, (NOBODY,)) is None
    # Its argv is the one root's systemd holds (argv_anchored): accepted, no trust.
    assert run_as_problem((NOBODY,) * 4, (NOBODY,) * 4, root_started, drop, (), True) is None
    never_root = ProcessContext(NOBODY, NOBODY, (), "/", ())
    # Anchoring lifts only the dropped-root refusal: a QEMU that always ran as an
    # untrusted uid stays refused, anchored or not.
    assert run_as_problem((NOBODY,) * 4, (NOBODY,) * 4, never_root, drop, (), True) == (
        f"runs as uid {NOBODY}, neither dropped to by its own -run-with user= nor in "
        "discovery.trusted_uids: cprd relaunches a QEMU only as a uid it trusts"
    )
    assert run_as_problem((NOBODY,) * 4, (NOBODY,) * 4, never_root, drop, ()) == (
        f"runs as uid {NOBODY}, neither dropped to by its own -run-with user= nor in "
        "discovery.trusted_uids: cprd relaunches a QEMU only as a uid it trusts"
    )
    assert run_as_problem((1000,) * 4, (1000,) * 4, CTX, qemu, (1000,)) is None
    assert run_as_problem((1000,) * 4, (1000,) * 4, CTX, qemu, (1001,)) == (
        "runs as uid 1000, neither dropped to by its own -run-with user= nor in "
        "discovery.trusted_uids: cprd relaunches a QEMU only as a uid it trusts"
    )
    assert run_as_problem((1000, 0, 0, 0), (1000,) * 4, CTX, qemu, (1000,)) == (
        "runs with mixed credentials (uids 1000/0/0/0, gids 1000/1000/1000/1000): cprd "
        "relaunches a QEMU as one uid and gid"
    )
    gone = ProcessContext(1000, 1000, (), "/srv/vm (deleted)", ())
    assert run_as_problem((1000,) * 4, (1000,) * 4, gone, qemu, (1000,)) == (
        "its working directory /srv/vm (deleted) is gone: cprd cannot relaunch it there"
    )


def test_argv_anchored() -> None:
    """An argv read from /proc is anchored only when it is, word for word, systemd's
    ExecStart= argv, or what a cprd restore ran from it (relaunch_argv)."""
    unit = ("/usr/bin/qemu-system-x86_64", "-machine", "q35", "-run-with", "user=nobody")
    pinned = (*unit[:2], "pc-q35-10.0", *unit[3:], "-incoming", "defer")
    assert argv_anchored(unit, unit, "pc-q35-10.0")
    assert relaunch_argv(unit, "pc-q35-10.0") == list(pinned)
    assert argv_anchored(pinned, unit, "pc-q35-10.0")  # after a restore from the unit
    assert argv_anchored(pinned, pinned, "pc-q35-10.0")  # a transient unit re-created
    # relaunch_argv is idempotent: a second save and restore stays anchored.
    assert argv_anchored(relaunch_argv(pinned, "pc-q35-10.0"), unit, "pc-q35-10.0")
    assert not argv_anchored(pinned, unit, "pc-q35-9.2")  # another machine than pinned
    evil = (*unit, "-netdev", "tap,id=n0,script=/tmp/evil.sh")
    assert not argv_anchored(evil, unit, "pc-q35-10.0")  # a word added
    assert not argv_anchored(unit[:-1], unit, "pc-q35-10.0")  # a word dropped
    rewritten = (*unit[:-1], "user=root")
    assert not argv_anchored(rewritten, unit, "pc-q35-10.0")  # one word rewritten
    assert not argv_anchored(unit, None, "pc-q35-10.0")
    assert not argv_anchored((), (), "pc-q35-10.0")


def test_exec_command_checks_what_dbus_said() -> None:
    """ExecStart comes over D-Bus as a(sasbttttuii): one entry, each field typed, or None."""
    argv = ["/usr/bin/qemu", "-m", "96"]
    entry = ["/usr/bin/qemu", argv, False, 0, 0, 0, 0, 1234, 1, 0]
    assert exec_command([entry]) == ("/usr/bin/qemu", tuple(argv))
    assert exec_command([]) == (None, None)
    assert exec_command([entry, entry]) == (None, None)  # ExecStart= given twice
    assert exec_command(None) == (None, None)
    assert exec_command("/usr/bin/qemu") == (None, None)
    assert exec_command([["/usr/bin/qemu", [*argv, 7]]]) == (None, None)
    assert exec_command([["/usr/bin/qemu", "-m 96"]]) == (None, None)
    assert exec_command([[b"/usr/bin/qemu", argv]]) == (None, None)
    assert exec_command([["qemu", argv]]) == (None, None)  # not an absolute path
    assert exec_command([["/usr/bin/qemu", []]]) == (None, None)


def test_popen_credentials_grid() -> None:
    run = relaunch_as(CTX, ("qemu",))
    assert popen_credentials(run, 0, 0, [0]) == {
        "user": 1000,
        "group": 1000,
        "extra_groups": [24, 1000],
    }
    # Root relaunched as root: nothing to change (no CAP_SETUID/CAP_SETGID needed) ...
    root = RunAs(0, 0, (0,), "/", (), "")
    assert popen_credentials(root, 0, 0, [0]) == {}
    # ... except root's groups when they were others.
    assert popen_credentials(root, 0, 0, [0, 4]) == {"extra_groups": [0]}
    # Another uid never keeps root's supplementary groups.
    assert popen_credentials(RunAs(5, 5, (), "/", (), ""), 0, 0, [0]) == {
        "user": 5,
        "group": 5,
        "extra_groups": [],
    }
    assert popen_credentials(LEGACY_RUN_AS, 0, 0, [0, 4]) == {}


def test_transient_unit_properties() -> None:
    """The systemd launcher's property list (pure).  systemd itself cannot run as PID 1
    on this machine (tests/test_launch_systemd.py uses a stand-in), so the properties
    are checked here, by name and D-Bus signature."""
    props = SystemdLauncher.properties("web", "/usr/bin/qemu", ["qemu"], relaunch_as(CTX, ("q",)))
    assert props == [
        ("Description", "s", "QEMU VM web (restored by cprd)"),
        ("ExecStart", "a(sasb)", [["/usr/bin/qemu", ["qemu"], False]]),
        ("KillMode", "s", "mixed"),
        ("CollectMode", "s", "inactive-or-failed"),
        ("WorkingDirectory", "s", "/srv/vm"),
        ("User", "s", "1000"),
        ("Group", "s", "1000"),
        ("SupplementaryGroups", "as", ["24", "1000"]),
        ("Environment", "as", [f"PATH={RELAUNCH_PATH}", "LANG=C.UTF-8", "TZ=UTC"]),
    ]
    root = SystemdLauncher.properties("web", "/q", ["q"], RunAs(0, 0, (), "/", (), ""))
    assert [p[0] for p in root] == [
        "Description",
        "ExecStart",
        "KillMode",
        "CollectMode",
        "WorkingDirectory",
        "Environment",
    ]
    legacy = SystemdLauncher.properties("web", "/q", ["q"], LEGACY_RUN_AS)
    assert ("Environment" in [p[0] for p in legacy]) is False


def test_transient_unit_properties_carry_no_line_of_the_qemus_user() -> None:
    """systemd writes Description= and WorkingDirectory= unescaped into the transient
    unit's file (/run/systemd/transient), read again at each daemon-reload: a newline in
    a name (the QEMU's -name) or a working directory (its user's choice) would add lines
    such as ``ExecStopPost=+/tmp/evil`` (run as root).  The name is shown escaped; a
    working directory, executable or argv word with a control character is refused."""
    evil = "web\n[Service]\nExecStopPost=+/tmp/evil"
    how = relaunch_as(CTX, ("q",))
    props = dict((n, v) for n, _, v in SystemdLauncher.properties(evil, "/q", ["q"], how))
    assert props["Description"] == (
        "QEMU VM web\\n[Service]\\nExecStopPost=+/tmp/evil (restored by cprd)"
    )
    assert not any("\n" in str(v) or "\r" in str(v) for v in props.values())
    bad_cwd = RunAs(1000, 1000, (), "/srv/vm\n[Service]\nExecStopPost=+/tmp/evil", (), "")
    with pytest.raises(LaunchError, match=r"its working directory .* has a control character"):
        SystemdLauncher.properties("web", "/q", ["q"], bad_cwd)
    with pytest.raises(LaunchError, match=r"its argv word .* has a control character"):
        SystemdLauncher.properties("web", "/q", ["q", "-name", "a\rb"], how)
    with pytest.raises(LaunchError, match=r"its executable .* has a control character"):
        SystemdLauncher.properties("web", "/q\x7f", ["q"], how)
    # refused at check already, before the VM is saved
    ctx = ProcessContext(1000, 1000, (), "/srv/vm\nx", ())
    assert run_as_problem((1000,) * 4, (1000,) * 4, ctx, ("q",), (1000,)) == (
        "its working directory '/srv/vm\\nx' has a control character: cprd does not hand "
        "it to systemd"
    )


# --- the manifest -----------------------------------------------------------------------


def test_manifest_keeps_the_process_context(tmp_path: Path) -> None:
    """``process`` round-trips; a manifest without it (before issue 13 item 2) reads as
    None; a malformed one is refused with its key path."""
    path = tmp_path / "manifest.yaml"
    mf.write(path, Manifest.new(Phase.COMMITTED, (record(tmp_path, process=CTX),)))
    assert mf.read(path).vms[0].process == CTX
    data = mf.to_dict(mf.read(path))
    assert data["vms"][0]["process"] == {
        "uid": 1000,
        "gid": 1000,
        "groups": [24, 1000],
        "cwd": "/srv/vm",
        "env": {"LANG": "C.UTF-8", "TZ": "UTC"},
        "started_as_root": False,
    }
    del data["vms"][0]["process"]
    assert mf.from_dict(data, "x").vms[0].process is None
    data["vms"][0]["process"] = {"uid": 1, "gid": 1, "groups": ["x"], "cwd": "/", "env": {}}
    with pytest.raises(ManifestError) as err:
        mf.from_dict(data, "x")
    assert str(err.value) == "manifest x is corrupt: vms[0].process.groups: expected a list of gids"


def test_a_working_directory_gone_is_refused_before_launch(tmp_path: Path) -> None:
    rec = record(tmp_path, process=ProcessContext(0, 0, (), str(tmp_path / "gone"), ()))
    with pytest.raises(RestoreError) as err:
        run_as(rec)
    assert str(err.value) == f"web1: its working directory {tmp_path}/gone is gone (state kept)"
    assert run_as(record(tmp_path, process=CTX.__class__(0, 0, (), str(tmp_path), ()))).cwd == (
        str(tmp_path)
    )


# --- real guests ------------------------------------------------------------------------


def _status(pid: int) -> dict[str, list[int]]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("Uid", "Gid", "Groups"):
            out[key] = [int(v) for v in rest.split()]
    return out


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(e.decode().split("=", 1) for e in raw.split(b"\0") if e)


def _config(root: Path, *trusted: int) -> config.Config:
    cfg = root / "cprd.yaml"
    cfg.write_text(
        f"state_dir: {root}/state\n"
        f"discovery: {{qmp_sockets: ['{root}/*/qmp.sock'],\n"
        f"            agent_socket: '{root}/{{name}}/qga.sock', trusted_uids: {list(trusted)}}}\n"
        "save: {space_margin_mib: 16, timeout_s: 120}\n"
        "restore: {timeout_s: 120}\n"
    )
    return config.load(cfg)


ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "TZ": "UTC",
    "LANG": "C.UTF-8",
    "LD_PRELOAD": "/lib/x86_64-linux-gnu/libm.so.6",
    "CPRD_TEST_SECRET": "not replayed",
}


def _start_as_user(
    guests: GuestFactory, root: Path, accounts: CprdAccounts, name: str
) -> tuple[GuestVM, Path]:
    """A guest whose QEMU runs as cprd-test (groups: cprd) from root/qemu-cwd, with ENV."""
    uid, gid = accounts.member_uid, accounts.member_gid
    groups = (accounts.cprd_gid,)
    root.chmod(0o755)  # the user must reach its VM directory
    cwd = root / "qemu-cwd"
    cwd.mkdir()
    os.chown(cwd, uid, gid)
    (vm,) = guests(GuestSpec(name, run_as=(uid, gid, groups), env=ENV, cwd=cwd))
    status = _status(vm.pid)
    assert status["Uid"] == [uid] * 4 and status["Groups"] == sorted(groups)
    assert os.readlink(f"/proc/{vm.pid}/cwd") == str(cwd)
    return vm, cwd


async def _save_and_commit(cfg: config.Config) -> Manifest:
    inventory = Inventory(cfg)
    try:
        saver = Saver(cfg, inventory)
        await saver.prepare()
        return await saver.commit()
    finally:
        await inventory.close()


async def test_a_qemu_run_as_another_user_comes_back_as_that_user(
    guests: GuestFactory, vm_dir_root: Path, cprd_accounts: CprdAccounts
) -> None:
    """A QEMU started directly as the unprivileged system user cprd-test (uid trusted in
    the config; supplementary group cprd), from its own working directory, with TZ and
    LANG (allowed) and LD_PRELOAD and another variable (not) in its environment: saved,
    committed and restored, and the restored QEMU's /proc says the same uid, gid, groups
    and cwd, and the environment holds exactly PATH and the allowed variables.  Before
    that, a restore while its working directory is gone is refused (VM not started,
    state kept)."""
    vm, cwd = _start_as_user(guests, vm_dir_root, cprd_accounts, "user")
    uid, gid = cprd_accounts.member_uid, cprd_accounts.member_gid
    groups = (cprd_accounts.cprd_gid,)
    before = _status(vm.pid)
    cfg = _config(vm_dir_root, uid)
    inventory = Inventory(cfg)
    try:
        saver = Saver(cfg, inventory)
        manifest = await saver.prepare()
        assert manifest.vms[0].process == ProcessContext(
            uid, gid, groups, str(cwd), (("LANG", "C.UTF-8"), ("TZ", "UTC"))
        )
        await saver.commit()
    finally:
        await inventory.close()
    vm.released()
    tick = vm.last_tick()
    assert tick is not None

    cwd.rename(vm_dir_root / "moved")
    result = await Restorer(cfg).run()
    (rec,) = result.vms
    assert rec.outcome is Outcome.FAILED
    assert f"its working directory {cwd} is gone (state kept)" in rec.reason, rec.reason
    assert vm.running_pids() == []
    assert Path(rec.state_file).stat().st_size == rec.state_size

    (vm_dir_root / "moved").rename(cwd)
    result = await Restorer(cfg).run()
    assert [(r.name, r.outcome) for r in result.vms] == [("user", Outcome.RESTORED)]
    (pid,) = vm.running_pids()
    after = _status(pid)
    assert after == before
    assert os.readlink(f"/proc/{pid}/cwd") == str(cwd)
    assert _environ(pid) == {"PATH": RELAUNCH_PATH, "TZ": "UTC", "LANG": "C.UTF-8"}
    vm.wait_tick_above(tick)


async def test_a_non_root_qemu_through_a_transient_unit(
    guests: GuestFactory,
    vm_dir_root: Path,
    cprd_accounts: CprdAccounts,
    dbus_daemon: BusDaemon,
    systemd: StandInSystemd,  # noqa: F811 (the fixture)
) -> None:
    """The systemd launcher: the transient unit gets User=, Group=, SupplementaryGroups=,
    WorkingDirectory= and Environment= over the real dbus-daemon, and the QEMU that the
    stand-in for systemd (systemd cannot be PID 1 here) starts with them comes back as
    the user, in its directory, with exactly the allowed environment."""
    vm, cwd = _start_as_user(guests, vm_dir_root, cprd_accounts, "sduser")
    before = _status(vm.pid)
    cfg = _config(vm_dir_root, cprd_accounts.member_uid)
    await _save_and_commit(cfg)
    vm.released()
    tick = vm.last_tick()
    assert tick is not None
    launcher: Launcher = SystemdLauncher(dbus_daemon.address)
    result = await Restorer(cfg, launcher=launcher).run()
    assert [(r.name, r.outcome) for r in result.vms] == [("sduser", Outcome.RESTORED)]
    unit = systemd.units["cprd-vm-sduser.service"]
    assert (unit["User"], unit["Group"], unit["SupplementaryGroups"]) == (
        str(cprd_accounts.member_uid),
        str(cprd_accounts.member_gid),
        [str(cprd_accounts.cprd_gid)],
    )
    assert unit["WorkingDirectory"] == str(cwd)
    assert unit["Environment"] == [f"PATH={RELAUNCH_PATH}", "LANG=C.UTF-8", "TZ=UTC"]
    (pid,) = vm.running_pids()
    assert pid == systemd.procs["cprd-vm-sduser.service"].pid
    assert _status(pid) == before
    assert os.readlink(f"/proc/{pid}/cwd") == str(cwd)
    assert _environ(pid) == {"PATH": RELAUNCH_PATH, "TZ": "UTC", "LANG": "C.UTF-8"}
    vm.wait_tick_above(tick)


async def test_cpr_transfer_of_a_qemu_that_dropped_root(
    guests: GuestFactory, vm_dir_root: Path
) -> None:
    """A ``-run-with user=nobody`` QEMU moves to a new process with cpr-transfer: its
    cpr and main channel sockets live in a per-VM directory owned by nobody (0700)
    inside a root-owned 0711 parent, and the new QEMU runs as nobody again."""
    aux = ["-machine", "aux-ram-share=on", "-run-with", "user=nobody"]
    (vm,) = guests(GuestSpec("dropx", memory=Memory.MEMFD, extra_args=aux))
    old = vm.pid
    assert _status(old)["Uid"] == [NOBODY] * 4
    cfg = _config(vm_dir_root, 4242, NOBODY)  # nobody trusted: relaunched as root, drops
    inventory = Inventory(cfg)
    upgrader = Upgrader(cfg, inventory)
    try:
        tick = vm.last_tick()
        assert await upgrader.upgrade() == {"dropx": "cpr-transfer: running"}
    finally:
        await inventory.close()
    vm.released()
    (pid,) = vm.running_pids()
    assert pid != old
    assert _status(pid)["Uid"] == [NOBODY] * 4
    assert tick is not None
    vm.wait_tick_above(tick)
    assert oct(os.stat(cfg.state_dir).st_mode & 0o777) == "0o700"


async def test_cpr_transfer_relaunches_only_what_the_plan_would(
    guests: GuestFactory, vm_dir_root: Path
) -> None:
    """The cpr-transfer path asks :func:`cprd.hosts.run_as_problem` as the save's plan
    does: a QEMU whose working directory was deleted is not moved with cpr-transfer
    (the file path's plan then refuses it, before anything stops)."""
    cwd = vm_dir_root / "doomed-cwd"
    cwd.mkdir()
    aux = ["-machine", "aux-ram-share=on"]
    (vm,) = guests(GuestSpec("cwdgone", memory=Memory.MEMFD, extra_args=aux, cwd=cwd))
    cwd.rmdir()
    inventory = Inventory(_config(vm_dir_root, 4242))
    try:
        ((_, _, ok, why),) = await Upgrader(inventory.config, inventory).paths(
            None, None, probe=False
        )
    finally:
        await inventory.close()
    assert (ok, why) == (
        False,
        f"its working directory {cwd} (deleted) is gone: cprd cannot relaunch it there: not moved",
    )
    assert vm.runstate() == "running"


def _rewrite_argv(pid: int, old: bytes, new: bytes) -> None:
    """Overwrite ``old`` with ``new`` (same length) in the argv strings of ``pid``."""
    assert len(old) == len(new)
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    start, end = int(fields[45]), int(fields[46])  # arg_start, arg_end (proc(5))
    with open(f"/proc/{pid}/mem", "r+b", buffering=0) as mem:
        mem.seek(start)
        at = mem.read(end - start).index(old)
        mem.seek(start + at)
        mem.write(new)


async def test_a_dropped_qemu_cannot_rewrite_what_root_runs(
    guests: GuestFactory, vm_dir_root: Path
) -> None:
    """A guest that takes over its QEMU (``-run-with user=nobody``: nobody from then on)
    rewrites its argv in place (its own memory; root writes /proc/PID/mem here, as the
    QEMU itself would write its stack): ``-netdev tap,script=`` in it would make the
    root-started relaunch run a program of its choosing as root, before QEMU drops root.
    cprd must refuse that relaunch at check, or not relaunch it as root: it refuses it
    unless the operator trusts uid nobody (discovery.trusted_uids)."""
    pad = "p" * 60
    extra = ["-run-with", "user=nobody", "-device", f"virtio-rng-pci,id={pad}"]
    (vm,) = guests(GuestSpec("hijack", extra_args=extra))
    assert _status(vm.pid)["Uid"] == [NOBODY] * 4
    evil = b"tap,script=/tmp/evil.sh,downscript=no,id="
    old = b"-device\0virtio-rng-pci,id=" + pad.encode()
    _rewrite_argv(vm.pid, old, b"-netdev\0" + evil + b"n" * (len(old) - 8 - len(evil)))
    inventory = Inventory(_config(vm_dir_root, 4242))
    try:
        await inventory.scan()
        (handle,) = inventory.vms()
        facts, ident = handle.facts, handle.identity
        assert ident is not None and "script=/tmp/evil.sh" in " ".join(facts.argv)
        problem = run_as_problem(ident.uids, ident.gids, facts.process, facts.argv, (4242,))
        how = relaunch_as(facts.process, facts.argv)
        assert problem is not None or how.uid != 0, (how, facts.argv)
    finally:
        await inventory.close()


def test_socket_dir_and_hand_over(tmp_path: Path) -> None:
    """The per-VM socket directory: a root QEMU's in state_dir (0700); another's owned by
    the QEMU's user, 0700, in a root-owned 0711 parent (created if missing); a parent
    others may write is refused; the cpr socket is given to the user without following
    a symlink."""
    parent = tmp_path / "transfer"
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    owner = ProcessContext(NOBODY, NOBODY, (), "/", ())
    root_dir = socket_dir("web", ProcessContext(0, 0, (), "/", ()), state, parent)
    st = os.stat(root_dir)
    assert root_dir.parent == state and (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o700)
    assert not parent.exists()
    path = socket_dir("web", owner, state, parent)
    st, pst = os.stat(path), os.stat(parent)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (NOBODY, NOBODY, 0o700)
    assert (pst.st_uid, stat.S_IMODE(pst.st_mode)) == (0, 0o711)
    assert path.parent == parent and path.name.startswith("web-")
    with socket.socket(socket.AF_UNIX) as sock:  # as the new QEMU makes it, as root
        sock.bind(str(path / "cpr.sock"))
    hand_over(path, "cpr.sock", owner)
    st = os.lstat(path / "cpr.sock")
    assert (stat.S_ISSOCK(st.st_mode), st.st_uid, st.st_gid) == (True, NOBODY, NOBODY)
    hand_over(path, "cpr.sock", owner)  # the user's already: nothing to do
    # What the directory's user can put there instead (a hard link needs
    # fs.protected_hardlinks=0, made here by root): each refused, its target left root's.
    target = tmp_path / "roots"  # a root-owned file (never a system one)
    target.write_text("")
    (path / "link").symlink_to(target)
    os.link(target, path / "hard")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(tmp_path / "root.sock"))
    os.link(tmp_path / "root.sock", path / "hardsock")
    for name, what in (
        ("link", "mode l"),
        ("hard", "mode -"),
        ("hardsock", "uid 0, 2 links"),
    ):
        with pytest.raises(LaunchError, match=f"is not the new QEMU's socket.*{what}"):
            hand_over(path, name, owner)
    assert os.lstat(path / "link").st_uid == 0
    assert [os.stat(p).st_uid for p in (target, tmp_path / "root.sock")] == [0, 0]
    parent.chmod(0o777)
    with pytest.raises(Exception, match="only root may write"):
        socket_dir("web", owner, state, parent)


def test_direct_launcher_log_is_bounded(tmp_path: Path) -> None:
    """A QEMU's output (a guest on ``-serial stdio`` included) goes to <state_dir>/<vm>.log
    through the relay: at most LOG_MAX bytes of a start are kept, the rest is drained so
    the process never blocks on a full pipe, and what a short-lived start said is its
    tail. The chatty process is a shell, not QEMU: what is tested is the relay, which
    cannot tell them apart, and a guest that writes 5 MiB to its console takes minutes
    under TCG."""
    import asyncio

    from cprd.launch import LOG_MAX, DirectLauncher

    launcher = DirectLauncher(tmp_path)
    over = LOG_MAX + (1 << 20)
    chatty = asyncio.run(
        launcher.launch(
            "chatty", "/bin/sh", ["sh", "-c", f"head -c {over} /dev/zero; echo late >&2; exit 3"]
        )
    )
    assert chatty.popen is not None and chatty.popen.wait(timeout=60) == 3
    assert chatty.relay is not None and chatty.relay.wait(timeout=10) == 0
    assert (tmp_path / "chatty.log").stat().st_size == LOG_MAX
    short = asyncio.run(
        launcher.launch("short", "/bin/sh", ["sh", "-c", "echo starting; echo boom >&2; exit 1"])
    )
    assert short.popen is not None and short.popen.wait(timeout=30) == 1
    assert launcher.tail(short) == "boom"
    assert stat.S_IMODE((tmp_path / "short.log").stat().st_mode) == 0o600
    with pytest.raises(LaunchError, match="cannot start /nonexistent/qemu"):
        asyncio.run(launcher.launch("gone", "/nonexistent/qemu", ["qemu"]))
