"""The Debian packages (packaging/, issues 7 and 16): build, contents, lintian, manual
pages, install, purge.

Debian 12 (packaging/bookworm): the .deb is built once per run with
``packaging/build-deb.sh --dist bookworm`` (dpkg-buildpackage in a copy of the tree; pip
fetches the vendored qemu.qmp and dbus-fast, so PyPI or the configured mirror must be
reachable), installed on this machine with ``dpkg -i`` and purged at the end, leaving the
machine as it was (the group ``cprd`` is removed again only if the install created it).

Debian 13 (packaging/trixie): built with ``--dist trixie`` in the cached trixie root
(packaging/build-root.sh; debootstrap and Debian's mirror the first time), where trixie's
own lintian checks it; its contents and control fields are checked here. It cannot be
installed on this Debian 12 machine (it needs Python 3.13 and trixie's libraries): `make
kexec-e2e` installs it on a Debian 13 virtual host with ``apt-get install ./cprd_*.deb``
and runs it there under systemd.

Installing must start nothing that acts on VMs. debian/rules gives dh_installsystemd
``--no-start --no-stop-on-upgrade``, so the maintainer scripts contain no
``deb-systemd-invoke start``/``restart``: that is asserted on the scripts themselves,
because it is the part that matters on a real host. systemd is not PID 1 here (no
/run/systemd/system), so deb-systemd-invoke would do nothing anyway; that no cprd
process runs after the install is checked too, but proves less here than it would on a
host.

Needs root and the packages scripts/setup.sh installs (dpkg-dev, debhelper, lintian,
man-db, python3-yaml, python3-systemd); a missing one fails the test, nothing is skipped.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cprd import __version__
from cprd.config import describe

ROOT = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = ROOT / "packaging" / "build-deb.sh"
MAN_SOURCES = {
    "cprd.8": ROOT / "man" / "cprd.8",
    "cprdctl.8": ROOT / "man" / "cprdctl.8",
    "cprd.yaml.5": ROOT / "man" / "cprd.yaml.5",
}
UNITS = ("cprd.service", "cprd-restore.service", "cprd-kexec-guard.service")
PRIVATE = "/usr/lib/cprd/python"
DIST_PACKAGES = "/usr/lib/python3/dist-packages"

#: Installed path -> the file of this tree it must be a verbatim copy of.
VERBATIM = {
    "/etc/cprd/cprd.yaml": "config/cprd.yaml",
    "/usr/share/dbus-1/system.d/org.cprd.Cprd1.conf": "config/org.cprd.Cprd1.conf",
    "/usr/lib/systemd/system/cprd.service": "units/cprd.service",
    "/usr/lib/systemd/system/cprd-restore.service": "units/cprd-restore.service",
    "/usr/lib/systemd/system/cprd-kexec-guard.service": "units/cprd-kexec-guard.service",
    "/usr/lib/systemd/system/cprd-vm-.service.d/cprd.conf": "units/cprd-vm-.service.d/cprd.conf",
    "/usr/lib/systemd/logind.conf.d/cprd.conf": "units/logind.conf.d/cprd.conf",
    "/usr/lib/systemd/catalog/cprd.catalog": "units/cprd.catalog",
    f"{PRIVATE}/cprd/cli.py": "cprd/cli.py",
    f"{PRIVATE}/cprd/ctl.py": "cprd/ctl.py",
}
EXPECTED_PATHS = {
    *VERBATIM,
    "/usr/bin/cprd",
    "/usr/bin/cprdctl",
    f"{PRIVATE}/cprd/__init__.py",
    f"{PRIVATE}/cprd/py.typed",
    f"{PRIVATE}/qemu/qmp/__init__.py",
    f"{PRIVATE}/qemu_qmp-0.0.6.dist-info/METADATA",
    f"{PRIVATE}/dbus_fast/__init__.py",
    f"{PRIVATE}/dbus_fast-5.2.0.dist-info/METADATA",
    "/usr/share/man/man8/cprd.8.gz",
    "/usr/share/man/man8/cprdctl.8.gz",
    "/usr/share/man/man5/cprd.yaml.5.gz",
    "/usr/share/doc/cprd/copyright",
    "/usr/share/doc/cprd/changelog.gz",
    "/usr/share/doc/cprd/README.md.gz",
    "/usr/share/doc/cprd/README.Debian",
}
#: Tags overridden in packaging/debian/cprd.lintian-overrides (each with its reason).
OVERRIDDEN_TAGS = {"dbus-policy-without-send-destination"}
#: A message id of units/cprd.catalog, to see systemd's trigger compile the catalog.
CATALOG_ID = "6a5b1f0e3c8d4e7f9a0b1c2d3e4f5a61"


def run(*argv: str, check: bool = True, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        check=False,
        env=None if env is None else {**os.environ, **env},
        timeout=300,
    )
    if check and proc.returncode != 0:
        pytest.fail(
            f"{' '.join(argv)} exited {proc.returncode}\n"
            f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
        )
    return proc.stdout


def installed_version() -> str | None:
    proc = subprocess.run(
        ["dpkg-query", "-W", "-f=${db:Status-Abbrev}${Version}", "cprd"],
        capture_output=True,
        text=True,
        check=False,
    )
    out = proc.stdout.strip()
    return out if proc.returncode == 0 and out and not out.startswith("un") else None


def group_exists(name: str) -> bool:
    return (
        subprocess.run(["getent", "group", name], capture_output=True, check=False).returncode == 0
    )


def cprd_processes() -> list[str]:
    """Command lines of running processes of the installed cprd."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        text = " ".join(a.decode(errors="replace") for a in argv if a)
        if re.search(r"/usr/bin/cprd(ctl)?\b|/usr/lib/cprd/", text):
            found.append(f"{entry}: {text}")
    return found


@dataclass(frozen=True)
class Built:
    deb: Path
    seconds: float
    contents: Path  # the .deb extracted (dpkg-deb -x)
    control: Path  # its control area (dpkg-deb -e)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    assert os.geteuid() == 0, "the packaging test needs root (dpkg -i); run it as root"
    missing = [
        tool
        for tool in ("dpkg-buildpackage", "dh", "lintian", "man", "groff", "unshare")
        if shutil.which(tool) is None
    ]
    assert not missing, f"missing {missing}: run `make setup` (scripts/setup.sh)"
    assert installed_version() is None, (
        f"a cprd package is already installed ({installed_version()}): this test would "
        "replace and purge it; remove it first"
    )
    out = tmp_path_factory.mktemp("deb")
    started = time.monotonic()
    run("bash", str(BUILD_SCRIPT), "--dist", "bookworm", str(out))
    seconds = time.monotonic() - started
    arch = run("dpkg", "--print-architecture").strip()
    debs = sorted(out.glob("cprd_*.deb"))
    assert [d.name for d in debs] == [f"cprd_{__version__}_{arch}.deb"], debs
    assert not list(out.glob("cprd-dbgsym_*")), "no -dbgsym package (nothing to put in it)"
    contents, control = out / "contents", out / "control"
    run("dpkg-deb", "-x", str(debs[0]), str(contents))
    run("dpkg-deb", "-e", str(debs[0]), str(control))
    return Built(debs[0], seconds, contents, control)


def test_build_is_quick(built: Built) -> None:
    print(f"built {built.deb.name} in {built.seconds:.1f}s")
    assert built.seconds < 120, f"building the .deb took {built.seconds:.0f}s"


def test_control_fields(built: Built) -> None:
    fields: dict[str, str] = {}
    for line in (built.control / "control").read_text().splitlines():
        key, sep, value = line.partition(": ")
        if sep and not line.startswith(" "):
            fields[key] = value
    # dbus-fast's compiled modules make it architecture-dependent.
    assert fields["Architecture"] == run("dpkg", "--print-architecture").strip()
    assert fields["Version"] == __version__
    depends = fields["Depends"]
    for dep in ("python3 (>= 3.11)", "python3-yaml", "python3-systemd (>= 235)", "systemd"):
        assert dep in depends, depends
    assert "default-dbus-system-bus | dbus-system-bus" in depends
    assert "libc6" in depends  # ${shlibs:Depends} of the compiled modules
    assert "qemu" not in depends and "kexec" not in depends, depends
    recommends = fields["Recommends"]
    assert "qemu-system-x86 (>= 1:8.2) | qemu-system (>= 1:8.2)" in recommends
    assert "kexec-tools" in recommends


def test_file_list(built: Built) -> None:
    listing = run("dpkg-deb", "-c", str(built.deb))
    paths = {line.split()[5].removeprefix(".").rstrip("/") for line in listing.splitlines()}
    missing = EXPECTED_PATHS - paths
    assert not missing, f"missing from the .deb: {sorted(missing)}"
    # Units only under /usr/lib/systemd/system (debian/rules moves them from the
    # lib/systemd/system staging area dh_installsystemd needs).
    assert not [p for p in paths if p.startswith("/lib")], "nothing under /lib"
    unexpected = [
        p
        for p in paths
        if "__pycache__" in p
        or p.endswith(".pyc")
        or p.startswith(f"{PRIVATE}/bin")
        or p.endswith("direct_url.json")
        or p.startswith((f"{PRIVATE}/yaml", f"{PRIVATE}/systemd"))  # Debian's are used
    ]
    assert not unexpected, unexpected
    assert [p for p in paths if p.startswith(f"{PRIVATE}/dbus_fast/") and p.endswith(".so")]
    for line in listing.splitlines():
        mode, owner, path = line.split()[0], line.split()[1], line.split()[5]
        assert owner == "root/root", line
        if path in ("./usr/bin/cprd", "./usr/bin/cprdctl"):
            assert mode == "-rwxr-xr-x", line
    for installed, source in VERBATIM.items():
        packaged = built.contents / installed.lstrip("/")
        assert packaged.read_bytes() == (ROOT / source).read_bytes(), installed
    conffiles = (built.control / "conffiles").read_text().split()
    assert conffiles == ["/etc/cprd/cprd.yaml"]


def test_maintainer_scripts_start_nothing(built: Built) -> None:
    scripts = {
        name: (built.control / name).read_text()
        for name in ("preinst", "postinst", "prerm", "postrm")
        if (built.control / name).exists()
    }
    code = [
        (name, line.split("#", 1)[0].strip())
        for name, text in scripts.items()
        for line in text.splitlines()
    ]
    for name, line in code:
        assert not re.search(r"\b(systemctl|invoke-rc\.d|service)\s+\S*\s*(start|restart)", line), (
            f"{name}: {line}"
        )
    # The only unit action: stopping the daemon and the guard on removal (not on upgrade;
    # cprd-restore.service never).
    invokes = [(name, line) for name, line in code if "deb-systemd-invoke" in line]
    assert invokes == [
        (
            "prerm",
            "deb-systemd-invoke stop cprd-kexec-guard.service cprd.service >/dev/null || true",
        )
    ]
    assert 'if [ "$1" = remove ] && [ -d /run/systemd/system ]; then' in scripts["prerm"]
    # Enabled, so the next boot runs them.
    for unit in UNITS:
        assert f"deb-systemd-helper enable '{unit}'" in scripts["postinst"], unit


def lintian(*args: str) -> subprocess.CompletedProcess[str]:
    # Its "running with root privileges is not recommended!" goes to stderr.
    return subprocess.run(
        ["lintian", *args], capture_output=True, text=True, check=False, timeout=300
    )


def test_lintian(built: Built) -> None:
    """No error or warning; every override is used, and each has its reason in
    cprd.lintian-overrides. (Info-level tags are allowed: see the report.)"""
    proc = lintian("--fail-on", "error,warning", "-I", str(built.deb))
    lines = proc.stdout.splitlines()
    errors = [line for line in lines if line.startswith(("E:", "W:"))]
    assert not errors, "\n".join(errors)
    unused = [line for line in lines if re.search(r"\b(unused|mismatched)-override\b", line)]
    assert not unused, unused
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # At the default level the output is empty apart from the overridden tags (shown
    # with --show-overrides as O: lines, after their N: justification lines).
    assert lintian(str(built.deb)).stdout == ""
    shown = lintian("--show-overrides", str(built.deb)).stdout.splitlines()
    assert {line.split()[2] for line in shown if line.startswith("O:")} == OVERRIDDEN_TAGS
    assert all(line.startswith(("O:", "N:")) for line in shown), shown
    overrides = (ROOT / "packaging/bookworm/debian/cprd.lintian-overrides").read_text()
    check_override_reasons(overrides)


def check_override_reasons(text: str) -> None:
    overrides = text.splitlines()
    for i, line in enumerate(overrides):
        if line and not line.startswith("#"):
            assert i > 0 and overrides[i - 1].startswith("#"), f"no reason given for {line}"


def render(page: Path) -> str:
    """man(1)'s rendering on 80 columns; fails on any groff or man warning."""
    proc = subprocess.run(
        ["man", "-l", "--warnings=all", str(page)],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "MANWIDTH": "80"},
        timeout=60,
    )
    assert proc.returncode == 0 and proc.stderr == "", f"{page}: {proc.stderr}"
    assert proc.stdout.strip(), page
    return proc.stdout


def flat_text(page: Path) -> str:
    """The page as one line of plain ASCII words: no hyphenation, no line breaks."""
    text = run(
        "man",
        "-l",
        "--no-hyphenation",
        "--no-justification",
        str(page),
        env={"MANWIDTH": "1000"},
    )
    return " ".join(text.replace("\u2010", "-").replace("\u2212", "-").split())


@pytest.mark.parametrize("name", sorted(MAN_SOURCES))
def test_man_page_source_renders_clean(name: str) -> None:
    source = MAN_SOURCES[name]
    render(source)
    proc = subprocess.run(
        ["groff", "-man", "-ww", "-z", str(source)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


def help_words(*argv: str) -> tuple[set[str], list[str]]:
    """The long options and the subcommands an argparse --help lists."""
    text = run(*argv, "--help")
    options = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", text))
    usage = text.split("\n\n", 1)[0]
    subs = re.search(r"\{([a-z,-]+)\}", usage)
    return options, subs.group(1).split(",") if subs else []


@dataclass(frozen=True)
class Installed:
    group_created: bool
    state_dir_existed: bool


@pytest.fixture(scope="module")
def installed(built: Built) -> Iterator[Installed]:
    had_group = group_exists("cprd")
    had_state_dir = Path("/var/lib/cprd").exists()
    proc = subprocess.run(
        ["dpkg", "-i", str(built.deb)], capture_output=True, text=True, check=False, timeout=300
    )
    try:
        assert proc.returncode == 0, (
            f"dpkg -i failed (missing dependencies? run `make setup`):\n{proc.stdout}"
            f"\n{proc.stderr}"
        )
        yield Installed(group_created=not had_group, state_dir_existed=had_state_dir)
    finally:
        # Normally test_purge has purged it already.
        if installed_version() is not None:
            subprocess.run(["dpkg", "--purge", "cprd"], capture_output=True, check=False)
        if not had_group and group_exists("cprd"):
            subprocess.run(["groupdel", "cprd"], check=False)


def test_installed_programs_run(installed: Installed) -> None:
    assert run("/usr/bin/cprd", "--version").strip() == f"cprd {__version__}"
    out = run("/usr/bin/cprd", "--config", "/etc/cprd/cprd.yaml", "--check-config")
    assert out.strip() == "/etc/cprd/cprd.yaml: valid"
    assert "Drive the cprd daemon over D-Bus." in run("/usr/bin/cprdctl", "--help")
    assert run("/usr/bin/cprd", "--help-config").strip() == describe().strip()
    # The vendored libraries come from the private tree (dbus-fast compiled), PyYAML and
    # systemd-python from Debian's packages.
    probe = (
        f"import sys; sys.path.insert(0, {PRIVATE!r})\n"
        "import cprd, dbus_fast, dbus_fast.message, qemu.qmp, yaml, systemd.journal\n"
        "for m in (cprd, dbus_fast, dbus_fast.message, qemu.qmp, yaml, systemd.journal):\n"
        "    print(m.__name__, m.__file__)\n"
    )
    files = {
        name: file
        for name, _, file in (
            line.partition(" ") for line in run("/usr/bin/python3", "-I", "-c", probe).splitlines()
        )
    }
    assert files["cprd"] == f"{PRIVATE}/cprd/__init__.py"
    assert files["qemu.qmp"] == f"{PRIVATE}/qemu/qmp/__init__.py"
    assert files["dbus_fast"] == f"{PRIVATE}/dbus_fast/__init__.py"
    assert files["dbus_fast.message"].startswith(f"{PRIVATE}/dbus_fast/message.cpython-")
    assert files["dbus_fast.message"].endswith(".so")
    assert files["yaml"].startswith(f"{DIST_PACKAGES}/yaml/")
    assert files["systemd.journal"].startswith(f"{DIST_PACKAGES}/systemd/")


def test_install_started_nothing(installed: Installed) -> None:
    assert cprd_processes() == []
    if not installed.state_dir_existed:
        assert not Path("/var/lib/cprd").exists(), "nothing ran that created the state_dir"
    for unit in UNITS:
        link = Path("/etc/systemd/system/multi-user.target.wants") / unit
        assert link.is_symlink() and link.resolve() == Path("/usr/lib/systemd/system") / unit


def test_install_group_and_catalog(installed: Installed) -> None:
    assert group_exists("cprd")
    assert "cprd started saving every VM" in run("journalctl", "--list-catalog", CATALOG_ID)
    # postinst compiled the private tree (prerm removes the bytecode again).
    assert list(Path(PRIVATE, "cprd").glob("__pycache__/cli.cpython-*.pyc"))


def test_postinst_creates_the_group_once(installed: Installed, tmp_path: Path) -> None:
    """The installed postinst, in a mount namespace with a copy of /etc that has no group
    cprd: it creates the group, and running it again changes nothing."""
    script = f"""
        set -e
        cp -a /etc/. {tmp_path}/etc/
        mount --bind {tmp_path}/etc /etc
        sed -i '/^cprd:/d' /etc/group /etc/gshadow
        if getent group cprd; then exit 3; fi
        /var/lib/dpkg/info/cprd.postinst configure >/dev/null
        getent group cprd > {tmp_path}/first
        /var/lib/dpkg/info/cprd.postinst configure '{__version__}' >/dev/null
        grep -c '^cprd:' /etc/group > {tmp_path}/count
    """
    (tmp_path / "etc").mkdir()
    run("unshare", "--mount", "--propagation", "private", "sh", "-c", script)
    first = (tmp_path / "first").read_text().split(":")
    assert first[0] == "cprd" and int(first[2]) < 1000, first  # a system group
    assert (tmp_path / "count").read_text().strip() == "1"
    assert group_exists("cprd")  # the host's group file was not touched


@pytest.mark.parametrize("name", sorted(MAN_SOURCES))
def test_installed_man_page_renders_clean(installed: Installed, name: str) -> None:
    section = name.rsplit(".", 1)[1]
    page = Path(f"/usr/share/man/man{section}/{name}.gz")
    assert render(page) == render(MAN_SOURCES[name])


def test_man_pages_cover_the_cli(installed: Installed) -> None:
    """Every option and subcommand the installed programs' --help lists is in their page,
    and every configuration key is in cprd.yaml(5)."""
    for program in ("cprd", "cprdctl"):
        text = flat_text(Path(f"/usr/share/man/man8/{program}.8.gz"))
        options, subs = help_words(f"/usr/bin/{program}")
        assert subs, program
        for sub in subs:
            options |= help_words(f"/usr/bin/{program}", sub)[0]
            assert re.search(rf"(?<![\w-]){re.escape(sub)}(?![\w-])", text), f"{program}: {sub}"
        for option in options:
            assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text), (
                f"{program}.8 does not mention {option}"
            )
    text = flat_text(Path("/usr/share/man/man5/cprd.yaml.5.gz"))
    for line in describe().splitlines():
        key = line.split(" ", 1)[0].rstrip(":").replace("<name>", "name")
        assert key in text, f"cprd.yaml.5 does not mention {key}"


def test_purge_leaves_nothing(installed: Installed) -> None:
    """Last: purge, and nothing of the package is left (the group only if it was there
    before; the fixture removes one the install created)."""
    run("dpkg", "--purge", "cprd")
    assert installed_version() is None
    for path in ("/usr/lib/cprd", "/etc/cprd", "/usr/bin/cprd", "/usr/bin/cprdctl"):
        assert not os.path.lexists(path), path
    for unit in UNITS:
        assert not os.path.lexists(f"/etc/systemd/system/multi-user.target.wants/{unit}")
        assert not os.path.lexists(f"/usr/lib/systemd/system/{unit}")
        assert not os.path.lexists(f"/var/lib/systemd/deb-systemd-helper-enabled/{unit}.dsh-also")
    if not installed.state_dir_existed:
        assert not os.path.lexists("/var/lib/cprd")
    proc = subprocess.run(
        ["journalctl", "--list-catalog", CATALOG_ID], capture_output=True, text=True, check=False
    )
    assert "cprd" not in proc.stdout
    assert cprd_processes() == []


# --- Debian 13 (trixie) ----------------------------------------------------------------


@dataclass(frozen=True)
class BuiltTrixie:
    deb: Path
    output: str  # build-deb.sh's stdout, trixie's lintian output included
    contents: Path
    control: Path


@pytest.fixture(scope="module")
def built_trixie(tmp_path_factory: pytest.TempPathFactory) -> BuiltTrixie:
    assert os.geteuid() == 0, "the trixie build runs in a chroot: run the test as root"
    out = tmp_path_factory.mktemp("deb-trixie")
    output = run("bash", str(BUILD_SCRIPT), "--dist", "trixie", str(out))
    debs = sorted(out.glob("cprd_*.deb"))
    assert [d.name for d in debs] == [f"cprd_{__version__}_all.deb"], debs
    contents, control = out / "contents", out / "control"
    run("dpkg-deb", "-x", str(debs[0]), str(contents))
    run("dpkg-deb", "-e", str(debs[0]), str(control))
    return BuiltTrixie(debs[0], output, contents, control)


def test_trixie_build_says_what_it_built(built_trixie: BuiltTrixie) -> None:
    last = built_trixie.output.strip().splitlines()[-1]
    assert last == f"build-deb: built {built_trixie.deb.name} for Debian 13 (trixie)"


def test_trixie_lintian_clean(built_trixie: BuiltTrixie) -> None:
    """build-deb.sh ran trixie's lintian with --fail-on error,warning --show-overrides:
    it passed (or the build would have failed), printed nothing but the overridden tags
    (O: lines after their N: reasons), and each override has its reason."""
    lines = [
        line
        for line in built_trixie.output.splitlines()
        if re.match(r"^[EWIPXNO]: ", line) and "cprd" in line.split()[1]
    ]
    assert {line.split()[2] for line in lines if line.startswith("O:")} == OVERRIDDEN_TAGS
    assert all(line.startswith(("O:", "N:")) for line in lines), lines
    check_override_reasons((ROOT / "packaging/trixie/debian/cprd.lintian-overrides").read_text())


def test_trixie_control_fields(built_trixie: BuiltTrixie) -> None:
    fields: dict[str, str] = {}
    for line in (built_trixie.control / "control").read_text().splitlines():
        key, sep, value = line.partition(": ")
        if sep and not line.startswith(" "):
            fields[key] = value
    assert fields["Architecture"] == "all"
    assert fields["Version"] == __version__
    depends = [d.strip() for d in fields["Depends"].split(",")]
    for dep in (
        "python3-dbus-fast (>= 2.44)",
        "python3-qemu-qmp (>= 0.0.6)",
        "python3-systemd (>= 235)",
        "python3-yaml (>= 6.0)",
        "qemu-system-x86 (>= 1:10.0)",
        "systemd (>= 255)",
        "default-dbus-system-bus | dbus-system-bus",
    ):
        assert dep in depends, depends
    assert any(d.startswith("python3:any") for d in depends), depends  # dh_python3
    assert fields["Recommends"] == "kexec-tools"


def test_trixie_file_list(built_trixie: BuiltTrixie) -> None:
    """cprd in Debian's dist-packages, the console scripts pybuild made, the same units,
    configuration and pages as on Debian 12, and nothing vendored."""
    listing = run("dpkg-deb", "-c", str(built_trixie.deb))
    paths = {line.split()[5].removeprefix(".").rstrip("/") for line in listing.splitlines()}
    expected = {
        *(p for p in VERBATIM if not p.startswith(PRIVATE)),
        "/usr/bin/cprd",
        "/usr/bin/cprdctl",
        f"{DIST_PACKAGES}/cprd/__init__.py",
        f"{DIST_PACKAGES}/cprd/cli.py",
        f"{DIST_PACKAGES}/cprd/py.typed",
        f"{DIST_PACKAGES}/cprd-{__version__}.dist-info/METADATA",
        "/usr/share/man/man8/cprd.8.gz",
        "/usr/share/man/man8/cprdctl.8.gz",
        "/usr/share/man/man5/cprd.yaml.5.gz",
        "/usr/share/doc/cprd/copyright",
        "/usr/share/doc/cprd/README.Debian",
    }
    missing = expected - paths
    assert not missing, f"missing from the .deb: {sorted(missing)}"
    vendored = [
        p
        for p in paths
        if p.startswith(("/usr/lib/cprd", "/usr/share/cprd", f"{DIST_PACKAGES}/qemu"))
        or "dbus_fast" in p
        or p.endswith((".so", ".pyc"))
    ]
    assert not vendored, vendored
    assert not [p for p in paths if p.startswith("/lib")], "nothing under /lib"
    for installed, source in VERBATIM.items():
        if not installed.startswith(PRIVATE):
            packaged = built_trixie.contents / installed.lstrip("/")
            assert packaged.read_bytes() == (ROOT / source).read_bytes(), installed
    for name in ("cli.py", "service.py"):
        packaged = built_trixie.contents / DIST_PACKAGES.lstrip("/") / "cprd" / name
        assert packaged.read_bytes() == (ROOT / "cprd" / name).read_bytes(), name
    script = (built_trixie.contents / "usr/bin/cprd").read_text()
    assert script.startswith("#! /usr/bin/python3\n") and "from cprd.cli import main" in script
    assert (built_trixie.control / "conffiles").read_text().split() == ["/etc/cprd/cprd.yaml"]


def test_trixie_maintainer_scripts(built_trixie: BuiltTrixie) -> None:
    """As on Debian 12: nothing started, the guard and the daemon stopped only on
    removal, every unit enabled; dh_python3 byte-compiles at install."""
    scripts = {
        name: (built_trixie.control / name).read_text()
        for name in ("preinst", "postinst", "prerm", "postrm")
        if (built_trixie.control / name).exists()
    }
    code = [
        line.split("#", 1)[0].strip() for text in scripts.values() for line in text.splitlines()
    ]
    for line in code:
        assert not re.search(r"\b(systemctl|invoke-rc\.d|service)\s+\S*\s*(start|restart)", line)
    invokes = [line for line in code if "deb-systemd-invoke" in line]
    assert invokes == [
        "deb-systemd-invoke stop cprd-kexec-guard.service cprd.service >/dev/null || true"
    ]
    for unit in UNITS:
        assert f"deb-systemd-helper enable '{unit}'" in scripts["postinst"], unit
    assert "py3compile -p cprd" in scripts["postinst"]
    assert "addgroup --system --quiet cprd" in scripts["postinst"]
