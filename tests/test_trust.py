"""Trust boundaries (issue 14): no local user, guest or QEMU steers cprd, which runs as root.

Real QEMUs, the real daemon on the private bus with the project's policy, real journald.
Two QMP peers are stand-ins (a small Python QMP server, STANDIN below) because what they
play cannot be made of a real QEMU here: a QEMU that runs as a non-root uid without its
own ``-run-with`` option although it made its socket as root, and a compromised QEMU that
answers ``query-status`` with garbage.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fixtures_bus import CprdAccounts, Journald
from fixtures_daemon import Daemon
from harness import GuestFactory, GuestSpec, guest_image, start_guests
from test_cycle import make_config

from cprd import manifest as mf
from cprd.errors import ManifestError, RestoreError, TrustError
from cprd.inventory import Inventory
from cprd.log import Event
from cprd.manifest import Manifest, Outcome, Phase, VMRecord
from cprd.plan import MigrationSettings, safe_file_name
from cprd.restore import Restorer, check_files
from cprd.save import Saver
from cprd.transfer import qemu_version
from cprd.trust import binary_problem, dropped_uid, path_problem, peer_problem
from cprd.vm import redact_arg, redact_argv

NOBODY = 65534
StandIn = Callable[[str, str], Path]
QEMU = shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64"

# --- the stand-in QMP server -----------------------------------------------------------

STANDIN = r"""
import json, os, socket, sys
path, mode = sys.argv[1], sys.argv[2]
srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
srv.bind(path)
srv.listen(8)
if mode == "nobody":  # made its socket as root, then runs as nobody
    os.setgroups([])
    os.setresgid(65534, 65534, 65534)
    os.setresuid(65534, 65534, 65534)
print("ready", flush=True)
version = {"qemu": {"major": 10, "minor": 0, "micro": 2}, "package": "standin"}
greeting = {"QMP": {"version": version, "capabilities": []}}
decoder = json.JSONDecoder()
while True:
    conn, _ = srv.accept()
    buf = ""
    try:
        conn.sendall(json.dumps(greeting).encode() + b"\r\n")
        while chunk := conn.recv(65536):
            buf += chunk.decode()
            while buf.strip():  # qemu.qmp sends no newline after a command
                try:
                    msg, end = decoder.raw_decode(buf.lstrip())
                except ValueError:
                    break  # incomplete: read more
                buf = buf.lstrip()[end:]
                cmd = msg.get("execute")
                if cmd == "query-status" and mode == "machine":
                    ret = {"status": "running", "running": True}
                elif cmd == "qom-get" and mode == "machine":  # a comma: machine properties
                    ret = "pc-q35-10.0,dump-guest-core=on-machine"
                elif cmd == "query-status":
                    ret = ["garbage", {"status": 5}]
                elif cmd == "query-version":
                    ret = version
                else:
                    ret = {}
                reply = {"return": ret}
                if "id" in msg:
                    reply["id"] = msg["id"]
                conn.sendall(json.dumps(reply).encode() + b"\r\n")
    except OSError:
        pass
    finally:
        conn.close()
"""


@pytest.fixture
def standin(vm_dir_root: Path) -> Iterator[StandIn]:
    """Factory: standin(name, mode) runs the stand-in QMP server on <root>/<name>/qmp.sock
    (mode "nobody": it drops to uid 65534 after listening; "garbage": stays root;
    "machine": a sane status, then a machine type with a comma in it)."""
    procs: list[subprocess.Popen[bytes]] = []
    script = vm_dir_root / "standin.py"
    script.write_text(STANDIN)

    def start(name: str, mode: str) -> Path:
        d = vm_dir_root / name
        d.mkdir()
        path = d / "qmp.sock"
        proc = subprocess.Popen(
            [sys.executable, str(script), str(path), mode], stdout=subprocess.PIPE
        )
        procs.append(proc)
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        return path

    yield start
    for proc in procs:
        proc.kill()
        proc.wait(timeout=10)


def bound_socket(path: Path) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()


# --- pure rules ------------------------------------------------------------------------


def test_path_rule(vm_dir_root: Path) -> None:
    """systemd's CHASE_SAFE rule over real directories, with lstat."""
    root = vm_dir_root  # /tmp (sticky, world-writable) / cprdt-XXXX (root, 0700)

    def sock(sub: str, owner: int = 0, mode: int = 0o755) -> Path:
        d = root / sub
        d.mkdir(parents=True, exist_ok=True)
        os.chown(d, owner, owner)
        os.chmod(d, mode)
        path = d / "qmp.sock"
        bound_socket(path)
        return path

    ok = sock("ok")
    assert path_problem(ok) is None
    user = sock("user", owner=NOBODY)
    assert path_problem(user) == (
        f"{root}/user is owned by uid {NOBODY}, not root or a trusted uid"
    )
    assert path_problem(user, trusted=[NOBODY]) is None
    assert path_problem(sock("group-w", mode=0o775)) == (
        f"{root}/group-w is writable by group or others (mode 0775)"
    )
    # A sticky world-writable directory, like /tmp: what is in it must be root's.
    assert path_problem(sock("sticky/mine")) is None
    os.chmod(root / "sticky", 0o1777)
    assert path_problem(root / "sticky/mine/qmp.sock") is None
    assert path_problem(sock("sticky/theirs", owner=NOBODY)) == (
        f"{root}/sticky/theirs is owned by uid {NOBODY}, not root or a trusted uid "
        "(inside a sticky world-writable directory)"
    )
    os.chmod(root / "sticky", 0o777)  # world-writable without the sticky bit
    assert path_problem(root / "sticky/mine/qmp.sock") == (
        f"{root}/sticky is writable by group or others (mode 0777)"
    )
    # A symlink is followed, and its target judged.
    (root / "link").symlink_to(root / "user")
    assert path_problem(root / "link/qmp.sock") == (
        f"{root}/user is owned by uid {NOBODY}, not root or a trusted uid "
        f"(the real path of {root}/link/qmp.sock)"
    )
    # The socket itself.
    path = ok
    os.chmod(path, 0o777)
    assert path_problem(path) == f"{path} is writable by group or others (mode 0777)"
    os.chmod(path, 0o755)
    os.chown(path, NOBODY, NOBODY)
    assert path_problem(path) == f"{path} is owned by uid {NOBODY}, not root or a trusted uid"
    (root / "ok" / "file").write_text("")
    assert path_problem(root / "ok" / "file") == f"{root}/ok/file is not a socket"


def test_peer_rule() -> None:
    root, nobody = (0, 0, 0, 0), (NOBODY,) * 4
    assert peer_problem(0, root, ["qemu"]) is None
    assert peer_problem(0, nobody, ["qemu", "-run-with", "user=nobody"]) is None
    assert peer_problem(0, nobody, ["qemu", "-run-with", f"user={NOBODY}:{NOBODY}"]) is None
    assert peer_problem(0, nobody, ["qemu", "-runas", "nobody"]) is None
    assert dropped_uid(["qemu", "-run-with=chroot=/x,user=nobody"]) == NOBODY
    assert dropped_uid(["qemu", "-run-with", "chroot=/x"]) is None
    assert peer_problem(0, nobody, ["qemu"]) == (
        f"its QEMU runs as uid {NOBODY}, not root, a trusted uid or its own -run-with user"
    )
    assert peer_problem(0, (0, NOBODY, 0, 0), ["qemu"]) is not None
    assert peer_problem(1000, (1000,) * 4, ["qemu"]) == (
        "its QEMU listens as uid 1000, not root or a trusted uid"
    )
    assert peer_problem(1000, (1000,) * 4, ["qemu"], trusted=[1000]) is None
    # Only a root-started QEMU may drop to a uid of its choosing.
    assert peer_problem(1000, nobody, ["qemu", "-runas", "nobody"], trusted=[1000]) is not None


def test_binary_rule(tmp_path: Path) -> None:
    exe = tmp_path / "qemu"
    exe.write_text("")
    for mode, owner, problem in (
        (0o755, 0, None),
        (0o775, 0, f"{exe} is writable by group or others (mode 0775)"),
        (0o757, 0, f"{exe} is writable by group or others (mode 0757)"),
        (0o755, NOBODY, f"{exe} is owned by uid {NOBODY}, not root"),
    ):
        os.chown(exe, owner, owner)
        os.chmod(exe, mode)
        assert binary_problem(str(exe), os.stat(exe)) == problem
    assert binary_problem(str(tmp_path), os.stat(tmp_path)) == f"{tmp_path} is not a regular file"


def test_secrets_are_redacted() -> None:
    argv = (
        "qemu-system-x86_64",
        "-object",
        "secret,id=sec0,data=TOPSECRET1,format=raw",
        "-object",
        '{"qom-type":"secret","id":"sec1","data":"TOPSECRET2"}',
        "-spice",
        "port=5900,password=TOPSECRET3",
        "-vnc",
        ":0,password-secret=sec0",
        "-drive",
        "file=/a,,b.qcow2,encrypt.key-secret=sec0,if=virtio",
        "-object",
        "secret,id=sec2,file=/etc/k,passwordid=x",
        "-name",
        "data=notsecret",
    )
    out = redact_argv(argv)
    assert out == (
        "qemu-system-x86_64",
        "-object",
        "secret,id=sec0,data=<redacted>,format=raw",
        "-object",
        '{"qom-type":"secret","id":"sec1","data":"<redacted>"}',
        "-spice",
        "port=5900,password=<redacted>",
        "-vnc",
        ":0,password-secret=<redacted>",
        "-drive",
        "file=/a,,b.qcow2,encrypt.key-secret=<redacted>,if=virtio",
        "-object",
        "secret,id=sec2,file=/etc/k,passwordid=<redacted>",
        "-name",
        "data=notsecret",
    )
    assert "TOPSECRET" not in " ".join(out)
    assert redact_arg("not json {") == "not json {"


def test_safe_file_names_are_unique() -> None:
    hashed = safe_file_name("x y")
    assert hashed.startswith("x_y-") and len(hashed) == len("x_y-") + 12
    # The name of one VM is never the hashed form of another's.
    assert safe_file_name(hashed) != hashed
    names = ["web1", "x y", hashed, "x_y", "deadbeef0123", "a/../b", "..", ".hidden", "é"]
    files = [safe_file_name(n) for n in names]
    assert len(set(files)) == len(files), dict(zip(names, files, strict=True))
    assert all("/" not in f and not f.startswith(".") for f in files)


# --- manifest and state files ----------------------------------------------------------


def record(state_dir: Path, name: str = "web1", **kw: object) -> VMRecord:
    base: dict[str, object] = dict(
        name=name,
        qmp_socket=f"{state_dir}/{name}.sock",
        pid=4242,
        argv=("qemu-system-x86_64", "-object", "secret,id=s0,data=TOPSECRET", "-name", name),
        executable=QEMU,
        qemu_version="10.0.2",
        machine_type="pc-q35-10.0",
        state_file=f"{state_dir}/{name}.state",
        settings=MigrationSettings({}, {}),
        runstate_before="running",
        cprd_suspended=False,
        state_size=3,
    )
    base.update(kw)
    return VMRecord(**base)  # type: ignore[arg-type]


def test_manifest_owner_and_mode(tmp_path: Path) -> None:
    path = tmp_path / "state" / "manifest.yaml"
    mf.write(path, Manifest.new(Phase.COMMITTED, (record(tmp_path / "state"),)))
    assert mf.read(path).phase is Phase.COMMITTED
    os.chown(path, NOBODY, NOBODY)
    with pytest.raises(ManifestError) as err:
        mf.read(path)
    assert str(err.value) == f"manifest {path} is owned by uid {NOBODY}, not by cprd: refused"
    os.chown(path, 0, 0)
    os.chmod(path, 0o620)
    with pytest.raises(ManifestError) as err:
        mf.read(path)
    assert str(err.value) == (
        f"manifest {path} is writable by group or others (mode 0620): refused"
    )


def test_no_system_directory_is_chmodded(tmp_path: Path) -> None:
    before = os.stat("/var/lib")
    target = Path("/var/lib/cprd-issue14-test.yaml")
    m = Manifest.new(Phase.COMMITTED, ())
    try:
        with pytest.raises(ManifestError) as err:
            mf.write(target, m)
        assert str(err.value) == "state_dir /var/lib is a system directory: refused"
        with pytest.raises(ManifestError, match="system directory"):
            mf.ensure_state_dir(Path("/tmp"))
        after = os.stat("/var/lib")
        assert (after.st_mode, after.st_uid) == (before.st_mode, before.st_uid)
        assert not os.path.lexists(target)
    finally:  # should the code be broken, put the host back
        os.chmod("/var/lib", stat.S_IMODE(before.st_mode))
        os.chmod("/tmp", 0o1777)
        with contextlib.suppress(FileNotFoundError):
            target.unlink()


def test_in_state_dir(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    assert mf.in_state_dir(f"{state}/web1.state", state)
    for bad in (
        f"{state}/../victim",
        f"{tmp_path}/victim",
        "/etc/shadow",
        f"{state}/sub/web1.state",
        f"{state}/.manifest.yaml.1.tmp",
        "web1.state",
        f"{state}//web1.state",
    ):
        assert not mf.in_state_dir(bad, state), bad
    (tmp_path / "link").symlink_to(state)
    assert not mf.in_state_dir(f"{tmp_path}/link/web1.state", state)


async def test_restore_deletes_nothing_outside_state_dir(tmp_path: Path) -> None:
    """A manifest naming a state file outside state_dir: refused, nothing deleted."""
    cfg = make_config(tmp_path)
    victims = [tmp_path / "victim", tmp_path / "state" / ".." / "victim2"]
    (tmp_path / "victim").write_bytes(b"abc")
    (tmp_path / "victim2").write_bytes(b"abc")
    recs = tuple(record(cfg.state_dir, f"vm{i}", state_file=str(v)) for i, v in enumerate(victims))
    mf.write(cfg.manifest_path, Manifest.new(Phase.COMMITTED, recs))
    result = await Restorer(cfg).run()
    assert [(r.outcome, r.reason) for r in result.vms] == [
        (
            Outcome.FAILED,
            f"state file {v} is not inside state_dir {cfg.state_dir}: refused "
            "(a manifest may only name files in state_dir)",
        )
        for v in victims
    ]
    assert (tmp_path / "victim").read_bytes() == b"abc"
    assert (tmp_path / "victim2").read_bytes() == b"abc"


def test_restore_checks_the_pinned_binary(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    exe = tmp_path / "bin" / "qemu"
    exe.parent.mkdir()
    shutil.copy("/bin/true", exe)
    st = os.stat(exe)
    rec = record(state, executable=str(exe), exe_dev=st.st_dev, exe_ino=st.st_ino, in_place=())
    Path(rec.state_file).write_bytes(b"abc")
    check_files(rec, state)
    # Pinned in the manifest, read back.
    mf.write(state / "manifest.yaml", Manifest.new(Phase.COMMITTED, (rec,)))
    assert mf.read(state / "manifest.yaml").vms[0] == rec
    os.chmod(exe, 0o775)
    with pytest.raises(RestoreError) as err:
        check_files(rec, state)
    assert str(err.value) == (
        f"web1: QEMU binary refused: {exe} is writable by group or others (mode 0775)"
    )
    shutil.copy("/bin/true", tmp_path / "new")
    os.replace(tmp_path / "new", exe)  # a new inode at the same path
    with pytest.raises(RestoreError) as err:
        check_files(rec, state)
    assert str(err.value) == (
        f"web1: QEMU executable {exe} is not the file pinned at commit (replaced since), "
        f"and /tmp is not root's alone (uid 0, mode 1777): refused"
    )


def test_restore_accepts_a_qemu_updated_by_root() -> None:
    """Updating QEMU across the reboot is what cprd is for: a package upgrade writes a
    new inode at the same path.  Where only root can write (every directory of the real
    path root's and not group/other writable), the new binary is started; elsewhere the
    pin refuses it (test above)."""
    top = Path(tempfile.mkdtemp(prefix="cprd-test-bin-", dir="/run"))
    try:
        os.chmod(top, 0o755)
        state = top / "state"
        state.mkdir(mode=0o700)
        exe = top / "qemu"
        shutil.copy("/bin/true", exe)
        st = os.stat(exe)
        rec = record(state, executable=str(exe), exe_dev=st.st_dev, exe_ino=st.st_ino)
        rec = rec.replace(in_place=())
        Path(rec.state_file).write_bytes(b"abc")
        shutil.copy("/bin/true", top / "new")
        os.replace(top / "new", exe)  # apt's way: a new inode at the same path
        assert os.stat(exe).st_ino != st.st_ino
        check_files(rec, state)  # accepted
        os.chmod(top, 0o775)  # now a group could have swapped it
        with pytest.raises(RestoreError) as err:
            check_files(rec, state)
        assert f"and {top} is not root's alone (uid 0, mode 0775): refused" in str(err.value)
    finally:
        shutil.rmtree(top)


# --- real QEMUs ------------------------------------------------------------------------


@pytest.mark.qemu
def test_planted_socket_is_refused_and_nothing_is_run(
    guests: GuestFactory, daemon: Daemon, journald: Journald, vm_dir_root: Path
) -> None:
    """A QEMU whose socket sits below a directory a user owns, started from a binary that
    user then replaces with a canary: refused in check, status, the journal and prepare,
    and the canary never runs (Check used to run ``<exe> --version`` as root)."""
    home = vm_dir_root / "home"  # a user's directory
    home.mkdir()
    os.chown(home, NOBODY, NOBODY)
    planted = home / "qemu-system-x86_64"
    shutil.copy(QEMU, planted)
    os.chown(planted, NOBODY, NOBODY)
    # <root>/evil/qmp.sock matches the globs; its real path is in the user's directory.
    (vm_dir_root / "evil").symlink_to(home / "evil")
    (good,) = guests(GuestSpec("good"))
    (evil,) = start_guests([GuestSpec("evil", qemu=str(planted))], home, guest_image())
    try:
        marker = vm_dir_root / "canary-ran"
        canary = home / "canary"
        canary.write_text(f'#!/bin/sh\necho "$@" > {marker}\n')
        os.chmod(canary, 0o755)
        os.chown(canary, NOBODY, NOBODY)
        os.rename(canary, planted)  # what the user may do: /proc/PID/exe now says (deleted)
        sock = vm_dir_root / "evil" / "qmp.sock"
        why = (
            f"refused: {home} is owned by uid {NOBODY}, not root or a trusted uid "
            f"(the real path of {sock})"
        )
        deadline = time.monotonic() + 30
        while True:
            check = daemon.ctl("check")
            if f"{sock}: {why}" in check.stdout.splitlines():
                break
            assert time.monotonic() < deadline, (check.stdout, check.stderr)
            time.sleep(0.5)
        assert check.returncode == 1
        assert check.stdout.splitlines()[0] == "good: save live (RAM copied): ok"
        status = json.loads(daemon.ctl("status", "--json").stdout)
        assert [vm["name"] for vm in status["vms"]] == ["good"]
        refused = [c for c in status["check"] if c["name"] == str(sock)]
        assert [(c["ok"], c["problems"]) for c in refused] == [(False, [why])]
        (entry, *_) = journald.entries(MESSAGE_ID=Event.REFUSED.value)
        assert entry["MESSAGE"] == f"{sock}: {why} (see TRUST in cprd.yaml(5))"
        prepare = daemon.ctl("prepare-kexec")
        assert prepare.returncode != 0 and str(sock) in prepare.stderr, prepare.stderr
        assert not os.path.lexists(vm_dir_root / "state" / "manifest.yaml")
        assert good.runstate() == "running" and evil.runstate() == "running"
        assert not marker.exists(), marker.read_text()
    finally:
        evil.cleanup()


@pytest.mark.qemu
async def test_peer_uid_rule_on_real_processes(
    guests: GuestFactory, vm_dir_root: Path, standin: StandIn
) -> None:
    """A process that made its socket as root but runs as nobody without its own option
    (the stand-in) is refused, unless nobody is trusted; a real QEMU that drops to nobody
    with -run-with user=nobody is a VM."""
    path = standin("dropped", "nobody")
    (vm,) = guests(GuestSpec("runwith", extra_args=["-run-with", "user=nobody"]))
    inventory = Inventory(make_config(vm_dir_root))
    try:
        await inventory.scan()
        assert [h.name for h in inventory.vms()] == ["runwith"]
        (handle,) = inventory.vms()
        assert handle.facts.pid == vm.pid
        assert handle.identity is not None and handle.identity.uids == (NOBODY,) * 4
        assert handle.pidfd is not None and handle.process_alive()
        assert inventory.refused() == {
            path: "refused: its QEMU runs as uid 65534, not root, a trusted uid or its own "
            "-run-with user"
        }
    finally:
        await inventory.close()
    # With nobody trusted, the stand-in gets as far as QMP (where its garbage fails it).
    cfg = make_config(vm_dir_root)
    cfg = dataclasses.replace(
        cfg, discovery=dataclasses.replace(cfg.discovery, trusted_uids=(NOBODY,))
    )
    trusting = Inventory(cfg)
    try:
        await trusting.scan()
        assert trusting.refused() == {}
        assert trusting._retry[path].last_error.startswith("malformed QMP reply: query-status")
    finally:
        await trusting.close()


async def test_machine_type_from_qmp_is_a_name(vm_dir_root: Path, standin: StandIn) -> None:
    """The machine type QEMU reports is written into the relaunch's ``-machine`` value: a
    compromised QEMU naming ``pc-q35-10.0,dump-guest-core=on`` would choose machine
    properties for its next start. Refused as a malformed reply; a manifest carrying
    such a name is refused as corrupt."""
    path = standin("machine", "machine")
    inventory = Inventory(make_config(vm_dir_root))
    try:
        await inventory.scan()
        assert inventory.vms() == []
        assert inventory._retry[path].last_error == (
            "malformed QMP reply: qom-get /machine type: "
            "'pc-q35-10.0,dump-guest-core=on-machine' is not a machine type"
        )
    finally:
        await inventory.close()


@pytest.mark.qemu
async def test_garbage_reply_leaves_discovery_running(
    guests: GuestFactory, vm_dir_root: Path, standin: StandIn
) -> None:
    """A compromised QEMU (the stand-in) answers query-status with garbage: a QMPError for
    it alone; the watcher goes on, holds a QEMU that appears later, and saves the others."""
    bad = standin("garbage", "garbage")
    (good,) = guests(GuestSpec("good"))
    cfg = make_config(vm_dir_root)
    inventory = Inventory(cfg, poll_interval=0.2)
    inventory.start()
    try:

        async def until(ok: Callable[[], bool], timeout: float = 30) -> None:
            deadline = time.monotonic() + timeout
            while not ok():
                assert inventory._task is not None and not inventory._task.done()
                assert time.monotonic() < deadline, inventory._retry
                await asyncio.sleep(0.1)

        await until(
            lambda: [h.name for h in inventory.vms()] == ["good"] and bad in inventory._retry
        )
        assert inventory._retry[bad].last_error == (
            "malformed QMP reply: query-status: expected dict, got ['garbage', {'status': 5}]"
        )
        (late,) = await asyncio.to_thread(guests, GuestSpec("late"))
        await until(lambda: [h.name for h in inventory.vms()] == ["good", "late"])
        saver = Saver(cfg, inventory)
        manifest = await saver.prepare()
        assert sorted(r.name for r in manifest.vms) == ["good", "late"]
        assert await saver.resume() == {"good": "resumed (running)", "late": "resumed (running)"}
        assert good.runstate() == "running" and late.runstate() == "running"
    finally:
        await inventory.close()


def rewrite_argv(pid: int, old: bytes, new: bytes) -> None:
    """Rewrite a QEMU's argv in its memory (what /proc/PID/cmdline returns), as root."""
    assert len(old) == len(new)
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    arg_start, arg_end = int(fields[48 - 3]), int(fields[49 - 3])
    with open(f"/proc/{pid}/mem", "r+b", buffering=0) as mem:
        mem.seek(arg_start)
        args = mem.read(arg_end - arg_start)
        at = args.index(old)
        mem.seek(arg_start + at)
        mem.write(new)


@pytest.mark.qemu
async def test_commit_refuses_a_changed_process(guests: GuestFactory, vm_dir_root: Path) -> None:
    """The same QEMU process, its argv rewritten in memory between prepare and commit, is
    refused; so is one whose executable file was replaced. Nothing is quit."""
    bindir = vm_dir_root / "bin"
    bindir.mkdir()
    copy = bindir / "qemu-system-x86_64"
    shutil.copy(QEMU, copy)
    argv_vm, exe_vm = guests(GuestSpec("argv"), GuestSpec("exe", qemu=str(copy)))
    cfg = make_config(vm_dir_root)
    inventory = Inventory(cfg)
    saver = Saver(cfg, inventory)
    try:
        await saver.prepare(only={"argv"})
        rewrite_argv(argv_vm.pid, b"-no-user-config", b"-no-user-confiG")
        assert b"-no-user-confiG" in Path(f"/proc/{argv_vm.pid}/cmdline").read_bytes()
        with pytest.raises(TrustError) as err:
            await saver.commit()
        assert str(err.value) == (
            "argv: its QEMU is not the process cprd inspected: its command line changed"
        )
        assert mf.read(cfg.manifest_path).phase is Phase.PREPARED
        assert argv_vm.runstate() == "postmigrate"
        assert await saver.resume() == {"argv": "resumed (running)"}

        await saver.prepare(only={"exe"})
        shutil.copy(QEMU, bindir / "new")
        os.replace(bindir / "new", copy)  # a new inode at the same path
        with pytest.raises(TrustError) as err:
            await saver.commit()
        assert str(err.value) == f"exe: its executable file {copy} was replaced since prepare"
        assert mf.read(cfg.manifest_path).phase is Phase.PREPARED
        assert await saver.resume() == {"exe": "resumed (running)"}
        assert argv_vm.runstate() == "running" and exe_vm.runstate() == "running"

        # The kexec goes ahead (commit anyway): the changed QEMU is dropped from the
        # manifest, never quit nor relaunched; the others are committed.
        await saver.prepare()
        manifest = await saver.commit(anyway=True)
        assert [r.name for r in manifest.vms] == ["exe"]
        assert argv_vm.runstate() == "postmigrate" and exe_vm.running_pids() == []
    finally:
        await inventory.close()


@pytest.mark.qemu
def test_group_member_sees_no_secret(
    daemon: Daemon, cprd_accounts: CprdAccounts, vm_dir_root: Path
) -> None:
    state = vm_dir_root / "state"
    rec = record(state)
    rec = rec.replace(
        argv=(
            *rec.argv,
            "-object",
            '{"qom-type":"secret","id":"s1","data":"TOPSECRET2"}',
            "-spice",
            "password=TOPSECRET3",
        )
    )
    mf.write(state / "manifest.yaml", Manifest.new(Phase.COMMITTED, (rec,)))
    member = (cprd_accounts.member_uid, cprd_accounts.member_gid, cprd_accounts.member_groups)
    seen = daemon.ctl("manifest", "--yaml", user=member)
    assert seen.returncode == 0, seen.stderr
    assert "TOPSECRET" not in seen.stdout
    shown = mf.loads(seen.stdout.encode(), "member").vms[0].argv
    assert shown == redact_argv(rec.argv) and shown != rec.argv
    as_json = daemon.ctl("manifest", "--json", user=member)
    assert as_json.returncode == 0 and "<redacted>" in as_json.stdout
    assert "TOPSECRET" not in as_json.stdout
    full = daemon.ctl("manifest", "--yaml")
    assert full.returncode == 0 and mf.loads(full.stdout.encode(), "root").vms[0].argv == rec.argv
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o700


def test_upgrade_probe_runs_as_nobody_without_capabilities() -> None:
    """``upgrade-qemu`` needs the version of the binary on disk: it is run as nobody, with
    no capabilities and an empty environment, and only when root owns it."""
    d = Path(tempfile.mkdtemp(prefix="cprdt-", dir="/tmp"))
    try:
        os.chmod(d, 0o755)
        probe = d / "qemu-system-x86_64"
        probe.write_text(
            "#!/bin/sh\n"
            "cap=$(awk '/^CapEff/ {print $2}' /proc/self/status)\n"
            'echo "QEMU emulator version $(id -u).$((0x$cap)).${HOME:-0}"\n'
        )
        os.chmod(probe, 0o755)
        assert qemu_version(str(probe)) == (NOBODY, 0, 0)
        os.chown(probe, NOBODY, NOBODY)
        with pytest.raises(TrustError) as err:
            qemu_version(str(probe))
        assert str(err.value) == f"QEMU binary refused: {probe} is owned by uid {NOBODY}, not root"
    finally:
        shutil.rmtree(d)
