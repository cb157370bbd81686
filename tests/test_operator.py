"""What operators and fleet tools see (issue 17): the AGENT column, progress on a terminal
and off it, the manifest summary, and the documented JSON schemas (docs/json-schema.md).

Real: the cprd daemon on a private dbus-daemon with the project's policy, QEMU guests with
qemu-ga, systemd-journald, cprdctl under a real pseudo-terminal (tmux).
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus
from dbus_fast.auth import AuthExternal
from fixtures_daemon import BIN, Daemon
from harness import GuestFactory, GuestSpec, Memory

from cprd.render import VMProgress, agent_cell, progress_line, status_table
from cprd.service import unvariant

ROOT = Path(__file__).resolve().parent.parent
SCHEMA_DOC = ROOT / "docs" / "json-schema.md"
MAN_PAGE = ROOT / "man" / "cprdctl.8"

# --- the documented schemas ---------------------------------------------------------------

#: "array of X" types that refer to another table.
REFS = {"array of VM objects": "vm", "array of check results": "check"}


def documented() -> dict[str, dict[str, str]]:
    """{schema: {path: type}} from the tables of docs/json-schema.md."""
    schemas: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for line in SCHEMA_DOC.read_text().splitlines():
        marker = re.fullmatch(r"<!-- schema: (\S+) -->", line.strip())
        if marker:
            current = schemas.setdefault(marker.group(1), {})
            continue
        row = re.match(r"\| `([^`]+)` \| ([^|]+) \|", line)
        if row and current is not None:
            current[row.group(1)] = row.group(2).strip()
        elif not line.startswith("|"):
            current = None
    return schemas


def type_ok(kind: str, value: object) -> bool:
    if kind.endswith(" or null") and value is None:
        return True
    kind = kind.removesuffix(" or null")
    if kind in REFS or kind == "array of object":
        return isinstance(value, list) and all(isinstance(v, dict) for v in value)
    if kind == "array of string":
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if kind == "array of integer":
        return isinstance(value, list) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        )
    if kind == "array of array of string":
        return isinstance(value, list) and all(type_ok("array of string", v) for v in value)
    return {
        "string": isinstance(value, str),
        "integer": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, int | float) and not isinstance(value, bool),
        "boolean": isinstance(value, bool),
        "object": isinstance(value, dict),
        "map": isinstance(value, dict),
    }.get(kind, False)


def conforms(doc: object, schema: str, schemas: dict[str, dict[str, str]], where: str) -> None:
    """Every documented field of ``schema`` is in ``doc`` with its type, and every field in
    ``doc`` is documented; referenced tables are checked element by element."""
    table = schemas[schema]
    seen: set[str] = set()

    def walk(obj: dict[str, Any], prefix: str) -> None:
        for key, value in obj.items():
            path = prefix + key
            seen.add(path)
            kind = table.get(path)
            assert kind is not None, f"{where}: field {path!r} is not documented"
            assert type_ok(kind, value), f"{where}: {path} = {value!r} is not {kind}"
            if kind in REFS:
                for i, element in enumerate(value):
                    conforms(element, REFS[kind], schemas, f"{where}.{path}[{i}]")
            elif kind == "object":
                walk(value, path + ".")
            elif kind == "array of object":
                for element in value:
                    walk(element, path + "[].")
                if not value:  # the fields of its elements cannot be present
                    seen.update(p for p in table if p.startswith(path + "[]."))

    assert isinstance(doc, dict), f"{where}: not an object: {doc!r}"
    walk(doc, "")
    if schema == "check" and doc.get("name") == "state_dir":
        return  # the host's element: documented as schema_version, name, ok, problems
    missing = sorted(set(table) - seen)
    assert not missing, f"{where}: documented but absent: {missing}"


def test_the_schema_doc_has_every_document() -> None:
    schemas = documented()
    assert set(schemas) == {"vm", "check", "status", "check-doc", "manifest"}
    for name, table in schemas.items():
        assert table.get("schema_version") == "integer", name
        for path, kind in table.items():
            assert type_ok(kind, None) is kind.endswith(" or null") or kind in (
                "string",
                "integer",
                "number",
                "boolean",
                "object",
                "map",
                "array of object",
                "array of string",
                "array of array of string",
                *REFS,
            ), f"{name}.{path}: unknown type {kind!r}"
    # cprdctl(8) names every field too (the meanings are in the doc).
    man = set(re.findall(r"[a-z_]+", MAN_PAGE.read_text().replace("\\-", "-")))
    for name, table in schemas.items():
        for path in table:
            leaf = path.rsplit(".", 1)[-1].removesuffix("[]")
            assert leaf in man, f"cprdctl.8 does not name {name} field {path}"


# --- pure rendering -------------------------------------------------------------------------


def test_agent_cell_shows_the_last_probe_and_its_age() -> None:
    now = 1_000_000.0
    vm = {"agent_socket": "/run/qga.sock", "agent_reachable": True, "agent_probed_at": now - 4}
    assert agent_cell(vm, now) == "yes 4s ago"
    assert agent_cell({**vm, "agent_reachable": False, "agent_probed_at": now - 300}, now) == (
        "no 5m ago"
    )
    assert agent_cell({**vm, "agent_probed_at": 0.0}, now) == "not probed"
    assert agent_cell({**vm, "agent_socket": ""}, now) == "-"


def test_status_shows_a_step_when_the_daemon_reports_one() -> None:
    vm = {
        "name": "web",
        "runstate": "running",
        "ram_bytes": 2**27,
        "memory": [{"class": "private"}],
        "vfio_devices": [],
        "agent_socket": "/q",
        "agent_reachable": True,
        "agent_probed_at": 90.0,
    }
    check = {"name": "web", "ok": True, "action": "save (RAM copied)", "bytes_to_write": 2**28}

    def words(text: str) -> list[str]:
        return [" ".join(line.split()) for line in text.splitlines()]

    assert words(status_table([vm], [check], 100.0)) == [
        "VM RUNSTATE RAM MEMORY VFIO AGENT ACTION TO WRITE",
        "web running 128 MiB private - yes 10s ago save (RAM copied) 256 MiB",
    ]
    # A VM the daemon reports a step for, and checked no more: no REFUSED.
    saved = {**vm, "runstate": "postmigrate", "step": "saved"}
    assert words(status_table([saved], [], 100.0)) == [
        "VM RUNSTATE STEP RAM MEMORY VFIO AGENT ACTION TO WRITE",
        "web postmigrate saved 128 MiB private - yes 10s ago - -",
    ]
    refused = status_table([vm], [{**check, "ok": False}], 100.0)
    assert words(refused)[1].endswith(" REFUSED 256 MiB")


def test_an_in_place_save_says_nothing_to_copy() -> None:
    p = VMProgress(in_place=True)
    p.update(10.0, "saving", 0, 16 * 2**20)
    assert progress_line(p, 10.0) == "saving, in place, nothing to copy"
    p.update(10.02, "saved", 348_160, 348_160)
    assert progress_line(p, 10.02) == "saved 340 KiB state, in place, nothing to copy"
    assert p.seconds_stopped == pytest.approx(0.02)
    copied = VMProgress()
    copied.update(10.0, "saving", 0, 200 * 2**20)
    assert progress_line(copied, 10.0) == "saving 0/200 MiB"
    copied.update(11.0, "saving", 50 * 2**20, 200 * 2**20)
    assert progress_line(copied, 11.0) == "saving 50/200 MiB 50 MiB/s ETA 3s"


# --- on real guests -------------------------------------------------------------------------


async def _list_vms(address: str) -> list[dict[str, Any]]:
    bus = await asyncio.wait_for(MessageBus(bus_address=address, auth=AuthExternal()).connect(), 5)
    try:
        reply = await asyncio.wait_for(
            bus.call(
                Message(
                    destination="org.cprd.Cprd1",
                    path="/org/cprd/Cprd1",
                    interface="org.cprd.Cprd1.Manager",
                    member="ListVMs",
                )
            ),
            10,
        )
        assert reply is not None and reply.message_type == MessageType.METHOD_RETURN, reply
        return list(unvariant(reply.body[0]))
    finally:
        bus.disconnect()


def list_vms(daemon: Daemon) -> dict[str, dict[str, Any]]:
    """D-Bus ListVMs itself (cprdctl status would run a Check, which probes the agents)."""
    return {vm["name"]: vm for vm in asyncio.run(_list_vms(daemon.bus))}


def wait_vms(daemon: Daemon, pred: Any, what: str, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        vms = list_vms(daemon)
        if pred(vms):
            return vms
        assert time.monotonic() < deadline, f"{what}: {vms}"
        time.sleep(0.2)


def json_out(daemon: Daemon, *args: str) -> Any:
    out = daemon.ctl(*args)
    assert out.returncode == 0, out.stderr + daemon.log.read_text()[-3000:]
    return json.loads(out.stdout)


@pytest.mark.qemu
def test_agent_column_and_json_documents(guests: GuestFactory, daemon: Daemon) -> None:
    web, db = guests(GuestSpec("web"), GuestSpec("db", memory=Memory.FILE))
    schemas = documented()
    vms = wait_vms(daemon, lambda v: set(v) == {"web", "db"}, "both VMs held")
    assert vms["web"]["agent_probed_at"] == 0.0 and not vms["web"]["agent_reachable"]

    # AGENT: status runs Check (which probes) before it reads the VM list.
    before = time.time()
    status = daemon.ctl("status")
    assert status.returncode == 0, status.stderr
    rows = {line.split()[0]: line for line in status.stdout.splitlines()[2:]}
    assert re.search(r"  yes [0-9]s ago  ", rows["web"]), status.stdout
    probed = list_vms(daemon)["web"]
    assert probed["agent_reachable"] is True
    assert before - 1 <= probed["agent_probed_at"] <= time.time()

    # A refresh after QMP events (STOP, RESUME) does not probe: the last probe stands.
    web.qmp("stop")
    wait_vms(daemon, lambda v: v["web"]["runstate"] == "paused", "web paused")
    web.qmp("cont")
    after = wait_vms(daemon, lambda v: v["web"]["runstate"] == "running", "web running")
    assert after["web"]["agent_reachable"] is True
    assert after["web"]["agent_probed_at"] == probed["agent_probed_at"]

    # Every JSON document against docs/json-schema.md, both ways.
    for name, vm in list_vms(daemon).items():
        conforms(vm, "vm", schemas, f"ListVMs[{name}]")
    conforms(json_out(daemon, "status", "--json"), "status", schemas, "status --json")
    check = json_out(daemon, "check", "--json")
    assert check["schema_version"] == 1 and [c["name"] for c in check["check"]] == ["db", "web"]
    conforms(check, "check-doc", schemas, "check --json")

    # Progress without a terminal: plain lines, the in-place VM says so, then the summary.
    prep = daemon.ctl("prepare-kexec")
    assert prep.returncode == 0, prep.stderr + daemon.log.read_text()[-3000:]
    lines = prep.stdout.splitlines()
    assert "\x1b" not in prep.stdout
    assert "db: saving, in place, nothing to copy" in lines, lines
    assert any(
        re.fullmatch(r"db: saved \d+ KiB state, in place, nothing to copy", x) for x in lines
    )
    assert any(re.fullmatch(r"web: saved \d+ MiB in \d+\.\ds", x) for x in lines), lines
    head = lines.index(next(x for x in lines if x.startswith("VM ")))
    assert lines[head].split() == ["VM", "ACTION", "BYTES", "STOPPED"]
    assert re.fullmatch(r"db +save \(RAM in place\) +\d+ KiB +\d+\.\ds", lines[head + 1])
    assert re.fullmatch(r"web +save live \(RAM copied\) +\d+ MiB +\d+\.\ds", lines[head + 2])
    assert lines[head + 3].startswith("prepared: manifest ") and len(lines) == head + 4

    manifest = json_out(daemon, "manifest", "--json")
    assert manifest["schema_version"] == 1 and manifest["manifest"]["phase"] == "prepared"
    conforms(manifest, "manifest", schemas, "manifest --json")
    summary = daemon.ctl("manifest").stdout.splitlines()
    assert re.fullmatch(r"phase: prepared, created \S+, kernel \S+, 2 VMs", summary[0])
    assert summary[1].split() == ["VM", "PHASE", "OUTCOME", "STATE", "SIZE", "QEMU"]
    qemu = re.escape(vms["web"]["qemu_version"])
    assert re.fullmatch(rf"db +saved +pending +\d+ KiB +{qemu} /\S+qemu-system-x86_64", summary[2])
    assert re.fullmatch(rf"web +saved +pending +\d+ MiB +{qemu} /\S+qemu-system-x86_64", summary[3])
    raw = daemon.ctl("manifest", "--yaml").stdout
    assert raw.startswith("version: 2\n") and re.search(r"\n# sha256: [0-9a-f]{64}\n\Z", raw)

    resume = daemon.ctl("resume")
    assert resume.returncode == 0, resume.stderr
    assert {web.runstate(), db.runstate()} == {"running"}


# --- a real pseudo-terminal -----------------------------------------------------------------


class Tmux:
    """A private tmux server (its own socket) running one command in a 160x40 pane."""

    def __init__(self, sock: Path) -> None:
        self.sock = sock

    def run(self, *args: str) -> str:
        out = subprocess.run(
            ["tmux", "-S", str(self.sock), "-f", "/dev/null", *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return out.stdout

    def start(self, command: str) -> None:
        self.run("new-session", "-d", "-x", "160", "-y", "40", command)

    def screen(self) -> list[str]:
        return [line.rstrip() for line in self.run("capture-pane", "-p").splitlines()]

    def kill(self) -> None:
        subprocess.run(
            ["tmux", "-S", str(self.sock), "kill-server"], capture_output=True, timeout=10
        )


@pytest.mark.qemu
def test_progress_on_a_terminal(guests: GuestFactory, daemon: Daemon, vm_dir_root: Path) -> None:
    """cprdctl prepare-kexec in a real pty: one line per VM, redrawn, then the summary."""
    if shutil.which("tmux") is None:
        pytest.fail("tmux is missing (scripts/setup.sh installs it)")
    names = ["alpha", "bravo", "charlie"]
    # Big enough that each save spans several progress intervals (0.25 s) on this host.
    vms = guests(*(GuestSpec(n, mem_mib=768, fill_mib=512) for n in names), timeout=240)
    wait_vms(daemon, lambda v: set(v) == set(names), "three VMs held")
    tmux = Tmux(vm_dir_root / "tmux.sock")
    ctl = f"{BIN / 'cprdctl'} --bus '{daemon.bus}' prepare-kexec"
    tmux.start(f"{ctl}; echo cprdctl-exit=$?; exec sleep 600")
    screens: list[list[str]] = []
    try:
        deadline = time.monotonic() + 240
        while True:
            screen = tmux.screen()
            if not screens or screen != screens[-1]:
                screens.append(screen)
            if any(line.startswith("cprdctl-exit=") for line in screen):
                break
            assert time.monotonic() < deadline, "\n".join(screen)
            time.sleep(0.05)
    finally:
        final = tmux.screen()
        tmux.kill()
    text = "\n".join(final)
    assert "cprdctl-exit=0" in final, text + daemon.log.read_text()[-3000:]

    def progress_block(screen: list[str]) -> list[str]:
        """The lines above the summary table (all of them while the prepare runs)."""
        lines = [x for x in screen if x]
        end = next((i for i, x in enumerate(lines) if x.startswith("VM ")), len(lines))
        return lines[:end]

    saving = 0
    for screen in screens:
        block = progress_block(screen)
        for name in names:
            mine = [x for x in block if x.split()[:1] == [name]]
            assert len(mine) <= 1, "\n".join(screen)
        # live: saved while it runs (the guests' RAM is copied), then saving once stopped
        busy = [x for x in block if re.search(r"  (saving|live) \d+/\d+ MiB", x)]
        if len(busy) >= 2:
            saving += 1
    # Redraws with at least two VMs saving at once, each on its own line.
    assert saving >= 2, "\n\n".join("\n".join(s) for s in screens)

    block = progress_block(final)
    assert [x.split()[0] for x in block] == names, text
    for line in block:
        assert re.fullmatch(r"\w+ +saved \d+ MiB in \d+\.\ds", line), text
    lines = [x for x in final if x]
    head = next(i for i, x in enumerate(lines) if x.startswith("VM "))
    assert lines[head].split() == ["VM", "ACTION", "BYTES", "STOPPED"]
    for i, name in enumerate(names, 1):
        # Saved live: STOPPED is the last pass only (the premise, saves long enough to be
        # redrawn, is the count of redraws with two VMs busy above).
        row = re.fullmatch(rf"{name} +save live \(RAM copied\) +\d+ MiB +\d+\.\ds", lines[head + i])
        assert row, lines[head + i]
    assert lines[head + 4].startswith("prepared: manifest ")
    for vm in vms:
        assert vm.runstate() == "postmigrate"
    assert daemon.ctl("resume").returncode == 0
    for vm in vms:
        assert vm.runstate() == "running"
