"""Shared pytest fixtures for cprd's tests.

Real-VM tests are marked ``@pytest.mark.qemu`` and use the fixtures below; the guest
machinery itself lives in tests/harness.py.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import GuestFactory, GuestSpec, GuestVM, exe_name, is_alive, start_guests
from harness import guest_image as build_guest_image

# ---------------------------------------------------------------------------------------
# Leftover-process check (autouse)
# ---------------------------------------------------------------------------------------

# Every process started from this pytest session inherits this variable, so a QEMU that
# was daemonized (reparented away from us), e.g. one cprd restored, is still ours.
SESSION_ENV = "CPRD_TEST_SESSION"
os.environ.setdefault(SESSION_ENV, uuid.uuid4().hex)

WATCHED_EXACT = frozenset({"dbus-daemon", "systemd-journald"})
WATCHED_PREFIX = "qemu-system-"
LEFTOVER_GRACE_S = 3.0


def _is_watched(name: str) -> bool:
    return name in WATCHED_EXACT or name.startswith(WATCHED_PREFIX)


def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def _has_session_env(pid: int) -> bool:
    mark = f"{SESSION_ENV}={os.environ[SESSION_ENV]}".encode()
    try:
        return mark in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False


def watched_processes() -> dict[int, str]:
    """Live qemu-system-*, dbus-daemon and systemd-journald processes that belong to this
    test session (descendants of this process, or carrying this session's environment
    mark), as {pid: "name cmdline"}. Other sessions' processes are never included."""
    me = os.getpid()
    parents: dict[int, int] = {}
    candidates: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        ppid = _ppid(pid)
        if ppid is None:
            continue
        parents[pid] = ppid
        name = exe_name(pid)
        if name is not None and _is_watched(name) and is_alive(pid):
            candidates[pid] = name

    def descends_from_me(pid: int) -> bool:
        seen: set[int] = set()
        while pid > 1 and pid not in seen:
            if pid == me:
                return True
            seen.add(pid)
            pid = parents.get(pid, 0)
        return False

    found: dict[int, str] = {}
    for pid, name in candidates.items():
        if descends_from_me(pid) or _has_session_env(pid):
            try:
                raw = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            cmdline = raw.replace(b"\0", b" ").decode(errors="replace").strip()
            found[pid] = f"{name}: {cmdline[:300]}"
    return found


@pytest.fixture(autouse=True)
def no_leftover_processes() -> Iterator[None]:
    """Fail a test that leaves behind a QEMU, dbus-daemon or systemd-journald process.

    Processes that existed before the test (e.g. from session fixtures) are ignored.
    Leftovers are reported and SIGKILLed. Being autouse, this fixture is set up before and
    torn down after the test's other function-scoped fixtures, so their cleanup counts."""
    before = set(watched_processes())
    yield
    deadline = time.monotonic() + LEFTOVER_GRACE_S
    while True:
        leftovers = {p: d for p, d in watched_processes().items() if p not in before}
        if not leftovers or time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    if not leftovers:
        return
    for pid in leftovers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
    for pid in leftovers:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)  # reap it if it is our child
    report = "\n".join(f"  pid {pid}: {desc}" for pid, desc in sorted(leftovers.items()))
    pytest.fail(f"test left processes behind (now killed):\n{report}", pytrace=False)


# ---------------------------------------------------------------------------------------
# Real QEMU guests
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def guest_image() -> tuple[Path, Path]:
    """(vmlinuz, initrd) of the test guest, built once by tests/guest/build.sh (cached)."""
    return build_guest_image()


@pytest.fixture
def vm_dir_root() -> Iterator[Path]:
    """A short directory (/tmp/cprdt-XXXXXXXX) for VM directories and their sockets.

    Removed afterwards unless CPRD_TEST_KEEP=1."""
    root = Path(tempfile.mkdtemp(prefix="cprdt-", dir="/tmp"))
    yield root
    if os.environ.get("CPRD_TEST_KEEP") == "1":
        print(f"keeping {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def guests(guest_image: tuple[Path, Path], vm_dir_root: Path) -> Iterator[GuestFactory]:
    """Factory: ``guests(GuestSpec("a"), GuestSpec("b", machine="pc"))`` starts the guests
    in parallel under vm_dir_root/<name>, waits until each printed cprd-guest-ready and
    returns them. All are killed at teardown (a restored QEMU too, found by its socket)."""
    started: list[GuestVM] = []

    def start(*specs: GuestSpec, timeout: float = 120) -> list[GuestVM]:
        vms = start_guests(specs, vm_dir_root, guest_image, timeout)
        started.extend(vms)
        return vms

    yield start

    errors: list[BaseException] = []
    for vm in started:
        # Shown by pytest when the test failed.
        print(f"--- {vm.name}: ready after {vm.ready_seconds} s, last tick {vm.last_tick()}")
        print(f"qemu.log: {vm.qemu_log.read_text(errors='replace')[-2000:]!r}")
        try:
            vm.cleanup()
        except Exception as e:
            errors.append(e)
    if errors:
        raise errors[0]


# D-Bus and journald: a private dbus-daemon with the project's own policy, a real
# systemd-journald (tests/fixtures_bus.py).
from fixtures_bus import cprd_accounts, dbus_daemon, journald  # noqa: E402, F401
from fixtures_daemon import daemon  # noqa: E402, F401
