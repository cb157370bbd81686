"""Real system services for tests: a private system bus and a private systemd-journald.

Fixtures (import them into conftest.py: ``from fixtures_bus import *``):

- ``cprd_accounts`` (session): makes sure group ``cprd`` and the system user ``cprd-test``
  (member of ``cprd``) exist on this machine, creating them idempotently.
- ``dbus_daemon``: a private ``dbus-daemon`` of type system, deny-by-default like
  /usr/share/dbus-1/system.conf, whose ``<includedir>`` holds a copy of the project's own
  config/org.cprd.Cprd1.conf, so tests exercise the policy that gets installed.
- ``journald``: a real ``systemd-journald`` serving /run/systemd/journal/socket, whose
  journal files live in a directory of this test only; ``entries()`` reads them back.

Both are context managers first (``run_dbus_daemon``, ``run_journald``) so a test can also
check what is left after they end. Neither needs systemd as PID 1; both need root.

Failures raise ServiceError, never assert, so pytest need not rewrite this module; the
marker PYTEST_DONT_REWRITE spares the "already imported" warning when it is both imported
by a test module or conftest and named in ``pytest_plugins``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import grp
import json
import os
import pwd
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

__all__ = [
    "CPRD_GROUP",
    "JOURNAL_RUNTIME_DIR",
    "JOURNAL_SOCKET",
    "PROJECT_POLICY",
    "TEST_MEMBER",
    "BusDaemon",
    "CprdAccounts",
    "JournalEntry",
    "Journald",
    "ServiceError",
    "cprd_accounts",
    "dbus_daemon",
    "ensure_test_accounts",
    "journald",
    "run_dbus_daemon",
    "run_journald",
]

PROJECT_POLICY = Path(__file__).resolve().parent.parent / "config" / "org.cprd.Cprd1.conf"
CPRD_GROUP = "cprd"
TEST_MEMBER = "cprd-test"

DBUS_DAEMON = "/usr/bin/dbus-daemon"
JOURNALD = "/lib/systemd/systemd-journald"
JOURNALCTL = "/usr/bin/journalctl"
JOURNAL_RUNTIME_DIR = Path("/run/systemd/journal")
JOURNAL_SOCKET = JOURNAL_RUNTIME_DIR / "socket"
# What systemd-journald 252 creates in JOURNAL_RUNTIME_DIR; it unlinks none of it on exit.
_JOURNALD_RUNTIME_ENTRIES = (
    "socket",
    "stdout",
    "dev-log",
    "io.systemd.journal",
    "streams",
    "kernel-seqnum",
    "seqnum",
    "synced",
    "flushed",
)

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0

JournalEntry = dict[str, Any]
"""One entry as ``journalctl -o json`` prints it: field name -> str (or list/bytes-array)."""

_FIELD_RE = re.compile(r"_{0,1}[A-Z0-9][A-Z0-9_]*")


class ServiceError(RuntimeError):
    """A test service could not be started (the message says why and what to do)."""


# ---------------------------------------------------------------------------------------
# Accounts
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CprdAccounts:
    """Ids of the accounts the policy tests run clients as."""

    cprd_gid: int
    member_uid: int
    member_gid: int
    """Primary group of ``cprd-test`` (nogroup): membership of ``cprd`` is supplementary,
    as for an operator added with ``usermod -aG cprd``."""

    @property
    def member_groups(self) -> list[int]:
        """Supplementary groups a login of ``cprd-test`` gets (includes ``cprd``)."""
        return sorted(set(os.getgrouplist(TEST_MEMBER, self.member_gid)))


def _run_admin(argv: Sequence[str]) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    if proc.returncode != 0:
        raise ServiceError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")


def _exists(lookup: Callable[[str], object], name: str) -> bool:
    try:
        lookup(name)
    except KeyError:
        return False
    return True


def _create_unless_exists(lookup: Callable[[str], object], name: str, argv: list[str]) -> None:
    if _exists(lookup, name):
        return
    try:
        _run_admin([*argv, name])
    except ServiceError:
        if not _exists(lookup, name):  # else a concurrent run created it first
            raise


def ensure_test_accounts() -> CprdAccounts:
    """Create group ``cprd`` and system user ``cprd-test`` (in ``cprd``) unless present.

    Idempotent and safe against a concurrent run creating them first. The group must exist
    before dbus-daemon loads the policy: it resolves ``<policy group="cprd">`` at load time
    and drops the rules of an unknown group with nothing but a log line."""
    _create_unless_exists(grp.getgrnam, CPRD_GROUP, ["groupadd", "--system"])
    _create_unless_exists(
        pwd.getpwnam,
        TEST_MEMBER,
        [
            "useradd",
            "--system",
            "--no-create-home",
            "--home-dir=/nonexistent",
            "--shell=/usr/sbin/nologin",
            "--gid=nogroup",
            f"--groups={CPRD_GROUP}",
        ],
    )
    group = grp.getgrnam(CPRD_GROUP)
    user = pwd.getpwnam(TEST_MEMBER)
    if TEST_MEMBER not in group.gr_mem and user.pw_gid != group.gr_gid:
        _run_admin(["usermod", "--append", f"--groups={CPRD_GROUP}", TEST_MEMBER])
    return CprdAccounts(cprd_gid=group.gr_gid, member_uid=user.pw_uid, member_gid=user.pw_gid)


@pytest.fixture(scope="session")
def cprd_accounts() -> CprdAccounts:
    """Group ``cprd`` and user ``cprd-test`` exist (created if missing)."""
    try:
        return ensure_test_accounts()
    except ServiceError as err:
        pytest.fail(f"cannot set up test accounts: {err} (run the tests as root)", pytrace=False)


# ---------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after STOP_TIMEOUT_S; always reaps the process."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT_S)


def _tail(path: Path, limit: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:].strip()
    except OSError:
        return ""


# ---------------------------------------------------------------------------------------
# dbus-daemon
# ---------------------------------------------------------------------------------------

_DTD = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">"""

# The default policy of /usr/share/dbus-1/system.conf (dbus 1.14), verbatim in effect:
# deny owning and method calls, allow signals and requested replies, allow the bus driver.
_BUS_CONF = """{dtd}
<!-- Private system bus for cprd's tests: Debian's system.conf without service
     activation, syslog, pidfile, fork or user switch. -->
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>

  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Properties"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Containers1"/>
    <deny send_destination="org.freedesktop.DBus"
          send_interface="org.freedesktop.DBus"
          send_member="UpdateActivationEnvironment"/>
    <deny send_destination="org.freedesktop.DBus"
          send_interface="org.freedesktop.DBus.Debug.Stats"/>
    <deny send_destination="org.freedesktop.DBus"
          send_interface="org.freedesktop.systemd1.Activator"/>
  </policy>

  <policy user="root">
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Monitoring"/>
  </policy>

  <includedir>{includedir}</includedir>
</busconfig>
"""

_STANDINS_CONF = """{dtd}
<!--
  TEST-ONLY. Never install this file. It lets the test suite's root-owned stand-ins
  for logind and systemd take their well-known names on the private test bus (on a real
  host the packages' own policies do this) and lets root call them.
-->
<busconfig>
  <policy user="root">
    <allow own="org.freedesktop.login1"/>
    <allow own="org.freedesktop.systemd1"/>
    <allow send_destination="org.freedesktop.login1"/>
    <allow send_destination="org.freedesktop.systemd1"/>
  </policy>
</busconfig>
"""

# dbus-daemon does NOT refuse a broken file in an <includedir>: it logs this and skips the
# file (only the main config and <include> are fatal). Unknown users/groups in a policy are
# likewise only logged, and their rules dropped. The fixture turns these into failures.
_CONFIG_PROBLEMS = ("Encountered error", "Unknown group", "Unknown username", "Unknown user")


@dataclasses.dataclass(frozen=True)
class BusDaemon:
    """A running private system bus."""

    address: str
    """D-Bus address as the daemon printed it (``unix:path=...,guid=...``)."""
    pid: int
    socket_path: Path
    config_file: Path
    log_file: Path
    """dbus-daemon's stderr (config warnings, rejected messages)."""

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")


def _read_address(fd: int, proc: subprocess.Popen[bytes], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    data = b""
    while not data.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ServiceError(f"dbus-daemon printed no address within {timeout} s")
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            proc.wait(timeout=STOP_TIMEOUT_S)
            raise ServiceError(f"dbus-daemon exited with status {proc.returncode}")
        data += chunk
    return data.decode().strip()


@contextlib.contextmanager
def run_dbus_daemon(
    policy_files: Sequence[Path] = (PROJECT_POLICY,), *, timeout: float = START_TIMEOUT_S
) -> Iterator[BusDaemon]:
    """Run a private system-type dbus-daemon whose includedir holds ``policy_files``
    (copied) plus the test-only stand-in policy; stop it and remove its directory after.

    Raises ServiceError if it does not start, or if it reports a policy file it could not
    parse or a user/group it does not know."""
    # Not under pytest's tmp_path: that is 0700, and clients running as other users must
    # reach the socket. The daemon creates the socket world-connectable.
    directory = Path(tempfile.mkdtemp(prefix="cprd-bus-", dir="/tmp"))
    try:
        directory.chmod(0o755)
        includedir = directory / "system.d"
        includedir.mkdir()
        for policy in policy_files:
            shutil.copyfile(policy, includedir / policy.name)
        (includedir / "zz-test-only-standins.conf").write_text(_STANDINS_CONF.format(dtd=_DTD))
        socket_path = directory / "bus.sock"
        config_file = directory / "bus.conf"
        config_file.write_text(
            _BUS_CONF.format(dtd=_DTD, socket=socket_path, includedir=includedir)
        )
        log_file = directory / "dbus-daemon.log"
        read_fd, write_fd = os.pipe()
        try:
            with log_file.open("wb") as log:
                proc = subprocess.Popen(
                    [
                        DBUS_DAEMON,
                        f"--config-file={config_file}",
                        "--nofork",
                        "--nosyslog",
                        "--nopidfile",
                        f"--print-address={write_fd}",
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=log,
                    pass_fds=(write_fd,),
                )
            os.close(write_fd)
            write_fd = -1
            try:
                try:
                    address = _read_address(read_fd, proc, timeout)
                except ServiceError as err:
                    raise ServiceError(f"{err}; its log: {_tail(log_file)}") from None
                # Config diagnostics are all written before the address is printed.
                problems = [
                    line
                    for line in _tail(log_file, 100_000).splitlines()
                    if any(p in line for p in _CONFIG_PROBLEMS)
                ]
                if problems:
                    raise ServiceError(
                        "dbus-daemon ignored part of its policy: " + " | ".join(problems)
                    )
                yield BusDaemon(
                    address=address,
                    pid=proc.pid,
                    socket_path=socket_path,
                    config_file=config_file,
                    log_file=log_file,
                )
            finally:
                _stop(proc)
        finally:
            os.close(read_fd)
            if write_fd >= 0:
                os.close(write_fd)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def dbus_daemon(cprd_accounts: CprdAccounts) -> Iterator[BusDaemon]:
    """A private system bus with the project's policy; ``.address``, ``.pid``."""
    with contextlib.ExitStack() as stack:
        try:
            bus = stack.enter_context(run_dbus_daemon())
        except ServiceError as err:
            pytest.fail(f"private dbus-daemon: {err}", pytrace=False)
        yield bus


# ---------------------------------------------------------------------------------------
# systemd-journald
# ---------------------------------------------------------------------------------------

# Runs inside `unshare --mount --propagation private`, then becomes journald. The mounts
# are private to journald, so its journal files land in the test's directory while the
# sockets it creates in /run/systemd/journal stay visible to everyone:
# - /run/log is the test directory: journald writes /run/log/journal/<machine-id>/ there
#   (volatile storage; it never switches to /var/log/journal unless a flush is requested);
# - /var/log is an empty read-only tmpfs, so even Storage=persistent cannot touch the
#   host's persistent journal, and no earlier run's entries are visible.
_JOURNALD_LAUNCHER = """
import os, subprocess, sys
log_dir, journald = sys.argv[1], sys.argv[2]
for argv in (["mount", "--bind", log_dir, "/run/log"],
             ["mount", "-t", "tmpfs", "-o", "ro,size=4k,mode=0755", "cprd-test", "/var/log"]):
    subprocess.run(argv, check=True, timeout=10)
os.execv(journald, [journald])
"""


def _journald_alive() -> bool:
    """Whether something serves JOURNAL_SOCKET (a leftover socket file refuses)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(str(JOURNAL_SOCKET))
        except OSError:
            return False
    return True


def _remove_journald_runtime() -> None:
    """Remove what journald leaves in /run/systemd/journal, and the directory if empty."""
    for name in _JOURNALD_RUNTIME_ENTRIES:
        path = JOURNAL_RUNTIME_DIR / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    with contextlib.suppress(OSError):
        JOURNAL_RUNTIME_DIR.rmdir()


def _is_nonempty(found: list[JournalEntry]) -> bool:
    return bool(found)


@dataclasses.dataclass(frozen=True)
class Journald:
    """A running systemd-journald private to one test."""

    pid: int
    directory: Path
    """Journal directory of this instance only (``journalctl --directory``)."""
    _proc: subprocess.Popen[bytes] = dataclasses.field(repr=False, compare=False)

    def sync(self) -> None:
        """Have journald write out everything it received before this call.

        ``journalctl --sync`` (varlink io.systemd.Journal.Synchronize) returns once
        journald has processed the messages queued on its sockets and written them."""
        if self._proc.poll() is not None:
            return
        subprocess.run([JOURNALCTL, "--sync"], check=True, timeout=10, capture_output=True)

    def entries(
        self,
        *,
        until: Callable[[list[JournalEntry]], bool] = _is_nonempty,
        timeout: float = 5.0,
        **match: str,
    ) -> list[JournalEntry]:
        """Entries of this journald instance matching every ``FIELD=value`` given, oldest
        first, e.g. ``entries(CPRD_VM="web1")``.

        Polls (sync, read) until ``until(entries)`` holds (default: at least one entry) or
        ``timeout`` seconds passed, then returns what it read: assert on the result. For
        "nothing was logged", pass ``until=lambda e: False`` with a short timeout."""
        for field in match:
            if not _FIELD_RE.fullmatch(field):
                raise ValueError(f"not a journal field name: {field!r}")
        argv = [
            JOURNALCTL,
            f"--directory={self.directory}",
            "--output=json",
            "--all",
            "--no-pager",
            "--quiet",
            *(f"{field}={value}" for field, value in match.items()),
        ]
        deadline = time.monotonic() + timeout
        while True:
            self.sync()
            out = subprocess.run(argv, check=True, timeout=10, capture_output=True, text=True)
            found: list[JournalEntry] = [
                json.loads(line) for line in out.stdout.splitlines() if line.strip()
            ]
            if until(found) or time.monotonic() >= deadline:
                return found
            time.sleep(0.05)


@contextlib.contextmanager
def run_journald(directory: Path, *, timeout: float = START_TIMEOUT_S) -> Iterator[Journald]:
    """Run systemd-journald writing its journal under ``directory``; at exit stop it and
    remove its sockets, so that /run/systemd/journal/socket no longer exists.

    Raises ServiceError if another journald already serves the socket: sharing it would mix
    foreign entries in and stop a journald that is not ours."""
    if _journald_alive():
        raise ServiceError(
            f"a systemd-journald is already running ({JOURNAL_SOCKET} accepts messages); "
            "the tests start their own: stop the running one first"
        )
    _remove_journald_runtime()  # a dead instance's socket, or its 'flushed' marker
    log_dir = directory / "run-log"
    log_dir.mkdir(parents=True, exist_ok=True)
    Path("/run/log").mkdir(exist_ok=True)  # the bind mount's target
    stderr_file = directory / "journald.stderr"
    with stderr_file.open("wb") as stderr:
        proc = subprocess.Popen(
            [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "--",
                sys.executable,
                "-I",
                "-c",
                _JOURNALD_LAUNCHER,
                str(log_dir),
                JOURNALD,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        deadline = time.monotonic() + timeout
        while not _journald_alive():
            if proc.poll() is not None:
                status = proc.returncode
                raise ServiceError(f"systemd-journald exited ({status}): {_tail(stderr_file)}")
            if time.monotonic() >= deadline:
                raise ServiceError(f"systemd-journald did not serve {JOURNAL_SOCKET} in time")
            time.sleep(0.02)
        yield Journald(pid=proc.pid, directory=log_dir / "journal", _proc=proc)
    finally:
        _stop(proc)
        _remove_journald_runtime()


@pytest.fixture
def journald(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Journald]:
    """A real systemd-journald of this test only; ``.entries(CPRD_VM="web1")``.

    Fails the test if another journald already runs. After teardown no journald socket is
    left, so code that checks for journald sees none."""
    with contextlib.ExitStack() as stack:
        try:
            instance = stack.enter_context(run_journald(tmp_path_factory.mktemp("journald")))
        except ServiceError as err:
            pytest.fail(f"journald: {err}", pytrace=False)
        yield instance
    if JOURNAL_SOCKET.exists():
        pytest.fail(f"{JOURNAL_SOCKET} still exists after journald stopped", pytrace=False)
