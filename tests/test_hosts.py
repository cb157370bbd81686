"""Which QEMUs cprd can bring back (cprd/hosts.py): pure decisions over plain data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from test_manifest import record

from cprd import manifest as mf
from cprd.hosts import (
    DiskImage,
    Manager,
    disk_changes,
    identify,
    identify_all,
    image_paths,
    keyvals,
    manager_of,
    relaunch_argv,
    replay_argv,
    replay_problems,
)
from cprd.manifest import Manifest, Phase

BASE = ["/usr/bin/qemu-system-x86_64", "-accel", "tcg", "-nodefaults", "-m", "128M"]


# --- replayable or refused ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        (
            ["-add-fd", "fd=7,set=2"],
            "argv passes fd 7 (-add-fd fd=7,set=2): cprd cannot recreate it",
        ),
        (["--add-fd", "fd=9,set=1,opaque=x"], "argv passes fd 9 (-add-fd fd=9,set=1,opaque=x)"),
        (["-add-fd=fd=8,set=3"], "argv passes fd 8 (-add-fd fd=8,set=3)"),
        (["-netdev", "tap,id=n0,fd=5"], "argv passes fd 5 (-netdev tap,id=n0,fd=5)"),
        (["-netdev", "tap,id=n0,fds=5:6,vhost=on,vhostfds=7:8"], "argv passes fd 5:6, 7:8"),
        (["-netdev", "tap,id=n0,vhost=on,vhostfd=11"], "argv passes fd 11 (-netdev"),
        (["-chardev", "socket,id=c0,fd=4"], "argv passes fd 4 (-chardev socket,id=c0,fd=4)"),
        (["-qmp", "fd:3"], "argv passes fd 3 (-qmp fd:3)"),
        (["-object", "memory-backend-file,id=m,mem-path=/x,fd=12"], "argv passes fd 12"),
        (
            ["-drive", "file=/dev/fdset/2,if=virtio,format=raw"],
            "argv passes fd set 2 (-drive file=/dev/fdset/2,if=virtio,format=raw)",
        ),
        (
            ["-blockdev", '{"driver":"file","node-name":"f","filename":"/dev/fdset/4"}'],
            "argv passes fd set 4",
        ),
        (["-netdev", '{"type":"tap","id":"n0","fd":"6"}'], "argv passes fd 6"),
        (["-snapshot"], "argv has -snapshot"),
        (
            ["-drive", "file=/d.img,if=virtio,snapshot=on"],
            "argv has -drive file=/d.img,if=virtio,snapshot=on: snapshot=on keeps",
        ),
    ],
)
def test_refused(extra: list[str], problem: str) -> None:
    problems = replay_problems([*BASE, *extra])
    assert len(problems) == 1
    assert problems[0].startswith(problem), problems


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["-daemonize", "-pidfile", "/run/vm.pid"],
        ["-incoming", "defer"],
        ["-incoming", "file:/x.state"],
        ["-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no"],
        ["-netdev", "user,id=n0,hostfwd=tcp::2222-:22"],
        ["-chardev", "socket,id=c0,path=/run/x.sock,server=on,wait=off"],
        ["-qmp", "unix:/run/fd:3.sock,server=on,wait=off"],  # "fd" only in a path
        ["-drive", "file=/var/lib/fdset,,odd.img,if=virtio"],  # ",," escapes a comma
        ["-append", "console=ttyS0 fd=3"],  # the guest's command line, not QEMU's
        ["-name", "fd=3"],
        ["-run-with", "user=nobody"],
        ["-device", "virtio-net,netdev=n0,id=fdnic"],
    ],
)
def test_replayable(extra: list[str]) -> None:
    assert replay_problems([*BASE, *extra]) == ()


def test_keyvals_escapes_and_json() -> None:
    assert keyvals("file=/a,,b,if=virtio,readonly") == [
        ("file", "/a,b"),
        ("if", "virtio"),
        ("", "readonly"),
    ]
    assert ("fd", "3") in keyvals('{"a": {"fd": 3}, "b": [1]}')
    assert keyvals("{not json") == []


def test_daemonize_dropped_pidfile_kept() -> None:
    argv = [*BASE, "-daemonize", "-pidfile", "/run/vm.pid", "-name", "web"]
    assert replay_argv(argv) == [*BASE, "-pidfile", "/run/vm.pid", "-name", "web"]
    assert replay_argv([*BASE, "--daemonize"]) == BASE


@pytest.mark.parametrize(
    "incoming",
    [
        ["-incoming", "defer"],
        ["--incoming", "tcp:0:4444"],
        ["-incoming=file:/x"],
        ["-incoming", '{"channel-type":"cpr","addr":{}}', "-incoming", "defer"],
    ],
)
def test_incoming_replaced(incoming: list[str]) -> None:
    argv = [*BASE, *incoming, "-machine", "q35", "-daemonize"]
    assert relaunch_argv(argv, "pc-q35-10.0") == [
        *BASE,
        "-machine",
        "pc-q35-10.0",
        "-incoming",
        "defer",
    ]


# --- other managers ---------------------------------------------------------------------

LIBVIRT_V1 = (
    "12:pids:/machine.slice/machine-qemu\\x2d1\\x2dweb.scope/libvirt/emulator\n"
    "1:name=systemd:/machine.slice/machine-qemu\\x2d1\\x2dweb.scope/libvirt/emulator\n"
    "0::/\n"
)
LIBVIRT_V2 = "0::/machine.slice/machine-qemu\\x2d3\\x2ddb.scope/libvirt/emulator\n"
PROXMOX = "0::/qemu.slice/104.scope\n"


def test_libvirt_by_cgroup() -> None:
    argv = [*BASE, "-name", "guest=web,debug-threads=on"]
    for text in (LIBVIRT_V1, LIBVIRT_V2):
        m = manager_of(text, "systemd", argv)
        assert m is not None and m.manager is Manager.LIBVIRT
    m = manager_of(LIBVIRT_V1, "systemd", argv)
    assert m is not None
    assert m.problem() == (
        "run by libvirt (cgroup machine.slice/machine-qemu\\x2d1\\x2dweb.scope): cprd cannot "
        "bring it back under libvirt; use libvirt's managed save (`virsh managedsave web`) "
        "instead"
    )


def test_libvirt_by_parent_and_paths() -> None:
    m = manager_of("0::/\n", "virtqemud", BASE)
    assert m is not None and m.evidence == "parent process virtqemud"
    argv = [*BASE, "-chardev", "socket,id=m,path=/var/lib/libvirt/qemu/domain-2-db/monitor.sock"]
    m = manager_of("0::/\n", "bash", argv)
    assert m is not None and m.evidence == "argv uses /var/lib/libvirt/qemu/domain-2-db"
    key = '{"qom-type":"secret","file":"/var/lib/libvirt/qemu/domain-1-lv/master-key.aes"}'
    m = manager_of("0::/\n", "bash", [*BASE, "-object", key, "-name", "guest=lv"])
    assert m is not None and m.problem().startswith(
        "run by libvirt (argv uses /var/lib/libvirt/qemu/domain-1-lv): "
    )


def test_proxmox() -> None:
    argv = [*BASE, "-id", "104", "-name", "web,debug-threads=on"]
    m = manager_of(PROXMOX, "systemd", argv)
    assert m is not None and m.manager is Manager.PROXMOX
    assert m.problem() == (
        "run by Proxmox VE (cgroup qemu.slice/104.scope): cprd cannot bring it back under "
        "Proxmox VE; use `qm suspend 104 --todisk` instead"
    )
    argv += ["-chardev", "socket,id=qmeventd,path=/var/run/qmeventd.sock,reconnect=5"]
    m = manager_of("0::/\n", "bash", argv)
    assert m is not None and m.problem().startswith("run by Proxmox VE (argv connects to qmeventd")
    assert "`qm suspend 104 --todisk`" in m.problem()


@pytest.mark.parametrize(
    "cgroup",
    [
        "0::/\n",
        "0::/system.slice/vm@web.service\n",
        "0::/user.slice/user-1000.slice/session-3.scope\n",
        "0::/machine.slice/cprd-vm-web.service\n",
        "0::/qemu.slice/web.scope\n",  # not a Proxmox vmid
        "0::/system.slice/104.scope\n",
        "4:memory:/process_api/940686c5\n0::/\n",
    ],
)
def test_unmanaged(cgroup: str) -> None:
    assert manager_of(cgroup, "bash", [*BASE, "-name", "web"]) is None


# --- disks ------------------------------------------------------------------------------


def test_image_paths() -> None:
    nodes = [
        {"node-name": "fmt", "drv": "qcow2", "file": "/img/a.qcow2"},
        {"node-name": "proto", "drv": "file", "file": "/img/a.qcow2"},
        {"node-name": "back", "drv": "file", "file": "/img/base.raw"},
        {"node-name": "nbd", "drv": "nbd", "file": "nbd://h/x"},
        {"node-name": "json", "drv": "file", "file": 'json:{"x":1}'},
        {"node-name": "lv", "drv": "host_device", "file": "/dev/vg/lv"},
        {"node-name": "dup", "drv": "file", "file": "/img/a.qcow2"},
    ]
    assert image_paths(nodes) == ("/img/a.qcow2", "/img/base.raw", "/dev/vg/lv")


def test_disk_changes(tmp_path: Path) -> None:
    img = tmp_path / "a.raw"
    img.write_bytes(b"\0" * 4096)
    seen = identify(str(img))
    assert seen is not None and seen.recorded and seen.size == 4096
    now = {str(img): identify(str(img))}
    assert disk_changes([seen], now) == []
    # modified in place, same size
    os.utime(img, ns=(seen.mtime_ns + 10**9, seen.mtime_ns + 10**9))
    assert disk_changes([seen], {str(img): identify(str(img))}) == [
        f"{img} was modified after QEMU quit"
    ]
    with img.open("ab") as f:
        f.write(b"x")
    assert disk_changes([seen], {str(img): identify(str(img))}) == [
        f"{img} changed size (4096 -> 4097 bytes)"
    ]
    other = tmp_path / "b.raw"
    other.write_bytes(b"\0" * 4096)
    os.replace(other, img)
    assert disk_changes([seen], {str(img): identify(str(img))}) == [
        f"{img} is another file than the one the guest saw"
    ]
    img.unlink()
    assert disk_changes([seen], {str(img): identify(str(img))}) == [f"{img} is missing"]
    assert identify_all([seen]) == (DiskImage(str(img)),)
    # Not recorded (a put-back before the commit reloads from the state file): not compared.
    assert disk_changes([DiskImage(str(img))], {}) == []


def test_manifest_keeps_disks(tmp_path: Path) -> None:
    """disks round-trips; a manifest without the key (before issue 13) reads as ()."""
    rec = record(tmp_path, disks=(DiskImage("/img/a.raw", 1, 2, 3, 4),))
    m = Manifest.new(Phase.COMMITTED, (rec,))
    path = tmp_path / "manifest.yaml"
    mf.write(path, m)
    assert mf.read(path).vms[0].disks == (DiskImage("/img/a.raw", 1, 2, 3, 4),)
    data = mf.to_dict(m)
    del data["vms"][0]["disks"]
    assert mf.from_dict(data, "x").vms[0].disks == ()


# --- small things -----------------------------------------------------------------------

_LOG_SCRIPT = """
import logging, socket, sys
from cprd import log
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(str(log.JOURNAL_SOCKET))  # a socket file that nothing serves once closed
s.close()
assert log.journald_available()
log.setup()
log.emit(logging.getLogger("cprd.test"), logging.ERROR, log.Event.FAILURE, "lost %s", 1, vm="web")
logging.getLogger("cprd.test").info("second line")
print("still here")
"""


def test_logging_falls_back_to_stderr_when_journald_does_not_answer() -> None:
    """journald's socket is there but nothing answers: each line goes to stderr, and no
    "--- Logging error ---" traceback.  Real libsystemd, a real dead socket: in a private
    mount namespace with a tmpfs on /run (the host's journal socket is host-global and
    other tests run a real journald on it)."""
    import subprocess
    import sys

    script = (
        "mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/journal && "
        f'exec {sys.executable} -c "$0"'
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    env.pop("CPRD_LOG", None)
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, _LOG_SCRIPT],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "still here\n"
    assert proc.stderr == "error: web: lost 1\ninfo: second line\n"


def test_options_after_the_subcommand(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``cprd restore --config F --manifest M``: the config F is used (its state_dir is in
    no error), and M is the manifest looked for."""
    from cprd import cli

    cfg = tmp_path / "cprd.yaml"
    cfg.write_text(f"state_dir: {tmp_path}/state\n")
    missing = tmp_path / "nope.yaml"
    assert cli.main(["restore", "--config", str(cfg), "--manifest", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("state_dir: 3\n")
    for argv in (
        ["--config", str(bad), "check"],
        ["check", "--config", str(bad)],
        ["--debug", "check", "--config", str(bad)],
    ):
        assert cli.main(argv) == 2
        assert "state_dir" in capsys.readouterr().err
    # given before the subcommand and not after it: kept (not reset to the default)
    assert cli.main(["--config", str(cfg), "restore", "--manifest", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err


def test_planner_refuses_and_transfer_does_not_move() -> None:
    """plan_vm carries the refusals as problems (so check and prepare refuse), and a
    QEMU-only upgrade does not move such a VM by cpr-transfer."""
    from test_plan import MEMFD, SAVE, facts

    from cprd import plan
    from cprd.config import VMSettings

    fd = facts(argv=("qemu", "-add-fd", "fd=7,set=2"), backends=(MEMFD,), aux_ram_share=True)
    pve = facts(cgroup="0::/qemu.slice/104.scope\n", backends=(MEMFD,), aux_ram_share=True)
    assert plan.plan_vm(fd, VMSettings(), SAVE, "ext4").problems == (
        "argv passes fd 7 (-add-fd fd=7,set=2): cprd cannot recreate it",
    )
    assert plan.plan_vm(pve, VMSettings(), SAVE, "ext4").problems == (
        "run by Proxmox VE (cgroup qemu.slice/104.scope): cprd cannot bring it back under "
        "Proxmox VE; use `qm suspend 104 --todisk` instead",
    )
    assert plan.transfer_path(fd, (10, 0, 2)) == (
        False,
        "argv passes fd 7 (-add-fd fd=7,set=2): cprd cannot recreate it: not moved",
    )
    assert plan.transfer_path(pve, (10, 0, 2))[0] is False
