"""Real QEMU test guests for cprd's tests (plain module, no pytest here).

The guest is built by tests/guest/build.sh: a Debian kernel with a busybox initramfs that
runs qemu-ga on the virtio-serial port (or, with ``GuestSpec.agent_mode``, a hostile shell
agent), optionally fills ``cprd.fill=<MiB>`` of tmpfs with random data (and keeps
rewriting ``cprd.dirty=<MiB>``), prints
``cprd-guest-ready`` and then ``cprd-tick N`` (N = 1, 2, ...) once a second on its serial
console, which QEMU writes to ``<dir>/serial.log``.

Each VM gets two QMP sockets: ``qmp.sock`` for cprd (the daemon under test) and
``test-qmp.sock`` for the test's own look (a QMP socket serves one client at a time), and
the guest agent's socket ``qga.sock``. All live in the VM directory the caller passes in,
which must be short: UNIX socket paths are limited to 107 bytes.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import dataclasses
import enum
import functools
import json
import os
import random
import re
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast

from qemu.qmp.legacy import QEMUMonitorProtocol

__all__ = [
    "AGENT_MODES",
    "AgentError",
    "ExecResult",
    "GuestFactory",
    "GuestSpec",
    "GuestVM",
    "Memory",
    "exe_name",
    "guest_image",
    "is_alive",
    "start_guests",
]

REPO = Path(__file__).resolve().parent.parent
BUILD_SH = REPO / "tests" / "guest" / "build.sh"
QEMU = os.environ.get("CPRD_TEST_QEMU", "qemu-system-x86_64")

READY_MARK = "cprd-guest-ready"
#: The hostile guest agents tests/guest/build.sh knows (GuestSpec.agent_mode).
AGENT_MODES = ("longline", "endless", "deep", "errint", "badutf8", "drip")
_TICK_RE = re.compile(r"cprd-tick (\d+)\r?\n")
_SUN_PATH_MAX = 107

_T = TypeVar("_T")


class AgentError(Exception):
    """The guest agent answered with an error, or not at all."""


class Memory(enum.Enum):
    """How the guest's RAM is backed."""

    PRIVATE = "private"  # plain -m: anonymous private memory
    FILE = "file"  # memory-backend-file,share=on on disk in the VM directory
    SHM = "shm"  # memory-backend-file,share=on under /dev/shm (removed on cleanup)
    MEMFD = "memfd"  # memory-backend-memfd,share=on


@dataclasses.dataclass
class GuestSpec:
    name: str
    memory: Memory = Memory.PRIVATE
    mem_mib: int = 128
    machine: str = "q35"  # or "pc"
    fill_mib: int = 0
    #: MiB of guest memory the guest keeps rewriting (build.sh, cprd.dirty=)
    dirty_mib: int = 0
    agent: bool = True
    #: None: the real qemu-ga. Otherwise a hostile shell agent in the guest (tests/guest/
    #: build.sh, cprd.agent=): "longline", "endless", "deep", "errint", "badutf8" or
    #: "drip", which answers the first ``agent_good`` requests (guest-sync, guest-ping)
    #: correctly and every later one with that hostile reply.
    agent_mode: str | None = None
    agent_good: int = 2
    extra_args: list[str] = dataclasses.field(default_factory=list)
    #: the QEMU binary (default: CPRD_TEST_QEMU or qemu-system-x86_64 on PATH)
    qemu: str | None = None
    #: start QEMU as (uid, gid, supplementary groups); its VM directory is given to that
    #: uid (the directory above it must then be searchable by it)
    run_as: tuple[int, int, tuple[int, ...]] | None = None
    #: QEMU's environment (default: the test's own) and working directory (default: the
    #: VM directory)
    env: dict[str, str] | None = None
    cwd: Path | None = None


@functools.cache
def guest_image() -> tuple[Path, Path]:
    """Build (or find in the cache) the test guest; return (vmlinuz, initrd)."""
    proc = subprocess.run(
        ["bash", str(BUILD_SH)],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{BUILD_SH} failed ({proc.returncode}):\n{proc.stderr}")
    lines = proc.stdout.strip().splitlines()
    if not lines:
        raise RuntimeError(f"{BUILD_SH} printed no directory:\n{proc.stderr}")
    out = Path(lines[-1])
    kernel, initrd = out / "vmlinuz", out / "initrd.img"
    for f in (kernel, initrd):
        if not f.is_file():
            raise RuntimeError(f"{BUILD_SH} did not produce {f}")
    return kernel, initrd


def exe_name(pid: int) -> str | None:
    """Basename of /proc/PID/exe, or None (gone, zombie, kernel thread)."""
    try:
        return os.path.basename(os.readlink(f"/proc/{pid}/exe")).removesuffix(" (deleted)")
    except OSError:
        return None


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0")[:-1]]


def is_alive(pid: int) -> bool:
    """True if pid exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _wait_for(
    what: str, predicate: Callable[[], _T | None], timeout: float, interval: float = 0.1
) -> _T:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value is not None and value is not False:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"({path} not readable)"
    return "\n".join(text.splitlines()[-lines:])


class GuestVM:
    """One QEMU process running the test guest (TCG)."""

    def __init__(self, spec: GuestSpec, vm_dir: Path, image: tuple[Path, Path]) -> None:
        if spec.machine not in ("q35", "pc"):
            raise ValueError(f"unsupported machine {spec.machine!r} (q35 or pc)")
        self.spec = spec
        self.name = spec.name
        self.dir = Path(vm_dir)
        self.qmp_path = self.dir / "qmp.sock"
        self.test_qmp_path = self.dir / "test-qmp.sock"
        self.qga_path = self.dir / "qga.sock"
        self.serial_log = self.dir / "serial.log"
        self.qemu_log = self.dir / "qemu.log"
        for sock in (self.qmp_path, self.test_qmp_path, self.qga_path):
            if len(os.fsencode(sock)) > _SUN_PATH_MAX:
                raise ValueError(f"socket path too long for AF_UNIX: {sock}")
        self.mem_path: Path | None = None
        if spec.memory is Memory.FILE:
            self.mem_path = self.dir / "ram0.mem"
        elif spec.memory is Memory.SHM:
            self.mem_path = Path("/dev/shm") / f"cprd-test-{spec.name}-{uuid.uuid4().hex[:8]}.mem"
        self.image = image
        self.argv: list[str] = self._build_argv()
        self.proc: subprocess.Popen[bytes] | None = None
        self.launched_at: float | None = None
        self.ready_seconds: float | None = None  # launch to cprd-guest-ready
        self._qmp_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self.dir.mkdir(parents=True, exist_ok=True)
        if spec.run_as is not None:
            os.chown(self.dir, spec.run_as[0], spec.run_as[1])
            self.dir.chmod(0o755)

    def __repr__(self) -> str:
        return f"GuestVM({self.name!r}, dir={str(self.dir)!r})"

    # --- command line -------------------------------------------------------------------

    def _build_argv(self) -> list[str]:
        spec = self.spec
        kernel, initrd = self.image
        # no_timer_check: under a loaded TCG host the kernel's IO-APIC timer check can
        # miss ticks and panic ("IO-APIC + timer doesn't work"); seen here under load.
        append = f"console=ttyS0 quiet no_timer_check cprd.fill={spec.fill_mib}"
        if spec.dirty_mib:
            append += f" cprd.dirty={spec.dirty_mib}"
        if spec.agent_mode is not None:
            if spec.agent_mode not in AGENT_MODES:
                raise ValueError(f"unknown agent_mode {spec.agent_mode!r} (one of {AGENT_MODES})")
            append += f" cprd.agent={spec.agent_mode},{spec.agent_good}"
        machine = spec.machine
        argv = [
            spec.qemu or QEMU,
            "-accel", "tcg",
            "-nodefaults",
            "-display", "none",
            "-no-user-config",
            "-name", spec.name,
        ]  # fmt: skip
        size = f"{spec.mem_mib}M"
        if spec.memory in (Memory.FILE, Memory.SHM):
            argv += [
                "-object",
                f"memory-backend-file,id=ram0,size={size},mem-path={self.mem_path},share=on",
            ]
            machine += ",memory-backend=ram0"
        elif spec.memory is Memory.MEMFD:
            argv += ["-object", f"memory-backend-memfd,id=ram0,size={size},share=on"]
            machine += ",memory-backend=ram0"
        s3 = "ICH9-LPC.disable_s3=0" if spec.machine == "q35" else "PIIX4_PM.disable_s3=0"
        argv += [
            "-machine", machine,
            "-m", size,
            "-global", s3,
            "-kernel", str(kernel),
            "-initrd", str(initrd),
            "-append", append,
            # append=on: a relaunch (restore) keeps the earlier ticks in the same log
            "-chardev", f"file,id=serial0,path={self.serial_log},append=on",
            "-serial", "chardev:serial0",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
            "-qmp", f"unix:{self.test_qmp_path},server=on,wait=off",
        ]  # fmt: skip
        if spec.agent:
            argv += [
                "-chardev", f"socket,id=qga0,path={self.qga_path},server=on,wait=off",
                "-device", "virtio-serial",
                "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
            ]  # fmt: skip
        argv += spec.extra_args
        return argv

    def relaunch_argv(self, extra: Sequence[str] = ()) -> list[str]:
        """A copy of the command line, plus e.g. ["-incoming", "defer"] for a restore."""
        return [*self.argv, *extra]

    # --- process ------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        """The pid of this VM's QEMU: the one launched here, or the one that replaced it."""
        if self.proc is None:
            pids = self.running_pids()
            if len(pids) != 1:
                raise RuntimeError(f"{self}: expected one QEMU, found {pids}")
            return pids[0]
        return self.proc.pid

    def released(self) -> None:
        """The QEMU launched here has exited and another process (a restore) may replace it:
        from now on the VM is followed by its socket, not by the Popen."""
        if self.proc is not None:
            self.proc.wait(timeout=30)
            self.proc = None

    def launch(self, argv: Sequence[str] | None = None) -> None:
        """Popen QEMU (self.argv unless given) without waiting for anything."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError(f"{self} is already running (pid {self.proc.pid})")
        for sock in (self.qmp_path, self.test_qmp_path, self.qga_path):
            sock.unlink(missing_ok=True)
        creds: dict[str, Any] = {}
        if self.spec.run_as is not None:
            uid, gid, groups = self.spec.run_as
            creds = {"user": uid, "group": gid, "extra_groups": list(groups)}
        with self.qemu_log.open("ab") as log:
            self.proc = subprocess.Popen(
                list(argv if argv is not None else self.argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.spec.cwd or self.dir,
                env=self.spec.env,
                **creds,
            )
        self.launched_at = time.monotonic()
        self.ready_seconds = None

    def _check_running(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(
                f"{self}: QEMU exited with {self.proc.returncode}; qemu.log:\n"
                f"{_tail(self.qemu_log)}\nserial.log:\n{_tail(self.serial_log)}"
            )

    def wait_sockets(self, timeout: float = 10) -> None:
        """Wait until both QMP sockets exist."""

        def ready() -> bool:
            self._check_running()
            return self.qmp_path.is_socket() and self.test_qmp_path.is_socket()

        _wait_for(f"{self}'s QMP sockets", ready, timeout, 0.02)

    def start(self, argv: Sequence[str] | None = None) -> None:
        """Launch QEMU and wait until both QMP sockets exist."""
        self.launch(argv)
        self.wait_sockets()

    def wait_ready(self, timeout: float = 60) -> float:
        """Wait for cprd-guest-ready on the serial console; return seconds since launch."""

        def ready() -> bool:
            self._check_running()
            return READY_MARK in self.serial_text()

        try:
            _wait_for(f"{self} to print {READY_MARK}", ready, timeout)
        except TimeoutError as e:
            raise TimeoutError(f"{e}; serial.log:\n{_tail(self.serial_log)}") from None
        if self.ready_seconds is None and self.launched_at is not None:
            self.ready_seconds = time.monotonic() - self.launched_at
        return self.ready_seconds or 0.0

    def running_pids(self) -> list[int]:
        """Live QEMU processes running this VM, including ones launched by others (a
        restore by cprd): found by this VM's unique test-qmp socket path on the command
        line."""
        needle = str(self.test_qmp_path)
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            pid = int(entry)
            name = exe_name(pid)
            if name is None or not name.startswith("qemu-system-"):
                continue
            if any(needle in arg for arg in _cmdline(pid)) and is_alive(pid):
                pids.append(pid)
        return sorted(pids)

    def kill(self) -> None:
        """SIGKILL every QEMU running this VM and wait for it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        for pid in self.running_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        _wait_for(f"{self} to die", lambda: not self.running_pids(), 10)

    def wait_exit(self, timeout: float = 30) -> None:
        """Wait until no QEMU runs this VM any more (e.g. after cprd quit it)."""

        def gone() -> bool:
            if self.proc is not None:
                self.proc.poll()
            return not self.running_pids()

        _wait_for(f"{self} to exit", gone, timeout)

    def stop(self, timeout: float = 10) -> None:
        """Quit QEMU via QMP; SIGKILL if that does not work within timeout."""
        if self.running_pids():
            with contextlib.suppress(Exception):
                self.qmp("quit", qmp_timeout=timeout)
            with contextlib.suppress(TimeoutError):
                self.wait_exit(timeout)
        self.kill()

    def cleanup(self) -> None:
        """Kill, remove /dev/shm backing, stop the QMP helper thread. Idempotent."""
        try:
            self.kill()
        finally:
            if self.spec.memory is Memory.SHM and self.mem_path is not None:
                self.mem_path.unlink(missing_ok=True)
            if self._qmp_pool is not None:
                self._qmp_pool.shutdown(wait=False, cancel_futures=True)
                self._qmp_pool = None

    # --- serial console -----------------------------------------------------------------

    def serial_text(self) -> str:
        try:
            return self.serial_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def ticks(self) -> list[int]:
        """Every complete `cprd-tick N` line so far, in order."""
        return [int(n) for n in _TICK_RE.findall(self.serial_text())]

    def last_tick(self) -> int | None:
        ticks = self.ticks()
        return ticks[-1] if ticks else None

    def wait_tick_above(self, n: int, timeout: float = 10) -> int:
        """Wait until the guest prints a tick > n; return the latest tick.

        When tick n was printed, the counter must have *continued* from it: every tick
        printed after the last ``cprd-tick n`` is n+1, n+2, ... and the guest did not boot
        again meanwhile (no ``cprd-guest-ready``).  A guest that lost its memory and
        rebooted counts from 1 again and fails here, however long it then runs."""

        def above() -> int | None:
            self._check_running()
            last = self.last_tick()
            return last if last is not None and last > n else None

        try:
            last = _wait_for(f"{self} to tick past {n}", above, timeout)
        except TimeoutError as e:
            raise TimeoutError(f"{e}; serial.log:\n{_tail(self.serial_log)}") from None
        self.assert_continued(n)
        return last

    def assert_continued(self, n: int) -> None:
        """The ticks after the last ``cprd-tick n`` continue from n, with no reboot."""
        text = self.serial_text()
        mark = f"cprd-tick {n}\n"
        at = max(text.rfind(mark), text.rfind(f"cprd-tick {n}\r\n"))
        if n <= 0 or at < 0:
            return
        after = text[at + len(mark) :]
        if READY_MARK in after:
            raise AssertionError(
                f"{self}: the guest booted again after tick {n} (its memory was lost); "
                f"serial.log:\n{_tail(self.serial_log)}"
            )
        ticks = [int(t) for t in _TICK_RE.findall(after)]
        expected = list(range(n + 1, n + 1 + len(ticks)))
        if ticks != expected:
            raise AssertionError(
                f"{self}: ticks after {n} are {ticks[:10]}, not {expected[:10]}: "
                "the counter did not continue"
            )

    # --- QMP (test-qmp.sock) ------------------------------------------------------------

    @staticmethod
    def _qmp_call(path: Path, cmd: str, args: dict[str, Any], timeout: float) -> Any:
        # Runs in a worker thread with its own event loop, so this works from sync tests
        # and from async tests (whose loop is already running) alike.
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            mon = QEMUMonitorProtocol(str(path))
            mon.settimeout(timeout)
            mon.connect()
            try:
                return cast(Any, mon.cmd(cmd, **args))
            finally:
                # After "quit" QEMU closes the socket as it exits, and qemu.qmp's reader
                # may meet that end while it disconnects (make faults saw EOFError from
                # close(), after the reply had been read): nothing is lost by it.
                with contextlib.suppress(EOFError, ConnectionError):
                    mon.close()
        finally:
            asyncio.set_event_loop(None)
            loop.close()

    def qmp(self, cmd: str, /, qmp_timeout: float = 10, **args: Any) -> Any:
        """Execute one QMP command over test-qmp.sock; return its "return" value.

        Arguments whose names are not identifiers: vm.qmp("x", **{"max-bandwidth": 0}).
        Raises qemu.qmp.ExecuteError when QEMU answers with an error."""
        timeout = qmp_timeout
        if self._qmp_pool is None:
            self._qmp_pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix=f"qmp-{self.name}"
            )
        fut = self._qmp_pool.submit(self._qmp_call, self.test_qmp_path, cmd, args, timeout)
        try:
            return fut.result(timeout=timeout + 5)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(f"{self}: QMP {cmd} got no answer in {timeout:g} s") from None

    def runstate(self) -> str:
        return cast(str, self.qmp("query-status")["status"])

    def wait_runstate(self, state: str, timeout: float = 10) -> None:
        seen: list[str] = []

        def reached() -> bool:
            seen.append(self.runstate())
            return seen[-1] == state

        try:
            _wait_for(f"{self} runstate {state}", reached, timeout, 0.2)
        except TimeoutError as e:
            raise TimeoutError(f"{e} (last: {seen[-1:]})") from None

    # --- guest agent (qga.sock) ---------------------------------------------------------

    def agent(
        self,
        cmd: str,
        args: dict[str, Any] | None = None,
        timeout: float = 5,
        expect_reply: bool = True,
    ) -> Any:
        """Call the guest agent; return its "return" value (None if expect_reply=False).

        Sends guest-sync with a random id first and discards everything up to its echo,
        so stale replies of an earlier, abandoned call cannot be mistaken for ours."""
        if not self.spec.agent:
            raise AgentError(f"{self} has no guest agent")
        deadline = time.monotonic() + timeout
        sync_id = random.randrange(1, 2**31)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(self.qga_path))
            reader = _LineReader(sock, deadline, f"{self} agent")
            _send_json(sock, {"execute": "guest-sync", "arguments": {"id": sync_id}})
            while True:
                msg = reader.read_json()
                if msg.get("return") == sync_id:
                    break
            request: dict[str, Any] = {"execute": cmd}
            if args:
                request["arguments"] = args
            _send_json(sock, request)
            if not expect_reply:
                return None
            reply = reader.read_json()
        if "error" in reply:
            raise AgentError(f"{self} agent {cmd}: {reply['error']}")
        if "return" not in reply:
            raise AgentError(f"{self} agent {cmd}: unexpected reply {reply!r}")
        return reply["return"]

    def exec(self, argv: Sequence[str], timeout: float = 10) -> ExecResult:
        """Run a command in the guest via guest-exec and wait for it to finish."""
        started = self.agent(
            "guest-exec",
            {"path": argv[0], "arg": list(argv[1:]), "capture-output": True},
            timeout=timeout,
        )
        pid = int(started["pid"])

        def status() -> dict[str, Any] | None:
            st = cast(dict[str, Any], self.agent("guest-exec-status", {"pid": pid}))
            return st if st.get("exited") else None

        st = _wait_for(f"{self}: guest-exec {argv!r}", status, timeout, 0.2)
        return ExecResult(
            exitcode=int(st.get("exitcode", -1)),
            stdout=base64.b64decode(st.get("out-data", "")).decode(errors="replace"),
            stderr=base64.b64decode(st.get("err-data", "")).decode(errors="replace"),
        )


@dataclasses.dataclass(frozen=True)
class ExecResult:
    exitcode: int
    stdout: str
    stderr: str


class GuestFactory(Protocol):
    """Type of the conftest `guests` fixture: start guests, killed at teardown."""

    def __call__(self, *specs: GuestSpec, timeout: float = 60) -> list[GuestVM]: ...


def _send_json(sock: socket.socket, obj: dict[str, Any]) -> None:
    sock.sendall(json.dumps(obj).encode() + b"\n")


class _LineReader:
    def __init__(self, sock: socket.socket, deadline: float, what: str) -> None:
        self.sock = sock
        self.deadline = deadline
        self.what = what
        self.buf = b""

    def read_json(self) -> dict[str, Any]:
        """The next line that parses as a JSON object (other lines are skipped)."""
        while True:
            while b"\n" not in self.buf:
                left = self.deadline - time.monotonic()
                if left <= 0:
                    raise AgentError(f"{self.what}: no reply in time")
                self.sock.settimeout(left)
                try:
                    chunk = self.sock.recv(65536)
                except TimeoutError:
                    raise AgentError(f"{self.what}: no reply in time") from None
                if not chunk:
                    raise AgentError(f"{self.what}: connection closed")
                self.buf += chunk
            line, self.buf = self.buf.split(b"\n", 1)
            try:
                msg = json.loads(line.strip(b"\xff").decode())
            except (UnicodeDecodeError, ValueError):
                continue
            if isinstance(msg, dict):
                return cast(dict[str, Any], msg)


def start_guests(
    specs: Iterable[GuestSpec],
    base_dir: Path,
    image: tuple[Path, Path] | None = None,
    timeout: float = 60,
) -> list[GuestVM]:
    """Start guests in parallel (Popen all, then wait for all): each in base_dir/<name>.

    On failure every guest started here is killed before the exception propagates."""
    image = image if image is not None else guest_image()
    vms: list[GuestVM] = []
    try:
        for spec in specs:
            vm_dir = Path(base_dir) / spec.name
            if vm_dir.exists():
                raise ValueError(f"guest directory {vm_dir} exists: names must be unique")
            vm = GuestVM(spec, vm_dir, image)
            vms.append(vm)
            vm.launch()
        deadline = time.monotonic() + timeout
        for vm in vms:
            vm.wait_sockets()
            vm.wait_ready(max(1.0, deadline - time.monotonic()))
    except BaseException:
        for vm in vms:
            with contextlib.suppress(Exception):
                vm.cleanup()
        raise
    return vms


#: libvirtd in a private mount namespace (run under `unshare --mount --propagation private`):
#: its /run, /etc/libvirt and /var/{lib,cache,log}/libvirt are under $R, so the host's (or
#: another run's) libvirt is never touched; QEMU runs as root without cgroups
#: (cgroup_controllers = [ ]: the host's cgroups stay as they are).  Expects $R, $V (the
#: virsh command) and PID= set and a `cleanup` trap that kills $PID; WITH_VIRTLOGD=1 starts
#: virtlogd too.  Leaves $PID set to libvirtd's once it answers.  Used by
#: tests/test_hosts_qemu.py and scripts/bench_libvirt.py.
PRIVATE_LIBVIRTD = r"""
mkdir -p "$R"/{lib,cache,log,etc}
cp -a /etc/libvirt/. "$R/etc/"
cat >> "$R/etc/qemu.conf" <<'CONF'
user = "root"
group = "root"
security_driver = "none"
namespaces = [ ]
cgroup_controllers = [ ]
stdio_handler = "file"
CONF
mount -t tmpfs tmpfs /run
mount --bind "$R/lib" /var/lib/libvirt
mount --bind "$R/cache" /var/cache/libvirt
mount --bind "$R/log" /var/log/libvirt
mount --bind "$R/etc" /etc/libvirt
if [ -n "${WITH_VIRTLOGD:-}" ]; then virtlogd -d; fi
libvirtd -d
for _ in $(seq 600); do [ -s /run/libvirtd.pid ] && break; sleep 0.1; done
PID=$(cat /run/libvirtd.pid)
for _ in $(seq 600); do $V version >/dev/null 2>&1 && break; sleep 0.2; done
"""
