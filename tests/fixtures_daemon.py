"""The real cprd daemon on the private bus, for tests: start, stop, drive with cprdctl."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fixtures_bus import BusDaemon, Journald
from test_cycle import make_config

BIN = Path(sys.executable).parent


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    log: Path
    bus: str
    config: Path

    def ctl(
        self, *args: str, user: tuple[int, int, list[int]] | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        kw: dict[str, Any] = {}
        if user is not None:
            kw.update(user=user[0], group=user[1], extra_groups=user[2])
        return subprocess.run(
            [str(BIN / "cprdctl"), "--bus", self.bus, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            **kw,
        )

    def wait_answering(self, timeout: float = 20) -> None:
        """Wait until the daemon answers `cprdctl status` (it owns its bus name)."""
        deadline = time.monotonic() + timeout
        while self.ctl("status", "--json").returncode != 0:
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.2)

    def wait_state(self, state: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            out = self.ctl("status", "--json")
            if out.returncode == 0 and json.loads(out.stdout)["state"] == state:
                return
            assert time.monotonic() < deadline, (out.stdout, out.stderr, self.log.read_text())
            time.sleep(0.2)


def start_daemon(
    bus: BusDaemon, root: Path, env: dict[str, str] | None = None, extra: str = ""
) -> Daemon:
    """The real daemon, as root, on the private bus; logging to journald when it runs.

    ``extra`` is appended to the test config; daemon.log is appended to, so a restarted
    daemon's log follows the first one's."""
    cfg = root / "cprd.yaml"
    make_config(root, extra)
    log = root / "daemon.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [str(BIN / "cprd"), "--config", str(cfg), "--bus", bus.address],
            stdout=out,
            stderr=out,
            env={**os.environ, **(env or {})},
        )
    return Daemon(proc, log, bus.address, cfg)


def stop_daemon(d: Daemon) -> None:
    if d.proc.poll() is None:
        d.proc.send_signal(signal.SIGTERM)
    # SIGTERM exits cleanly, leaving the VMs as they are.
    assert (rc := d.proc.wait(timeout=30)) == 0, f"exit {rc}: {d.log.read_text()}"


@pytest.fixture
def daemon(dbus_daemon: BusDaemon, vm_dir_root: Path, journald: Journald) -> Iterator[Daemon]:
    d = start_daemon(dbus_daemon, vm_dir_root)
    try:
        d.wait_answering()
        yield d
    finally:
        stop_daemon(d)
